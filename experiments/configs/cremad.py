"""CREMA-D, audio (log-STFT 257×188) + video (3 frames), ResNet-18 from scratch, the reference's
MCR weights (λ_M 0.1, λ_uni 0.01, λ_Con 1, S 32, greedy). Build instructions: docs/datasets_manual.md.

    python -m experiments.main --config experiments/configs/cremad.py --workdir runs/cremad \
        --config.data.manual_dir=/data/CREMA-D --config.data.data_dir=/data/tfds
"""

from experiments.configs.av_common import av_config


def get_config(arg=None):
    return av_config("cremad", arg, mipd_weight=0.1, uni_weight=0.01, builder_kwargs={"fold": 0})
