"""The study engine: equal budgets, selection on validation only, paired differences."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_points_give_every_method_the_same_budget():
    assert study.grid_points("joint", 4) == [{}]
    assert study.grid_points("uni_pre_frozen", 4) == [{}]  # a comparison label, not a registered name
    assert len(study.grid_points("multiloss", 4)) == 4
    mcr = study.grid_points("mcr", 4, grid_seed=1)
    assert len(mcr) == 4 and len({tuple(sorted(p.items())) for p in mcr}) == 4
    assert mcr == study.grid_points("mcr", 4, grid_seed=1)  # reproducible
    assert study.grid_points("x", 3, grid={"a": [1, 2]}) == [{"a": 1}, {"a": 2}]


def test_paired_difference_matches_numpy():
    a, b = [0.9, 0.8, 0.85], [0.8, 0.8, 0.7]
    d = np.array(a) - np.array(b)
    got = study.paired_difference(a, b)
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
    assert got["mean"] == pytest.approx(d.mean()) and got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    with pytest.raises(ValueError, match="same seeds"):
        study.paired_difference(a, b[:2])


def test_a_small_study_end_to_end(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 2
    cfg.parallel.num_devices = 1
    subprocess.run([sys.executable, "-m", "experiments.study", "--config=experiments/configs/synthetic.py:smoke",
                    "--config.train.num_epochs=2", "--config.parallel.num_devices=1", f"--workdir={tmp_path}",
                    "--methods=unimodal,ensemble,joint,multiloss,mcr", "--budget=2", "--tune_seeds=0,1",
                    "--eval_seeds=0,1,2,3,4"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    with open(tmp_path / "results.json") as f:
        out = json.load(f)
    assert out["protocol"]["budget"] == 2
    assert [len(out["tuning"][m]) for m in ("multiloss", "mcr")] == [2, 2]
    for name in ("multiloss", "mcr"):  # the chosen options have the best mean validation metric
        scored = out["tuning"][name]
        best = max(scored, key=lambda c: c["val_mean"])
        assert out["chosen"][name] == best["options"]
        assert all(len(c["val_per_seed"]) == 2 for c in scored)
    assert [r["seed"] for r in out["runs"]["mcr"]] == [0, 1, 2, 3, 4]
    joint = [r["test"]["heads"]["fused"]["accuracy"] for r in out["runs"]["joint"]]
    mcr = [r["test"]["heads"]["fused"]["accuracy"] for r in out["runs"]["mcr"]]
    assert out["paired"]["joint"]["mcr"]["mean"] == pytest.approx(np.mean(np.subtract(mcr, joint)))
    assert os.path.getsize(tmp_path / "paired.png") > 1000
    assert "Paired test differences" in (tmp_path / "table.md").read_text()
    # the ensemble combines the study's own unimodal runs (not copies trained under its folder)
    assert not any(p.name.startswith("unimodal") for p in (tmp_path / "ensemble").rglob("*"))
    assert out["runs"]["ensemble"][0]["config"]["method"]["unimodal_workdirs"]["x1"] == str(
        tmp_path / "unimodal_x1" / "config_0" / "seed_0")
    # training dynamics: one chart per reported run and one averaged per study
    assert os.path.getsize(tmp_path / "dynamics.png") > 1000
    assert all(os.path.exists(os.path.join(d, "dynamics.png")) for d in out["run_dirs"]["mcr"])
    assert out["run_dirs"]["mcr"][0].startswith(out["tuning"]["mcr"][0]["root"][:-1])


def test_a_sampled_grid_never_repeats_a_configuration():
    """A budget below the grid's size draws that many *distinct* points of the grid, for any grid seed."""
    full = study.grid_points("mcr", 10**6)  # the whole grid (4 x 3 x 2 points)
    assert len(full) == 24
    for seed in range(3):
        points = study.grid_points("mcr", 20, grid_seed=seed)
        keys = {tuple(sorted(p.items())) for p in points}
        assert len(points) == len(keys) == 20 and all(p in full for p in points)


#: scripted validation accuracy per tune seed (0, 1, 2) of each multiloss grid point (uni_weight): the
#: best mean is 0.3's; seed 0 alone would choose 0.1; the test split (1 - validation) would choose 3.0.
_VAL = {0.1: [0.9, 0.1, 0.2], 0.3: [0.6, 0.6, 0.6], 1.0: [0.3, 0.5, 0.4], 3.0: [0.2, 0.3, 0.1]}


def _scripted_result(cfg, seed):
    if cfg.method.name == "joint":
        val = test = 0.5 + 0.01 * seed
    else:
        val = _VAL[float(cfg.method.uni_weight)][seed % 3]
        test = 1.0 - val + 0.001 * seed
    split = lambda acc: {"loss": 1.0 - acc, "heads": {"fused": {"accuracy": acc}}}  # noqa: E731
    return {"seed": int(seed), "validation": split(val), "test": split(test)}


