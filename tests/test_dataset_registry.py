"""One registry and one ``load(config) -> Dataset`` for in-memory and TFDS datasets (mcr_jax/data/dataset.py).

Contracts: the registry lists every dataset with its kind; batches follow one plain reference layout
whatever the path (arrays, random-access source, grain); ``arrays()`` plus ``batch_layout()``
reproduce ``batches()`` exactly, which is what an on-device epoch relies on.
"""

import numpy as np
import pytest

import mcr_jax.data as data
from mcr_jax.data import ArraySplit, Dataset, DatasetInfo, dataset, load, load_dataset, register_dataset
from tests.helpers.fakes import ListSource

SYNTHETIC = {"name": "synthetic", "raw_dim": 8, "projected_dim": 6, "num_train": 37, "num_validation": 13,
             "num_test": 21, "standardize": False}
IN_MEMORY = {"synthetic", "mfeat"}
TFDS = {"cremad", "ave", "mosi", "mosei", "ucf101"}
NAME = "registry_test_toy"


def _toy_arrays(seed=0):
    """Float32 inputs, a per-step mask of x2, int32 labels, an extra entry: one dict per split."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 19), ("validation", 7), ("test", 11)):
        out[split] = {"x1": rng.normal(size=(n, 3)).astype(np.float32),
                      "x2": rng.normal(size=(n, 4, 2)).astype(np.float32),
                      "x2_mask": rng.integers(0, 2, (n, 4)).astype(bool),
                      "label": (np.arange(n) % 3).astype(np.int32),
                      "extra": np.arange(n, dtype=np.int8)}
    return out


TOY_INFO = DatasetInfo(NAME, ("x1", "x2"), {"x1": (3,), "x2": (4, 2)}, 3)
TOY_TFDS_INFO = {"modalities": ["x1", "x2"], "input_shapes": {"x1": (3,), "x2": (4, 2)}, "num_classes": 3,
                 "task": "classification"}


@pytest.fixture
def registered():
    """Registers the toy dataset (splits wrapped by ``wrap``) and removes it afterwards."""

    def _register(wrap=ArraySplit):
        arrays = _toy_arrays()

        def loader(config):
            return {k: wrap(v) for k, v in arrays.items()}, TOY_INFO

        register_dataset(NAME, loader, overwrite=True)
        return loader, arrays

    yield _register
    data.DATASETS.pop(NAME, None)


def _reference_batches(columns, n, batch_size, *, train, seed, epoch, process_index=0, process_count=1):
    """The layout written out plainly: seeded permutation, drop or pad with example 0, slice per process."""
    if train:
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)
        order = order[: (n // batch_size) * batch_size]
        mask = np.ones(len(order), np.float32)
    else:
        pad = -n % batch_size
        order = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
        mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    local = batch_size // process_count
    out = []
    for b in range(len(order) // batch_size):
        rows = order[b * batch_size + process_index * local: b * batch_size + (process_index + 1) * local]
        batch = {k: v[rows] for k, v in columns.items()}
        batch["mask"] = mask[b * batch_size + process_index * local: b * batch_size + (process_index + 1) * local]
        batch["index"] = rows.astype(np.int32)  # each row's example index (padding: 0)
        out.append(batch)
    return out


def _assert_same_batches(got, want):
    got, want = list(got), list(want)
    assert len(got) == len(want) and len(got) > 0
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == w[k].dtype, k
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


# ---------------------------------------------------------------------------------- the registry
def test_one_registry_lists_every_dataset_with_its_kind():
    assert IN_MEMORY | TFDS <= set(data.DATASETS)
    assert data.DATASETS is dataset.DATASETS
    for name in IN_MEMORY:
        assert data.DATASETS[name].kind == "in_memory" and data.DATASETS[name].in_memory
    for name in TFDS:
        assert data.DATASETS[name].kind == "tfds" and not data.DATASETS[name].in_memory


def test_builders_are_a_view_of_the_registry():
    from mcr_jax.data.builders import CremaD
    from mcr_jax.data.dataset import BUILDERS, get_builder_class

    assert set(BUILDERS) == {n for n, s in data.DATASETS.items() if s.kind == "tfds"} == TFDS
    assert data.DATASETS["cremad"].builder_class() is CremaD is BUILDERS["cremad"]
    try:
        register_dataset("registry_test_builder", builder=CremaD)
        assert "registry_test_builder" in BUILDERS and data.DATASETS["registry_test_builder"].kind == "tfds"
        assert get_builder_class("registry_test_builder") is CremaD
    finally:
        data.DATASETS.pop("registry_test_builder", None)
    assert "registry_test_builder" not in BUILDERS
    with pytest.raises(KeyError, match="not a TFDS dataset"):
        BUILDERS["synthetic"]


def test_tfds_dataset_without_data_dir_is_a_clear_error():
    entry = load
    with pytest.raises(ValueError, match=r"config.data.data_dir must be set for dataset 'cremad'"):
        entry({"name": "cremad", "manual_dir": "/nowhere"})


def test_load_dataset_points_tfds_datasets_to_load():
    with pytest.raises(ValueError, match=r"'mosi' is a TFDS dataset.*mcr_jax.data.load\(config\)"):
        load_dataset({"name": "mosi", "data_dir": "/nowhere"})


def test_unknown_and_nameless_configs():
    with pytest.raises(ValueError, match=r"Unknown dataset 'nope'.*'cremad'.*'synthetic'"):
        load({"name": "nope"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        load({})


def test_register_dataset_rules(registered):
    loader, _ = registered()
    assert register_dataset(NAME, loader) is loader  # the same loader again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(NAME, lambda config: None)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("synthetic", loader)
    with pytest.raises(TypeError, match="callable loader"):
        register_dataset("registry_test_bad", 42)
    with pytest.raises(TypeError, match="either a loader or builder"):
        register_dataset("registry_test_bad")
    assert "registry_test_bad" not in data.DATASETS


# ------------------------------------------------------------------ loading and the same batches
def test_user_registered_in_memory_dataset_loads_through_load(registered):
    _, arrays = registered()
    ds = load({"name": NAME})
    assert isinstance(ds, Dataset) and ds.info is TOY_INFO
    assert data.DATASETS[NAME].kind == "in_memory"
    splits, info = load_dataset({"name": NAME})  # the loader's own output, as before
    assert info is TOY_INFO and len(splits["train"]) == 19
    for split, n in (("train", 19), ("validation", 7), ("test", 11)):
        assert ds.in_memory(split) and ds.size(split) == n
    columns = {k: arrays["test"][k] for k in ("x1", "x2", "x2_mask", "label")}  # "extra" is not an input
    _assert_same_batches(ds.batches("test", 4, train=False, seed=0, epoch=0),
                         _reference_batches(columns, 11, 4, train=False, seed=0, epoch=0))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("procs", [1, 2, 4])
def test_batches_follow_the_reference_layout_and_the_plain_batcher(train, procs):
    new = load(SYNTHETIC)
    splits, _ = load_dataset(SYNTHETIC)
    for split in ("train", "validation"):
        n = len(splits[split])
        columns = {k: splits[split][k] for k in ("x1", "x2", "label")}
        for p in range(procs):
            kw = dict(train=train, seed=3, epoch=2, process_index=p, process_count=procs)
            want = _reference_batches(columns, n, 8, **kw)
            _assert_same_batches(new.batches(split, 8, **kw), want)
            plain = data.batches(splits[split], 8, shuffle=train, seed=3, epoch=2, drop_remainder=train,
                                 process_index=p, process_count=procs)
            _assert_same_batches(({k: b[k] for k in (*columns, "mask")} for b in plain),
                                 [{k: v for k, v in w.items() if k != "index"} for w in want])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("procs", [1, 2])
def test_arrays_source_and_grain_paths_share_one_layout(registered, train, procs):
    """The same data in memory, as a random-access source, and through the grain reader: same batches."""
    arrays = _toy_arrays()
    kinds = {
        "arrays": Dataset({k: ArraySplit(v) for k, v in arrays.items()}, TOY_INFO),
        "source": Dataset({k: ListSource(v) for k, v in arrays.items()}, TOY_INFO),
        "grain": Dataset({k: ListSource(v) for k, v in arrays.items()}, TOY_INFO, tfds_info=TOY_TFDS_INFO),
    }
    columns = {k: arrays["train"][k] for k in ("x1", "x2", "x2_mask", "label")}
    for p in range(procs):
        kw = dict(train=train, seed=1, epoch=5, process_index=p, process_count=procs)
        want = _reference_batches(columns, 19, 4, **kw)
        for name, ds in kinds.items():
            assert ds.in_memory("train") == (name == "arrays")
            _assert_same_batches(ds.batches("train", 4, **kw), want)


# ------------------------------------------------------------------ whole splits: arrays(), in_memory()
def test_arrays_and_in_memory_on_synthetic():
    ds = load(SYNTHETIC)
    splits, _ = load_dataset(SYNTHETIC)
    for split in ("train", "validation", "test"):
        assert ds.in_memory(split)
        cols = ds.arrays(split)
        assert list(cols) == ["x1", "x2", "label"]  # no "sample_type", no "mask"
        for k, v in cols.items():
            assert isinstance(v, np.ndarray) and v.dtype == splits[split][k].dtype
            np.testing.assert_array_equal(v, splits[split][k])
    assert ds.split_arrays("test", "sample_type") is not None  # the extras stay reachable


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("procs", [1, 2])
def test_arrays_gathered_by_batch_layout_are_the_batches(train, procs):
    """What an on-device epoch does (gather the columns by the layout's indices) equals batches()."""
    ds = load(SYNTHETIC)
    cols = ds.arrays("train")
    for p in range(procs):
        kw = dict(train=train, seed=4, epoch=1, process_index=p, process_count=procs)
        indices, mask = ds.batch_layout("train", 8, **kw)
        assert indices.dtype == np.int64 and mask.dtype == np.float32 and indices.shape == mask.shape
        assert indices.shape[1] == 8 // procs
        gathered = [{**{k: v[idx] for k, v in cols.items()}, "mask": m, "index": idx.astype(np.int32)}
                    for idx, m in zip(indices, mask, strict=True)]
        _assert_same_batches(ds.batches("train", 8, **kw), gathered)


def test_arrays_keep_per_step_masks_and_streamed_splits_have_none(registered):
    registered()
    ds = load({"name": NAME})
    assert list(ds.arrays("test")) == ["x1", "x2", "x2_mask", "label"]
    registered(wrap=ListSource)
    streamed = load({"name": NAME})
    assert not streamed.in_memory("train") and streamed.arrays("train") is None
    grain = Dataset({k: ListSource(v) for k, v in _toy_arrays().items()}, TOY_INFO, tfds_info=TOY_TFDS_INFO)
    assert not grain.in_memory("test") and grain.arrays("test") is None


def test_dict_splits_are_in_memory_with_their_example_count():
    arrays = _toy_arrays()
    ds = Dataset(arrays, TOY_INFO)  # plain dicts of arrays
    assert ds.in_memory("train") and ds.size("train") == 19 and isinstance(ds.splits["train"], ArraySplit)
    np.testing.assert_array_equal(ds.arrays("train")["x2_mask"], arrays["train"]["x2_mask"])


def test_batch_layout_refuses_an_empty_training_epoch_like_batches():
    ds = load(SYNTHETIC)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        ds.batch_layout("validation", 64, train=True, seed=0, epoch=0)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        next(ds.batches("validation", 64, train=True, seed=0, epoch=0))
    indices, mask = ds.batch_layout("validation", 64, train=False, seed=0, epoch=0)
    assert indices.shape == (1, 64) and mask.sum() == 13


# ------------------------------------------------------------------------------------ build_model
def test_build_model_is_importable_from_models():
    import jax.numpy as jnp
    from ml_collections import ConfigDict

    from mcr_jax.models import build_model
    from mcr_jax.models.build import build_model as from_module

    assert build_model is from_module
    ds = load(SYNTHETIC)
    model = build_model(ConfigDict({"encoder": "mlp", "hidden": (8,), "latent_dim": 4}), ds.info, seed=0)
    batch = next(ds.batches("test", 5, train=False, seed=0, epoch=0))
    out = model({m: jnp.asarray(batch[m]) for m in ds.info.modalities})
    assert out["logits"].shape == (5, ds.info.num_classes)
