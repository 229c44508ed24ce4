"""The Task object: losses against float64 NumPy, metric choices, and one task per label check."""

import jax.numpy as jnp
import numpy as np
import pytest

from mcr_jax.data.checks import LABEL_CHECKS
from mcr_jax.data.types import TASKS as INFO_TASKS
from mcr_jax.data.types import DatasetInfo
from mcr_jax.losses import DIVERGENCES
from mcr_jax.tasks import CLASSIFICATION, REGRESSION, TASKS, get_task


def test_every_dataset_task_has_one_task_object_and_one_label_check():
    assert set(TASKS) == set(INFO_TASKS) == set(LABEL_CHECKS)
    for task in TASKS.values():
        assert task.divergence in DIVERGENCES
        assert task.default_select in task.selectable
        assert task.headline in task.selectable


def test_cross_entropy_matches_numpy_on_the_valid_rows():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 4)), rng.integers(0, 4, 6)
    mask = np.array([1, 1, 0, 1, 0, 1], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -logp[np.arange(6), labels]
    want = (ce * mask).sum() / mask.sum()
    got = CLASSIFICATION.loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(CLASSIFICATION.loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))),
                               ce.mean(), rtol=1e-5)


def test_l1_matches_numpy_on_the_valid_rows():
    rng = np.random.default_rng(1)
    out, labels = rng.normal(size=(5, 1)), rng.normal(size=5)
    mask = np.array([1, 0, 1, 1, 0], np.float64)
    want = (np.abs(out[:, 0] - labels) * mask).sum() / mask.sum()
    got = REGRESSION.loss(jnp.asarray(out, jnp.float32), jnp.asarray(labels, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_head_metrics_use_the_task_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = np.array([0, 1, 1])
    heads = CLASSIFICATION.head_metrics({"fused": logits}, labels)
    assert heads["fused"]["accuracy"] == pytest.approx(2 / 3)
    reg = REGRESSION.head_metrics({"fused": np.array([[1.0], [-1.0]])}, np.array([0.5, -2.0]))
    assert reg["fused"]["mae"] == pytest.approx(0.75)


def test_selection_metric_defaults_orientation_and_errors():
    assert CLASSIFICATION.selection_metric("") == "accuracy"
    assert REGRESSION.selection_metric("") == "loss"
    assert REGRESSION.selection_metric("corr") == "corr"
    with pytest.raises(ValueError, match="not a validation metric of a regression task"):
        REGRESSION.selection_metric("accuracy")
    assert CLASSIFICATION.oriented("accuracy", 0.7) == 0.7
    assert CLASSIFICATION.oriented("ece", 0.1) == -0.1
    assert REGRESSION.oriented("loss", 0.5) == -0.5


def test_get_task_accepts_a_name_an_info_or_a_task_and_rejects_others():
    info = DatasetInfo(name="x", modalities=("a", "b"), input_shapes={"a": (2,), "b": (2,)}, num_classes=1,
                       task="regression")
    assert get_task(info) is REGRESSION and get_task("classification") is CLASSIFICATION
    assert get_task(REGRESSION) is REGRESSION
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        get_task("ranking")
