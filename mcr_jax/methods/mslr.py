r"""MSLR: modality-specific learning rates adapted from unimodal validation accuracy (SPEC.md §8).

Yao & Mihalcea, *Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion*,
Findings of ACL 2022. The loss is the joint (fused) task loss; what changes is the step size of each
modality's parameters.

The rule implemented (the paper's *dynamic* strategy as understood here, with the *keep* strategy's
per-modality starting rates as ``init_lr_multipliers``): after epoch t, with :math:`a_m(t)` the
validation accuracy of modality m's unimodal prediction and :math:`H_m` the accuracies of the (at
most ``window``) epochs before t,

.. math::
   \mu_m(t+1) = \mu^0_m \cdot \frac{a_m(t)}{\operatorname{mean}(H_m)}

(:math:`\mu_m = \mu^0_m` while there is no history yet, i.e. for epochs 1 and 2). A modality that
is still improving on validation gets a larger learning rate, one that stalls or degrades (over-
fits) a smaller one. A non-finite accuracy or a non-positive mean leaves that modality's ratio at 1.

The multipliers are **learning rates**: the optimizer's *updates* of modality m's parameters
(``encoders[m]``, ``heads[m]``, linear-fusion branch ``W_m``) are multiplied by :math:`\mu_m` after
the configured optimizer (:func:`modality_lr`, fed through ``tx_kwargs["lr_multipliers"]``);
scaling the gradients instead would be undone by Adam's normalisation. Shared parameters (the fusion
bias, non-separable fusion layers) keep the base rate.

Which "unimodal accuracy" (``unimodal_source``):

- ``"branch"`` — the paper's setting, additive late fusion: modality m's own prediction is its
  branch of the fused output, :math:`z_m W_m + b/M` (needs linear late fusion). :meth:`MSLR.predict`
  then reports these as the unimodal outputs, so the validation metrics of head m (and the
  reported unimodal numbers of this method) are the branch's.
- ``"probe"`` — for other fusion heads: the unimodal heads are trained as linear probes on
  ``stop_gradient`` latents (their loss reaches neither the encoders nor the fusion head).
- ``"auto"`` (default): ``"branch"`` with linear late fusion, else ``"probe"``.

Either way the unimodal outputs are meaningful, so the method reports them
(``reports_unimodal_heads = True``) and :meth:`MSLR.on_epoch_end` reads them from the validation
metrics.

Config (``method`` section): ``window`` (20 epochs), ``metric`` (``""``: ``accuracy`` for
classification, ``binary_accuracy`` for regression), ``unimodal_source`` (``"auto"``),
``init_lr_multipliers`` (``{}``: 1.0 for every modality; e.g. ``{"audio": 1.0, "video": 0.1}``).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax.methods.base import Method, task_loss, unimodal_losses
from mcr_jax.methods.common import check_options, modality_owners
from mcr_jax.models import LinearLateFusion

DEFAULTS = dict(window=20, metric="", unimodal_source="auto", init_lr_multipliers={})
SOURCES = ("auto", "branch", "probe")
OWNED = ("encoders", "heads", "branches")


class ModalityLRState(NamedTuple):
    """State of :func:`modality_lr`: the inner optimizer's state only."""

    inner_state: optax.OptState


