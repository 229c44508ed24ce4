"""OGM-GE, AGM, MLB and MSLR: each rule against a plain NumPy computation, then a smoke run each."""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.agm import agm_coefficients, shapley_responses
from mcr_jax.methods.mlb import mlb_coefficients, mlb_ratios
from mcr_jax.methods.mslr import mslr_multipliers
from mcr_jax.methods.ogm_ge import ogm_coefficients
from mcr_jax.train import train_and_evaluate
from tests.method_setup import build, toy_data

NAMES = ("x1", "x2")
PREFIX = {"encoders": "['encoders']", "heads": "['heads']", "branches": "['fusion']['branches']"}


_data = toy_data


def _setup(method_cfg, fusion="linear", info=None):
    method, handle, params, batch, _ = build(method_cfg, fusion=fusion, info=info)
    # a non-zero shared fusion bias, so that the rules' use of it (b / M) is visible
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.linspace(-1.0, 1.0, x.shape[0]) if jax.tree_util.keystr(p) == "['fusion']['bias']" else x,
        params)
    return method, handle, params, batch


def _grads(method, handle, params, batch, state, key=0):
    """``method.gradients`` under jit (compiled once per method instance and input shapes)."""
    if not hasattr(method, "_test_step"):
        method._test_step = jax.jit(lambda p, b, k, s: method.gradients(handle, p, b, k, s))
    return method._test_step(params, batch, jax.random.PRNGKey(key), state)


def _reference_grads(name, handle, params, batch, **cfg):
    ref = get_method(ml_collections.ConfigDict({"name": name, **cfg}), _data()[1])
    return _grads(ref, handle, params, batch, {})[0]


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _owner(path, parts):
    """Which modality's scaled group a parameter path belongs to (-1: none), read off the path."""
    for part in parts:
        for i, m in enumerate(NAMES):
            if path.startswith(f"{PREFIX[part]}['{m}']"):
                return i
    return -1


def _assert_scaled(grads, reference, coeffs, parts):
    """grads == reference × coeffs[m] on modality m's `parts`, == reference elsewhere."""
    for (path, g), (_, r) in zip(_leaves(grads), _leaves(reference), strict=True):
        own = _owner(path, parts)
        want = r * float(coeffs[own]) if own >= 0 else r
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7, err_msg=path)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce(logits, labels):
    return float(np.mean(-np.log(_softmax(logits)[np.arange(len(labels)), labels])))


def _inputs(batch):
    return {m: batch[m] for m in NAMES}


# ---- OGM-GE ----------------------------------------------------------------------------------


