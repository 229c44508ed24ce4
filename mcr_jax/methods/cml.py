r"""CML (Calibrating Multimodal Learning): Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, *Calibrating
Multimodal Learning*, ICML 2023 (arXiv 2306.01265).

Two forms of the rule (option ``form``), from two releases:

- ``"balancebenchmark"`` (default): BalanceBenchmark / BalanceMM (``GeWu-Lab/BalanceBenchmark``,
  commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3): ``balancemm/trainer/CML_trainer.py``
  (``conf_loss``, ``CMLTrainer.train_loop`` for the per-epoch modality order,
  ``CMLTrainer.training_step`` for the loss), the unimodal logits of
  ``balancemm/models/avclassify_model.py`` (``BaseClassifierModel.unimodality_calculate``: ``u_m = z_m
  W_m^T + b / M`` with the slice ``W_m`` of the concatenation-fusion layer ``fc_out``) and the
  defaults in ``configs/trainer_config.yaml`` (``CML``). BalanceMM lists CML among its **objective**
  methods.
- ``"authors"``: the authors' own release, ``QingyangZhang/CML`` (code commit
  85075b54c704d0dd9614fda24ce631488ab97ede, "first commit"; the only later commit, 9d2496e, edits
  the README), where the regulariser is called MCCA: ``miwae/train.py`` (``get_multi_mask``: the
  per-example removal order; the ``# stage 2`` loop of ``__main__``: the rank loss, its two
  "tricks", ``epsilon`` and the weight ``beta / 100``), the run lines of ``readme.md`` (``python
  miwae/train.py --beta 10``). The release's other code path, ``cpm/CPM_Nets.py``
  (``CPMNet_Works.rank_loss``), is described under "the authors' form" below; it is not followed.

The rule (both forms)
---------------------
Let :math:`\ell = \sum_m z_m W_m + b` be the fused logits of a linear late fusion, :math:`B_m = z_m
W_m` modality :math:`m`'s branch logits, and :math:`\pi` an order of the :math:`M` modalities. The
modalities are removed one at a time from the end of the order, giving :math:`M-1` nested
sub-models

.. math::
   s_0 = \ell, \qquad s_i = s_{i-1} - B_{\pi_{M-i}} \quad (i = 1..M-1)

(BalanceBenchmark's ``out_p = out_s - unimodal_result[removed] + fc_out.bias / M``: the removed
modality's ``u_m`` carries ``b / M``, added back, so the shared bias stays whole). With the
confidence :math:`c(s)_n = \max_k \operatorname{softmax}(s_n)_k`, the prediction :math:`\hat
y(s)_n = \arg\max_k s_{n,k}` and cross-entropy CE,

.. math::
   L = \frac{1}{M}\Big(\mathrm{CE}(s_0, y) + \sum_{i=1}^{M-1} \mathrm{CE}(s_i, y)\Big)
       + \lambda \sum_{i=1}^{M-1} R_i,

i.e. a sub-model with fewer modalities must not be more confident than the one it came from
(CE terms divided by :math:`M` in both releases). Outside the epochs ``[start_epoch, end_epoch]``
the loss is the fused CE alone. Prediction is the fused head, unchanged.

``form="balancebenchmark"`` (``conf_loss``: ``max(0, (conf_x - conf).sum())``), one hinge of the
batch-summed gap, gradients through both confidences:

.. math::
   R_i = \max\Big(0,\ \sum_{n} c(s_i)_n - c(s_{i-1})_n\Big).

``form="authors"`` (``miwae/train.py``), a hinge **per example**, gated by correctness, plus a second
term with the larger model's confidence detached (:math:`\operatorname{sg}`), margin
:math:`\varepsilon` (``--epsilon``):

.. math::
   R_i = \sum_n \operatorname{relu}\big((c(s_i)_n - c(s_{i-1})_n)\,[\hat y(s_{i-1})_n = y_n]
         - \varepsilon\big)
       + \sum_n \operatorname{relu}\big((c(s_i)_n - \operatorname{sg}\,c(s_{i-1})_n)\,
         [\hat y(s_i)_n \ne y_n \wedge \hat y(s_{i-1})_n \ne y_n] - \varepsilon\big)

("trick 1": only where the larger model is right is a more confident sub-model penalised, both
confidences receiving gradient; "trick 2": where both are wrong, the sub-model's confidence alone is
pushed down). Example (the issue's, :math:`\varepsilon = 0`, two rows): full-model confidences
(0.9, 0.6), sub-model (0.95, 0.8), the full model right on row 0 only, the sub-model on row 1 only:
the authors' form gives 0.05 (row 0's gap; row 1 is gated off in both terms), BalanceBenchmark's
0.25 (both gaps summed).

Options (``DEFAULTS``) and whom they follow
-------------------------------------------
- ``form`` ``"balancebenchmark"``: see above; ``"authors"`` for the authors' release.
- ``lam`` 0.1: BalanceBenchmark's ``trainer_config.yaml`` ``CML.lam`` (the regulariser's weight
  :math:`\lambda`; ``GRID`` spans it). The authors' release weighs the rank loss by ``beta / 100``
  with an integer ``--beta`` (default 0, i.e. off; the README's run line uses 10, i.e.
  :math:`\lambda` = 0.1; ``batch_train.py`` sweeps 0…100): ``lam`` is that ``beta / 100``.
- ``margin`` 0.0: the authors' :math:`\varepsilon` (``--epsilon``, default 0.0); ``form="authors"``
  only (BalanceBenchmark's hinge has none: a non-zero margin there is a ``ValueError``); must be >= 0.
- ``start_epoch`` 1, ``end_epoch`` 81: BalanceBenchmark's ``modulation_starts <= current_epoch <=
  modulation_ends`` with 0 and 80 over **0-based** epochs, i.e. 1-based epochs 1..81 inclusive.
- ``order`` ``"auto"``: the form's own order: ``"epoch"`` for ``"balancebenchmark"`` (one random
  removal order per epoch, BalanceBenchmark's ``random.shuffle`` in ``train_loop``), ``"sample"``
  for ``"authors"`` (a random order **per example**, drawn afresh every batch, as ``get_multi_mask``
  shuffles ``range(view_num)`` per row for every batch); ``"step"``: one order per step from the step
  key (ours). Any order may be combined with either form.
- ``order_seed`` 0: ours; with ``order="epoch"`` the epoch's order is
  ``jax.random.permutation(fold_in(PRNGKey(order_seed), epoch), M)`` (BalanceBenchmark uses Python's
  global ``random``). ``"step"`` and ``"sample"`` draw from the step key.

Mapping onto our late-fusion model, and every difference from BalanceBenchmark
------------------------------------------------------------------------------
1. **Fusion branches, not ``heads[m]``.** BalanceBenchmark's "unimodal" logits are slices of the
   fused linear layer; ours are the separable fusion head's ``branch_logits`` (:math:`z_m W_m`, no
   bias) and ``s_i`` keeps the whole shared offset, exactly as there. So the model must have a
   separable fusion head (``model.fusion = 'linear'``); otherwise a ``ValueError``. The separate
   unimodal heads ``heads[m]`` are neither used nor trained (``reports_unimodal_heads = False``).
   :math:`s_0` is the model's fused logits ``out["logits"]``; :math:`s_i` subtracts the removed
   branches from it.
2. **Modality order.** Drawn from a seeded JAX key per (``order_seed``, epoch), so it is the same
   for every seed of a vectorised run and reproducible; BalanceBenchmark shuffles with the unseeded
   global ``random`` at the start of each epoch. ``order="step"`` / ``"sample"`` are extensions there.
3. **Padding rows** (``mask`` 0) are left out of every CE (masked means) and of the confidence sums.
4. **Any number of modalities** :math:`M \ge 2` (BalanceBenchmark has branches for 2 and 3 only;
   its divisor is 3 for three modalities and 2 otherwise, :math:`M` here); classification only (the
   confidence is a softmax maximum): ``ValueError`` for regression and for a single modality.
5. **Quirks kept / not kept.** Kept: the confidence gap is summed over the batch *inside* the hinge
   (not a per-example hinge) and is not divided by the batch size; ``conf_loss``'s "trick 1" mask
   ``sign`` (examples the larger model gets right and the smaller gets wrong) is computed but
   **unused** there, so it is not used here either. A gap of exactly 0 gives no gradient (Python
   ``max(0, x)`` returns the constant 0). Not kept: ``training_step`` calls
   ``model.Unimodality_Calculate()``, a name the model at that commit spells ``unimodality_calculate``
   (an ``AttributeError`` as released); we take its evident meaning (the fused layer's per-modality
   slices, the values ``model(batch)`` already computes).
6. Gradient accumulation, Lightning/Fabric hooks and the training-precision bookkeeping of
   ``train_loop`` are the trainer's business here.

The authors' form: every difference between their release and ``form="authors"``
---------------------------------------------------------------------------------
1. **Regulariser** (the formula above) as in ``miwae/train.py``: per-example hinges (``ReLU(...)
   .sum()`` over the batch, not divided by the batch size), "trick 1" gated by the larger model's
   correctness, "trick 2" with ``confidence_list[num].clone().detach()``, :math:`\varepsilon`
   subtracted inside every ReLU (gated-off rows give ``relu(-ε) = 0``). Followed exactly. Padding
   rows are left out (the release has none).
2. **How a modality is removed.** The release's model (``miwae/model.py``, MIWAE: an
   importance-weighted autoencoder that imputes missing features, with a classifier on top) sees
   one flat feature vector per example; a removed view's features are replaced by their training
   mean (``data_mean``) and flagged missing in the mask given to the model. Here a removed modality's
   fusion branch is subtracted from the fused logits (its latent's contribution is zero, the shared
   bias stays), as in the BalanceBenchmark form; the rest of MIWAE (its reconstruction loss, the
   imputation) has no counterpart in a late-fusion classifier.
3. **Removal order per example.** ``get_multi_mask`` draws one order per example per batch with
   Python's ``random.shuffle`` and removes its *first* entries; ``order="sample"`` draws one uniformly
   random order per example per step from the step key and removes from the end of it (the same
   distribution of removed sets).
4. **Weight.** ``beta / 100`` with an integer ``beta`` there; a float ``lam`` here (``lam`` = beta / 100).
   The release also weighs its classification term by an integer ``--alpha`` (default 1), kept at 1.
5. **Schedule.** The release trains 59 epochs (``range(1, 60)``), the first 29 on its reconstruction
   loss alone and the rest (``ep >= 30``) on reconstruction + classification + rank loss, with
   Adam 1e-2 then 1e-3 after epoch 20 (re-created each epoch); here the window is
   ``start_epoch``..``end_epoch`` (default 1..81) and the optimiser is the trainer's.
6. **The ``cpm/`` path.** ``cpm/CPM_Nets.py`` (``rank_loss``, a CPM-Nets latent model) uses another
   gate, ``sign = ~((pred_{i} == y) & (pred_{i-1} != y))`` (penalise unless the sub-model is right and
   the larger one wrong), no detached term, no margin, and the weight ``belta`` unscaled; it is not
   offered here (on the example above it also gives 0.05).

Step metrics: ``task`` (fused CE), ``ce_sub`` (mean CE of the sub-models), ``conf_loss`` (the summed
:math:`R_i` before :math:`\lambda`), ``conf_gap`` (the summed confidence gaps
:math:`c(s_i) - c(s_{i-1})` before any hinge or gate, per example), ``active`` (1 inside the window)
and ``removed_<m>`` (the fraction of valid rows in which modality ``m`` is removed in this step's
order, i.e. is not the last one kept: 0 or 1 unless ``order="sample"``). The method state is empty:
the epoch is the trainer's (``ModelHandle.epoch``, 1-based).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, current_epoch

DEFAULTS = dict(form="balancebenchmark", lam=0.1, margin=0.0, start_epoch=1, end_epoch=81, order="auto",
                order_seed=0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(lam=[0.03, 0.1, 0.3, 1.0])
FORMS = ("balancebenchmark", "authors")
ORDERS = ("auto", "epoch", "step", "sample")
#: the order ``order="auto"`` means for each form.
AUTO_ORDER = {"balancebenchmark": "epoch", "authors": "sample"}


# ---- the rule ----------------------------------------------------------------------------------
def keep_masks(perm: jax.Array) -> jax.Array:
    """``[M-1, ..., M]`` float: entry ``[i-1, ..., m]`` is 1 when modality ``m`` is still in
    sub-model ``s_i``.

    ``perm`` ``[..., M]`` is the random order (modality indices; one per example for a ``[B, M]``
    ``perm``); step ``i`` removes ``perm[..., M-i]`` (popped from the end), so ``s_i`` keeps the
    modalities at positions ``< M - i`` of the order."""
    m = perm.shape[-1]
    rank = jnp.argsort(perm, axis=-1)  # position of each modality in the order
    steps = jnp.arange(1, m).reshape((m - 1,) + (1,) * perm.ndim)
    return (rank[None] < m - steps).astype(jnp.float32)


def sub_model_logits(fused: jax.Array, branches: jax.Array, keep: jax.Array) -> jax.Array:
    """``[M-1, B, C]``: ``s_i = fused - Σ_{m removed by step i} branches[m]``.

    ``fused`` ``[B, C]``; ``branches`` ``[M, B, C]`` (no bias); ``keep`` ``[M-1, M]`` (one order for
    every row) or ``[M-1, B, M]`` (one per row)."""
    removed = 1.0 - keep
    if removed.ndim == 2:
        return fused[None] - jnp.einsum("im,mbc->ibc", removed, branches)
    return fused[None] - jnp.einsum("ibm,mbc->ibc", removed, branches)


def confidence(logits: jax.Array) -> jax.Array:
    """``max_k softmax(logits)_k`` per row."""
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def confidence_hinges(chain: jax.Array, mask=None) -> tuple[jax.Array, jax.Array]:
    """BalanceBenchmark's form: ``(hinges [M-1], gaps [M-1])`` of the chain ``[M, B, C]`` = ``(s_0,
    s_1, …)``: ``gap_i = Σ_{n valid} (c(s_i)_n - c(s_{i-1})_n)``, ``hinge_i = gap_i if gap_i > 0 else 0``."""
    conf = confidence(chain)  # [M, B]
    diff = conf[1:] - conf[:-1]
    if mask is not None:  # padding rows: left out (even if their logits are not finite)
        diff = jnp.where(mask[None] > 0, diff, 0.0)
    gaps = jnp.sum(diff, axis=1)
    return jnp.where(gaps > 0, gaps, 0.0), gaps


def authors_hinges(chain: jax.Array, labels: jax.Array, mask=None, margin=0.0) -> tuple[jax.Array, jax.Array]:
    """The authors' form (``miwae/train.py``): ``(R [M-1], gaps [M-1])`` of the chain ``[M, B, C]``.

    ``R_i = Σ_n relu((c_i - c_{i-1})·[ŷ_{i-1} = y] - ε) + relu((c_i - sg(c_{i-1}))·[ŷ_i ≠ y ∧ ŷ_{i-1} ≠ y] - ε)``
    over the valid rows (``ε`` = ``margin``); ``gaps_i = Σ_{n valid} (c_i - c_{i-1})`` (ungated)."""
    conf = confidence(chain)  # [M, B]
    right = jnp.argmax(chain, axis=-1) == labels[None]  # [M, B]
    big, small = conf[:-1], conf[1:]
    gate1 = right[:-1].astype(conf.dtype)
    gate2 = (~right[1:] & ~right[:-1]).astype(conf.dtype)
    term1 = jax.nn.relu((small - big) * gate1 - margin)
    term2 = jax.nn.relu((small - jax.lax.stop_gradient(big)) * gate2 - margin)
    per_row, diff = term1 + term2, small - big
    if mask is not None:
        per_row = jnp.where(mask[None] > 0, per_row, 0.0)
        diff = jnp.where(mask[None] > 0, diff, 0.0)
    return jnp.sum(per_row, axis=1), jnp.sum(diff, axis=1)


def cml_loss(task, fused, subs, labels, mask, lam, form="balancebenchmark", margin=0.0):
    """``(loss, ce_full, ce_sub_mean, conf_loss, gap_sum)`` of the rule (``subs`` ``[M-1, B, C]``)."""
    m = subs.shape[0] + 1
    ce_full = task.loss(fused, labels, mask)
    ce_subs = [task.loss(subs[i], labels, mask) for i in range(m - 1)]
    chain = jnp.concatenate([fused[None], subs], 0)
    if form == "authors":
        hinges, gaps = authors_hinges(chain, labels, mask, margin)
    elif form == "balancebenchmark":
        hinges, gaps = confidence_hinges(chain, mask)
    else:
        raise ValueError(f"cml form must be one of {FORMS}; got {form!r}.")
    conf = jnp.sum(hinges)
    loss = (ce_full + sum(ce_subs)) / m + lam * conf
    return loss, ce_full, sum(ce_subs) / (m - 1), conf, jnp.sum(gaps)


class CML(Method):
    """Fused CE plus nested modality-removed sub-models' CE and a confidence-calibration hinge."""

    name = "cml"
    traceable = ("lam",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("the regulariser compares softmax confidences")
        o = self.opts
        if len(self.modalities) < 2:
            raise ValueError(f"cml needs at least two modalities (it removes modalities); got {self.modalities}.")
        if o["form"] not in FORMS:
            raise ValueError(f"method.form must be one of {FORMS} (BalanceBenchmark's rule or the authors' "
                             f"release's); got {o['form']!r}.")
        if o["order"] not in ORDERS:
            raise ValueError(f"method.order must be one of {ORDERS}; got {o['order']!r}.")
        if not float(o["margin"]) >= 0:
            raise ValueError(f"method.margin must be >= 0; got {o['margin']}.")
        if float(o["margin"]) != 0 and o["form"] != "authors":
            raise ValueError(f"method.margin is the authors' form's epsilon; form {o['form']!r} has none "
                             f"(got margin={o['margin']}).")
        #: the removal order actually used ("auto" resolved by the form)
        self.order = AUTO_ORDER[o["form"]] if o["order"] == "auto" else o["order"]
        if float(o["lam"]) < 0:
            raise ValueError(f"method.lam must be >= 0; got {o['lam']}.")
        if int(o["start_epoch"]) > int(o["end_epoch"]):
            raise ValueError(f"method.start_epoch ({o['start_epoch']}) must be <= end_epoch ({o['end_epoch']}).")

    def check_model(self, model) -> None:
        self.require_separable(model, "cml removes modalities by subtracting their fusion branches")

    def removal_order(self, key, epoch, batch_size: int | None = None) -> jax.Array:
        """The order ``perm`` (modality indices; removal pops from its end) of this step (``epoch``:
        the current 1-based epoch, :func:`~mcr_jax.methods.base.current_epoch`): ``[M]``, or
        ``[batch_size, M]`` (one per row) with ``order="sample"``."""
        m = len(self.modalities)
        if self.order == "epoch":
            seed_key = jax.random.PRNGKey(int(self.opts["order_seed"]))
            return jax.random.permutation(jax.random.fold_in(seed_key, epoch), m)
        k = jax.random.fold_in(key, 0x434D4C)
        if self.order == "step":
            return jax.random.permutation(k, m)
        if batch_size is None:
            raise ValueError("order='sample' draws one order per row: removal_order needs batch_size.")
        return jnp.argsort(jax.random.uniform(k, (int(batch_size), m)), axis=-1)  # uniform random orders

    def loss(self, handle, params, batch, key, method_state):
        o = self.opts
        model = handle.train_model(params)
        self.require_separable(model, "cml removes modalities by subtracting their fusion branches")
        out = self.forward(model, batch)
        labels, mask = batch["label"], batch.get("mask")
        fused = out["logits"]
        branch = model.fusion.branch_logits(out["latents"])
        branches = jnp.stack([branch[m] for m in self.modalities], 0)
        epoch = current_epoch(handle)
        perm = self.removal_order(key, epoch, fused.shape[0])
        keep = keep_masks(perm)
        subs = sub_model_logits(fused, branches, keep)
        lam = self.hp("lam", float(o["lam"]))
        cml, ce_full, ce_sub, conf, gap = cml_loss(self.task, fused, subs, labels, mask, lam, o["form"],
                                                   float(o["margin"]))
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        total = jnp.where(active, cml, ce_full)
        n = jnp.maximum(jnp.sum(mask), 1.0) if mask is not None else fused.shape[0]
        metrics = {"task": ce_full, "ce_sub": ce_sub, "conf_loss": conf, "conf_gap": gap / n,
                   "active": active.astype(jnp.float32)}
        last = keep[-1]  # [M] or [B, M]: the modalities kept by the last sub-model
        if last.ndim == 2:  # one order per row: the fraction of valid rows removing each modality
            w = jnp.ones(last.shape[0]) if mask is None else (mask > 0).astype(jnp.float32)
            last = jnp.sum(last * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)
        metrics.update({f"removed_{m}": 1.0 - last[i] for i, m in enumerate(self.modalities)})
        return total, metrics, model