def modality_lr(inner: optax.GradientTransformation, owners: Any) -> optax.GradientTransformationExtraArgs:
    """Per-modality learning rates: the inner optimizer's updates of modality ``i``'s leaves times
    ``lr_multipliers[i]``.

    ``update(grads, state, params, *, lr_multipliers, **extra)``; ``owners`` is a pytree like the
    parameters with int leaves (the modality index, -1 for shared leaves, which are not scaled).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return ModalityLRState(inner_state=inner.init(params))

    def update_fn(updates, state, params=None, *, lr_multipliers=None, **extra_args):
        if lr_multipliers is None:
            raise ValueError("modality_lr.update needs lr_multipliers=: one learning-rate multiplier per modality.")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        mult = jnp.asarray(lr_multipliers)
        new_updates = jax.tree.map(lambda u, o: u * mult[o].astype(u.dtype) if o >= 0 else u, new_updates, owners)
        return new_updates, ModalityLRState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mslr_multipliers(acc, history, count: int, window: int, base) -> np.ndarray:
    """The next multipliers ``[M]`` from this epoch's accuracies ``acc [M]`` and the rolling
    ``history [window, M]`` (newest row last; its last ``min(count, window)`` rows are filled)."""
    acc, base = np.asarray(acc, np.float64), np.asarray(base, np.float64)
    n = min(int(count), int(window))
    ratio = np.ones_like(acc)
    if n > 0:
        prev = np.asarray(history, np.float64)[-n:]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its ratio stays 1
            mean = np.nanmean(np.where(np.isfinite(prev), prev, np.nan), axis=0)
            cand = acc / mean
        ratio = np.where(np.isfinite(cand) & (mean > 0), cand, 1.0)
    return base * ratio


class MSLR(Method):
    """MSLR (see the module docstring). Classification or regression, any fusion, any M >= 2."""

    name = "mslr"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        self.opts = check_options(config, DEFAULTS, "MSLR")
        o = self.opts
        if int(o["window"]) < 1:
            raise ValueError(f"method.window must be >= 1 epoch; got {o['window']}.")
        if o["unimodal_source"] not in SOURCES:
            raise ValueError(f"method.unimodal_source must be one of {SOURCES}; got {o['unimodal_source']!r}.")
        init = dict(o["init_lr_multipliers"] or {})
        unknown = set(init) - set(self.modalities)
        if unknown:
            raise ValueError(f"method.init_lr_multipliers names unknown modalities {sorted(unknown)}; "
                             f"the modalities are {list(self.modalities)}.")
        self.base = np.asarray([float(init.get(m, 1.0)) for m in self.modalities], np.float32)
        if np.any(self.base <= 0):
            raise ValueError(f"method.init_lr_multipliers must be > 0; got {init}.")
        self.metric = o["metric"] or ("binary_accuracy" if self.task == "regression" else "accuracy")

    def _source(self, model) -> str:
        src = self.opts["unimodal_source"]
        if src == "auto":
            return "branch" if isinstance(model.fusion, LinearLateFusion) else "probe"
        return src

    def check_model(self, model) -> None:
        if self._source(model) == "branch" and not isinstance(model.fusion, LinearLateFusion):
            raise ValueError("MSLR with unimodal_source='branch' needs linear late fusion (model.fusion = 'linear'); "
                             f"got {type(model.fusion).__name__}. Use unimodal_source='probe' or 'auto'.")

    def make_optimizer(self, base, params):
        return modality_lr(base, modality_owners(params, self.modalities, OWNED))

    def init_method_state(self, params):
        m, w = len(self.modalities), int(self.opts["window"])
        return {"multipliers": jnp.asarray(self.base), "history": jnp.zeros((w, m), jnp.float32),
                "count": jnp.zeros((), jnp.int32)}

    # ---- inside jit --------------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = task_loss(out["logits"], batch["label"], batch.get("mask"), self.task)
        if self._source(model) == "branch":
            return fused, {"task": fused}, model
        probe = {"unimodal": model.unimodal_logits(jax.lax.stop_gradient(out["latents"]))}
        uni = unimodal_losses(probe, batch, self.task, self.modalities)
        return fused + sum(uni.values()), {"task": fused, **{f"probe_{m}": v for m, v in uni.items()}}, model

    def gradients(self, handle, params, batch, key, method_state):
        grads, _, new_rest, _, metrics = super().gradients(handle, params, batch, key, method_state)
        mult = method_state["multipliers"]
        metrics = dict(metrics, **{f"lr_mult_{m}": mult[i] for i, m in enumerate(self.modalities)})
        return grads, {"lr_multipliers": mult}, new_rest, method_state, metrics

    def predict(self, model, batch):
        out = self.forward(model, batch)
        unimodal = out["unimodal"]
        if self._source(model) == "branch":
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.bias[...][None] / len(self.modalities)
            unimodal = {m: branches[m] + shared for m in self.modalities}
        return {"logits": out["logits"], "unimodal": unimodal, "latents": out["latents"]}

    # ---- host hook ---------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        acc = np.asarray([float(val_metrics["heads"][m][self.metric]) for m in self.modalities], np.float64)
        history = np.asarray(method_state["history"], np.float32)
        count = int(method_state["count"])
        mult = mslr_multipliers(acc, history, count, int(self.opts["window"]), self.base)
        history = np.concatenate([history[1:], acc[None].astype(np.float32)], axis=0)
        return {"multipliers": jnp.asarray(mult, jnp.float32), "history": jnp.asarray(history, jnp.float32),
                "count": jnp.asarray(count + 1, jnp.int32)}


__all__ = ["MSLR", "modality_lr", "mslr_multipliers"]
