r"""InfoReg: adaptive unimodal regulation (Huang, Wei, Yang, Hu; CVPR 2025, arXiv 2503.18595).

Released code: ``GeWu-Lab/InfoReg_CVPR2025`` (commit 939b2ed, the snapshot read), ``main.py``:
``train_epoch`` (the per-step losses, ``score_a``/``score_v``, the choice of ``beta``/``beta2``, the
proximal gradient ``model_param.grad += beta * (model_param - global_model_param)``, the per-layer
FIM accumulation ``fim_audio[name] += grad * grad`` and the traces), and ``main`` (the trace
history ``audio_trace_list`` started with ten zeros, the optimiser). ``calculate_proximal_term*``
in the same file are never called.

The rule
--------
**Objective.** Per step the release back-propagates the fused cross-entropy *and* the two
unimodal cross-entropies of the fused head's branches,

.. math::
   L = \mathrm{CE}(\ell, y) + \lambda_u \sum_m \mathrm{CE}(z_m W_m + b / M,\; y)

(``loss.backward() + loss_out_a.backward() + loss_out_v.backward()``; :math:`\lambda_u` =
``unimodal_weight``, 1 in the release).

**Information sufficiency.** Each modality's batch score :math:`s_m = \sum_i
\mathrm{softmax}(z_{m,i} W_m + b/M)[y_i]` (a *sum* over the batch, as the release). The modality
whose score exceeds the others' is the information-sufficient one; with
:math:`g_m = s_m - \bar s_{-m}` (:math:`\bar s_{-m}`: mean of the other modalities' scores),

.. math::
   \beta_m = \beta\, e^{\tanh(g_m)} \quad\text{if } g_m > 0 \text{ and } m \text{ is in its prime
   learning window}, \qquad \beta_m = 0 \text{ otherwise}.

**Regulation** (an optax transformation, :func:`add_proximal_pull`, chained *before* the
experiment's optimiser, as the release adds it to ``.grad`` before ``optimizer.step()``): every
encoder parameter :math:`\theta` of modality :math:`m` gets

.. math::
   \tilde g_\theta = g_\theta + \beta_m\,(\theta - \theta^{\mathrm{anchor}}),

the gradient of the proximal term :math:`\tfrac{\beta_m}{2}\lVert\theta_m-\theta_m^{\mathrm{anchor}}
\rVert^2` that pulls the dominant encoder towards its parameters at the start of the epoch (the
release's ``global_model = deepcopy(model)`` at the top of ``train_epoch``).

**Prime learning window.** Per epoch :math:`e` each modality's FIM trace is
:math:`T_{m,e} = \sum_{\text{kernels } W \text{ of encoder } m} \mathrm{mean}\big(\sum_{\text{steps}}
\tilde g_W^{\,2}\big)` (the regulated gradients, kernels = Conv/Linear weights, every step of the
epoch summed, not averaged). With the history :math:`h` (``window`` zeros, then
:math:`T_{m,1}, T_{m,2}, \dots`), the next epoch's rate of change is

.. math::
   k_m = \frac{\mathrm{mean}(h_{-w:}) - \mathrm{mean}(h_{-w-1:-1})}{\mathrm{mean}(h_{-w:})}
       = \frac{T_{m,e} - T_{m,e-w}}{\sum_{j=0}^{w-1} T_{m,e-j}},

and modality :math:`m` is in its window while :math:`k_m >` ``window_threshold`` (0.05); the
first epoch is always in the window (``k = 1``). The window is re-evaluated every epoch (as the
release; it is not latched shut).

Defaults (``DEFAULTS``) and whom they follow
--------------------------------------------
- ``beta`` 0.95: the release's coefficient when audio dominates (``beta = 0.95 * exp(gap)``; the
  CREMA-D / Kinetics-Sounds case, audio being the information-sufficient modality there).
- ``window`` 10, ``window_threshold`` 0.05: ``tr1 = sum(audio_trace_list[-10:]) / 10``,
  ``tr2 = sum(audio_trace_list[-11:-1]) / 10``, ``k = (tr1 - tr2) / tr1``, ``k > 0.05``.
- ``unimodal_weight`` 1.0: the three ``backward()`` calls of equal weight.

Differences from the release (all of them we know of)
-----------------------------------------------------
1. **Coefficient per modality.** The release's constants are asymmetric: 0.95 when audio
   dominates, 0.1 when visual dominates (``beta2 = 0.1 * exp(gap)``). Here one ``beta`` for
   whichever modality dominates (the release's audio value); the visual-dominant branch of the
   release is therefore 9.5 times weaker than ours.
2. **Whose window.** The release computes ``k`` from the *audio* trace only and gates both
   modalities with it; here each modality's own trace gates its own regulation. For the release's
   setting (audio dominant, audio regulated) this is the same rule.
3. **M modalities.** The dominant modalities are those with :math:`s_m > \bar s_{-m}`, the gap
   against the mean of the others; for M = 2 exactly the release (``score_a > score_v`` →
   audio; ``<`` → visual; equal → none).
4. **Which parameters.** Regulated: every parameter under ``encoders/<m>`` (the release's
   ``audio_net.parameters()``, BN affine included). FIM: the encoder leaves with ``ndim >= 2``
   (the release's ``nn.Conv2d``/``nn.Linear`` weights). The fusion head's branches and the unused
   unimodal heads are neither regulated nor counted (as the release's ``head``).
5. **Late fusion.** The unimodal logits are the separable fusion head's branches plus
   :math:`b/M` (the release's ``out_a = a·W[:, :512]ᵀ + b/2`` on its concat head); hence a
   separable fusion head is required (``model.fusion = 'linear'``).
6. **Padding rows** are left out of the losses and the scores (the release has none); a zero
   trace history gives ``k = 0`` (the release would divide by zero).
7. **Timing.** The anchor is the parameters at the end of the previous epoch, set in the epoch
   hook (the release copies them at the start of ``train_epoch``: the same values); the first
   anchor is the initialisation.
8. Optimiser, schedule, batch size: the experiment's (release: SGD momentum 0.9, weight decay
   1e-4, lr 2e-3, StepLR 30 / 0.1, batch 64, 50 epochs). The proximal gradient enters before the
   optimiser (momentum, weight decay), as in the release.
9. The release's many logging-only quantities (weight means, head cosine similarities, gradient
   means, the multimodal/head FIM traces, the confidence plots) are omitted.

Classification only (the score is the true class's softmax probability).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax.methods.base import Method
from mcr_jax.players import modality_owners
from mcr_jax.state import StepOutput

DEFAULTS = dict(beta=0.95, window=10, window_threshold=0.05, unimodal_weight=1.0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(beta=[0.25, 0.5, 0.95, 2.0])


# ---- the rule (pure JAX) ---------------------------------------------------------------------
def true_class_scores(logits: dict, labels, mask, names) -> jax.Array:
    """``[M]``: ``s_m = Σ_i softmax(logits_m)[i, y_i]`` over the valid rows."""
    w = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    out = []
    for m in names:
        p = jax.nn.softmax(logits[m].astype(jnp.float32), axis=-1)
        out.append(jnp.sum(jnp.take_along_axis(p, labels.astype(jnp.int32)[:, None], axis=1)[:, 0] * w))
    return jnp.stack(out)


def score_gaps(scores: jax.Array) -> jax.Array:
    """``g_m = s_m − mean_{k≠m} s_k`` (``[M]``)."""
    n = scores.shape[0]
    return scores - (jnp.sum(scores) - scores) / (n - 1)


def prox_coefficients(scores: jax.Array, beta, active=None) -> jax.Array:
    """``β_m = β·exp(tanh(g_m))`` where ``g_m > 0`` (and ``active[m]``), else 0."""
    gaps = score_gaps(scores)
    on = gaps > 0 if active is None else (gaps > 0) & (jnp.asarray(active) > 0)
    return jnp.where(on, jnp.asarray(beta, jnp.float32) * jnp.exp(jnp.tanh(gaps)), 0.0)


def pull_towards(updates, params, anchor, owners, coeffs):
    """``u + coeffs[m]·(θ − θ_anchor)`` on modality ``m``'s leaves; other leaves unchanged."""
    coeffs = jnp.asarray(coeffs)

    def pull(u, p, a, o):
        if o < 0:
            return u
        return u + coeffs[o].astype(u.dtype) * (p - a).astype(u.dtype)

    return jax.tree.map(pull, updates, params, anchor, owners)


