r"""G-Blending (Gradient-Blending): Wang, Tran, Feiszli, *What makes training multi-modal
classification networks hard?*, CVPR 2020 (arXiv 1905.12681).

Code followed
-------------
The authors' release, ``facebookresearch/VMZ`` (Caffe2), has the G-Blend *loss* only:
``c2/lib/models/loss/loss_creator.py``, ``add_weighted_loss`` (one extra classifier per stream,
``loss = audio_weight·L_a + visual_weight·L_v + av_weight·L_av``, weights given as options) and, in
``c2/tutorials/gradient_blending.md``, tables of weights computed offline; the weight *estimation*
is not released. This module follows the widely used re-implementation in **BalanceBenchmark**
(``GeWu-Lab/BalanceBenchmark``, commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3):
``balancemm/trainer/GBlending_trainer.py`` (``GBlendingTrainer.fit``, ``training_step``,
``super_epoch_origin``) and its defaults in ``configs/trainer_config.yaml`` (``GBlending``).
``mode="offline"`` with given ``weights`` is the authors' released usage (fixed weights).

The rule
--------
Training minimises a weighted sum of the fused head's loss and every unimodal head's loss,

.. math::
   L = w_0\, L(\ell, y) + \sum_{m=1}^{M} w_m\, L(u_m, y), \qquad \sum_k w_k = 1,

(``training_step``: ``loss += weights[modality] * criterion(unimodal_result[modality], label)`` over
the modalities and ``'output'``). The weights come from the overfitting-to-generalisation ratio of
each head ``k`` over a window of ``n`` epochs from epoch ``N``: with :math:`L^T` the training loss
and :math:`L^V` the held-out loss,

.. math::
   G_k = L^V_{k,N} - L^V_{k,N+n}, \qquad
   O_{k,t} = L^V_{k,t} - L^T_{k,t}, \qquad \Delta O_k = O_{k,N+n} - O_{k,N}, \qquad
   w_k = \frac{|G_k| / \Delta O_k^2}{\sum_j |G_j| / \Delta O_j^2}

(``super_epoch_origin``: ``g = now_validation_loss - pre_validation_loss``, ``o = o_now - o_pre``,
``weights[modality] = abs(g / o**2)``, then divided by their sum; :math:`|G|` is the release's
``abs``, the paper's :math:`w^* \propto \langle G\rangle / O^2` assumes :math:`G > 0`).
``mode="online"`` re-estimates the weights every ``super_epoch`` epochs from the last window (the
paper's Algorithm 2, the release's default ``method: "online"``); ``mode="offline"`` estimates them
once, from the first window, and keeps them (or uses the given ``weights`` from the start and never
estimates: the paper's "weights from a given set").

The held-out data
-----------------
The held-out set :math:`V` is a deterministic part of the **training split**, never the validation
or test split: example ``i`` (its index in the training split) is held out iff
``u_i < holdout_fraction`` with :math:`u_i = ((i + s)\cdot 2654435761 \bmod 2^{32}) / 2^{32}`
(a golden-ratio Weyl sequence, ``s = holdout_seed``): about that fraction of every contiguous range
of indices, known from the index alone. Held-out rows are masked out of every training loss (they
carry no gradient); at the end of a window's epochs :meth:`GBlending.on_epoch_end` takes the
encoders' latents of the whole training split (``ctx.features("train")``, evaluation mode, in split
order so row ``i`` is example ``i``), applies the current fused head and unimodal heads, and
measures every head's mean loss on the trained rows (:math:`L^T`) and on the held-out rows
(:math:`L^V`). The rows are recognised by each batch's example indices, ``batch["index"]`` (every
batch of the trainer carries them, ``mcr_jax.data.types.INDEX_KEY``); a batch without them is
refused with a ``ValueError``.

Options (``DEFAULTS``) and whom they follow
-------------------------------------------
- ``mode`` = ``"online"``, ``super_epoch`` = 10: the release's ``trainer_config.yaml``
  (``modulation_starts``/``modulation_ends``/``modality`` there are unused by the trainer).
- ``holdout_fraction`` = 0.1, ``holdout_seed`` = 0: ours (the release uses its validation loader).
- ``weights`` = None: the initial weights, ``[w_fused, w_<m> ...]`` in the order of the dataset's
  modalities (normalised); None gives uniform weights ``1/(M+1)`` until the first estimate.
- ``eps`` = 1e-12: a floor on :math:`\Delta O^2` (ours; the release divides by it unguarded).

Differences from the release (every one)
----------------------------------------
1. **No separate trial trainings.** The release (and the paper's ``GB-Estimate``) copies the model
   at the start of every super-epoch, and for each head trains a copy alone for ``super_epoch``
   epochs (the fused model; the fused model with the other modalities' inputs zeroed for a
   unimodal "model"), measuring losses after that copy's first and last epoch, then trains the
   real model for ``super_epoch`` epochs with the weights. Here the losses are measured on the real
   model, jointly trained with the current weights, at the ends of the last window (``N`` and
   ``N + super_epoch``), and the new weights apply to the next window. Consequently the first
   weights are uniform (or ``weights``) until the first estimate, after epoch ``1 + super_epoch``
   (the window starts at the first epoch's end: the hook has no model before training); the
   release estimates before its epoch 0. ``offline`` is estimated after the first window, not from
   a full-length trial training (the release's ``offline`` trains each copy for all epochs).
2. **Held-out set.** The release's "validation" losses come from the loader passed as
   ``val_loader`` (the dataset's validation/test split); here a held-out part of the training split
   (``holdout_fraction``), excluded from the training loss.
3. **Loss scale.** The release sums batch-mean losses over the loader (training losses accumulated
   *during* the trial epoch, in train mode; validation summed over its batches, so the two differ in
   scale by the batch counts); here every loss is a per-example mean at the window's ends,
   evaluated with the current parameters in evaluation mode.
4. **Window.** The release's ``pre`` is measured after the first trial epoch, so its window is
   ``super_epoch - 1`` epochs; here it is ``super_epoch`` epochs.
5. **Unimodal heads.** BalanceBenchmark's unimodal logits are the fused linear layer's branches
   (``z_m W_m + b / M``); ours are the model's separate heads ``heads[m]``, as the paper's and the
   authors' VMZ release (one extra classifier per stream); any fusion for the fused head. Late fusion of per-modality
   encoders maps directly: the fused head is head 0, ``heads[m]`` are heads ``1..M``.
6. **Guards.** :math:`\Delta O^2` is floored at ``eps``; an estimate whose sum is not finite and
   positive keeps the previous weights; padding rows are left out of every loss.
7. Any number of modalities (the release's config has two); any task whose loss is
   ``task.loss`` (the release: cross-entropy).
8. Given ``weights`` are normalised to sum 1 (VMZ scales the losses by them as given; its
   published weights sum to 1). With ``mode="offline"`` and given ``weights`` nothing is held out
   (the weights are never estimated) and batches need no ``"index"``.

The method state holds the weights ``[M+1]`` (logged as ``w_fused``, ``w_<m>`` step metrics), the
window's anchor losses, the last ``gain`` (G) and ``overfit`` (ΔO), and counters: fixed shapes,
checkpointed and vectorised over seeds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcr_jax import progress
from mcr_jax.data.types import INDEX_KEY
from mcr_jax.methods.base import Method

DEFAULTS = dict(mode="online", super_epoch=10, holdout_fraction=0.1, holdout_seed=0, weights=None, eps=1e-12)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(super_epoch=[3, 5, 10, 20])
MODES = ("online", "offline")
_GOLDEN = 2654435761  # floor(2^32 / golden ratio): a multiplicative (Fibonacci) hash
_CHUNK = 2048  # rows per call when measuring the heads' losses on the training split


# ---- the rule ----------------------------------------------------------------------------------
def holdout_threshold(fraction: float) -> int:
    """The ``uint32`` threshold: example ``i`` is held out iff its hash is below it."""
    return min(int(round(float(fraction) * 2.0**32)), 2**32 - 1)


def holdout_mask(index, fraction: float, seed: int = 0):
    """Whether each example index is held out (bool, the shape of ``index``; jnp or NumPy input)."""
    if isinstance(index, np.ndarray):
        h = ((index.astype(np.uint64) + np.uint64(seed)) * np.uint64(_GOLDEN)) % np.uint64(2**32)
        return h < np.uint64(holdout_threshold(fraction))
    h = (jnp.asarray(index).astype(jnp.uint32) + jnp.uint32(seed)) * jnp.uint32(_GOLDEN)  # wraps mod 2^32
    return h < jnp.uint32(holdout_threshold(fraction))


def blend_weights(pre_train, pre_held, now_train, now_held, eps: float = 1e-12):
    """``(weights, gain, overfit)`` of every head from its losses at the window's ends (float64).

    ``gain = L^V_N − L^V_{N+n}``; ``overfit = (L^V − L^T)_{N+n} − (L^V − L^T)_N``;
    ``weights ∝ |gain| / max(overfit², eps)``, normalised to sum 1 (None when that sum is not
    finite and positive)."""
    pre_train, pre_held, now_train, now_held = (np.asarray(x, np.float64)
                                                for x in (pre_train, pre_held, now_train, now_held))
    gain = pre_held - now_held
    overfit = (now_held - now_train) - (pre_held - pre_train)
    raw = np.abs(gain) / np.maximum(overfit**2, eps)
    total = raw.sum()
    weights = raw / total if np.isfinite(total) and total > 0 else None
    return weights, gain, overfit


class GBlending(Method):
    """Weighted fused + unimodal losses, weights from held-out generalisation / overfitting."""

    name = "gblending"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        if o["mode"] not in MODES:
            raise ValueError(f"method.mode must be one of {MODES}; got {o['mode']!r}.")
        if int(o["super_epoch"]) < 1:
            raise ValueError(f"method.super_epoch must be >= 1; got {o['super_epoch']}.")
        if len(self.modalities) < 1:
            raise ValueError("gblending needs at least one modality.")
        self.heads = ("fused", *self.modalities)
        k = len(self.heads)
        if o["weights"] is None:
            self.initial = np.full((k,), 1.0 / k)
        else:
            w = np.asarray(list(o["weights"]), np.float64)
            if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"method.weights must be {k} non-negative numbers, not all 0 (the fused head, then "
                                 f"{list(self.modalities)}); got {o['weights']!r}.")
            self.initial = w / w.sum()
        #: whether the weights are ever estimated (offline with given weights: never).
        self.estimates = not (o["mode"] == "offline" and o["weights"] is not None)
        f = float(o["holdout_fraction"])
        if self.estimates and not 0.0 < f < 1.0:
            raise ValueError(f"method.holdout_fraction must be in (0, 1): the held-out part of the training split "
                             f"that measures generalisation; got {f}.")
        if not 0.0 <= f < 1.0:
            raise ValueError(f"method.holdout_fraction must be in [0, 1); got {f}.")

    def check_model(self, model) -> None:
        heads = getattr(model, "heads", None)
        missing = [m for m in self.modalities if heads is None or m not in heads]
        if missing:
            raise ValueError(f"gblending trains a unimodal head per modality; the model has none for {missing}.")

    # ---- training ----------------------------------------------------------------------------
    def held_out(self, batch):
        """``[B]`` bool: the batch's rows held out of training (from ``batch["index"]``)."""
        if not self.estimates or float(self.opts["holdout_fraction"]) == 0.0:  # fixed weights: nothing held out
            return jnp.zeros(batch["label"].shape[:1], bool)
        if INDEX_KEY not in batch:
            raise ValueError(
                f"gblending holds a part of the training split out of training (method.holdout_fraction="
                f"{self.opts['holdout_fraction']}) and needs each training batch's example indices under "
                f"batch[{INDEX_KEY!r}]; this batch has only {sorted(batch)} (the trainer's batches carry them; "
                "or use mode='offline' with given weights, which holds nothing out).")
        return holdout_mask(batch[INDEX_KEY], float(self.opts["holdout_fraction"]), int(self.opts["holdout_seed"]))

    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        mask = batch.get("mask")
        mask = jnp.ones(batch["label"].shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        mask = mask * (1.0 - self.held_out(batch).astype(jnp.float32))
        w = jax.lax.stop_gradient(method_state["weights"])
        losses = [self.task.loss(out["logits"], batch["label"], mask)]
        losses += [self.task.loss(out["unimodal"][m], batch["label"], mask) for m in self.modalities]
        total = sum(w[k] * losses[k] for k in range(len(losses)))
        metrics = {"task": losses[0], **{f"uni_{m}": v for m, v in zip(self.modalities, losses[1:], strict=True)},
                   **{f"w_{h}": w[k] for k, h in enumerate(self.heads)}}
        return total, metrics, model

    def init_method_state(self, params, rest=None):
        k = len(self.heads)
        z = lambda: jnp.zeros((k,), jnp.float32)  # a buffer per leaf: the trainer donates the state
        return {"weights": jnp.asarray(self.initial, jnp.float32), "anchor_train": z(), "anchor_held": z(),
                "anchor_epoch": jnp.zeros((), jnp.int32), "gain": z(), "overfit": z(),
                "estimates": jnp.zeros((), jnp.int32)}

    # ---- estimation (host) -------------------------------------------------------------------
    def head_losses(self, graphdef, params, rest, latents, labels):
        """``(train [K], held [K])``: every head's mean loss on the trained and the held-out rows of
        the training split (``latents``: ``{m: [N, D_m]}`` in split order, row i = example i;
        ``graphdef``: the model's evaluation-mode graph, :attr:`EpochContext.graphdef_eval`)."""
        n = int(np.asarray(labels).shape[0])
        held = holdout_mask(np.arange(n), float(self.opts["holdout_fraction"]), int(self.opts["holdout_seed"]))
        counts = np.array([n - held.sum(), held.sum()], np.float64)
        if counts.min() < 1:
            raise ValueError(f"gblending: the training split's {n} examples give {int(counts[1])} held-out and "
                             f"{int(counts[0])} trained examples (method.holdout_fraction="
                             f"{self.opts['holdout_fraction']}); both need at least one.")
        fn = functools.partial(_head_loss_sums, self, graphdef)
        total = np.zeros((2, len(self.heads)), np.float64)
        for s in range(0, n, _CHUNK):
            rows = np.arange(s, s + _CHUNK)
            valid = rows < n
            take = np.minimum(rows, n - 1)  # the last chunk padded (valid 0) to one shape
            chunk = {m: np.asarray(latents[m])[take] for m in self.modalities}
            total += np.asarray(fn(params, rest, chunk, np.asarray(labels)[take], valid.astype(np.float32),
                                   held[take].astype(np.float32)), np.float64)
        return total[0] / counts[0], total[1] / counts[1]

    def due(self, epoch: int, method_state) -> bool:
        """Whether the losses are measured after (1-based) ``epoch``: the first epoch (the first
        window's start), then every ``super_epoch`` epochs (offline: only until the first estimate)."""
        if not self.estimates or (self.opts["mode"] == "offline" and int(method_state["estimates"]) >= 1):
            return False
        anchor = int(method_state["anchor_epoch"])
        return anchor == 0 or epoch - anchor >= int(self.opts["super_epoch"])

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        if not self.due(int(epoch), method_state):
            return method_state
        latents, labels = ctx.features("train")  # the training split only: never validation / test
        if ctx.graphdef_eval is None:
            raise ValueError("gblending: the epoch context has no model graph (the trainer passes graphdef_eval).")
        now_train, now_held = self.head_losses(ctx.graphdef_eval, ctx.params, ctx.rest, latents, labels)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        new = {**method_state, "anchor_train": f32(now_train), "anchor_held": f32(now_held),
               "anchor_epoch": jnp.asarray(int(epoch), jnp.int32)}
        if int(method_state["anchor_epoch"]) > 0:
            weights, gain, overfit = blend_weights(method_state["anchor_train"], method_state["anchor_held"],
                                                   now_train, now_held, float(self.opts["eps"]))
            if weights is not None:
                new["weights"] = f32(weights)
            new.update(gain=f32(gain), overfit=f32(overfit),
                       estimates=jnp.asarray(int(method_state["estimates"]) + 1, jnp.int32))
            shown = np.asarray(new["weights"])
            progress.say(f"[gblending] epoch {epoch}: weights " + ", ".join(
                f"{h} {shown[k]:.4f} (G {gain[k]:+.4f}, dO {overfit[k]:+.4f})" for k, h in enumerate(self.heads))
                + ("" if weights is not None else " (estimate degenerate: weights kept)"), detail=True)
        return new


@functools.partial(jax.jit, static_argnums=(0, 1))
def _head_loss_sums(method, graphdef, params, rest, latents, labels, valid, held):
    """``[2, K]``: every head's loss sums over the trained rows, the held-out rows of a chunk (the
    model built from ``graphdef``, in evaluation mode)."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    logits = [method.fuse(model, latents)] + [model.heads[m](latents[m]) for m in method.modalities]
    out = []
    for part in (valid * (1.0 - held), valid * held):
        n = jnp.sum(part)
        out.append(jnp.stack([method.task.loss(lg, labels, part) * n for lg in logits]))
    return jnp.stack(out)
