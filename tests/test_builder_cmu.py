"""CMU-MOSI / CMU-MOSEI builders on tiny aligned-feature pickles in the shared format."""

import pickle
import re
import socket

import numpy as np
import pytest

from mcr_jax.data.builders import CmuMosei, CmuMosi
from mcr_jax.data.builders.cmu_mosi import sanitize, step_masks
from mcr_jax.data.builders.common import ManualDirError
from mcr_jax.data.tfds_source import load_tfds_dataset, split_batches

L = 50
SIZES = {"train": 6, "valid": 3, "test": 4}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def make_split(n, dims, seed, *, offset):
    """Left-padded sequences: example i has ``10 + i`` real steps at the end; labels in [-3, 3]."""
    rng = np.random.default_rng(seed)
    part = {m: np.zeros((n, L, d), np.float32) for m, d in dims.items()}
    for i in range(n):
        for m, d in dims.items():
            part[m][i, L - (10 + i):] = rng.normal(size=(10 + i, d)) + 0.5
    part["audio"][:, -1] = 0.0  # a real step where only audio is zero stays real (joint mask)
    part["labels"] = np.linspace(-3, 3, n, dtype=np.float32).reshape(n, 1, 1) + offset
    part["id"] = np.array([[f"vid{seed}_{i}".encode(), str(i).encode()] for i in range(n)])
    return part


def write_pickle(path, dims, *, bad=True):
    data = {k: make_split(n, dims, seed=j, offset=0.0) for j, (k, n) in enumerate(SIZES.items())}
    if bad:
        data["train"]["audio"][1, 45, 0] = np.nan
        data["train"]["audio"][1, 46, :2] = np.nan
        data["train"]["audio"][4, 49 - 5, 1] = -np.inf
        data["test"]["audio"][0, 47, 0] = np.inf
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


MOSI_DIMS = {"vision": 20, "audio": 5, "text": 300}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosi_raw")
    raw = write_pickle(root / "mosi_data.pkl", MOSI_DIMS)
    sources, info = load_tfds_dataset(CmuMosi, data_dir=tmp_path_factory.mktemp("mosi_tfds"), manual_dir=root)
    return raw, sources, info


def test_info_reads_sizes_from_the_file(built):
    _, _, info = built
    assert info["modalities"] == ["vision", "audio", "text"]
    assert info["input_shapes"] == {"vision": (L, 20), "audio": (L, 5), "text": (L, 300)}
    assert info["task"] == "regression" and info["num_classes"] == 1
    assert info["split_sizes"] == {"train": 6, "validation": 3, "test": 4}


def test_nonfinite_values_are_zeroed_and_counted(built):
    raw, sources, info = built
    counts = info["metadata"]["nonfinite"]
    assert counts["train"]["audio"] == {"values": 4, "examples": 2}
    assert counts["test"]["audio"] == {"values": 1, "examples": 1}
    assert counts["validation"]["audio"] == {"values": 0, "examples": 0}
    assert counts["train"]["vision"]["values"] == 0 and info["metadata"]["nonfinite_total"] == 5
    by_id = {sources["train"][i]["clip_id"].decode(): sources["train"][i] for i in range(6)}
    ex = by_id["vid0_1_1"]
    assert ex["audio"][45, 0] == 0 and (ex["audio"][46, :2] == 0).all()
    np.testing.assert_array_equal(ex["audio"][46, 2:], raw["train"]["audio"][1, 46, 2:])
    for src in sources.values():
        for i in range(len(src)):
            assert all(np.isfinite(src[i][m]).all() for m in ("vision", "audio", "text"))


def test_examples_masks_and_labels(built):
    raw, sources, _ = built
    for split, key in (("train", "train"), ("validation", "valid"), ("test", "test")):
        src = sources[split]
        for i in range(len(src)):
            ex = src[i]
            j = int(ex["clip_id"].decode().split("_")[1])
            assert ex["label"] == pytest.approx(float(raw[key]["labels"][j, 0, 0]))
            assert ex["vision"].shape == (L, 20) and ex["vision"].dtype == np.float32
            expected = np.arange(L) >= L - (10 + j)
            for m in ("vision", "audio", "text"):
                assert ex[f"{m}_mask"].dtype == np.bool_
                np.testing.assert_array_equal(ex[f"{m}_mask"], expected)
            np.testing.assert_array_equal(ex["text"], raw[key]["text"][j])


def test_reader_gives_float_labels_and_bool_masks(built):
    _, sources, info = built
    b = next(split_batches(sources["test"], info, 8, train=False))
    assert b["label"].dtype == np.float32 and b["text_mask"].dtype == np.bool_
    assert b["mask"].tolist() == [1.0] * 4 + [0.0] * 4


def test_per_modality_masks_and_sanitize_helpers():
    x = {"a": np.array([[[0.0], [1.0], [0.0]]]), "b": np.array([[[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]]])}
    joint = step_masks(x, "joint")
    np.testing.assert_array_equal(joint["a"], [[False, True, True]])
    np.testing.assert_array_equal(joint["b"], joint["a"])
    per = step_masks(x, "per_modality")
    np.testing.assert_array_equal(per["a"], [[False, True, False]])
    np.testing.assert_array_equal(per["b"], [[False, False, True]])
    clean, n_values, n_rows = sanitize(np.array([[np.nan, 1.0], [2.0, 3.0], [np.inf, -np.inf]]))
    assert (n_values, n_rows) == (3, 2) and clean.tolist() == [[0, 1], [2, 3], [0, 0]]


