r"""ReconBoost: modality-alternating boosting with a reconcilement term (Hua et al., ICML 2024, arXiv 2405.09321).

The ensemble is the linear late fusion head read additively: learner :math:`f_m(x) = z_m W_m` is
modality ``m``'s encoder followed by its fusion branch, and the ensemble is
:math:`F(x) = b + \sum_m f_m(x)` (the shared bias :math:`b` plays the role of gradient boosting's
constant :math:`c_0`). Training alternates between stages:

1. **Boosting stage** of the active modality :math:`a` (``stage_epochs`` epochs): only
   :math:`f_a` (encoder ``a`` and branch :math:`W_a`) is updated, against the detached ensemble of
   the others :math:`F_{\neg a} = b + \sum_{j \ne a} \mathrm{sg}(f_j)`, with the reconcilement loss

   .. math::
      L_a = \mathbb{E}\big[-(1 - \lambda\, q_y)\,\log p_{a,y}\big],
      \qquad p_a = \mathrm{softmax}(f_a),\; q = \mathrm{softmax}(F_{\neg a}),

   i.e. :math:`\mathrm{CE}(y, p_a) - \lambda\,\mathrm{KL}(y \odot q \,\|\, p_a)` up to a term
   constant in :math:`f_a`: the KL-based reconcilement *pushes the new learner away from what the
   other modalities already predict well* (examples the others get right weigh less), which is the
   paper's link to Friedman's gradient boosting (the learner corrects the others' errors).
2. **Global rectification** (``rectify_epochs`` epochs): every parameter is fine-tuned on the
   ensemble's task loss :math:`\mathrm{CE}(y, F)` (the fused cross-entropy).

The active modality cycles through the modalities in order (stage ``k`` trains modality
``k mod M``, as the reference's fixed schedule), so a full cycle lasts
``stage_epochs + rectify_epochs`` epochs. The schedule is counted in **epochs** and tracked in
``method_state["epochs_done"]`` (updated by :meth:`ReconBoost.on_epoch_end`, so a resumed run
continues the same stage). Parameters outside the active learner are frozen during a boosting
stage: the optimizer is wrapped so that their updates are zero (their optimizer moments still see
zero gradients — the reference creates a fresh SGD optimizer per phase instead).

Defaults: ``stage_epochs = 4`` and ``rectify_epochs = 4`` (the release's ``epochs_per_stage`` and
``correct_epoch``); ``reconcile_weight`` λ = 0.2, the ratio ``weight2 / weight1 = 1 / 5`` of the
release's CREMA-D command (its loss is ``-w1·CE + w2·(q_y CE)``; the overall factor ``w1 / C`` is
dropped, the optimizer's learning rate covers it).

Simplifications (stated): the learnable boosting rate of the release is folded into the branch
weights; the memory-consolidation term is omitted (in the release it is an MSE between two detached
predictions and carries no gradient); no pre-trained unimodal start is implied (use
``config.init.pretrained`` for it); each learner is the modality's encoder plus its own linear
branch rather than the release's shared MLP head. The prediction is the ensemble :math:`F` (the
model's fused logits); the per-modality outputs reported as ``unimodal`` are :math:`b + f_m`.

Needs linear late fusion and classification; any number of modalities M >= 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcr_jax import game
from mcr_jax.methods.base import Method, masked_mean, model_inputs, task_loss
from mcr_jax.methods.common import check_options
from mcr_jax.models import LinearLateFusion

DEFAULTS = dict(stage_epochs=4, rectify_epochs=4, reconcile_weight=0.2)
MASK_KWARG = "reconboost_update_mask"


def schedule(epochs_done, *, stage_epochs: int, rectify_epochs: int, num_modalities: int):
    """``(boosting, active)`` for the epoch after ``epochs_done`` finished ones (Python ints or jnp)."""
    cycle = stage_epochs + rectify_epochs
    stage, offset = epochs_done // cycle, epochs_done % cycle
    return offset < stage_epochs, stage % num_modalities


def reconcile_loss(active_logits, others_logits, labels, mask, *, weight: float):
    """``mean[-(1 - λ q_y) log softmax(f_a)_y]`` with ``q = softmax(others)`` (held constant).

    ``active_logits``, ``others_logits``: ``[B, C]``; ``labels``: int ``[B]``.
    """
    if active_logits.shape != others_logits.shape:
        raise ValueError(f"active logits {active_logits.shape} and others' logits {others_logits.shape} differ.")
    q = jax.nn.softmax(jax.lax.stop_gradient(others_logits), axis=-1)
    logp = jax.nn.log_softmax(active_logits, axis=-1)
    q_y = jnp.take_along_axis(q, labels[:, None], axis=-1)[:, 0]
    logp_y = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return masked_mean(-(1.0 - weight * q_y) * logp_y, mask)


def masked_updates(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer: ``update(..., reconboost_update_mask=tree)`` multiplies its updates by
    the per-leaf 0/1 scalars of ``tree`` (no mask: unchanged)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra):
        mask = extra.pop(MASK_KWARG, None)
        new_updates, new_state = inner.update(updates, state, params, **extra)
        if mask is not None:
            new_updates = jax.tree.map(lambda u, k: u * jnp.asarray(k, u.dtype), new_updates, mask)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


class ReconBoost(Method):
    """Alternating boosting stages + global rectification; config: ``stage_epochs``, ``rectify_epochs``,
    ``reconcile_weight`` (λ)."""

    name = "reconboost"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        check_options(config, DEFAULTS, "ReconBoost")
        if self.task != "classification":
            raise ValueError("ReconBoost's reconcilement loss is defined for classification only; "
                             f"dataset {info.name!r} is a {self.task} task.")
        self.stage_epochs = int(config.get("stage_epochs", DEFAULTS["stage_epochs"]))
        self.rectify_epochs = int(config.get("rectify_epochs", DEFAULTS["rectify_epochs"]))
        self.weight = float(config.get("reconcile_weight", DEFAULTS["reconcile_weight"]))
        if self.stage_epochs < 1 or self.rectify_epochs < 0:
            raise ValueError(f"method.stage_epochs must be >= 1 and method.rectify_epochs >= 0; got "
                             f"{self.stage_epochs} and {self.rectify_epochs}.")

    def check_model(self, model) -> None:
        if not isinstance(model.fusion, LinearLateFusion):
            raise ValueError("ReconBoost reads the fusion head as an additive ensemble of per-modality learners "
                             f"and needs linear late fusion (model.fusion = 'linear'); got "
                             f"{type(model.fusion).__name__}.")

    def make_optimizer(self, base, params):
        return masked_updates(base)

    def init_method_state(self, params):
        return {"epochs_done": jnp.zeros((), jnp.int32)}

    def phase(self, epochs_done):
        return schedule(epochs_done, stage_epochs=self.stage_epochs, rectify_epochs=self.rectify_epochs,
                        num_modalities=len(self.modalities))

    # ---- inside jit --------------------------------------------------------------------------
    def _parts(self, model, batch):
        inputs, masks = model_inputs(batch, self.modalities)
        latents = model.encode(inputs, masks)
        branches = model.fusion.branch_logits(latents)
        return latents, branches, model.fusion.bias[...]

    def forward(self, model, batch):
        latents, branches, bias = self._parts(model, batch)
        return {"latents": latents, "logits": model.fusion.combine(branches),
                "unimodal": {m: branches[m] + bias[None] for m in self.modalities}}

    def gradients(self, handle, params, batch, key, method_state):
        boosting, active = self.phase(method_state["epochs_done"])
        onehot = jax.nn.one_hot(active, len(self.modalities), dtype=jnp.float32)
        labels, mask = batch["label"], batch.get("mask")

        def fn(p):
            model = handle.train_model(p)
            _, branches, bias = self._parts(model, batch)
            fs = [branches[m] for m in self.modalities]
            f_active = sum(onehot[i] * f for i, f in enumerate(fs))
            others = bias[None] + sum((1.0 - onehot[i]) * jax.lax.stop_gradient(f) for i, f in enumerate(fs))
            boost = reconcile_loss(f_active, others, labels, mask, weight=self.weight)
            rectify = task_loss(model.fusion.combine(branches), labels, mask, self.task)
            loss = jnp.where(boosting, boost, rectify)
            return loss, ({"boost": boost, "rectify": rectify}, handle.rest_of(model))

        (loss, (terms, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        players = game.assign_players(params, self.modalities)
        train_all = jnp.logical_not(boosting)
        update_mask = jax.tree.map(
            lambda o: (train_all | (onehot[o] > 0)) if o >= 0 else train_all, players)
        metrics = dict(terms, loss=loss, active=jnp.asarray(active, jnp.float32),
                       boosting=jnp.asarray(boosting, jnp.float32))
        return grads, {MASK_KWARG: update_mask}, new_rest, method_state, metrics

    # ---- host hooks --------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        return {"epochs_done": jnp.asarray(epoch, jnp.int32)}
