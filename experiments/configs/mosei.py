"""CMU-MOSEI, vision + text; λ_M 0.01, λ_uni 0.1 and the CEB term on (reference; the CEB weight 0.1
is our choice, the reference does not state it). See cmu.py."""

from experiments.configs.cmu import cmu_config


def get_config(arg=None):
    return cmu_config("mosei", arg, mipd_weight=0.01, uni_weight=0.1, ceb_weight=0.1)
