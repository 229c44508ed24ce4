"""No silent wrong results: a changed config on an interrupted workdir, damaged checkpoints, a kill
during the results write, bad config values and an unwritable workdir (docs/reliability.md)."""

import json
import os

import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax import engine, guards, programs, train
from mcr_jax.checkpoint import Checkpointer


def smoke_config():
    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 4
    cfg.train.patience = 0
    cfg.parallel.num_devices = 1
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ref"))
    return workdir, train.train_and_evaluate(smoke_config(), workdir)


def _interrupt_after(epoch, workdir, monkeypatch, cfg=None):
    """Runs until the checkpoint of ``epoch`` is written, then dies as a kill would."""
    original = Checkpointer.save

    def save_then_crash(self, e, *args, **kwargs):
        original(self, e, *args, **kwargs)
        if e == epoch:
            raise KeyboardInterrupt(f"simulated kill after epoch {epoch}")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(cfg or smoke_config(), str(workdir))
    monkeypatch.setattr(Checkpointer, "save", original)


def _same_result(ref_dir, ref, workdir, res):
    assert res["best_epoch"] == ref["best_epoch"] and res["steps"] == ref["steps"]
    a, b = np.load(os.path.join(ref_dir, "predictions.npz")), np.load(os.path.join(workdir, "predictions.npz"))
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)
    assert res["test"] == ref["test"]


def _item_files(workdir, epoch, item):
    root = os.path.join(workdir, "checkpoints", str(epoch), item)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return sorted(files, key=os.path.getsize, reverse=True)


# ---------------------------------------------------------------------------------- config on resume


def test_changed_config_on_an_interrupted_workdir_is_refused(tmp_path, monkeypatch, reference):
    _interrupt_after(2, tmp_path, monkeypatch)
    other = smoke_config()
    other.optim.learning_rate = 3e-3
    other.method.strategy = "independent"
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(other, str(tmp_path))
    msg = str(err.value)
    assert "optim.learning_rate: 0.001 -> 0.003" in msg and "method.strategy: 'greedy' -> 'independent'" in msg
    assert "delete" in msg and not os.path.exists(tmp_path / "results.json")
    # The stored config still resumes, to the uninterrupted result.
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    _same_result(*reference, str(tmp_path), res)


def test_changed_config_on_a_finished_workdir_names_the_keys(reference):
    ref_dir, _ = reference
    other = smoke_config()
    other.seed = 1
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        train.train_and_evaluate(other, ref_dir)


def test_a_changed_shape_on_an_interrupted_workdir_is_refused_without_touching_a_checkpoint(tmp_path, monkeypatch):
    _interrupt_after(3, tmp_path, monkeypatch)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    for change in ("model", "method"):
        other = smoke_config()
        if change == "model":
            other.model.latent_dim = 2 * int(other.model.latent_dim)
        else:
            other.method = {"name": "ogm_ge"}
        with pytest.raises(ValueError, match="different config") as err:
            train.train_and_evaluate(other, str(tmp_path))
        assert len(str(err.value).splitlines()) < 40 and "Event loop" not in str(err.value)
        assert sorted(os.listdir(tmp_path / "checkpoints")) == before
        assert not os.path.exists(tmp_path / "broken_checkpoints")


def test_a_checkpoint_of_another_structure_is_refused_before_any_array_is_read(tmp_path, monkeypatch):
    """The layout check alone (same config, other trees: e.g. code that changed a model's structure)."""
    _interrupt_after(2, tmp_path, monkeypatch)
    import jax.numpy as jnp

    ckpt = Checkpointer(str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="another structure .* left untouched"):
        ckpt.restore_latest_good({"w": jnp.zeros(3)}, {"w": jnp.zeros(3)}, log=lambda m: None)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert not os.path.exists(tmp_path / "broken_checkpoints")


def test_a_changed_epoch_in_the_bookkeeping_is_detected_and_the_previous_step_used(tmp_path, monkeypatch,
                                                                                  reference, capsys):
    _interrupt_after(3, tmp_path, monkeypatch)
    files = [f for f in _item_files(tmp_path, 3, "meta") if '"epoch": 3' in open(f).read()]
    assert files, "orbax layout changed: no JSON file with the epoch in the meta item"
    with open(files[0]) as f:
        text = f.read()
    with open(files[0], "w") as f:
        f.write(text.replace('"epoch": 3', '"epoch": 1', 1))  # one field of the bookkeeping changed
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    out = capsys.readouterr().out
    assert "bookkeeping" in out and "falling back" in out and "resuming" in out and "after epoch 2" in out
    _same_result(*reference, str(tmp_path), res)
    assert res["epochs_run"] == 4


