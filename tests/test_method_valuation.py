"""Sample-level modality valuation tests: the per-example sampling weights of the data layer, the
Shapley rule against a slow float64 NumPy version, a golden test against the released code, one
smoke run through the trainer, and the errors.

Golden reference: GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
(commit 7ed12b07ee7d233aa835089185c909aaa3ff6b1e), transcribed below in NumPy without
``mcr_jax.methods``:

- ``code/sample_level.py`` ``execute_modulation`` (lines 79-118): ``value_all = 2.0`` if the fused
  argmax is right, ``value_v``/``value_a = 1.0`` if the prediction with the other feature zeroed
  (``code/models/models.py`` ``exec_drop``, lines 74-86) is right;
  ``contrib_a = (value_a + value_all - value_v) / 2``, ``contrib_v = (value_v + value_all - value_a) / 2``;
- ``code/datasets/dataloader.py`` ``AV_KS_Dataset_sample_level.__init__`` (lines 150-186): the original
  rows (``drop = 0``) plus 1 / 2 / 3 copies with ``drop = 2`` (visual zeroed: audio only) when
  ``0.4 < contrib_a < 1`` / ``-0.1 < contrib_a < 0.4`` / ``contrib_a < -0.1``, likewise ``drop = 1``
  (audio zeroed) from ``contrib_v``;
- ``code/models/models.py`` ``forward`` (lines 61-71) and ``sample_level.py`` ``train_epoch``: the
  fused output with ``a[i] = 0`` where ``drop = 1``, ``v[i] = 0`` where ``drop = 2``, cross-entropy.

The toy model's first modality ``x1`` plays audio, ``x2`` visual; the linear fusion
``Σ_m z_m W_m + b`` is the release's concatenation head.
"""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.data.layout import batch_layout, example_order
from mcr_jax.data.pipeline import batches as array_batches
from mcr_jax.methods import get_method
from mcr_jax.methods.base import EpochContext
from mcr_jax.methods.valuation import GRID, resample_copies, shapley_contributions
from mcr_jax.state import TrainState
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, ce
from tests.helpers.method_checks import f64 as _np
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data

# ---- (0) the data layer: per-example sampling weights ------------------------------------------------------


def test_layout_without_weights_is_unchanged():
    for seed, epoch in [(0, 1), (3, 7)]:
        want = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(50)
        np.testing.assert_array_equal(example_order(50, shuffle=True, seed=seed, epoch=epoch, weights=None), want)
        a = batch_layout(50, 8, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True)
        b = batch_layout(50, 8, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True, weights=None)
        np.testing.assert_array_equal(a[0], want[:48].reshape(6, 8))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_weighted_layout_frequencies_reproducibility_and_zeros():
    n = 20
    w = np.arange(n, dtype=np.float64) % 5  # 0, 1, 2, 3, 4, 0, ...: examples 0, 5, 10, 15 weigh 0
    counts = np.zeros(n)
    for epoch in range(1, 501):
        rows, mask = batch_layout(n, 4, shuffle=True, seed=1, epoch=epoch, drop_remainder=True, weights=w)
        assert rows.shape == (5, 4) and np.all(mask == 1)
        counts += np.bincount(rows.ravel(), minlength=n)
    assert np.all(counts[w == 0] == 0)
    p = w / w.sum()
    total = counts.sum()  # 10 000 draws: each count within 5 binomial standard deviations
    assert np.all(np.abs(counts - total * p) <= 5 * np.sqrt(total * p * (1 - p)) + 1e-9)
    again = batch_layout(n, 4, shuffle=True, seed=1, epoch=3, drop_remainder=True, weights=w)[0]
    np.testing.assert_array_equal(again, batch_layout(n, 4, shuffle=True, seed=1, epoch=3, drop_remainder=True,
                                                      weights=list(w))[0])
    assert not np.array_equal(again, batch_layout(n, 4, shuffle=True, seed=1, epoch=4, drop_remainder=True,
                                                  weights=w)[0])
    # the pipeline gathers exactly the layout's rows
    split = {"x": np.arange(n, dtype=np.float32)[:, None], "label": np.arange(n, dtype=np.int32)}
    got = [b["label"] for b in array_batches(split, 4, shuffle=True, seed=1, epoch=3, drop_remainder=True,
                                             weights=w)]
    np.testing.assert_array_equal(np.stack(got), again)


