r"""CML (Calibrating Multimodal Learning): Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, *Calibrating
Multimodal Learning*, ICML 2023 (arXiv 2306.01265).

Code followed
-------------
BalanceBenchmark / BalanceMM (``GeWu-Lab/BalanceBenchmark``, commit
4c1482fca5aaa8d4278af8e26020daa039e3ccf3): ``balancemm/trainer/CML_trainer.py`` (``conf_loss``,
``CMLTrainer.train_loop`` for the per-epoch modality order, ``CMLTrainer.training_step`` for the
loss), the unimodal logits of ``balancemm/models/avclassify_model.py``
(``BaseClassifierModel.unimodality_calculate``: ``u_m = z_m W_m^T + b / M`` with the slice
``W_m`` of the concatenation-fusion layer ``fc_out``) and the defaults in
``configs/trainer_config.yaml`` (``CML``). BalanceMM lists CML among its **objective** methods. The
authors' own release was not available to us (not in the code index); see the differences below.

The rule
--------
Let :math:`\ell = \sum_m z_m W_m + b` be the fused logits of a linear late fusion, :math:`B_m = z_m
W_m` modality :math:`m`'s branch logits, and :math:`\pi` an order of the :math:`M` modalities drawn
at random once per epoch (``random.shuffle`` in ``train_loop``). The modalities are removed one at a
time from the end of the order (``random_dict.pop()``), giving :math:`M-1` nested sub-models

.. math::
   s_0 = \ell, \qquad s_i = s_{i-1} - B_{\pi_{M-i}} \quad (i = 1..M-1)

(the release's ``out_p = out_s - unimodal_result[removed] + fc_out.bias / M``: the removed
modality's ``u_m`` carries ``b / M``, added back, so the shared bias stays whole). With the
confidence :math:`c(s)_n = \max_k \operatorname{softmax}(s_n)_k` and cross-entropy CE,

.. math::
   L = \frac{1}{M}\Big(\mathrm{CE}(s_0, y) + \sum_{i=1}^{M-1} \mathrm{CE}(s_i, y)\Big)
       + \lambda \sum_{i=1}^{M-1} \max\Big(0,\ \sum_{n \in \text{batch}} c(s_i)_n - c(s_{i-1})_n\Big),

i.e. a sub-model with fewer modalities must not be more confident, in total over the batch, than
the one it came from (``conf_loss``: ``max(0, (conf_x - conf).sum())``; CE terms divided by 3 for
three modalities, by 2 otherwise: by :math:`M` here). Gradients flow through every term,
confidences included (nothing is detached). Outside the epochs ``[start_epoch, end_epoch]`` the loss
is the fused CE alone. Prediction is the fused head, unchanged.

Options (``DEFAULTS``) and whom they follow
-------------------------------------------
- ``lam`` 0.1: ``trainer_config.yaml`` ``CML.lam`` (the regulariser's weight :math:`\lambda`;
  ``GRID`` spans it).
- ``start_epoch`` 1, ``end_epoch`` 81: the release's ``modulation_starts <= current_epoch <=
  modulation_ends`` with 0 and 80 over **0-based** epochs, i.e. 1-based epochs 1..81 inclusive.
- ``order`` ``"epoch"``: one random removal order per epoch (the release); ``"step"``: a fresh order
  every step from the step key (ours).
- ``order_seed`` 0: ours; the epoch's order is ``jax.random.permutation(fold_in(PRNGKey(order_seed),
  epoch), M)`` (the release uses Python's global ``random``).

Mapping onto our late-fusion model, and every difference from the release
-------------------------------------------------------------------------
1. **Fusion branches, not ``heads[m]``.** The release's "unimodal" logits are slices of the fused
   linear layer; ours are the separable fusion head's ``branch_logits`` (:math:`z_m W_m`, no bias)
   and ``s_i`` keeps the whole shared offset, exactly as the release. So the model must have a
   separable fusion head (``model.fusion = 'linear'``); otherwise a ``ValueError``. The separate
   unimodal heads ``heads[m]`` are neither used nor trained (``reports_unimodal_heads = False``).
   :math:`s_0` is the model's fused logits ``out["logits"]``; :math:`s_i` subtracts the removed
   branches from it.
2. **Modality order.** Drawn from a seeded JAX key per (``order_seed``, epoch), so it is the same
   for every seed of a vectorised run and reproducible; the release shuffles with the unseeded global
   ``random`` at the start of each epoch. ``order="step"`` is an extension.
3. **Padding rows** (``mask`` 0) are left out of every CE (masked means) and of the confidence sums.
4. **Any number of modalities** :math:`M \ge 2` (the release has branches for 2 and 3 only; its
   divisor is 3 for three modalities and 2 otherwise, :math:`M` here); classification only (the
   confidence is a softmax maximum): ``ValueError`` for regression and for a single modality.
5. **Release quirks kept / not kept.** Kept: the confidence gap is summed over the batch *inside*
   the hinge (not a per-example hinge) and is not divided by the batch size; ``conf_loss``'s
   "trick 1" mask ``sign`` (examples the larger model gets right and the smaller gets wrong) is
   computed but **unused** in the release, so it is not used here either. A gap of exactly 0 gives no
   gradient (Python ``max(0, x)`` returns the constant 0). Not kept: the release's
   ``training_step`` calls ``model.Unimodality_Calculate()``, a name the model at this commit spells
   ``unimodality_calculate`` (an ``AttributeError`` as released); we take its evident meaning (the
   fused layer's per-modality slices, the values ``model(batch)`` already computes).
6. Gradient accumulation, Lightning/Fabric hooks and the training-precision bookkeeping of
   ``train_loop`` are the trainer's business here.

Step metrics: ``task`` (fused CE), ``ce_sub`` (mean CE of the sub-models), ``conf_loss`` (the hinge
sum before :math:`\lambda`), ``conf_gap`` (the summed gaps before the hinge, per example), ``active``
(1 inside the window) and ``removed_<m>`` (1 when modality ``m`` is removed in this step's order,
i.e. is not the last one kept). The method state is empty: the epoch is the trainer's
(``ModelHandle.epoch``, 1-based).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, current_epoch

DEFAULTS = dict(lam=0.1, start_epoch=1, end_epoch=81, order="epoch", order_seed=0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(lam=[0.03, 0.1, 0.3, 1.0])
ORDERS = ("epoch", "step")


# ---- the rule ----------------------------------------------------------------------------------
def keep_masks(perm: jax.Array) -> jax.Array:
    """``[M-1, M]`` float: row ``i-1`` is 1 for the modalities still in sub-model ``s_i``.

    ``perm`` is the random order (modality indices); step ``i`` removes ``perm[M-i]`` (popped from
    the end), so ``s_i`` keeps the modalities at positions ``< M - i`` of the order."""
    m = perm.shape[0]
    rank = jnp.argsort(perm)  # position of each modality in the order
    steps = jnp.arange(1, m)[:, None]
    return (rank[None, :] < m - steps).astype(jnp.float32)


def sub_model_logits(fused: jax.Array, branches: jax.Array, keep: jax.Array) -> jax.Array:
    """``[M-1, B, C]``: ``s_i = fused - Σ_{m removed by step i} branches[m]``.

    ``fused`` ``[B, C]``; ``branches`` ``[M, B, C]`` (no bias); ``keep`` ``[M-1, M]``."""
    removed = 1.0 - keep
    return fused[None] - jnp.einsum("im,mbc->ibc", removed, branches)


def confidence(logits: jax.Array) -> jax.Array:
    """``max_k softmax(logits)_k`` per row."""
    return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def confidence_hinges(chain: jax.Array, mask=None) -> tuple[jax.Array, jax.Array]:
    """``(hinges [M-1], gaps [M-1])`` of the chain ``[M, B, C]`` = ``(s_0, s_1, …)``:
    ``gap_i = Σ_{n valid} (c(s_i)_n - c(s_{i-1})_n)``, ``hinge_i = gap_i if gap_i > 0 else 0``."""
    conf = confidence(chain)  # [M, B]
    diff = conf[1:] - conf[:-1]
    if mask is not None:  # padding rows: left out (even if their logits are not finite)
        diff = jnp.where(mask[None] > 0, diff, 0.0)
    gaps = jnp.sum(diff, axis=1)
    return jnp.where(gaps > 0, gaps, 0.0), gaps


def cml_loss(task, fused, subs, labels, mask, lam):
    """``(loss, ce_full, ce_sub_mean, conf_loss, gap_sum)`` of the rule (``subs`` ``[M-1, B, C]``)."""
    m = subs.shape[0] + 1
    ce_full = task.loss(fused, labels, mask)
    ce_subs = [task.loss(subs[i], labels, mask) for i in range(m - 1)]
    hinges, gaps = confidence_hinges(jnp.concatenate([fused[None], subs], 0), mask)
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
        if o["order"] not in ORDERS:
            raise ValueError(f"method.order must be one of {ORDERS}; got {o['order']!r}.")
        if float(o["lam"]) < 0:
            raise ValueError(f"method.lam must be >= 0; got {o['lam']}.")
        if int(o["start_epoch"]) > int(o["end_epoch"]):
            raise ValueError(f"method.start_epoch ({o['start_epoch']}) must be <= end_epoch ({o['end_epoch']}).")

    def check_model(self, model) -> None:
        self.require_separable(model, "cml removes modalities by subtracting their fusion branches")

    def removal_order(self, key, epoch) -> jax.Array:
        """The order ``perm`` (modality indices; removal pops from its end) of this step (``epoch``:
        the current 1-based epoch, :func:`~mcr_jax.methods.base.current_epoch`)."""
        o = self.opts
        if o["order"] == "step":
            k = jax.random.fold_in(key, 0x434D4C)
        else:
            k = jax.random.fold_in(jax.random.PRNGKey(int(o["order_seed"])), epoch)
        return jax.random.permutation(k, len(self.modalities))

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
        perm = self.removal_order(key, epoch)
        keep = keep_masks(perm)
        subs = sub_model_logits(fused, branches, keep)
        lam = self.hp("lam", float(o["lam"]))
        cml, ce_full, ce_sub, conf, gap = cml_loss(self.task, fused, subs, labels, mask, lam)
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        total = jnp.where(active, cml, ce_full)
        n = jnp.maximum(jnp.sum(mask), 1.0) if mask is not None else fused.shape[0]
        metrics = {"task": ce_full, "ce_sub": ce_sub, "conf_loss": conf, "conf_gap": gap / n,
                   "active": active.astype(jnp.float32)}
        metrics.update({f"removed_{m}": 1.0 - keep[-1, i] for i, m in enumerate(self.modalities)})
        return total, metrics, model
