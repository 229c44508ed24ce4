r"""The irrelevant-information term: a conditional entropy bottleneck (CEB) penalty.

A decoder :math:`h` maps the class information to the concatenated latents; the penalty is their
mean squared error:

.. math:: L_{CEB} = \frac{1}{B \sum_m D_m}\sum_b \big\| [z_1, \dots, z_M]_b - h(c_b) \big\|^2

with :math:`c = \mathrm{stop\_gradient}(\ell)` the fused logits (the reference code) or
:math:`c = \mathrm{onehot}(y)` (the paper). Gradients reach the encoders and :math:`h`, never the
fused logits. The decoder is a callable so this stays a pure function; the Flax module lives in
``mcr_jax.models``. The term in the method as a whole: docs/method.md#ceb.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mcr_jax.losses._checks import (
    assert_integer,
    require_modalities,
    require_nonempty_batch,
    require_rank,
    require_same_batch,
    shape_of,
)
from mcr_jax.losses.reduce import masked_mean

CEB_CONDITIONS = ("logits", "label")


def ceb_condition(
    *,
    condition: str = "logits",
    fused_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
    num_classes: int | None = None,
) -> jax.Array:
    """The decoder's input ``[B, C]``: stop-gradient fused logits or the one-hot label.

    Args:
      condition: ``"logits"`` (reference code) or ``"label"`` (paper).
      fused_logits: ``[B, C]`` (for ``"logits"``).
      labels: ``[B]`` int (for ``"label"``; a float dtype is a ``TypeError``: a one-hot of 0.5
        would be a row of zeros).
      num_classes: ``C`` (for ``"label"``).
    """
    if condition == "logits":
        if fused_logits is None:
            raise ValueError("CEB condition 'logits' needs fused_logits [B, C].")
        require_rank(fused_logits, 2, "fused_logits", "[B, C]")
        return jax.lax.stop_gradient(fused_logits)
    if condition == "label":
        if labels is None or num_classes is None:
            raise ValueError("CEB condition 'label' needs labels [B] and num_classes.")
        require_rank(labels, 1, "labels", "[B]")
        assert_integer(labels, "labels", "[B] class indices")
        return jax.nn.one_hot(labels, num_classes)
    raise ValueError(f"unknown CEB condition {condition!r}; use one of {CEB_CONDITIONS}.")


def ceb_loss(latents: Sequence[jax.Array], decoded: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error between the concatenated latents and the decoder's output.

    Args:
      latents: ``M >= 2`` arrays ``[B, D_m]`` (``B >= 1``, else ``ValueError``: the mean would be NaN).
      decoded: ``[B, sum_m D_m]``, the decoder's output ``h(c)``.
      mask: optional ``[B]``; padded rows do not count.

    Returns:
      scalar, averaged over valid rows and all ``sum_m D_m`` features.
    """
    require_modalities(latents)
    batch = require_same_batch(latents)
    for m, z in enumerate(latents):
        require_rank(z, 2, f"latents[{m}]", "[B, D]")
    require_nonempty_batch(batch, "latents", shape_of(latents[0]))
    target = jnp.concatenate(list(latents), axis=-1)
    if shape_of(target)[1] == 0:
        shapes = ", ".join(str(shape_of(z)) for z in latents)
        raise ValueError(f"the latents have no features (sum_m D_m = 0; shapes {shapes}): the mean would be NaN.")
    if shape_of(decoded) != shape_of(target):
        raise ValueError(
            f"decoded has shape {shape_of(decoded)} but the concatenated latents have shape {shape_of(target)}."
        )
    per_row = jnp.mean(jnp.square(target - decoded), axis=-1)
    if mask is None:
        return jnp.mean(per_row)
    require_rank(mask, 1, "mask", "[B]")
    if shape_of(mask)[0] != batch:
        raise ValueError(f"mask has shape {shape_of(mask)} but the latents have batch size {batch}.")
    return masked_mean(per_row, mask)


def ceb_term(
    latents: Sequence[jax.Array],
    decoder: Callable[[jax.Array], jax.Array],
    *,
    condition: str = "logits",
    fused_logits: jax.Array | None = None,
    labels: jax.Array | None = None,
    num_classes: int | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``ceb_loss(latents, decoder(ceb_condition(...)))`` in one call."""
    cond = ceb_condition(condition=condition, fused_logits=fused_logits, labels=labels, num_classes=num_classes)
    return ceb_loss(latents, decoder(cond), mask=mask)
