"""From raw files in the real formats to a trained model: the paper's dataset configs end to end.

The fixtures write tiny CREMA-D (wav + jpg frames) and CMU-MOSI (aligned-feature pickle)
directories; the configs build them with the TFDS builders (array_record, no download), read them
through grain and train one epoch of MCR with the configs' smoke switch.
"""

import socket

import pytest

from experiments.configs import cremad, mosi
from mcr_jax import train
from tests.test_builder_cmu import MOSI_DIMS, write_pickle
from tests.test_builder_cremad import write_cremad


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_cremad_config_trains_from_raw_files(tmp_path):
    raw = tmp_path / "CREMA-D"
    write_cremad(raw)
    cfg = cremad.get_config("smoke")
    cfg.data.manual_dir = str(raw)
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.data.builder_kwargs = {"frame_size": 16, "num_folds": 3, "fold": 0}
    cfg.parallel.num_devices = 2  # batch 4 over 2 of the 8 test devices
    res = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res["dataset"] == "cremad" and res["modalities"] == ["audio", "video"]
    assert set(res["test"]["heads"]) == {"fused", "audio", "video"}
    assert 0.0 <= res["test"]["heads"]["fused"]["accuracy"] <= 1.0
    assert res["steps"] >= 1


def test_mosi_config_trains_regression_on_two_of_three_modalities(tmp_path):
    raw = tmp_path / "MOSI"
    raw.mkdir()
    write_pickle(raw / "mosi_data.pkl", MOSI_DIMS)
    cfg = mosi.get_config("smoke")
    cfg.data.manual_dir = str(raw)
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.parallel.num_devices = 4
    res = train.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res["task"] == "regression" and res["modalities"] == ["vision", "text"]
    assert set(res["test"]["heads"]["fused"]) == {"binary_accuracy", "mae", "corr", "acc7"}
    assert res["selection"] == "val_loss"
    cfg.data.modalities = ("vision", "smell")
    with pytest.raises(ValueError, match="smell"):
        train.train_and_evaluate(cfg, str(tmp_path / "run2"))
