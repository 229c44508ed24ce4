"""MMCosine, MMPareto, ReconBoost and D&R: each method's rule against a plain NumPy version, plus a
smoke run of each through the trainer."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.base import EpochContext
from mcr_jax.methods.dnr import kmeans, minmax_scale, purity, reinit_strength
from mcr_jax.methods.mmpareto import integrate, pareto_weights
from mcr_jax.methods.reconboost import reconcile_loss, schedule
from mcr_jax.state import TrainState
from mcr_jax.train import train_and_evaluate
from tests.method_setup import build, toy_data

# ---- helpers ---------------------------------------------------------------------------------------
_data = toy_data


def _setup(method_cfg, fusion="linear"):
    return build(method_cfg, fusion=fusion)


def _grads(method, handle, params, batch, method_state=None):
    ms = method.init_method_state(params) if method_state is None else method_state
    return jax.jit(lambda p, b, s: method.gradients(handle, p, b, jax.random.PRNGKey(0), s))(params, batch, ms)


def _np(x):
    return np.asarray(x, np.float64)


def _log_softmax(x):
    x = _np(x)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _ce(logits, labels):
    labels = np.asarray(labels)
    return float(-np.mean(_log_softmax(logits)[np.arange(len(labels)), labels]))


def _abs_sum(tree):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))


def _smoke(tmp_path, method_cfg):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict(method_cfg)
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        return res, [json.loads(line) for line in f]


def _regression_info():
    _, info, _ = _data()
    return DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                       task="regression")


# ---- MMCosine --------------------------------------------------------------------------------------
def test_mmcosine_logits_are_scaled_cosines_summed_over_modalities():
    method, handle, params, batch, model = _setup({"name": "mmcosine", "scale": 7.0})
    grads, _, _, _, mets = _grads(method, handle, params, batch)
    latents = model.encode({m: batch[m] for m in method.modalities})
    want = {}
    for m in method.modalities:
        z, w = _np(latents[m]), _np(params["fusion"]["branches"][m]["kernel"])
        want[m] = 7.0 * (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    fused = sum(want.values())
    np.testing.assert_allclose(mets["loss"], _ce(fused, batch["label"]), rtol=1e-5)
    out = method.predict(model, batch)  # the evaluation prediction is the same cosine fusion
    np.testing.assert_allclose(out["logits"], fused, rtol=1e-4, atol=1e-5)
    for m in method.modalities:
        np.testing.assert_allclose(out["unimodal"][m], want[m], rtol=1e-4, atol=1e-5)
    # no bias, no unimodal heads; weights and encoders learn
    assert float(jnp.abs(grads["fusion"]["bias"]).sum()) == 0 and _abs_sum(grads["heads"]) == 0
    assert _abs_sum(grads["fusion"]["branches"]) > 0 and _abs_sum(grads["encoders"]) > 0
    # invariant to each class weight's norm (a plain linear head would not be)
    scaled = jax.tree.map(lambda x: x, params)
    scaled["fusion"]["branches"]["x1"]["kernel"] = params["fusion"]["branches"]["x1"]["kernel"] * jnp.arange(
        1.0, 6.0)[None]
    np.testing.assert_allclose(_grads(method, handle, scaled, batch)[4]["loss"], mets["loss"], rtol=1e-5)


def test_mmcosine_errors():
    _, info, _ = _data()
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "mmcosine"}, fusion="concat_mlp")
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "mmcosine"}), _regression_info())
    with pytest.raises(ValueError, match="unknown MMCosine options"):
        get_method(ml_collections.ConfigDict({"name": "mmcosine", "scaling": 10}), info)


# ---- MMPareto --------------------------------------------------------------------------------------
def _min_norm_weight(g1, g2):
    """argmin over [0, 1] of ||a g1 + (1-a) g2|| by ternary search (the norm is convex in a)."""
    lo, hi = 0.0, 1.0
    norm = lambda a: np.linalg.norm(a * g1 + (1 - a) * g2)
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, m2) if norm(m1) <= norm(m2) else (m1, hi)
    return 0.5 * (lo + hi)


def _pareto_numpy(g_mm, g_u, gamma, scope):
    """MMPareto for one encoder given as lists of arrays."""
    f1, f2 = np.concatenate([x.ravel() for x in g_mm]), np.concatenate([x.ravel() for x in g_u])
    cos = f1 @ f2 / (np.linalg.norm(f1) * np.linalg.norm(f2))
    a = 0.5 if cos > 0 else _min_norm_weight(f1, f2)
    h = [2 * (a * x + (1 - a) * y) for x, y in zip(g_mm, g_u, strict=True)]
    s = [x + y for x, y in zip(g_mm, g_u, strict=True)]
    if scope == "encoder":
        r = np.sqrt(sum((x**2).sum() for x in s)) / np.sqrt(sum((x**2).sum() for x in h))
        return [gamma * max(r, 1.0) * x for x in h], a
    return [gamma * max(np.linalg.norm(y) / np.linalg.norm(x), 1.0) * x for x, y in zip(h, s, strict=True)], a


@pytest.mark.parametrize("scope", ["tensor", "encoder"])
@pytest.mark.parametrize("case", ["conflicting", "aligned"])
def test_mmpareto_integration_matches_numpy(case, scope):
    rng = np.random.default_rng(0)
    g_mm = [rng.normal(size=(3, 4)), rng.normal(size=(5,))]
    g_u = [rng.normal(size=(3, 4)) * 3.0, rng.normal(size=(5,)) * 3.0]
    sign = -1.0 if case == "conflicting" else 1.0
    g_u = [sign * (x + 2 * y) for x, y in zip(g_u, g_mm, strict=True)]
    want, a = _pareto_numpy(g_mm, g_u, 1.5, scope)
    got, mets = integrate([jnp.asarray(x) for x in g_mm], [jnp.asarray(x) for x in g_u], scale=1.5, scope=scope)
    assert (float(mets["cos"]) > 0) == (case == "aligned")
    np.testing.assert_allclose(mets["alpha_mm"], a, atol=1e-5)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    if case == "aligned":  # equal halves: h is the plain sum, scaled by gamma
        for x, u, v in zip(got, g_mm, g_u, strict=True):
            np.testing.assert_allclose(x, 1.5 * (u + v), rtol=1e-5)


def test_mmpareto_weights_degenerate_cases():
    zero = [jnp.zeros(3)]
    a_mm, a_u, cos = pareto_weights(zero, zero)  # the original's solver: <g1, g2> >= ||g1||^2 -> 0.999
    assert float(a_mm) == pytest.approx(0.999) and float(a_u) == pytest.approx(0.001, rel=1e-4) and float(cos) == 0.0
    out, _ = integrate(zero, zero, scale=1.5)
    assert float(jnp.abs(out[0]).sum()) == 0 and bool(jnp.all(jnp.isfinite(out[0])))
    g = [jnp.array([1.0, -2.0, 0.5])]  # a vanished unimodal gradient: weight 0.001, rescaled to gamma * g_mm
    a_mm, _, _ = pareto_weights(g, zero)
    assert float(a_mm) == pytest.approx(0.001)
    np.testing.assert_allclose(integrate(g, zero, scale=1.5)[0][0], 1.5 * g[0], rtol=1e-5)
    a_mm, _, _ = pareto_weights([jnp.array([1.0, 0.0])], [jnp.array([-1.0, 0.0])])  # opposite: g_mm + g_u = 0 at ½
    assert float(a_mm) == 0.5


def test_mmpareto_gradients_on_the_model():
    method, handle, params, batch, _ = _setup({"name": "mmpareto"})
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch)
    assert kwargs == {}

    def losses(p):
        out = method.forward(handle.train_model(p), batch)
        fused = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()
        uni = sum(optax.softmax_cross_entropy_with_integer_labels(out["unimodal"][m], batch["label"]).mean()
                  for m in method.modalities)
        return fused, uni

    g_mm = jax.grad(lambda p: losses(p)[0])(params)
    g_u = jax.grad(lambda p: losses(p)[1])(params)
    # every non-encoder parameter: the plain multi-loss gradient
    for part in ("heads", "fusion"):
        jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, a + b, rtol=1e-5, atol=1e-7),
                     grads[part], g_mm[part], g_u[part])
    for m in method.modalities:
        leaves_mm = [_np(x) for x in jax.tree.leaves(g_mm["encoders"][m])]
        leaves_u = [_np(x) for x in jax.tree.leaves(g_u["encoders"][m])]
        want, a = _pareto_numpy(leaves_mm, leaves_u, 1.5, "tensor")
        np.testing.assert_allclose(mets[f"alpha_mm_{m}"], a, atol=1e-4)
        for x, y in zip(jax.tree.leaves(grads["encoders"][m]), want, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert _abs_sum(grads["encoders"]) > 0
    with pytest.raises(ValueError, match="rescale_scope"):
        get_method(ml_collections.ConfigDict({"name": "mmpareto", "rescale_scope": "layer"}), _data()[1])


# ---- ReconBoost ------------------------------------------------------------------------------------
def test_reconboost_schedule_alternates_modalities_and_rectifies():
    got = [schedule(e, stage_epochs=2, rectify_epochs=1, num_modalities=3) for e in range(10)]
    want = [(True, 0), (True, 0), (False, 0), (True, 1), (True, 1), (False, 1), (True, 2), (True, 2), (False, 2),
            (True, 0)]
    assert [(bool(b), int(a)) for b, a in got] == want
    got = [schedule(e, stage_epochs=3, rectify_epochs=0, num_modalities=2) for e in range(6)]
    assert [(bool(b), int(a)) for b, a in got] == [(True, 0)] * 3 + [(True, 1)] * 3
    traced = jax.jit(lambda e: schedule(e, stage_epochs=2, rectify_epochs=1, num_modalities=3))(jnp.int32(4))
    assert (bool(traced[0]), int(traced[1])) == (True, 1)


def test_reconboost_loss_matches_numpy():
    rng = np.random.default_rng(1)
    f, others = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 2
    y = np.array([0, 1, 2, 3, 0, 1])
    q = np.exp(_log_softmax(others))[np.arange(6), y]
    logp = _log_softmax(f)[np.arange(6), y]
    want = np.mean(-(1 - 0.3 * q) * logp)
    got = reconcile_loss(jnp.asarray(f, jnp.float32), jnp.asarray(others, jnp.float32), jnp.asarray(y), None,
                         weight=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the others' prediction is a constant: no gradient reaches it
    g = jax.grad(lambda o: reconcile_loss(jnp.asarray(f), o, jnp.asarray(y), None, weight=0.3))(jnp.asarray(others))
    assert float(jnp.abs(g).sum()) == 0


def test_reconboost_trains_only_the_active_learner_then_everything():
    method, handle, params, batch, model = _setup({"name": "reconboost", "stage_epochs": 1, "rectify_epochs": 1,
                                                   "reconcile_weight": 0.2})
    tx = method.make_optimizer(optax.adam(1e-2), params)
    opt_state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(ones, opt_state, params)  # momentum everywhere
    latents = model.encode({m: batch[m] for m in method.modalities})
    branch = {m: _np(latents[m]) @ _np(params["fusion"]["branches"][m]["kernel"]) for m in method.modalities}
    bias = _np(params["fusion"]["bias"])
    y = np.asarray(batch["label"])
    # epochs_done = 2: stage 1 (cycle of 2 epochs) -> boosting modality x2
    ms = {"epochs_done": jnp.asarray(2, jnp.int32)}
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch, ms)
    assert float(mets["boosting"]) == 1.0 and float(mets["active"]) == 1.0
    q = np.exp(_log_softmax(branch["x1"]))[np.arange(16), y]  # F_¬a: the other learners, no bias
    logp = _log_softmax(branch["x2"])[np.arange(16), y]
    np.testing.assert_allclose(mets["loss"], np.mean(-(1 - 0.2 * q) * logp), rtol=1e-5)
    assert _abs_sum(grads["encoders"]["x1"]) == 0 and _abs_sum(grads["fusion"]["branches"]["x1"]) == 0
    assert float(jnp.abs(grads["fusion"]["bias"]).sum()) == 0
    assert _abs_sum(grads["encoders"]["x2"]) > 0 and _abs_sum(grads["fusion"]["branches"]["x2"]) > 0
    updates, _ = tx.update(grads, opt_state, params, **kwargs)
    frozen = [updates["encoders"]["x1"], updates["fusion"]["branches"]["x1"], updates["fusion"]["bias"],
              updates["heads"]["x1"]]
    assert all(_abs_sum(u) == 0 for u in frozen)  # momentum does not move the inactive learner
    assert _abs_sum(updates["encoders"]["x2"]) > 0
    # epochs_done = 3: global rectification of the whole ensemble on the fused CE
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch, {"epochs_done": jnp.asarray(3, jnp.int32)})
    assert float(mets["boosting"]) == 0.0
    np.testing.assert_allclose(mets["loss"], _ce(bias[None] + branch["x1"] + branch["x2"], y), rtol=1e-5)
    assert all(bool(k) for k in jax.tree.leaves(kwargs["reconboost_update_mask"]))
    assert _abs_sum(grads["encoders"]["x1"]) > 0 and _abs_sum(grads["encoders"]["x2"]) > 0
    # the hook records finished epochs; unimodal outputs are b + f_m
    assert int(method.on_epoch_end(5, {}, ms, None)["epochs_done"]) == 5
    out = method.predict(model, batch)
    np.testing.assert_allclose(out["unimodal"]["x1"], bias[None] + branch["x1"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "reconboost"}, fusion="gated")


# ---- D&R -------------------------------------------------------------------------------------------
def test_dnr_purity_kmeans_and_strength():
    assert purity(np.array([0, 0, 1, 1, 1, 2]), np.array([5, 5, 5, 7, 7, 7])) == pytest.approx(4 / 6)
    assert purity(np.array([0, 1, 2, 3]), np.zeros(4, int)) == pytest.approx(1 / 4)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    centres = rng.normal(size=(4, 6)) * 20
    x = centres[labels] + rng.normal(size=(100, 6))
    assert purity(labels, kmeans(minmax_scale(x), 4, seed=0)) == 1.0
    assert purity(labels, kmeans(rng.normal(size=(100, 6)), 4, seed=0)) < 0.6
    np.testing.assert_allclose(minmax_scale(np.array([[0.0, 5.0], [2.0, 5.0], [1.0, 5.0]])),
                               [[-1, -1], [1, -1], [0, -1]])  # a constant feature maps to -1 (scikit-learn)
    assert reinit_strength(0.9, 0.5, 3.0) == pytest.approx(np.tanh(1.2))
    assert reinit_strength(0.5, 0.9, 3.0) == pytest.approx(np.tanh(1.2))


def _blob_features(labels, seed, d=8):
    rng = np.random.default_rng(seed)
    return np.eye(5, d)[labels] * 50 + rng.normal(size=(len(labels), d))


def test_dnr_softly_reinitialises_each_encoder_by_its_purity_gap():
    method, _, params, _, _ = _setup({"name": "dnr", "reinit_epochs": 2, "reinit_num": 1})
    initial = jax.tree.map(lambda x: x + 1.0, params)  # θ⁰: what init_method_state saw
    state0 = method.init_method_state(initial)
    y = np.repeat(np.arange(5), 12)
    feats = {"train": ({"x1": _blob_features(y, 0), "x2": _blob_features(y, 1)}, y),
             # x1 on validation: no structure at all (purity 1/5); x2 as separable as on train
             "validation": ({"x1": np.zeros((60, 8)), "x2": _blob_features(y, 2)}, y)}
    calls = []

    def features_fn(p, r, split):
        calls.append(split)
        return feats[split]

    state = TrainState(params=params, rest={}, opt_state=None, method_state=None, key=None, step=None,
                       bad_step=None, bad_terms=None)
    ctx = EpochContext(epoch=1, steps_per_epoch=4, state=state, features_fn=features_fn,
                       fresh_params_fn=lambda s: pytest.fail("reinit_target='initial' must not draw new params"))
    assert method.on_epoch_end(1, {}, state0, ctx) is state0 and calls == []  # not due
    new_ms = method.on_epoch_end(2, {}, state0, ctx)
    assert sorted(calls) == ["train", "validation"] and int(new_ms["reinits"]) == 1
    a = np.tanh(3.0 * (1.0 - 0.2))
    np.testing.assert_allclose(new_ms["strength"], [a, 0.0], rtol=1e-6)
    np.testing.assert_allclose(new_ms["purity_val"], [0.2, 1.0])
    new = ctx.params
    jax.tree.map(lambda n, p, i: np.testing.assert_allclose(n, (1 - a) * _np(p) + a * _np(i), rtol=1e-5, atol=1e-6),
                 new["encoders"]["x1"], params["encoders"]["x1"], initial["encoders"]["x1"])
    # α = 0 for x2, and nothing outside the encoders changes
    jax.tree.map(np.testing.assert_array_equal, new["encoders"]["x2"], params["encoders"]["x2"])
    jax.tree.map(np.testing.assert_array_equal, new["heads"], params["heads"])
    jax.tree.map(np.testing.assert_array_equal, new["fusion"], params["fusion"])
    calls.clear()  # reinit_num = 1: never again
    assert method.on_epoch_end(4, {}, new_ms, ctx) is new_ms and calls == []


def test_dnr_fresh_target_and_loss_and_errors():
    method, handle, params, batch, model = _setup({"name": "dnr", "reinit_epochs": 1, "reinit_target": "fresh",
                                                   "reinit_seed": 7, "uni_weight": 0.5})
    ms = method.init_method_state(params)
    _, _, _, _, mets = _grads(method, handle, params, batch, ms)
    out = model({m: batch[m] for m in method.modalities})
    want = _ce(out["logits"], batch["label"]) + 0.5 * sum(_ce(out["unimodal"][m], batch["label"])
                                                          for m in method.modalities)
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-5)
    y = np.repeat(np.arange(5), 12)
    seeds = []
    fresh = jax.tree.map(jnp.zeros_like, params)
    state = TrainState(params=params, rest={}, opt_state=None, method_state=None, key=None, step=None,
                       bad_step=None, bad_terms=None)
    ctx = EpochContext(epoch=1, steps_per_epoch=4, state=state,
                       features_fn=lambda p, r, s: ({"x1": np.zeros((60, 8)) if s == "validation"
                                                     else _blob_features(y, 0), "x2": _blob_features(y, 1)}, y),
                       fresh_params_fn=lambda s: seeds.append(s) or fresh)
    ms = method.on_epoch_end(1, {}, ms, ctx)
    ms = method.on_epoch_end(2, {}, ms, ctx)
    assert seeds == [7, 8] and int(ms["reinits"]) == 2
    a = np.tanh(3.0 * 0.8)
    np.testing.assert_allclose(ctx.params["encoders"]["x1"]["mlp"]["out"]["kernel"],
                               (1 - a) ** 2 * _np(params["encoders"]["x1"]["mlp"]["out"]["kernel"]), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "dnr"}), _regression_info())
    with pytest.raises(ValueError, match="unknown D&R options"):
        get_method(ml_collections.ConfigDict({"name": "dnr", "lambda": 3}), _data()[1])


# ---- smoke runs through the trainer ----------------------------------------------------------------
def test_smoke_mmcosine(tmp_path):
    _smoke(tmp_path, {"name": "mmcosine"})


def test_smoke_mmpareto(tmp_path):
    _, history = _smoke(tmp_path, {"name": "mmpareto"})
    assert "cos_x1" in history[0]["train"]


def test_smoke_reconboost(tmp_path):
    _, history = _smoke(tmp_path, {"name": "reconboost", "stage_epochs": 1, "rectify_epochs": 1})
    assert [h["train"]["boosting"] for h in history] == [1.0, 0.0]


def test_smoke_dnr(tmp_path, capsys):
    _smoke(tmp_path, {"name": "dnr", "reinit_epochs": 1, "reinit_num": 1})
    log = capsys.readouterr().out
    assert log.count("re-initialisation") == 1 and "[dnr] epoch 1: re-initialisation 1" in log


def test_defaults_alone_give_working_methods():
    _, info, _ = _data()
    for name in ("mmcosine", "mmpareto", "reconboost", "dnr"):
        assert get_method(ml_collections.ConfigDict({"name": name}), info).name == name
