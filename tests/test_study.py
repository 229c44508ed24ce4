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