def add_proximal_pull(owners) -> optax.GradientTransformationExtraArgs:
    """A stateless optax transformation: the gradient of ``Σ_m β_m/2 ‖θ_m − θ_m^anchor‖²`` added to
    the updates of modality ``m``'s leaves (InfoReg's regulation).

    ``update(updates, state, params, *, prox_coeffs, anchor, **extra)``: ``prox_coeffs`` ``[M]``
    (``β_m``), ``anchor`` a pytree like the parameters (only the owned leaves are read); ``owners``
    a static pytree like the parameters with int leaves (a modality index, or -1: untouched), e.g.
    from :func:`mcr_jax.players.modality_owners`. Chain it *before* the optimiser (the release adds
    the term to ``.grad`` before ``optimizer.step()``); ``optax.chain`` forwards the keywords.
    """

    def update_fn(updates, state, params=None, *, prox_coeffs=None, anchor=None, **extra):
        del extra
        if prox_coeffs is None or anchor is None:
            raise ValueError("add_proximal_pull's update needs prox_coeffs= (one coefficient per modality, [M]) "
                             "and anchor= (a pytree like the parameters).")
        if params is None:
            raise ValueError("add_proximal_pull's update needs the current params.")
        return pull_towards(updates, params, anchor, owners, prox_coeffs), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def fim_traces(grads, owners, num: int) -> jax.Array:
    """``[M]``: ``Σ_{W of modality m, ndim >= 2} mean(g_W²)`` (one step's share of the FIM trace)."""
    totals = [jnp.zeros((), jnp.float32) for _ in range(num)]
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(owners), strict=True):
        if o >= 0 and g.ndim >= 2:
            totals[o] = totals[o] + jnp.mean(jnp.square(g.astype(jnp.float32)))
    return jnp.stack(totals)


