"""The compiled training engine: a whole epoch as one call equals the step loop over the same
batches, whole-split evaluation equals the batch loop, each compiles once, and the checkpoint
cadence still resumes to the uninterrupted result."""

import os

import jax
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax import train
from mcr_jax.state import TrainState
from tests.helpers.fakes import kill_after_epoch


def smoke_config(**train_overrides):
    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 4
    cfg.train.patience = 0
    cfg.parallel.num_devices = 1
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


def _copy(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.copy(), state)


@pytest.fixture(scope="module")
def run():
    return train.setup(smoke_config())


@pytest.mark.parametrize("method", ["mcr", "joint"])
def test_scanned_epoch_equals_the_step_loop(method):
    cfg = smoke_config()
    if method != "mcr":
        cfg.method = {"name": method}
    r = train.setup(cfg)
    assert r.epoch_fn is not None, "the synthetic data is in memory: epochs must be compiled"
    scanned, mets = r.epoch_fn(_copy(r.state), r.device_arrays["train"], r.epoch_rows(1))
    looped, loop_mets = _copy(r.state), []
    for batch in r.batches("train", r.batch_size, train=True, epoch=1):  # the streamed loop's batches
        looped, m = r.train_step(looped, batch)
        loop_mets.append(m)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), scanned.params, looped.params)
    assert int(scanned.step) == int(looped.step) == r.steps_per_epoch
    for k in mets:
        np.testing.assert_allclose(np.asarray(mets[k]), [float(m[k]) for m in loop_mets], rtol=1e-5, atol=1e-6)


def test_compiled_evaluation_equals_the_batch_loop(run):
    params, rest = run.state.params, run.state.rest
    compiled, out_c = train.evaluate(run, params, rest, "test")
    arrays = run.device_arrays.pop("test")
    try:
        looped, out_l = train.evaluate(run, params, rest, "test")
    finally:
        run.device_arrays["test"] = arrays
    np.testing.assert_allclose(out_c["logits"], out_l["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_c["labels"], out_l["labels"])
    assert compiled["loss"] == pytest.approx(looped["loss"], rel=1e-5)
    for m in compiled["mipd"]:
        assert compiled["mipd"][m] == pytest.approx(looped["mipd"][m], rel=1e-4)


def test_each_function_compiles_once(tmp_path, monkeypatch):
    made = []
    real = train.setup

    def keep(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(train, "setup", keep)
    train.train_and_evaluate(smoke_config(num_epochs=3, checkpoint=False), str(tmp_path))
    r = made[0]
    assert r.epoch_fn._cache_size() == 1
    assert r.eval_fn["validation"]._cache_size() == 1 and r.eval_fn["test"]._cache_size() == 1


def test_checkpoint_cadence_and_resume(tmp_path, monkeypatch):
    """Saves every 3 epochs (and the last); a kill after epoch 4 resumes from epoch 3 and ends with
    the uninterrupted result."""
    cfg = smoke_config(num_epochs=6, checkpoint_every=3)
    ref = train.train_and_evaluate(cfg, str(tmp_path / "ref"))
    assert sorted(os.listdir(tmp_path / "ref" / "checkpoints")) == ["3", "6"]
    kill_after_epoch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))
    monkeypatch.undo()
    res = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res["test"] == ref["test"] and res["best_epoch"] == ref["best_epoch"] and res["steps"] == ref["steps"]
    a, b = np.load(tmp_path / "ref" / "predictions.npz"), np.load(tmp_path / "run" / "predictions.npz")
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_automatic_cadence(run):
    assert train.checkpoint_every(smoke_config(num_epochs=40), run) == 10  # compiled: a handful of saves
    cfg = smoke_config(num_epochs=40)
    cfg.train.compiled_epochs = False
    assert train.checkpoint_every(cfg, train.setup(cfg)) == 1  # streamed: every epoch
    with pytest.raises(ValueError, match="checkpoint_every"):
        train.checkpoint_every(smoke_config(checkpoint_every=-1), run)
