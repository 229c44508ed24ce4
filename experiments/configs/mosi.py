"""CMU-MOSI, vision + text; λ_M 0.001, λ_uni 0.001 (reference). See cmu.py."""

from experiments.configs.cmu import cmu_config


def get_config(arg=None):
    return cmu_config("mosi", arg, mipd_weight=0.001, uni_weight=0.001, ceb_weight=0.0)
