r"""MMPareto: Pareto integration of the fused and unimodal gradients (Wei & Hu, ICML 2024, arXiv 2405.17730).

The loss is the multi-loss :math:`L = L_{mm} + \sum_m L_m` (fused task loss plus every unimodal
head's task loss). For the encoder :math:`\theta_m` of each modality, the two gradients that reach
it, :math:`g_{mm} = \nabla_{\theta_m} L_{mm}` and :math:`g_m = \nabla_{\theta_m} L_m` (no other
loss touches :math:`\theta_m`), are integrated:

.. math::
   (\alpha_{mm}, \alpha_m) =
   \begin{cases}
     (\tfrac12, \tfrac12) & \cos(g_{mm}, g_m) > 0 \\
     \arg\min_{\alpha \in [0, 1]} \|\alpha g_{mm} + (1-\alpha) g_m\|^2
       = \operatorname{clip}\!\Big(\frac{(g_m - g_{mm})^\top g_m}{\|g_{mm} - g_m\|^2}, 0, 1\Big)
       & \text{otherwise (MGDA, min-norm)}
   \end{cases}

   h = 2(\alpha_{mm} g_{mm} + \alpha_m g_m), \qquad
   g_{\theta_m} = \gamma \cdot \max\!\Big(1, \frac{\|g_{mm} + g_m\|}{\|h\|}\Big) \cdot h .

With non-conflicting gradients :math:`h` is exactly the plain sum. When they conflict, the
min-norm direction is common to both objectives, and its magnitude is restored to at least that of
the plain sum; :math:`\gamma` (``scale``, 1.5) then enlarges it further (the paper's argument: a
larger step with more gradient noise generalises better). Every other parameter (unimodal heads,
fusion head) gets the ordinary multi-loss gradient :math:`\nabla(L_{mm} + \sum_m L_m)`.

Choices (documented):

- ``scale`` (γ, default 1.5) and the equal halves for cos > 0 (strictly positive) follow the
  authors' release.
- The cosine and the MGDA weights are computed on the whole encoder's gradient (all its parameter
  arrays concatenated). The magnitude restoration :math:`\max(1, \|g_{mm}+g_m\| / \|h\|)` is applied
  per parameter array by default (``rescale_scope = "tensor"``, as the authors' release does);
  ``rescale_scope = "encoder"`` uses the norms of the whole encoder's gradient instead (the
  algorithm as written for one parameter vector).
- The MGDA weight is the exact closed form for two vectors; when both gradients vanish the weights
  are (½, ½) and the rescale factor 1 (no division by zero).
- "Encoder" means the parameters under ``encoders/<m>``; the unimodal head ``heads/<m>`` and the
  fusion branch of modality ``m`` are treated like the other parameters (plain gradient), as in the
  reference, which skips every ``head`` parameter.

Works for classification and regression (L1 task losses), any fusion head and any M >= 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.game import path_keys
from mcr_jax.methods.base import Method, task_loss, unimodal_losses
from mcr_jax.methods.common import check_options

DEFAULTS = dict(scale=1.5, rescale_scope="tensor")
SCOPES = ("tensor", "encoder")


def _dot(xs, ys):
    return sum(jnp.vdot(x, y) for x, y in zip(xs, ys, strict=True))


def pareto_weights(g_mm, g_uni):
    """``(alpha_mm, alpha_uni, cos)`` for two gradients given as lists of arrays (one encoder)."""
    v11, v22, v12 = _dot(g_mm, g_mm), _dot(g_uni, g_uni), _dot(g_mm, g_uni)
    denom = jnp.sqrt(v11 * v22)
    cos = jnp.where(denom > 0, v12 / jnp.where(denom > 0, denom, 1.0), 0.0)
    diff = v11 + v22 - 2.0 * v12  # ||g_mm - g_uni||^2
    mgda = jnp.clip((v22 - v12) / jnp.where(diff > 0, diff, 1.0), 0.0, 1.0)
    mgda = jnp.where(diff > 0, mgda, 0.5)
    alpha_mm = jnp.where(cos > 0, 0.5, mgda)
    return alpha_mm, 1.0 - alpha_mm, cos


def _norm(xs):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in xs))


def _restore(h_norm, sum_norm):
    """``max(1, ||sum|| / ||h||)`` (1 when ``h`` vanishes)."""
    ratio = sum_norm / jnp.where(h_norm > 0, h_norm, 1.0)
    return jnp.where((h_norm > 0) & (ratio > 1.0), ratio, 1.0)


def integrate(g_mm, g_uni, *, scale: float, scope: str = "tensor"):
    """MMPareto's gradient for one encoder: lists of arrays ``g_mm``, ``g_uni`` → (list, metrics)."""
    a_mm, a_uni, cos = pareto_weights(g_mm, g_uni)
    h = [2.0 * (a_mm * x + a_uni * y) for x, y in zip(g_mm, g_uni, strict=True)]
    plain = [x + y for x, y in zip(g_mm, g_uni, strict=True)]
    if scope == "encoder":
        factor = _restore(_norm(h), _norm(plain))
        out = [scale * factor * t for t in h]
    else:
        out = [scale * _restore(_norm([t]), _norm([p])) * t for t, p in zip(h, plain, strict=True)]
    return out, {"cos": cos, "alpha_mm": a_mm}


