r"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement.

Peng, Wei, Deng, Wang, Hu, *Balanced Multimodal Learning via On-the-fly Gradient Modulation*,
CVPR 2022. The loss is the joint (fused) cross-entropy; only the gradients are edited.

Per step, with linear late fusion :math:`\ell = \sum_m z_m W_m + b`, every modality's branch of the
fused prediction gives a score summed over the (valid rows of the) batch,

.. math::
   s_m = \sum_i \mathrm{softmax}\big(z_{m,i} W_m + b / M\big)_{y_i},

the discrepancy ratio :math:`\rho_m = s_m / \bar s_{-m}` with :math:`\bar s_{-m}` the mean score of
the other modalities (for M = 2 this is the paper's :math:`s_a / s_v`), and the coefficient

.. math::
   k_m = 1 - \tanh(\alpha \rho_m) \;\text{ if } \rho_m > 1, \qquad k_m = 1 \text{ otherwise}.

Inside the modulation window every modulated parameter tensor's gradient becomes
:math:`k_m g + \epsilon`, :math:`\epsilon \sim \mathcal N\big(0, (\mathrm{std}(g) + 10^{-8})^2\big)`
(GE: Gaussian noise whose standard deviation is that of the tensor's own, unmodulated gradient —
the unbiased, N − 1 estimate, as ``torch.Tensor.std`` — plus 1e-8). Outside the window the
gradients are the plain joint gradients (no scaling, no noise).

The released code
-----------------
``GeWu-Lab/OGM-GE_CVPR2022``, ``main.py``, ``train_epoch`` (the paper's CREMA-D/VGGSound/AVE
script; read at commit 343dc1d, the newest snapshot). What it does per step, and how this module
follows it:

- ``loss = criterion(out, label)``; ``loss.backward()``: the joint cross-entropy on the fused
  logits. Same here.
- For concat fusion, ``out_a = a · fc_out.weight[:, :D]ᵀ + fc_out.bias / 2`` and likewise ``out_v``
  from the second half of the weight: our branch logits ``z_m W_m + b / M``.
- ``score_v = sum(softmax(out_v)[i][label[i]])`` over the batch, ``ratio_v = score_v / score_a``,
  ``ratio_a = 1 / ratio_v``; ``if ratio_v > 1: coeff_v = 1 - tanh(alpha * relu(ratio_v)); coeff_a =
  1`` ``else: coeff_a = 1 - tanh(alpha * relu(ratio_a)); coeff_v = 1`` (Eq. 10 of the paper).
- ``if args.modulation_starts <= epoch <= args.modulation_ends``: for every parameter whose
  top-level module name contains ``'audio'`` (resp. ``'visual'``) **and whose gradient is 4-D**
  (``len(parms.grad.size()) == 4``: the convolution kernels of the ResNet-18 encoders; batch-norm
  parameters, the fusion layer and anything else are left alone), ``parms.grad = parms.grad *
  coeff + torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)`` (``OGM_GE``), or
  ``parms.grad *= coeff`` (``OGM``). The noise is added to both modalities' kernels, also where the
  coefficient is 1.
