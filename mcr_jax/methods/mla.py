r"""MLA: Multimodal Learning with Alternating Unimodal Adaptation (Zhang, Yoon, Bansal, Yao, CVPR 2024,
arXiv 2311.10707).

Released code: ``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation`` (commit
``ab6c184579f9ff390e9c9b8216c9900c2a43545b``), the ``--gs_flag`` ("MLA") branches of ``main.py``
(``train_epoch`` lines 419-476: the alternating unimodal steps; ``valid`` lines 622-651 and
``calculate_entropy`` / ``calculate_gating_weights`` / ``calculate_gating_weights3`` lines 65-106:
the dynamic fusion) and ``utils/utils.py`` (``GSPlugin.before_update``, lines 12-41: the head's
gradient modification); ``models/basic_model.py`` / ``models/fusion_modules.py`` (with
``--gs_flag`` the fusion module is one ``nn.Linear(D, C)``, ``fc_out``, applied to every
modality's features: the shared head). README: ``--gs_flag -dynamic`` (sic; the flag is
``--dynamic``), SGD (momentum 0.9, weight decay 1e-4, lr 1e-3), batch 64, 100 epochs.

The rule
--------
Modality ``m``'s encoder gives :math:`z_m \in \mathbb{R}^D` (equal ``D`` for all modalities) and one
linear head :math:`h(z) = z K + b` (``K`` ``[D, C]``) is **shared** by all modalities.

1. **Alternation.** Step ``t`` trains the modality :math:`a = t \bmod M` (modality order) alone:
   :math:`L_a = \mathrm{CE}(h(z_a), y)` (mean over the batch's valid rows); only encoder ``a`` and
   the shared head are updated, every other parameter is frozen (its update is zero).
2. **Gradient modification of the shared head** (``GSPlugin.before_update``; not on the very first
   update of the run, ``exp_count == 0``). With :math:`r = \mathrm{mean}_b\, z_{a,b}` (the active
   modality's batch-mean feature, constant), step-in-epoch ``i`` of an epoch of ``T`` steps and

   .. math::
      \alpha_t = \alpha^{\,1 + i / T}, \qquad k = P r, \qquad
      P \leftarrow \frac{P - k k^\top / (\alpha_t + r^\top k)}{\lVert P - k k^\top / (\alpha_t + r^\top k)\rVert_F},
      \qquad \nabla_K \leftarrow P\, \nabla_K

   (``P`` ``[D, D]`` starts at the identity and is never reset: it is the recursive-least-squares
   projector onto the orthogonal complement of the span of the mean features seen so far, of every
   modality — the current batch's included, since the release updates ``P`` before applying it — as
   in OWM, Zeng et al. 2019; PyTorch's ``grad_W ← grad_W Pᵀ`` for ``W = Kᵀ``).
   The bias's gradient is not modified. ``P`` and the step counters live in the method state.
3. **Test-time dynamic fusion.** With :math:`u_m = h(z_m)` and the entropy
   :math:`e_m = -\sum_c p_{m,c} \log p_{m,c}`, :math:`p_m = \mathrm{softmax}(u_m)`,

   .. math::
      \lambda_m = \frac{\exp(\max_j e_j - e_m)}{\sum_{m'} \exp(\max_j e_j - e_{m'})}
      = \mathrm{softmax}_m(-e_m), \qquad \hat y = \sum_m \lambda_m u_m .

   :meth:`MLA.predict` (the evaluation path) and :meth:`MLA.fuse` (the MIPD diagnostic) return
   :math:`\hat y`; ``unimodal`` holds the :math:`u_m`.

Defaults (``DEFAULTS``): ``alpha = 0.1`` (the release's ``alpha = 1.0 * 0.1 ** lamda`` with
``lamda = batch_index / len_dataloader + 1``), ``project = True`` (the gradient modification),
``entropy = "sample"`` (see below).

Mapping onto this library's model
---------------------------------
The shared head is the **unimodal head of the first modality**, ``heads[modalities[0]]`` (an
``nnx.Linear(D, C)`` with bias, as the release's ``fc_out``), applied to every modality's latent. The
fusion head and the other unimodal heads are never used by MLA: they receive no update (a zero scale
in the optimizer, weight decay included) and stay at their initialisation. Equal latent
dimensions are required (a clear error otherwise); classification only (entropies of class
probabilities).

Differences from the release (all of them)
------------------------------------------
- **Dead code in the release.** ``GSPlugin.before_update`` only acts on a parameter named
  ``"module.weight"``, but it is handed ``fc_out``, an ``nn.Linear`` whose parameters are named
  ``"weight"`` and ``"bias"``: the projection (and the update of ``P``) never runs in the released
  code; its ``P`` is also hard-coded to 512×512, which the M3AE runs (768-d features) could not
  have used. Here the gradient modification runs as the paper describes it (``project = True``);
  ``project = False`` gives the release as it actually executes.
- **Denominator.** The release's line reads ``alpha + torch.mm(k, r)``, a ``[D, D]`` matrix
  (elementwise division); OWM's update, which the paper follows, divides by the scalar
  :math:`\alpha + r^\top P r` (``torch.mm(r, k)``). The scalar form is used (read as a typo in a
  line that never executes, see above).
- **Dynamic-fusion entropy.** The release's ``calculate_entropy`` takes ``softmax(output, dim=0)``
  — over the *batch* rows of each class column — and sums the entropy over the whole batch: one
  weight per modality per test batch, so a prediction depends on the other examples of its batch
  and on the evaluation batch size (its commented-out line has ``dim=1``). The default
  ``entropy = "sample"`` is the paper's per-example entropy over classes and per-example weights;
  ``entropy = "batch"`` reproduces the release's formula (padding rows are left out of the batch
  softmax and sum; the MIPD diagnostic's ``fuse`` uses all rows it is given). ``log_softmax`` is
  used instead of ``log(softmax)`` (no ``-inf · 0``).
- **One modality per step, not per mini-batch.** The release, for every mini-batch, takes ``M``
  optimizer steps in a row (modality order), all on that batch's features from one forward pass.
  The trainer here takes one optimizer step per batch, so step ``t`` trains modality ``t mod M`` on
  batch ``t``: each modality sees every ``M``-th batch, and an epoch holds ``T`` head updates instead
  of ``M·T``. All encoders still run in training mode on every batch (the release's forward), so
  batch statistics follow every batch.
- **Strict freezing.** With torch 1.8 (the release's ``requirements.txt``) ``optimizer.zero_grad()``
  zeroes gradients instead of deleting them, so SGD's momentum and weight decay still move an
  earlier modality's encoder in a later modality's step of the same batch. Here the inactive
  encoders' updates are exactly zero; one optimizer serves the whole run (its moments see zero
  gradients while frozen).
- **The α schedule in the first epoch.** ``i / T`` needs the epoch length, which the method learns
  at the first epoch end (:meth:`MLA.on_epoch_end`); during the first epoch ``α_t = α``.
- **Optimizer, schedule, padding**: the trainer's optimizer and schedule (the release: SGD, momentum
  0.9, weight decay 1e-4, lr 1e-3 decayed ×0.1 at epoch 70); padded rows are left out of the loss
  and of the mean feature ``r`` (the release drops nothing and has no padding).
- **Any M >= 2** modalities (the release has two, or three with ``--modal3``); any ``D`` (512 there).
  The fixed-weight fusion of the release (``--gs_flag`` without ``--dynamic``: ``av_alpha``…) is not
  provided: evaluation always uses the dynamic fusion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcr_jax.methods.base import Method, model_inputs
from mcr_jax.players import modality_owners, path_keys, scale_by_player
from mcr_jax.state import StepOutput

DEFAULTS = dict(alpha=0.1, project=True, entropy="sample")
#: the tuning grid of a study (mcr_jax.study): the regulariser α of the projector update.
GRID = dict(alpha=[0.01, 0.05, 0.1, 0.5])
ENTROPY = ("sample", "batch")


# ---- the rule's pieces (pure functions; tested against NumPy) -------------------------------------


def projector_update(proj, r, alpha):
    """One OWM / recursive-least-squares update of the projector ``P`` ``[D, D]`` with the mean
    feature ``r`` ``[D]``: ``P - k kᵀ / (α + rᵀ k)`` with ``k = P r``, divided by its Frobenius norm."""
    k = proj @ r
    new = proj - jnp.outer(k, k) / (alpha + r @ k)
    return new / jnp.linalg.norm(new)


def entropy_weights(logits, mask=None, *, over: str = "sample"):
    """The dynamic-fusion weights ``softmax_m(-e_m)`` of ``logits`` ``[M, B, C]`` (one slice per modality).

    ``over="sample"``: ``e_m`` is each example's entropy over the classes → weights ``[M, B]``.
    ``over="batch"`` (the release's ``calculate_entropy``): softmax over the batch rows of each
    class column, entropy summed over rows and classes (rows with ``mask == 0`` left out) → one weight
    per modality, broadcast to ``[M, B]``.
    """
    if over == "sample":
        logp = jax.nn.log_softmax(logits, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [M, B]
        return jax.nn.softmax(-ent, axis=0)
    if over != "batch":
        raise ValueError(f"entropy must be one of {list(ENTROPY)}; got {over!r}.")
    valid = jnp.ones(logits.shape[1], bool) if mask is None else jnp.asarray(mask) > 0
    valid = valid[None, :, None]
    masked = jnp.where(valid, logits, -jnp.inf)
    logp = jax.nn.log_softmax(masked, axis=1)  # over the batch rows
    ent = -jnp.sum(jnp.where(valid, jnp.exp(logp) * logp, 0.0), axis=(1, 2))  # [M]
    w = jax.nn.softmax(-ent, axis=0)
    return jnp.broadcast_to(w[:, None], logits.shape[:2])


def dynamic_fusion(unimodal, modalities, mask=None, *, over: str = "sample"):
    """``Σ_m λ_m u_m`` from ``{m: u_m [B, C]}`` with :func:`entropy_weights`."""
    stacked = jnp.stack([unimodal[m] for m in modalities])  # [M, B, C]
    w = entropy_weights(stacked, mask, over=over)
    return jnp.sum(w[..., None] * stacked, axis=0)


class MLA(Method):
    """Alternating unimodal steps through one shared head, with OWM projection of the head's gradient,
    and entropy-weighted fusion at test time; config: ``alpha`` (α), ``project``, ``entropy``."""

    name = "mla"
    reports_unimodal_heads = True
    traceable = ("alpha",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("the dynamic fusion weighs modalities by the entropy of their class probabilities")
        self.alpha = float(self.opts["alpha"])
        if self.alpha <= 0:
            raise ValueError(f"method.alpha (the projector's regulariser) must be > 0; got {self.alpha}.")
        self.project = bool(self.opts["project"])
        self.entropy = self.opts["entropy"]
        if self.entropy not in ENTROPY:
            raise ValueError(f"method.entropy must be one of {list(ENTROPY)}; got {self.entropy!r}.")
        #: the modality whose unimodal head plays the shared head
        self.head = self.modalities[0]

    def check_model(self, model) -> None:
        dims = model.latent_dims
        if len(set(dims.values())) != 1:
            raise ValueError(f"MLA applies one shared head to every modality's latent and needs equal latent "
                             f"dimensions; got {dims}.")

    def make_optimizer(self, base, params):
        """The run's optimizer, then per-step scales: the active encoder and the shared head 1, the
        other encoders 0, and 0 for every parameter MLA never uses (fusion head, other unimodal heads;
        player index ``M`` here)."""
        owners = modality_owners(params, self.modalities, ("encoders",))
        unused = len(self.modalities)

        def label(path, o):
            if o >= 0 or path_keys(path)[:2] == ["heads", self.head]:
                return o
            return unused

        owners = jax.tree_util.tree_map_with_path(label, owners)
        return optax.chain(base, scale_by_player(owners))

    def init_method_state(self, params, rest=None):
        d = params["heads"][self.head]["kernel"].shape[0]
        return {"steps": jnp.zeros((), jnp.int32), "epoch_step": jnp.zeros((), jnp.int32),
                "epoch_len": jnp.zeros((), jnp.int32), "proj": jnp.eye(d, dtype=jnp.float32)}

    # ---- inside jit --------------------------------------------------------------------------
    def shared_logits(self, model, latents):
        """``{m: h(z_m)}``: the shared head on every modality's latent."""
        head = model.heads[self.head]
        return {m: head(latents[m]) for m in self.modalities}

    def forward(self, model, batch):
        inputs, masks = model_inputs(batch, self.modalities)
        latents = model.encode(inputs, masks)
        unimodal = self.shared_logits(model, latents)
        over = self.entropy
        return {"latents": latents, "unimodal": unimodal,
                "logits": dynamic_fusion(unimodal, self.modalities, batch.get("mask"), over=over)}

    def fuse(self, model, latents):
        return dynamic_fusion(self.shared_logits(model, latents), self.modalities, over=self.entropy)

    def gradients(self, handle, params, batch, key, method_state):
        ms = method_state
        num = len(self.modalities)
        active = ms["steps"] % num
        onehot = jax.nn.one_hot(active, num, dtype=jnp.float32)
        labels, mask = batch["label"], batch.get("mask")

        def fn(p):
            model = handle.train_model(p)
            inputs, masks = model_inputs(batch, self.modalities)
            latents = model.encode(inputs, masks)  # every encoder runs in training mode (release)
            z = sum(onehot[i] * latents[m] for i, m in enumerate(self.modalities))
            head = model.heads[self.head]
            loss = self.task.loss(head(z), labels, mask)
            terms = {f"loss_{m}": jax.lax.stop_gradient(self.task.loss(head(latents[m]), labels, mask))
                     for m in self.modalities}
            return loss, (terms, jax.lax.stop_gradient(z), handle.rest_of(model))

        (loss, (terms, z, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)

        # the shared head's gradient modification (GSPlugin.before_update), from the second update on
        valid = jnp.ones(z.shape[0], z.dtype) if mask is None else jnp.asarray(mask, z.dtype)
        r = jnp.sum(z * valid[:, None], 0) / jnp.maximum(jnp.sum(valid), 1.0)
        frac = jnp.where(ms["epoch_len"] > 0, ms["epoch_step"] / jnp.maximum(ms["epoch_len"], 1), 0.0)
        alpha_t = jnp.power(jnp.asarray(self.hp("alpha", self.alpha), jnp.float32), 1.0 + frac)
        apply = jnp.logical_and(ms["steps"] > 0, self.project)
        proj = jnp.where(apply, projector_update(ms["proj"], r, alpha_t), ms["proj"])
        g_kernel = grads["heads"][self.head]["kernel"]
        grads["heads"][self.head]["kernel"] = jnp.where(apply, proj @ g_kernel, g_kernel)

        new_ms = {"steps": ms["steps"] + 1, "epoch_step": ms["epoch_step"] + 1, "epoch_len": ms["epoch_len"],
                  "proj": proj}
        scales = jnp.concatenate([onehot, jnp.zeros((1,), jnp.float32)])  # index M: never-used parameters
        metrics = dict(terms, loss=loss, active=jnp.asarray(active, jnp.float32), alpha=alpha_t)
        return StepOutput(grads, {"player_scales": scales, "shared_scale": 1.0}, new_rest, new_ms, metrics)

    # ---- host hooks --------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """Records the epoch's length (its step count) for α's within-epoch schedule and restarts it."""
        ms = dict(method_state)
        ms["epoch_len"] = jnp.asarray(ms["epoch_step"], jnp.int32)
        ms["epoch_step"] = jnp.zeros_like(ms["epoch_step"])
        return ms


__all__ = ["DEFAULTS", "GRID", "MLA", "dynamic_fusion", "entropy_weights", "projector_update"]
