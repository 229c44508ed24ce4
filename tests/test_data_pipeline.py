"""Tests of batching, standardisation, the split types and the dataset registry."""

import numpy as np
import pytest

import mcr_jax.data as data
from mcr_jax.data import ArraySplit, DatasetInfo, batches, num_batches, standardize


def _split(n=23, feat=3):
    idx = np.arange(n)
    return ArraySplit({
        "a": (idx[:, None] * 10 + np.arange(feat)[None]).astype(np.float32),
        "b": np.stack([idx, -idx], 1).astype(np.float32)[:, :, None],  # [n, 2, 1]
        "label": (idx % 4).astype(np.int32),
        "sample_type": (idx % 3 - 1).astype(np.int8),
    })


class ListSource:
    """A random-access source that is not array-backed (like a grain/TFDS data source)."""

    def __init__(self, split):
        self._examples = [split[i] for i in range(len(split))]

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, i):
        return dict(self._examples[i])


def _ids(batch):
    return batch["a"][:, 0].astype(np.int64) // 10


@pytest.mark.parametrize("n, bs", [(23, 5), (20, 5), (3, 8), (1, 1)])
def test_eval_sees_every_example_once_with_masked_padding(n, bs):
    split = _split(n)
    out = list(batches(split, bs, shuffle=False, seed=0, epoch=0, drop_remainder=False))
    assert len(out) == num_batches(n, bs, False) == -(-n // bs)
    for b in out:
        assert set(b) == {"a", "b", "label", "sample_type", "mask"}
        assert b["a"].shape == (bs, 3) and b["b"].shape == (bs, 2, 1) and b["mask"].shape == (bs,)
        assert b["mask"].dtype == np.float32 and b["sample_type"].dtype == np.int8
    ids = np.concatenate([_ids(b) for b in out])
    mask = np.concatenate([b["mask"] for b in out])
    np.testing.assert_array_equal(ids[mask == 1], np.arange(n))
    assert mask.sum() == n and np.all(mask[:n] == 1) and np.all(mask[n:] == 0)
    np.testing.assert_array_equal(ids[mask == 0], 0)  # padding copies row 0
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in out])[mask == 1], split["label"])


def test_training_shuffles_per_epoch_reproducibly_and_drops_the_remainder():
    split = _split(23)

    def epoch_ids(seed, epoch):
        out = list(batches(split, 5, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True))
        assert len(out) == num_batches(23, 5, True) == 4
        assert all(b["mask"].sum() == 5 for b in out)
        return np.concatenate([_ids(b) for b in out])

    e0, e0_again, e1, other_seed = epoch_ids(0, 0), epoch_ids(0, 0), epoch_ids(0, 1), epoch_ids(1, 0)
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, other_seed)
    for ids in (e0, e1):
        assert len(np.unique(ids)) == 20 and ids.min() >= 0 and ids.max() < 23  # no duplicates
    assert not np.array_equal(np.sort(e0), e0)  # actually shuffled
    # Rows stay aligned across entries after shuffling.
    b = next(batches(split, 5, shuffle=True, seed=0, epoch=3, drop_remainder=True))
    np.testing.assert_array_equal(b["label"], _ids(b) % 4)
    np.testing.assert_array_equal(b["b"][:, 0, 0], _ids(b))


def test_drop_remainder_without_shuffle_takes_the_first_full_batches():
    out = list(batches(_split(23), 5, shuffle=False, seed=0, epoch=0, drop_remainder=True))
    np.testing.assert_array_equal(np.concatenate([_ids(b) for b in out]), np.arange(20))


@pytest.mark.parametrize("shuffle, drop", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("procs", [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(shuffle, drop, procs):
    split = _split(37)
    kw = dict(shuffle=shuffle, seed=3, epoch=2, drop_remainder=drop)
    single = list(batches(split, 8, **kw))
    per_proc = [list(batches(split, 8, process_index=p, process_count=procs, **kw)) for p in range(procs)]
    assert all(len(p) == len(single) for p in per_proc)
    for i, full in enumerate(single):
        for k in full:
            parts = [per_proc[p][i][k] for p in range(procs)]
            assert parts[0].shape[0] == 8 // procs
            np.testing.assert_array_equal(np.concatenate(parts), full[k])


@pytest.mark.parametrize("shuffle, drop", [(True, True), (False, False)])
def test_random_access_source_matches_the_array_path(shuffle, drop):
    split = _split(17)
    kw = dict(shuffle=shuffle, seed=1, epoch=0, drop_remainder=drop, process_index=1, process_count=2)
    fast = list(batches(split, 4, **kw))
    slow = list(batches(ListSource(split), 4, **kw))
    plain = list(batches(split.as_dict(), 4, **kw))
    assert len(fast) == len(slow) == len(plain)
    for f, s, p in zip(fast, slow, plain, strict=True):
        assert set(f) == set(s) == set(p)
        for k in f:
            np.testing.assert_array_equal(f[k], s[k])
            np.testing.assert_array_equal(f[k], p[k])
            assert f[k].dtype == s[k].dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=6, process_count=4), r"batch_size 6 is not divisible by process_count 4"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(batch_size=40, drop_remainder=True), "fewer than one batch of 40"),
        (dict(batch_size=4, shuffle=True, seed=-1), "seed and epoch must be >= 0"),
    ],
)
def test_batches_errors(kwargs, match):
    kw = dict(shuffle=False, seed=0, epoch=0, drop_remainder=False)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        batches(_split(23), **kw)  # raised on the call, not on the first next()