def test_a_changed_option_of_interrupted_vectorised_seeds_is_named_in_a_short_message(tmp_path, monkeypatch):
    from mcr_jax.seeds import train_seeds
    from tests.helpers.fakes import kill_after_epoch

    cfg = smoke_config()
    kill_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_seeds(cfg, str(tmp_path), [0, 1])
    monkeypatch.undo()
    cfg.optim.learning_rate = 3e-3
    with pytest.raises(ValueError) as err:
        train_seeds(cfg, str(tmp_path), [0, 1])
    msg = str(err.value)
    assert "runs.seed_0.config.optim.learning_rate: 0.001 -> 0.003" in msg
    assert "runs.seed_1.config.optim.learning_rate: 0.001 -> 0.003" in msg
    assert max(len(line) for line in msg.splitlines()) < 300


def test_a_finished_run_is_never_overwritten_by_another_method(reference, tmp_path):
    import shutil

    ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_bytes()
    other = smoke_config()
    other.method = {"name": "ensemble"}
    with pytest.raises(ValueError, match=r"method.name: 'mcr' -> 'ensemble'"):
        train.train_and_evaluate(other, str(tmp_path / "run"))
    assert (tmp_path / "run" / "results.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["empty results", "no test results", "truncated history", "no predictions",
                                    "truncated predictions", "no checkpoints"])
def test_an_unusable_finished_run_is_redone_with_a_line_naming_the_file(damage, reference, tmp_path, capsys):
    import shutil

    ref_dir, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    if damage == "empty results":
        (run / "results.json").write_text("{}")
        named = "results.json is incomplete"
    elif damage == "no test results":
        stored = json.loads((run / "results.json").read_text())
        del stored["test"]
        (run / "results.json").write_text(json.dumps(stored))
        named = "results.json is incomplete"
    elif damage == "truncated history":
        data = (run / "metrics.jsonl").read_bytes()
        (run / "metrics.jsonl").write_bytes(data[: len(data) - 40])
        named = "metrics.jsonl, line 4: not a JSON record"
    elif damage == "no predictions":
        os.remove(run / "predictions.npz")
        named = "predictions.npz is missing"
    elif damage == "truncated predictions":
        data = (run / "predictions.npz").read_bytes()
        (run / "predictions.npz").write_bytes(data[: len(data) // 2])
        named = "predictions.npz is unreadable"
    else:
        shutil.rmtree(run / "checkpoints")
        named = "checkpoints holds no checkpoint"
    res = train.train_and_evaluate(smoke_config(), str(run))
    assert named in capsys.readouterr().out
    _same_result(ref_dir, ref, str(run), res)
    assert engine.finished(str(run), smoke_config()) is not None  # usable again


def test_one_process_per_workdir_and_a_stale_lock_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    lock = tmp_path / guards.LOCK_FILE
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(RuntimeError, match=f"in use by process {holder.pid} on") as err:
            train.train_and_evaluate(smoke_config(), str(tmp_path))
        assert len(str(err.value).splitlines()) == 1
        assert not os.path.exists(tmp_path / "checkpoints") and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))  # its process is gone: stale, taken over
    assert res["epochs_run"] == 4 and not lock.exists()


@pytest.mark.parametrize("split", ["validation", "test"])
def test_an_empty_split_is_named(split, tmp_path):
    cfg = smoke_config()
    cfg.data[f"num_{split}"] = 0
    with pytest.raises(ValueError, match=f"split '{split}' is empty"):
        train.train_and_evaluate(cfg, str(tmp_path))


# ---------------------------------------------------------------------------------- damaged checkpoints


