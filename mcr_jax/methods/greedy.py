r"""Greedy: balanced multi-modal learning guided by the conditional learning speed, and its random
variant (Wu, Jastrzębski, Cho, Geras, *Characterizing and overcoming the greedy nature of learning
in multi-modal deep neural networks*, ICML 2022, arXiv 2202.05306).

Released code: nyukat/greedy_multimodal_learning at commit
``cf28c4c7bc3eeaec4baa79f47001cc5396497cef`` ("inital com", the code; the three later commits edit
the README only) — ``src/callbacks.py`` (``Bias_Mitigation_Strong``,
the guided algorithm; ``Bias_Mitigation_Random``), ``src/balanced_mmtm.py`` (``MMTM_mitigate``: what
a re-balancing step changes), ``src/model.py`` (``MMTM_MVCNN``), ``src/framework.py`` (when the
callbacks run), ``configs/training_guided.gin`` / ``training_random.gin`` (the thresholds), and
``eval.py`` with ``configs/recording.gin`` / ``eval.gin`` (the accuracies the conditional
utilisation rate is formed from).

**The release.** Two ResNet-18 streams :math:`\varphi_0, \varphi_1` (each with its own ``fc``),
joined after layers 2–4 by MMTM blocks: a shared squeeze layer reads both streams' pooled maps and
one excitation layer per stream rescales that stream's channels. Prediction
:math:`\hat y = (\hat y_0 + \hat y_1)/2`, loss :math:`\mathrm{CE}(\hat y_0) + \mathrm{CE}(\hat y_1)`.

- *Conditional learning speed* (``compute_BDR``, after the backward pass of every **normal** step,
  re-balancing steps excluded, from the first step on): for stream ``m``, ``main_m`` = the stream's
  parameters, ``bypass_m`` = its MMTM excitation layer plus the shared squeeze layer (counted for
  both streams). Per step and group the ratio of summed squared gradients to summed squared weights
  is added to a running total, :math:`\mu(\theta) = \sum_t \|g_t\|^2 / \|\theta_t\|^2`, never reset;
  :math:`\mathrm{BDR}_m = \log_{10}(\mu(\text{bypass}_m)/\mu(\text{main}_m))` — how fast branch
  ``m`` learns from the *other* modality relative to its own, :math:`s(m_{\neg m} \mid m)` — and
  :math:`d = \mathrm{BDR}_0 - \mathrm{BDR}_1`.
- *Switching rule* (``on_backward_end``; ``epsilon`` 0.01, ``curation_windowsize`` 5,
  ``starting_epoch`` 2): from epoch 2 on (1-based), after a normal step with :math:`|d| > \epsilon`
  the next 5 steps are **re-balancing** steps caring for modality 0 if :math:`d > 0` (branch 0
  learns from modality 1 faster than from its own input: modality 0 is under-used), else 1; then a
  normal step, after which the rule applies again. In epoch 1 every step is normal.
- *Re-balancing step* for caring modality ``c``: in every MMTM block stream ``c``'s excitation is
  replaced by its running average (a constant), so :math:`\hat y_c` no longer sees the other
  modality and branch ``c`` must learn from its own; the loss is still both branches' CE and the
  optimizer steps every parameter.
- *Random variant*: from epoch 2 on, after every step the next one is normal, re-balancing for
  modality 1 or re-balancing for modality 0, each with probability 1/3.
- *Conditional utilisation rate*: ``eval.py`` with ``mmtm_off`` replaces each MMTM's cross-modal
  input by its mean over the training split (recorded by a pass in evaluation mode), so branch
  ``m``'s accuracy is that of modality ``m`` alone. The rate itself, the relative accuracy gain of
  adding :math:`m_1` to :math:`m_0`, :math:`u(m_1 \mid m_0) = (A - A_{m_0\,\text{only}}) / A`, is
  formed from these accuracies outside the released code.

**Here (late fusion).** Encoders :math:`f_m` and a fusion head (linear late fusion
:math:`\ell = \sum_m W_m z_m + b`, or any other): the modalities meet only in the fusion head, so
the one fused prediction plays the part of every branch's prediction. A normal step is joint
training (the fused task loss). Modality ``m``'s branch :math:`\theta_m` is ``encoders/<m>`` plus,
for a separable head, ``fusion/branches/<m>``; the fusion head's other parameters (bias,
non-separable layers) are *shared*; the unimodal heads (untrained) belong to no group.

- Conditional learning speed, ``speed_groups="cross"`` (default): ``main_m`` = :math:`\theta_m`,
  ``bypass_m`` = the other modalities' branches plus the shared fusion parameters — the parameters
  through which the other modalities enter the prediction, as the release's ``bypass_m`` carries
  the other modality into branch ``m`` (shared parameters counted for every modality, as there).
  ``"fusion"``: ``main_m`` = ``encoders/<m>``, ``bypass_m`` = ``fusion/branches/<m>`` plus the
  shared fusion parameters (the fusion head standing for the MMTM blocks). Under late fusion a
  branch ``W_m`` sees ``z_m`` only, so this reading compares how fast modality ``m``'s fusion
  weights and its encoder learn rather than how fast the model learns from the others; offered for
  comparison. :math:`\mathrm{BDR}_m = s(\neg m \mid m)` is logged as ``speed_<m>``.
- Any number of modalities: the rule triggers when :math:`\max_m \mathrm{BDR}_m - \min_m
  \mathrm{BDR}_m > \epsilon` (``speed_gap``) and cares for :math:`\arg\max_m \mathrm{BDR}_m`; for
  M = 2 this is exactly the release's :math:`|d| > \epsilon`, caring for 0 iff :math:`d > 0`.
- Re-balancing step for ``c``: every other modality's latent :math:`z_j` is replaced by its running
  mean :math:`\bar z_j` (the mean latent of the training batches, averaged over every training step
  so far, this batch included, as the release's running average; a constant), so
  :math:`\ell_c = f(z_c, \bar z_{\neg c})` depends on :math:`x_c` only.
  ``rebalance="branch"`` (re-balancing steps that update only the slower-learning modality's
  branch; the paper's text on this point was not at hand to check): loss
  :math:`\mathrm{CE}(\ell_c)`, and only :math:`\theta_c` moves —
  every other gradient is zeroed and every other update masked (``players.scale_by_player``), so
  momentum and weight decay do not move them either.
  ``rebalance="release"`` (default, faithful to the released code): every parameter moves, as in
  the release's step: loss
  :math:`\frac1M[\mathrm{CE}(\ell_c) + (M-1)\,\mathrm{CE}(\ell)]` — branch ``c``'s prediction loses
  the other modalities, the other branches' predictions (here: the same :math:`\ell`) keep them;
  the :math:`1/M` keeps the scale of a normal step, whose :math:`\mathrm{CE}(\ell)` stands for the
  release's M branch losses.
- ``variant="random"``: from ``starting_epoch`` on, every step is normal or re-balancing for one
  of the M modalities, each with probability :math:`1/(M+1)` (the release's uniform choice over
  {normal, care 1, care 0}), drawn from the step's PRNG key (reproducible, resumable).
- Conditional utilisation rate (every ``utilization_every`` epochs, after validation):
  :math:`u(m \mid \neg m) = (A(\ell) - A(\ell \text{ with } z_m \to \bar z_m)) / A(\ell)` on the
  validation split, :math:`\bar z_m` the mean latent over the training split in evaluation mode
  (``utilization_mean="train"``, as the release's recording pass) or the running mean of the
  method state (``"running"``: no extra pass). ``A`` is the task's ``balance_metric`` (accuracy;
  binary accuracy for regression); :math:`A(\ell) = 0` gives 0. Logged to ``metrics.jsonl`` as
  ``val.util_<m>`` and ``val.without_<m>_<metric>``; for two modalities the paper's
  :math:`d_{util} = u(m_1 \mid m_0) - u(m_0 \mid m_1)` is ``util_<m1> − util_<m0>``.

Defaults: ``epsilon`` 0.01, ``window`` 5, ``starting_epoch`` 2 (``training_guided.gin``; the random
variant's start is fixed at 2 in the release). On the synthetic benchmark ``speed_gap`` is of the
order of 0.01 (up to about 0.1 in the first epochs), hence the tuning grid of ``epsilon``; the rule
is off for an ``epsilon`` above every gap (a run is then joint training that logs the diagnostics).

Per-step metrics (epoch means in ``metrics.jsonl``'s ``train``): ``rebalancing`` (the fraction of
re-balancing steps), ``rebalance_<m>`` (caring for ``m``), ``speed_<m>``, ``speed_gap``.

Remaining differences from the release (stated):

- Late fusion instead of MMTM blocks (above); the normal loss is the fused CE, not a sum of branch
  CEs: the release's branch predictions are multi-modal through the MMTM blocks, here a branch sees
  one modality, so training the branches separately would be unimodal training.
- The release keeps its running averages over every forward pass, evaluation passes included, and
  its second stream's average is computed from the *first* stream's excitation (``MMTM_mitigate``:
  ``running_avg_weight_skeleton`` is updated with ``vis_out``); here each modality's own latent is
  averaged over the training steps.
- ``rebalance="release"`` (the default) is the release's update-everything; ``"branch"`` is offered.
- Speeds accumulate in float32 (the release: Python floats).
- The release evaluates the utilisation rate once, on the final model's test split; here every
  ``utilization_every`` epochs on validation (the selected epoch's value is in ``metrics.jsonl``).
- The release's SGD (lr 0.1, batch 8), ``ReduceLROnPlateau`` and "completed" stopping are not
  implied: the run's optimizer and early stopping apply.

Classification or regression; any fusion head; any number of modalities M >= 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax.methods.base import Method, current_epoch, model_inputs
from mcr_jax.players import in_group, modality_owners, path_keys, scale_by_owner, scale_by_player
from mcr_jax.state import StepOutput

DEFAULTS = dict(variant="guided", epsilon=0.01, window=5, starting_epoch=2, rebalance="release",
                speed_groups="cross", utilization_every=1, utilization_mean="train")
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(epsilon=[0.001, 0.01, 0.03, 0.1])
VARIANTS = ("guided", "random")
REBALANCE = ("branch", "release")
SPEED_GROUPS = ("cross", "fusion")
UTILIZATION_MEANS = ("train", "running")


def row_mean(z: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``[B, D]`` → ``[D]``: the mean over the rows where ``mask`` (``[B]``) is nonzero."""
    if mask is None:
        return jnp.mean(z, axis=0)
    w = jnp.asarray(mask, z.dtype)
    return jnp.sum(z * w[:, None], axis=0) / jnp.maximum(jnp.sum(w), 1.0)


