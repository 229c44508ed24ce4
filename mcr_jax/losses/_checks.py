"""Shape and argument checks shared by the losses (trace-time only: they cost nothing under jit).

The ``require_*`` checks raise ``ValueError`` naming the argument and the shapes (the losses'
documented contract, tests/test_input_validation.py). The ``assert_*`` checks are chex assertions
for what those do not cover (a mask that would broadcast against its values, a rank, an integer
dtype), raising ``ValueError`` for a shape or rank and ``TypeError`` for a dtype, so that every
wrong shape stays a ``ValueError``; chex's message names the check, ours in brackets the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax


def shape_of(x) -> tuple[int, ...]:
    return tuple(jax.numpy.shape(x))


def require_same_shape(a, b, name_a: str, name_b: str) -> None:
    if shape_of(a) != shape_of(b):
        raise ValueError(f"{name_a} has shape {shape_of(a)} but {name_b} has shape {shape_of(b)}; they must match.")


def require_rank(x, rank: int, name: str, layout: str) -> None:
    if len(shape_of(x)) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}); got shape {shape_of(x)}.")


def require_min_rank(x, rank: int, name: str, layout: str) -> None:
    if len(shape_of(x)) < rank:
        raise ValueError(f"{name} must have rank >= {rank} ({layout}); got shape {shape_of(x)}.")


def require_modalities(latents: Sequence, name: str = "latents") -> int:
    if isinstance(latents, dict):
        raise TypeError(f"{name} must be a sequence (list/tuple) ordered by modality, not a dict.")
    m = len(latents)
    if m < 2:
        raise ValueError(f"{name} holds {m} modality; MCR needs at least 2 modalities.")
    return m


def require_same_batch(latents: Sequence, name: str = "latents") -> int:
    sizes = [shape_of(z)[0] if len(shape_of(z)) else None for z in latents]
    if any(s is None for s in sizes) or len(set(sizes)) != 1:
        shapes = ", ".join(str(shape_of(z)) for z in latents)
        raise ValueError(f"every entry of {name} must share the leading batch axis [B, ...]; got shapes {shapes}.")
    return sizes[0]


def require_nonempty_batch(batch: int, name: str = "latents", shape=None) -> None:
    """Losses average over the batch rows: an empty batch would give NaN (or a meaningless 0)."""
    if batch < 1:
        seen = "" if shape is None else f" (shape {shape})"
        raise ValueError(
            f"{name} have an empty batch{seen}: B = 0. The loss averages over the batch rows, so it would be "
            "NaN or a meaningless 0; pass at least one row (skip empty batches before calling the loss)."
        )


def assert_same_shape(a, b, name_a: str, name_b: str, layout: str) -> None:
    """``a`` and ``b`` of one shape (no broadcasting), else ``ValueError`` naming both."""
    chex.assert_equal_shape([a, b], exception_type=ValueError,
                            custom_message=f"{name_b} must have the shape of {name_a} ({layout})")


def assert_rank(x, rank: int, name: str, layout: str) -> None:
    """``x`` of rank ``rank``, else ``ValueError`` naming it."""
    chex.assert_rank(x, rank, exception_type=ValueError,
                     custom_message=f"{name} must have rank {rank} ({layout})")


def assert_integer(x, name: str, layout: str) -> None:
    """``x`` of an integer dtype, else ``TypeError`` naming it."""
    chex.assert_type(x, int, exception_type=TypeError,
                     custom_message=f"{name} must hold integers ({layout})")
