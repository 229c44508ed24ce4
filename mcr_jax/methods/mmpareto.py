r"""MMPareto: Pareto integration of the fused and unimodal gradients.

Wei & Hu, *MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance*, ICML 2024
(arXiv 2405.17730). The loss is the multi-loss :math:`L = L_{mm} + \sum_m L_m` (fused task loss plus
every unimodal head's task loss); the gradient of each modality's encoder is replaced by a Pareto
integration of the two gradients that reach it.

The released code
-----------------
``GeWu-Lab/MMPareto_ICML2024`` (the authors' repository; read at commit a339db3, whose code is that
of cc923ec), ``code/MMPareto.py`` (``train_epoch``, lines 57-213), ``code/min_norm_solvers.py``
(``MinNormSolver``) and ``code/models/models.py`` (``AVClassifier``: ``audio_net``, ``visual_net``,
a fused ``head = Linear(1024, C)`` on the concatenated features and unimodal ``head_audio``,
``head_video``). One training step (CREMA-D, ``code/script/mmpareto.sh``):

1. Parameter groups (lines 74-84): every parameter whose name contains ``'head'`` is skipped; the
   others whose name contains ``'audio'`` / ``'visual'`` are the audio / visual **encoder** groups.
2. One forward pass in training mode: ``out, out_a, out_v = model(spec, images)``; ``loss_mm``,
   ``loss_a``, ``loss_v`` are the batch-mean cross-entropies of the fused and unimodal heads.
3. Lines 117-147: ``loss.backward(retain_graph=True)`` for each of the three losses in turn, the
   encoder groups' gradients copied after each (``'both'`` = fused; ``'audio'`` / ``'visual'`` =
   that modality's own loss), ``optimizer.zero_grad()`` in between: per-loss, per-tensor
   gradients, plus each group's flattened concatenation ``"concat"``.
4. Lines 149-174, per encoder: ``cos = F.cosine_similarity(g_both.concat, g_uni.concat)``; if
   ``cos > 0`` the weights are ``k = [0.5, 0.5]``; otherwise
   ``MinNormSolver.find_min_norm_element([g_both, g_uni])`` (two vectors: ``_min_norm_2d`` then
   ``_min_norm_element_from2``, lines 9-30): ``k_mm = 0.999`` if ``<g_mm, g_u> >= ||g_mm||²``,
   else ``0.001`` if ``<g_mm, g_u> >= ||g_u||²``, else the closed form
   ``(||g_u||² − <g_mm, g_u>) / ||g_mm − g_u||²``; ``k_u = 1 − k_mm``. (The dot products run over
   the list of every tensor *and* the ``"concat"`` entry, i.e. are doubled; the weight is
   unchanged by that.)
5. Line 178: ``gamma = 1.5`` (hard-coded). Lines 180-181: ``(loss_mm + loss_a + loss_v).backward()``.
6. Lines 184-207, for every parameter whose name, split at ``_`` and ``.``, contains ``'audio'``
   (``'visual'``) and not ``'head'``, i.e. per encoder **tensor**:
   ``new_grad = 2 k_mm g_mm + 2 k_u g_u``, ``diff = ||grad of the summed loss|| / ||new_grad||``,
   and ``param.grad = gamma · diff · new_grad`` if ``diff > 1`` else ``gamma · new_grad``. Every
   other parameter (fusion head, unimodal heads) keeps the summed loss's gradient.
7. SGD (lr 0.002, momentum 0.9, weight decay 1e-4), StepLR(30, 0.1), 50 epochs, batch 64. The
   ``--clip_grad`` flag is parsed but never used.

The MCR authors' port (``kkontras/MCR``, ``agents/general_agent/helpers/Bias_Infusion.py``,
``Bias_Infusion_MMPareto``; solver copied to ``utils/MinNormSolver.py``) is the same rule, with
``gamma`` taken from the config's ``bias_infusion.alpha`` (their README's commands: 1.5 for
CREMA-D ResNet, 2.0 ViT, 0.5 AVE, 3.0 UCF and Something-Something) and applied only between
``starting_epoch`` and ``ending_epoch`` (0 and 1500 in their configs: always). Its three-modality
variant (``Bias_Infusion_MMPareto_3d``) integrates only the first two modalities' encoders.

What is computed here, per step
-------------------------------
For the encoder :math:`\theta_m` of each modality (the parameters under ``encoders/<m>``), with
:math:`g_{mm} = \nabla_{\theta_m} L_{mm}` and :math:`g_m = \nabla_{\theta_m} L_m` (no other loss
reaches :math:`\theta_m`), both from one forward pass (``jax.jacrev`` of the two losses):

.. math::
   k_{mm} =
   \begin{cases}
     \tfrac12 & \cos(g_{mm}, g_m) > 0 \\
     0.999 & \langle g_{mm}, g_m\rangle \ge \|g_{mm}\|^2 \\
     0.001 & \langle g_{mm}, g_m\rangle \ge \|g_m\|^2 \\
     \dfrac{\|g_m\|^2 - \langle g_{mm}, g_m\rangle}{\|g_{mm} - g_m\|^2} & \text{otherwise (min-norm)}
   \end{cases}
   \qquad k_m = 1 - k_{mm},

   h = 2(k_{mm} g_{mm} + k_m g_m), \qquad
   g_{\theta_m} = \gamma \cdot \max\!\Big(1, \frac{\|g_{mm} + g_m\|}{\|h\|}\Big) \cdot h ,

the cosine and the weights on the whole encoder's gradient, the norms of the rescale factor per
parameter array (``rescale_scope = "tensor"``). With non-conflicting gradients :math:`h` is the
plain sum; when they conflict it is the min-norm direction common to both objectives, restored to
at least the plain sum's magnitude; :math:`\gamma` enlarges it further. The 0.999 / 0.001 cases
only arise when one of the two gradients vanishes (for conflicting gradients
:math:`\langle g_{mm}, g_m\rangle \le 0`): a vanished unimodal gradient then gives
:math:`\gamma\, g_{mm}` (not zero). Every other parameter (unimodal heads, fusion head) gets the
ordinary multi-loss gradient :math:`\nabla(L_{mm} + \sum_m L_m)`.

Options (``method`` section) and their defaults
-----------------------------------------------
``scale`` (γ = 1.5, the released code's constant and the MCR authors' CREMA-D ResNet value),
``rescale_scope`` (``"tensor"``, as the release; ``"encoder"``: one factor from the norms of the
whole encoder's gradient, the algorithm as written for one parameter vector).

Remaining differences from the released code
--------------------------------------------
- **Vanishing min-norm direction**: where :math:`h` is zero for a tensor whose summed gradient is
  not, the original divides by zero (``inf · 0``: NaN gradients); here the factor is 1 and the
  tensor's gradient 0. Where both are zero both give 0.
- **Any M >= 2, any fusion head**: every modality's encoder is integrated with its own unimodal
  loss (the original has M = 2 and a concatenation head; the MCR port's M = 3 variant integrates
  two of the three encoders).
- **Encoder groups** are the parameters under ``encoders/<m>`` (the original selects by the
  substrings ``audio`` / ``visual`` in parameter names); unimodal heads ``heads/<m>`` and the fusion
  head get the plain gradient, as the original's ``head*`` modules.
- **Padding rows** (batch mask) are left out of every loss; **regression** (L1 task losses) is an
  extension.
- **Optimizer**: the trainer's (the original: SGD with momentum 0.9, weight decay 1e-4, step decay).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, unimodal_losses
from mcr_jax.players import leaf_ids
from mcr_jax.state import StepOutput

DEFAULTS = dict(scale=1.5, rescale_scope="tensor")
#: the tuning grid of a study (mcr_jax.study): the MCR authors' values.
GRID = dict(scale=[0.5, 1.5, 2.0, 3.0])
SCOPES = ("tensor", "encoder")


def _dot(xs, ys):
    return sum(jnp.vdot(x, y) for x, y in zip(xs, ys, strict=True))


def min_norm_weight(v11, v12, v22):
    """Weight of the first vector in ``argmin_c ||c x1 + (1 - c) x2||`` from the dot products
    ``v11 = <x1, x1>``, ``v12 = <x1, x2>``, ``v22 = <x2, x2>``, as the original's
    ``MinNormSolver._min_norm_element_from2``: 0.999 if ``v12 >= v11``, else 0.001 if
    ``v12 >= v22``, else the closed form ``(v22 - v12) / (v11 + v22 - 2 v12)`` (then in (0, 1))."""
    denom = v11 + v22 - 2.0 * v12  # > 0 whenever the closed form is used
    inner = (v22 - v12) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(v12 >= v11, 0.999, jnp.where(v12 >= v22, 0.001, inner))


def pareto_weights(g_mm, g_uni):
    """``(alpha_mm, alpha_uni, cos)`` for two gradients given as lists of arrays (one encoder):
    ``(½, ½)`` when ``cos(g_mm, g_uni) > 0``, else the min-norm weights (:func:`min_norm_weight`).
    ``cos`` is 0 when either gradient vanishes."""
    v11, v22, v12 = _dot(g_mm, g_mm), _dot(g_uni, g_uni), _dot(g_mm, g_uni)
    denom = jnp.sqrt(v11 * v22)
    cos = jnp.where(denom > 0, v12 / jnp.where(denom > 0, denom, 1.0), 0.0)
    alpha_mm = jnp.where(cos > 0, 0.5, min_norm_weight(v11, v12, v22))
    return alpha_mm, 1.0 - alpha_mm, cos


def _norm(xs):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in xs))


def _restore(h_norm, sum_norm):
    """``max(1, ||sum|| / ||h||)`` (1 when ``h`` vanishes: the original's ``diff`` is then inf or NaN)."""
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
    traceable = ("scale",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.scale = float(self.opts["scale"])
        self.scope = self.opts["rescale_scope"]
        if self.scope not in SCOPES:
            raise ValueError(f"method.rescale_scope must be one of {SCOPES}; got {self.scope!r}.")
        if self.scale <= 0:
            raise ValueError(f"method.scale (γ) must be > 0; got {self.scale}.")

    def gradients(self, handle, params, batch, key, method_state):
        mask = batch.get("mask")
        scale = self.hp("scale", self.scale)

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            fused = self.task.loss(out["logits"], batch["label"], mask)
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
        for m, ids in leaf_ids(params, self.modalities).items():
            new, mets = integrate([leaves_mm[i] for i in ids], [leaves_uni[i] for i in ids], scale=scale,
                                  scope=self.scope)
            for i, g in zip(ids, new, strict=True):
                out[i] = g
            metrics[f"cos_{m}"] = mets["cos"]
            metrics[f"alpha_mm_{m}"] = mets["alpha_mm"]
        return StepOutput(jax.tree.unflatten(treedef, out), {}, new_rest, method_state, metrics)
