"""Smoke runs of every baseline method through the trainer (2 epochs on the synthetic smoke data each)."""


import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.methods import get_method
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES
from tests.helpers.method_checks import smoke_run as _smoke
from tests.helpers.method_setup import toy_data as _data


@pytest.mark.parametrize("name", ["ogm_ge", "agm", "mlb", "mslr"])
def test_smoke_run(name, tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": name})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    assert (set(NAMES) <= set(res["test"]["heads"])) == (name in ("mlb", "mslr"))


def test_smoke_mmcosine(tmp_path):
    _smoke(tmp_path, {"name": "mmcosine"})


def test_smoke_mmpareto(tmp_path):
    _, history = _smoke(tmp_path, {"name": "mmpareto"})
    assert "cos_x1" in history[0]["train"]


def test_smoke_reconboost(tmp_path):
    _, history = _smoke(tmp_path, {"name": "reconboost", "stage_epochs": 1, "rectify_epochs": 1})
    assert [h["train"]["boosting"] for h in history] == [1.0, 0.0]


def test_smoke_dnr(tmp_path, capsys):
    _smoke(tmp_path, {"name": "dnr", "reinit_epochs": 1, "reinit_num": 1})
    log = capsys.readouterr().out
    assert log.count("re-initialisation") == 1 and "[dnr] epoch 1: re-initialisation 1" in log


def test_defaults_alone_give_working_methods():
    _, info, _ = _data()
    for name in ("mmcosine", "mmpareto", "reconboost", "dnr"):
        assert get_method(ml_collections.ConfigDict({"name": name}), info).name == name
