r"""MLB: multi-loss training with balancing gradient coefficients.

Kontras, Chatzichristos, Blaschko, De Vos, *Improving Multimodal Learning with Multi-Loss Gradient
Modulation*, BMVC 2024 (and *Self-Balancing Multimodal Models via Multi-Loss Gradient Modulation*,
IJCV 2025) — the same authors as MCR. Released code: ``kkontras/MLB`` and ``kkontras/MCR``,
``agents/general_agent/helpers/Bias_Infusion.py``: classes ``Bias_Infusion_MLB`` (two modalities,
classification), ``Bias_Infusion_MLB_3d`` (three), ``Bias_Infusion_MLB_Reg`` (``kkontras/MCR``) and
``Bias_Infusion_MLB_3d_Reg`` (regression); ``kkontras/MLB`` (snapshot ``357b5ce``) selects
``Bias_Infusion_MLB`` with the config name ``"OGM-Mine"``.

Loss: :math:`L = \mathrm{CE}(\ell, y) + \lambda_{uni} \sum_m \mathrm{CE}(u_m, y)` (fused plus
unimodal heads; L1 losses for regression, as the released ``train_one_step_regression``). Per step,
every modality's unimodal head gives a confidence — the batch mean of the softmax probability of
the true class, :math:`c_m` — and the ratio

.. math::
   r_m = \frac{\bar c_{-m}}{c_m}, \qquad \bar c_{-m} = \tfrac{1}{M-1}\sum_{j \ne m} c_j

(M = 2: :math:`r_a = c_v / c_a`, the released ``ratio_0 = score_1 / score_0``; M = 3: the mean of
the other two, as ``Bias_Infusion_MLB_3d``), so :math:`r_m > 1` exactly when modality m is
**weaker** than the others. The coefficient

.. math::
   k_m = 1 + (\beta - 1)\tanh\big(\alpha (r_m - 1)\big) \quad (r_m > 1), \qquad
   k_m = 1 + \tanh\big(\alpha (r_m - 1)\big) \quad (r_m \le 1)

accelerates the weaker modalities (up to β) and decelerates the stronger ones (down to
:math:`1 - \tanh\alpha > 0`): the slowing branch uses no β, which is what keeps every coefficient
positive (with β = 10 the symmetric form would reach :math:`1 - 9\tanh(0.5) < 0`). This is the
released ``tanh_mode == "2"`` with ``tanh_mode_beta`` = β (``kkontras/MCR`` ``train.py`` sets
``tanh_mode = "2"`` whenever ``--tanh_mode_beta`` is given); the released default (no ``tanh_mode``)
is the symmetric :math:`1 + \tanh(\alpha(r_m - 1))` on both sides, which is β = 2 here.
:math:`k_m` multiplies the gradient (of the whole loss) of every parameter that belongs to
modality m — ``encoders[m]``, ``heads[m]`` and, with linear late fusion, the branch ``W_m`` (the
released ``enc_m``, whose encoders hold their unimodal classifiers, and ``fc_m_lin.weight``) — and
shared parameters (the fusion bias) keep their gradient. As the confidences equalise,
:math:`r_m \to 1` and :math:`k_m \to 1`: the balancing phases out by itself.

Regression: the confidence is replaced by the **mean squared error** of each unimodal output,
:math:`L_m = \operatorname{mean}_i (u_{m,i} - y_i)^2` (the released ``F.mse_loss(out.squeeze(),
label)`` in ``Bias_Infusion_MLB_Reg`` / ``_3d_Reg``), lower being better, so
:math:`r_m = L_m / \bar L_{-m}` (again > 1 for the weaker modality). The training loss stays L1;
only the score that sets the coefficients is the MSE.

Remaining differences from the released code:

- Any M >= 2 and any fusion head (released: two or three modalities; with a non-linear fusion head
  the released code scales ``enc_m`` and, where it exists, ``fc_m_lin.weight``; here ``encoders[m]``
  and ``heads[m]``, the branches existing only in linear late fusion).
- Only the ``tanh_mode`` "2" family (β = 2 gives the released default); the released ablation modes
  (``linear``, ``all_linear``, ``softmax``, ``ogm``, the JSD scores) are not implemented.
- Padded rows (``mask``) are left out of the scores (the released batches have none); ratio
  denominators are floored at 1e-12 (released: unguarded division).
- No ``starting_epoch`` / ``ending_epoch`` switch (the released defaults 0 / 1500 mean always on).

Config (``method`` section): ``alpha`` (α = 0.5), ``beta`` (β = 10; must be > 0), ``uni_weight``
(λ_uni = 1.0; the released ``multi_supervised_w`` of the unimodal heads). Any fusion head, any
M >= 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, unimodal_losses
from mcr_jax.methods.common import others_mean, true_class_prob
from mcr_jax.players import modality_owners, scale_by_owner
from mcr_jax.state import StepOutput

DEFAULTS = dict(alpha=0.5, beta=10.0, uni_weight=1.0)
#: the tuning grid of a study (mcr_jax.study): the released run.sh settings span these.
GRID = dict(alpha=[0.5, 2.0, 5.0], beta=[0.5, 2.0, 10.0])
OWNED = ("encoders", "heads", "branches")


def mlb_ratios(scores: jax.Array, *, higher_is_better: bool = True) -> jax.Array:
    """``r_m`` ``[M]``: > 1 for a modality weaker than the mean of the others.

    ``higher_is_better``: scores are confidences (``r_m = mean_{j≠m} c_j / c_m``); otherwise losses,
    e.g. the unimodal MSEs (``r_m = L_m / mean_{j≠m} L_j``). Denominators are floored at 1e-12.
    """
    if higher_is_better:
        return others_mean(scores) / jnp.maximum(scores, 1e-12)
    return scores / jnp.maximum(others_mean(scores), 1e-12)


def mlb_coefficients(ratios: jax.Array, alpha: float, beta: float) -> jax.Array:
    """``k = 1 + (β−1) tanh(α(r−1))`` where ``r > 1``, else ``1 + tanh(α(r−1))`` (``[M]``, all > 0)."""
    t = jnp.tanh(alpha * (ratios - 1.0))
    return jnp.where(ratios > 1.0, 1.0 + (beta - 1.0) * t, 1.0 + t)


class MLB(Method):
    """MLB (see the module docstring). Classification or regression, any fusion, any M >= 2."""

    name = "mlb"
    reports_unimodal_heads = True
    traceable = ("alpha", "beta", "uni_weight")

    def __init__(self, config, info):
        super().__init__(config, info)
        if float(self.opts["beta"]) <= 0:
            raise ValueError(f"method.beta must be > 0 (the largest coefficient); got {self.opts['beta']}.")
        if float(self.opts["alpha"]) < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.opts['alpha']}.")

    def gradients(self, handle, params, batch, key, method_state):
        names, labels, mask = self.modalities, batch["label"], batch.get("mask")
        weight = self.hp("uni_weight", float(self.opts["uni_weight"]))

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            fused = self.task.loss(out["logits"], labels, mask)
            uni = unimodal_losses(out, batch, self.task, names)
            if not self.task.categorical:  # the unimodal MSE (the training loss above is L1)
                u = {m: out["unimodal"][m][:, 0] for m in names}
                scores = jnp.stack([masked_mean(jnp.square(u[m] - labels.astype(u[m].dtype)), mask) for m in names])
            else:
                scores = jnp.stack([masked_mean(true_class_prob(out["unimodal"][m], labels), mask) for m in names])
            total = fused + weight * sum(uni.values())
            terms = {"task": fused, **{f"uni_{m}": v for m, v in uni.items()}}
            return total, (terms, jax.lax.stop_gradient(scores), handle.rest_of(model))

        (loss, (terms, scores, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        ratios = mlb_ratios(scores, higher_is_better=self.task.categorical)
        coeffs = mlb_coefficients(ratios, self.hp("alpha", float(self.opts["alpha"])),
                                  self.hp("beta", float(self.opts["beta"])))
        grads = scale_by_owner(grads, modality_owners(params, names, OWNED), coeffs)
        metrics = dict(terms, loss=loss, **{f"ratio_{m}": ratios[i] for i, m in enumerate(names)},
                       **{f"coeff_{m}": coeffs[i] for i, m in enumerate(names)})
        return StepOutput(grads, {}, new_rest, method_state, metrics)
