"""The run engine: a compiled epoch over device-resident data equals the streamed step loop over the
same batches, whole-split evaluation equals the batch loop, each program compiles once, the
checkpoint cadence resumes to the uninterrupted result, and streamed data gets the vectorised path
(K seeds as one program equal to separate runs, on TFDS fixture files) with a device prefetch that
changes nothing but the waiting."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import cremad, synthetic
from mcr_jax import engine, evaluation, seeds, train
from mcr_jax.programs import Programs, _Prefetch
from tests.helpers.fakes import kill_after_epoch
from tests.test_builder_cremad import write_cremad


def smoke_config(**train_overrides):
    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 4
    cfg.train.patience = 0
    cfg.parallel.num_devices = 1
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


@pytest.fixture(scope="module")
def run():
    return Programs.single(smoke_config())


@pytest.mark.parametrize("method", ["mcr", "joint"])
def test_scanned_epoch_equals_the_streamed_step_loop(method):
    cfg = smoke_config()
    if method != "mcr":
        cfg.method = {"name": method}
    compiled = Programs.single(cfg)
    cfg.train.compiled_epochs = False
    streamed = Programs.single(cfg)
    assert compiled.compiled and not streamed.compiled
    a, mets_a, wait_a = compiled.train_epoch(_copy(compiled.states), 1)
    b, mets_b, wait_b = streamed.train_epoch(_copy(streamed.states), 1)
    assert wait_a is None and 0.0 <= wait_b <= 1.0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a.params, b.params)
    assert int(a.step[0]) == int(b.step[0]) == compiled.steps_per_epoch
    for k in mets_a:
        assert mets_a[k].shape == (1, compiled.steps_per_epoch)
        np.testing.assert_allclose(mets_a[k], mets_b[k], rtol=1e-5, atol=1e-6)


def test_compiled_evaluation_equals_the_batch_loop(run):
    cfg = smoke_config()
    cfg.train.compiled_epochs = False
    looped_run = Programs.single(cfg)
    s = run.states
    compiled, out_c = evaluation.summarize(run.method, run.evaluate(s.params, s.rest, s.hparams, "test"))
    looped, out_l = evaluation.summarize(run.method, looped_run.evaluate(s.params, s.rest, s.hparams, "test"))
    np.testing.assert_allclose(out_c["logits"], out_l["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out_c["labels"], out_l["labels"])
    assert compiled["loss"] == pytest.approx(looped["loss"], rel=1e-5)
    for m in compiled["mipd"]:
        assert compiled["mipd"][m] == pytest.approx(looped["mipd"][m], rel=1e-4)


@pytest.mark.parametrize("ahead", [False, True], ids=["at-first-call", "precompiled"])
def test_one_compiled_program_scores_validation_and_test_of_other_sizes(ahead):
    """Validation 40 and test 130 examples in batches of 32: validation is one chunk of 2 batches,
    test 5 batches in 3 chunks (the last padded with a batch of mask 0); both equal the batch loop,
    from one program, whether it was compiled ahead (the comparison runner's background thread) or at
    its first call."""
    cfg = smoke_config()
    cfg.data.num_validation, cfg.data.num_test = 40, 130
    compiled = Programs.single(cfg)
    if ahead:
        assert set(compiled.precompile()) == {"epoch", "eval_validation"}
    cfg.train.compiled_epochs = False
    looped = Programs.single(cfg)
    s = compiled.states
    for split, n in (("validation", 40), ("test", 130)):
        a, out_a = evaluation.summarize(compiled.method, compiled.evaluate(s.params, s.rest, s.hparams, split))
        b, out_b = evaluation.summarize(looped.method, looped.evaluate(s.params, s.rest, s.hparams, split))
        assert out_a["logits"].shape[0] == n
        np.testing.assert_allclose(out_a["logits"], out_b["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out_a["labels"], out_b["labels"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for m in a["mipd"]:
            assert a["mipd"][m] == pytest.approx(b["mipd"][m], rel=1e-4)
    assert compiled.compile_counts()["eval"] == 1
    compiled.train_epoch(compiled.states, 1)  # a precompiled epoch is the one training runs
    assert compiled.compile_counts()["epoch"] == 1


def _recording(monkeypatch):
    made = []
    real = engine.Programs

    def keep(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(engine, "Programs", keep)
    return made


def test_each_program_compiles_once(tmp_path, monkeypatch):
    made = _recording(monkeypatch)
    train.train_and_evaluate(smoke_config(num_epochs=3, checkpoint=False), str(tmp_path))
    counts = made[0].compile_counts()
    assert counts["epoch"] == 1 and counts["eval"] == 1  # one program scores validation and test


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
    assert engine.checkpoint_every(smoke_config(num_epochs=40), run) == 10  # compiled: a handful of saves
    cfg = smoke_config(num_epochs=40)
    cfg.train.compiled_epochs = False
    assert engine.checkpoint_every(cfg, Programs.single(cfg)) == 1  # streamed: every epoch
    with pytest.raises(ValueError, match="checkpoint_every"):
        engine.checkpoint_every(smoke_config(checkpoint_every=-1), run)


# ---- the prefetch --------------------------------------------------------------------------------


def test_prefetch_yields_the_items_in_order_and_raises_the_producers_error():
    def produce():
        yield from range(5)
        raise RuntimeError("the reader broke")

    for size in (0, 1, 3):
        got = []
        with pytest.raises(RuntimeError, match="the reader broke"), _Prefetch(produce, size) as items:
            for x in items:
                got.append(x)
        assert got == list(range(5))


def test_prefetch_stops_its_thread_when_the_consumer_leaves_early():
    with _Prefetch(lambda: iter(range(10_000)), 2) as items:
        assert next(items) == 0
    assert not items._thread.is_alive()


def test_prefetch_changes_neither_batches_nor_results():
    cfg = smoke_config()
    cfg.train.compiled_epochs = False
    cfg.train.prefetch = 0
    off = Programs.single(cfg)
    cfg.train.prefetch = 3
    on = Programs.single(cfg)
    batches = list(_Prefetch(lambda: on.run_batches(2, None), 3))
    plain = list(off.run_batches(2, None))
    assert len(batches) == len(plain) == off.steps_per_epoch
    for x, y in zip(batches, plain, strict=True):
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    a, _, _ = on.train_epoch(_copy(on.states), 2)
    b, _, _ = off.train_epoch(_copy(off.states), 2)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


# ---- streamed TFDS data: vectorised seeds ---------------------------------------------------------


@pytest.fixture(scope="module")
def cremad_files(tmp_path_factory):
    raw = tmp_path_factory.mktemp("cremad_raw")
    write_cremad(raw)
    return raw, tmp_path_factory.mktemp("cremad_tfds")


def cremad_config(files, epochs=2):
    raw, data_dir = files
    cfg = cremad.get_config("smoke")
    cfg.data.manual_dir = str(raw)
    cfg.data.data_dir = str(data_dir)
    cfg.data.builder_kwargs = {"frame_size": 16, "num_folds": 3, "fold": 0}
    cfg.parallel.num_devices = 2
    cfg.train.num_epochs = epochs
    cfg.train.patience = 0
    cfg.eval.shapley = False
    return cfg


def _history(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _same_run(a, b, dir_a, dir_b):
    assert a["best_epoch"] == b["best_epoch"] and a["steps"] == b["steps"]
    pa, pb = np.load(os.path.join(dir_a, "predictions.npz")), np.load(os.path.join(dir_b, "predictions.npz"))
    for k in pa.files:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-5)
    for ha, hb in zip(_history(dir_a), _history(dir_b), strict=True):  # every epoch's validation, as alone
        for k, v in ha["val"].items():
            assert v == pytest.approx(hb["val"][k], rel=1e-4, abs=1e-5), k


STREAMED_SEEDS = [0, 5]


@pytest.fixture(scope="module")
def streamed_reference(cremad_files, tmp_path_factory):
    """Seeds 0 and 5 on the streamed fixture data as one program, uninterrupted (2 epochs)."""
    cfg = cremad_config(cremad_files)
    cfg.train.checkpoint_every = 1
    workdir = tmp_path_factory.mktemp("streamed_vec")
    with pytest.MonkeyPatch.context() as mp:
        made = _recording(mp)
        out = seeds.train_seeds(cfg, str(workdir), STREAMED_SEEDS)
    return cfg, workdir, out["per_seed"], made


def test_streamed_seeds_run_as_one_program_equal_to_separate_runs(streamed_reference, tmp_path):
    cfg, vec_dir, per_seed, made = streamed_reference
    assert len(made) == 1 and made[0].k == 2 and not made[0].compiled  # one streamed program for both
    for s, res in zip(STREAMED_SEEDS, per_seed, strict=True):
        assert res["vectorized_seeds"] == STREAMED_SEEDS and not res["compiled_epochs"]
        one = cfg.copy_and_resolve_references()
        one.seed = s
        alone = train.train_and_evaluate(one, str(tmp_path / f"alone_{s}"))
        _same_run(res, alone, vec_dir / f"seed_{s}", tmp_path / f"alone_{s}")
        assert all(0.0 <= h["input_wait_fraction"] <= 1.0 for h in _history(vec_dir / f"seed_{s}"))
    a, b = (np.load(vec_dir / f"seed_{s}" / "predictions.npz")["test_logits"] for s in STREAMED_SEEDS)
    assert not np.allclose(a, b)  # the seeds really trained differently


def test_reader_worker_processes_give_the_same_run(streamed_reference, tmp_path):
    # grain worker processes read and augment the examples; the batches, and so the run, are those
    # of the in-process reader (seed 0 of the reference, itself equal to a separate run)
    cfg, ref_dir, ref, _ = streamed_reference
    one = cfg.copy_and_resolve_references()
    one.seed, one.data.worker_count = 0, 1
    res = train.train_and_evaluate(one, str(tmp_path / "workers"))
    _same_run(ref[0], res, ref_dir / "seed_0", tmp_path / "workers")
    assert res["config"]["data"]["worker_count"] == 1


def test_an_interrupted_streamed_vectorised_run_resumes_to_the_uninterrupted_result(streamed_reference, tmp_path,
                                                                                     monkeypatch):
    cfg, ref_dir, ref, _ = streamed_reference
    kill_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        seeds.train_seeds(cfg, str(tmp_path / "run"), STREAMED_SEEDS)
    monkeypatch.undo()
    again = seeds.train_seeds(cfg, str(tmp_path / "run"), STREAMED_SEEDS)["per_seed"]
    for s, a, b in zip(STREAMED_SEEDS, ref, again, strict=True):
        _same_run(a, b, ref_dir / f"seed_{s}", tmp_path / "run" / f"seed_{s}")
        assert len(_history(tmp_path / "run" / f"seed_{s}")) == 2
