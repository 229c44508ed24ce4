r"""MSLR: modality-specific learning rates adapted from unimodal validation accuracy.

Yao & Mihalcea, *Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion*,
Findings of ACL 2022 (no code released with the paper that we could find). The rule follows the
baseline as the MCR authors released it: ``kkontras/MCR``
``agents/general_agent/helpers/Bias_Infusion.py``, class ``Bias_Infusion_MSLR`` (the same class is
in ``kkontras/MLB``, same path), run from ``run.sh`` with ``--kmepoch 20 --ilr_c 0.7 --ilr_g 1.3``
(CREMA-D) and ``--kmepoch 10 --ilr_c 0.7 --ilr_g 1.3`` (AVE). The loss is the joint (fused) task
loss only; what changes is the step size of each modality's parameters.

The rule: after epoch t, with :math:`a_m(t)` the validation accuracy of modality m's unimodal
prediction and :math:`H_m` the accuracies of the ``window`` epochs before t,

.. math::
   \mu_m(t+1) = \mu^0_m \cdot \frac{a_m(t)}{\operatorname{mean}(H_m)}

and :math:`\mu_m = \mu^0_m` (the initial rates, ``init_lr_multipliers``) until ``window`` epochs of
history exist, i.e. for epochs 1 … ``window`` + 1, as in the released code (``on_epoch_begin``
adapts only once ``current_epoch > keep_memory_epoch``). Each epoch's ratio is taken afresh (it
does not compound). A modality still improving on validation gets a larger rate, one that stalls or
over-fits a smaller one. ``partial_window=True`` keeps this module's earlier behaviour: adapt from
epoch 2 on, averaging over the (at most ``window``) epochs available — early ratios over a one- or
two-epoch history can jump by ×1.3–2.

Where the multipliers act (``scale``):

- ``"updates"`` (default) — true learning rates: the optimizer's *updates* of modality m's parameters
  are multiplied by :math:`\mu_m` after the configured optimizer (``optax.chain(optimizer,
  players.scale_by_player(owners))``, fed through ``tx_kwargs["player_scales"]``);
- ``"gradients"`` — the released code's ``param.grad *= coeff`` before the optimizer step. Under
  Adam this is mostly normalised away (what remains acts through the coupled L2 term, added after
  the scaling, and through ``eps``).

Which parameters are modality m's: ``encoders[m]`` and ``heads[m]`` always, and with
``scale_branch=True`` (default) the linear-fusion branch ``W_m`` too. The released code scales the
encoders only (parameter names with ``enc_m`` — its encoders contain their unimodal classifiers —
not ``fc_m_lin``): ``scale_branch=False``. Shared parameters (the fusion bias, non-separable fusion
layers) keep the base rate.

``preset="mcr_authors"`` — the MCR authors' baseline: ``init_lr_multipliers`` 0.7 for the **first**
modality and 1.3 for the second (the released ``init_learning_rate {"c": 0.7, "g": 1.3}``; ``c`` is
``enc_0`` = audio, ``--ilr_c`` "Initial Learning Rate Audio", ``g`` = video; our CREMA-D and AVE
list ``("audio", "video")``, so audio 0.7, video 1.3), ``scale="gradients"``, ``scale_branch=False``.
Two modalities only. The preset sets its options where the config leaves them at their defaults;
an option set to another value wins (so a preset cannot be combined with the default value of one
of its own options: set the options themselves instead); ``window`` is not
part of it (20 in the released CREMA-D run, the default here; 10 for AVE).

Which "unimodal accuracy" (``unimodal_source``):

- ``"branch"`` — additive late fusion, the paper's and the released setting: modality m's own
  prediction is its branch of the fused output, :math:`z_m W_m + b/M` (needs linear late fusion;
  the released model returns ``z_a W_0ᵀ + b/2`` as the unimodal prediction under MSLR, e.g.
  ``kkontras/MLB`` ``models/OGM_Model.py``). :meth:`MSLR.predict` then
  reports these as the unimodal outputs, so the validation metrics of head m (and the reported
  unimodal numbers of this method) are the branch's.
- ``"probe"`` — for other fusion heads (an extension): the unimodal heads are trained as linear
  probes on ``stop_gradient`` latents (their loss reaches neither the encoders nor the fusion head).
- ``"auto"`` (default): ``"branch"`` with linear late fusion, else ``"probe"``.

Either way the unimodal outputs are meaningful, so the method reports them
(``reports_unimodal_heads = True``) and :meth:`MSLR.on_epoch_end` reads them from the validation
metrics.

Remaining differences from the released code:

- Default ``scale="updates"`` and ``scale_branch=True`` (the paper's learning rates of each
  unimodal sub-network); the released choice is the preset / ``scale="gradients"``,
  ``scale_branch=False``.
- Any number of modalities M ≥ 2 (the released class handles two, ``c`` and ``g``), any fusion head
  (``"probe"``), and regression (``metric`` ``binary_accuracy``); the released rule is
  classification accuracy of two additive branches.
- A non-finite accuracy or a non-positive history mean leaves that modality's ratio at 1 (the
  released code divides unguarded).
- The accuracy history is part of the checkpointed method state (the released class keeps it in a
  Python list, ``coeff_memory``); no ``starting_epoch`` / ``ending_epoch`` switch (the released
  defaults 0 / 1500 mean always on).
- The released code reads the latest validation after each epoch (``end_of_epoch_check``); this
  trainer validates once per epoch, which is the same.

Config (``method`` section): ``window`` (20 epochs; the released ``keep_memory_epoch``, whose class
default is 5 and whose runs use 20 for CREMA-D, 10 for AVE), ``partial_window`` (False), ``scale``
(``"updates"``), ``scale_branch`` (True), ``metric`` (``""``: ``accuracy`` for classification,
``binary_accuracy`` for regression), ``unimodal_source`` (``"auto"``), ``init_lr_multipliers``
(``{}``: 1.0 for every modality; a ``{modality: value}`` mapping, e.g. ``{"audio": 0.7, "video":
1.3}``, or one value per modality in order), ``preset`` (``""`` or ``"mcr_authors"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax.methods.base import Method, unimodal_losses
from mcr_jax.models.fusion import is_separable
from mcr_jax.players import modality_owners, scale_by_owner, scale_by_player
from mcr_jax.state import StepOutput

DEFAULTS = dict(window=20, partial_window=False, scale="updates", scale_branch=True, metric="",
                unimodal_source="auto", init_lr_multipliers={}, preset="")
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(window=[2, 5, 10, 20])
SOURCES = ("auto", "branch", "probe")
SCALES = ("updates", "gradients")
#: the released baselines' settings; options set explicitly in the config win.
PRESETS = {"mcr_authors": dict(init_lr_multipliers=(0.7, 1.3), scale="gradients", scale_branch=False)}


def mslr_multipliers(acc, history, count: int, window: int, base, *, partial: bool = False) -> np.ndarray:
    """The next multipliers ``[M]`` from this epoch's accuracies ``acc [M]`` and the rolling
    ``history [window, M]`` (newest row last; its last ``min(count, window)`` rows are filled).

    ``base`` until ``count >= window`` (a full window of history, as the released code), then
    ``base · acc / mean(history)``; ``partial=True`` adapts from ``count >= 1`` on, averaging over the
    rows available."""
    acc, base = np.asarray(acc, np.float64), np.asarray(base, np.float64)
    n = min(int(count), int(window))
    ratio = np.ones_like(acc)
    if n > 0 and (partial or int(count) >= int(window)):
        prev = np.asarray(history, np.float64)[-n:]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its ratio stays 1
            mean = np.nanmean(np.where(np.isfinite(prev), prev, np.nan), axis=0)
            cand = acc / mean
        ratio = np.where(np.isfinite(cand) & (mean > 0), cand, 1.0)
    return base * ratio


def _initial_multipliers(init, modalities) -> np.ndarray:
    """``init_lr_multipliers`` as ``[M]``: a ``{modality: value}`` mapping (others 1.0) or one value
    per modality, in order."""
    names = list(modalities)
    if isinstance(init, Mapping) or hasattr(init, "keys"):
        init = dict(init)
        unknown = set(init) - set(names)
        if unknown:
            raise ValueError(f"method.init_lr_multipliers names unknown modalities {sorted(unknown)}; "
                             f"the modalities are {names}.")
        base = [float(init.get(m, 1.0)) for m in names]
    else:
        base = [float(v) for v in init]
        if len(base) != len(names):
            raise ValueError(f"method.init_lr_multipliers as a sequence needs one value per modality "
                             f"({len(names)}: {names}); got {len(base)}: {base}.")
    base = np.asarray(base, np.float32)
    if np.any(~np.isfinite(base)) or np.any(base <= 0):
        raise ValueError(f"method.init_lr_multipliers must be finite and > 0; got {init}.")
    return base


class MSLR(Method):
    """MSLR (see the module docstring). Classification or regression, any fusion, any M >= 2."""

    name = "mslr"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        if o["preset"]:
            if o["preset"] not in PRESETS:
                raise ValueError(f"method.preset must be '' or one of {sorted(PRESETS)}; got {o['preset']!r}.")
            if len(self.modalities) != 2:
                raise ValueError(f"method.preset={o['preset']!r} is the released two-modality baseline (first "
                                 f"modality 0.7, second 1.3); got {len(self.modalities)} modalities "
                                 f"{list(self.modalities)}. Set init_lr_multipliers instead.")
            # a config section holds every option (the experiment configs start from DEFAULTS), so an
            # option at its default is one the config leaves to the preset
            o.update({k: v for k, v in PRESETS[o["preset"]].items() if o[k] == DEFAULTS[k]})
        if int(o["window"]) < 1:
            raise ValueError(f"method.window must be >= 1 epoch; got {o['window']}.")
        if o["unimodal_source"] not in SOURCES:
            raise ValueError(f"method.unimodal_source must be one of {SOURCES}; got {o['unimodal_source']!r}.")
        if o["scale"] not in SCALES:
            raise ValueError(f"method.scale must be one of {SCALES}; got {o['scale']!r}.")
        for flag in ("partial_window", "scale_branch"):
            if not isinstance(o[flag], bool):
                raise ValueError(f"method.{flag} must be True or False; got {o[flag]!r}.")
        self.base = _initial_multipliers(o["init_lr_multipliers"] or {}, self.modalities)
        self.owned = ("encoders", "heads", "branches") if o["scale_branch"] else ("encoders", "heads")
        self.metric = o["metric"] or self.task.balance_metric

    def _source(self, model) -> str:
        src = self.opts["unimodal_source"]
        if src == "auto":
            return "branch" if is_separable(model.fusion) else "probe"
        return src

    def check_model(self, model) -> None:
        if self._source(model) == "branch" and not is_separable(model.fusion):
            raise ValueError("MSLR with unimodal_source='branch' needs a separable fusion head (e.g. model.fusion = "
                             "'linear'); "
                             f"got {type(model.fusion).__name__}. Use unimodal_source='probe' or 'auto'.")

    def make_optimizer(self, base, params):
        if self.opts["scale"] == "gradients":
            return base
        return optax.chain(base, scale_by_player(modality_owners(params, self.modalities, self.owned)))

    def init_method_state(self, params, rest=None):
        m, w = len(self.modalities), int(self.opts["window"])
        return {"multipliers": jnp.asarray(self.base), "history": jnp.zeros((w, m), jnp.float32),
                "count": jnp.zeros((), jnp.int32)}

    # ---- inside jit --------------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = self.task.loss(out["logits"], batch["label"], batch.get("mask"))
        if self._source(model) == "branch":
            return fused, {"task": fused}, model
        probe = {"unimodal": model.unimodal_logits(jax.lax.stop_gradient(out["latents"]))}
        uni = unimodal_losses(probe, batch, self.task, self.modalities)
        return fused + sum(uni.values()), {"task": fused, **{f"probe_{m}": v for m, v in uni.items()}}, model

    def gradients(self, handle, params, batch, key, method_state):
        grads, _, new_rest, _, metrics = super().gradients(handle, params, batch, key, method_state)
        mult = method_state["multipliers"]
        metrics = dict(metrics, **{f"lr_mult_{m}": mult[i] for i, m in enumerate(self.modalities)})
        if self.opts["scale"] == "gradients":
            grads = scale_by_owner(grads, modality_owners(params, self.modalities, self.owned), mult)
            return StepOutput(grads, {}, new_rest, method_state, metrics)
        return StepOutput(grads, {"player_scales": mult}, new_rest, method_state, metrics)

    def predict(self, model, batch):
        out = self.forward(model, batch)
        unimodal = out["unimodal"]
        if self._source(model) == "branch":
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.shared_offset()[None] / len(self.modalities)
            unimodal = {m: branches[m] + shared for m in self.modalities}
        return {"logits": out["logits"], "unimodal": unimodal, "latents": out["latents"]}

    # ---- host hook ---------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        acc = np.asarray([float(val_metrics["heads"][m][self.metric]) for m in self.modalities], np.float64)
        history = np.asarray(method_state["history"], np.float32)
        count = int(method_state["count"])
        mult = mslr_multipliers(acc, history, count, int(self.opts["window"]), self.base,
                                partial=self.opts["partial_window"])
        history = np.concatenate([history[1:], acc[None].astype(np.float32)], axis=0)
        return {"multipliers": jnp.asarray(mult, jnp.float32), "history": jnp.asarray(history, jnp.float32),
                "count": jnp.asarray(count + 1, jnp.int32)}


__all__ = ["MSLR", "PRESETS", "mslr_multipliers"]
