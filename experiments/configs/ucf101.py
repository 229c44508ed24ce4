"""UCF101 split 1, video (4 frames) + audio (the 51 classes with sound), ResNet-18; λ_M 0.001, λ_uni 0.1
(reference). ``--config.data.builder_kwargs.second=flow`` trains RGB + optical flow instead."""

from experiments.configs.av_common import av_config


def get_config(arg=None):
    return av_config("ucf101", arg, mipd_weight=0.001, uni_weight=0.1)
