r"""LFM: Learning the modality gap (Yang, Wan, Jiang, Xu: "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap", NeurIPS 2024).

Code followed
-------------
The authors' release, ``njustkmg/NeurIPS24-LFM`` at commit
``ad44fa09fee471c9267a7cba526b222c54d45493`` (CREMA-D example):

- ``Crema_epoch_learnable.py`` (the learning-based integration, the paper's LFM):
  ``Alignment`` (lines 37-44), ``getAlpha_Learnable`` (lines 55-97: the per-epoch weight update),
  ``train_audio_video`` (lines 101-121: the loss), the main loop (lines 216-256: a fixed probe set of
  16 training examples held out of training, ``lr_alpha = 1e-4``, ``cls_k = [0.05, 0.95]``, one
  ``getAlpha_Learnable`` call before every epoch);
- ``Crema_epoch.py`` (the heuristic integration, the script the README runs):
  ``getAlpha_Learnable_Fitted`` (lines 46-52 of the learnable file, same in this one): the weights
  are a degree-5 polynomial of the epoch, fitted to a learned trajectory.

BalanceBenchmark (``GeWu-Lab/BalanceBenchmark`` commit ``4c1482f``, ``balancemm/trainer/LFM_trainer.py``,
``configs/trainer_config.yaml`` ``LFM: lr_alpha 0.0001``) re-implements the learnable form for any
number of modalities (alignment averaged over the modality pairs, CE on the fused output); we follow
it for ``M > 2`` and for where the terms are read from a late-fusion model. It starts from the
opposite weights (``alpha = {0: 0.95 (CE), 1: 0.05 (alignment)}``) and uses a quarter of one
validation batch as the probe; we keep the authors' values.

Note: the paper describes the unsupervised term as a *contrastive* loss between the modalities'
features; the released code (both scripts, and BalanceBenchmark) instead uses ``Alignment``, a
Jensen-Shannon-type divergence between the modalities' *predicted class distributions*. We follow
the released code, so the library's ``mcr_jax.losses.contrastive`` terms are not used (the formula
differs).

The rule
--------
Per training step, with unimodal logits :math:`o_m` ``[B, C]``, :math:`p_m = \mathrm{softmax}(o_m)`,
fused logits :math:`\ell`, weights :math:`(\alpha_0, \alpha_1)` (classification, alignment):

.. math::
   L = 2\,\big(\alpha_0\,\mathrm{CE}(\ell, y) + \alpha_1\,\overline{A}\big),\qquad
   \overline{A} = \frac{1}{|P|}\sum_{(i,j)\in P} A(o_i, o_j),\quad
   A(o_i, o_j) = \frac{1}{2B}\sum_b \big[\mathrm{KL}(\mu_b\,\|\,p_{i,b}) + \mathrm{KL}(\mu_b\,\|\,p_{j,b})\big],
   \ \mu = \tfrac12(p_i + p_j)

over the unordered modality pairs ``P`` (``M = 2``: the single pair). (``F.kl_div(p.log(), m,
'batchmean')`` is :math:`\mathrm{KL}(m\|p)`, so the released "js_score" has the mixture *first*:
it is not the Jensen-Shannon divergence :math:`\tfrac12[\mathrm{KL}(p\|m)+\mathrm{KL}(q\|m)]`; we
transcribe the released form.)

``schedule = "learnable"`` (``getAlpha_Learnable``): once per epoch, before its first update, on a
probe batch :math:`\mathcal{B}_p`,

.. math::
   g_c = \nabla_\theta \mathrm{CE}_p,\quad
   h = \nabla^2_\theta\big(\alpha_0 \mathrm{CE}_p + \alpha_1 A_p\big)\, g_c,\quad
   \delta = \mathrm{mean}(h_{\text{first}}),\quad
   \alpha_1 \leftarrow \mathrm{clip}(\alpha_1 - \eta_\alpha \delta,\ 0.05,\ 0.95),\ \alpha_0 = 1 - \alpha_1

(the Hessian-vector product of the total loss with the classification gradient, its mean over the
*first* parameter tensor only, ``hessian_vector_prod[0].mean()``); :math:`\eta_\alpha` is halved
before the update of every epoch ``e`` (0-based) with ``e % 20 == 0, e != 0`` (cumulatively).
Initial :math:`(\alpha_0, \alpha_1) = (0.05, 0.95)`, :math:`\eta_\alpha = 10^{-4}`.

``schedule = "fitted"`` (``getAlpha_Learnable_Fitted``, heuristic): :math:`\alpha_0(e) = \sum_{k=0}^5
c_k e^k` with the released coefficients, :math:`\alpha_1 = 1 - \alpha_0` (the released second
polynomial is exactly ``1 - `` the first), ``e`` the 0-based epoch. No probe.

The prediction is the fused head (as in the release, whose prediction is ``0.5 (o_a + o_v)``).

Mapping onto our late-fusion model
----------------------------------
Which logits are the per-modality :math:`o_m` and which is the prediction (``logits``):

- ``"branches"`` (default; BalanceBenchmark ``4c1482f``, ``balancemm/trainer/LFM_trainer.py``): each
  modality's logits are its slice of the fusion layer, :math:`o_m = z_m W_m + b/M` (the shared bias
  split evenly), and the prediction is the fusion head's :math:`\ell = \sum_m o_m = \sum_m z_m W_m + b`.
  The alignment then reaches the fusion branches that predict. Needs a separable fusion (``linear``).
- ``"authors"`` (the authors' release, ``Crema_epoch_learnable.py`` with ``model/AudioVideo.py``): the
  two aligned per-modality classifiers *are* the predictor: :math:`o_m` = our unimodal heads' logits
  :math:`W_m z_m + b_m`, the prediction and its cross-entropy :math:`\tfrac1M\sum_m o_m` (the release's
  :math:`\tfrac12(o_a + o_v)`); the fusion head is untrained.
- ``"heads"`` (this project's own extension, in neither release): the alignment acts on separate
  unimodal heads while the fusion head predicts with the cross-entropy alone, so the LFM term never
  reaches the predictor. (It was this port's default until the releases were compared; on the
  synthetic benchmark its heads stay near chance.)

Options (``DEFAULTS``)
----------------------
``schedule`` ``"learnable"`` | ``"fitted"``; ``lr_alpha`` 1e-4 (:math:`\eta_\alpha`; the tuned grid
``GRID``; traceable); ``alpha_init`` 0.95 (initial alignment weight :math:`\alpha_1`); ``alpha_min`` 0.05,
``alpha_max`` 0.95 (the clip); ``halve_every`` 20 (epochs between halvings of ``lr_alpha``);
``probe_rows`` 8 (the release: half of its 16-example probe); ``hvp_leaf`` ``"first"`` (the release's
first parameter tensor) | ``"all"`` (the mean over every parameter entry); ``logits`` ``"branches"`` |
``"authors"`` | ``"heads"`` (above).

Differences from the release (all of them)
------------------------------------------
- Probe batch: the release holds 16 training examples out of training and uses the same first 8 of
  them before every epoch. Our epoch hook sees no raw inputs, so the update runs inside the jitted
  step, at the first step of every epoch, on the first ``probe_rows`` rows of that step's training
  batch (a different random sample each epoch; those rows are not held out of training). The update
  is computed under ``lax.cond``; under the multi-seed ``vmap`` that becomes a select, so the probe's
  Hessian-vector product is then computed (and discarded) at every step: same results, more compute.
- The probe forward pass runs in evaluation mode (batch-norm running statistics, no dropout); the
  release's model is in eval mode there from epoch 1 on (``val`` ran last) but in training mode at
  epoch 0. The probe's batch statistics are not kept.
- "First parameter tensor": in the release it is ``model.parameters()``'s first tensor, the audio
  encoder's first convolution weight. Ours (``hvp_leaf = "first"``): the first parameter of rank >= 2
  (a weight, not a bias) of the first modality's encoder in the parameter tree's order (the first
  leaf of the whole tree when there is no such encoder weight). Its scale, hence the step
  :math:`\eta_\alpha\delta`, depends on the architecture; ``"all"`` is offered as a less arbitrary
  alternative (not in the release).
- Padding rows: every mean is over the valid rows (``batchmean`` divides by ``B``).
- The current :math:`\eta_\alpha` is kept as ``lr_alpha / 2**halvings`` (a count in the method state)
  so that ``lr_alpha`` can be traced by a study; the values are the release's. The weights are
  float32 (the release keeps them as Python floats).
- ``M > 2``: the alignment is averaged over the unordered modality pairs (BalanceBenchmark); the
  release has two modalities. The prediction is ``0.5 (o_a + o_v)`` only with ``logits = "authors"``.
- The ``alignment`` term uses ``log_softmax`` rather than ``log(softmax)`` (same value, no ``log 0``).
- The release's learning-rate schedule, optimizer, weight decay and model are those of the trainer
  config here, not ``StepLR(70, 0.1)`` SGD on ResNet-18s.
- Classification only (softmax distributions); at least two modalities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from mcr_jax.methods.base import Method, current_epoch
from mcr_jax.state import StepOutput

DEFAULTS = {
    "schedule": "learnable",
    "lr_alpha": 1e-4,
    "alpha_init": 0.95,
    "alpha_min": 0.05,
    "alpha_max": 0.95,
    "halve_every": 20,
    "probe_rows": 8,
    "hvp_leaf": "first",
    "logits": "branches",
}
LOGITS = ("branches", "authors", "heads")
GRID = dict(lr_alpha=[1e-5, 1e-4, 1e-3, 1e-2])

#: ``getAlpha_Learnable_Fitted``'s coefficients of the classification weight (powers 0..5 of the epoch).
FITTED_COEFFS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)


def alignment(logits_p: jax.Array, logits_q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""The release's ``Alignment``: :math:`\frac{1}{2}[\mathrm{KL}(\mu\|p) + \mathrm{KL}(\mu\|q)]`,
    :math:`\mu = (p + q)/2`, averaged over the (valid) rows. ``[B, C]`` logits -> scalar."""
    lp = jax.nn.log_softmax(logits_p, axis=-1)
    lq = jax.nn.log_softmax(logits_q, axis=-1)
    mu = 0.5 * (jnp.exp(lp) + jnp.exp(lq))
    per_row = 0.5 * (jnp.sum(2.0 * xlogy(mu, mu) - mu * lp - mu * lq, axis=-1))
    if mask is None:
        return jnp.mean(per_row)
    w = mask.astype(per_row.dtype)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def mean_pair_alignment(unimodal, modalities, mask=None) -> jax.Array:
    """``alignment`` averaged over the unordered modality pairs (BalanceBenchmark's form for ``M >= 2``)."""
    terms = [alignment(unimodal[a], unimodal[b], mask)
             for i, a in enumerate(modalities) for b in modalities[i + 1:]]
    return sum(terms) / len(terms)