def test_the_study_selects_on_the_mean_validation_metric_and_pairs_test_differences(tmp_path, monkeypatch):
    """run_study with scripted results (no training): the chosen configuration has the best *mean*
    validation metric over the tune seeds (not the best first seed, not the best test metric), and the
    paired differences are method − baseline per eval seed, with the ddof-1 Student-t interval."""
    from scipy import stats

    from mcr_jax import seeds as seeds_mod
    from mcr_jax.seeds import with_options

    def fake_grid(config, workdir, seeds, points):
        return [{"per_seed": [_scripted_result(with_options(config, p), s) for s in seeds]} for p in points]

    def fake_seeds(config, workdir, seeds, **kwargs):
        return {"per_seed": [_scripted_result(config, s) for s in seeds]}

    monkeypatch.setattr(seeds_mod, "train_grid", fake_grid)
    monkeypatch.setattr(seeds_mod, "train_seeds", fake_seeds)
    out = study.run_study(synthetic.get_config("smoke"), str(tmp_path), ["joint", "multiloss"], budget=4,
                          tune_seeds=(0, 1, 2), eval_seeds=(0, 1, 2, 3, 4), charts=False)
    assert [c["options"]["uni_weight"] for c in out["tuning"]["multiloss"]] == sorted(_VAL)
    means = {w: np.mean(v) for w, v in _VAL.items()}
    assert out["chosen"]["multiloss"] == {"uni_weight": max(means, key=means.get)} == {"uni_weight": 0.3}
    assert [c["val_mean"] for c in out["tuning"]["multiloss"]] == pytest.approx([means[w] for w in sorted(_VAL)])
    d = np.array([1.0 - 0.6 + 0.001 * s - (0.5 + 0.01 * s) for s in range(5)])
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    got = out["paired"]["joint"]["multiloss"]
    assert got["mean"] == pytest.approx(d.mean()) and got["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])


def test_a_nan_mean_validation_value_is_never_chosen():
    nan = float("nan")
    assert study.best_configuration([{"val_mean": nan}, {"val_mean": 0.5}, {"val_mean": 0.9}]) == 2
    assert study.best_configuration([{"val_mean": 0.7}, {"val_mean": nan}, {"val_mean": 0.6}]) == 0
    with pytest.raises(ValueError, match="every configuration of 'mcr' has an undefined"):
        study.best_configuration([{"val_mean": nan}, {"val_mean": nan}], "mcr")


def test_compiling_the_next_method_ahead_changes_no_result(tmp_path, monkeypatch, capsys):
    """The comparison runner builds and compiles the next unit's programs on a background thread
    (the next vectorised method, the next seed of a per-seed method): the prepared programs are
    used, and every run's results equal those of the same comparison without preparation. The
    same for programs shared between functions that compile the same program
    (:mod:`mcr_jax.shared_jit`; uni-pre's two seeds, the methods' common evaluation): the
    comparison without preparation runs with sharing off."""
    from mcr_jax import seeds as seeds_lib
    from mcr_jax import shared_jit

    cfg = synthetic.get_config("smoke")
    cfg.train.num_epochs = 2
    cfg.parallel.num_devices = 1
    used = []
    real_get = seeds_lib.Prepared.get

    def get(self, specs):
        programs = real_get(self, specs)
        used.append(programs is not None)
        return programs

    monkeypatch.setattr(seeds_lib.Prepared, "get", get)
    methods = ["unimodal", "uni_pre_frozen", "joint"]
    shared_before = shared_jit.stats()["shared"]
    ahead = study.run_comparison(cfg, str(tmp_path / "ahead"), methods, (0, 1))
    assert shared_jit.stats()["shared"] > shared_before
    assert used == [True, True, True]  # unimodal x2, uni-pre's seed 1, joint
    # Progress, as written to a file: a line per unit (the first epoch's line aside), named as the
    # comparison names it, with the job's ETA on the epoch line.
    log = capsys.readouterr().out.splitlines()
    done = [line.split("] done in ")[0] + "]" for line in log if "] done in " in line]
    assert done == ["[unimodal x1 × 2 runs]", "[unimodal x2 × 2 runs]", "[uni_pre_frozen seed 0]",
                    "[uni_pre_frozen seed 1]", "[joint × 2 runs]"], log
    assert len(log) <= len(done) + 2 and "· job 1/5" in log[0], log
    shared_jit.set_sharing(False)
    try:
        inline = study.run_comparison(cfg, str(tmp_path / "inline"), methods, (0, 1), compile_ahead=False)
    finally:
        shared_jit.set_sharing(True)
    assert len(used) == 3
    for label, runs in inline["runs"].items():
        for a, b in zip(ahead["runs"][label], runs, strict=True):
            for split in ("validation", "test"):
                assert a[split]["heads"] == b[split]["heads"], (label, split)
            assert a["best_epoch"] == b["best_epoch"]
