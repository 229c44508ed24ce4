"""Sample-level modality valuation and enhancement (Wei, Feng, Sun, Hu et al., CVPR 2024).

"Enhancing Multimodal Cooperation via Sample-level Modality Valuation". Released code:
``GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation`` (commit 7ed12b07ee7d233aa835089185c909aaa3ff6b1e),
followed here:

* ``code/sample_level.py`` ``execute_modulation``: after every epoch (from epoch ``warmup - 1``,
  0-based), in evaluation mode over the whole training split, each sample's fused prediction and its
  two unimodal predictions (``models.py`` ``exec_drop``: the other encoder's feature zeroed before
  the concatenation-fusion head) are scored ``v_all = 2·[argmax fused = y]``, ``v_a = [argmax a = y]``,
  ``v_v = [argmax v = y]``, and the contributions are ``φ_a = (v_a + v_all - v_v) / 2``,
  ``φ_v = (v_v + v_all - v_a) / 2``: the 2-player Shapley values of ``v(S) = |S|·[S predicts y]``.
* ``code/datasets/dataloader.py`` ``AV_KS_Dataset_sample_level``: the next epoch's training set is
  the original ``N`` samples plus, per sample ``i`` and modality ``m``, ``k_m(i)`` extra copies in
  which ONLY modality ``m`` is kept (the other's feature zeroed, ``drop`` flag in ``models.py``
  ``forward``), with ``k = 1`` if ``0.4 < φ_m < 1``, ``2`` if ``-0.1 < φ_m < 0.4``, ``3`` if
  ``φ_m < -0.1``, else 0: a sample's low-contribution modality is re-trained alone, more often the
  lower its contribution.
* ``sample_level.py`` ``train_epoch``: plain cross-entropy of the fused output on those rows.

The rule here (any ``M >= 2``; ``M = 2`` is exactly the release's values)::

    v_i(S) = |S| · [argmax fuse({z_m : m ∈ S}, zeros elsewhere) = y_i],   v_i(∅) = 0
    φ_m(i) = Σ_{S ⊆ M∖{m}} |S|! (M-|S|-1)! / M! · (v_i(S ∪ {m}) - v_i(S))
    k_m(i) = 1[0.4 < φ < 1] + 2·1[-0.1 < φ < 0.4] + 3·1[φ < -0.1]          (φ = φ_m(i))

and, once active, every training row of example ``i`` is drawn (``Method.sampling_weights``: the
epoch's rows are drawn with replacement, ``P(i) ∝ w_i = 1 + Σ_m k_m(i)``) and then given a "mode":
the full input with probability ``1 / w_i``, or "only modality ``m``" (all other latents zeroed
before the fusion) with probability ``k_m(i) / w_i``: in expectation, exactly the release's
expanded data set. The loss is the task's cross-entropy of the fused logits of those rows.

Authors' defaults (``sample_level.py``): ``--warmup 5`` (contributions from the end of epoch 5,
1-based, on); Adam 5e-5, batch 64, 60 epochs (the study's own optimiser settings are used).

Differences from the release:

* Late fusion of per-modality encoders: the release zeroes the pooled ResNet feature of the dropped
  modality before its concatenation head; here the dropped modalities' latents are zeroed before
  ``Method.fuse`` (identical for the linear/concat fusion; for other fusions the same zeroing feeds
  whatever the fusion computes). The valuation uses ``ctx.features("train")`` (evaluation mode) and
  ``ctx.fuse``, as the release's ``model.eval()`` pass over an unshuffled training loader (whose
  inputs are augmented there, not here: see below).
* Resampling realisation: the release builds an expanded data set of ``N + Σ k`` rows (each copy
  visited once per epoch, so an epoch grows); here an epoch keeps ``N`` rows (fixed compiled
  shape), drawn i.i.d. with probability ``∝ w_i``, and each row's mode drawn per step from the step
  key with probabilities ``(1, k_1, …, k_M) / w_i``: the same expected mixture of full / unimodal
  rows, not the same count per epoch.
* During warm-up (``epoch <= warmup``) the method is plain joint training with the ordinary
  shuffled epochs (``sampling_weights`` returns None), as the release's ``warmup_epoch``.
* ``M > 2``: the Shapley formula above with ``v(S) = |S|·correct`` (2^M - 1 fused predictions per
  epoch); the release is audio–visual only. Classification only (``argmax = y``).
* **Augmented valuation inputs in the release.** Its valuation pass reads ``train_val_dataset =
  AV_KS_Dataset(mode="train", ...)``, i.e. the training split *with* the training transforms
  (``datasets/dataloader.py`` ``__getitem__`` for ``mode == 'train'``: a random frame per segment,
  ``random.randint``, ``RandomResizedCrop(224)``, ``RandomHorizontalFlip()``); only the loader's
  shuffling is off. So each epoch's contributions are scored on one random augmentation of every
  sample. Here they are scored on the un-augmented training inputs (``ctx.features("train")``, the
  evaluation-mode pass without training-time augmentation): deterministic per epoch, and not what the
  release measures.
* **The released script does not run as released** (checked at the commit above): ``main``
  passes ``loader=args.loader`` to ``AV_KS_Dataset`` (three times) and ``execute_modulation`` to
  ``AV_KS_Dataset_sample_level``, whose constructors take ``(mode, transforms=None)`` and ``(mode,
  contribution, transforms=None)``: a ``TypeError`` before the first epoch; and the best-model file
  name formats ``args.dynamic`` and ``args.method``, which ``get_arguments`` never defines (an
  ``AttributeError`` at the first improvement). The intended behaviour is followed. Its mean
  contributions (``cona``, ``conv``) are logged here as ``contrib_<m>``, with ``copies_<m>`` (mean ``k_m``).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mcr_jax.methods.base import Method
from mcr_jax.metrics import shapley_values

DEFAULTS = dict(
    warmup=5,  # epochs of plain joint training before the first valuation (sample_level.py --warmup)
)

#: the study's grid around the authors' default.
GRID = dict(warmup=[1, 3, 5, 10])


def shapley_contributions(correct, modalities):
    """Per-example Shapley contributions ``{m: float64 [N]}`` of ``v(S) = |S|·correct[S]``.

    ``correct`` maps each non-empty subset (a ``frozenset`` of modality names) to a bool ``[N]``:
    whether the fused prediction with only those modalities (others zeroed) is right.
    """
    mods = list(modalities)
    full = np.asarray(correct[frozenset(mods)])
    values = {frozenset(): np.zeros(full.shape, np.float64)}
    values.update({s: len(s) * np.asarray(c, np.float64) for s, c in correct.items()})
    out = shapley_values(values, mods)
    return {m: np.broadcast_to(np.asarray(v, np.float64), full.shape).copy() for m, v in out.items()}


def resample_copies(contribution):
    """The release's number of extra unimodal copies for each contribution (int32, same shape)."""
    c = np.asarray(contribution, np.float64)
    k = np.zeros(c.shape, np.int32)
    k[(c > 0.4) & (c < 1.0)] = 1
    k[(c > -0.1) & (c < 0.4)] = 2
    k[c < -0.1] = 3
    return k


