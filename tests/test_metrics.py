"""Metrics against scikit-learn / plain NumPy, and the learning-rate schedules against their formulas."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from mcr_jax import metrics
from mcr_jax.methods import combine_logits
from mcr_jax.optim import warm_restarts


def _case(n=200, c=7, seed=0):
    r = np.random.default_rng(seed)
    labels = r.integers(0, c, size=n)
    logits = r.normal(size=(n, c)) + 2.0 * np.eye(c)[labels] * (r.random(n) < 0.6)[:, None]
    return logits, labels


def test_classification_metrics_match_sklearn():
    logits, labels = _case()
    got = metrics.classification_metrics(logits, labels)
    pred = logits.argmax(-1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", labels=range(7)))
    assert got["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(7)))
    assert "top5" not in metrics.classification_metrics(logits[:, :5], np.minimum(labels, 4))


def test_ece_matches_loop():
    logits, labels = _case(seed=1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    conf, pred = p.max(-1), p.argmax(-1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        idx = [i for i in range(len(labels)) if lo < conf[i] <= hi]
        if idx:
            ece += len(idx) / len(labels) * abs(np.mean(pred[idx] == labels[idx]) - np.mean(conf[idx]))
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(ece)


def test_regression_metrics():
    r = np.random.default_rng(2)
    y = np.round(r.uniform(-3, 3, size=300) * 2) / 2
    pred = y + r.normal(scale=0.7, size=300)
    got = metrics.regression_metrics(pred, y)
    nz = y != 0
    assert got["binary_accuracy"] == pytest.approx(np.mean((pred[nz] > 0) == (y[nz] > 0)))
    assert got["mae"] == pytest.approx(np.mean(np.abs(pred - y)))
    assert got["corr"] == pytest.approx(np.corrcoef(pred, y)[0, 1])
    assert got["acc7"] == pytest.approx(np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(y, -3, 3))))


def test_error_groups():
    labels = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3)
    a = eye[[0, 1, 0, 1, 1, 0]]  # right on rows 0, 1, 4
    v = eye[[0, 0, 2, 0, 0, 0]]  # right on rows 0, 2, 3
    fused = eye[[0, 1, 2, 2, 1, 0]]  # right on rows 0, 1, 2, 4
    rows = {r["group"]: r for r in metrics.error_groups(fused, {"a": a, "v": v}, labels)}
    assert rows["all unimodal right"]["count"] == 1 and rows["all unimodal right"]["fused_accuracy"] == 1.0
    assert rows["only a right"]["count"] == 2 and rows["only a right"]["fused_accuracy"] == 1.0
    assert rows["only v right"]["count"] == 2 and rows["only v right"]["fused_accuracy"] == 0.5
    assert rows["all unimodal wrong"]["count"] == 1 and rows["all unimodal wrong"]["fused_accuracy"] == 0.0
    assert sum(r["count"] for r in rows.values()) == 6


def test_ensemble_combination():
    r = np.random.default_rng(3)
    a, b = r.normal(size=(10, 4)) * 5 + 2, r.normal(size=(10, 4))
    want = (a - a.mean()) / a.std() + (b - b.mean()) / b.std()
    np.testing.assert_allclose(combine_logits([a, b]), want)
    pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(combine_logits([a, b], "probs")), (pa + pb) / 2, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        combine_logits([a, b[:5]])


def test_mean_std():
    assert metrics.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(np.std([1, 2, 3])), "n": 3}


def test_warm_restarts_matches_sgdr_formula():
    base, t0, mult = 1.0, 4, 2
    sched = warm_restarts(base, t0=t0, t_mult=mult, min_lr=0.1)
    for t in range(0, 70):
        # the cycle containing t, by explicit iteration
        start, period = 0, t0
        while t >= start + period:
            start, period = start + period, period * mult
        want = 0.1 + 0.5 * (base - 0.1) * (1 + math.cos(math.pi * (t - start) / period))
        assert float(sched(t)) == pytest.approx(want, rel=1e-5), t
