r"""OPM: on-the-fly prediction modulation (drop the dominant modality's feature, rescale the kept ones).

Wei, Hu, Du, Wen, *On-the-fly Modulation for Balanced Multimodal Learning*, IEEE TPAMI 2024 (the
journal extension of OGM-GE, CVPR 2022). Released code: ``GeWu-Lab/BML_TPAMI2024`` (read at commit
``4b3aa4f``, 2024-09-29, the newest snapshot): ``code/models/Classifier.py`` (``calcu_q``,
``Modality_drop.execute_drop``, ``custom_autograd``, ``Classifier.forward``), ``code/main.py``
(``train``, ``get_arguments``) and ``code/scripts/train_opm.sh``.

The rule
--------
Per step, with linear late fusion :math:`\ell = \sum_m z_m W_m + b`, every modality's branch of the
fused prediction gives a score summed over the (valid rows of the) batch — the same score as OGM-GE,

.. math::
   s_m = \sum_i \mathrm{softmax}\big(z_{m,i} W_m + b / M\big)_{y_i},
   \qquad \rho_m = s_m / \bar s_{-m}

(:math:`\bar s_{-m}` the mean of the other modalities' scores; M = 2: the released
``performance_1 / performance_2``). The **drop probability** of modality m (per batch) is

.. math::
   q_m = \mathrm{clip}\Big(q_{base}\big(1 + \lambda \tanh(\rho_m - 1)\big), 0, 1\Big)
   \;\text{ if } \rho_m > 1, \qquad q_m = 0 \text{ otherwise}

(``calcu_q``: ``ratio = tanh(relu(p1/p2 - 1))``; ``q = q_base * (1 + lam * ratio) if ratio > 0 else
0``; ``clip(q, 0, 1)``): only the dominant modality is ever dropped, with a probability between
:math:`q_{base}` and :math:`q_{base}(1+\lambda)`. Then (``execute_drop``):

- with probability :math:`p_{exe}` **per batch** the drop is executed (``np.random.rand(1) >= 1 -
  p_exe``); otherwise the step is the plain joint step (no drop, no rescaling);
- when executed: **per sample and per modality** a keep mask :math:`\kappa_{m,i} \sim
  \mathrm{Bernoulli}(1 - q_m)`, and every modality's latent becomes
  :math:`\tilde z_{m,i} = \kappa_{m,i} z_{m,i} / (1 - \theta)` with
  :math:`\theta = \sum_m d_m q_m / \sum_m d_m` (the latent dimensions :math:`d_m`: the expected
  dropped fraction of the concatenated feature; all modalities are rescaled, also the never-dropped
  ones); rows where every modality was dropped are removed from the batch (never happens: the weakest
  modality has :math:`\rho \le 1`, so :math:`q = 0`);
- the fused prediction is the ordinary fusion head on the dropped latents,
  :math:`\tilde\ell = \mathrm{fuse}(\tilde z)` — here ``model.fuse`` on the zeroed and rescaled
  **latents** (the release's ``ConcatFusion`` on ``cleaned_fea``: the shared bias stays; with linear
  fusion, :math:`\tilde\ell_i = \sum_m \kappa_{m,i}\, z_{m,i} W_m / (1 - \theta) + b`: the dropped
  branch's logits are zeroed **and** every kept branch's logits are scaled by :math:`1/(1-\theta)`,
  the bias unscaled — a drop is not the plain removal of a branch), and the loss is the fused
  cross-entropy :math:`\mathrm{CE}(\tilde\ell, y)` averaged over the kept rows (``loss.backward()``
  on ``loss_fn(out, label)`` only; the branch losses ``loss_1``/``loss_2`` are logged, not trained).

Drops start after a warm-up: ``warm_up = 1 if epoch <= 5`` with 0-based epochs, i.e. the first
dropped epoch is the 0-based epoch 6 = the trainer's 1-based epoch **7** (``start_epoch``); no end.
Evaluation (``val``: ``warm_up=1``) never drops: :meth:`OPM.predict` is the plain fused prediction.

Options (``method`` section) and their defaults (``DEFAULTS``)
--------------------------------------------------------------
The release has one dataset (Kinetics-Sounds) and one script, ``scripts/train_opm.sh``: ``--q_base 0.5
--lam 0.5 --p_exe 0.7`` (also ``get_arguments``' defaults, which override ``Config``'s unused
``q_base = 0.4``); no CREMA-D script is released, so these are the defaults here:

- ``q_base`` = 0.5, ``lam`` = 0.5 (λ), ``p_exe`` = 0.7 — all three may be traced (study axes);
- ``start_epoch`` = 7: the first (1-based) epoch with drops (the release's 6-epoch warm-up);
- ``release_theta_grad`` = False: see "differences" — True reproduces the release's spurious
  gradient of θ exactly.

The release's OGM variant (not a separate method here)
------------------------------------------------------
``code/main.py`` ``train`` (``--use_modulation``; ``scripts/train_ogm.sh``: ``--alpha 0.8
--modulation_starts 0 --modulation_ends 60``, ``--modulation`` left at its default ``OGM_GE``) is
the OGM-GE of ``GeWu-Lab/OGM-GE_CVPR2022`` — the same score (branch softmax with ``b/2``, summed over
the batch), the same coefficient ``1 - tanh(alpha * relu(ratio))`` for the dominant modality only, the
same GE noise ``N(0, (grad.std() + 1e-8)^2)`` on both encoders' 4-D gradients inside the window (plain
``grad *= coeff`` with ``--modulation OGM``) — except that it also waits for the same warm-up
(``if warm_up == 0 and cfg.use_modulation``) and is computed on the same forward pass. It is therefore
our ``ogm_ge`` with ``alpha=0.8, start_epoch=7, end_epoch=61, ge=True`` (``modulate="auto"`` or
``"conv_kernels"`` for CNN encoders): 0-based epochs 6…60. Two immaterial differences: on an exact tie
of the scores the release slows modality 2 (``else`` branch), ours slows none; and the unused flag
``--use_OGM_plus`` (coefficient 4 for the *weak* modality's kernels instead of slowing the dominant
one; in no script) is not implemented.

Differences from the released code
----------------------------------
- **θ's gradient (release quirk, off by default)**: ``custom_autograd.backward`` returns ``theta``
  itself as the gradient of ``theta``, and ``theta`` carries autograd history (``q[0] = q_base * (1 +
  lam * ratio_1)`` copies a tensor computed from the scores into ``q``; the scores' branch logits use
  the *detached* ``W`` and ``b`` but the live encoder outputs). So every executed drop adds the
  gradient of :math:`\theta^2 / 2` through :math:`\theta(q(\rho(s)))` into **both encoders** (not the
  fusion head): it pushes the dominant modality's branch score down and the other's up. This is an
  autograd slip (the intended backward is the 1/(1-θ) rescale alone), so it is left out by default;
  ``release_theta_grad=True`` adds exactly that gradient (with no change to the loss value).
- **M > 2**: :math:`\rho_m` compares modality m with the *mean* of the others' scores (as our
  OGM-GE), so several modalities may be dropped; θ weights every modality's q by its latent size.
  The release is written for two modalities of equal size (``D = fead_list[0].shape[1]``); here
  latent sizes may differ. For M = 2 the rule is the release's.
- **Padding rows**: the batch mask removes padded rows from the scores and the loss (the release has
  no padding); the loss is the mean over valid rows with at least one kept modality.
- **Random draws**: JAX's generator from the step key (the release: ``np.random`` for the execution
  draw, ``torch.distributions.Bernoulli`` for the mask); same distributions. A batch in which every
  row is dropped (impossible, see above) gives a zero loss and zero gradients here; the release skips
  the optimizer step (``continue``).
- **Optimizer / schedule**: the trainer's (the release: AdamW, lr 5e-5, weight decay 0.01, StepLR
  40 × 0.1, 100 epochs, batch 32).
- **Only classification** (the score is a softmax probability of the true class) and only a
  **separable** fusion head (the score needs the branch :math:`z_m W_m`); both raise ``ValueError``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mcr_jax.methods.base import Method, current_epoch
from mcr_jax.methods.common import others_mean, true_class_prob

DEFAULTS = dict(q_base=0.5, lam=0.5, p_exe=0.7, start_epoch=7, release_theta_grad=False)
#: the tuning grid of a study (mcr_jax.study): the base drop probability around the released 0.5
#: (``Config`` has 0.4).
GRID = dict(q_base=[0.3, 0.4, 0.5, 0.6])

# ----------------------------------------------------------------------------------------------
# The rule.


def opm_ratios(scores: jax.Array) -> jax.Array:
    """``ρ_m = s_m / mean_{j≠m} s_j`` for scores ``[M]`` (the denominator floored at 1e-12)."""
    return scores / jnp.maximum(others_mean(scores), 1e-12)


def drop_probabilities(scores: jax.Array, q_base, lam) -> jax.Array:
    """``q_m = clip(q_base (1 + λ tanh(ρ_m − 1)), 0, 1)`` where ``ρ_m > 1``, else 0 (``[M]``)."""
    rho = opm_ratios(scores)
    q = jnp.where(rho > 1.0, q_base * (1.0 + lam * jnp.tanh(jnp.maximum(rho - 1.0, 0.0))), 0.0)
    return jnp.clip(q, 0.0, 1.0)


def drop_theta(q: jax.Array, dims) -> jax.Array:
    """``θ = Σ_m d_m q_m / Σ_m d_m`` (the rescaling of the kept features is ``1 / (1 − θ)``)."""
    d = jnp.asarray(dims, q.dtype)
    return jnp.sum(d * q) / jnp.sum(d)


def draw_drops(key: jax.Array, q: jax.Array, batch_size: int, p_exe):
    """The step's random draws: ``(execute [] bool, keep [M, B] bool)``.

    ``execute``: the drop is executed this batch (probability ``p_exe``); ``keep[m, i]``:
    ``Bernoulli(1 − q_m)`` per sample and modality."""
    k_exe, k_keep = jax.random.split(key)
    execute = jax.random.uniform(k_exe, ()) >= 1.0 - p_exe
    keep = jax.random.uniform(k_keep, (q.shape[0], batch_size)) < (1.0 - q)[:, None]
    return execute, keep


def drop_latents(latents, names, keep, theta, execute):
    """``{m: κ_m z_m / (1 − θ)}`` when ``execute``, else the latents unchanged."""
    scale = jnp.where(execute, 1.0 / (1.0 - theta), 1.0)
    out = {}
    for i, m in enumerate(names):
        k = jnp.where(execute, keep[i], True).astype(latents[m].dtype)
        out[m] = latents[m] * k[:, None] * scale.astype(latents[m].dtype)
    return out


class OPM(Method):
    """OPM (see the module docstring). Classification with a separable fusion head, any M >= 2."""

    name = "opm"
    reports_unimodal_heads = False
    traceable = ("q_base", "lam", "p_exe")

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("its score is the softmax probability of the true class")
        if len(self.modalities) < 2:
            raise ValueError(f"opm needs at least two modalities; got {list(self.modalities)}.")
        o = self.opts
        for k in ("q_base", "lam", "p_exe"):
            if float(o[k]) < 0:
                raise ValueError(f"method.{k} must be >= 0; got {o[k]}.")
        if float(o["q_base"]) > 1 or float(o["p_exe"]) > 1:
            raise ValueError(f"method.q_base and method.p_exe are probabilities (<= 1); got q_base={o['q_base']}, "
                             f"p_exe={o['p_exe']}.")
        if int(o["start_epoch"]) < 1:
            raise ValueError(f"method.start_epoch is a 1-based epoch (>= 1); got {o['start_epoch']}.")

    def check_model(self, model) -> None:
        self.require_separable(model, "its per-modality score is the fused prediction's branch z_m W_m + b/M")

    def loss(self, handle, params, batch, key, method_state):
        names, labels, mask = self.modalities, batch["label"], batch.get("mask")
        num, o = len(names), self.opts
        model = handle.train_model(params)
        out = self.forward(model, batch)
        latents = out["latents"]
        batch_size = labels.shape[0]
        valid = jnp.ones((batch_size,), jnp.float32) if mask is None else mask.astype(jnp.float32)

        def scores_of(fusion, lat):
            branches = fusion.branch_logits(lat)
            shared = fusion.shared_offset()[None] / num
            return jnp.stack([jnp.sum(true_class_prob(branches[m] + shared, labels) * valid) for m in names])

        q_base, lam = self.hp("q_base", float(o["q_base"])), self.hp("lam", float(o["lam"]))
        p_exe = self.hp("p_exe", float(o["p_exe"]))
        scores = jax.lax.stop_gradient(scores_of(model.fusion, latents))
        q = drop_probabilities(scores, q_base, lam)
        active = current_epoch(handle) >= int(o["start_epoch"])
        q = jnp.where(active, q, 0.0)
        dims = [int(latents[m].shape[-1]) for m in names]
        theta = drop_theta(q, dims)
        execute, keep = draw_drops(key, q, batch_size, p_exe)
        execute = execute & active
        dropped = drop_latents(latents, names, keep, theta, execute)
        logits = model.fuse(dropped)
        kept_row = jnp.where(execute, jnp.any(keep, axis=0), True).astype(jnp.float32)
        task = self.task.loss(logits, labels, valid * kept_row)
        total = task
        if o["release_theta_grad"]:
            # The release's custom backward hands θ the gradient θ (see the module docstring): the
            # gradient of θ²/2 through the scores, whose branch logits use the detached fusion weights.
            frozen = handle.eval_model(jax.lax.stop_gradient(params))
            q_live = drop_probabilities(scores_of(frozen.fusion, latents), q_base, lam)
            theta_live = drop_theta(jnp.where(active, q_live, 0.0), dims)
            quirk = jax.lax.stop_gradient(theta) * theta_live
            total = total + jnp.where(execute, quirk - jax.lax.stop_gradient(quirk), 0.0)
        rho = opm_ratios(scores)
        kept = {m: jnp.sum(jnp.where(execute, keep[i], True) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
                for i, m in enumerate(names)}
        metrics = {"task": task, "theta": theta, "executed": execute.astype(jnp.float32),
                   **{f"ratio_{m}": rho[i] for i, m in enumerate(names)},
                   **{f"q_{m}": q[i] for i, m in enumerate(names)},
                   **{f"kept_{m}": kept[m] for m in names}}
        return total, metrics, model
