r"""ReconBoost: modality-alternating boosting with a reconcilement term (Hua et al., ICML 2024, arXiv 2405.09321).

Released code: huacong/ReconBoost (``train.py``, ``models/dynamic_net.py``, ``schedule.py``,
``README.md``). The ensemble is the linear late fusion head read additively: learner
:math:`f_m(x) = z_m W_m` is modality ``m``'s encoder followed by its (bias-free) fusion branch,
and the ensemble is :math:`F(x) = b + \sum_m f_m(x)`. Training alternates between stages:

1. **Boosting stage** of the active modality :math:`a` (``stage_epochs`` epochs): only
   :math:`f_a` (encoder ``a`` and branch :math:`W_a`) is updated, against the detached ensemble of
   the others :math:`F_{\neg a} = \sum_{j \ne a} \mathrm{sg}(f_j)` (no constant term: the
   release's ``DynamicNet.forward(data, mask_model=a)`` returns ``boost_rate · Σ`` of the other
   learners' outputs under ``torch.no_grad()``), with the reconcilement loss

   .. math::
      L_a = \mathbb{E}\big[-(1 - \lambda\, q_y)\,\log p_{a,y}\big],
      \qquad p_a = \mathrm{softmax}(f_a),\; q = \mathrm{softmax}(F_{\neg a}),

   i.e. :math:`\mathrm{CE}(y, p_a) - \lambda\,\mathrm{KL}(y \odot q \,\|\, p_a)` up to a term
   constant in :math:`f_a`: the KL-based reconcilement *pushes the new learner away from what the
   other modalities already predict well* (examples the others get right weigh less), which is the
   paper's link to Friedman's gradient boosting (the learner corrects the others' errors). The
   release (``train.py``, phase 1) computes, per example,
   ``-w1·mean_c(t ⊙ log p_a) + w2·mean_c(t ⊙ q ⊙ log p_a)`` with ``t`` the one-hot label, which is
   :math:`\tfrac{w_1}{C}\,[-(1 - \tfrac{w_2}{w_1} q_y) \log p_{a,y}]`: so λ = ``w2 / w1`` and
   the factor ``w1 / C`` is dropped here (the learning rate covers it; Adam ignores it).
2. **Global rectification** (``rectify_epochs`` epochs): every parameter is fine-tuned on the
   ensemble's task loss :math:`\mathrm{CE}(y, F)` (the fused cross-entropy; the release's phase 2,
   ``CE(net_ensemble.forward_grad(data), y)``).

The active modality cycles through the modalities in order (stage ``k`` trains modality
``k mod M``, as the release's fixed schedule, ``schedule.py``), so a full cycle lasts
``stage_epochs + rectify_epochs`` epochs. The schedule is counted in **epochs** and tracked in
``method_state["epochs_done"]`` (updated by :meth:`ReconBoost.on_epoch_end`, so a resumed run
continues the same stage). Parameters outside the active learner are frozen during a boosting
stage: the optimizer is wrapped so that their updates are zero. In both stages the inactive
learners run in training mode (the release calls ``net_ensemble.to_train()``), so their batch
statistics follow the batches as there.

Defaults: ``stage_epochs = 4`` and ``rectify_epochs = 4`` (the release's ``--epochs_per_stage`` and
``--correct_epoch``); ``reconcile_weight`` λ = 0.2 = ``weight2 / weight1`` of the README's
CREMA-D command (``--weight1 5.0 --weight2 1.0``; AVE and ModelNet40 use 4 and 1, λ = 0.25).

Remaining differences from the release (stated):

- Learners: each is the modality's encoder plus its own bias-free linear branch. In the release
  (``--common_space True``) every learner's ``fc`` is replaced by one shared two-layer MLP head with
  biases (``model.fc = net_ensemble.head``), which belongs to the active learner's optimizer in
  every boosting stage, so boosting one modality also moves the head the others use.
- The fusion bias :math:`b` is a constant of the ensemble :math:`F` only (rectification and
  prediction): it is neither in :math:`F_{\neg a}` nor in :math:`f_a`, and is frozen while
  boosting. The release has no separate constant once the ensemble has members (its ``c0`` is only
  returned by an empty ensemble); its learners' biases sit inside the shared head.
- The learnable ``boost_rate`` multiplying the ensemble (``DynamicNet.boost_rate``, initial 1.0,
  trained in rectification) is folded into the branch weights.
- The memory-consolidation ("GA") term is omitted: in the release it is the MSE between two
  *detached* softmax outputs (``train.py``, ``ga_loss``) and carries no gradient.
- Optimizer: one optimizer for the whole run whose updates are masked (its moments see zero
  gradients while frozen). The release builds a new SGD (momentum 0.9, weight decay 5e-4) for each
  phase of each stage, with separate rates ``--m_lr`` / ``--e_lr`` (0.01) decayed ×0.1 every 30
  stages on CREMA-D; here the run's optimizer and schedule apply to both phases.
- Start: no pre-trained unimodal start is implied (the README always passes ``--use_pretrain``; use
  ``config.init.pretrained`` for it). Without it the release's first stage boosts against an empty
  ensemble (``q_y = 1``: a softmax over the single column of ``c0``); here the other learners are
  present from their initialisation.
- The release's loaders drop the last incomplete batch; here padded rows are masked out.
- The per-modality outputs reported as ``unimodal`` are :math:`b + f_m` (reporting only). The
  prediction is the ensemble :math:`F` (the model's fused logits).

The MCR authors' port (kkontras/MCR, ``agents/general_agent/helpers/Bias_Infusion.py``,
``Bias_Infusion_ReconBoost``) uses the full fused prediction, active modality and bias included, as
:math:`F_{\neg a}`; this module follows the release instead.

Needs linear late fusion and classification; any number of modalities M >= 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, model_inputs
from mcr_jax.players import assign_players, scale_by_player
from mcr_jax.state import StepOutput

DEFAULTS = dict(stage_epochs=4, rectify_epochs=4, reconcile_weight=0.2)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(reconcile_weight=[0.1, 0.2, 0.25, 0.5])


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


class ReconBoost(Method):
    """Alternating boosting stages + global rectification; config: ``stage_epochs``, ``rectify_epochs``,
    ``reconcile_weight`` (λ)."""

    name = "reconboost"
    reports_unimodal_heads = True
    traceable = ("reconcile_weight",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("the reconcilement loss weighs the true class's probability")
        self.stage_epochs = int(self.opts["stage_epochs"])
        self.rectify_epochs = int(self.opts["rectify_epochs"])
        self.weight = float(self.opts["reconcile_weight"])
        if self.stage_epochs < 1 or self.rectify_epochs < 0:
            raise ValueError(f"method.stage_epochs must be >= 1 and method.rectify_epochs >= 0; got "
                             f"{self.stage_epochs} and {self.rectify_epochs}.")

    def earliest_stop_epoch(self) -> int:
        """Early stopping waits until every modality has finished its first boosting stage:
        ``(M - 1)`` stage + rectification blocks, then the last modality's stage (12 epochs for
        M = 2 with the defaults)."""
        return (len(self.modalities) - 1) * (self.stage_epochs + self.rectify_epochs) + self.stage_epochs

    def check_model(self, model) -> None:
        self.require_separable(model, "it reads the fusion head as an additive ensemble of per-modality learners")

    def make_optimizer(self, base, params):
        """The run's optimizer, then 0/1 scales that freeze every parameter but the active learner's
        while boosting (:func:`~mcr_jax.players.scale_by_player`)."""
        return optax.chain(base, scale_by_player(assign_players(params, self.modalities)))

    def init_method_state(self, params, rest=None):
        return {"epochs_done": jnp.zeros((), jnp.int32)}

    def phase(self, epochs_done):
        return schedule(epochs_done, stage_epochs=self.stage_epochs, rectify_epochs=self.rectify_epochs,
                        num_modalities=len(self.modalities))

    # ---- inside jit --------------------------------------------------------------------------
    def _parts(self, model, batch):
        inputs, masks = model_inputs(batch, self.modalities)
        latents = model.encode(inputs, masks)
        branches = model.fusion.branch_logits(latents)
        return latents, branches, model.fusion.shared_offset()

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
            _, branches, _ = self._parts(model, batch)
            fs = [branches[m] for m in self.modalities]
            f_active = sum(onehot[i] * f for i, f in enumerate(fs))
            # F_¬a: the other learners only, no constant (the release's DynamicNet.forward)
            others = sum((1.0 - onehot[i]) * jax.lax.stop_gradient(f) for i, f in enumerate(fs))
            boost = reconcile_loss(f_active, others, labels, mask, weight=self.hp("reconcile_weight", self.weight))
            rectify = self.task.loss(model.fusion.combine(branches), labels, mask)
            loss = jnp.where(boosting, boost, rectify)
            return loss, ({"boost": boost, "rectify": rectify}, handle.rest_of(model))

        (loss, (terms, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        # while boosting only the active learner moves; in rectification everything does
        train_all = 1.0 - jnp.asarray(boosting, jnp.float32)
        player_scales = jnp.where(boosting, onehot, 1.0)
        metrics = dict(terms, loss=loss, active=jnp.asarray(active, jnp.float32),
                       boosting=jnp.asarray(boosting, jnp.float32))
        return StepOutput(grads, {"player_scales": player_scales, "shared_scale": train_all}, new_rest,
                          method_state, metrics)

    # ---- host hooks --------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        return {"epochs_done": jnp.asarray(epoch, jnp.int32)}