def test_flipped_bytes_in_the_best_weights_fall_back_to_the_previous_step(tmp_path, monkeypatch, reference, capsys):
    _interrupt_after(3, tmp_path, monkeypatch)
    target = _item_files(tmp_path, 3, "best")[0]
    with open(target, "r+b") as f:  # 16 bytes in the middle of the largest file of the selected weights
        f.seek(os.path.getsize(target) // 2)
        chunk = bytearray(f.read(16))
        f.seek(os.path.getsize(target) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    out = capsys.readouterr().out
    assert os.path.join("checkpoints", "3") in out and "falling back" in out
    assert os.path.isdir(tmp_path / "broken_checkpoints" / "3")
    _same_result(*reference, str(tmp_path), res)


def test_truncated_checkpoint_file_falls_back_to_the_previous_step(tmp_path, monkeypatch, reference):
    _interrupt_after(3, tmp_path, monkeypatch)
    target = _item_files(tmp_path, 3, "state")[0]
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 3)
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    _same_result(*reference, str(tmp_path), res)


def test_missing_metadata_falls_back_and_every_step_broken_is_a_clear_error(tmp_path, monkeypatch):
    _interrupt_after(3, tmp_path, monkeypatch)
    for epoch in (2, 3):
        meta = [f for f in _item_files(tmp_path, epoch, "state") if os.path.basename(f) == "_METADATA"]
        assert meta, "orbax layout changed: no _METADATA file"
        os.remove(meta[0])
    with pytest.raises(RuntimeError, match="no checkpoint step .* could be restored") as err:
        train.train_and_evaluate(smoke_config(), str(tmp_path))
    assert "checkpoints/3" in str(err.value) and "checkpoints/2" in str(err.value)
    assert not os.path.exists(tmp_path / "results.json")


def test_non_finite_selected_weights_are_never_published(tmp_path, monkeypatch):
    import jax.numpy as jnp

    real = engine.host_copy

    def poisoned(tree):  # the selected weights go bad (e.g. memory corruption) after selection
        out = real(tree)
        out["params"]["fusion"]["bias"] = np.full_like(out["params"]["fusion"]["bias"], np.nan)
        return out

    monkeypatch.setattr(engine, "host_copy", poisoned)
    cfg = smoke_config()
    cfg.train.checkpoint = False
    with pytest.raises(FloatingPointError, match="refusing to publish"):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    del jnp


# ---------------------------------------------------------------------------------- atomic results


def test_kill_during_the_results_write_leaves_no_truncated_file(tmp_path, monkeypatch, reference):
    real_dump = json.dump

    def dump_half_then_die(obj, f, **kwargs):
        text = json.dumps(obj, **kwargs)
        f.write(text[: len(text) // 2])
        raise KeyboardInterrupt("simulated kill during the write")

    monkeypatch.setattr(guards.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(smoke_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    monkeypatch.setattr(guards.json, "dump", real_dump)
    res = train.train_and_evaluate(smoke_config(), str(tmp_path))
    _same_result(*reference, str(tmp_path), res)


def test_a_damaged_results_file_counts_as_not_finished(tmp_path, reference, capsys):
    ref_dir, ref = reference
    import shutil

    shutil.copytree(ref_dir, tmp_path / "run")
    with open(tmp_path / "run" / "results.json", "w") as f:
        f.write('{"config": {"seed": 0, "tra')  # what a kill mid-write used to leave
    res = train.train_and_evaluate(smoke_config(), str(tmp_path / "run"))
    assert "unreadable" in capsys.readouterr().out
    assert res["test"] == ref["test"]
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["test"] == ref["test"]


# ---------------------------------------------------------------------------------- bad config values


@pytest.mark.parametrize("field, value, match", [
    ("train.num_epochs", 0, "train.num_epochs"),
    ("train.num_epochs", -3, "train.num_epochs"),
    ("train.patience", -1, "train.patience"),
    ("train.select", "foo", "train.select"),
    ("train.batch_size", 0, "train.batch_size"),
    ("method.temperature", 0.0, "method.temperature"),
    ("method.temperature", -0.5, "method.temperature"),
    ("optim.learning_rate", 0.0, "optim.learning_rate must be > 0"),
    ("optim.learning_rate", -1e-3, "optim.learning_rate must be > 0"),
    ("optim.b1", 1.5, r"optim.b1 must be >= 0.0 and < 1.0"),
    ("optim.b2", 1.0, r"optim.b2 must be >= 0.0 and < 1.0"),
    ("optim.eps", 0.0, "optim.eps must be > 0"),
    ("optim.weight_decay", -1e-4, "optim.weight_decay must be >= 0"),
    ("optim.momentum", -0.1, "optim.momentum"),
    ("optim.grad_clip", -1.0, "optim.grad_clip"),
    ("optim.min_lr", 1.0, "must not exceed optim.learning_rate"),
    ("optim.name", "adam", "not an optimizer"),
    ("eval.batch_size", -5, "eval.batch_size must be an integer >= 1"),
], ids=lambda v: str(v))
def test_bad_config_values_are_rejected_before_training(field, value, match, tmp_path, monkeypatch):
    cfg = smoke_config()
    section, key = field.split(".")
    cfg[section][key] = value
    calls = []
    monkeypatch.setattr(programs, "make_train_step", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(cfg, str(tmp_path))
    assert not calls, "the error must come before any training step is built"


def test_a_selection_metric_of_the_other_task_is_rejected(tmp_path):
    cfg = smoke_config()
    cfg.train.select = "mae"  # a regression metric on a classification dataset
    with pytest.raises(ValueError, match="not a validation metric of a classification task"):
        train.train_and_evaluate(cfg, str(tmp_path))


def test_repeated_seeds_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        from mcr_jax.seeds import train_seeds

        train_seeds(smoke_config(), str(tmp_path), [0, 0])
    from mcr_jax import study

    with pytest.raises(ValueError, match="distinct"):
        study.run_comparison(smoke_config(), str(tmp_path), ["joint"], seeds=[1, 1])


def test_an_unwritable_workdir_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(programs.Programs, "__init__",
                        lambda *a, **k: pytest.fail("the programs were built before the write check"))
    with pytest.raises(PermissionError, match="cannot write to the workdir"):
        train.train_and_evaluate(smoke_config(), str(tmp_path / "a_file" / "run"))


def test_selection_orientation_of_lower_is_better_metrics():
    val = {"loss": 0.5, "heads": {"fused": {"mae": 0.3, "corr": 0.8, "ece": 0.1}}}
    assert engine.selection_value(val, "mae", "regression") == -0.3
    assert engine.selection_value(val, "corr", "regression") == 0.8
    assert engine.selection_value(val, "ece", "classification") == -0.1
    assert engine.selection_value(val, "loss", "regression") == -0.5


def test_a_damaged_history_is_an_error_naming_the_file_and_line(tmp_path):
    from mcr_jax import dynamics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "val": {"lo')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        dynamics.read_history(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[2]\n')
    with pytest.raises(ValueError, match=r"line 2: not a JSON object"):
        dynamics.read_history(str(tmp_path))
    assert dynamics.read_history(str(tmp_path / "none")) == []


def test_checkpoints_as_a_regular_file_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"checkpoints is a file, not a checkpoint folder; move or delete"):
        train.train_and_evaluate(smoke_config(), str(run))
    assert not (run / "metrics.jsonl").exists()  # refused before the first epoch
    assert (run / "checkpoints").read_text() == "not a folder"  # and left as it was


def test_ctrl_c_names_the_checkpointed_epoch(tmp_path, monkeypatch, capsys):
    cfg = smoke_config()
    cfg.train.checkpoint_every = 1
    _interrupt_after(2, tmp_path / "run", monkeypatch, cfg)
    said = "interrupted (the last checkpoint holds epoch 2); rerun the same command to resume."
    assert said in capsys.readouterr().out


def test_a_finished_seeds_workdir_reruns_without_writing(tmp_path, monkeypatch, capsys):
    from mcr_jax import seeds

    cfg = smoke_config()
    cfg.train.num_epochs = 2
    first = seeds.train_seeds(cfg, str(tmp_path), [0, 1])["summary"]

    def read_only(path, *a, **k):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(guards, "write_json_atomic", read_only)  # as on a read-only copy of the workdir
    assert seeds.train_seeds(cfg, str(tmp_path), [0, 1])["summary"] == first  # identical summary: nothing written
    os.remove(tmp_path / "summary.json")
    assert seeds.train_seeds(cfg, str(tmp_path), [0, 1])["summary"] == first
    assert "summary.json (OSError: [Errno 30] Read-only file system" in capsys.readouterr().out


def test_a_run_whose_selection_value_is_never_a_number_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "selection_value", lambda *a, **k: float("nan"))
    cfg = smoke_config()
    cfg.train.num_epochs = 2
    with pytest.raises(FloatingPointError, match="no epoch's validation accuracy was a number"):
        train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_an_asynchronous_save_writes_what_was_passed_not_what_the_caller_changed_after(tmp_path):
    # The engine changes its host copy of the selected weights in place and appends to the history
    # while the previous epoch's checkpoint may still be written on orbax's thread.
    import jax.numpy as jnp

    from mcr_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.asynchronous
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
    best = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    meta = {"epoch": 1, "history": [{"epoch": 1}]}
    ckpt.save(1, state, best, meta)
    best["w"][0, 0] = 99.0
    meta["history"].append({"epoch": 2})
    restored_state, restored_best, restored_meta = ckpt.verified_restore(1, state, best)  # checksums verified
    assert np.asarray(restored_best["w"])[0, 0] == 0.0 and restored_meta["history"] == [{"epoch": 1}]
    np.testing.assert_array_equal(np.asarray(restored_state["w"]), np.arange(6.0).reshape(2, 3))
    ckpt.close()