# ---- the prime learning window (NumPy, on the host) -------------------------------------------
def window_rates(history) -> np.ndarray:
    """``[M]``: ``k_m = (mean(h[-w:]) − mean(h[-w-1:-1])) / mean(h[-w:])`` from a ``[M, w + 1]``
    history (oldest first); 0 where the recent mean is not positive."""
    h = np.asarray(history, np.float64)
    tr1 = h[:, 1:].mean(axis=1)
    tr2 = h[:, :-1].mean(axis=1)
    return np.where(tr1 > 0, (tr1 - tr2) / np.where(tr1 > 0, tr1, 1.0), 0.0)


class InfoReg(Method):
    """InfoReg (see the module docstring). Classification with separable late fusion, any M >= 2."""

    name = "inforeg"
    traceable = ("beta", "unimodal_weight")

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("its information score is the softmax probability of the true class")
        o = self.opts
        if len(self.modalities) < 2:
            raise ValueError(f"inforeg needs at least two modalities; got {self.modalities}.")
        if float(o["beta"]) < 0 or float(o["unimodal_weight"]) < 0:
            raise ValueError(f"method.beta and method.unimodal_weight must be >= 0; got {o['beta']} and "
                             f"{o['unimodal_weight']}.")
        if int(o["window"]) < 1 or int(o["window"]) != o["window"]:
            raise ValueError(f"method.window must be an integer >= 1; got {o['window']}.")

    def check_model(self, model) -> None:
        self.require_separable(model, "the unimodal outputs are the fused head's branches z_m W_m + b/M")

    def _owners(self, params):
        return modality_owners(params, self.modalities, ("encoders",))

    def make_optimizer(self, base, params):
        return optax.chain(add_proximal_pull(self._owners(params)), base)

    def init_method_state(self, params, rest=None):
        """``anchor`` (the parameters at the start of the epoch; only the encoders' leaves are
        read), ``trace`` (this epoch's FIM traces so far, ``[M]``), ``history`` (``[M, window + 1]``,
        oldest first) and ``active`` (``[M]``, 1 inside the prime learning window)."""
        num, w = len(self.modalities), int(self.opts["window"])
        return {"anchor": jax.tree.map(jnp.copy, params),
                "trace": jnp.zeros((num,), jnp.float32),
                "history": jnp.zeros((num, w + 1), jnp.float32),
                "active": jnp.ones((num,), jnp.float32)}

    def gradients(self, handle, params, batch, key, method_state):
        o, names = self.opts, self.modalities
        num = len(names)
        labels, mask = batch["label"], batch.get("mask")
        uw = self.hp("unimodal_weight", float(o["unimodal_weight"]))

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            fused = self.task.loss(out["logits"], labels, mask)
            branches = model.fusion.branch_logits(out["latents"])
            shared = model.fusion.shared_offset()[None] / num
            uni_logits = {m: branches[m] + shared for m in names}
            uni = {m: self.task.loss(uni_logits[m], labels, mask) for m in names}
            total = fused + uw * sum(uni[m] for m in names)
            scores = jax.lax.stop_gradient(true_class_scores(uni_logits, labels, mask, names))
            return total, (fused, uni, scores, handle.rest_of(model))

        (loss, (fused, uni, scores, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        coeffs = prox_coefficients(scores, self.hp("beta", float(o["beta"])), method_state["active"])
        owners = self._owners(params)
        anchor = method_state["anchor"]
        regulated = pull_towards(grads, params, anchor, owners, coeffs)
        trace = method_state["trace"] + fim_traces(regulated, owners, num)
        new_ms = dict(method_state, trace=trace)
        gaps = score_gaps(scores)
        metrics = {"loss": loss, "task": fused, **{f"uni_{m}": uni[m] for m in names},
                   **{f"gap_{m}": gaps[i] for i, m in enumerate(names)},
                   **{f"beta_{m}": coeffs[i] for i, m in enumerate(names)},
                   **{f"window_{m}": method_state["active"][i] for i, m in enumerate(names)}}
        return StepOutput(grads, {"prox_coeffs": coeffs, "anchor": anchor}, new_rest, new_ms, metrics)

    def next_window(self, method_state):
        """``(history, active, k)`` after an epoch: the epoch's trace appended, the oldest dropped."""
        hist = np.asarray(method_state["history"], np.float64)
        hist = np.concatenate([hist[:, 1:], np.asarray(method_state["trace"], np.float64)[:, None]], axis=1)
        k = window_rates(hist)
        return hist, k > float(self.opts["window_threshold"]), k

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """The epoch's FIM traces enter the history; the window of the next epoch; the anchor is the
        parameters now (those at the start of the next epoch)."""
        hist, active, k = self.next_window(method_state)
        if ctx is not None:
            anchor = jax.tree.map(jnp.copy, ctx.params)  # no alias of the donated state
            ctx.log({**{f"fim_trace_{m}": float(method_state["trace"][i]) for i, m in enumerate(self.modalities)},
                     **{f"window_rate_{m}": float(k[i]) for i, m in enumerate(self.modalities)}})
        else:
            anchor = method_state["anchor"]
        return {"anchor": anchor, "trace": jnp.zeros_like(method_state["trace"]),
                "history": jnp.asarray(hist, jnp.float32), "active": jnp.asarray(active, jnp.float32)}