def test_mosei_with_other_feature_sizes(tmp_path):
    dims = {"vision": 35, "audio": 74, "text": 7}  # text size deliberately not the documented 300
    write_pickle(tmp_path / "mosei_senti_data.pkl", dims, bad=False)
    sources, info = load_tfds_dataset(CmuMosei, data_dir=tmp_path / "tfds", manual_dir=tmp_path,
                                      split_names=("validation",))
    assert info["input_shapes"] == {"vision": (L, 35), "audio": (L, 74), "text": (L, 7)}
    assert info["metadata"]["nonfinite_total"] == 0
    assert sources["validation"][0]["text"].shape == (L, 7)


def test_bad_pickles_fail_clearly(tmp_path):
    data = write_pickle(tmp_path / "mosi_data.pkl", MOSI_DIMS, bad=False)
    del data["valid"]
    with open(tmp_path / "mosi_data.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ManualDirError, match="no split 'valid'"):
        load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=tmp_path)
    data = write_pickle(tmp_path / "mosi_data.pkl", MOSI_DIMS, bad=False)
    data["test"]["vision"] = data["test"]["vision"][..., :3]
    with open(tmp_path / "mosi_data.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(ManualDirError, match="feature sizes"):
        load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds2", manual_dir=tmp_path)


def test_missing_pickle_names_the_directory_and_candidates(tmp_path):
    (tmp_path / "other.pkl").write_bytes(b"")
    with pytest.raises(ManualDirError, match="mosi_data.pkl") as err:
        load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=tmp_path)
    assert str(tmp_path) in str(err.value)


def test_command_line_builds_and_prints_the_summary(tmp_path, capsys):
    import json

    from mcr_jax.data.build import main

    write_pickle(tmp_path / "mine.pkl", MOSI_DIMS)
    info = main(["--dataset", "mosi", "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(tmp_path),
                 "--option", "pickle_name=mine.pkl", "--option", "mask_mode=per_modality"])
    out = capsys.readouterr().out  # TFDS prints its progress first; the summary comes last
    printed = json.loads(out[out.rindex('{\n  "name"'):])
    assert printed["split_sizes"] == {"train": 6, "validation": 3, "test": 4}
    assert info["metadata"]["source_file"] == "mine.pkl"
    assert info["metadata"]["options"] == {"mask_mode": "per_modality", "pickle_name": "mine.pkl"}


# ------------------------------------------------------------------ pickles: trust, errors, location
class _Payload:
    """Unpickling this creates ``marker``: stands for the code a malicious pickle could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reading_a_pickle_warns_that_it_runs_code(tmp_path, caplog):
    from mcr_jax.data.builders.cmu_mosi import load_pickle

    path = tmp_path / "mosi_data.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": np.arange(3)}, f)
    with caplog.at_level("WARNING", logger="mcr_jax.data"):
        out = load_pickle(str(path), manual_dir=str(tmp_path))
    np.testing.assert_array_equal(out["a"], np.arange(3))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(path) in line and "runs code" in line and "\n" not in line for line in lines), lines


def test_corrupt_pickle_names_the_file(tmp_path):
    from mcr_jax.data.builders.cmu_mosi import load_pickle

    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=f"could not unpickle {re.escape(str(path))}: "):
        load_pickle(str(path), manual_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"could not unpickle {re.escape(str(path))}: "):
        load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=tmp_path)


def test_pickle_outside_the_manual_dir_is_refused_before_unpickling(tmp_path):
    from mcr_jax.data.builders.cmu_mosi import load_pickle

    manual, elsewhere = tmp_path / "manual", tmp_path / "elsewhere"
    manual.mkdir()
    elsewhere.mkdir()
    marker = tmp_path / "code_ran"
    with open(elsewhere / "mosi_data.pkl", "wb") as f:
        pickle.dump(_Payload(marker), f)
    (manual / "mosi_data.pkl").symlink_to(elsewhere / "mosi_data.pkl")  # a link pointing outside
    with pytest.raises(ValueError, match="outside the manual directory") as err:
        load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=manual)
    assert str(elsewhere / "mosi_data.pkl") in str(err.value) and str(manual) in str(err.value)
    for name in ("../elsewhere/mosi_data.pkl", str(elsewhere / "mosi_data.pkl")):  # a path outside
        with pytest.raises(ValueError, match="outside the manual directory"):
            load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=manual,
                              builder_kwargs={"pickle_name": name})
    with pytest.raises(ValueError, match="outside the manual directory"):
        load_pickle(str(manual / "mosi_data.pkl"), manual_dir=str(manual))
    assert not marker.exists()


def test_symlinks_inside_the_manual_dir_are_followed(tmp_path):
    manual = tmp_path / "manual"
    (manual / "files").mkdir(parents=True)
    write_pickle(manual / "files" / "real.pkl", MOSI_DIMS, bad=False)
    (manual / "mosi_data.pkl").symlink_to(manual / "files" / "real.pkl")
    link_dir = tmp_path / "link_to_manual"  # the manual directory itself may be a link
    link_dir.symlink_to(manual)
    _, info = load_tfds_dataset(CmuMosi, data_dir=tmp_path / "tfds", manual_dir=link_dir)
    assert info["split_sizes"]["train"] == SIZES["train"]