def test_ogm_coefficients_slow_only_the_dominant_modality():
    def ref(s, alpha):
        out = []
        for m in range(len(s)):
            rho = s[m] / np.mean([s[j] for j in range(len(s)) if j != m])
            out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
        return out

    for scores, alpha in [([30.0, 10.0], 1.0), ([10.0, 30.0], 0.3), ([6.0, 2.0, 4.0], 1.0), ([5.0, 5.0, 1.0], 0.5)]:
        got = ogm_coefficients(jnp.asarray(scores), alpha)
        np.testing.assert_allclose(got, ref(scores, alpha), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ogm_coefficients(jnp.asarray([30.0, 10.0]), 1.0), [1 - math.tanh(3.0), 1.0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("modulate,parts", [("encoder", ("encoders",)),
                                            ("encoder_and_branch", ("encoders", "branches"))])
def test_ogm_scales_the_dominant_encoder_gradient(modulate, parts):
    method, handle, params, batch = _setup({"name": "ogm_ge", "ge": False, "modulate": modulate, "alpha": 0.7})
    grads, kw, _, _, mets = _grads(method, handle, params, batch, method.init_method_state(params))
    # NumPy: branch scores z_m W_m + b/2, summed true-class probabilities, ratio, coefficient.
    model = handle.train_model(params)
    out = model(_inputs(batch))
    branches = model.fusion.branch_logits(out["latents"])
    bias = np.asarray(model.fusion.bias[...])
    y = np.asarray(batch["label"])
    s = [_softmax(np.asarray(branches[m]) + bias[None] / 2)[np.arange(16), y].sum() for m in NAMES]
    rho = [s[0] / s[1], s[1] / s[0]]
    k = [1 - math.tanh(0.7 * r) if r > 1 else 1.0 for r in rho]
    assert min(k) < 1.0 and max(k) == 1.0
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-5)
    np.testing.assert_allclose([mets["ratio_x1"], mets["ratio_x2"]], rho, rtol=1e-5)
    assert kw == {}
    _assert_scaled(grads, _reference_grads("joint", handle, params, batch), k, parts)


def test_ogm_window_and_gaussian_noise():
    method, handle, params, batch = _setup({"name": "ogm_ge", "start_epoch": 2, "end_epoch": 2})
    joint = _reference_grads("joint", handle, params, batch)
    state = method.init_method_state(params)
    before, _, _, _, mets = _grads(method, handle, params, batch, state)  # epoch 1: outside the window
    _assert_scaled(before, joint, [1.0, 1.0], ())
    assert float(mets["coeff_x1"]) == float(mets["coeff_x2"]) == 1.0
    state = method.on_epoch_end(1, {}, state, None)
    assert int(state["epoch"]) == 2 and state["epoch"].dtype == jnp.int32
    inside, _, _, _, mets = _grads(method, handle, params, batch, state, key=0)
    other_key = _grads(method, handle, params, batch, state, key=1)[0]
    k = [float(mets["coeff_x1"]), float(mets["coeff_x2"])]
    assert min(k) < 1.0
    for (path, g), (_, r), (_, g2) in zip(_leaves(inside), _leaves(joint), _leaves(other_key), strict=True):
        if _owner(path, ("encoders",)) < 0:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=path)  # never noised or scaled
            continue
        noise = g - k[_owner(path, ("encoders",))] * r
        assert not np.allclose(g, g2), path  # fresh noise per key
        if r.size >= 128:  # the noise has the tensor's own gradient std
            assert abs(noise.std() / r.std() - 1) < 0.3, path
            assert abs(noise.mean()) < 0.3 * r.std(), path
    state = method.on_epoch_end(2, {}, state, None)
    after = _grads(method, handle, params, batch, state)[0]
    _assert_scaled(after, joint, [1.0, 1.0], ())


def test_ogm_refuses_what_it_cannot_do():
    _, info, _ = _data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "ogm_ge"}), rinfo)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "ogm_ge"}, fusion="concat_mlp")
    with pytest.raises(ValueError, match="unknown OGM-GE options"):
        get_method(ml_collections.ConfigDict({"name": "ogm_ge", "beta": 1.0}), info)


# ---- AGM -------------------------------------------------------------------------------------


def test_shapley_responses_match_the_permutation_definition():
    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    z = {m: rng.normal(size=(4, 3)) for m in names}
    z0 = {m: rng.normal(size=(4, 3)) for m in names}
    w = {m: rng.normal(size=(3, 2)) for m in names}

    def fuse(lat):  # non-additive, so the weights matter
        lin = sum(np.asarray(lat[m]) @ w[m] for m in names)
        return np.tanh(lin) + np.asarray(lat["a"])[:, :2] * np.asarray(lat["b"])[:, 1:]

    def value(coalition):
        return fuse({m: z[m] if m in coalition else z0[m] for m in names})

    want = {m: 0.0 for m in names}
    for order in itertools.permutations(names):  # mean marginal contribution over all orderings
        for i, m in enumerate(order):
            want[m] = want[m] + (value(set(order[: i + 1])) - value(set(order[:i]))) / 6
    got = shapley_responses(fuse, z, z0, names)
    for m in names:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-10)
    np.testing.assert_allclose(sum(got.values()), value(set(names)) - value(set()), rtol=1e-10)


