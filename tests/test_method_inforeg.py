"""InfoReg tests: scores, coefficients, the proximal pull, the FIM traces and the window rate against
float64 NumPy; the released training step (golden); one trainer run; the clear errors.

Golden reference: GeWu-Lab/InfoReg_CVPR2025 (commit 939b2ed), ``main.py``: ``train_epoch`` lines
237-243 (``k`` from ``audio_trace_list``), 259 (``global_model = cp.deepcopy(model)``), 361-380
(``out_v``/``out_a`` = latents · head slice + ``bias / 2``, the three cross-entropies), 456-458
(the three ``backward()`` calls), 460-485 (``score_*``, ``beta = 0.95 * exp(tanh(gap))`` /
``beta2 = 0.1 * exp(tanh(gap))``, ``k > 0.05``), 489-495 (``grad += beta * (param - global_param)``
on ``audio_net`` / ``visual_net``), 507-514 and 569-577 (``fim_audio[name] += grad * grad`` on
Conv/Linear weights, per-layer means summed) and ``main`` line 694 (the trace list starts with ten
zeros). It is transcribed below into NumPy (the backward of the three losses written as a JAX
transcription of ``nn.CrossEntropyLoss``) without using ``mcr_jax.methods``.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method, method_grid
from mcr_jax.methods.inforeg import (
    add_proximal_pull,
    fim_traces,
    prox_coefficients,
    pull_towards,
    true_class_scores,
    window_rates,
)
from mcr_jax.players import modality_owners
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, assert_trees_close, cross_entropy, f64, leaves
from tests.helpers.method_setup import build, toy_data, toy_regression_info, with_fusion_bias
from tests.helpers.numpy_refs import softmax

# ---- slow float64 NumPy versions of the rule ---------------------------------------------------------


def test_scores_and_coefficients_against_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=9)
    w = (rng.random(9) > 0.2).astype(np.float64)
    logits = {m: rng.normal(size=(9, 4)) * 2 for m in "abc"}
    s = true_class_scores({m: jnp.asarray(v, jnp.float32) for m, v in logits.items()}, jnp.asarray(y),
                          jnp.asarray(w, jnp.float32), tuple("abc"))
    want_s = [sum(softmax(logits[m])[i, y[i]] * w[i] for i in range(9)) for m in "abc"]
    np.testing.assert_allclose(s, want_s, rtol=1e-5)
    for beta, active in [(0.95, [1, 1, 1]), (0.3, [0, 1, 1])]:
        got = prox_coefficients(jnp.asarray(want_s, jnp.float32), beta, jnp.asarray(active, jnp.float32))
        want = []
        for i in range(3):
            gap = want_s[i] - np.mean([want_s[j] for j in range(3) if j != i])
            want.append(beta * math.exp(math.tanh(gap)) if gap > 0 and active[i] else 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # M = 2: only the larger score is regulated; equal scores: none
    np.testing.assert_allclose(prox_coefficients(jnp.asarray([3.0, 2.5]), 1.0), [math.exp(math.tanh(0.5)), 0.0],
                               rtol=1e-6)
    np.testing.assert_allclose(prox_coefficients(jnp.asarray([2.0, 2.0]), 1.0), [0.0, 0.0])


def test_pull_traces_and_window_rate_against_numpy():
    rng = np.random.default_rng(1)
    params = {"encoders": {"a": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))},
                           "b": {"kernel": rng.normal(size=(2, 2, 1, 2))}},
              "fusion": {"bias": rng.normal(size=(2,))}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    anchor = jax.tree.map(lambda x: x * 0.5 + 0.1, params)
    grads = jax.tree.map(lambda x: jnp.cos(x), params)
    owners = modality_owners(params, ("a", "b"))
    coeffs = np.array([0.7, 2.0])
    got = pull_towards(grads, params, anchor, owners, jnp.asarray(coeffs, jnp.float32))
    for (path, g), (_, p), (_, a), (_, r) in zip(leaves(got), leaves(params), leaves(anchor), leaves(grads),
                                                  strict=True):
        k = coeffs[0] if "['a']" in path else coeffs[1] if "['b']" in path else 0.0
        np.testing.assert_allclose(g, f64(r) + k * (f64(p) - f64(a)), rtol=1e-5, atol=1e-6, err_msg=path)
    tr = fim_traces(got, owners, 2)
    g = {path: f64(x) for path, x in leaves(got)}
    np.testing.assert_allclose(tr, [np.mean(g["['encoders']['a']['kernel']"] ** 2),
                                    np.mean(g["['encoders']['b']['kernel']"] ** 2)], rtol=1e-5)
    # as a transformation chained before SGD: the pull enters the step
    tx = optax.chain(add_proximal_pull(owners), optax.sgd(0.1))
    upd, _ = tx.update(grads, tx.init(params), params, prox_coeffs=jnp.asarray(coeffs), anchor=anchor)
    assert_trees_close(upd, jax.tree.map(lambda x: -0.1 * x, got), rtol=1e-5)
    hist = np.abs(rng.normal(size=(2, 11)))
    hist[1] = 0.0
    k = window_rates(hist)
    for m in range(2):
        h = list(hist[m])
        tr1, tr2 = sum(h[-10:]) / 10, sum(h[-11:-1]) / 10
        np.testing.assert_allclose(k[m], (tr1 - tr2) / tr1 if tr1 > 0 else 0.0, rtol=1e-12)


# ---- golden: the released training step --------------------------------------------------------------


def _release_backward(handle, params, batch):
    """Lines 361-380 and 456-458: ``loss``, ``loss_out_a``, ``loss_out_v`` back-propagated together
    (the sum is symmetric in the two roles, so one pass serves both role assignments)."""
    label = batch["label"]

    def three_losses(p):
        model = handle.train_model(p)
        out_all = model({m: batch[m] for m in NAMES})
        head = p["fusion"]
        outs = {m: out_all["latents"][m] @ head["branches"][m]["kernel"] + head["bias"][None] / 2 for m in NAMES}
        return cross_entropy(out_all["logits"], label) + sum(cross_entropy(outs[m], label) for m in NAMES), outs

    return jax.value_and_grad(three_losses, has_aux=True)(params)


def _release_rule(backward, params, global_params, label, audio, k):
    """Lines 460-495 and 507-514: the scores, ``beta``/``beta2``, the proximal gradient and one
    step's FIM terms (``audio``: which toy modality plays the release's audio)."""
    (loss, outs), g = backward
    visual = NAMES[1 - NAMES.index(audio)]
    y = np.asarray(label)
    out_a, out_v = f64(outs[audio]), f64(outs[visual])
    score_v = sum(softmax(out_v)[i][y[i]] for i in range(len(y)))
    score_a = sum(softmax(out_a)[i][y[i]] for i in range(len(y)))
    if score_a > score_v and k > 0.05:
        beta, beta2 = 0.95 * math.exp(math.tanh(score_a - score_v)), 0.0
    elif score_a < score_v and k > 0.05:
        beta, beta2 = 0.0, 0.1 * math.exp(math.tanh(score_v - score_a))
    else:
        beta, beta2 = 0.0, 0.0
    out = []
    for (path, gr), (_, p), (_, q) in zip(leaves(g, np.float64), leaves(params, np.float64),
                                          leaves(global_params, np.float64), strict=True):
        if path.startswith(f"['encoders']['{audio}']"):
            gr = gr + beta * (p - q)
        elif path.startswith(f"['encoders']['{visual}']"):
            gr = gr + beta2 * (p - q)
        out.append((path, gr))
    fim = {m: sum(np.mean(gr * gr) for path, gr in out if path.startswith(f"['encoders']['{m}']") and gr.ndim >= 2)
           for m in (audio, visual)}  # one step's fim[name] (= grad²), then the per-layer means summed
    return float(loss), (beta, beta2), out, fim, (score_a, score_v)


def _release_k(trace_list):
    """``train_epoch`` lines 237-243 (``epoch > 0``) on ``[0] * 10 + traces``."""
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


@pytest.fixture(scope="module")
def golden_case():
    method, handle, params, batch, _ = build({"name": "inforeg"})
    params = with_fusion_bias(params)
    rng = np.random.default_rng(2)
    global_params = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), params)

    @jax.jit
    def step(p, b, s, beta):  # one compilation for every beta (a traced option)
        return method.with_hparams({"beta": beta}).gradients(handle, p, b, jax.random.PRNGKey(0), s)

    return method, handle, params, global_params, batch, step


def test_golden_step_matches_the_release(golden_case):
    method, handle, params, global_params, batch, step = golden_case
    ms0 = method.init_method_state(global_params)  # anchor: the parameters at the start of the epoch
    tx = method.make_optimizer(optax.identity(), params)
    tx_update = jax.jit(lambda g, p, kw: tx.update(g, tx.init(p), p, **kw)[0])
    backward = jax.jit(lambda p, b: _release_backward(handle, p, b))(params, batch)
    ran = set()
    for audio in NAMES:  # each toy modality in turn plays the release's audio
        for k, active in [(1.0, 1.0), (0.01, 0.0)]:  # inside / outside the prime learning window
            loss, (b_a, b_v), want, fim, (s_a, s_v) = _release_rule(backward, params, global_params,
                                                                    batch["label"], audio, k)
            # our one beta is the release's constant of the dominant modality (0.95 audio, 0.1 visual)
            beta = 0.95 if s_a > s_v else 0.1
            ran.add(bool(s_a > s_v))
            ms = dict(ms0, active=jnp.full((2,), active, jnp.float32))
            grads, kw, _, new_ms, mets = step(params, batch, ms, jnp.float32(beta))
            np.testing.assert_allclose(mets["loss"], loss, rtol=1e-5)
            ia = NAMES.index(audio)
            np.testing.assert_allclose([mets[f"beta_{audio}"], mets[f"beta_{NAMES[1 - ia]}"]], [b_a, b_v], rtol=1e-5)
            assert (max(b_a, b_v) > 0) == (k > 0.05)
            for (path, g), (wpath, w) in zip(leaves(tx_update(grads, params, kw), np.float64), want, strict=True):
                assert path == wpath
                np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * max(1e-3, np.abs(w).max()), err_msg=path)
            np.testing.assert_allclose(new_ms["trace"], [fim[m_] for m_ in NAMES], rtol=1e-4)
    assert ran == {True, False}  # both of the release's branches (audio dominant: 0.95; visual: 0.1)


def test_golden_window_matches_the_release(golden_case):
    method = golden_case[0]
    traces = [5.0, 4.0, 6.0, 5.5, 5.4, 5.45, 5.44, 5.43, 5.42, 5.41, 5.4, 5.3, 30.0, 5.0]
    release_list = [0] * 10
    ms = {"history": jnp.zeros((2, 11), jnp.float32), "trace": jnp.zeros((2,), jnp.float32),
          "active": jnp.ones((2,), jnp.float32), "anchor": golden_case[2]}
    seen = set()
    for t in traces:
        ms = dict(ms, trace=jnp.asarray([t, 2 * t], jnp.float32))
        release_list.append(t)
        k = _release_k(release_list)
        ms = method.on_epoch_end(1, {}, ms, None)
        assert bool(ms["active"][0]) == (k > 0.05) == bool(ms["active"][1]), (t, k)
        assert float(ms["trace"][0]) == 0.0
        seen.add(k > 0.05)
    assert seen == {True, False}


def test_padding_rows_change_nothing(golden_case):
    method, handle, params, global_params, batch, step = golden_case
    ms = method.init_method_state(global_params)
    grads, kw, _, new_ms, mets = step(params, batch, ms, jnp.float32(0.95))
    pad = {k: jnp.concatenate([v, v[:8] * 0 + (0 if k in ("label", "index") else 5)], 0) for k, v in batch.items()}
    pad["mask"] = jnp.concatenate([batch["mask"], jnp.zeros(8, batch["mask"].dtype)])
    g2, kw2, _, ms2, mets2 = step(params, pad, ms, jnp.float32(0.95))
    for k in ("loss", "beta_x1", "beta_x2", "gap_x1"):
        np.testing.assert_allclose(mets2[k], mets[k], rtol=1e-5, atol=1e-6)
    assert_trees_close(g2, grads, rtol=1e-4)
    np.testing.assert_allclose(ms2["trace"], new_ms["trace"], rtol=1e-4)


# ---- one trainer run ---------------------------------------------------------------------------------


def test_smoke_run(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "inforeg", "window": 2})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(res["test"]["loss"])
    with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    epochs = [r for r in records if "train" in r and "val" in r]
    assert len(epochs) == 2
    for r in epochs:
        assert all(np.isfinite(r["train"][k]) for k in ("loss", "beta_x1", "beta_x2", "gap_x1", "window_x1"))
        assert r["val"]["fim_trace_x1"] > 0 and np.isfinite(r["val"]["window_rate_x2"])
    assert epochs[0]["train"]["beta_x1"] + epochs[0]["train"]["beta_x2"] > 0  # epoch 1 is in the window


# ---- errors and defaults -------------------------------------------------------------------------------


def test_defaults_and_clear_errors():
    _, info, _ = toy_data()
    method = get_method(ml_collections.ConfigDict({"name": "inforeg"}), info)
    assert method.name == "inforeg" and method.opts["beta"] == 0.95 and method.opts["window"] == 10
    assert 0.95 in method_grid("inforeg")["beta"]
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "inforeg"}), toy_regression_info())
    with pytest.raises(ValueError, match="unknown method 'inforeg' options"):
        get_method(ml_collections.ConfigDict({"name": "inforeg", "alpha": 1.0}), info)
    with pytest.raises(ValueError, match="beta"):
        get_method(ml_collections.ConfigDict({"name": "inforeg", "beta": -1.0}), info)
    with pytest.raises(ValueError, match="window"):
        get_method(ml_collections.ConfigDict({"name": "inforeg", "window": 0}), info)
    one = DatasetInfo(name="toy", modalities=("x1",), input_shapes={"x1": info.input_shapes["x1"]}, num_classes=5)
    with pytest.raises(ValueError, match="at least two modalities"):
        get_method(ml_collections.ConfigDict({"name": "inforeg"}), one)
    with pytest.raises(ValueError, match="separable fusion"):
        build({"name": "inforeg"}, fusion="concat_mlp")
    tx = add_proximal_pull({"w": 0})
    with pytest.raises(ValueError, match="prox_coeffs"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