class Valuation(Method):
    name = "valuation"
    #: its epochs draw rows ∝ the valuation's copies (:meth:`sampling_weights`).
    gives_sampling_weights = True

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("the valuation scores each modality by whether its prediction is correct")
        if len(self.modalities) < 2:
            raise ValueError(f"valuation needs at least 2 modalities, got {list(self.modalities)}.")
        if int(self.opts["warmup"]) < 0:
            raise ValueError(f"valuation.warmup must be >= 0, got {self.opts['warmup']}.")
        sizes = (info.extra or {}).get("split_sizes", {})
        if "train" not in sizes:
            raise ValueError("valuation needs the training split's size (info.extra['split_sizes']['train']) "
                             "to keep per-example copies in its method state.")
        self.num_train = int(sizes["train"])

    def init_method_state(self, params, rest=None):
        return {"copies": jnp.zeros((len(self.modalities), self.num_train), jnp.int32),
                "active": jnp.zeros((), jnp.int32)}

    def sampling_weights(self, method_state):
        if not int(np.asarray(jax.device_get(method_state["active"]))):
            return None
        copies = np.asarray(jax.device_get(method_state["copies"]), np.float64)
        return 1.0 + copies.sum(axis=0)

    def row_modes(self, copies, index, key):
        """Each row's mode ``[B]`` int32: 0 = all modalities, ``j + 1`` = only modality ``j``, drawn with
        probabilities ``(1, k_1(i), …, k_M(i)) / (1 + Σ_m k_m(i))``."""
        k = jnp.take(copies, index, axis=1).astype(jnp.float32)  # [M, B]
        logits = jnp.log(jnp.concatenate([jnp.ones_like(k[:1]), k], axis=0))  # log 0 = -inf: never drawn
        return jax.random.categorical(key, logits, axis=0).astype(jnp.int32)

    def loss(self, handle, params, batch, key, method_state):
        if "index" not in batch:
            raise ValueError("valuation needs each row's example index under batch['index'] (the trainer's "
                             "batches carry it) to look up the row's resampling copies.")
        model = handle.train_model(params)
        out = self.forward(model, batch)
        modes = self.row_modes(method_state["copies"], batch["index"], key)
        kept = {m: ((modes == 0) | (modes == j + 1)).astype(out["latents"][m].dtype)
                for j, m in enumerate(self.modalities)}
        latents = {m: z * kept[m].reshape((-1,) + (1,) * (z.ndim - 1)) for m, z in out["latents"].items()}
        logits = self.fuse(model, latents)
        task = self.task.loss(logits, batch["label"], batch.get("mask"))
        mask = batch.get("mask")
        valid = jnp.ones(modes.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        frac = jnp.sum((modes > 0) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return task, {"task": task, "unimodal_rows": frac}, model

    def contributions(self, ctx):
        """``{m: float64 [N]}``: each training example's Shapley contribution of each modality."""
        latents, labels = ctx.features("train")
        labels = np.asarray(labels)
        correct = {}
        for size in range(1, len(self.modalities) + 1):
            for sub in itertools.combinations(self.modalities, size):
                z = {m: (np.asarray(v) if m in sub else np.zeros_like(np.asarray(v))) for m, v in latents.items()}
                correct[frozenset(sub)] = np.argmax(np.asarray(ctx.fuse(z)), axis=-1) == labels
        return shapley_contributions(correct, self.modalities)

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        contrib = self.contributions(ctx)
        copies = np.stack([resample_copies(contrib[m]) for m in self.modalities])
        ctx.log({**{f"contrib_{m}": float(np.mean(contrib[m])) for m in self.modalities},
                 **{f"copies_{m}": float(np.mean(copies[j])) for j, m in enumerate(self.modalities)}})
        if epoch < int(self.opts["warmup"]):
            return method_state
        return {"copies": jnp.asarray(copies, jnp.int32), "active": jnp.ones((), jnp.int32)}