def test_agm_coefficients():
    s, mean = np.array([1.0, 2.0]), np.array([1.5, 1.5])
    r, r_mean = np.exp([s[1] - s[0], s[0] - s[1]]), np.array([1.0, 1.0])
    np.testing.assert_allclose(agm_coefficients(jnp.asarray(s), jnp.asarray(mean), 3.0),
                               np.exp(3.0 * (r_mean - r)), rtol=1e-5)
    s3, m3 = np.array([1.0, 2.0, 0.5]), np.array([1.2, 1.4, 1.0])

    def ratios(v):
        return np.exp([np.mean(np.delete(v, i)) - v[i] for i in range(3)])

    np.testing.assert_allclose(agm_coefficients(jnp.asarray(s3), jnp.asarray(m3), 0.5),
                               np.exp(0.5 * (ratios(m3) - ratios(s3))), rtol=1e-5)
    # the gap is capped: a modality far behind its usual ratio is accelerated by at most exp(α·max_gap)
    np.testing.assert_allclose(agm_coefficients(jnp.asarray([5.0, 0.0]), jnp.asarray([0.0, 5.0]), 1.0, 2.0)[0],
                               math.exp(2.0), rtol=1e-5)


def test_agm_gradients_and_running_average():
    # The full gradient rule (routing through the modality outputs, clipping, window) is checked
    # against the released code in tests/test_golden_agm_ogm.py; here: scores, coefficients, state.
    method, handle, params, batch = _setup({"name": "agm", "clip_norm": 0.0})
    joint = _reference_grads("joint", handle, params, batch)
    # NumPy scores: the original's modality outputs φ_m + f(0,0)/2 of the eval-mode model, CE vs labels.
    model = handle.eval_model(params)
    z = model.encode(_inputs(batch))
    z0 = model.encode({m: jnp.zeros_like(batch[m]) for m in NAMES})
    f = {(a, v): np.asarray(model.fuse({"x1": z["x1"] if a else z0["x1"], "x2": z["x2"] if v else z0["x2"]}),
                            np.float64) for a in (0, 1) for v in (0, 1)}
    outs = [0.5 * (f[1, 1] - f[0, 1] + f[1, 0]), 0.5 * (f[1, 1] - f[1, 0] + f[0, 1])]
    y = np.asarray(batch["label"])
    s = np.array([_ce(p, y) for p in outs])
    r = np.exp([s[1] - s[0], s[0] - s[1]])
    # First step: the running means are still 0 (reference ratio 1), and are updated after k is formed.
    first, _, _, s1, mets = _grads(method, handle, params, batch, method.init_method_state(params))
    k = np.exp(3.0 * (1.0 - r))
    assert int(s1["count"]) == 1
    np.testing.assert_allclose(s1["score_mean"], s, rtol=1e-5)
    np.testing.assert_allclose([mets["score_x1"], mets["score_x2"]], s, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-4)
    np.testing.assert_allclose(s1["scale"], k, rtol=1e-4)
    # the shared bias enters every coalition alike: its gradient is scaled by the mean coefficient
    np.testing.assert_allclose(first["fusion"]["bias"], np.mean(k) * joint["fusion"]["bias"], rtol=1e-4, atol=1e-7)
    # A later step: k = exp(α (r̃ − r)) with r̃ from the previous means, then the cumulative mean.
    state = dict(method.init_method_state(params), count=jnp.asarray(3, jnp.int32),
                 score_mean=jnp.asarray([1.2, 2.5], jnp.float32))
    grads, _, _, new_state, mets = _grads(method, handle, params, batch, state)
    r_mean = np.exp([2.5 - 1.2, 1.2 - 2.5])
    k = np.exp(3.0 * np.minimum(r_mean - r, 10.0))
    assert int(new_state["count"]) == 4
    np.testing.assert_allclose(new_state["score_mean"], (3 * np.array([1.2, 2.5]) + s) / 4, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-4)
    np.testing.assert_allclose(grads["fusion"]["bias"], np.mean(k) * joint["fusion"]["bias"], rtol=1e-4, atol=1e-7)


