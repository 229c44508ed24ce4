"""Divergences between predictive distributions, computed from logits.

Everything works in log space, so logits of magnitude 1e4 give finite values and finite gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcr_jax.losses._checks import require_min_rank, require_same_shape

LN2 = math.log(2.0)


def kl_from_logits(p_logits: jax.Array, q_logits: jax.Array, *, axis: int = -1) -> jax.Array:
    r"""KL divergence KL(P ‖ Q) between the softmax distributions of two sets of logits.

    .. math:: \mathrm{KL}(P \| Q) = \sum_c P_c (\log P_c - \log Q_c)

    Args:
      p_logits: ``[..., C]`` logits of P.
      q_logits: ``[..., C]`` logits of Q (same shape).
      axis: the class axis.

    Returns:
      ``[...]`` divergences in nats (natural log), >= 0.
    """
    require_same_shape(p_logits, q_logits, "p_logits", "q_logits")
    require_min_rank(p_logits, 1, "p_logits", "[..., C]")
    log_p = jax.nn.log_softmax(p_logits, axis=axis)
    log_q = jax.nn.log_softmax(q_logits, axis=axis)
    return jnp.maximum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis), 0.0)


def jsd_from_logits(p_logits: jax.Array, q_logits: jax.Array, *, axis: int = -1) -> jax.Array:
    r"""Jensen–Shannon divergence between the softmax distributions of two sets of logits.

    .. math::
       \mathrm{JSD}(P \| Q) = \tfrac12 \mathrm{KL}(P \| M) + \tfrac12 \mathrm{KL}(Q \| M),
       \qquad M = \tfrac12 (P + Q)

    Natural log, so :math:`0 \le \mathrm{JSD} \le \ln 2`. ``log M`` is formed with ``logaddexp``
    of the two log-softmaxes, so no probability is ever logged and extreme logits stay finite.
    This is the divergence of the MIPD term (Kontras et al. 2025; docs/method.md#mipd).

    Args:
      p_logits: ``[..., C]`` logits of P (for MIPD: the clean fused prediction).
      q_logits: ``[..., C]`` logits of Q (for MIPD: the prediction with one latent perturbed).
      axis: the class axis.

    Returns:
      ``[...]`` divergences in ``[0, ln 2]``.
    """
    require_same_shape(p_logits, q_logits, "p_logits", "q_logits")
    require_min_rank(p_logits, 1, "p_logits", "[..., C]")
    log_p = jax.nn.log_softmax(p_logits, axis=axis)
    log_q = jax.nn.log_softmax(q_logits, axis=axis)
    log_m = jnp.logaddexp(log_p, log_q) - LN2
    kl_pm = jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=axis)
    kl_qm = jnp.sum(jnp.exp(log_q) * (log_q - log_m), axis=axis)
    return jnp.clip(0.5 * (kl_pm + kl_qm), 0.0, LN2)


def squared_difference(p: jax.Array, q: jax.Array, *, axis: int = -1) -> jax.Array:
    r"""Mean squared difference of two (regression) predictions over the output axis.

    .. math:: d(p, q) = \frac{1}{K}\sum_k (p_k - q_k)^2

    The regression stand-in for the JSD in MIPD (CMU-MOSI/MOSEI in the reference code).

    Args:
      p: ``[..., K]`` predictions.
      q: ``[..., K]`` predictions (same shape).

    Returns:
      ``[...]`` non-negative values.
    """
    require_same_shape(p, q, "p", "q")
    require_min_rank(p, 1, "p", "[..., K]")
    return jnp.mean(jnp.square(p - q), axis=axis)


DIVERGENCES = {"jsd": jsd_from_logits, "kl": kl_from_logits, "mse": squared_difference}