def test_batches_rejects_mask_entries_and_non_sources():
    with pytest.raises(ValueError, match="already has an entry 'mask'"):
        batches(_split(5).replace(mask=np.ones(5)), 2, shuffle=False, seed=0, epoch=0, drop_remainder=False)
    with pytest.raises(TypeError, match="random-access source"):
        batches(42, 2, shuffle=False, seed=0, epoch=0, drop_remainder=False)


def test_num_batches():
    assert num_batches(10, 3, True) == 3 and num_batches(10, 3, False) == 4
    assert num_batches(9, 3, False) == 3 and num_batches(0, 3, False) == 0
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0, True)


def test_standardize_fits_on_train_only():
    rng = np.random.default_rng(0)
    train = ArraySplit({"x": rng.normal(3.0, 2.0, (200, 4)).astype(np.float32),
                        "label": rng.normal(size=200).astype(np.float32),  # regression label
                        "sample_type": np.zeros(200, np.int8)})
    test = ArraySplit({"x": rng.normal(0.0, 9.0, (50, 4)).astype(np.float32),
                       "label": np.zeros(50, np.float32), "sample_type": np.zeros(50, np.int8)})
    out, stats = standardize({"train": train, "test": test})
    assert set(stats) == {"x"}  # labels and integer entries are not standardised
    np.testing.assert_allclose(stats["x"]["mean"], train["x"].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["x"]["std"], train["x"].astype(np.float64).std(0), rtol=1e-6)
    np.testing.assert_allclose(out["train"]["x"].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out["train"]["x"].std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["test"]["x"], (test["x"] - stats["x"]["mean"]) / stats["x"]["std"], rtol=1e-5)
    np.testing.assert_array_equal(out["train"]["label"], train["label"])
    assert out["test"]["x"].dtype == np.float32
    # Changing the test data does not change the statistics.
    _, stats2 = standardize({"train": train, "test": test.replace(x=test["x"] * 100)})
    np.testing.assert_array_equal(stats["x"]["mean"], stats2["x"]["mean"])


def test_standardize_only_centres_constant_features():
    train = ArraySplit({"x": np.array([[1.0, 5.0], [3.0, 5.0]], np.float32), "label": np.zeros(2, np.int32)})
    test = ArraySplit({"x": np.array([[2.0, 6.0]], np.float32), "label": np.zeros(1, np.int32)})
    out, stats = standardize({"train": train, "test": test})
    np.testing.assert_allclose(stats["x"]["std"], [1.0, 1.0])
    np.testing.assert_allclose(out["test"]["x"], [[0.0, 1.0]])
    with pytest.raises(ValueError, match="fit_split 'training'"):
        standardize({"train": train}, fit_split="training")


def test_array_split_behaviour():
    s = _split(6)
    assert len(s) == 6 and s.num_examples == 6 and "label" in s and list(s) == list(s.keys())
    ex = s[2]
    assert set(ex) == set(s.keys()) and ex["label"] == 2 and ex["b"].shape == (2, 1)
    assert len(s.take(np.array([0, 5]))) == 2
    assert dict(s)["a"] is s["a"]
    with pytest.raises(IndexError, match="out of range"):
        s[6]
    with pytest.raises(KeyError, match="not in this split"):
        s["nope"]
    with pytest.raises(ValueError, match="same leading length"):
        ArraySplit({"a": np.zeros(3), "label": np.zeros(4)})


def test_dataset_info_validation():
    info = DatasetInfo("d", ["a", "b"], {"a": [3], "b": (2, 1)}, 4)
    assert info.modalities == ("a", "b") and info.input_shapes["a"] == (3,) and info.task == "classification"
    with pytest.raises(ValueError, match="task"):
        DatasetInfo("d", ("a",), {"a": (3,)}, 4, task="ranking")
    with pytest.raises(ValueError, match="must equal the modalities"):
        DatasetInfo("d", ("a",), {"b": (3,)}, 4)


def test_registry_and_load_dataset_errors():
    assert {"synthetic", "mfeat"} <= set(data.DATASETS)

    def toy(config):
        s = ArraySplit({"x": np.zeros((2, 1), np.float32), "label": np.zeros(2, np.int32)})
        return {"train": s, "validation": s, "test": s}, DatasetInfo("toy", ("x",), {"x": (1,)}, 2)

    try:
        data.register_dataset("toy_test", toy)
        splits, info = data.load_dataset({"name": "toy_test"})
        assert info.name == "toy" and len(splits["train"]) == 2
        with pytest.raises(ValueError, match="already registered"):
            data.register_dataset("toy_test", lambda c: None)
    finally:
        data.DATASETS.pop("toy_test", None)
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        data.load_dataset({"name": "nope"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        data.load_dataset({})


@pytest.mark.parametrize("random_access", [False, True])
def test_index_key_carries_each_rows_example_index(random_access):
    split = _split(11)
    source = ListSource(split) if random_access else split
    for shuffle, drop in ((True, True), (False, False)):
        for b in batches(source, 4, shuffle=shuffle, seed=2, epoch=1, drop_remainder=drop, index_key="idx"):
            assert b["idx"].dtype == np.int64
            np.testing.assert_array_equal(b["idx"][b["mask"] == 1], _ids(b)[b["mask"] == 1])
            assert (b["idx"][b["mask"] == 0] == 0).all()
    with pytest.raises(ValueError, match="index_key 'label'"):
        batches(split, 4, shuffle=False, seed=0, epoch=0, drop_remainder=False, index_key="label")
