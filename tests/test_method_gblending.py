"""G-Blending tests: the weight rule against float64 NumPy, a golden test against the released
re-implementation, the held-out rows, one smoke run through the trainer, and the errors.

Golden reference: GeWu-Lab/BalanceBenchmark (commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3),
``balancemm/trainer/GBlending_trainer.py``:

- ``training_step`` (lines 292-303): ``loss = Σ_k weights[k] · CrossEntropy(unimodal_result[k], label)``
  over the modalities and ``'output'`` (the fused head);
- ``super_epoch_origin`` (lines 361-372): ``g = now_validation_loss - pre_validation_loss``,
  ``o_pre = pre_validation_loss - pre_train_loss``, ``o_now = now_validation_loss - now_train_loss``,
  ``o = o_now - o_pre``, ``weights[k] = abs(g / o**2)``, then each weight divided by their sum.

(The authors' VMZ release, ``c2/lib/models/loss/loss_creator.py`` ``add_weighted_loss``, has the same
weighted loss with separate per-stream classifiers and given weights; it does not estimate them.)
Both are transcribed below in NumPy (``_release_loss``, ``_release_weights``) without
``mcr_jax.methods``; the heads and the fusion are applied in NumPy from the parameters. As stated in
the module, the losses fed to the weight rule are per-example means on the held-out / trained rows
of the training split (the release sums batch means over its loaders).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.methods import get_method
from mcr_jax.methods.base import EpochContext
from mcr_jax.methods.gblending import blend_weights, holdout_mask
from mcr_jax.state import TrainState
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, cached_gradients, log_softmax
from tests.helpers.method_checks import f64 as _np
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data

HEADS = ("fused", *NAMES)


# ---- NumPy references ---------------------------------------------------------------------------------


def _slow_weights(pre_t, pre_v, now_t, now_v, eps=1e-12):
    """The paper's rule head by head, float64: G = L^V_N − L^V_{N+n}, ΔO = O_{N+n} − O_N, w ∝ |G| / ΔO²."""
    raw = []
    for k in range(len(pre_t)):
        g = float(pre_v[k]) - float(now_v[k])
        d_o = (float(now_v[k]) - float(now_t[k])) - (float(pre_v[k]) - float(pre_t[k]))
        raw.append(abs(g) / max(d_o * d_o, eps))
    return [r / sum(raw) for r in raw]


def _release_weights(pre_train, pre_val, now_train, now_val):
    """GBlending_trainer.py lines 361-372 (per head ``k``; dict order: modalities, then 'output')."""
    weights = {}
    for k in pre_train:
        g = now_val[k] - pre_val[k]
        o_pre = pre_val[k] - pre_train[k]
        o_now = now_val[k] - now_train[k]
        o = o_now - o_pre
        weights[k] = abs(g / (o ** 2))
    sums = sum(weights.values())
    return {k: w / sums for k, w in weights.items()}


def _np_ce(logits, labels, rows):
    logp = log_softmax(logits)
    return float(-np.mean(logp[rows, np.asarray(labels)[rows]]))


def _release_loss(results, labels, weights, rows):
    """GBlending_trainer.py lines 295-301: ``loss += weights[k] * criterion(unimodal_result[k], label)``,
    with ``criterion`` the batch-mean cross-entropy over ``rows`` (the rows trained on)."""
    return sum(weights[k] * _np_ce(results[k], labels, rows) for k in results)


def _np_heads(params, latents):
    """The fused logits (linear late fusion: Σ_m z_m W_m + b) and each unimodal head, in NumPy."""
    fus, heads = params["fusion"], params["heads"]
    out = {"output": sum(_np(latents[m]) @ _np(fus["branches"][m]["kernel"]) for m in NAMES) + _np(fus["bias"])}
    for m in NAMES:
        out[m] = _np(latents[m]) @ _np(heads[m]["kernel"]) + _np(heads[m]["bias"])
    return out


def _np_holdout(index, fraction, seed=0):
    """Example ``i`` held out iff ((i + seed) · 2654435761 mod 2^32) / 2^32 < fraction (Python integers)."""
    return np.array([((int(i) + seed) * 2654435761 % 2**32) / 2**32 < fraction for i in index])


# ---- shared set-up (compiled once) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    method, handle, params, batch, model = build({"name": "gblending", "super_epoch": 2, "holdout_fraction": 0.25})
    batch = dict(batch, index=jnp.arange(batch["label"].shape[0], dtype=jnp.int32))
    return method, handle, params, batch, model


def _latents(handle, params, batch):
    model = handle.eval_model(params)
    return {m: np.asarray(z) for m, z in model.encode({m: batch[m] for m in NAMES}).items()}