class MMPareto(Method):
    """Multi-loss with Pareto-integrated encoder gradients; config: ``scale`` (γ 1.5), ``rescale_scope``."""

    name = "mmpareto"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        check_options(config, DEFAULTS, "MMPareto")
        self.scale = float(config.get("scale", DEFAULTS["scale"]))
        self.scope = config.get("rescale_scope", DEFAULTS["rescale_scope"])
        if self.scope not in SCOPES:
            raise ValueError(f"method.rescale_scope must be one of {SCOPES}; got {self.scope!r}.")
        if self.scale <= 0:
            raise ValueError(f"method.scale (γ) must be > 0; got {self.scale}.")

    def _encoder_leaf_ids(self, params):
        """``{modality: [leaf index, ...]}`` of the leaves under ``encoders/<m>`` in flatten order."""
        paths = [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        ids = {m: [i for i, k in enumerate(paths) if k[:2] == ["encoders", m]] for m in self.modalities}
        empty = [m for m, v in ids.items() if not v]
        if empty:
            raise ValueError(f"MMPareto found no encoder parameters under encoders/<m> for {empty}.")
        return ids

    def gradients(self, handle, params, batch, key, method_state):
        mask = batch.get("mask")

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            fused = task_loss(out["logits"], batch["label"], mask, self.task)
            uni = unimodal_losses(out, batch, self.task, self.modalities)
            total_uni = sum(uni.values())
            return jnp.stack([fused, total_uni]), (fused, uni, handle.rest_of(model))

        jac, (fused, uni, new_rest) = jax.jacrev(fn, has_aux=True)(params)
        g_mm = jax.tree.map(lambda g: g[0], jac)
        g_uni = jax.tree.map(lambda g: g[1], jac)
        leaves_mm, treedef = jax.tree.flatten(g_mm)
        leaves_uni = jax.tree.leaves(g_uni)
        out = [a + b for a, b in zip(leaves_mm, leaves_uni, strict=True)]
        metrics = {"task": fused, **{f"uni_{m}": v for m, v in uni.items()}, "loss": fused + sum(uni.values())}
        for m, ids in self._encoder_leaf_ids(params).items():
            new, mets = integrate([leaves_mm[i] for i in ids], [leaves_uni[i] for i in ids], scale=self.scale,
                                  scope=self.scope)
            for i, g in zip(ids, new, strict=True):
                out[i] = g
            metrics[f"cos_{m}"] = mets["cos"]
            metrics[f"alpha_mm_{m}"] = mets["alpha_mm"]
        return jax.tree.unflatten(treedef, out), {}, new_rest, method_state, metrics
