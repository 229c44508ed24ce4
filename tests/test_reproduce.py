"""The reproduction driver (experiments.reproduce) end to end on smoke configs: its tables are the
numbers of the runs it made, its variants change exactly one thing of MCR's tuned configuration."""

import fcntl
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def repro(tmp_path_factory, worker_id):
    """One reproduction run per test session, shared by the xdist workers (the first to get here runs
    it under a lock; the others wait for it and read the same files; the tests only read)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the session's folder above every worker's own
    work, out, done = root / "repro_work", root / "repro_out", root / "repro_done"
    with open(root / "repro.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            subprocess.run([sys.executable, "-m", "experiments.reproduce",
                            "--config=experiments/configs/synthetic.py:smoke", "--config.parallel.num_devices=1",
                            "--mfeat_config=experiments/configs/mfeat.py:smoke",
                            "--mfeat_config.parallel.num_devices=1", "--mfeat_config.data.views=fou,fac",
                            "--methods=unimodal,ensemble,joint,mcr", "--budget=2",
                            "--tune_seeds=0,1", "--eval_seeds=0,1,2,3,4", "--variant_seeds=0,1,2",
                            "--study=synthetic,sweep_u2,mfeat,ablation", "--settings=0,1", f"--workdir={work}",
                            f"--out={out}"], cwd=ROOT, check=True, capture_output=True, text=True)
            done.write_text("ok")
    return work, out


def _results(path):
    with open(path) as f:
        return json.load(f)


def _acc(runs):
    return [r["test"]["heads"]["fused"]["accuracy"] for r in runs]


def _row(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


def test_sweep_tables_hold_the_runs_numbers(repro):
    work, out = repro
    text = (out / "sweep_u2.md").read_text()
    assert "wall time" in text and "unique-x2" in text
    first, second = (_results(work / "synthetic" / tag / "results.json") for tag in ("p_0.90_0.00_0.10",
                                                                                    "p_0.80_0.00_0.20"))
    row = _row(text, "joint")
    assert row.split(" | ")[1].startswith(f"{100 * np.mean(_acc(first['runs']['joint'])):.1f} [")
    def change(label):
        return np.subtract(_acc(second["runs"][label]), _acc(first["runs"][label]))

    assert _row(text, "mcr").split(" | ")[-2].startswith(f"{100 * change('mcr').mean():+.1f} [")
    versus = np.mean(change("mcr") - change("joint"))  # MCR's change minus joint training's, per seed
    assert _row(text, "joint").split(" | ")[-1].startswith(f"{100 * versus:+.1f} [")
    for name in ("sweep_u2.png", "synthetic_dynamics.png", "synthetic_paired.png"):
        assert (out / name).stat().st_size > 1000


def test_mfeat_table_reports_competition_from_paired_seeds(repro):
    work, out = repro
    text = (out / "mfeat.md").read_text()
    res = _results(work / "mfeat" / "fou_fac" / "results.json")
    assert res["modalities"] == ["fou", "fac"]
    gap = np.subtract(_acc(res["runs"]["ensemble"]), _acc(res["runs"]["joint"]))
    assert _row(text, "fou+fac").split(" | ")[3].startswith(f"{100 * gap.mean():+.1f} [")
    assert re.search(r"competition exists .*: \d+ of 2 view sets", text)
    # tuned once on the config's pair (fou+fac here), reported with those options on the others
    other = _results(work / "mfeat" / "fou_kar" / "results.json")
    assert other["protocol"]["fixed"]["mcr"] == res["chosen"]["mcr"] == other["chosen"]["mcr"]
    assert not res["protocol"]["fixed"]
    assert len(res["tuning"]["mcr"]) == 2 and len(other["tuning"]["mcr"]) == 1


def test_ablation_variants_change_one_thing_of_the_tuned_configuration(repro):
    work, out = repro
    chosen = _results(work / "synthetic" / "p_0.80_0.00_0.20" / "results.json")["chosen"]["mcr"]
    text = (out / "ablation.md").read_text()
    tuned = [_results(work / "ablation" / "variant_0" / f"seed_{s}" / "results.json") for s in range(3)]
    indep = [_results(work / "ablation" / "variant_1" / f"seed_{s}" / "results.json") for s in range(3)]
    for r in tuned + indep:
        assert all(r["config"]["method"][k] == v for k, v in chosen.items())
    assert {r["config"]["method"]["strategy"] for r in tuned} == {"greedy"}
    assert {r["config"]["method"]["strategy"] for r in indep} == {"independent"}
    diff = np.mean(np.subtract(_acc(indep), _acc(tuned)))
    assert _row(text, "independent game").split(" | ")[2].startswith(f"{100 * diff:+.1f} [")
    ceb = _results(work / "ablation" / "variant_6" / "seed_0" / "results.json")["config"]
    assert ceb["model"]["ceb"] is True and ceb["method"]["ceb_weight"] == 0.1
