"""Joint training: the fused head's task loss only."""

from mcr_jax.methods.base import Method

DEFAULTS: dict = {}


class Joint(Method):
    """``L = CE(f_c([z_1..z_M]), y)`` (L1 for regression). The base class's loss, registered by name."""

    name = "joint"

    def __init__(self, config, info):
        super().__init__(config, info)
