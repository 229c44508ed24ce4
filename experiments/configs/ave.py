"""AVE (28 events), audio (257×1004) + video (4 frames), ResNet-18; λ_M 0.01, λ_uni 0.01 (reference)."""

from experiments.configs.av_common import av_config


def get_config(arg=None):
    return av_config("ave", arg, mipd_weight=0.01, uni_weight=0.01)
