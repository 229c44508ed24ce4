r"""AGM: adaptive gradient modulation from zero-input counterfactuals.

Li, Li, Hu, Lei, Li, Zhou, *Boosting Multi-modal Model Performance with Adaptive Gradient
Modulation*, ICCV 2023. The loss is the joint (fused) task loss; the gradient that reaches each
modality's share of the fused output is scaled by an exponential coefficient.

The released code
-----------------
``lihong2303/AGM_ICCV2023`` (the authors' repository; read at commit 5a65542), CREMA-D:
``run/CREMAD_main.py`` (``train``) and ``model/CREMAD_net.py`` (``GradMod``, ``AVClassifier``);
the other datasets' ``run/*_main.py`` and ``model/*_net.py`` follow the same pattern. What one
training step does there (``methods == "AGM"``, late fusion):

1. ``GradMod.forward``: ``total_out = net(a, v)`` in **training** mode; then ``net.eval()`` and
   ``pad_visual_out = net(a, 0)``, ``pad_audio_out = net(0, v)``, ``zero_padding_out = net(0, 0)``
   in **evaluation** mode — not under ``no_grad``: the counterfactual passes are part of the graph
   and receive gradient. ``m_a = ½(total − pad_audio + pad_visual)``, ``m_v = ½(total − pad_visual +
   pad_audio)`` (M = 2; ``model/URFunny_net.py`` has the M = 3 version). The fused output the loss
   sees is ``out = m_a + m_v`` (= ``total_out`` in value).
2. Each ``m_m`` passes an identity module with a full backward hook that multiplies its gradient by
   ``scale_m`` (``GradMod.hooka/hookv``). With a linear fusion layer ``f = Σ z_m W_m + b`` (and
   training- and evaluation-mode latents equal) the gradient of ``W_a`` is therefore ``k_a``\ ·(its
   joint gradient) + ½(k_v − k_a)·(the gradient through the zero-input latent z_a⁰ = enc_a(0)), the
   encoder of a gets the same two terms, and the **shared bias gets the mean of the k's** (exactly,
   for any fusion head): the coefficient is routed through the modality outputs, not applied to
   the encoders' gradients.
3. Scores: ``score_m = mean_i −log softmax(m_m)_i[y_i]`` with the probability floored at 1e-8
   (``−log(1e-8)`` when it is smaller or its log is infinite).
4. ``ratio_a = exp(score_v − score_a)``, ``optimal_ratio_a = exp(train_score_v − train_score_a)``
   from the running means **before** this step's update (0.0 before the first step, so the first
   ratio reference is 1); ``coeff_m = exp(alpha · min(optimal_ratio_m − ratio_m, 10))``. Then
   ``train_score_m ← train_score_m · (it − 1)/it + score_m / it`` with the global iteration count
   ``it = (epoch − 1)·len(loader) + step + 1``: a cumulative mean over all steps of the run, updated
   every step, inside the window or not. (URFunny, M = 3: ``exp(1.5·(mean_all − s_m))`` =
   ``exp(mean_{j≠m} s_j − s_m)``, the form used here for any M; cap 7 there.)
5. ``if modulation_starts <= epoch <= modulation_ends: model.update_scale(coeff_a, coeff_v)``, with
   1-based epochs (``range(start_epoch=1, EPOCHS + 1)``) and defaults 0 and 20: the coefficients
   are **updated in epochs 1 … 20**. The hooks are always on and ``GradMod.scale_*`` is never
   reset, so before the window the scale is 1 and **after it the last coefficients of epoch 20 keep
   scaling every later step**.
6. After ``loss.backward()``: if any entry of the fusion layer's weight gradient
   (``fusion_module.fc_out.weight``; ``head.fc.weight`` for early fusion) is > 1 or < −1,
   ``nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)`` — every step, in the window or
   not (threshold and norm 1 on CREMA-D and AV-MNIST, 5 on URFunny; ``run/AVE_main.py`` does not
   clip). Then SGD (momentum 0.9, weight decay 1e-4).
7. Defaults: ``--alpha 1.0`` (the README's example command uses 2.5 on AV-MNIST),
   ``--modulation_starts 0``, ``--modulation_ends 20``.

What is computed here, per step
-------------------------------
With ``f(S)`` the fused logits when every modality outside the coalition ``S`` has its *input*
replaced by zeros — ``f(N)`` from the training-mode pass, every other ``f(S)`` from the
evaluation-mode model, all with gradient:

.. math::
   m_m = \phi_m + \tfrac{1}{M} f(\emptyset), \qquad
   \phi_m = \sum_{S \subseteq N \setminus \{m\}} \frac{|S|!\,(M-|S|-1)!}{M!}
            \big(f(S \cup \{m\}) - f(S)\big),

the original's modality outputs for any M (for M = 2 exactly ``½(f(a,v) − f(0,v) + f(a,0))``;
:math:`\sum_m m_m = f(N)`). The encoders are separate, so zeroing modality m's input only changes
its latent: each encoder runs on the real inputs (training mode, and evaluation mode) and on zeros
(evaluation mode); the :math:`2^M` coalitions cost fusion-head evaluations only.

- scores :math:`s_m` = batch mean (valid rows) of :math:`\min(-\log \mathrm{softmax}(m_m)_{y}, -\log 10^{-8})`
  (regression: the L1 loss of :math:`m_m`, an extension);
- :math:`r_m = \exp(\bar s_{-m} - s_m)`, :math:`\tilde r_m` the same from the running means before
  this step, :math:`k_m = \exp(\alpha \min(\tilde r_m - r_m, \text{max_gap}))`;
- the loss is the task loss of :math:`\sum_m [k_m m_m + (1 - k_m)\,\mathrm{sg}(m_m)]` (value
  :math:`f(N)`, gradient of each :math:`m_m` scaled by :math:`k_m`: the hooks), with the applied
  :math:`k` = this step's coefficients inside the window, and outside it the last applied ones
  (``after_window="hold"``, 1 before the window) or 1 (``after_window="off"``);
- clipping: if ``clip_norm > 0`` and any entry of a fusion-head kernel gradient (a leaf of
  ``fusion`` with ndim >= 2) has magnitude > ``clip_norm``, every gradient is multiplied by
  :math:`\min(1, \text{clip_norm} / (\lVert g \rVert_2 + 10^{-6}))` (the global norm over all
  parameters, as ``clip_grad_norm_``), every step;
- the running means are updated every step, after the coefficients are formed.

Options (``method`` section) and their defaults
-----------------------------------------------
``alpha`` (α = 3.0, the task's reference value; the original's CLI default is 1.0), ``max_gap``
(10.0, the CREMA-D cap), ``start_epoch`` = 1 and ``end_epoch`` = 20 (the trainer's 1-based epochs,
inclusive: the original's 0 … 20 window, which contains epochs 1 … 20), ``after_window``
(``"hold"``, as the released code; ``"off"``: k = 1 outside the window, as the paper describes),
``clip_norm`` (1.0, the CREMA-D / AV-MNIST value; 0 disables clipping).

Remaining differences from the released code
--------------------------------------------
- **Clip trigger for other fusion heads**: the original looks at the last linear layer's weight
  (``fc_out`` / ``head.fc``); here every kernel of the fusion head. For linear late fusion (the
  branch matrices together are exactly ``fc_out.weight``) they agree.
- **Any M, any dataset**: one rule (Shapley + f(∅)/M, others-mean ratios, one ``max_gap``, one
  ``clip_norm``) for every M; the original has per-dataset scripts (exponent cap 10 on CREMA-D, 7
  on URFunny, none on AV-MNIST/AVE/MOSEI; clipping at 1, at 5 on URFunny, none on AVE; MOSEI's
  trigger reads ``grad_max > 1 and grad_min < 1``). Set ``max_gap`` / ``clip_norm`` to match one.
- **Padding rows**: a batch mask removes padded rows from the loss and the scores.
- **Regression** (L1 scores) and non-linear fusion heads are extensions; the original's scores are
  classification cross-entropies.
- **Optimizer**: the trainer's (the original: SGD with momentum 0.9, weight decay 1e-4, step decay).
- **Resuming** restores the running means and the held coefficients from the method state (the
  epoch from the trainer's state); the original's ``--breakpoint_path`` restores the running means
  only (scale back to 1).

Works for classification and regression, any fusion head, any M >= 2.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, current_epoch, model_inputs
from mcr_jax.methods.common import others_mean
from mcr_jax.players import path_keys
from mcr_jax.state import StepOutput
from mcr_jax.tasks import Task

DEFAULTS = dict(alpha=3.0, max_gap=10.0, start_epoch=1, end_epoch=20, after_window="hold", clip_norm=1.0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(alpha=[0.5, 1.0, 2.0, 3.0])
AFTER_WINDOW = ("hold", "off")
#: scores floor the true-class probability at 1e-8, as the original
_MAX_SCORE = -math.log(1e-8)


def _coalition_values(fuse: Callable[[dict], jax.Array], latents: Mapping[str, jax.Array],
                      zero_latents: Mapping[str, jax.Array], names: Sequence[str],
                      full: jax.Array | None = None) -> dict[frozenset, jax.Array]:
    """``{frozenset(indices): f(S)}`` for every coalition; ``full`` replaces ``f(N)`` when given."""
    num = len(names)
    values = {}
    for size in range(num + 1):
        for subset in itertools.combinations(range(num), size):
            if size == num and full is not None:
                values[frozenset(subset)] = full
                continue
            chosen = set(subset)
            values[frozenset(subset)] = fuse({m: latents[m] if i in chosen else zero_latents[m]
                                              for i, m in enumerate(names)})
    return values


def _shapley(values: Mapping[frozenset, jax.Array], num: int) -> list[jax.Array]:
    out = []
    for i in range(num):
        others = [j for j in range(num) if j != i]
        total = 0.0
        for size in range(num):
            weight = math.factorial(size) * math.factorial(num - size - 1) / math.factorial(num)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                total = total + weight * (values[s | {i}] - values[s])
        out.append(total)
    return out


def shapley_responses(fuse: Callable[[dict], jax.Array], latents: Mapping[str, jax.Array],
                      zero_latents: Mapping[str, jax.Array], modalities: Sequence[str]) -> dict[str, jax.Array]:
    """Exact Shapley values of ``fuse`` over the modalities: ``{m: φ_m [B, C]}``.

    ``fuse`` maps ``{m: [B, D_m]}`` to ``[B, C]``; a modality outside the coalition contributes its
    ``zero_latents`` entry (the encoder's output on a zero input).
    """
    names = list(modalities)
    phi = _shapley(_coalition_values(fuse, latents, zero_latents, names), len(names))
    return dict(zip(names, phi, strict=True))


def modality_outputs(fuse: Callable[[dict], jax.Array], latents: Mapping[str, jax.Array],
                     zero_latents: Mapping[str, jax.Array], modalities: Sequence[str],
                     full: jax.Array | None = None) -> dict[str, jax.Array]:
    """The original's per-modality outputs ``m_m = φ_m + f(∅)/M`` (``{m: [B, C]}``; they sum to f(N)).

    ``full`` (``[B, C]``), when given, is used as ``f(N)`` (the original takes it from the
    training-mode pass while the counterfactual coalitions run in evaluation mode)."""
    names = list(modalities)
    values = _coalition_values(fuse, latents, zero_latents, names, full)
    empty = values[frozenset()] / len(names)
    return {m: phi + empty for m, phi in zip(names, _shapley(values, len(names)), strict=True)}


def agm_ratios(scores: jax.Array) -> jax.Array:
    """``r_m = exp(mean_{j≠m} s_j − s_m)`` for scores (losses) ``[M]``."""
    return jnp.exp(others_mean(scores) - scores)


def agm_coefficients(scores: jax.Array, mean_scores: jax.Array, alpha: float, max_gap: float = 10.0) -> jax.Array:
    """``k_m = exp(α · min(r̃_m − r_m, max_gap))``; ``r`` from ``scores``, ``r̃`` from ``mean_scores``."""
    gap = agm_ratios(mean_scores) - agm_ratios(scores)
    return jnp.exp(alpha * jnp.minimum(gap, max_gap))


def route_gradients(outputs: Sequence[jax.Array], coeffs: jax.Array) -> jax.Array:
    """``Σ_m outputs[m]`` in value; in the backward pass the gradient reaching ``outputs[m]`` is
    multiplied by ``coeffs[m]`` (the original's backward hooks)."""
    total = 0.0
    for i, out in enumerate(outputs):
        k = jax.lax.stop_gradient(coeffs[i]).astype(out.dtype)
        fixed = jax.lax.stop_gradient(out)
        total = total + fixed + k * (out - fixed)  # the value is exactly ``out`` (out - fixed == 0), for any k
    return total


def clip_if_fusion_gradient_large(grads, clip_norm: float) -> tuple[object, jax.Array]:
    """The original's rule: if any fusion-head kernel gradient entry has ``|g| > clip_norm``, scale every
    gradient by ``min(1, clip_norm / (‖g‖ + 1e-6))``. Returns ``(grads, factor applied)``."""
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    fusion = [g for p, g in flat if path_keys(p)[:1] == ["fusion"] and g.ndim >= 2]
    if clip_norm <= 0 or not fusion:
        return grads, jnp.ones((), jnp.float32)
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in fusion]))
    factor = jnp.minimum(1.0, clip_norm / (optax.tree.norm(grads) + 1e-6))
    factor = jnp.where(peak > clip_norm, factor, 1.0).astype(jnp.float32)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads), factor


