"""Evaluation metrics (host-side NumPy): classification, regression, per-head tables, error groups,
Shapley modality contributions.

All functions take whole-split arrays (padding already removed) and return plain Python floats so
the results serialise to JSON directly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``[N, C]`` scores against ``[N]`` integer labels."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels)) if len(labels) else float("nan")


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    top = np.argsort(-logits, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def macro_f1(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1 (classes absent from both predictions and labels count 0,
    as in scikit-learn's ``f1_score(average="macro", labels=range(C))``)."""
    num_classes = int(num_classes or logits.shape[-1])
    pred = np.argmax(logits, axis=-1)
    scores = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """ECE with ``num_bins`` equal-width confidence bins: Σ_b (n_b / N) |acc_b − conf_b|."""
    probs = softmax(logits)
    conf = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if np.any(sel):
            ece += np.mean(sel) * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro-F1, ECE, and top-5 accuracy when there are more than 5 classes."""
    logits, labels = np.asarray(logits), np.asarray(labels).astype(np.int64)
    out = {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels),
        "ece": expected_calibration_error(logits, labels),
    }
    if logits.shape[-1] > 5:
        out["top5"] = top_k_accuracy(logits, labels, 5)
    return out


def regression_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Sentiment-regression metrics (CMU-MOSI/MOSEI convention).

    - ``binary_accuracy``: sign agreement on samples whose label is non-zero (positive = ``> 0``);
    - ``mae``; ``corr``: Pearson correlation; ``acc7``: 7-class accuracy after rounding both to
      integers clipped to ``[-3, 3]``.
    """
    pred = np.asarray(pred, np.float64).reshape(-1)
    labels = np.asarray(labels, np.float64).reshape(-1)
    nonzero = labels != 0
    binary = float(np.mean((pred[nonzero] > 0) == (labels[nonzero] > 0))) if np.any(nonzero) else float("nan")
    if pred.std() > 0 and labels.std() > 0:
        corr = float(np.corrcoef(pred, labels)[0, 1])
    else:
        corr = float("nan")
    acc7 = float(np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(labels, -3, 3))))
    return {"binary_accuracy": binary, "mae": float(np.mean(np.abs(pred - labels))), "corr": corr, "acc7": acc7}


def error_groups(fused_logits: np.ndarray, unimodal: Mapping[str, np.ndarray], labels: np.ndarray) -> list[dict]:
    """The error-group table: which unimodal heads are right, and the fused accuracy in each group.

    Groups: every unimodal head right; only modality ``m`` right (one row per modality); some but
    not all right, other combinations (M > 2); all unimodal heads wrong. Each row:
    ``{"group", "count", "fraction", "fused_accuracy"}``.
    """
    labels = np.asarray(labels).astype(np.int64)
    names = list(unimodal)
    right = np.stack([np.argmax(unimodal[m], axis=-1) == labels for m in names], axis=1)
    fused_right = np.argmax(fused_logits, axis=-1) == labels
    n_right = right.sum(axis=1)
    groups = [("all unimodal right", n_right == len(names))]
    for i, m in enumerate(names):
        groups.append((f"only {m} right", (n_right == 1) & right[:, i]))
    if len(names) > 2:
        groups.append(("several but not all right", (n_right > 1) & (n_right < len(names))))
    groups.append(("all unimodal wrong", n_right == 0))
    rows = []
    for name, sel in groups:
        count = int(sel.sum())
        rows.append({
            "group": name,
            "count": count,
            "fraction": float(count / max(len(labels), 1)),
            "fused_accuracy": float(fused_right[sel].mean()) if count else float("nan"),
        })
    return rows


def subset_key(subset) -> str:
    """A subset of modalities as a JSON key: names joined by ``+`` in the given order; ``"none"``
    for the empty set."""
    return "+".join(subset) if subset else "none"


def subset_values(modalities, predict: Callable[[tuple], Any], score: Callable[[Any], float]) -> dict[tuple, float]:
    """``{subset: v(subset)}`` over all ``2^M`` subsets of ``modalities`` (tuples in the order of
    ``modalities``, the empty one included): ``v(S) = score(predict(S))``, where ``predict(S)`` is the
    prediction with only the modalities of ``S`` present (the others replaced by the caller)."""
    names = tuple(modalities)
    return {s: float(score(predict(s))) for r in range(len(names) + 1) for s in itertools.combinations(names, r)}


def shapley_values(values: Mapping[Any, float], modalities) -> dict[str, float]:
    """Each modality's Shapley value of the game ``v`` given as ``{subset: v(subset)}`` (subsets as
    any iterables of names; every one of the ``2^M`` subsets, the empty one included):

    ``φ_m = Σ_{S ⊆ M∖{m}} |S|! (M − |S| − 1)! / M! · [v(S ∪ {m}) − v(S)]``,

    the marginal contribution of ``m`` averaged over all orders in which the modalities join (as
    BalanceMM's ``Calculate_Shapley``). Efficiency: ``Σ_m φ_m = v(M) − v(∅)``. Values may be
    arrays of one shape (e.g. one game per example): the result then has that shape per modality."""
    names = tuple(modalities)
    v = {frozenset(k): np.asarray(x, np.float64) for k, x in values.items()}
    missing = [s for r in range(len(names) + 1) for s in itertools.combinations(names, r) if frozenset(s) not in v]
    if missing:
        raise ValueError(f"shapley_values needs v of every subset of {names}; missing {missing[:4]}.")
    n = len(names)
    out = {}
    for m in names:
        others = [o for o in names if o != m]
        phi = 0.0
        for r in range(n):
            weight = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                phi = phi + weight * (v[frozenset(s) | {m}] - v[frozenset(s)])
        out[m] = float(phi) if np.ndim(phi) == 0 else phi
    return out


def mean_std(values, confidence: float = 0.95) -> dict:
    """``{"mean", "std", "n", "ci95"}`` over seeds/folds (NaNs dropped).

    ``std`` is the sample standard deviation (ddof = 1); ``ci95`` is the ``confidence`` (95 %)
    Student-t interval for the mean, ``mean ± t_{n-1} · std / sqrt(n)``, as ``[low, high]``. With
    one value both are NaN (no spread can be estimated from one run)."""
    from scipy import stats

    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "ci95": [float("nan"), float("nan")]}
    mean = float(arr.mean())
    if arr.size < 2:
        return {"mean": mean, "std": float("nan"), "n": 1, "ci95": [float("nan"), float("nan")]}
    std = float(arr.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, arr.size - 1)) * std / np.sqrt(arr.size)
    return {"mean": mean, "std": std, "n": int(arr.size), "ci95": [mean - half, mean + half]}