- ``for epoch in range(args.epochs)``: epochs are **0-based** there, and ``--modulation_starts 0
  --modulation_ends 50`` (the defaults, also the README's "default modulation setting") modulate
  epochs 0, 1, …, 50: **51 epochs**, both ends inclusive.
- ``--alpha`` is required; the README recommends 0.8 for CREMA-D and 0.1 for VGGSound (and its
  default setting line uses 0.1). SGD with momentum 0.9, weight decay 1e-4.

Options (``method`` section) and their defaults
-----------------------------------------------
- ``alpha`` = 1.0: the value the MCR authors used for this baseline (the task's reference value),
  **not** the OGM-GE authors' CREMA-D value 0.8.
- ``start_epoch`` = 1, ``end_epoch`` = 51: the window in the trainer's **1-based** epoch count, both
  inclusive (the step reads the trainer's epoch, ``ModelHandle.epoch``: 1 during the first
  epoch). 1 … 51 are exactly the original's 0-based epochs 0 … 50.
- ``ge`` = True (``False``: plain OGM, the original's ``--modulation OGM``).
- ``modulate`` — which gradients are scaled (and noised):

  - ``"auto"`` (default): **per encoder**, the leaves of ``encoders[m]`` with ``ndim >= 4``
    (convolution kernels) when that encoder has any such leaf — the original's rule for its CNN
    encoders — and otherwise every leaf of ``encoders[m]`` (MLP or transformer encoders have no
    convolution kernel; modulating none of their parameters would disable the method).
  - ``"conv_kernels"``: only leaves of ``encoders[m]`` with ``ndim >= 4``, always (the original's
    rule; an encoder with no such leaf is refused by :meth:`OGMGE.check_model`).
  - ``"encoder"``: every leaf of ``encoders[m]`` (the paper's wording, "the encoder φ^u").
  - ``"encoder_and_branch"``: every leaf of ``encoders[m]`` and modality m's fusion branch ``W_m``.

  The shared fusion bias and the unimodal heads (which get no gradient from the joint loss) are
  never touched.

Remaining differences from the released code
--------------------------------------------
- **M > 2**: :math:`\rho_m` compares modality m with the *mean* of the others' scores, so several
  modalities can be slowed at once; for M = 2 this is the original's rule.
- **Ties**: for exactly equal scores (``ratio_v == 1``) the original slows the *audio* (first)
  encoder by 1 − tanh(α); here no modality is slowed (ρ > 1 is required). Only exact float ties.
- **Padding rows**: a batch mask (the trainer's padded final batch) removes padded rows from the
  scores and the loss; the original has no padding.
- **Noise draws**: one standard-normal draw per step, cut into the modulated tensors (the original
  draws per tensor with PyTorch's generator); same distribution. A one-element tensor has no
  unbiased std (PyTorch gives NaN); here its noise std is 1e-8.
- **Which tensors**: the original selects by module name (``audio_net`` / ``visual_net``); here by
  the model's ``encoders[m]`` subtree. With ``modulate="auto"`` an encoder without convolution
  kernels gets all its leaves modulated (the original has no such encoder).
- **Optimizer**: the trainer's configured optimizer (the synthetic configs use Adam, which largely
  normalises away a scale that stays constant over many steps; the original used SGD with
  momentum), whereas the GE noise acts either way.
- Classification only (the score is a softmax probability of the true class), and linear late
  fusion only (the score needs the separable branch :math:`z_m W_m`): both raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mcr_jax.methods.base import Method, current_epoch
from mcr_jax.methods.common import others_mean, true_class_prob
from mcr_jax.players import modality_owners
from mcr_jax.state import StepOutput

DEFAULTS = dict(alpha=1.0, start_epoch=1, end_epoch=51, ge=True, modulate="auto")
#: the tuning grid of a study (mcr_jax.study); 0.1 / 0.8 / 1.0 are the published values.
GRID = dict(alpha=[0.1, 0.3, 0.8, 1.0])
MODULATE = ("auto", "conv_kernels", "encoder", "encoder_and_branch")

# ----------------------------------------------------------------------------------------------
# The rule.


def ogm_ratios(scores: jax.Array) -> jax.Array:
    """``ρ_m = s_m / mean_{j≠m} s_j`` for scores ``[M]`` (the denominator floored at 1e-12)."""
    return scores / jnp.maximum(others_mean(scores), 1e-12)


def ogm_coefficients(scores: jax.Array, alpha: float) -> jax.Array:
    """``k_m = 1 − tanh(α ρ_m)`` where ``ρ_m > 1``, else 1 (``[M]``)."""
    rho = ogm_ratios(scores)
    return jnp.where(rho > 1.0, 1.0 - jnp.tanh(alpha * rho), 1.0)


def modulated_owners(params, modalities: Sequence[str], modulate: str):
    """A pytree like ``params`` with int leaves: ``i`` where the gradient is modulated with modality
    ``modalities[i]``'s coefficient, ``-1`` elsewhere (see ``modulate`` in the module docstring).

    Decided from the leaves' shapes only, so it is static under ``jax.jit``."""
    if modulate not in MODULATE:
        raise ValueError(f"method.modulate must be one of {list(MODULATE)}; got {modulate!r}.")
    parts = ("encoders", "branches") if modulate == "encoder_and_branch" else ("encoders",)
    owners = modality_owners(params, modalities, parts)
    if modulate in ("encoder", "encoder_and_branch"):
        return owners
    conv = [False] * len(modalities)
    for leaf, own in zip(jax.tree.leaves(params), jax.tree.leaves(owners), strict=True):
        if own >= 0 and jnp.ndim(leaf) >= 4:
            conv[own] = True

    def pick(leaf, own):
        if own < 0 or jnp.ndim(leaf) >= 4:
            return own
        return own if (modulate == "auto" and not conv[own]) else -1

    return jax.tree.map(pick, params, owners)


def ge_noise(key: jax.Array, grads, owners):
    """``N(0, (std(g) + 1e-8)²)`` noise for every leaf with ``owner >= 0`` (zeros elsewhere).

    ``std`` is the unbiased estimate over the tensor's entries (``torch.Tensor.std``); one standard
    normal draw for all modulated entries, cut into the leaves (one RNG op, cheap to compile)."""
    leaves, treedef = jax.tree.flatten(grads)
    owns = jax.tree.leaves(owners)
    total = sum(int(g.size) for g, o in zip(leaves, owns, strict=True) if o >= 0)
    draw = jax.random.normal(key, (max(total, 1),), jnp.float32)
    out, start = [], 0
    for g, o in zip(leaves, owns, strict=True):
        if o < 0:
            out.append(jnp.zeros_like(g))
            continue
        std = jnp.std(g, ddof=1) if g.size > 1 else jnp.zeros((), g.dtype)
        out.append(((std + 1e-8) * draw[start:start + g.size].reshape(g.shape)).astype(g.dtype))
        start += int(g.size)
    return jax.tree.unflatten(treedef, out)


class OGMGE(Method):
    """OGM-GE (see the module docstring). Classification with linear late fusion, any M >= 2."""

    name = "ogm_ge"
    reports_unimodal_heads = False
    traceable = ("alpha",)

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("its score is the softmax probability of the true class")
        if self.opts["modulate"] not in MODULATE:
            raise ValueError(f"method.modulate must be one of {list(MODULATE)}; got {self.opts['modulate']!r}.")
        if float(self.opts["alpha"]) < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.opts['alpha']}.")

    def check_model(self, model) -> None:
        self.require_separable(model, "its per-modality score is the fused prediction's branch z_m W_m + b/M")
        if self.opts["modulate"] == "conv_kernels":
            params = nnx.as_pure(nnx.state(model, nnx.Param))
            owners = modulated_owners(params, self.modalities, "conv_kernels")
            found = set(o for o in jax.tree.leaves(owners) if o >= 0)
            missing = [m for i, m in enumerate(self.modalities) if i not in found]
            if missing:
                raise ValueError(f"method.modulate='conv_kernels' modulates only parameters with ndim >= 4 "
                                 f"(convolution kernels), but the encoders of {missing} have none; use "
                                 "modulate='auto' (every parameter of such an encoder) or 'encoder'.")

    def gradients(self, handle, params, batch, key, method_state):
        names, labels, mask = self.modalities, batch["label"], batch.get("mask")
        num = len(names)

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            loss = self.task.loss(out["logits"], labels, mask)
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.shared_offset()[None] / num
            weights = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
            scores = jnp.stack([jnp.sum(true_class_prob(branches[m] + shared, labels) * weights) for m in names])
            return loss, (jax.lax.stop_gradient(scores), handle.rest_of(model))

        (loss, (scores, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        o = self.opts
        epoch = current_epoch(handle)
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        coeffs = jnp.where(active, ogm_coefficients(scores, self.hp("alpha", float(o["alpha"]))), 1.0)
        owners = modulated_owners(params, names, o["modulate"])
        noise = ge_noise(key, grads, owners) if o["ge"] else None

        def modulate(g, own, eps):
            if own < 0:
                return g
            out = g * coeffs[own].astype(g.dtype)
            if eps is not None:  # GE: in the window only, also where k_m = 1
                out = out + jnp.where(active, eps, jnp.zeros_like(eps))
            return out

        new_grads = (jax.tree.map(modulate, grads, owners, noise) if noise is not None
                     else jax.tree.map(lambda g, own: modulate(g, own, None), grads, owners))
        rho = ogm_ratios(scores)
        metrics = {"task": loss, "loss": loss, **{f"ratio_{m}": rho[i] for i, m in enumerate(names)},
                   **{f"coeff_{m}": coeffs[i] for i, m in enumerate(names)}}
        return StepOutput(new_grads, {}, new_rest, method_state, metrics)