def test_agm_regression_with_a_non_separable_fusion():
    _, info, batch = _data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    method, handle, params, _ = _setup({"name": "agm"}, fusion="concat_mlp", info=rinfo)
    rbatch = dict(batch, label=jnp.linspace(-3.0, 3.0, 16))
    state = dict(method.init_method_state(params), count=jnp.asarray(2, jnp.int32),
                 score_mean=jnp.asarray([1.0, 2.0], jnp.float32))
    grads, _, _, new_state, mets = _grads(method, handle, params, rbatch, state)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in mets.values()) and int(new_state["count"]) == 3
    assert all(float(mets[f"score_{m}"]) > 0 for m in NAMES)


# ---- MLB -------------------------------------------------------------------------------------


def _mlb_ref(conf, alpha, beta):
    out = []
    for m in range(len(conf)):
        r = np.mean([conf[j] for j in range(len(conf)) if j != m]) / conf[m]
        t = math.tanh(alpha * (r - 1))
        out.append(1 + (beta - 1) * t if r > 1 else 1 + t)
    return np.array(out)


def test_mlb_coefficients_favour_the_weaker_modality():
    for conf in ([0.8, 0.2], [0.2, 0.8], [0.6, 0.3, 0.3], [0.999, 1e-4]):
        k = np.asarray(mlb_coefficients(mlb_ratios(jnp.asarray(conf)), 0.5, 10.0))
        np.testing.assert_allclose(k, _mlb_ref(conf, 0.5, 10.0), rtol=1e-5)
        assert np.all(k > 0) and np.all(k <= 10.0)
        weakest, strongest = int(np.argmin(conf)), int(np.argmax(conf))
        assert k[weakest] > 1.0 > k[strongest]
    np.testing.assert_allclose(mlb_coefficients(mlb_ratios(jnp.asarray([0.8, 0.2])), 0.5, 10.0),
                               [1 + math.tanh(0.5 * (0.25 - 1)), 1 + 9 * math.tanh(0.5 * 3)], rtol=1e-5)
    # Regression: scores are losses; the larger loss is the weaker modality.
    k = np.asarray(mlb_coefficients(mlb_ratios(jnp.asarray([0.5, 2.0]), higher_is_better=False), 0.5, 10.0))
    np.testing.assert_allclose(k, [1 + math.tanh(0.5 * (0.25 - 1)), 1 + 9 * math.tanh(0.5 * 3)], rtol=1e-5)


def test_mlb_scales_every_parameter_of_a_modality():
    method, handle, params, batch = _setup({"name": "mlb", "alpha": 0.5, "beta": 10.0})
    grads, _, _, _, mets = _grads(method, handle, params, batch, {})
    model = handle.train_model(params)
    out = model(_inputs(batch))
    y = np.asarray(batch["label"])
    conf = [_softmax(out["unimodal"][m])[np.arange(16), y].mean() for m in NAMES]
    k = _mlb_ref(conf, 0.5, 10.0)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-5)
    want_loss = _ce(out["logits"], y) + sum(_ce(out["unimodal"][m], y) for m in NAMES)
    np.testing.assert_allclose(mets["loss"], want_loss, rtol=1e-5)
    reference = _reference_grads("multiloss", handle, params, batch, uni_weight=1.0)
    _assert_scaled(grads, reference, k, ("encoders", "heads", "branches"))
    np.testing.assert_allclose(grads["fusion"]["bias"], reference["fusion"]["bias"], rtol=1e-6)


def test_mlb_config_errors():
    _, info, _ = _data()
    for bad, msg in [({"beta": 0.0}, "beta"), ({"gamma": 1.0}, "unknown MLB options")]:
        with pytest.raises(ValueError, match=msg):
            get_method(ml_collections.ConfigDict({"name": "mlb", **bad}), info)


