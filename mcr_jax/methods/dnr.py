r"""Diagnosing & Re-learning (Wei, Li, Feng, Hu; ECCV 2024, arXiv 2407.09705).

Released code: GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py`` (``purity_score``,
``reinit_score``, ``reinit``, the loop in ``main``) and ``code/script/ours.sh``.

Training is the multi-loss :math:`L = \mathrm{CE}(\ell, y) + \lambda_{uni}\sum_m \mathrm{CE}(u_m, y)`.
Every ``reinit_epochs`` epochs (at most ``reinit_num`` times) each modality is *diagnosed* and its
encoder *softly re-initialised*:

1. **Diagnosis.** The separability of modality ``m``'s representation is measured by the purity of
   a k-means clustering (``C`` clusters, ``C`` the number of classes) of its latents
   :math:`z_m`, on the training split and on the validation split (features in evaluation mode).
   As the release: each split is scaled per feature to [-1, 1] by scikit-learn's
   ``MinMaxScaler(feature_range=(-1, 1))`` (a constant feature maps to -1), then clustered by
   scikit-learn's ``KMeans(n_clusters=C, random_state=kmeans_seed, n_init=kmeans_n_init)``
   (k-means++ seeding, Lloyd iterations to convergence: ``max_iter`` 300, ``tol`` 1e-4, the best of
   ``n_init`` runs by inertia). Purity is the fraction of examples whose class is the majority
   class of their cluster. A large gap between training and validation purity means the encoder
   has learnt training-specific structure (it is well-learnt, or over-trained); a small gap means
   it is still learning.
2. **Re-learning.** The re-initialisation strength and the soft re-initialisation are

   .. math::
      \alpha_m = \tanh\big(\alpha \cdot |P^m_{train} - P^m_{val}|\big), \qquad
      \theta_m \leftarrow (1 - \alpha_m)\,\theta_m + \alpha_m\,\theta^0_m ,

   applied to every parameter of ``encoders/<m>`` (the release: every parameter named
   ``audio_net`` / ``visual_net``; heads, fusion and batch statistics are kept, as there). Well-learnt
   modalities are pulled back more, so they do not over-train while the others catch up;
   worse-learnt ones are barely touched. The optimizer state is kept (the release keeps its SGD).

Defaults and whom they follow:

- ``alpha`` 3 (``--move_lambda 3``), ``reinit_epochs`` 20 (``--reinit_epoch``), ``reinit_num`` 3:
  the release's ``script/ours.sh``; ``kmeans_seed`` 0: the release's ``random_state=0``.
- ``kmeans_n_init`` 10: the release leaves ``n_init`` to scikit-learn, whose default was 10 up to
  scikit-learn 1.3 (since 1.4 it is ``"auto"``, a single k-means++ run); the MCR authors' port sets
  10 explicitly. ``"auto"`` is accepted to get today's library default.
- ``uni_weight`` 1.0 follows the **MCR authors**, whose D&R baseline is trained with the
  multi-loss (kkontras/MCR, ``configs/CREMA_D/release/vit/DnR.json``: ``multi_supervised_w``
  combined 1, per modality 1). The **release** trains the fused loss only (``ours.py``,
  ``train_epoch``: ``loss = loss_mm``): set ``uni_weight = 0`` for it.

Remaining differences from the release (stated):

- ``reinit_target = "initial"`` (default) re-initialises towards the parameters the run started
  from, as the release's ``init_para.pkl`` (saved right after the model is built). They are
  captured on the host by :meth:`DnR.init_method_state`, which the trainer calls with the starting
  parameters (also when it resumes, and after ``init.pretrained`` weights are loaded).
  ``"fresh"`` (an option of ours): a newly
  initialised model's encoders, ``ctx.fresh_params(reinit_seed + k)`` for the ``k``-th
  re-initialisation.
- Schedule: re-initialise after the 1-based epochs ``reinit_epochs``, ``2·reinit_epochs``, …
  The release checks ``epoch % reinit_epoch == 0 and epoch > 0`` after its 0-based epoch, i.e.
  after 1-based epochs ``reinit_epochs + 1``, ``2·reinit_epochs + 1``, … (one epoch later); the
  MCR authors' port makes the same check at the start of its 0-based epoch, which is this timing.
  As in both, only the first ``reinit_num`` due epochs re-initialise. The number done lives in
  ``method_state["reinits"]``, with the last diagnosis (``purity_train``, ``purity_val``,
  ``strength``, each ``[M]``).
- k-means++ seeding depends on the order of the rows: the release extracts training features
  through its shuffling loader, here they come in the split's order, so the clusters (and the
  purity) for the same features can differ from a given run of the release.
- A split with fewer examples than classes is clustered into as many clusters as examples (the
  release's ``KMeans`` would raise).
- Any number of modalities M >= 2 (the release has audio and visual).

The MCR authors' port (kkontras/MCR, ``agents/general_agent/helpers/Bias_Infusion.py``,
``Bias_Infusion_DnR``) differs from the release in ways not copied here: its ``reinit_score``
compares the training purity of modality 0 with the *validation purity of modality 1*
(``val_features["g"]`` twice), and its ``reinit`` also mixes parameters named ``fc_0`` / ``fc_1``.

Classification only (purity needs classes); any fusion head.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import MinMaxScaler

from mcr_jax import progress
from mcr_jax.methods.base import Method, unimodal_losses

DEFAULTS = dict(alpha=3.0, reinit_epochs=20, reinit_num=3, uni_weight=1.0, kmeans_n_init=10, kmeans_seed=0,
                reinit_target="initial", reinit_seed=0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(alpha=[1.0, 3.0, 5.0], reinit_epochs=[5, 10, 20])
TARGETS = ("initial", "fresh")


# ---- diagnosis (NumPy / scikit-learn, on the host) -----------------------------------------------
def _as_float(x) -> np.ndarray:
    """``x`` as a float array, keeping float32 / float64 as given (the release clusters float32)."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def minmax_scale(x) -> np.ndarray:
    """Each feature (column) of ``x [N, D]`` mapped linearly to [-1, 1] by scikit-learn's
    ``MinMaxScaler(feature_range=(-1, 1))``; a constant feature maps to -1."""
    return MinMaxScaler(feature_range=(-1, 1)).fit_transform(_as_float(x))


