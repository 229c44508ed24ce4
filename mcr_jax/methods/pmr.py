r"""PMR: prototypical modal rebalance (Fan, Xu, Wang, Wang, Wei; CVPR 2023, arXiv 2211.07089).

Released code: ``fanyunfeng-bit/Modal-Imbalance-PMR`` (commit 1e5c79b, "upload", the code;
the repository has three commits: 107e07c adds the licence and README, 3615e48 merges the two
without changing the code, so its code is that of 1e5c79b),
``main_Prototype_grad.py``: ``EU_dist``, ``calculate_prototype``, ``train_epoch`` (the branch
``args.modulation == 'Proto'``) and ``main`` (when prototypes are computed); run lines in ``bash.sh``.

The rule
--------
Each modality's encoder gives latents :math:`z_m`. After every epoch the **prototypes** are the
class means of the training latents (evaluation mode),

.. math::
   \hat c_{m,k} = \frac{1}{N_k} \sum_{i: y_i = k} z_{m,i}, \qquad
   c_{m,k} \leftarrow (1 - \mu)\, \hat c_{m,k} + \mu\, c_{m,k}

(:math:`\mu` = ``momentum``; the first computation is not mixed). A modality's non-parametric,
prototype-based prediction is the softmax of negative Euclidean distances,

.. math::
   p_m(k \mid x_i) = \mathrm{softmax}_k\big(-\lVert z_{m,i} - c_{m,k} \rVert_2 / \tau\big),

its **prototypical cross-entropy** :math:`L^{PCE}_m = -\frac{1}{B}\sum_i \log p_m(y_i \mid x_i)`
(mean over valid rows), its batch score :math:`s_m = \sum_i p_m(y_i \mid x_i)` and the imbalance
ratio :math:`\rho_m = s_m / \bar s_{-m}` (:math:`\bar s_{-m}`: mean score of the other modalities;
for M = 2 the release's ``ratio_a_p = score_a_p / score_v_p``). Per step, inside the modulation
window, the loss is

.. math::
   L = \mathrm{CE}(\ell, y) + \sum_m \beta_m L^{PCE}_m, \qquad
   \beta_m = \alpha \;\text{ if } \rho_m < 1, \qquad \beta_m = 0 \text{ otherwise},

i.e. only the slower (weaker) modality is pulled towards its prototypes; for M = 2 with equal
scores neither is (as the release). The coefficients are constants of the step (no gradient
through :math:`\rho`), the prototypes are constants. Outside the window: the plain fused CE.

Optional **prototypical entropy regularisation** (the paper's PER; *not in the released code*):
in 1-based epochs ``<= entropy_epochs`` the dominant modalities (:math:`\rho_m > 1`) get
:math:`-\,\lambda_{H} \cdot \frac{1}{B}\sum_i H\big(p_m(\cdot \mid x_i)\big)` added to the loss
(their prototype predictions are kept from collapsing early). Off by default (``entropy_weight``
0), as the release, whose training never computes it.

Defaults (``DEFAULTS``) and whom they follow
--------------------------------------------
- ``alpha`` 2.0: ``bash.sh``, the CREMA-D / AVE concat-fusion ``--modulation Proto`` runs
  (``--alpha 2.0``; the argparse default is 1.0, other lines use 0.5-3.0).
- ``start_epoch`` 1, ``end_epoch`` 71: the release's window ``modulation_starts <= epoch <=
  modulation_ends`` over **0-based** epochs with ``--modulation_starts 0 --modulation_ends 70``
  (``bash.sh``; argparse default 100), i.e. 1-based epochs 1..71, both ends inclusive.
- ``momentum`` 0.0: ``--momentum_coef 0.0`` in every ``bash.sh`` PMR line (argparse default 0.2).
- ``temperature`` 1.0: the release divides by nothing (its ``--temperature 0.1`` is never read).
- ``entropy_weight`` 0.0, ``entropy_epochs`` 10: ours (PER is not in the release; see above).

Differences from the release (all of them we know of)
-----------------------------------------------------
1. **First epoch.** The release computes prototypes from the *initial* model before epoch 0, so
   PCE acts from the first step. Here the method state only gets parameters, not data, so the
   first prototypes are those after 1-based epoch 1; during epoch 1 PCE is off (metric
   ``proto_ready`` 0). From then on the timing matches (prototypes of the model after the
   previous epoch; the first computation unmixed, later ones mixed with ``momentum``).
2. **Which examples.** The release (CREMA-D, VGGSound, KineticsSounds) averages only the first
   ``len(loader) // 10`` batches of its *shuffled* training loader (~10 % of the data, a new random
   subset each epoch); for AVE and CGMNIST the validation split. Here: the whole split
   ``proto_split`` (default ``"train"``; ``"validation"`` for the AVE/CGMNIST setting), padding
   removed, every example.
3. **Empty classes.** A class absent from the split gives NaN prototypes in the release (0 / 0);
   here the class keeps its previous prototype (zeros before the first computation).
4. **Distance.** :math:`\sqrt{\max(d^2, 10^{-12})}` instead of ``sqrt`` (finite gradient when a
   latent equals a prototype); vectorised instead of the release's double loop.
5. **Padding rows** are left out of every term (the release has no padding).
6. **M modalities.** :math:`\rho_m` against the mean score of the others (as our OGM-GE); for
   M = 2 this is exactly the release's rule (``ratio_a_p > 1`` → visual coefficient ``alpha``;
   ``< 1`` → audio; ``== 1`` → none).
7. **Fusion.** Any fusion head (the rule reads latents only, as the release's ``film``/``gated``
   runs). The release's ``out_a``/``out_v`` branch scores are only logged there, not used: omitted.
8. ``temperature`` and PER (``entropy_*``) are options of ours (see above); the defaults reproduce
   the release.
9. Optimiser, learning-rate schedule, batch size: the experiment's (release: SGD momentum 0.9,
   weight decay 1e-4, lr 1e-3, StepLR 70 / 0.1, batch 64).

Classification only (prototypes are class means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, current_epoch

DEFAULTS = dict(alpha=2.0, start_epoch=1, end_epoch=71, momentum=0.0, temperature=1.0, proto_split="train",
                entropy_weight=0.0, entropy_epochs=10)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(alpha=[0.5, 1.0, 2.0, 3.0])
SPLITS = ("train", "validation")


# ---- the rule (pure JAX) ---------------------------------------------------------------------
def proto_logits(z: jax.Array, protos: jax.Array, temperature=1.0) -> jax.Array:
    """``-‖z_i − c_k‖₂ / τ``: ``[B, D]``, ``[C, D]`` → ``[B, C]``."""
    diff = z[:, None, :] - protos[None, :, :].astype(z.dtype)
    d2 = jnp.sum(diff * diff, axis=-1)
    return -jnp.sqrt(jnp.maximum(d2, 1e-12)) / temperature


def pce_loss(logits: jax.Array, labels: jax.Array, mask=None) -> jax.Array:
    """Prototypical cross-entropy: mean over valid rows of ``-log softmax(logits)[y]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]
    return masked_mean(nll, mask)


