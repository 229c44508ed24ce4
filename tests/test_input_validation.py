"""Inputs are checked when a dataset is loaded: labels and non-finite values, named by split, key and index.

In-memory splits are scanned in full by ``mcr_jax.data.load``; sources read example by example
(TFDS/grain, or any random-access source a registered loader returns) are checked batch by batch
as they are read, with the record index of the first bad example.
"""

import re

import numpy as np
import pytest

import mcr_jax.data as data
from mcr_jax import data as data_lib
from mcr_jax.data import ArraySplit, DatasetInfo
from tests.helpers.fakes import ListSource

SIZES = {"train": 12, "validation": 8, "test": 10}
NAME = "validation_test_toy"


def _splits(task="classification", num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        if task == "classification":
            label = (np.arange(n) % num_classes).astype(np.int32)
        else:
            label = rng.uniform(-3, 3, n).astype(np.float32)
        out[split] = {"x1": rng.normal(size=(n, 3)).astype(np.float32),
                      "x2": rng.normal(size=(n, 2, 2)).astype(np.float32), "label": label}
    return out


def _info(task="classification", num_classes=5):
    return DatasetInfo(name=NAME, modalities=("x1", "x2"), input_shapes={"x1": (3,), "x2": (2, 2)},
                       num_classes=num_classes if task == "classification" else 1, task=task)


@pytest.fixture
def register():
    """Registers a toy dataset returning the given arrays; ``load`` then loads it."""

    def _register(arrays, task="classification", num_classes=5, wrap=ArraySplit):
        def loader(config):
            return {k: wrap(v) for k, v in arrays.items()}, _info(task, num_classes)

        data.register_dataset(NAME, loader, overwrite=True)
        return {"name": NAME}

    yield _register
    data.DATASETS.pop(NAME, None)


def _raises(split, key, index):
    return pytest.raises(ValueError, match=re.escape(f"split {split!r}, key {key!r}") + f".*index {index}\\b")


# ------------------------------------------------------------------------ in-memory: checked at load
def test_clean_datasets_load(register):
    data_lib.load(register(_splits()))
    data_lib.load(register(_splits("regression"), task="regression"))
    reg = _splits("regression")
    for part in reg.values():  # whole-number regression targets are fine too
        part["label"] = np.round(part["label"]).astype(np.int32)
    data_lib.load(register(reg, task="regression"))
    data_lib.load({"name": "synthetic", "num_train": 30, "num_validation": 20, "num_test": 20})


def test_label_equal_to_num_classes_is_rejected(register):
    arrays = _splits(num_classes=5)
    arrays["train"]["label"][7] = 5
    with _raises("train", "label", 7) as err:
        data_lib.load(register(arrays, num_classes=5))
    assert "[0, 5)" in str(err.value)


def test_labels_with_a_trailing_axis_are_a_clear_error(register):
    arrays = _splits()
    arrays["train"]["label"] = arrays["train"]["label"][:, None]  # [N, 1]
    with pytest.raises(ValueError, match=r"split 'train': classification labels must be .* shape \[N\]; got shape"):
        data_lib.load(register(arrays))


def test_negative_label_is_rejected(register):
    arrays = _splits()
    arrays["validation"]["label"][3] = -1
    arrays["validation"]["label"][5] = -1
    with _raises("validation", "label", 3) as err:
        data_lib.load(register(arrays))
    assert "-1" in str(err.value) and "2 of 8" in str(err.value)


def test_float_labels_for_classification_are_rejected(register):
    arrays = _splits()
    arrays["test"]["label"] = arrays["test"]["label"].astype(np.float32)
    arrays["test"]["label"][2] = 2.5
    with _raises("test", "label", 2) as err:
        data_lib.load(register(arrays))
    assert "float32" in str(err.value)
    arrays["test"]["label"][2] = 2.0  # whole numbers, but still not an integer dtype: say how to cast
    with _raises("test", "label", 0) as err:
        data_lib.load(register(arrays))
    assert "astype(np.int32)" in str(err.value)


def test_nan_in_a_regression_validation_label_is_rejected(register):
    arrays = _splits("regression")
    arrays["validation"]["label"][4] = np.nan
    with _raises("validation", "label", 4):
        data_lib.load(register(arrays, task="regression"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_feature_in_the_test_split_is_rejected(register, value):
    arrays = _splits()
    arrays["test"]["x2"][6, 1, 0] = value
    arrays["test"]["x2"][8, 0, 0] = value
    with _raises("test", "x2", 6) as err:
        data_lib.load(register(arrays))
    assert "(1, 0)" in str(err.value) and "2 of 10" in str(err.value)


def test_missing_label_entry_is_named(register):
    arrays = _splits()
    del arrays["train"]["label"]
    with pytest.raises(ValueError, match="split 'train'.*no entry 'label'"):
        data_lib.load(register(arrays))


# ----------------------------------------------------------------- streamed sources: checked per batch
def test_random_access_source_is_checked_as_batches_are_read(register):
    arrays = _splits()
    arrays["test"]["label"][9] = 7
    dataset = data_lib.load(register(arrays, wrap=ListSource))  # not scanned at load: read lazily
    n_train = sum(1 for _ in dataset.batches("train", 4, train=True, seed=0, epoch=0))
    assert n_train == 3
    batches = dataset.batches("test", 4, train=False, seed=0, epoch=0)
    first = next(batches)
    assert set(first) == {"x1", "x2", "label", "mask", "index"}
    np.testing.assert_array_equal(first["index"], [0, 1, 2, 3])  # each row's example index in the split
    with _raises("test", "label", 9):
        list(batches)


def test_streamed_index_is_the_record_index_under_shuffling(register):
    arrays = _splits()
    arrays["train"]["x1"][10, 2] = np.nan
    dataset = data_lib.load(register(arrays, wrap=ListSource))
    with _raises("train", "x1", 10):
        for epoch in range(3):
            list(dataset.batches("train", 4, train=True, seed=1, epoch=epoch))


def test_tfds_style_source_is_checked_as_batches_are_read():
    """The grain reader (TFDS datasets) reports the record index carried by each batch."""
    arrays = _splits("regression")
    arrays["validation"]["label"][5] = np.nan
    arrays["test"]["x1"][1, 0] = np.inf
    sources = {k: ListSource(v) for k, v in arrays.items()}
    tinfo = {"modalities": ["x1", "x2"], "input_shapes": {"x1": (3,), "x2": (2, 2)}, "num_classes": 1,
             "task": "regression"}
    dataset = data_lib.Dataset(sources, _info("regression"), tfds_info=tinfo)
    assert sum(1 for _ in dataset.batches("train", 4, train=True, seed=0, epoch=0)) == 3
    with _raises("validation", "label", 5):
        list(dataset.batches("validation", 3, train=False, seed=0, epoch=0))
    with _raises("test", "x1", 1):
        list(dataset.batches("test", 3, train=False, seed=0, epoch=0))


# ------------------------------------------------------------------------------ the check on its own
def test_check_split_skips_padding_and_reports_record_indices():
    from mcr_jax.data.checks import check_split

    x = np.zeros((4, 2), np.float32)
    x[3, 1] = np.nan
    batch = {"x": x, "label": np.array([0, 1, 2, 0], np.int32)}
    check_split(batch, split="s", keys=("x", "label"), task="classification", num_classes=3,
                index=np.array([5, 6, 7, 5]), valid=np.array([True, True, True, False]))
    with pytest.raises(ValueError, match=r"split 's', key 'x'.*index 8\b"):
        check_split(batch, split="s", keys=("x", "label"), task="classification", num_classes=3,
                    index=np.array([5, 6, 7, 8]))


def test_scan_reads_streamed_splits_now(register):
    arrays = _splits()
    arrays["test"]["x1"][3, 1] = np.nan
    dataset = data_lib.load(register(arrays, wrap=ListSource))
    dataset.scan(["train", "validation"], batch_size=5)
    with _raises("test", "x1", 3):
        dataset.scan(batch_size=5)