def fitted_alpha(epoch0) -> jax.Array:
    """``[alpha_cls, alpha_align]`` of the heuristic schedule at the 0-based ``epoch0``."""
    e = jnp.asarray(epoch0, jnp.float32)
    a0 = sum(c * e**k for k, c in enumerate(FITTED_COEFFS))
    return jnp.stack([a0, 1.0 - a0])


def halves_at(epoch0, halve_every):
    """Whether ``lr_alpha`` is halved before the update of the 0-based epoch ``epoch0``."""
    return (epoch0 % halve_every == 0) & (epoch0 != 0)


def alpha_step(alpha, lr_alpha, grad, epoch0, *, halve_every, lo, hi):
    """One ``getAlpha_Learnable`` update: ``(new [alpha_cls, alpha_align], new lr_alpha)``."""
    lr = jnp.where(halves_at(epoch0, halve_every), lr_alpha / 2.0, lr_alpha)
    a1 = jnp.clip(alpha[1] - lr * grad, lo, hi)
    return jnp.stack([1.0 - a1, a1]), lr


class LFM(Method):
    name = "lfm"
    reports_unimodal_heads = True
    traceable = ("lr_alpha",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("its alignment term compares the modalities' softmax class distributions")
        if len(self.modalities) < 2:
            raise ValueError(f"lfm needs at least two modalities (its alignment term compares pairs of "
                             f"modalities); got {list(self.modalities)}.")
        o = self.opts
        if o["schedule"] not in ("learnable", "fitted"):
            raise ValueError(f"lfm: schedule must be 'learnable' or 'fitted'; got {o['schedule']!r}.")
        if o["logits"] not in LOGITS:
            raise ValueError(f"lfm: logits must be one of {LOGITS}; got {o['logits']!r}.")
        if o["hvp_leaf"] not in ("first", "all"):
            raise ValueError(f"lfm: hvp_leaf must be 'first' or 'all'; got {o['hvp_leaf']!r}.")
        if not 0.0 <= o["alpha_min"] <= o["alpha_max"] <= 1.0:
            raise ValueError(f"lfm: need 0 <= alpha_min <= alpha_max <= 1; got {o['alpha_min']}, {o['alpha_max']}.")
        if int(o["probe_rows"]) < 1 or int(o["halve_every"]) < 1:
            raise ValueError(f"lfm: probe_rows and halve_every must be >= 1; got {o['probe_rows']}, "
                             f"{o['halve_every']}.")
        self.reports_unimodal_heads = o["logits"] in ("heads", "authors")

    def check_model(self, model) -> None:
        if self.opts["logits"] == "branches":
            self.require_separable(model, "logits = 'branches' (the default) reads the fusion head's per-modality "
                                          "logits; use logits = 'authors' with another fusion")

    def init_method_state(self, params, rest=None):
        """``probed`` (the last 1-based epoch whose weight update ran),
        ``alpha`` ``[alpha_cls, alpha_align]``, ``halvings`` (of ``lr_alpha`` so far: the current rate
        is ``lr_alpha / 2**halvings``, so that ``lr_alpha`` can be traced), ``alpha_grad`` (the last
        update's δ)."""
        a1 = float(self.opts["alpha_init"])
        return {"probed": jnp.zeros((), jnp.int32),
                "alpha": jnp.asarray([1.0 - a1, a1], jnp.float32),
                "halvings": jnp.zeros((), jnp.int32),
                "alpha_grad": jnp.zeros((), jnp.float32)}

    # ---- the two terms --------------------------------------------------------------------------
    def terms(self, model, batch, mask):
        """``(CE of the fused logits, mean pairwise alignment)`` over the rows where ``mask``."""
        out = self.forward(model, batch)
        uni, fused = self.modality_logits(model, out)
        cls = self.task.loss(fused, batch["label"], mask)
        return cls, mean_pair_alignment(uni, self.modalities, mask)

    def modality_logits(self, model, out):
        """``({m: o_m}, prediction logits)`` of a forward pass ``out`` (see ``logits`` above)."""
        form = self.opts["logits"]
        if form == "branches":
            branches = model.fusion.branch_logits(out["latents"])
            share = model.fusion.shared_offset() / len(self.modalities)
            return ({m: o + share.reshape((1,) * (o.ndim - 1) + share.shape) for m, o in branches.items()},
                    model.fusion.combine(branches))
        uni = out["unimodal"]
        if form == "authors":
            return uni, sum(uni[m] for m in self.modalities) / len(self.modalities)
        return uni, out["logits"]

    def predict(self, model, batch):
        """The fusion head's prediction, or (``logits = "authors"``) the mean of the aligned classifiers."""
        out = self.forward(model, batch)
        if self.opts["logits"] == "authors":
            out = dict(out, logits=self.modality_logits(model, out)[1])
        return {"logits": out["logits"], "unimodal": out["unimodal"], "latents": out["latents"]}

    def _hvp_leaf(self, tree):
        if self.opts["hvp_leaf"] == "all":
            leaves = jax.tree.leaves(tree)
            return sum(jnp.sum(x) for x in leaves) / sum(x.size for x in leaves)
        try:
            enc = tree["encoders"][self.modalities[0]]
        except (KeyError, TypeError):
            enc = None
        candidates = [x for x in jax.tree.leaves(enc) if x.ndim >= 2] if enc is not None else []
        leaf = candidates[0] if candidates else jax.tree.leaves(tree)[0]
        return jnp.mean(leaf)

    def alpha_gradient(self, handle, params, batch, alpha):
        """δ of ``getAlpha_Learnable`` on the valid rows among the first ``probe_rows`` of ``batch`` (eval mode)."""
        rows = jnp.arange(batch["label"].shape[0]) < int(self.opts["probe_rows"])
        mask = rows & (batch["mask"] > 0) if "mask" in batch else rows

        def cls_fn(p):
            return self.terms(handle.eval_model(p), batch, mask)[0]

        def total_fn(p):
            c, a = self.terms(handle.eval_model(p), batch, mask)
            return alpha[0] * c + alpha[1] * a

        g_cls = jax.lax.stop_gradient(jax.grad(cls_fn)(params))
        _, hvp = jax.jvp(jax.grad(total_fn), (params,), (g_cls,))
        return self._hvp_leaf(hvp)

    # ---- the step ---------------------------------------------------------------------------------
    def gradients(self, handle, params, batch, key, method_state) -> StepOutput:
        o = self.opts
        ms = method_state
        epoch = current_epoch(handle)
        epoch0 = epoch - 1
        he = int(o["halve_every"])
        lr_now = self.hp("lr_alpha", float(o["lr_alpha"])) * 0.5 ** ms["halvings"].astype(jnp.float32)
        if o["schedule"] == "fitted":
            alpha, halvings, grad = fitted_alpha(epoch0), ms["halvings"], ms["alpha_grad"]
        else:
            def update(_):
                g = self.alpha_gradient(handle, params, batch, ms["alpha"]).astype(jnp.float32)
                a, _ = alpha_step(ms["alpha"], lr_now, g, epoch0, halve_every=he,
                                  lo=float(o["alpha_min"]), hi=float(o["alpha_max"]))
                return a, ms["halvings"] + halves_at(epoch0, he).astype(jnp.int32), g

            alpha, halvings, grad = jax.lax.cond(ms["probed"] != epoch, update,
                                                 lambda _: (ms["alpha"], ms["halvings"], ms["alpha_grad"]), None)
        lr = self.hp("lr_alpha", float(o["lr_alpha"])) * 0.5 ** halvings.astype(jnp.float32)
        alpha = jax.lax.stop_gradient(alpha)
        mask = batch.get("mask")

        def fn(p):
            model = handle.train_model(p)
            cls, align = self.terms(model, batch, mask)
            loss = 2.0 * (alpha[0] * cls + alpha[1] * align)
            return loss, ({"cls": cls, "align": align}, handle.rest_of(model))

        (loss, (metrics, rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        new_ms = {"probed": epoch, "alpha": alpha.astype(jnp.float32),
                  "halvings": halvings, "alpha_grad": jnp.asarray(grad, jnp.float32)}
        metrics = dict(metrics, loss=loss, alpha_cls=alpha[0], alpha_align=alpha[1], lr_alpha=lr)
        return StepOutput(grads, {}, rest, new_ms, metrics)

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """Logs the last weight update's δ."""
        if ctx is not None:
            ctx.log({"lfm_alpha_grad": float(np.mean(np.asarray(method_state["alpha_grad"])))})
        return method_state
