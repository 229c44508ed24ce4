r"""The shared-information term: supervised contrastive losses over the modalities' latents.

Two forms:

``supervised_ntxent`` (the reference code's form, default). Rows
:math:`u = [\hat z_1; \dots; \hat z_M]` (``M·B`` rows, :math:`\hat z = z / \|z\|`, no projection
head) with labels :math:`[y; \dots; y]` and similarities :math:`s_{ij} = u_i^\top u_j / \tau`.
Every ordered pair of distinct rows with equal labels is a positive pair :math:`(a, p)`; rows with
another label are the anchor's negatives :math:`N(a)`. One InfoNCE term per positive pair,

.. math::
   \ell_{ap} = -\log \frac{e^{s_{ap}}}{e^{s_{ap}} + \sum_{n \in N(a)} e^{s_{an}}},

averaged over all positive pairs (the NT-Xent form of metric-learning libraries; unlike Khosla et
al.'s SupCon the denominator does not hold the anchor's other positives). Computed from the
``(M·B)×(M·B)`` similarity matrix with masks: ``O((MB)^2 D)`` work.

``cross_modal_supcon`` (the paper's form). For every ordered pair of modalities ``(m, m')`` each
anchor row of ``m`` is contrasted against all rows of ``m'``; its positives are the rows of ``m'``
with the same label (SupCon with the positives averaged outside the log):

.. math::
   \ell_a = -\frac{1}{|P(a)|}\sum_{p \in P(a)} \log \frac{e^{s_{ap}}}{\sum_{j \in m'} e^{s_{aj}}},

averaged over anchors that have a positive, then over the ``M(M-1)`` ordered pairs. The paper
bounds :math:`I(X_2;Y|X_1) + I(X_1;Y|X_2) + 2 I(X_1;X_2) \ge \log N - L_{Con}`. The term in the method as a
whole: docs/method.md#contrastive.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mcr_jax.losses._checks import (
    assert_rank,
    require_modalities,
    require_nonempty_batch,
    require_rank,
    require_same_batch,
    shape_of,
)

_NEG = -1e30  # stands in for -inf in masked log-sum-exps (keeps gradients finite)


def l2_normalize(z: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``z / max(||z||_2, eps)`` along ``axis`` (PyTorch's ``F.normalize``), with a finite gradient
    at ``z = 0``."""
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z), axis=axis, keepdims=True), eps * eps))


def _prepare(latents, labels, mask):
    num_modalities = require_modalities(latents)
    batch = require_same_batch(latents)
    for m, z in enumerate(latents):
        require_rank(z, 2, f"latents[{m}]", "[B, D]")
    require_nonempty_batch(batch, "latents", shape_of(latents[0]))
    dims = {shape_of(z)[1] for z in latents}
    if len(dims) != 1:
        shapes = ", ".join(str(shape_of(z)) for z in latents)
        raise ValueError(f"contrastive losses compare latents by cosine similarity, so every latent needs the "
                         f"same dimension D; got shapes {shapes}.")
    if dims == {0}:
        raise ValueError(f"latents have dimension D = 0 (shape {shape_of(latents[0])}); cosine similarities of "
                         "empty vectors are meaningless.")
    require_rank(labels, 1, "labels", "[B]")
    if shape_of(labels)[0] != batch:
        raise ValueError(f"labels has shape {shape_of(labels)} but the latents have shape {shape_of(latents[0])}.")
    if mask is None:
        mask = jnp.ones((batch,), dtype=bool)
    else:
        require_rank(mask, 1, "mask", "[B]")
        if shape_of(mask)[0] != batch:
            raise ValueError(f"mask has shape {shape_of(mask)} but labels has shape {shape_of(labels)}.")
        mask = jnp.asarray(mask).astype(bool)
    return num_modalities, batch, mask


def _temperature(temperature) -> tuple[object, bool]:
    """``(tau, static)``: a concrete temperature checked (``ValueError`` unless finite and > 0); a
    traced one (a study axis under ``jit``/``vmap``) passed through — the loss is then NaN where it
    is not > 0, so the run's non-finite check stops it."""
    if isinstance(temperature, jax.core.Tracer):
        return temperature, False
    try:
        tau = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}.") from None
    if not (tau > 0.0 and tau < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}.")
    return tau, True


