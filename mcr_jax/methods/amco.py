r"""AMCo: adaptive mask co-optimisation (mask the dependent modality's branch logits).

Paper: Zhou, Liang, Zheng, Xuan, Kumada, *Adaptive Mask Co-Optimization for Modal Dependence in
Multimodal Learning*, ICASSP 2023 (no official code release is linked; the paper's title and authors
are cited from memory: BalanceMM's README lists "AMCo" among its feed-forward methods without a
reference). Released code followed: BalanceMM / BalanceBenchmark, ``GeWu-Lab/BalanceBenchmark`` at
commit ``4c1482fca5aaa8d4278af8e26020daa039e3ccf3``: ``balancemm/trainer/AMCo_trainer.py``
(``AMCoTrainer.train_loop``: the mask schedule; ``AMCoTrainer.training_step``: the losses and the
dependence test), ``balancemm/models/avclassify_model.py`` (``BaseClassifierAMCoModel.forward`` and
``.unimodality_calculate``: the masked branch logits), ``configs/trainer_config.yaml`` (``AMCo``) and
``configs/model_config.yaml`` (``BaseClassifier_AMCo``: concat fusion). BalanceMM's group: **feed-forward**.

The rule
--------
Per-modality branch logits of the (linear, separable) fusion head, the shared bias split evenly,
:math:`u_m = z_m W_m + b / M` (``unimodality_calculate``, concat fusion). Within an epoch (0-based
epoch ``e`` as in BalanceMM, batch ``k`` = 0, 1, … of that epoch) the masking ratio is

.. math::
   p = \sin\Big(\frac{\pi}{2}\,\frac{\min(\varepsilon, l)}{\varepsilon}\Big), \qquad l = k\,e / 10

(``l_t`` starts at 0 every epoch and grows by ``current_epoch / 10`` per batch: the whole first epoch
has p = 0, later epochs reach p = 1 after ⌈3/e⌉ batches with ε = 0.3). A class mask
:math:`\mu \in \{0,1\}^C` with :math:`N = \lfloor pC \rfloor` zeros at uniformly random classes is
drawn per batch (the same for every row). Every modality m flagged *dependent* (see below) has its
branch logits masked, :math:`\tilde u_m = \mu \odot u_m` (else :math:`\tilde u_m = u_m`); the fused
prediction is :math:`\ell = \sum_m \tilde u_m` and, inside the modulation window, the loss is

.. math::
   L = \mathrm{CE}(\ell, y) + \sum_m \mathrm{CE}(\tilde u_m, y)

(``loss.backward(retain_graph=True)`` then one ``loss_uni.backward()`` per modality: the gradients
add). After the step the flags for the *next* batch are recomputed from this batch's (masked) branch
logits: with :math:`\pi = \mathrm{softmax}([\tilde u_1, …, \tilde u_M])` over the M·C concatenated
logits of a row,

.. math::
   \mathrm{dependent}_m = \Big(\frac{1}{B}\sum_i \sum_{c \in m} \pi_{i,c} > \sigma\Big)

(the modality's share of the joint softmax mass). All flags are reset to False at the start of each
epoch. Outside the window the step is plain joint training on :math:`\mathrm{CE}(\ell, y)`.
Evaluation never masks: :meth:`AMCo.predict` is the plain fused prediction.

Options (``DEFAULTS``): BalanceMM's ``trainer_config.yaml`` ``AMCo``: ``sigma`` = 0.5 (σ), ``eps`` =
0.3 (ε), ``modulation_starts`` 0 / ``modulation_ends`` 80 (0-based, inclusive) → here ``start_epoch``
= 1 and ``end_epoch`` = 81 (1-based, inclusive). ``alpha`` (0.1), ``method`` ("None"), ``U`` (512) and
``modality`` (2) are read by the trainer but used nowhere, so they are not options. ``sigma`` and
``eps`` may be traced (study axes).

Mapping onto our models and differences from BalanceMM
--------------------------------------------------------
- **Branches**: the release's unimodal logits are the slices of its concat-fusion ``fc_out``
  (:math:`z_m W_m + b/M`); ours are :meth:`branch_logits` of the separable fusion head plus
  ``shared_offset() / M``. Our separate unimodal heads (``model.heads``) are not used (nor trained),
  so they are not reported. A non-separable fusion head raises ``ValueError``.
- **``linear_star`` left out of the training loss**: ``BaseClassifierAMCoModel.forward`` passes the
  summed (masked) logits through an extra C×C ``nn.Linear`` (``linear_star``), and the training step's
  fused cross-entropy reads that output. The prediction does not: evaluation
  (``BaseClassifierModel.validation_step``) calls ``forward`` and then ``unimodality_calculate()``
  again, which (with no mask and no dependent modality) overwrites ``unimodal_result['output']`` with
  the plain sum of the branch logits — so the release predicts from the plain sum, as this port does,
  and ``linear_star`` affects only the training loss (and is trained by it alone). Our models have no
  such layer and a method cannot add parameters: here the fused loss is taken on the plain sum too,
  so the training dynamics differ from the release in that one term (the branch losses do not pass
  through ``linear_star`` there either).
- **The mask's shape**: the trainer builds the mask as ``mask_t.unsqueeze(0).expand(2, -1)``, shape
  ``[2, C]`` (two identical rows), and passes it to the model, which multiplies it with ``[B, C]``
  branch logits. On one GPU this broadcasts only for batches of 1 or 2 rows and raises a size error
  otherwise, i.e. as soon as a modality is flagged dependent (with M = 2 and σ = 0.5 one always is
  after the first window batch). On two GPUs (Fabric's default ``strategy: "dp"``) the data-parallel
  wrapper scatters every tensor argument along its first axis, so each device receives one ``[1, C]``
  row — the same class mask — which broadcasts over that device's rows: there it works as intended.
  That intent, one class mask for every row, is what is implemented here on any number of devices.
- **Float precision of N**: :math:`\lfloor pC \rfloor` is computed in float32 here, in float64 in the
  release; on an exact boundary (e.g. :math:`\sin(\pi/6) C` with C even) the two may differ by one.
  ``l`` is :math:`k e / 10` here, an accumulated float sum there (equal up to rounding).
- **Batch index** ``k`` counts this library's steps within an epoch (the trainer's batches);
  gradient accumulation (release ``grad_accum_steps``) does not exist here.
- **M > 2**: the rule is written for any M (the release's loops are too); σ is then compared with a
  share whose uniform value is 1/M, so a smaller σ than 0.5 may suit it.
- **Padding rows** are left out of the losses and of the dependence share (mean over valid rows).
- **Random draws**: JAX's generator from the step key (the release: ``np.random.shuffle``): the same
  distribution (a uniformly random subset of N classes).
- **Optimizer / schedule**: the trainer's.
- **Classification only** (cross-entropy on class logits and class masks): ``ValueError`` otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, current_epoch
from mcr_jax.state import StepOutput

DEFAULTS = dict(sigma=0.5, eps=0.3, start_epoch=1, end_epoch=81)
#: the tuning grid of a study (mcr_jax.study): the dependence threshold σ around BalanceMM's 0.5.
GRID = dict(sigma=[0.5, 0.6, 0.7, 0.8])

# ----------------------------------------------------------------------------------------------
# The rule.


def mask_ratio(batch_index, epoch0, eps):
    """``p = sin(π/2 · min(ε, k e / 10) / ε)`` (``epoch0``: the 0-based epoch, ``batch_index``: k)."""
    level = jnp.asarray(batch_index, jnp.float32) * jnp.asarray(epoch0, jnp.float32) / 10.0
    return jnp.sin(math.pi / 2 * jnp.minimum(eps, level) / eps)


def class_mask(key, ratio, num_classes: int):
    """``[C]`` float mask with ``floor(ratio · C)`` zeros at uniformly random classes."""
    n_zero = jnp.floor(ratio * num_classes).astype(jnp.int32)
    ranks = jnp.argsort(jax.random.permutation(key, num_classes))  # a uniformly random rank per class
    return (ranks < num_classes - n_zero).astype(jnp.float32)


def dependence_shares(branch_logits, valid):
    """``[M]``: each modality's share of the softmax over the concatenated branch logits, averaged
    over the valid rows (``branch_logits``: list of ``[B, C]``; ``valid``: ``[B]`` 0/1)."""
    num_classes = branch_logits[0].shape[-1]
    probs = jax.nn.softmax(jnp.concatenate(branch_logits, axis=-1), axis=-1)
    per_mod = probs.reshape(probs.shape[0], len(branch_logits), num_classes).sum(-1)  # [B, M]
    return jnp.sum(per_mod * valid[:, None], axis=0) / jnp.maximum(jnp.sum(valid), 1.0)


class AMCo(Method):
    """AMCo (see the module docstring). Classification with a separable fusion head, any M >= 2."""

    name = "amco"
    reports_unimodal_heads = False
    traceable = ("sigma", "eps")

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("it masks class logits and trains them with cross-entropy")
        if len(self.modalities) < 2:
            raise ValueError(f"amco needs at least two modalities; got {list(self.modalities)}.")
        o = self.opts
        if not float(o["eps"]) > 0:
            raise ValueError(f"method.eps must be > 0 (the ramp length of the mask ratio); got {o['eps']}.")
        if not 0.0 <= float(o["sigma"]) <= 1.0:
            raise ValueError(f"method.sigma is a softmax share in [0, 1]; got {o['sigma']}.")
        if int(o["start_epoch"]) < 1 or int(o["end_epoch"]) < int(o["start_epoch"]):
            raise ValueError(f"method.start_epoch / end_epoch are 1-based with start <= end; got "
                             f"{o['start_epoch']} / {o['end_epoch']}.")

    def check_model(self, model) -> None:
        self.require_separable(model, "it masks each modality's branch z_m W_m + b/M of the fused prediction")

    def init_method_state(self, params, rest=None):
        return {"step": jnp.zeros((), jnp.int32),
                "dependent": jnp.zeros((len(self.modalities),), jnp.int32)}

    def _step(self, handle, params, batch, key, method_state):
        names, labels, mask = self.modalities, batch["label"], batch.get("mask")
        num, o = len(names), self.opts
        model = handle.train_model(params)
        out = self.forward(model, batch)
        batch_size = labels.shape[0]
        valid = jnp.ones((batch_size,), jnp.float32) if mask is None else mask.astype(jnp.float32)
        epoch = current_epoch(handle)
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        sigma, eps = self.hp("sigma", float(o["sigma"])), self.hp("eps", float(o["eps"]))
        ratio = mask_ratio(method_state["step"], epoch - 1, eps)
        cmask = class_mask(key, ratio, self.info.num_classes)
        dependent = (method_state["dependent"] > 0) & active
        fusion = model.fusion
        branches = fusion.branch_logits(out["latents"])
        shared = fusion.shared_offset()[None] / num
        masked = [jnp.where(dependent[i], (branches[m] + shared) * cmask[None], branches[m] + shared)
                  for i, m in enumerate(names)]
        fused = masked[0]
        for u in masked[1:]:
            fused = fused + u
        logits = jnp.where(active, fused, out["logits"])
        task = self.task.loss(logits, labels, valid)
        uni = {m: self.task.loss(masked[i], labels, valid) for i, m in enumerate(names)}
        total = task + jnp.where(active, sum(uni.values()), 0.0)
        shares = dependence_shares([jax.lax.stop_gradient(u) for u in masked], valid)
        new_dep = jnp.where(active, (shares > sigma).astype(jnp.int32), method_state["dependent"])
        new_state = {"step": method_state["step"] + 1, "dependent": new_dep}
        metrics = {"task": task, "mask_ratio": jnp.where(active, ratio, 0.0),
                   "masked_classes": jnp.where(active, self.info.num_classes - jnp.sum(cmask), 0.0),
                   **{f"uni_{m}": uni[m] for m in names},
                   **{f"dependent_{m}": dependent[i].astype(jnp.float32) for i, m in enumerate(names)},
                   **{f"share_{m}": shares[i] for i, m in enumerate(names)}}
        return total, metrics, model, new_state

    def loss(self, handle, params, batch, key, method_state):
        total, metrics, model, _ = self._step(handle, params, batch, key, method_state)
        return total, metrics, model

    def gradients(self, handle, params, batch, key, method_state):
        def fn(p):
            total, metrics, model, new_state = self._step(handle, p, batch, key, method_state)
            return total, (metrics, handle.rest_of(model), new_state)

        (loss, (metrics, rest, new_state)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        return StepOutput(grads, {}, rest, jax.lax.stop_gradient(new_state), dict(metrics, loss=loss))

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """The next epoch starts at batch 0 with no modality flagged dependent."""
        return {"step": jnp.zeros((), jnp.int32),
                "dependent": jnp.zeros((len(self.modalities),), jnp.int32)}
