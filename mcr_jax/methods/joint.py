"""Joint training: the fused head's task loss only (SPEC.md §8, "Joint training")."""

from mcr_jax.methods.base import Method


class Joint(Method):
    """``L = CE(f_c([z_1..z_M]), y)`` (L1 for regression). The base class's loss, registered by name."""

    name = "joint"