@pytest.mark.parametrize("weights, match", [
    ([1.0, -1.0, 1.0], ">= 0"), ([1.0, np.nan, 1.0], "finite"), ([1.0, 1.0], "shape"),
    ([0.0, 0.0, 0.0], "all zero"), ([[1.0, 1.0, 1.0]], "shape"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(ValueError, match=match):
        batch_layout(3, 1, shuffle=True, seed=0, epoch=1, drop_remainder=True, weights=weights)


def test_weights_need_training_batches():
    with pytest.raises(ValueError, match="shuffle=True"):
        batch_layout(3, 1, shuffle=False, seed=0, epoch=1, drop_remainder=False, weights=[1.0, 1.0, 1.0])


# ---- reference maths (float64 NumPy, independent of the module) -------------------------------------------


def _slow_shapley(correct, mods):
    """Shapley values by averaging marginal contributions over every ordering of the modalities."""
    n = len(next(iter(correct.values())))
    value = lambda s: len(s) * np.asarray(correct[frozenset(s)], np.float64) if s else np.zeros(n)
    out = {m: np.zeros(n) for m in mods}
    perms = list(itertools.permutations(mods))
    for order in perms:
        for j, m in enumerate(order):
            out[m] += (value(order[:j + 1]) - value(order[:j])) / len(perms)
    return out


def _release_contrib(pred_all, pred_a, pred_v, label):
    """sample_level.py execute_modulation, lines 95-116 (per sample, Python loop)."""
    out = {}
    for i in range(len(label)):
        value_all = 2.0 if np.argmax(pred_all[i]) == label[i] else 0.0
        value_v = 1.0 if np.argmax(pred_v[i]) == label[i] else 0.0
        value_a = 1.0 if np.argmax(pred_a[i]) == label[i] else 0.0
        out[i] = ((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0)
    return out


def _release_resample(contribution, n):
    """dataloader.py AV_KS_Dataset_sample_level.__init__, lines 150-186: (sample, drop) rows."""
    data, drop = list(range(n)), [0] * n
    for i in range(n):
        contrib_a, contrib_v = contribution[i]
        for lo, hi, times in [(0.4, 1, 1), (-0.1, 0.4, 2)]:
            if lo < contrib_a < hi:
                data += [i] * times
                drop += [2] * times
                break
        else:
            if contrib_a < -0.1:
                data += [i] * 3
                drop += [2] * 3
        for lo, hi, times in [(0.4, 1, 1), (-0.1, 0.4, 2)]:
            if lo < contrib_v < hi:
                data += [i] * times
                drop += [1] * times
                break
        else:
            if contrib_v < -0.1:
                data += [i] * 3
                drop += [1] * 3
    return np.array(data), np.array(drop)


def _np_fused(params, latents):
    fus = params["fusion"]
    return sum(_np(latents[m]) @ _np(fus["branches"][m]["kernel"]) for m in NAMES) + _np(fus["bias"])


# ---- shared set-up -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return build({"name": "valuation", "warmup": 1})


def _latents(handle, params, batch):
    model = handle.eval_model(params)
    return {m: np.asarray(z) for m, z in model.encode({m: batch[m] for m in NAMES}).items()}


def _ctx(handle, params, batch):
    """An EpochContext whose training split is the toy batch (row i = example i)."""

    def features_fn(p, r, split):
        assert split == "train"
        return _latents(handle, p, batch), np.asarray(batch["label"])

    def fuse_fn(p, r, latents):
        return np.asarray(handle.eval_model(p).fuse({m: jnp.asarray(v) for m, v in latents.items()}))

    state = TrainState(params=params, rest=handle.rest, opt_state=None, method_state=None, key=None, step=None,
                       epoch=None, bad_step=None, bad_terms=None)
    return EpochContext(epoch=1, steps_per_epoch=1, state=state, features_fn=features_fn,
                        fresh_params_fn=None, fuse_fn=fuse_fn)


# ---- (a) the rule against float64 NumPy --------------------------------------------------------------------


@pytest.mark.parametrize("mods", [("a", "v"), ("a", "b", "c")])
def test_shapley_matches_slow_permutation_average(mods):
    rng = np.random.default_rng(0)
    correct = {frozenset(s): rng.random(40) < 0.5
               for k in range(1, len(mods) + 1) for s in itertools.combinations(mods, k)}
    got, want = shapley_contributions(correct, mods), _slow_shapley(correct, mods)
    for m in mods:
        np.testing.assert_allclose(got[m], want[m], atol=1e-12)
    total = sum(got[m] for m in mods)  # efficiency: the contributions add up to v(all)
    np.testing.assert_allclose(total, len(mods) * correct[frozenset(mods)], atol=1e-12)


def test_resample_copies_thresholds():
    c = np.array([-0.5, -0.1, 0.0, 0.4, 0.5, 1.0, 1.5, 0.39, -0.11, 0.99])
    np.testing.assert_array_equal(resample_copies(c), [3, 0, 2, 0, 1, 0, 0, 2, 3, 1])


def test_row_modes_frequencies(setup):
    method = setup[0]
    copies = jnp.array([[0, 1, 3, 2], [0, 2, 0, 2]], jnp.int32)
    index = jnp.tile(jnp.arange(4, dtype=jnp.int32), 4000)
    modes = np.asarray(method.row_modes(copies, index, jax.random.PRNGKey(3))).reshape(4000, 4)
    for i in range(4):
        k = np.asarray(copies)[:, i]
        p = np.concatenate([[1.0], k]) / (1 + k.sum())
        freq = np.bincount(modes[:, i], minlength=3) / 4000
        np.testing.assert_allclose(freq, p, atol=0.03)
        assert np.all(freq[p == 0] == 0)


# ---- (b) golden test against the release -------------------------------------------------------------------


def test_golden_valuation_and_resampling(setup):
    method, handle, params, batch, _ = setup
    n = batch["label"].shape[0]
    batch = dict(batch, index=jnp.arange(n, dtype=jnp.int32))  # toy training split: row i = example i
    method.num_train = n
    z = _latents(handle, params, batch)
    zero = {m: np.zeros_like(v) for m, v in z.items()}
    label = np.asarray(batch["label"])
    contrib = _release_contrib(_np_fused(params, z), _np_fused(params, {"x1": z["x1"], "x2": zero["x2"]}),
                               _np_fused(params, {"x1": zero["x1"], "x2": z["x2"]}), label)
    data, drop = _release_resample(contrib, n)

    ctx = _ctx(handle, params, batch)
    ours = method.contributions(ctx)
    np.testing.assert_array_equal(ours["x1"], [contrib[i][0] for i in range(n)])
    np.testing.assert_array_equal(ours["x2"], [contrib[i][1] for i in range(n)])
    ms = method.init_method_state(params)
    assert method.on_epoch_end(0, {}, ms, ctx) is ms and method.sampling_weights(ms) is None  # warm-up
    ms = method.on_epoch_end(1, {}, ms, ctx)
    assert set(ctx.logged) == {"contrib_x1", "contrib_x2", "copies_x1", "copies_x2"}
    copies = np.asarray(ms["copies"])
    np.testing.assert_array_equal(copies[0], np.bincount(data[drop == 2], minlength=n))  # audio-only copies
    np.testing.assert_array_equal(copies[1], np.bincount(data[drop == 1], minlength=n))  # visual-only copies
    np.testing.assert_array_equal(method.sampling_weights(ms), np.bincount(data, minlength=n))

    # the training loss and the fusion gradient of the rows' drawn modes, as the release's forward(drop)
    key = jax.random.PRNGKey(7)
    (loss, terms), grads = jax.jit(jax.value_and_grad(
        lambda p: method.loss(handle, p, batch, key, ms)[:2], has_aux=True))(params)
    modes = np.asarray(method.row_modes(ms["copies"], batch["index"], key))
    rel_drop = np.select([modes == 1, modes == 2], [2, 1], 0)  # only x1 = release drop 2 (visual zeroed)
    zt = {m: np.asarray(v) for m, v in handle.train_model(params).encode({m: batch[m] for m in NAMES}).items()}
    zt = {"x1": np.where((rel_drop == 1)[:, None], 0.0, _np(zt["x1"])),
          "x2": np.where((rel_drop == 2)[:, None], 0.0, _np(zt["x2"]))}
    logits = _np_fused(params, zt)
    want = ce(logits, label)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(terms["unimodal_rows"]), np.mean(rel_drop > 0), rtol=1e-6)
    sm = np.exp(logits - logits.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    delta = (sm - np.eye(logits.shape[1])[label]) / n
    for m in NAMES:
        np.testing.assert_allclose(np.asarray(grads["fusion"]["branches"][m]["kernel"]), zt[m].T @ delta,
                                   rtol=1e-4, atol=1e-6)


# ---- (c) one smoke run through the trainer -----------------------------------------------------------------


def test_smoke_run(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "valuation", "warmup": 1})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for rec in history:
        assert all(np.isfinite(rec["val"][f"contrib_{m}"]) for m in NAMES)
        assert np.isfinite(rec["train"]["unimodal_rows"])
    assert history[0]["train"]["unimodal_rows"] == 0.0  # warm-up epoch: full inputs only
    if history[0]["val"]["copies_x1"] + history[0]["val"]["copies_x2"] > 0:  # epoch 2: weighted, resampled rows
        assert history[1]["train"]["unimodal_rows"] > 0.0


# ---- (d) errors and defaults -------------------------------------------------------------------------------


def test_errors_and_defaults(setup):
    method, handle, params, batch, _ = setup
    _, info, _ = _data()
    assert get_method(ml_collections.ConfigDict({"name": "valuation"}), info).opts["warmup"] == 5
    assert 5 in GRID["warmup"]
    with pytest.raises(ValueError, match="warmup"):
        get_method(ml_collections.ConfigDict({"name": "valuation", "warmup": -1}), info)
    one = info.__class__(name="one", modalities=("x1",), input_shapes={"x1": info.input_shapes["x1"]},
                         num_classes=info.num_classes, extra=info.extra)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        get_method(ml_collections.ConfigDict({"name": "valuation"}), one)
    reg = info.__class__(name="r", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                         task="regression", extra=info.extra)
    with pytest.raises(ValueError):
        get_method(ml_collections.ConfigDict({"name": "valuation"}), reg)
    nosize = info.__class__(name="s", modalities=info.modalities, input_shapes=info.input_shapes,
                            num_classes=info.num_classes)
    with pytest.raises(ValueError, match="split_sizes"):
        get_method(ml_collections.ConfigDict({"name": "valuation"}), nosize)
    plain = {k: v for k, v in batch.items() if k != "index"}
    with pytest.raises(ValueError, match="batch\\['index'\\]"):
        method.loss(handle, params, plain, jax.random.PRNGKey(0), method.init_method_state(params))