def supervised_ntxent(
    latents: Sequence[jax.Array],
    labels: jax.Array,
    *,
    temperature: float = 0.5,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Supervised NT-Xent over all modalities' rows (the reference form; see the module docstring).

    Args:
      latents: ``M >= 2`` arrays ``[B, D]`` (same ``D``; ``B >= 1``, else ``ValueError``).
      labels: ``[B]`` class labels (any dtype with equality; for regression, pass discretised labels).
      temperature: ``tau > 0`` (reference 0.5); another concrete value is a ``ValueError``, a
        traced value that is not > 0 gives NaN.
      mask: optional ``[B]`` bool/0-1, ``False`` for padded rows (they are neither anchors,
        positives nor negatives).

    Returns:
      scalar loss; 0 when the batch has no positive pair.
    """
    num_modalities, _, mask = _prepare(latents, labels, mask)
    u = jnp.concatenate([l2_normalize(z) for z in latents], axis=0)  # [MB, D]
    lab = jnp.tile(labels, num_modalities)
    valid = jnp.tile(mask, num_modalities)
    temperature, static = _temperature(temperature)
    sim = (u @ u.T) / temperature
    n = shape_of(u)[0]
    same = lab[:, None] == lab[None, :]
    both = valid[:, None] & valid[None, :]
    pos = same & both & ~jnp.eye(n, dtype=bool)
    neg = ~same & both
    # -log(e^{s_ap} / (e^{s_ap} + sum_n e^{s_an})) = log(1 + sum_n e^{s_an - s_ap})
    if static and 2.0 / temperature < 60.0:
        # |s| <= 1/tau, so exponentials shifted by 1/tau stay in [e^{-2/tau}, 1]: one exp per entry.
        e = jnp.exp(sim - 1.0 / temperature)
        neg_sum = jnp.sum(jnp.where(neg, e, 0.0), axis=1, keepdims=True)
        per_pair = jnp.log1p(neg_sum / e)
    else:
        neg_lse = jax.nn.logsumexp(jnp.where(neg, sim, _NEG), axis=1)  # ~ -1e30 when no negative
        per_pair = jnp.logaddexp(sim, neg_lse[:, None]) - sim
    num_pos = jnp.sum(pos)
    loss = jnp.sum(jnp.where(pos, per_pair, 0.0)) / jnp.maximum(num_pos, 1)
    return loss if static else jnp.where(temperature > 0, loss, jnp.nan)


def cross_modal_supcon(
    latents: Sequence[jax.Array],
    labels: jax.Array,
    *,
    temperature: float = 0.5,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Cross-modal supervised contrastive loss (the paper's form; see the module docstring).

    Args:
      latents: ``M >= 2`` arrays ``[B, D]`` (same ``D``; ``B >= 1``, else ``ValueError``).
      labels: ``[B]`` class labels.
      temperature: ``tau > 0`` (a concrete value otherwise is a ``ValueError``; a traced one gives NaN).
      mask: optional ``[B]``; padded rows are neither anchors nor candidates.

    Returns:
      scalar loss averaged over anchors with a positive and over the ``M(M-1)`` ordered pairs.
    """
    num_modalities, _, mask = _prepare(latents, labels, mask)
    temperature, static = _temperature(temperature)
    normed = [l2_normalize(z) for z in latents]
    same = (labels[:, None] == labels[None, :]) & mask[:, None] & mask[None, :]
    candidates = mask[None, :]
    losses = []
    for a in range(num_modalities):
        for b in range(num_modalities):
            if a == b:
                continue
            sim = (normed[a] @ normed[b].T) / temperature
            log_prob = sim - jax.nn.logsumexp(jnp.where(candidates, sim, _NEG), axis=1, keepdims=True)
            num_pos = jnp.sum(same, axis=1)
            per_anchor = -jnp.sum(jnp.where(same, log_prob, 0.0), axis=1) / jnp.maximum(num_pos, 1)
            has_pos = num_pos > 0
            losses.append(jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has_pos), 1))
    loss = jnp.mean(jnp.stack(losses))
    return loss if static else jnp.where(temperature > 0, loss, jnp.nan)


def binarize_regression_labels(labels: jax.Array, *, threshold: float = 0.0) -> jax.Array:
    """Turns sentiment scores into classes for the contrastive term: ``[B] float -> [B] int32``.

    ``0`` for ``y < threshold``, ``1`` otherwise. (The reference code uses the raw real-valued
    scores as classes, so only exactly equal scores are positives; pass the raw labels for that.)
    Another rank than ``[B]`` is a ``ValueError``.
    """
    assert_rank(labels, 1, "labels", "[B] sentiment scores")
    return (labels >= threshold).astype(jnp.int32)


CONTRASTIVE = {"ntxent": supervised_ntxent, "cross_modal": cross_modal_supcon}
