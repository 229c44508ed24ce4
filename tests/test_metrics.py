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


def test_ensemble_per_batch_standardisation():
    """The reference's mode: statistics of each evaluation batch (last one smaller)."""
    r = np.random.default_rng(4)
    a, b = r.normal(size=(10, 4)) * 5 + 2, r.normal(size=(10, 4))
    want = np.zeros((10, 4))
    for lo in (0, 4, 8):
        for x in (a, b):
            chunk = x[lo:lo + 4]
            want[lo:lo + 4] += (chunk - chunk.mean()) / chunk.std()
    got = combine_logits([a, b], "standardized_per_batch", batch_size=4)
    np.testing.assert_allclose(got, want)
    assert not np.allclose(got, combine_logits([a, b]))  # whole-split statistics differ
    with pytest.raises(ValueError, match="batch_size"):
        combine_logits([a, b], "standardized_per_batch")


def test_mean_std_is_the_sample_std_with_a_t_interval():
    vals = [1.0, 2.0, 4.0, float("nan")]
    got = metrics.mean_std(vals)
    x = np.array([1.0, 2.0, 4.0])
    sd = math.sqrt(((x - x.mean()) ** 2).sum() / 2)  # ddof 1
    assert got["n"] == 3 and got["mean"] == pytest.approx(7 / 3) and got["std"] == pytest.approx(sd)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert got["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    one = metrics.mean_std([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and one["n"] == 1


def test_table_states_its_statistics():
    from mcr_jax import report

    summary = {"a": {"n": 3, "heads": {"fused": {"accuracy": metrics.mean_std([0.5, 0.6, 0.7])}}}}
    table = report.format_table(summary, ("x",))
    assert "60.0 ± 10.0 [35.2, 84.8]" in table
    assert "sample std (ddof 1)" in report.TABLE_STATISTICS and "Student-t interval" in report.TABLE_STATISTICS


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


def _sgdr_by_iteration(t, base, t0, mult, min_lr=0.0):
    start, period = 0, t0
    while t >= start + period:
        start, period = start + period, period * mult
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (t - start) / period)), start


def test_reference_schedule_runs_sgdr_on_the_global_step():
    """The reference schedule: constant for 780 steps, then SGDR (T0 4, Tmult 2) at the *global* step;
    no clock reset."""
    import ml_collections

    from mcr_jax.optim import make_schedule

    cfg = ml_collections.ConfigDict({"learning_rate": 1e-4, "schedule": "reference"})
    sched = make_schedule(cfg, 10_000)
    for t in (0, 500, 779):
        assert float(sched(t)) == pytest.approx(1e-4, rel=1e-6)
    assert float(sched(780)) == pytest.approx(4.51e-5, rel=1e-2)  # the reference's rate at the switch
    for t in (780, 781, 900, 1019, 1020, 1021, 2043, 2044, 4091, 4092, 5000):
        want, _ = _sgdr_by_iteration(t, 1e-4, 4, 2)
        assert float(sched(t)) == pytest.approx(want, rel=1e-4, abs=1e-12), t
    # restarts (rate back at its maximum) exactly at global steps 1020, 2044 and 4092
    restarts = [t for t in range(781, 5000) if float(sched(t)) > float(sched(t - 1))]
    assert restarts == [1020, 2044, 4092]
