"""Several seeds as one vectorised program == the same seeds run one by one."""

import json
import os

import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax import data as data_lib
from mcr_jax import seeds as seeds_mod
from mcr_jax import train
from mcr_jax.methods import get_method
from mcr_jax.models import build_model
from mcr_jax.state import init_state, split_model
from mcr_jax.steps import make_train_step
from tests.helpers.fakes import kill_after_epoch
from tests.helpers.method_setup import build, toy_data


def smoke_config(method="mcr", **train_overrides):
    cfg = synthetic.get_config(f"smoke,method={method}")
    cfg.train.num_epochs = 4
    cfg.train.patience = 0
    cfg.parallel.num_devices = 1
    for k, v in train_overrides.items():
        cfg.train[k] = v
    return cfg


def _same(a, b, dir_a, dir_b):
    assert a["best_epoch"] == b["best_epoch"] and a["steps"] == b["steps"] and a["epochs_run"] == b["epochs_run"]
    pa, pb = np.load(os.path.join(dir_a, "predictions.npz")), np.load(os.path.join(dir_b, "predictions.npz"))
    for k in pa.files:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-5)  # logits of O(1): float32 noise
    for h in a["test"]["heads"]:
        for k, v in a["test"]["heads"][h].items():
            assert v == pytest.approx(b["test"]["heads"][h][k], rel=1e-5, abs=1e-6), (h, k)
    assert a["test"]["loss"] == pytest.approx(b["test"]["loss"], rel=1e-5)
    for split in ("validation", "test"):  # the Shapley diagnostic, built by the vectorised path too
        assert set(a[split]["shapley"]) == set(b[split]["shapley"])
        assert a[split]["shapley_subsets"] == pytest.approx(b[split]["shapley_subsets"], abs=1e-6)


# MSLR: a host hook that changes the state; D&R: one that replaces the parameters (towards θ⁰ in its state)
@pytest.mark.parametrize("method", ["joint", "mcr", "mslr", "dnr"])
def test_vectorised_seeds_equal_separate_runs(method, tmp_path):
    cfg = smoke_config(method)
    if method == "mslr":
        cfg.method.partial_window = True  # its rates adapt from epoch 2 on
    if method == "dnr":
        cfg.method.reinit_epochs = 1  # a re-initialisation after epoch 1
    out = seeds_mod.train_seeds(cfg, str(tmp_path / "vec"), [0, 3])
    assert [r["vectorized_seeds"] for r in out["per_seed"]] == [[0, 3], [0, 3]]
    for s, res in zip([0, 3], out["per_seed"], strict=True):
        one = cfg.copy_and_resolve_references()
        one.seed = s
        alone = train.train_and_evaluate(one, str(tmp_path / f"alone_{s}"))
        _same(res, alone, tmp_path / "vec" / f"seed_{s}", tmp_path / f"alone_{s}")
    assert os.path.exists(tmp_path / "vec" / "summary.json")


def test_vectorised_seeds_stop_early_each_on_its_own(tmp_path):
    """Learning rate 1e-30 (0 is refused; float32 weights do not move) and patience 1: every seed
    stops after epoch 2, as alone."""
    cfg = smoke_config("joint", num_epochs=5, patience=1)
    cfg.optim.learning_rate = 1e-30
    out = seeds_mod.train_seeds(cfg, str(tmp_path), [1, 2])
    for res in out["per_seed"]:
        assert res["stopped_early"] and res["epochs_run"] == 2 and res["best_epoch"] == 1


def test_methods_that_cannot_share_a_program_fall_back(tmp_path, capsys):
    cfg = smoke_config("mcr", num_epochs=1)
    cfg.method.permutation_scope = "local"  # runs under shard_map: one program per seed
    out = seeds_mod.train_seeds(cfg, str(tmp_path), [0, 1])
    assert "one after another" in capsys.readouterr().out
    assert [r["seed"] for r in out["per_seed"]] == [0, 1]
    assert "vectorized_seeds" not in out["per_seed"][0]


def test_vectorised_seeds_compose_with_the_data_mesh(tmp_path):
    """Seeds × data sharding: the 2 seeds on a mesh of 8 devices give the 1-device results."""
    cfg1 = smoke_config("mcr", num_epochs=2)
    cfg8 = smoke_config("mcr", num_epochs=2)
    cfg8.parallel.num_devices = 8
    one = seeds_mod.train_seeds(cfg1, str(tmp_path / "one"), [0, 1])["per_seed"]
    eight = seeds_mod.train_seeds(cfg8, str(tmp_path / "eight"), [0, 1])["per_seed"]
    for s, a, b in zip([0, 1], one, eight, strict=True):
        assert b["vectorized_seeds"] == [0, 1]
        _same(a, b, tmp_path / "one" / f"seed_{s}", tmp_path / "eight" / f"seed_{s}")


def test_an_interrupted_vectorised_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cfg = smoke_config("mcr", num_epochs=4, checkpoint_every=2)
    ref = seeds_mod.train_seeds(cfg, str(tmp_path / "ref"), [0, 1])["per_seed"]
    kill_after_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        seeds_mod.train_seeds(cfg, str(tmp_path / "run"), [0, 1])
    monkeypatch.undo()
    again = seeds_mod.train_seeds(cfg, str(tmp_path / "run"), [0, 1])["per_seed"]
    for s, a, b in zip([0, 1], ref, again, strict=True):
        _same(a, b, tmp_path / "ref" / f"seed_{s}", tmp_path / "run" / f"seed_{s}")
        with open(tmp_path / "run" / f"seed_{s}" / "metrics.jsonl") as f:
            assert len(f.readlines()) == 4