def _ctx(params, handle, batch, calls):
    """An EpochContext whose training split is the toy batch (row i = example i); it records the
    splits asked for and refuses any other than 'train'."""

    def features_fn(p, r, split):
        calls.append(split)
        if split != "train":
            pytest.fail(f"gblending asked for the {split!r} split; only held-out training rows may be used")
        return _latents(handle, p, batch), np.asarray(batch["label"])

    state = TrainState(params=params, rest=handle.rest, opt_state=None, method_state=None, key=None, step=None,
                       epoch=None, bad_step=None, bad_terms=None)
    return EpochContext(epoch=1, steps_per_epoch=1, state=state, features_fn=features_fn,
                        fresh_params_fn=lambda s: pytest.fail("gblending never draws new parameters"),
                        graphdef_eval=handle.graphdef_eval)


def _trained(method, handle, params, batch, steps_=3, lr=0.5):
    """``params`` after a few plain SGD steps of the method's own gradients (moves encoders and heads)."""
    ms = method.init_method_state(params)
    for _ in range(steps_):
        grads = cached_gradients(method, handle, params, batch, ms).grads
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return params


# ---- (a) the weight rule against float64 NumPy -------------------------------------------------------------


def test_blend_weights_match_slow_float64():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pre_t, pre_v, now_t, now_v = rng.uniform(0.2, 2.0, size=(4, 3))
        w, gain, overfit = blend_weights(pre_t, pre_v, now_t, now_v)
        np.testing.assert_allclose(w, _slow_weights(pre_t, pre_v, now_t, now_v), rtol=1e-12)
        np.testing.assert_allclose(gain, pre_v - now_v, rtol=1e-12)
        assert w.sum() == pytest.approx(1.0)
    # ΔO = 0 for one head: floored at eps, that head takes (almost) all the weight
    w, _, overfit = blend_weights([1.0, 1.0], [1.2, 1.2], [0.5, 0.9], [0.7, 1.0], eps=1e-12)
    assert overfit[0] == pytest.approx(0.0) and w[0] > 0.999999
    # no gain anywhere: degenerate, None (the method keeps its weights)
    assert blend_weights([1.0, 1.0], [1.0, 1.0], [0.5, 0.5], [1.0, 1.0])[0] is None


def test_holdout_mask_numpy_jax_and_reference_agree():
    idx = np.arange(5000)
    for fraction, seed in ((0.1, 0), (0.25, 3)):
        ref = _np_holdout(idx, fraction, seed)
        np.testing.assert_array_equal(holdout_mask(idx, fraction, seed), ref)
        np.testing.assert_array_equal(np.asarray(holdout_mask(jnp.asarray(idx, jnp.int32), fraction, seed)), ref)
        assert abs(ref.mean() - fraction) < 0.002  # a low-discrepancy selection: close to the fraction


# ---- (b) golden: the released loss and weight estimation ----------------------------------------------


def test_golden_loss_against_release(setup):
    method, handle, params, batch, _ = setup
    ms = dict(method.init_method_state(params), weights=jnp.asarray([0.5, 0.3, 0.2], jnp.float32))
    out = cached_gradients(method, handle, params, batch, ms)
    z = handle.train_model(params)({m: batch[m] for m in NAMES})["latents"]
    results = _np_heads(params, z)
    rows = np.flatnonzero(~_np_holdout(np.asarray(batch["index"]), 0.25) & (np.asarray(batch["mask"]) > 0))
    assert 0 < len(rows) < batch["label"].shape[0]
    want = _release_loss(results, batch["label"], {"output": 0.5, "x1": 0.3, "x2": 0.2}, rows)
    assert float(out.metrics["loss"]) == pytest.approx(want, rel=1e-5)
    for k, h in enumerate(HEADS):
        assert float(out.metrics[f"w_{h}"]) == pytest.approx([0.5, 0.3, 0.2][k])


def test_golden_weights_against_release(setup, capsys):
    method, handle, params, batch, _ = setup
    later = _trained(method, handle, params, batch)
    labels = np.asarray(batch["label"])
    held = _np_holdout(np.arange(len(labels)), 0.25)
    losses = {}
    for name, p in (("pre", params), ("now", later)):
        res = _np_heads(p, _latents(handle, p, batch))
        losses[name] = ({k: _np_ce(v, labels, np.flatnonzero(~held)) for k, v in res.items()},
                        {k: _np_ce(v, labels, np.flatnonzero(held)) for k, v in res.items()})
    want = _release_weights(losses["pre"][0], losses["pre"][1], losses["now"][0], losses["now"][1])

    calls = []
    ms = method.init_method_state(params)
    ms = method.on_epoch_end(1, {}, ms, _ctx(params, handle, batch, calls))  # the window's start
    assert int(ms["anchor_epoch"]) == 1 and int(ms["estimates"]) == 0
    np.testing.assert_allclose(ms["weights"], [1 / 3] * 3)
    np.testing.assert_allclose(ms["anchor_held"], [losses["pre"][1][k] for k in ("output", *NAMES)], rtol=1e-5)
    assert method.on_epoch_end(2, {}, ms, _ctx(later, handle, batch, calls)) is ms  # inside the window
    ms = method.on_epoch_end(3, {}, ms, _ctx(later, handle, batch, calls))  # 3 − 1 = super_epoch: estimate
    assert int(ms["estimates"]) == 1 and int(ms["anchor_epoch"]) == 3
    np.testing.assert_allclose(ms["weights"], [want[k] for k in ("output", *NAMES)], rtol=1e-4, atol=1e-7)
    assert calls == ["train", "train"]  # (d) only the training split: never validation or test
    assert "[gblending] epoch 3: weights fused" in capsys.readouterr().out