# ---- conditional learning speed -----------------------------------------------------------------
def speed_group_codes(params, modalities) -> list[int]:
    """One code per parameter leaf (flatten order): ``m`` for ``encoders/<m>``, ``M + m`` for
    ``fusion/branches/<m>``, ``2M`` for the fusion head's other (shared) parameters, ``-1`` for the
    rest (unimodal heads, CEB decoder)."""
    names, m_count = list(modalities), len(modalities)
    codes = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = path_keys(path)
        if keys[:1] == ["encoders"] and len(keys) > 1 and keys[1] in names:
            codes.append(names.index(keys[1]))
        elif in_group(path, "branches") and len(keys) > 2 and keys[2] in names:
            codes.append(m_count + names.index(keys[2]))
        elif keys[:1] == ["fusion"]:
            codes.append(2 * m_count)
        else:
            codes.append(-1)
    return codes


def group_norms(tree, codes, num_modalities: int) -> jax.Array:
    """``[2M + 1]``: the summed squares of ``tree``'s leaves per code of :func:`speed_group_codes`."""
    out = jnp.zeros((2 * num_modalities + 1,), jnp.float32)
    for leaf, code in zip(jax.tree.leaves(tree), codes, strict=True):
        if code >= 0:
            out = out.at[code].add(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
    return out


def step_speeds(grad_sq, weight_sq, num_modalities: int, groups: str = "cross"):
    """``(main [M], bypass [M])``: this step's ``‖g‖² / ‖θ‖²`` of each modality's main and bypass
    groups (see the module docstring), from :func:`group_norms` of the gradients and the weights
    (a group with no weight contributes 0)."""
    m = num_modalities

    def split(x):
        return x[:m], x[m:2 * m], x[2 * m]

    (eg, bg, sg), (ew, bw, sw) = split(grad_sq), split(weight_sq)
    if groups == "cross":
        main = (eg + bg, ew + bw)
        bypass = (jnp.sum(eg + bg) - (eg + bg) + sg, jnp.sum(ew + bw) - (ew + bw) + sw)
    elif groups == "fusion":
        main, bypass = (eg, ew), (bg + sg, bw + sw)
    else:
        raise ValueError(f"speed groups must be one of {SPEED_GROUPS}; got {groups!r}.")
    ratio = lambda g, w: jnp.where(w > 0, g / jnp.where(w > 0, w, 1.0), 0.0)  # noqa: E731
    return ratio(*main), ratio(*bypass)


def conditional_speeds(mu_main, mu_bypass):
    """``(BDR [M], gap)``: :math:`\\log_{10}(\\mu_{bypass}/\\mu_{main})` per modality and
    ``max − min`` (0 and 0 while any total is still 0)."""
    ok = jnp.all((mu_main > 0) & (mu_bypass > 0))
    bdr = jnp.log10(jnp.where(ok, mu_bypass, 1.0) / jnp.where(ok, mu_main, 1.0))
    bdr = jnp.where(ok, bdr, 0.0)
    return bdr, jnp.max(bdr) - jnp.min(bdr)


def next_mode(state, bdr, gap, *, unlocked, epsilon, window: int, variant: str, key=None):
    """``(rebalancing, caring, window_step)`` of the next step, from this step's (released rule).

    ``state``: this step's ``rebalancing`` (0/1), ``caring`` and ``window_step``; ``bdr [M]`` and
    ``gap``: the speeds after this step; ``unlocked``: this step's epoch is ``>= starting_epoch``.
    """
    reb = state["rebalancing"] > 0
    m = bdr.shape[0]
    if variant == "random":
        draw = jax.random.randint(key, (), 0, m + 1)  # 0: normal, 1 + c: re-balance for c
        new_reb = unlocked & (draw > 0)
        return new_reb.astype(jnp.int32), jnp.where(new_reb, draw - 1, 0).astype(jnp.int32), jnp.zeros((), jnp.int32)
    trigger = ~reb & unlocked & (gap > epsilon)
    steps = state["window_step"] + 1
    new_reb = jnp.where(reb, steps < window, trigger)
    caring = jnp.where(reb, state["caring"], jnp.where(trigger, jnp.argmax(bdr), 0))
    return new_reb.astype(jnp.int32), caring.astype(jnp.int32), jnp.where(reb, steps, 0).astype(jnp.int32)


# ---- conditional utilisation rate ---------------------------------------------------------------
def conditional_utilization(fuse: Callable, latents: Mapping[str, np.ndarray], labels, means, task,
                            metric: str | None = None) -> dict[str, float]:
    """``{util_<m>: u(m | ¬m), without_<m>_<metric>: A(ℓ with z_m → z̄_m)}`` for every modality.

    ``fuse``: ``{m: [N, D_m]}`` → outputs ``[N, C]``; ``latents``: ``{m: [N, D_m]}``; ``means``:
    ``{m: [D_m]}``; ``task``: a :class:`~mcr_jax.tasks.Task` (``metric`` defaults to its
    ``balance_metric``). ``u = (A(ℓ) − A(ℓ without m)) / A(ℓ)``, 0 when ``A(ℓ) = 0``."""
    metric = metric or task.balance_metric
    outputs = {"fused": np.asarray(fuse(dict(latents)))}
    for m in latents:
        removed = dict(latents)
        removed[m] = np.broadcast_to(np.asarray(means[m], np.asarray(latents[m]).dtype), np.shape(latents[m]))
        outputs[m] = np.asarray(fuse(removed))
    scores = {k: float(v[metric]) for k, v in task.head_metrics(outputs, np.asarray(labels)).items()}
    full = scores["fused"]
    out = {}
    for m in latents:
        out[f"util_{m}"] = (full - scores[m]) / full if full != 0 else 0.0
        out[f"without_{m}_{metric}"] = scores[m]
    return out


class Greedy(Method):
    """Balanced multi-modal learning (see the module docstring); config: ``variant`` (``"guided"`` |
    ``"random"``), ``epsilon``, ``window``, ``starting_epoch``, ``rebalance``, ``speed_groups``,
    ``utilization_every``, ``utilization_mean``."""

    name = "greedy"
    traceable = ("epsilon",)

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        for key, allowed in (("variant", VARIANTS), ("rebalance", REBALANCE), ("speed_groups", SPEED_GROUPS),
                             ("utilization_mean", UTILIZATION_MEANS)):
            if o[key] not in allowed:
                raise ValueError(f"method.{key} must be one of {allowed}; got {o[key]!r}.")
        self.window, self.starting_epoch = int(o["window"]), int(o["starting_epoch"])
        self.epsilon, self.every = float(o["epsilon"]), int(o["utilization_every"])
        if self.window < 1 or self.starting_epoch < 1 or self.every < 0 or not self.epsilon >= 0:
            raise ValueError("method.window and method.starting_epoch must be >= 1, method.utilization_every "
                             f">= 0 and method.epsilon >= 0; got {o['window']}, {o['starting_epoch']}, "
                             f"{o['utilization_every']} and {o['epsilon']}.")

    def _owners(self, params):
        return modality_owners(params, self.modalities, ("encoders", "branches"))

    def make_optimizer(self, base, params):
        """``rebalance="branch"``: the run's optimizer, then 0/1 scales that freeze every parameter but
        the caring modality's branch during a re-balancing step."""
        if self.opts["rebalance"] != "branch":
            return base
        return optax.chain(base, scale_by_player(self._owners(params)))

    def init_method_state(self, params, rest=None):
        m = len(self.modalities)
        dims = {n: int(params["heads"][n]["kernel"].shape[0]) for n in self.modalities}
        zero = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
        return {"rebalancing": jnp.zeros((), jnp.int32),
                "caring": jnp.zeros((), jnp.int32), "window_step": jnp.zeros((), jnp.int32),
                "mu_main": zero(m), "mu_bypass": zero(m),
                "latent_mean": {n: zero(d) for n, d in dims.items()}, "latent_count": jnp.zeros((), jnp.int32)}

    # ---- inside jit --------------------------------------------------------------------------
    def gradients(self, handle, params, batch, key, method_state):
        ms, names, m_count = method_state, self.modalities, len(self.modalities)
        reb, caring = ms["rebalancing"] > 0, ms["caring"]
        labels, mask = batch["label"], batch.get("mask")
        release = self.opts["rebalance"] == "release"

        def fn(p):
            model = handle.train_model(p)
            latents = model.encode(*model_inputs(batch, names))
            n = ms["latent_count"].astype(jnp.float32)
            means = {m: jax.lax.stop_gradient((row_mean(latents[m], mask) + ms["latent_mean"][m] * n)
                                              / (n + 1.0)) for m in names}
            cut = {m: reb & (caring != i) for i, m in enumerate(names)}
            partial = {m: jnp.where(cut[m], jnp.broadcast_to(means[m], latents[m].shape), latents[m]) for m in names}
            loss = self.task.loss(self.fuse(model, partial), labels, mask)
            if release:  # (1/M)[CE(ℓ_c) + (M − 1) CE(ℓ)] while re-balancing, CE(ℓ) otherwise
                full = self.task.loss(self.fuse(model, latents), labels, mask)
                loss = jnp.where(reb, (loss + (m_count - 1) * full) / m_count, full)
            return loss, (means, handle.rest_of(model))

        (loss, (means, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        onehot = jax.nn.one_hot(caring, m_count, dtype=jnp.float32)
        player_scales = jnp.where(reb, onehot, 1.0)
        shared_scale = jnp.where(reb, 0.0, 1.0)
        tx_kwargs = {}
        if not release:  # only the caring branch learns: its gradients alone, its updates alone
            grads = scale_by_owner(grads, self._owners(params), player_scales, shared_scale)
            tx_kwargs = {"player_scales": player_scales, "shared_scale": shared_scale}

        # conditional learning speed: normal steps only (the release's compute_BDR)
        codes = speed_group_codes(params, names)
        main, bypass = step_speeds(group_norms(grads, codes, m_count), group_norms(params, codes, m_count),
                                   m_count, self.opts["speed_groups"])
        normal = jnp.where(reb, 0.0, 1.0)
        mu_main, mu_bypass = ms["mu_main"] + normal * main, ms["mu_bypass"] + normal * bypass
        bdr, gap = conditional_speeds(mu_main, mu_bypass)
        unlocked = current_epoch(handle) >= self.starting_epoch
        new_reb, new_caring, window_step = next_mode(
            ms, bdr, gap, unlocked=unlocked, epsilon=self.hp("epsilon", self.epsilon), window=self.window,
            variant=self.opts["variant"], key=key)
        new_ms = dict(ms, rebalancing=new_reb, caring=new_caring, window_step=window_step, mu_main=mu_main,
                      mu_bypass=mu_bypass, latent_mean=means, latent_count=ms["latent_count"] + 1)
        metrics = {"loss": loss, "rebalancing": reb.astype(jnp.float32), "speed_gap": gap,
                   **{f"rebalance_{m}": (reb & (caring == i)).astype(jnp.float32) for i, m in enumerate(names)},
                   **{f"speed_{m}": bdr[i] for i, m in enumerate(names)}}
        return StepOutput(grads, tx_kwargs, new_rest, new_ms, metrics)

    # ---- host hooks --------------------------------------------------------------------------
    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """Every ``utilization_every`` epochs, logs the conditional utilisation rates (``ctx.log``)."""
        if ctx is not None and self.every and int(epoch) % self.every == 0:
            latents, labels = ctx.features("validation")
            if self.opts["utilization_mean"] == "train":
                train = ctx.features("train")[0]
                means = {m: np.mean(train[m], axis=0) for m in self.modalities}
            else:
                means = {m: np.asarray(method_state["latent_mean"][m]) for m in self.modalities}
            ctx.log(conditional_utilization(ctx.fuse, latents, labels, means, self.task))
        return method_state


__all__ = ["Greedy", "conditional_speeds", "conditional_utilization", "group_norms", "next_mode",
           "speed_group_codes", "step_speeds"]
