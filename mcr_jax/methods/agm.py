r"""AGM: adaptive gradient modulation from zero-input counterfactuals (SPEC.md §8).

Li, Li, Chen, Jiang, Ding, Wang, *Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation*, ICCV 2023. The loss is the joint (fused) task loss; the gradient of each modality's
encoder is scaled by an exponential coefficient.

What is computed, per step (all under ``stop_gradient``, in evaluation mode):

1. **Mono-modal responses** (Shapley values of the fused logits). With ``f(S)`` the fused logits
   when every modality outside ``S`` has its *input* replaced by zeros,

   .. math::
      \phi_m = \sum_{S \subseteq N \setminus \{m\}} \frac{|S|!\,(M-|S|-1)!}{M!}
               \big(f(S \cup \{m\}) - f(S)\big),

   for M = 2: :math:`\phi_a = \tfrac12[(f(a,v) - f(0,v)) + (f(a,0) - f(0,0))]`. The encoders are
   separate, so zeroing modality m's input only changes its latent: each encoder runs once on the
   real inputs and once on zeros, and the :math:`2^M` subsets cost fusion-head evaluations only.
2. **Scores**: :math:`s_m = \mathrm{CE}(\phi_m, y)`, the task loss of the mono-modal response
   (lower is better; the batch mean over valid rows). For regression the task loss is L1 — an
   extension of the paper's classification formula, in the same spirit.
3. **Discrepancy ratios** :math:`r_m = \exp\big(\bar s_{-m} - s_m\big)` with :math:`\bar s_{-m}` the
   mean of the other modalities' scores (M = 2: :math:`r_a = e^{s_v - s_a}`; > 1 when m is the
   better modality). The same ratio from the running averages :math:`\tilde s_m` of the scores
   (kept in the method state) is the reference :math:`\tilde r_m`.
4. **Coefficients** :math:`k_m = \exp\big(\alpha\,\min(\tilde r_m - r_m,\ \text{max_gap})\big)`:
   a modality that is currently more dominant than it has been on average is slowed, one that lags
   is accelerated. ``k_m`` multiplies the gradient of every parameter of ``encoders[m]`` (the
   gradient that reaches modality m's features; the fusion head and unimodal heads are not scaled).

Choices (the paper, read from memory, leaves them open):

- The running average is the plain cumulative mean over all training steps so far, **including the
  current step** (updated before the coefficient is formed), so the very first step has
  :math:`k_m = 1` exactly.
- The reference code drops the :math:`f(\emptyset)` term for M = 2; here the exact Shapley value is
  used (its M terms sum to :math:`f(N) - f(\emptyset)`), for any M (cost :math:`2^M` fusion calls).
- The counterfactual passes run in evaluation mode (running batch-norm statistics, no dropout), the
  real-input latents included, so that :math:`\phi` compares like with like.
- ``max_gap`` (10, as the reference code) caps the exponent's argument so the coefficient stays
  finite.

Config (``method`` section): ``alpha`` (α = 3.0, the task's reference value), ``max_gap`` (10.0).
Works for classification and regression, any fusion head, any M >= 2.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, model_inputs, task_loss
from mcr_jax.methods.common import check_options, modality_owners, others_mean, scale_by_owner

DEFAULTS = dict(alpha=3.0, max_gap=10.0)


def shapley_responses(fuse: Callable[[dict], jax.Array], latents: Mapping[str, jax.Array],
                      zero_latents: Mapping[str, jax.Array], modalities: Sequence[str]) -> dict[str, jax.Array]:
    """Exact Shapley values of ``fuse`` over the modalities: ``{m: φ_m [B, C]}``.

    ``fuse`` maps ``{m: [B, D_m]}`` to ``[B, C]``; a modality outside the coalition contributes its
    ``zero_latents`` entry (the encoder's output on a zero input).
    """
    names = list(modalities)
    num = len(names)
    values = {}
    for size in range(num + 1):
        for subset in itertools.combinations(range(num), size):
            chosen = set(subset)
            values[frozenset(subset)] = fuse({m: latents[m] if i in chosen else zero_latents[m]
                                              for i, m in enumerate(names)})
    out = {}
    for i, m in enumerate(names):
        others = [j for j in range(num) if j != i]
        total = 0.0
        for size in range(num):
            weight = math.factorial(size) * math.factorial(num - size - 1) / math.factorial(num)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                total = total + weight * (values[s | {i}] - values[s])
        out[m] = total
    return out


def agm_ratios(scores: jax.Array) -> jax.Array:
    """``r_m = exp(mean_{j≠m} s_j − s_m)`` for scores (losses) ``[M]``."""
    return jnp.exp(others_mean(scores) - scores)


def agm_coefficients(scores: jax.Array, mean_scores: jax.Array, alpha: float, max_gap: float = 10.0) -> jax.Array:
    """``k_m = exp(α · min(r̃_m − r_m, max_gap))``; ``r`` from ``scores``, ``r̃`` from ``mean_scores``."""
    gap = agm_ratios(mean_scores) - agm_ratios(scores)
    return jnp.exp(alpha * jnp.minimum(gap, max_gap))


class AGM(Method):
    """AGM (see the module docstring). Classification or regression, any fusion, any M >= 2."""

    name = "agm"
    reports_unimodal_heads = False

    def __init__(self, config, info):
        super().__init__(config, info)
        self.opts = check_options(config, DEFAULTS, "AGM")
        if float(self.opts["alpha"]) < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.opts['alpha']}.")

    def init_method_state(self, params):
        return {"count": jnp.zeros((), jnp.int32), "score_mean": jnp.zeros((len(self.modalities),), jnp.float32)}

    def scores(self, handle, params, batch) -> jax.Array:
        """``s_m`` ``[M]``: the task loss of each modality's Shapley response (evaluation mode)."""
        names = self.modalities
        model = handle.eval_model(jax.lax.stop_gradient(params))
        inputs, masks = model_inputs(batch, names)
        latents = model.encode(inputs, masks)
        zero_latents = model.encode({m: jnp.zeros_like(x) for m, x in inputs.items()}, masks)
        phi = shapley_responses(model.fuse, latents, zero_latents, names)
        s = jnp.stack([task_loss(phi[m], batch["label"], batch.get("mask"), self.task) for m in names])
        return jax.lax.stop_gradient(s).astype(jnp.float32)

    def gradients(self, handle, params, batch, key, method_state):
        names = self.modalities
        loss, metrics, new_rest, grads = self._joint(handle, params, batch, key, method_state)
        scores = self.scores(handle, params, batch)
        count = method_state["count"]
        mean = (method_state["score_mean"] * count.astype(jnp.float32) + scores) / (count + 1).astype(jnp.float32)
        coeffs = agm_coefficients(scores, mean, float(self.opts["alpha"]), float(self.opts["max_gap"]))
        grads = scale_by_owner(grads, modality_owners(params, names, ("encoders",)), coeffs)
        metrics = dict(metrics, loss=loss, **{f"score_{m}": scores[i] for i, m in enumerate(names)},
                       **{f"coeff_{m}": coeffs[i] for i, m in enumerate(names)})
        return grads, {}, new_rest, {"count": count + 1, "score_mean": mean}, metrics

    def _joint(self, handle, params, batch, key, method_state):
        def fn(p):
            loss, metrics, model = self.loss(handle, p, batch, key, method_state)
            return loss, (metrics, handle.rest_of(model))

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        return loss, metrics, new_rest, grads