def kmeans(x, k: int, *, n_init: int | str = 10, seed: int = 0) -> np.ndarray:
    """Cluster assignments ``[N]`` of ``x [N, D]``: scikit-learn's
    ``KMeans(n_clusters=k, random_state=seed, n_init=n_init)`` (``k`` is capped at ``N``)."""
    x = _as_float(x)
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point.")
    with warnings.catch_warnings():  # fewer distinct points than clusters: a valid, degenerate case
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=min(int(k), n), random_state=seed, n_init=n_init).fit_predict(x)


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
        self.require_classes("it measures clustering purity against classes")
        o = self.opts
        if o["reinit_target"] not in TARGETS:
            raise ValueError(f"method.reinit_target must be one of {TARGETS}; got {o['reinit_target']!r}.")
        if int(o["reinit_epochs"]) < 1 or int(o["reinit_num"]) < 0:
            raise ValueError("method.reinit_epochs must be >= 1 and method.reinit_num >= 0; "
                             f"got {o['reinit_epochs']} and {o['reinit_num']}.")
        n_init = o["kmeans_n_init"]
        integer = isinstance(n_init, (int, np.integer)) and not isinstance(n_init, bool)
        if not (n_init == "auto" or (integer and n_init >= 1)):
            raise ValueError(f"method.kmeans_n_init must be an integer >= 1 or 'auto'; got {n_init!r}.")

    # ---- training ----------------------------------------------------------------------------
    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = self.task.loss(out["logits"], batch["label"], batch.get("mask"))
        uni = unimodal_losses(out, batch, self.task, self.modalities)
        total = fused + float(self.opts["uni_weight"]) * sum(uni.values())
        return total, {"task": fused, **{f"uni_{m}": v for m, v in uni.items()}}, model

    def init_method_state(self, params, rest=None):
        """Counters and the last diagnosis; with ``reinit_target="initial"`` also θ⁰, the encoders'
        starting parameters (checkpointed with the run, so a resumed run re-initialises towards the
        same θ⁰)."""
        m = len(self.modalities)
        state = {"reinits": jnp.zeros((), jnp.int32), "purity_train": jnp.zeros((m,), jnp.float32),
                 "purity_val": jnp.zeros((m,), jnp.float32), "strength": jnp.zeros((m,), jnp.float32)}
        if self.opts["reinit_target"] == "initial":
            state["initial"] = jax.tree.map(jnp.array, params["encoders"])
        return state

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
            p = [purity(y, kmeans(minmax_scale(f[m]), k, n_init=o["kmeans_n_init"], seed=int(o["kmeans_seed"])))
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
            target = method_state["initial"]
        else:
            target = ctx.fresh_params(int(self.opts["reinit_seed"]) + done)["encoders"]
        strengths = {m: diag[m][2] for m in self.modalities}
        ctx.replace_params(soft_reinit(ctx.params, target, strengths))
        progress.say(f"[dnr] epoch {epoch}: re-initialisation {done + 1}: " + ", ".join(
            f"{m} purity train {diag[m][0]:.3f} val {diag[m][1]:.3f} -> alpha {diag[m][2]:.3f}"
            for m in self.modalities), detail=True)
        col = lambda i: jnp.asarray([diag[m][i] for m in self.modalities], jnp.float32)
        return {**method_state, "reinits": jnp.asarray(done + 1, jnp.int32), "purity_train": col(0),
                "purity_val": col(1), "strength": col(2)}