def _scores(outputs: Sequence[jax.Array], labels, mask, task: Task) -> jax.Array:
    if not task.categorical:
        s = [task.loss(out, labels, mask) for out in outputs]
    else:
        s = [masked_mean(jnp.minimum(optax.softmax_cross_entropy_with_integer_labels(out, labels), _MAX_SCORE), mask)
             for out in outputs]
    return jax.lax.stop_gradient(jnp.stack(s)).astype(jnp.float32)


class AGM(Method):
    """AGM (see the module docstring). Classification or regression, any fusion, any M >= 2."""

    name = "agm"
    reports_unimodal_heads = False
    traceable = ("alpha",)

    def __init__(self, config, info):
        super().__init__(config, info)
        if float(self.opts["alpha"]) < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.opts['alpha']}.")
        if self.opts["after_window"] not in AFTER_WINDOW:
            raise ValueError(f"method.after_window must be one of {list(AFTER_WINDOW)}; "
                             f"got {self.opts['after_window']!r}.")
        if float(self.opts["clip_norm"]) < 0:
            raise ValueError(f"method.clip_norm must be >= 0 (0: no clipping); got {self.opts['clip_norm']}.")

    def init_method_state(self, params, rest=None):
        num = len(self.modalities)
        return {"count": jnp.zeros((), jnp.int32), "score_mean": jnp.zeros((num,), jnp.float32),
                "scale": jnp.ones((num,), jnp.float32)}

    def gradients(self, handle, params, batch, key, method_state):
        names, o = self.modalities, self.opts
        inputs, masks = model_inputs(batch, names)
        labels, mask = batch["label"], batch.get("mask")
        epoch = current_epoch(handle)
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        idle = method_state["scale"] if o["after_window"] == "hold" else jnp.ones_like(method_state["scale"])
        count = method_state["count"]

        def fn(p):
            model = handle.train_model(p)
            full = model.fuse(model.encode(inputs, masks))  # f(N), training mode
            ev = handle.eval_model(p)                       # the counterfactuals: evaluation mode, with gradient
            latents = ev.encode(inputs, masks)
            zeros = ev.encode({m: jnp.zeros_like(x) for m, x in inputs.items()}, masks)
            outs = modality_outputs(ev.fuse, latents, zeros, names, full)
            outs = [outs[m] for m in names]
            scores = _scores(outs, labels, mask, self.task)
            alpha = self.hp("alpha", float(o["alpha"]))
            coeffs = agm_coefficients(scores, method_state["score_mean"], alpha, float(o["max_gap"]))
            applied = jnp.where(active, coeffs, idle)
            loss = self.task.loss(route_gradients(outs, applied), labels, mask)
            return loss, (scores, applied, handle.rest_of(model))

        (loss, (scores, applied, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        grads, clip = clip_if_fusion_gradient_large(grads, float(o["clip_norm"]))
        n = (count + 1).astype(jnp.float32)
        mean = method_state["score_mean"] * (n - 1.0) / n + scores / n
        new_state = dict(method_state, count=count + 1, score_mean=mean, scale=applied)
        metrics = {"task": loss, "loss": loss, "clip_factor": clip,
                   **{f"score_{m}": scores[i] for i, m in enumerate(names)},
                   **{f"coeff_{m}": applied[i] for i, m in enumerate(names)}}
        return StepOutput(grads, {}, new_rest, new_state, metrics)
