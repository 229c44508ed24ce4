"""TensorBoard event files (log.tensorboard): every epoch's metrics, read back with a plain
TFRecord reader and the event protobuf, for a single run and for vectorised seeds."""

import glob
import json
import os
import struct

import pytest

from experiments.configs import synthetic
from mcr_jax import guards
from mcr_jax.seeds import train_seeds
from mcr_jax.train import train_and_evaluate


def read_scalars(folder: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file in ``folder`` (TFRecord framing: length,
    its CRC, the record, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _config(tensorboard: bool):
    cfg = synthetic.get_config("smoke")
    cfg.parallel.num_devices = 1
    cfg.log.tensorboard = tensorboard
    return cfg


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_run_writes_every_epoch_metric_as_a_scalar(tmp_path):
    res = train_and_evaluate(_config(True), str(tmp_path / "one"))
    scalars = read_scalars(str(tmp_path / "one" / "tensorboard"))
    history = _history(tmp_path / "one")
    assert len(history) == res["epochs_run"] == 2
    for rec in history:
        for group in ("train", "val"):
            for name, value in rec[group].items():
                assert scalars[f"{group}/{name}"][rec["epoch"]] == pytest.approx(value, rel=1e-6)
    assert "val/mipd_x2" in scalars and "val/x1_accuracy" in scalars


def test_vectorised_seeds_write_one_event_folder_per_run_and_off_writes_none(tmp_path):
    train_seeds(_config(True), str(tmp_path / "on"), [0, 1])
    for s in (0, 1):
        run_dir = tmp_path / "on" / f"seed_{s}"
        scalars = read_scalars(str(run_dir / "tensorboard"))
        assert scalars["val/fused_accuracy"] == {
            rec["epoch"]: pytest.approx(rec["val"]["fused_accuracy"]) for rec in _history(run_dir)}
    train_seeds(_config(False), str(tmp_path / "off"), [0])
    assert not (tmp_path / "off" / "seed_0" / "tensorboard").exists()


def test_the_log_section_does_not_block_reusing_a_finished_run():
    stored = {"train": {"batch_size": 8}}  # a run made before the log section existed
    guards.check_same_config(stored, {"train": {"batch_size": 8}, "log": {"tensorboard": True}}, "w", "a run")
    with pytest.raises(ValueError, match="train.batch_size"):
        guards.check_same_config(stored, {"train": {"batch_size": 9}, "log": {"tensorboard": True}}, "w", "a run")