def proto_entropy(logits: jax.Array, mask=None) -> jax.Array:
    """Mean over valid rows of the entropy of ``softmax(logits)``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return masked_mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1), mask)


def proto_scores(logits: dict, labels, mask, names) -> jax.Array:
    """``[M]``: ``s_m = Σ_i softmax(logits_m)[i, y_i]`` over valid rows."""
    w = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    out = []
    for m in names:
        p = jax.nn.softmax(logits[m], axis=-1)
        out.append(jnp.sum(jnp.take_along_axis(p, labels.astype(jnp.int32)[:, None], axis=1)[:, 0] * w))
    return jnp.stack(out)


def imbalance_ratios(scores: jax.Array) -> jax.Array:
    """``ρ_m = s_m / mean_{k≠m} s_k`` (``[M]``)."""
    n = scores.shape[0]
    others = (jnp.sum(scores) - scores) / (n - 1)
    return scores / others


def pce_coefficients(ratios: jax.Array, alpha) -> jax.Array:
    """``β_m = α`` where ``ρ_m < 1`` (the slower modalities), else 0."""
    return jnp.where(ratios < 1.0, jnp.asarray(alpha, jnp.float32), 0.0)


# ---- prototypes (NumPy, on the host) ----------------------------------------------------------
def class_means(features, labels, num_classes: int, previous=None):
    """``([C, D] class means, [C] counts)`` in float64; a class without examples keeps its row of
    ``previous`` (zeros when None)."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels).astype(np.int64)
    sums = np.zeros((num_classes, f.shape[1]))
    np.add.at(sums, y, f)
    counts = np.bincount(y, minlength=num_classes)[:num_classes]
    prev = np.zeros_like(sums) if previous is None else np.asarray(previous, np.float64)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], prev)
    return means, counts


def update_prototypes(new_means, old, momentum: float, first: bool):
    """``(1 − μ)·new + μ·old`` (just ``new`` the first time)."""
    new_means = np.asarray(new_means, np.float64)
    return new_means if first else (1.0 - momentum) * new_means + momentum * np.asarray(old, np.float64)


