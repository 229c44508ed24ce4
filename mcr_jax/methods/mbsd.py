r"""MBSD: sample-level modality-balanced self-distillation, as re-implemented in BalanceBenchmark.

Paper: MBSD as described in BalanceBenchmark (Xu et al., "BalanceBenchmark: A Survey for Multimodal
Imbalance Learning", arXiv 2502.10816, Section 3, which cites the original paper; the benchmark's
README lists it among the *objective* methods: "MMCosine, UMT, MBSD, CML, MMPareto, GBlending,
LFM"). The original paper and a release by its own authors were not identified in the searchable
index, so the BalanceBenchmark code is the reference.

Code followed: ``GeWu-Lab/BalanceBenchmark`` at commit ``4c1482fca5aaa8d4278af8e26020daa039e3ccf3``,
``balancemm/trainer/MBSD_trainer.py``, ``MBSDTrainer.training_step`` (lines 95-231: the two-modality
branch 130-159, the three-modality branch 160-224, joint-only outside the window 226-228),
the unimodal logits of ``balancemm/models/avclassify_model.py``
(``unimodality_calculate``: for concat fusion ``z_m W_m^T + b / M``, modality m's slice of the fusion
layer) and the defaults of ``configs/trainer_config.yaml`` (``MBSD: modulation_starts 0,
modulation_ends 80``).

The rule
--------
Let :math:`u_m` be modality m's unimodal logits ``[B, C]``, :math:`p_m = \mathrm{softmax}(u_m)`,
:math:`q_{m,i} = p_{m,i,y_i}` the true-class probability and :math:`\hat y_{m,i} = \arg\max u_{m,i}`.
For a pair of modalities (a, b) and a sample i

.. math::
   s_i = \max(q_{a,i}, q_{b,i}),\quad w_i^{\min} = \min(q_{a,i}, q_{b,i}),\quad
   w_i = [\hat y_{a,i} = y_i \lor \hat y_{b,i} = y_i]\,(s_i - w_i^{\min}),

   \mathrm{KL}_i = w^{\min}_i(\log w^{\min}_i - s_i),\qquad
   \mathrm{RS}_i = \tfrac1C \sum_c (r_{a,i,c} - r_{b,i,c})^2,

where ``KL_i`` is PyTorch's ``F.kl_div(ps, pw, reduction='none')`` exactly as called (the *input*
``ps`` is a probability, not a log-probability: the release's formula, kept) and :math:`r = u`
(logits) for two modalities, :math:`r = p` (probabilities) for three (the release's two branches
differ here). The pair's terms are :math:`L^{KL}_{ab} = \frac1B\sum_i w_i \mathrm{KL}_i` and
:math:`L^{RS}_{ab} = \frac1B\sum_i w_i \mathrm{RS}_i`. Inside the window (epochs
``start_epoch..end_epoch``)

.. math::
   L = \mathrm{CE}(\ell, y) + \sum_m \mathrm{CE}(u_m, y)
       + \lambda\,\overline{L^{KL}} + \lambda\,\overline{L^{RS}}

with the bars the mean over the pairs (one pair for M = 2; the three pairs (0,1), (0,2), (1,2)
averaged for M = 3, as the release) and :math:`\lambda` = ``distill_weight`` (1 in the release).
Outside the window :math:`L = \mathrm{CE}(\ell, y)` (no unimodal terms either, as the release).
Nothing is detached: the gradient flows through :math:`w_i`, :math:`s_i` and :math:`w^{\min}_i`
(the release builds them by indexed assignment of non-detached tensors), with Python's
``max``/``min`` tie rule (on an exact tie both pick modality a).

Mapping onto our late-fusion model
----------------------------------
``unimodal_source``:

- ``"branch"``: :math:`u_m` = the separable fusion head's branch ``branch_logits[m] +
  shared_offset / M`` (the release's ``unimodal_result[m]`` for concat fusion: the fusion layer's
  slice plus bias / M). The unimodal CE and the KL/RS terms train the encoders and the fusion
  branches; our separate ``heads[m]`` stay untrained, and evaluation reports the branches as the
  unimodal predictions.
- ``"heads"``: :math:`u_m` = our unimodal heads ``heads[m](z_m)`` (any fusion head, also
  non-separable ones); the terms train encoders and heads.
- ``"auto"`` (default): ``"branch"`` when the fusion head is separable, else ``"heads"``.

Options (``DEFAULTS``)
----------------------
- ``start_epoch`` 1, ``end_epoch`` 81: the release's 0-based ``modulation_starts 0 <= current_epoch
  <= modulation_ends 80`` in our 1-based epochs, both ends inclusive.
- ``distill_weight`` 1.0: ours (the release has no weight, i.e. 1); it scales the KL and RS terms
  together. Traceable; ``GRID`` varies it.
- ``rs_input`` ``"auto"``: the release's choice (logits for M = 2, probabilities for M >= 3);
  ``"logits"`` / ``"probs"`` force one.
- ``unimodal_source`` ``"auto"`` (see above).

Differences from the release (all of them)
------------------------------------------
- M > 3: every pair (a < b) of modalities, terms averaged over the pairs, and every modality's CE
  (the release's non-2 branch hard-codes three modalities: with more it would use only the first
  three; for M = 2 and M = 3 this is its rule). M = 1 is refused.
- Padding rows (``batch["mask"] == 0``) are left out: the per-sample terms are averaged over the
  valid rows (the release divides by the batch size; it has no padding). The CE terms are the
  dataset task's masked losses.
- ``distill_weight`` is ours (default 1 = the release).
- ``"heads"`` mode (and ``"auto"`` with a non-separable fusion) uses our separate unimodal heads;
  the release always uses the fusion layer's slices (it has concat fusion).
- ``log(w^min)`` is ``xlogy`` (0 at ``w^min = 0``, as PyTorch's ``kl_div``); the release computes in
  float32 on the GPU, here float32 with the max/min as ``where`` selections.
- The release's per-sample Python loop and its ``precision_calculator`` bookkeeping are vectorised /
  omitted; its ``modality: 2`` config key is never read by its trainer and has no counterpart.
- Optimizer, schedule and encoders are the trainer's (the release's SGD / ResNet-18 are not part of
  the rule).

Classification only (softmax, argmax correctness): other tasks raise ``ValueError``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, current_epoch, unimodal_losses
from mcr_jax.models.fusion import is_separable

DEFAULTS = dict(start_epoch=1, end_epoch=81, distill_weight=1.0, rs_input="auto", unimodal_source="auto")
#: the tuning grid of a study (mcr_jax.study): around the release's implicit weight 1.
GRID = dict(distill_weight=[0.3, 1.0, 3.0, 10.0])
SOURCES = ("auto", "branch", "heads")
RS_INPUTS = ("auto", "logits", "probs")


def pair_terms(ua: jax.Array, ub: jax.Array, labels: jax.Array, rs_on_probs: bool):
    """Per-sample ``(w, KL, RS)`` ``[B]`` of one modality pair from logits ``[B, C]`` (see the docstring)."""
    labels = labels.astype(jnp.int32)
    pa, pb = jax.nn.softmax(ua, axis=-1), jax.nn.softmax(ub, axis=-1)
    qa = jnp.take_along_axis(pa, labels[:, None], axis=1)[:, 0]
    qb = jnp.take_along_axis(pb, labels[:, None], axis=1)[:, 0]
    strong = jnp.where(qb > qa, qb, qa)  # Python max(a, b): a on ties
    weak = jnp.where(qb < qa, qb, qa)  # Python min(a, b): a on ties
    correct = (jnp.argmax(ua, axis=-1) == labels) | (jnp.argmax(ub, axis=-1) == labels)
    w = jnp.where(correct, strong - weak, 0.0)
    kl = jax.scipy.special.xlogy(weak, weak) - weak * strong  # F.kl_div(strong, weak, 'none')
    ra, rb = (pa, pb) if rs_on_probs else (ua, ub)
    rs = jnp.sum(jnp.square(ra - rb), axis=-1) / ua.shape[-1]
    return w, kl, rs


def mbsd_terms(unimodal: dict, names, labels, mask=None, rs_input="auto"):
    """``(KL, RS)``: the pair-averaged weighted terms (mean over valid rows) of ``{m: logits [B, C]}``."""
    probs = rs_input == "probs" or (rs_input == "auto" and len(names) > 2)
    kls, rss = [], []
    for a, b in itertools.combinations(names, 2):
        w, kl, rs = pair_terms(unimodal[a].astype(jnp.float32), unimodal[b].astype(jnp.float32), labels, probs)
        kls.append(masked_mean(w * kl, mask))
        rss.append(masked_mean(w * rs, mask))
    return sum(kls) / len(kls), sum(rss) / len(rss)


class MBSD(Method):
    """Fused CE + Σ_m unimodal CE + λ (pairwise weighted KL + RS) inside the window (classification)."""

    name = "mbsd"
    reports_unimodal_heads = True
    traceable = ("distill_weight",)

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        self.require_classes("its weights use the unimodal softmax probability and argmax of the true class")
        if len(self.modalities) < 2:
            raise ValueError(f"mbsd needs at least two modalities (it compares pairs); got {list(self.modalities)}.")
        if o["unimodal_source"] not in SOURCES:
            raise ValueError(f"method.unimodal_source must be one of {SOURCES}; got {o['unimodal_source']!r}.")
        if o["rs_input"] not in RS_INPUTS:
            raise ValueError(f"method.rs_input must be one of {RS_INPUTS}; got {o['rs_input']!r}.")
        if int(o["start_epoch"]) < 1 or int(o["end_epoch"]) < int(o["start_epoch"]) - 1:
            raise ValueError(f"method.start_epoch must be >= 1 and end_epoch >= start_epoch - 1; got "
                             f"{o['start_epoch']} and {o['end_epoch']}.")
        if float(o["distill_weight"]) < 0:
            raise ValueError(f"method.distill_weight must be >= 0; got {o['distill_weight']}.")

    def _source(self, model) -> str:
        src = self.opts["unimodal_source"]
        if src == "auto":
            return "branch" if is_separable(model.fusion) else "heads"
        return src

    def check_model(self, model) -> None:
        if self._source(model) == "branch":
            self.require_separable(model, "unimodal_source='branch' reads each modality's fusion branch "
                                          "(use unimodal_source='heads' or 'auto')")

    def unimodal_logits(self, model, out) -> dict:
        """``{m: u_m [B, C]}``: fusion branches + shared offset / M, or the unimodal heads."""
        if self._source(model) == "branch":
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.shared_offset()[None] / len(self.modalities)
            return {m: branches[m] + shared for m in self.modalities}
        return dict(out["unimodal"])

    def loss(self, handle, params, batch, key, method_state):
        o = self.opts
        model = handle.train_model(params)
        out = self.forward(model, batch)
        labels, mask = batch["label"], batch.get("mask")
        fused = self.task.loss(out["logits"], labels, mask)
        uni_logits = self.unimodal_logits(model, out)
        uni = unimodal_losses({"unimodal": uni_logits}, batch, self.task, self.modalities)
        kl, rs = mbsd_terms(uni_logits, self.modalities, labels, mask, o["rs_input"])
        epoch = current_epoch(handle)
        active = ((epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))).astype(jnp.float32)
        weight = self.hp("distill_weight", float(o["distill_weight"]))
        total = fused + active * (sum(uni.values()) + weight * (kl + rs))
        metrics = {"task": fused, "kl": kl, "rs": rs, "active": active, **{f"uni_{m}": v for m, v in uni.items()}}
        return total, metrics, model

    def predict(self, model, batch):
        out = self.forward(model, batch)
        return {"logits": out["logits"], "unimodal": self.unimodal_logits(model, out), "latents": out["latents"]}


__all__ = ["MBSD", "mbsd_terms", "pair_terms"]