# ---- MSLR ------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["full_window", "partial_window"])
def test_mslr_learning_rates_follow_validation_accuracy(partial):
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "mslr", "window": 3, "partial_window": partial,
                                                   "init_lr_multipliers": {"x2": 0.5}}), info)
    state = method.init_method_state(None)
    np.testing.assert_allclose(state["multipliers"], [1.0, 0.5])
    accs = np.array([[0.2, 0.3], [0.4, 0.3], [0.5, 0.2], [0.5, 0.35], [0.45, 0.5], [0.6, 0.5]])
    for t, acc in enumerate(accs):  # t = epoch - 1
        val = {"heads": {"fused": {"accuracy": 0.0}, **{m: {"accuracy": acc[i]} for i, m in enumerate(NAMES)}}}
        state = method.on_epoch_end(t + 1, val, state, None)
        prev = accs[max(0, t - 3):t]
        adapt = len(prev) == 3 or (partial and len(prev) > 0)  # default: only on a full window
        want = np.array([1.0, 0.5]) * (acc / prev.mean(0) if adapt else 1.0)
        np.testing.assert_allclose(state["multipliers"], want, rtol=1e-6, err_msg=f"epoch {t + 1}")
        assert int(state["count"]) == t + 1 and state["history"].shape == (3, 2)
    # pure rule: a NaN accuracy or an empty history leaves the base rate
    np.testing.assert_allclose(mslr_multipliers([np.nan, 0.4], np.full((2, 2), 0.2), 2, 2, [1.0, 1.0]), [1.0, 2.0])
    np.testing.assert_allclose(mslr_multipliers([0.3, 0.4], np.zeros((2, 2)), 0, 2, [2.0, 1.0]), [2.0, 1.0])


def test_mslr_scales_optimizer_updates_not_gradients():
    method, handle, params, batch = _setup({"name": "mslr"})
    state = dict(method.init_method_state(params), multipliers=jnp.asarray([2.0, 0.25], jnp.float32))
    grads, kw, _, _, mets = _grads(method, handle, params, batch, state)
    _assert_scaled(grads, _reference_grads("joint", handle, params, batch), [1.0, 1.0], ())
    np.testing.assert_allclose(kw["lr_multipliers"], [2.0, 0.25])
    tx = method.make_optimizer(optax.adam(1e-2), params)
    updates, _ = tx.update(grads, tx.init(params), params, **kw)
    plain, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    _assert_scaled(updates, plain, [2.0, 0.25], ("encoders", "heads", "branches"))
    with pytest.raises(ValueError, match="lr_multipliers"):
        tx.update(grads, tx.init(params), params)


def test_mslr_unimodal_predictions():
    method, handle, params, batch = _setup({"name": "mslr"})
    model = handle.eval_model(params)
    out = method.predict(model, batch)
    branches = model.fusion.branch_logits(out["latents"])
    for m in NAMES:  # additive late fusion: modality m's prediction is its branch plus half the bias
        np.testing.assert_allclose(out["unimodal"][m], branches[m] + model.fusion.bias[...][None] / 2, rtol=1e-6)
    # probe mode: the heads learn on stop-gradient latents, the encoders see the joint gradient only
    method, handle, params, batch = _setup({"name": "mslr", "unimodal_source": "probe"})
    grads = _grads(method, handle, params, batch, method.init_method_state(params))[0]
    joint = _reference_grads("joint", handle, params, batch)
    for (path, g), (_, r) in zip(_leaves(grads), _leaves(joint), strict=True):
        if path.startswith("['heads']"):
            assert np.abs(g).sum() > 0, path
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=path)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "mslr", "unimodal_source": "branch"}, fusion="concat_mlp")


# ---- smoke runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ogm_ge", "agm", "mlb", "mslr"])
def test_smoke_run(name, tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": name})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    assert (set(NAMES) <= set(res["test"]["heads"])) == (name in ("mlb", "mslr"))