class PMR(Method):
    """Fused CE plus α · prototypical CE of the slower modality (prototypes: class means per epoch)."""

    name = "pmr"
    traceable = ("alpha", "entropy_weight")

    def __init__(self, config, info):
        super().__init__(config, info)
        self.require_classes("prototypes are class means of the latents")
        o = self.opts
        if len(self.modalities) < 2:
            raise ValueError(f"pmr needs at least two modalities; got {self.modalities}.")
        if o["proto_split"] not in SPLITS:
            raise ValueError(f"method.proto_split must be one of {SPLITS}; got {o['proto_split']!r}.")
        if not 0.0 <= float(o["momentum"]) < 1.0:
            raise ValueError(f"method.momentum must be in [0, 1); got {o['momentum']}.")
        if float(o["temperature"]) <= 0:
            raise ValueError(f"method.temperature must be > 0; got {o['temperature']}.")
        if float(o["alpha"]) < 0 or float(o["entropy_weight"]) < 0:
            raise ValueError("method.alpha and method.entropy_weight must be >= 0; "
                             f"got {o['alpha']} and {o['entropy_weight']}.")

    def check_model(self, model) -> None:
        dims = getattr(model, "latent_dims", None)
        if dims is None or any(m not in dims for m in self.modalities):
            raise ValueError(f"pmr needs a model with per-modality latents (latent_dims); got {dims}.")

    def init_method_state(self, params, rest=None):
        """``ready`` (prototypes computed) and the
        prototypes ``protos[m]`` ``[C, D_m]`` (zeros until the end of epoch 1); ``D_m`` is read from
        the parameters (the unimodal head ``heads[m]`` maps the latent ``[D_m]`` to the classes)."""
        c = int(self.info.num_classes)
        return {"ready": jnp.zeros((), jnp.int32),
                "protos": {m: jnp.zeros((c, d), jnp.float32) for m, d in self.latent_dims(params).items()}}

    def latent_dims(self, params) -> dict[str, int]:
        """``{m: D_m}`` from the parameters: the input size of the unimodal head ``heads[m]``."""
        try:
            return {m: int(params["heads"][m]["kernel"].shape[0]) for m in self.modalities}
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"pmr reads each modality's latent size from the parameters' unimodal heads "
                             f"(params['heads'][m]['kernel'] [D_m, C]); these parameters have none ({e!r}).") from e

    # ---- training ----------------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        o, names = self.opts, self.modalities
        labels, mask = batch["label"], batch.get("mask")
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = self.task.loss(out["logits"], labels, mask)
        tau = float(o["temperature"])
        logits = {}
        for m in names:
            z = out["latents"][m]
            if z.ndim != 2:
                raise ValueError(f"pmr needs [B, D] latents; modality {m!r} gives shape {z.shape}.")
            logits[m] = proto_logits(z, jax.lax.stop_gradient(method_state["protos"][m]), tau)
        pce = {m: pce_loss(logits[m], labels, mask) for m in names}
        scores = jax.lax.stop_gradient(proto_scores(logits, labels, mask, names))
        ratios = imbalance_ratios(scores)
        epoch = current_epoch(handle)
        ready = method_state["ready"] > 0
        active = ready & (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        coeffs = jnp.where(active, pce_coefficients(ratios, self.hp("alpha", float(o["alpha"]))), 0.0)
        total = fused + sum(coeffs[i] * pce[m] for i, m in enumerate(names))
        metrics = {"task": fused, "proto_ready": ready.astype(jnp.float32),
                   **{f"pce_{m}": pce[m] for m in names}, **{f"ratio_{m}": ratios[i] for i, m in enumerate(names)},
                   **{f"coeff_{m}": coeffs[i] for i, m in enumerate(names)}}
        if float(o["entropy_weight"]) > 0 or self.tuned("entropy_weight"):
            ent = {m: proto_entropy(logits[m], mask) for m in names}
            early = ready & (epoch <= int(o["entropy_epochs"]))
            w = jnp.where(early & (ratios > 1.0), self.hp("entropy_weight", float(o["entropy_weight"])), 0.0)
            total = total - sum(w[i] * ent[m] for i, m in enumerate(names))
            metrics.update({f"entropy_{m}": ent[m] for m in names})
        return total, metrics, model

    # ---- prototypes --------------------------------------------------------------------------
    def compute_prototypes(self, features, labels, method_state):
        """The next ``protos`` (``{m: float32 [C, D_m]}``) from a split's latents."""
        first = int(method_state["ready"]) == 0
        mu = float(self.opts["momentum"])
        new = {}
        for m in self.modalities:
            old = np.asarray(method_state["protos"][m])
            means, _ = class_means(features[m], labels, int(self.info.num_classes), previous=old)
            new[m] = jnp.asarray(update_prototypes(means, old, mu, first), jnp.float32)
        return new

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        """Prototypes of the model after ``epoch``."""
        features, labels = ctx.features(self.opts["proto_split"])
        protos = self.compute_prototypes(features, labels, method_state)
        return {"ready": jnp.ones((), jnp.int32),
                "protos": protos}
