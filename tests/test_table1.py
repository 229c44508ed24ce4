"""experiments.table1: every row of every block is a valid config of a registered method, and the
CREMA-D block runs end to end on fixture files in the real format (smoke models, one epoch)."""

import json
import os

import pytest

from experiments import table1
from mcr_jax import guards
from mcr_jax.config import resolve_config
from mcr_jax.methods import method_defaults
from mcr_jax.report import base_method, comparison_config
from tests.test_builder_cremad import write_cremad


@pytest.mark.parametrize("dataset", sorted(table1.ROWS))
def test_every_row_is_a_valid_config_of_a_registered_method(dataset):
    cfg = table1.dataset_config(dataset, smoke=True, manual_dir="", data_dir="")
    rows = table1.ROWS[dataset][2]
    labels = [r.label for r in rows]
    assert len(set(labels)) == len(labels) and labels[:2] == ["unimodal", "ensemble"] and labels[-1] == "mcr"
    for r in rows:
        name = base_method(r.label)
        if name != "unimodal":  # the unimodal row's method options are the unimodal runs' own
            known = set(method_defaults(name)) if name != "ensemble" else set()
            assert set(r.method) <= known, (r.label, set(r.method) - known)
        c = resolve_config(comparison_config(cfg, r.label, {m: "unused" for m in ("a", "b")}, r.overrides()))
        guards.validate_config(c)
        if r.lr is not None:
            assert c.optim.learning_rate == r.lr
        for k, v in r.method.items():
            assert c.method[k] == v
    ens, uni = (next(r for r in rows if r.label == x) for x in ("ensemble", "unimodal"))
    assert (ens.lr, ens.wd) == (uni.lr, uni.wd)  # the ensemble combines those very unimodal runs


# one row of each kind a block has: per modality, an orchestrator over them, one starting from them,
# a plain method with its release options, and MCR from the unimodal runs (the whole block takes
# about five minutes on 2 cores: run it with `python -m experiments.table1 --dataset cremad --smoke`)
KINDS = ["unimodal", "ensemble", "uni_pre_frozen", "ogm_ge", "mcr"]


def test_the_cremad_block_runs_end_to_end_and_resumes(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_cremad(raw)
    cfg = table1.dataset_config("cremad", smoke=True, manual_dir=str(raw), data_dir=str(tmp_path / "tfds"))
    cfg.data.builder_kwargs = {"frame_size": 16, "num_folds": 3, "fold": 0}
    cfg.parallel.num_devices = 1
    cfg.eval.shapley = False
    work = str(tmp_path / "table")
    table1.run_table("cremad", cfg, work, [0], labels=KINDS, smoke=True)
    out = capsys.readouterr().out
    rows = [r for r in table1.ROWS["cremad"][2] if r.label in KINDS]
    assert f"[table1 cremad] {len(rows)}/{len(rows)} rows done (mcr)" in out and "ETA" in out
    text = open(os.path.join(work, "table.md")).read()
    for label in ("ensemble", "uni_pre_frozen", "ogm_ge", "mcr"):
        assert f"| {label} |" in text, label
    saved = json.load(open(os.path.join(work, "table1.json")))
    assert saved["release"] == table1.RELEASE and len(saved["rows"]) == len(rows)
    mcr = json.load(open(os.path.join(work, "seed_0", "mcr", "results.json")))
    assert mcr["config"]["method"]["mipd_weight"] == 0.1 and mcr["config"]["optim"]["learning_rate"] == 1e-4
    assert mcr["config"]["init"]["pretrained"]["audio"].endswith(os.path.join("seed_0", "unimodal_audio"))
    ogm = json.load(open(os.path.join(work, "seed_0", "ogm_ge", "results.json")))
    assert ogm["config"]["optim"]["learning_rate"] == 1e-3 and ogm["config"]["method"]["alpha"] == 1.0
    table1.run_table("cremad", cfg, work, [0], labels=KINDS, smoke=True)  # a rerun reuses every finished run
    assert "already finished" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"rows \['mrc'\] are not in the cremad block"):
        table1.run_table("cremad", cfg, work, [0], labels=["mrc"], smoke=True)
