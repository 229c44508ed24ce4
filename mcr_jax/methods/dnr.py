r"""Diagnosing & Re-learning (Wei, Li, Feng, Hu; ECCV 2024, arXiv 2407.09705).

Training is the multi-loss :math:`L = \mathrm{CE}(\ell, y) + \lambda_{uni}\sum_m \mathrm{CE}(u_m, y)`.
Every ``reinit_epochs`` epochs (at most ``reinit_num`` times) each modality is *diagnosed* and its
encoder *softly re-initialised*:

1. **Diagnosis.** The separability of modality ``m``'s representation is measured by the purity of
   a k-means clustering (``C`` clusters, ``C`` the number of classes) of its latents
   :math:`z_m`, on the training split and on the validation split (features in evaluation mode,
   each split min–max scaled to [-1, 1] per feature first, as the reference does). Purity is the
   fraction of examples whose class is the majority class of their cluster. A large gap between
   training and validation purity means the encoder has learnt training-specific structure (it is
   well-learnt, or over-trained); a small gap means it is still learning.
2. **Re-learning.** The re-initialisation strength and the soft re-initialisation are

   .. math::
      \alpha_m = \tanh\big(\alpha \cdot |P^m_{train} - P^m_{val}|\big), \qquad
      \theta_m \leftarrow (1 - \alpha_m)\,\theta_m + \alpha_m\,\theta^0_m ,

   applied to every parameter of ``encoders/<m>`` (heads, fusion and batch statistics are kept).
   Well-learnt modalities are pulled back more, so they do not over-train while the others catch
   up; worse-learnt ones are barely touched.

Defaults (the authors' release, ``script/ours.sh``): ``alpha`` 3 (``--move_lambda``),
``reinit_epochs`` 20, ``reinit_num`` 3. ``uni_weight`` 1.0 (multi-loss; the release trains the fused
loss only — set 0 for that).

Choices (documented):

- ``reinit_target = "initial"`` (default): :math:`\theta^0` are the encoder parameters the run
  started from (the reference saves them at start). They are captured on the host by
  :meth:`DnR.init_method_state`, which the trainer calls with the starting parameters (also when it
  resumes, and after ``init.pretrained`` weights are loaded). ``"fresh"``: a newly initialised
  model's encoders, ``ctx.fresh_params(reinit_seed + k)`` for the ``k``-th re-initialisation.
- k-means: NumPy, k-means++ seeding (``kmeans_seed``), ``kmeans_iters`` Lloyd iterations, one
  initialisation (the reference uses scikit-learn's ``KMeans(random_state=0)``); an empty cluster
  keeps its previous centre.
- The schedule counts 1-based finished epochs: re-initialise after epochs ``reinit_epochs``,
  ``2·reinit_epochs``, … (the reference's ``epoch % 20 == 0, epoch > 0`` on 0-based epochs, one
  epoch later). The number done so far lives in ``method_state["reinits"]``, with the last
  diagnosis (``purity_train``, ``purity_val``, ``strength``, each ``[M]``).

Classification only (purity needs classes); any fusion head; any number of modalities M >= 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcr_jax.methods.base import Method, task_loss, unimodal_losses
from mcr_jax.methods.common import check_options

DEFAULTS = dict(alpha=3.0, reinit_epochs=20, reinit_num=3, uni_weight=1.0, kmeans_iters=20, kmeans_seed=0,
                reinit_target="initial", reinit_seed=0)
TARGETS = ("initial", "fresh")


# ---- diagnosis (NumPy) ---------------------------------------------------------------------------
def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Each feature (column) of ``x [N, D]`` mapped linearly to [-1, 1]; constant features → 0."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(axis=0, keepdims=True), x.max(axis=0, keepdims=True)
    span = hi - lo
    return np.where(span > 0, 2.0 * (x - lo) / np.where(span > 0, span, 1.0) - 1.0, 0.0)


def _sq_dists(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[N, K]`` (expanded form: no ``[N, K, D]`` temporary)."""
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Cluster assignments ``[N]`` of ``x [N, D]`` into ``k`` clusters (k-means++ seeding, Lloyd steps)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point.")
    k = min(int(k), n)
    rng = np.random.default_rng(seed)
    centres = x[[rng.integers(n)]]
    d2 = _sq_dists(x, centres)[:, 0]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ squared distance
        total = d2.sum()
        idx = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        centres = np.concatenate([centres, x[[idx]]])
        d2 = np.minimum(d2, _sq_dists(x, x[[idx]])[:, 0])
    assign = np.argmin(_sq_dists(x, centres), axis=1)
    for _ in range(max(int(iters), 1)):
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(axis=0)
        new = np.argmin(_sq_dists(x, centres), axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
    return assign


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of examples whose label is the most frequent label of their cluster."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels {labels.shape} and cluster assignments {clusters.shape} differ.")
    hits = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels[clusters == c], return_counts=True)
        hits += counts.max()
    return float(hits) / max(len(labels), 1)