def test_a_traced_hyperparameter_grid_equals_separate_runs(tmp_path):
    """λ_M and the learning rate as traced inputs: 2 grid points in one program give the results of
    the 2 runs made with the values set statically."""
    cfg = smoke_config("mcr", num_epochs=3)
    points = [{"mipd_weight": 0.01, "learning_rate": 1e-3}, {"mipd_weight": 1.0, "learning_rate": 3e-3}]
    out = seeds_mod.train_grid(cfg, str(tmp_path / "grid"), [2], points)
    for i, p in enumerate(points):
        for s, res in zip([2], out[i]["per_seed"], strict=True):
            assert res["traced_hparams"] == p  # trained inside the one vectorised program
            one = cfg.copy_and_resolve_references()
            one.seed = s
            one.method.mipd_weight = p["mipd_weight"]
            one.optim.learning_rate = p["learning_rate"]
            alone = train.train_and_evaluate(one, str(tmp_path / f"alone_{i}_{s}"))
            assert res["config"] == alone["config"]
            _same(res, alone, tmp_path / "grid" / f"config_{i}" / f"seed_{s}", tmp_path / f"alone_{i}_{s}")


def test_a_grid_of_non_traceable_options_runs_point_by_point(tmp_path, capsys):
    cfg = smoke_config("mcr", num_epochs=1)
    out = seeds_mod.train_grid(cfg, str(tmp_path), [0, 1], [{"num_permutations": 2}, {"num_permutations": 4}])
    assert "not traceable" in capsys.readouterr().out
    assert [r["config"]["method"]["num_permutations"] for r in out[1]["per_seed"]] == [4, 4]
    assert [r["vectorized_seeds"] for r in out[0]["per_seed"]] == [[0, 1], [0, 1]]  # each point: its seeds at once


def _val_history(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [(r["epoch"], r["val"]) for r in map(json.loads, f)]


def test_vectorised_selection_never_looks_at_the_test_split(tmp_path, monkeypatch):
    """The single run's check for vectorised runs: with the test labels scrambled, every run of the
    vectorised program selects the same epoch and reports the same validation results as without; and
    each run's per-epoch validation history (metrics.jsonl) is its separate run's."""
    cfg = smoke_config("joint")
    seeds = [0, 3]
    ref = seeds_mod.train_seeds(cfg, str(tmp_path / "ref"), seeds)["per_seed"]
    alone = {}
    for s in seeds:
        one = cfg.copy_and_resolve_references()
        one.seed = s
        alone[s] = train.train_and_evaluate(one, str(tmp_path / f"alone_{s}"))
    real_load = data_lib.load

    def load_with_scrambled_test(c):
        data = real_load(c)
        test = data.splits["test"]
        data.splits["test"] = test.replace(label=np.random.default_rng(0).permutation(np.asarray(test["label"])))
        return data

    monkeypatch.setattr(data_lib, "load", load_with_scrambled_test)
    got = seeds_mod.train_seeds(cfg, str(tmp_path / "scrambled"), seeds)["per_seed"]
    for s, r, g in zip(seeds, ref, got, strict=True):
        assert g["vectorized_seeds"] == seeds
        assert g["best_epoch"] == r["best_epoch"] == alone[s]["best_epoch"]
        assert g["validation"] == r["validation"]
        hist = _val_history(tmp_path / "scrambled" / f"seed_{s}")
        want = _val_history(tmp_path / f"alone_{s}")
        assert [e for e, _ in hist] == [e for e, _ in want] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(hist, want, strict=True):
            assert set(a) == set(b)
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert any(g["test"]["heads"]["fused"]["accuracy"] != r["test"]["heads"]["fused"]["accuracy"]
               for r, g in zip(ref, got, strict=True))  # the scrambled test split was read by the test numbers


def test_each_seed_gets_its_own_training_random_streams():
    """The run's seed drives every training random stream: with the same weights and batch, one MCR step
    from the state of seed 0 and of seed 3 (``init_state``'s key) draws different permutations
    (different losses) while the same seed twice repeats itself; the dropout masks come from the model
    built with the seed (its ``Rngs``), and the data order from its own seeded shuffle."""
    method, handle, params, batch, _ = build({"name": "mcr"})
    tx = optax.sgd(0.0)
    step = make_train_step(method, tx, handle.graphdef_train, handle.graphdef_eval, ["grad_norm"])

    def loss(seed, rest=handle.rest, step=step, method=method):
        return float(step(init_state(params, rest, tx, method, seed), batch)[1]["loss"])

    assert loss(0) == loss(0)
    assert loss(0) != loss(3) and loss(3) != loss(5)
    # dropout: the same weights with the dropout state of the model built for seed 0 / seed 3
    cfg, info, _ = toy_data()
    cfg.model.dropout = 0.5
    joint = get_method(ml_collections.ConfigDict({"name": "joint"}), info)
    parts = {s: split_model(build_model(cfg.model, info, seed=s)) for s in (0, 3)}
    jstep = make_train_step(joint, tx, parts[0].graphdef_train, parts[0].graphdef_eval, ["grad_norm"])
    drop = {s: loss(0, parts[s].rest, jstep, joint) for s in (0, 3)}
    assert drop[0] != drop[3] and drop[0] == loss(0, parts[0].rest, jstep, joint)
    data = data_lib.load(cfg.data)
    order = {s: next(data.batches("train", 16, train=True, seed=s, epoch=1))["index"] for s in (0, 3)}
    assert not np.array_equal(order[0], order[3])