# ---- (d) held-out rows never reach the training gradient ----------------------------------------------


def test_held_out_rows_never_reach_the_gradient(setup):
    method, handle, params, batch, _ = setup
    ms = method.init_method_state(params)
    held = _np_holdout(np.asarray(batch["index"]), 0.25)
    assert held.any()
    rng = np.random.default_rng(1)
    scrambled = dict(batch)
    for m in NAMES:  # replace the held-out rows' inputs and labels with anything
        scrambled[m] = jnp.where(held[:, None], jnp.asarray(rng.normal(0, 50, batch[m].shape), jnp.float32), batch[m])
    scrambled["label"] = jnp.where(held, (batch["label"] + 1) % 5, batch["label"])
    # the same rows removed through the padding mask instead (indices chosen not held out)
    masked = dict(batch, mask=jnp.where(held, 0.0, batch["mask"]),
                  index=jnp.asarray(np.flatnonzero(~_np_holdout(np.arange(200), 0.25))[:len(held)], jnp.int32))
    base = cached_gradients(method, handle, params, batch, ms).grads
    for other in (scrambled, masked):
        got = cached_gradients(method, handle, params, other, ms).grads
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base, got)


# ---- (c) one smoke run through the trainer ------------------------------------------------------------------


def test_smoke_run(tmp_path, capsys):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "gblending", "super_epoch": 1})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    assert set(NAMES) <= set(res["test"]["heads"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for rec in history:
        w = [rec["train"][f"w_{h}"] for h in HEADS]
        assert all(np.isfinite(w)) and sum(w) == pytest.approx(1.0, abs=1e-5)
    log = capsys.readouterr().out
    assert log.count(": weights fused") == 1 and "[gblending] epoch 2: weights fused" in log


# ---- (e) errors and the schedule ------------------------------------------------------------------------


def test_batches_without_index_are_refused(setup):
    method, handle, params, batch, _ = setup
    plain = {k: v for k, v in batch.items() if k != "index"}
    with pytest.raises(ValueError, match="example indices under batch\\['index'\\]"):
        jax.eval_shape(lambda p: method.gradients(handle, p, plain, jax.random.PRNGKey(0),
                                                  method.init_method_state(params)), params)


def test_clear_errors_and_defaults():
    _, info, _ = _data()
    make = lambda **kw: get_method(ml_collections.ConfigDict({"name": "gblending", **kw}), info)
    assert make().opts["mode"] == "online" and make().opts["super_epoch"] == 10
    with pytest.raises(ValueError, match="method.mode"):
        make(mode="sometimes")
    with pytest.raises(ValueError, match="super_epoch"):
        make(super_epoch=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        make(holdout_fraction=0.0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        make(holdout_fraction=1.0)
    with pytest.raises(ValueError, match="3 non-negative numbers"):
        make(weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="no option|unknown"):
        make(alpha=1.0)

    class NoHeads:
        heads = {"x1": None}

    with pytest.raises(ValueError, match="unimodal head per modality.*x2"):
        make().check_model(NoHeads())
    # offline with given weights: fixed weights, nothing held out, never estimated
    fixed = make(mode="offline", weights=[2.0, 1.0, 1.0], holdout_fraction=0.0)
    ms = fixed.init_method_state(None)
    np.testing.assert_allclose(ms["weights"], [0.5, 0.25, 0.25])
    assert not fixed.due(1, ms) and fixed.on_epoch_end(1, {}, ms, None) is ms
    assert not make(mode="offline", weights=[1, 1, 1]).held_out({"label": jnp.zeros(4)}).any()  # no index needed
    # offline estimates once; online every super_epoch epochs
    off, on = make(mode="offline", super_epoch=2), make(super_epoch=2)
    ms = dict(on.init_method_state(None), anchor_epoch=jnp.asarray(1, jnp.int32))
    assert on.due(3, ms) and off.due(3, ms) and not on.due(2, ms)
    ms = dict(ms, estimates=jnp.asarray(1, jnp.int32), anchor_epoch=jnp.asarray(3, jnp.int32))
    assert on.due(5, ms) and not off.due(5, ms)
