r"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (SPEC.md §8).

Peng, Wei, Deng, Wang, Hu, *Balanced Multimodal Learning via On-the-fly Gradient Modulation*,
CVPR 2022. The loss is the joint (fused) cross-entropy; only the gradients are edited.

Per step, with linear late fusion :math:`\ell = \sum_m z_m W_m + b`, every modality's branch of the
fused prediction gives a score summed over the (valid rows of the) batch,

.. math::
   s_m = \sum_i \mathrm{softmax}\big(z_{m,i} W_m + b / M\big)_{y_i},

the discrepancy ratio :math:`\rho_m = s_m / \bar s_{-m}` with :math:`\bar s_{-m}` the mean score of
the other modalities (for M = 2 this is the paper's :math:`s_a / s_v`), and the coefficient

.. math::
   k_m = 1 - \tanh(\alpha \rho_m) \;\text{ if } \rho_m > 1, \qquad k_m = 1 \text{ otherwise}.

Inside the modulation window (epochs ``start_epoch`` … ``end_epoch``, 1-based, inclusive; the
epoch is tracked in the method state and advanced by :meth:`OGMGE.on_epoch_end`) every modulated
parameter tensor's gradient becomes :math:`k_m g + \epsilon`, :math:`\epsilon \sim
\mathcal N(0, \mathrm{std}(g)^2)` (GE: Gaussian noise with the standard deviation of that tensor's
own, unmodulated gradient, population std over its entries). Outside the window the gradients are
the plain joint gradients.

Choices (the paper leaves them open or the task asks for them):

- **Which parameters.** The paper modulates the update of the encoder :math:`\varphi^u`; the
  original code touches only the encoders too (and there only the convolution kernels). Default
  ``modulate="encoder"``: every parameter of ``encoders[m]``. ``"encoder_and_branch"`` also scales
  (and noises) the modality's fusion branch ``W_m``. The shared bias and the unimodal heads (which
  receive no gradient under the joint loss) are never touched.
- **GE noise** is added to every modulated tensor of *every* modality inside the window (also those
  with :math:`k_m = 1`), as the paper's update rule and the original code do; ``ge=False`` gives
  plain OGM.
- **M > 2**: :math:`\rho_m` compares modality m with the *mean* of the others' scores; several
  modalities can then be slowed at once.
- Classification only (the score is a softmax probability of the true class), and linear late
  fusion only (the score needs the separable branch :math:`z_m W_m`): both raise ``ValueError``.

Note: the coefficients rescale gradients; Adam largely normalises away a scale that stays constant
over many steps (the original work used SGD with momentum), whereas the GE noise acts either way.

Config (``method`` section): ``alpha`` (α = 1.0, the paper's CREMA-D value), ``start_epoch`` (1) and
``end_epoch`` (50) — the original code modulates epochs 0…50 in its 0-based count — ``ge`` (True),
``modulate`` (``"encoder"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, task_loss
from mcr_jax.methods.common import check_options, modality_owners, others_mean, true_class_prob
from mcr_jax.models import LinearLateFusion

DEFAULTS = dict(alpha=1.0, start_epoch=1, end_epoch=50, ge=True, modulate="encoder")
MODULATE = {"encoder": ("encoders",), "encoder_and_branch": ("encoders", "branches")}

# ----------------------------------------------------------------------------------------------
# The rule.


def ogm_ratios(scores: jax.Array) -> jax.Array:
    """``ρ_m = s_m / mean_{j≠m} s_j`` for scores ``[M]`` (the denominator floored at 1e-12)."""
    return scores / jnp.maximum(others_mean(scores), 1e-12)


def ogm_coefficients(scores: jax.Array, alpha: float) -> jax.Array:
    """``k_m = 1 − tanh(α ρ_m)`` where ``ρ_m > 1``, else 1 (``[M]``)."""
    rho = ogm_ratios(scores)
    return jnp.where(rho > 1.0, 1.0 - jnp.tanh(alpha * rho), 1.0)


class OGMGE(Method):
    """OGM-GE (see the module docstring). Classification with linear late fusion, any M >= 2."""

    name = "ogm_ge"
    reports_unimodal_heads = False

    def __init__(self, config, info):
        super().__init__(config, info)
        self.opts = check_options(config, DEFAULTS, "OGM-GE")
        if self.task != "classification":
            raise ValueError("OGM-GE is defined for classification only (its score is the softmax probability of "
                             f"the true class); the dataset's task is {self.task!r}.")
        if self.opts["modulate"] not in MODULATE:
            raise ValueError(f"method.modulate must be one of {sorted(MODULATE)}; got {self.opts['modulate']!r}.")
        if float(self.opts["alpha"]) < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.opts['alpha']}.")

    def check_model(self, model) -> None:
        if not isinstance(model.fusion, LinearLateFusion):
            raise ValueError("OGM-GE needs linear late fusion (model.fusion = 'linear'): its per-modality score is "
                             f"the fused prediction's branch z_m W_m + b/M; got {type(model.fusion).__name__}.")

    def init_method_state(self, params):
        return {"epoch": jnp.ones((), jnp.int32)}

    def gradients(self, handle, params, batch, key, method_state):
        names, labels, mask = self.modalities, batch["label"], batch.get("mask")
        num = len(names)

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            loss = task_loss(out["logits"], labels, mask, self.task)
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.bias[...][None] / num
            weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
            scores = jnp.stack([jnp.sum(true_class_prob(branches[m] + shared, labels) * weights) for m in names])
            return loss, (jax.lax.stop_gradient(scores), handle.rest_of(model))

        (loss, (scores, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        o = self.opts
        epoch = method_state["epoch"]
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        coeffs = jnp.where(active, ogm_coefficients(scores, float(o["alpha"])), 1.0)
        owners = modality_owners(params, names, MODULATE[o["modulate"]])
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))

        def modulate(g, own, k):
            if own < 0:
                return g
            out = g * coeffs[own].astype(g.dtype)
            if o["ge"]:  # noise with the std of the tensor's own (unmodulated) gradient, in the window only
                out = out + jnp.where(active, jnp.std(g) * jax.random.normal(k, g.shape, g.dtype), 0.0)
            return out

        new_grads = jax.tree.map(modulate, grads, owners, keys)
        rho = ogm_ratios(scores)
        metrics = {"task": loss, "loss": loss, **{f"ratio_{m}": rho[i] for i, m in enumerate(names)},
                   **{f"coeff_{m}": coeffs[i] for i, m in enumerate(names)}}
        return new_grads, {}, new_rest, method_state, metrics

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        return {"epoch": jnp.asarray(int(epoch) + 1, jnp.int32)}