def reinit_strength(purity_train: float, purity_val: float, alpha: float) -> float:
    """``tanh(alpha · |P_train − P_val|)``."""
    return float(np.tanh(alpha * abs(purity_train - purity_val)))


def soft_reinit(params, target_encoders, strengths):
    """``θ ← (1 − α_m) θ + α_m θ⁰`` on every leaf of ``encoders[m]``; every other leaf unchanged.

    ``target_encoders``: ``{m: θ⁰_m}`` with the structure of ``params["encoders"][m]``;
    ``strengths``: ``{modality: α_m}`` (modalities not named are left as they are).
    """
    new = jax.tree.map(lambda x: x, params)  # a new container; the arrays are shared
    for m, a in strengths.items():
        def mix(p, t, a=float(a)):
            return ((1.0 - a) * p + a * jnp.asarray(t, p.dtype)).astype(p.dtype)

        new["encoders"][m] = jax.tree.map(mix, params["encoders"][m], target_encoders[m])
    return new


class DnR(Method):
    """Multi-loss training with periodic diagnosis and soft re-initialisation of each encoder."""

    name = "dnr"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        check_options(config, DEFAULTS, "D&R")
        if self.task != "classification":
            raise ValueError("Diagnosing & Re-learning measures clustering purity against classes and is defined "
                             f"for classification only; dataset {info.name!r} is a {self.task} task.")
        o = {k: config.get(k, v) for k, v in DEFAULTS.items()}
        if o["reinit_target"] not in TARGETS:
            raise ValueError(f"method.reinit_target must be one of {TARGETS}; got {o['reinit_target']!r}.")
        if int(o["reinit_epochs"]) < 1 or int(o["reinit_num"]) < 0 or int(o["kmeans_iters"]) < 1:
            raise ValueError("method.reinit_epochs and method.kmeans_iters must be >= 1 and method.reinit_num >= 0; "
                             f"got {o['reinit_epochs']}, {o['kmeans_iters']}, {o['reinit_num']}.")
        self.opts = o
        self._initial = None

    # ---- training ----------------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = task_loss(out["logits"], batch["label"], batch.get("mask"), self.task)
        uni = unimodal_losses(out, batch, self.task, self.modalities)
        total = fused + float(self.opts["uni_weight"]) * sum(uni.values())
        return total, {"task": fused, **{f"uni_{m}": v for m, v in uni.items()}}, model

    def init_method_state(self, params):
        self._initial = jax.device_get(params["encoders"])  # θ⁰ for reinit_target="initial"
        m = len(self.modalities)
        return {"reinits": jnp.zeros((), jnp.int32), "purity_train": jnp.zeros((m,), jnp.float32),
                "purity_val": jnp.zeros((m,), jnp.float32), "strength": jnp.zeros((m,), jnp.float32)}

    # ---- diagnosis and re-learning -----------------------------------------------------------
    def due(self, epoch: int, reinits_done: int) -> bool:
        """Whether to re-initialise after (1-based) ``epoch``."""
        o = self.opts
        return epoch % int(o["reinit_epochs"]) == 0 and reinits_done < int(o["reinit_num"])

    def diagnose(self, train_feats, train_labels, val_feats, val_labels):
        """``{m: (P_train, P_val, α_m)}`` from ``{m: [N, D_m]}`` features of both splits."""
        o, k = self.opts, self.info.num_classes
        out = {}
        for m in self.modalities:
            p = [purity(y, kmeans(minmax_scale(f[m]), k, iters=int(o["kmeans_iters"]), seed=int(o["kmeans_seed"])))
                 for f, y in ((train_feats, train_labels), (val_feats, val_labels))]
            out[m] = (p[0], p[1], reinit_strength(p[0], p[1], float(o["alpha"])))
        return out

    def on_epoch_end(self, epoch, val_metrics, method_state, ctx):
        done = int(method_state["reinits"])
        if not self.due(int(epoch), done):
            return method_state
        train_feats, train_labels = ctx.features("train")
        val_feats, val_labels = ctx.features("validation")
        diag = self.diagnose(train_feats, train_labels, val_feats, val_labels)
        if self.opts["reinit_target"] == "initial":
            if self._initial is None:
                raise RuntimeError("D&R reinit_target='initial' needs init_method_state(params) to have been called "
                                   "with the starting parameters.")
            target = self._initial
        else:
            target = ctx.fresh_params(int(self.opts["reinit_seed"]) + done)["encoders"]
        strengths = {m: diag[m][2] for m in self.modalities}
        ctx.replace_params(soft_reinit(ctx.params, target, strengths))
        print(f"[dnr] epoch {epoch}: re-initialisation {done + 1}: " + ", ".join(
            f"{m} purity train {diag[m][0]:.3f} val {diag[m][1]:.3f} -> alpha {diag[m][2]:.3f}"
            for m in self.modalities), flush=True)
        col = lambda i: jnp.asarray([diag[m][i] for m in self.modalities], jnp.float32)
        return {"reinits": jnp.asarray(done + 1, jnp.int32), "purity_train": col(0), "purity_val": col(1),
                "strength": col(2)}
