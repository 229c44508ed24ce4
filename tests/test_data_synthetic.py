"""Tests of the synthetic unique/shared benchmark (mcr_jax/data/synthetic.py)."""

import math

import ml_collections
import numpy as np
import pytest

from mcr_jax.data import load_dataset, sweep_unique_ratio
from mcr_jax.data import synthetic as syn

SMALL = dict(name="synthetic", raw_dim=16, num_train=300, num_validation=100, num_test=200,
             standardize=False)


def _raw_split(n=6000, proportions=(0.4, 0.4, 0.2), seed=3, **overrides):
    cfg = {**SMALL, "seed": seed, "proportions": proportions, **overrides}
    params = syn.make_parameters(cfg)
    rng = np.random.Generator(np.random.PCG64(seed))
    props = syn.parse_proportions(proportions, cfg.get("num_modalities", 2))
    return params, syn.sample_split(params, props, n, rng, return_raw=True)


def test_default_config_shapes_dtypes_and_info():
    splits, info = load_dataset({"name": "synthetic"})
    d = syn.DEFAULTS
    assert info.name == "synthetic" and info.task == "classification"
    assert info.modalities == ("x1", "x2")
    assert info.input_shapes == {"x1": (100,), "x2": (100,)}
    assert info.num_classes == d["num_classes"]
    for name in ("train", "validation", "test"):
        split = splits[name]
        assert len(split) == d[f"num_{name}"] == info.extra["split_sizes"][name]
        assert split["x1"].dtype == np.float32 and split["x1"].shape == (len(split), 100)
        assert split["label"].dtype == np.int32
        assert split["sample_type"].dtype == np.int8
        assert set(np.unique(split["sample_type"])) <= {-1, 0, 1}
    # Standardised on train by default: train features have mean 0 and std 1.
    np.testing.assert_allclose(splits["train"]["x2"].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(splits["train"]["x2"].std(0), 1.0, atol=1e-3)
    assert set(info.extra["standardization"]) == {"x1", "x2"}


def test_config_dict_and_plain_dict_give_the_same_data():
    a, _ = load_dataset(ml_collections.ConfigDict(SMALL))
    b, _ = load_dataset(dict(SMALL))
    for k in a["train"].keys():
        np.testing.assert_array_equal(a["train"][k], b["train"][k])


@pytest.mark.parametrize("n", [1000, 997])
def test_type_counts_are_exact_and_labels_uniform(n):
    props = (0.5, 0.3, 0.2)
    _, out = _raw_split(n=n, proportions=props)
    counts = np.array([(out["sample_type"] == t).sum() for t in (-1, 0, 1)])
    assert counts.sum() == n
    np.testing.assert_array_less(np.abs(counts - np.array(props) * n), 1.0 + 1e-9)
    # Types are placed at random, not in blocks.
    assert (out["sample_type"][: n // 2] == -1).mean() < 0.7
    label_freq = np.bincount(out["label"], minlength=5) / n
    np.testing.assert_allclose(label_freq, 0.2, atol=0.05)


def test_projection_and_class_means_follow_the_documented_process():
    params, out = _raw_split(n=2000, embedding_scale=(4.0, 1.5))
    means, proj = params["class_means"], params["projections"]
    assert means.shape == (2, 5, 16) and proj.shape == (2, 16, 100)
    assert proj.min() >= 0.0 and proj.max() < 1.0 and abs(proj.mean() - 0.5) < 0.05
    norms = np.linalg.norm(means, axis=-1).mean(axis=1)
    np.testing.assert_allclose(norms, [4.0, 1.5], rtol=0.3)
    for i, m in enumerate(("x1", "x2")):
        np.testing.assert_allclose(out[m], out[f"raw_{m}"] @ proj[i], rtol=1e-5, atol=1e-3)
        # Subtracting the class mean where the label is carried leaves N(0, I) noise.
        carries = (out["sample_type"] == -1) | (out["sample_type"] == i)
        noise = out[f"raw_{m}"] - carries[:, None] * means[i][out["label"]]
        np.testing.assert_allclose(noise.mean(0), 0.0, atol=0.12)
        np.testing.assert_allclose(noise.var(0), 1.0, atol=0.15)


def _class_mean_stat(raw, labels, num_classes=5):
    """n_c · ‖class mean‖² / d, averaged over classes: ≈ 1 for pure N(0, I) noise."""
    d = raw.shape[1]
    stats = [(labels == c).sum() * np.sum(raw[labels == c].mean(0) ** 2) / d for c in range(num_classes)]
    return float(np.mean(stats))


def test_class_signal_only_in_the_modalities_that_carry_it():
    _, out = _raw_split(n=6000)
    t, y = out["sample_type"], out["label"]
    # unique to x1: x2 is pure noise (class means indistinguishable), x1 carries the class.
    assert 0.6 < _class_mean_stat(out["raw_x2"][t == 0], y[t == 0]) < 1.5
    assert _class_mean_stat(out["raw_x1"][t == 0], y[t == 0]) > 20
    # unique to x2: the mirror image.
    assert 0.6 < _class_mean_stat(out["raw_x1"][t == 1], y[t == 1]) < 1.5
    assert _class_mean_stat(out["raw_x2"][t == 1], y[t == 1]) > 20
    # shared: both carry it.
    assert _class_mean_stat(out["raw_x1"][t == -1], y[t == -1]) > 20
    assert _class_mean_stat(out["raw_x2"][t == -1], y[t == -1]) > 20


def _nearest_mean_accuracy(x_fit, y_fit, x_eval, y_eval, num_classes=5):
    centroids = np.stack([x_fit[y_fit == c].mean(0) for c in range(num_classes)])
    dist = ((x_eval[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == y_eval).mean())


def test_linear_probe_on_projected_features_is_at_chance_without_signal():
    cfg = {**SMALL, "num_train": 4000, "num_test": 4000, "proportions": (0.2, 0.4, 0.4),
           "embedding_scale": 4.0, "standardize": True}
    splits, _ = load_dataset(cfg)
    tr, te = splits["train"], splits["test"]
    for carrier, other, typ in (("x1", "x2", 0), ("x2", "x1", 1)):
        a, b = tr["sample_type"] == typ, te["sample_type"] == typ
        chance = _nearest_mean_accuracy(tr[other][a], tr["label"][a], te[other][b], te["label"][b])
        signal = _nearest_mean_accuracy(tr[carrier][a], tr["label"][a], te[carrier][b], te["label"][b])
        assert chance < 0.27, (other, chance)
        assert signal > 0.6, (carrier, signal)


def test_same_seed_same_arrays_different_seed_different():
    a, _ = load_dataset({**SMALL, "seed": 7})
    b, _ = load_dataset({**SMALL, "seed": 7})
    c, _ = load_dataset({**SMALL, "seed": 8})
    for split in a:
        for k in a[split].keys():
            np.testing.assert_array_equal(a[split][k], b[split][k])
        assert not np.array_equal(a[split]["x1"], c[split]["x1"])
    # The splits are different draws from one another.
    assert not np.array_equal(a["train"]["x1"][:100], a["test"]["x1"][:100])


def test_test_set_does_not_depend_on_the_training_size():
    a, _ = load_dataset({**SMALL, "num_train": 300})
    b, _ = load_dataset({**SMALL, "num_train": 50})
    np.testing.assert_array_equal(a["test"]["x2"], b["test"]["x2"])
    np.testing.assert_array_equal(a["test"]["label"], b["test"]["label"])


def test_more_modalities_and_classes():
    with pytest.raises(ValueError, match="one per modality"):
        load_dataset({**SMALL, "num_modalities": 3})
    splits, info = load_dataset({**SMALL, "num_modalities": 3, "num_classes": 7, "embedding_scale": 3.0,
                                 "proportions": {"shared": 0.4, "unique": (0.2, 0.2, 0.2)}})
    assert info.modalities == ("x1", "x2", "x3") and info.num_classes == 7
    assert set(np.unique(splits["train"]["sample_type"])) == {-1, 0, 1, 2}
    assert splits["train"]["label"].max() == 6


@pytest.mark.parametrize(
    "proportions, match",
    [
        ((0.5, 0.3, 0.3), "sum to 1"),
        ((0.5, 0.5), "needs 3 entries"),
        ((1.2, -0.2, 0.0), ">= 0"),
        ({"shared": 0.5, "uniq": (0.25, 0.25)}, "'shared' and 'unique'"),
        ("0.5,0.5", "sequence or a mapping"),
    ],
)
def test_proportion_errors(proportions, match):
    with pytest.raises(ValueError, match=match):
        load_dataset({**SMALL, "proportions": proportions})


def test_mapping_and_tuple_proportions_agree():
    a = syn.parse_proportions({"shared": 0.5, "unique": [0.3, 0.2]}, 2)
    np.testing.assert_array_equal(a, [0.5, 0.3, 0.2])


@pytest.mark.parametrize(
    "override, match",
    [
        ({"num_clases": 5}, "unknown synthetic dataset options"),
        ({"num_classes": 1}, "num_classes"),
        ({"embedding_scale": (1.0, 2.0, 3.0)}, "embedding_scale"),
        ({"num_train": -1}, "num_train"),
    ],
)
def test_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_dataset({**SMALL, **override})


def test_sweep_unique_ratio_keeps_unique_to_2_and_everything_else():
    base = {**SMALL, "proportions": (0.6, 0.2, 0.2), "seed": 5}
    configs = list(sweep_unique_ratio(base, [0.0, 1.0, 3.0, math.inf]))
    assert len(configs) == 4
    got = np.array([c.proportions for c in configs])
    np.testing.assert_allclose(got[:, 2], 0.2)
    np.testing.assert_allclose(got.sum(1), 1.0)
    np.testing.assert_allclose(got[:, 0], [0.8, 0.4, 0.2, 0.0])
    np.testing.assert_allclose(got[:, 1], [0.0, 0.4, 0.6, 0.8])
    for c in configs:
        assert c.seed == 5 and c.raw_dim == 16 and c.name == "synthetic"
    # Class means and projections stay fixed along the sweep.
    p0, p1 = (syn.make_parameters(c) for c in configs[:2])
    np.testing.assert_array_equal(p0["class_means"], p1["class_means"])
    splits, _ = load_dataset(configs[1])
    assert len(splits["train"]) == 300
    with pytest.raises(ValueError, match="ratios must be >= 0"):
        list(sweep_unique_ratio(base, [-1.0]))
