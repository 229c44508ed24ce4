"""OPM tests: the drop-probability rule against float64 NumPy, the random draws, and the released step.

Golden reference: ``GeWu-Lab/BML_TPAMI2024`` at commit 4b3aa4f, ``code/models/Classifier.py``
(``calcu_q`` lines 58-72, ``Modality_drop.execute_drop`` lines 31-55, ``custom_autograd`` lines 9-21,
``Classifier.forward`` lines 93-153) and ``code/main.py`` (``train`` lines 91-114), transcribed
below in NumPy (the probabilities) and plain JAX (the loss and its gradients: torch is not
installed). The transcription uses only the model's ``encode`` from this library; the one piece it
shares with the module is the random draw (``draw_drops``), which both sides use with the same key
so that the drop masks agree.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.methods import get_method
from mcr_jax.methods.opm import draw_drops, drop_probabilities, drop_theta
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, advance_to_epoch, assert_trees_close, jit_gradients
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_setup import build_with_fusion_bias as _setup
from tests.helpers.method_setup import toy_data, toy_regression_info

# ---- (a) the rule against a slow float64 NumPy version ------------------------------------------------


def _slow_q(scores, q_base, lam):
    """q_m = clip(q_base (1 + λ tanh(ρ_m − 1)), 0, 1) if ρ_m > 1 else 0, ρ_m against the others' mean."""
    out = []
    for m in range(len(scores)):
        rho = scores[m] / np.mean([scores[j] for j in range(len(scores)) if j != m])
        q = q_base * (1 + lam * math.tanh(rho - 1)) if rho > 1 else 0.0
        out.append(min(max(q, 0.0), 1.0))
    return out


@pytest.mark.parametrize("scores,q_base,lam", [([30.0, 10.0], 0.5, 0.5), ([10.0, 12.0], 0.4, 1.0),
                                               ([6.0, 2.0, 4.0], 0.5, 0.5), ([5.0, 5.0, 1.0], 0.3, 2.0),
                                               ([7.0, 7.0], 0.5, 0.5), ([40.0, 1.0], 0.9, 1.0)])
def test_drop_probabilities_against_numpy(scores, q_base, lam):
    want = _slow_q(np.asarray(scores, np.float64), q_base, lam)
    got = drop_probabilities(jnp.asarray(scores, jnp.float32), q_base, lam)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert min(want) == 0.0  # the weakest modality is never dropped
    dims = [3, 5, 8][:len(scores)]
    np.testing.assert_allclose(drop_theta(got, dims), np.dot(dims, want) / sum(dims), rtol=1e-5, atol=1e-7)
    if scores == [40.0, 1.0]:
        assert want[0] == 1.0  # clipped


def test_draws_have_the_released_distribution():
    q = jnp.asarray([0.6, 0.0])
    ex, keep = jax.vmap(lambda k: draw_drops(k, q, 8, 0.7))(jax.random.split(jax.random.PRNGKey(0), 4000))
    assert keep.shape == (4000, 2, 8)
    assert abs(float(ex.mean()) - 0.7) < 0.03  # executed per batch with probability p_exe
    assert abs(float(keep[:, 0].mean()) - 0.4) < 0.02  # Bernoulli(1 - q) per sample
    assert bool(keep[:, 1].all())  # q = 0: always kept
    per_batch = keep[:, 0].mean(axis=1)
    assert float(per_batch.std()) > 0.1  # per sample, not one draw per batch


# ---- (b) golden: the released training step -------------------------------------------------------


def _released_q(p1, p2, q_base, lam):
    """``calcu_q`` (Classifier.py 58-72) on the two performances (NumPy, float64)."""
    relu = lambda x: max(x, 0.0)
    ratio_1, ratio_2 = math.tanh(relu(p1 / p2 - 1)), math.tanh(relu(p2 / p1 - 1))
    q = [q_base * (1 + lam * ratio_1) if ratio_1 > 0 else 0.0, q_base * (1 + lam * ratio_2) if ratio_2 > 0 else 0.0]
    return np.clip(q, 0.0, 1.0)


def _performance(latent, kernel, bias, label, xp=jnp):
    """``Classifier.forward`` 112-143: t = out·W_mᵀ + b/2 (detached W, b), summed true-class softmax
    (``xp``: NumPy for the float64 check, jax.numpy inside the differentiated step)."""
    t = latent @ kernel + bias[None] / 2
    p = xp.exp(t - t.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    return sum(p[i, label[i]] for i in range(t.shape[0]))


@jax.custom_vjp
def _custom_autograd(x, theta):
    """``custom_autograd`` (Classifier.py 9-21): forward x / (1 − θ); backward (g / (1 − θ), θ)."""
    return x / (1 - theta)


_custom_autograd.defvjp(lambda x, theta: (x / (1 - theta), theta),
                        lambda theta, g: (g / (1 - theta), theta))


def _released_step(handle, params, batch, execute, mask, q_base, lam, theta_grad):
    """``train`` (main.py 91-114, warm_up == 0, --use_adam_drop) on the concat-fusion model: the loss
    and ``loss.backward()``'s gradients. ``mask`` [2, B] is the drop mask (``Bernoulli(1 - q)``)."""
    label = batch["label"]

    def loss_fn(p):
        model = handle.train_model(p)
        z = model.encode(_inputs(batch))
        w = {m: jax.lax.stop_gradient(p["fusion"]["branches"][m]["kernel"]) for m in NAMES}  # .clone().detach()
        b = jax.lax.stop_gradient(p["fusion"]["bias"])
        perf = [_performance(z[m], w[m], b, label) for m in NAMES]
        if not theta_grad:
            perf = [jax.lax.stop_gradient(x) for x in perf]
        ratio = [jnp.tanh(jax.nn.relu(perf[0] / perf[1] - 1)), jnp.tanh(jax.nn.relu(perf[1] / perf[0] - 1))]
        q = jnp.clip(jnp.stack([jnp.where(r > 0, q_base * (1 + lam * r), 0.0) for r in ratio]), 0.0, 1.0)
        feats = jnp.stack([z[m] for m in NAMES])  # [2, B, D]
        if execute:
            dims = jnp.asarray([z[m].shape[1] for m in NAMES], jnp.float32)
            theta = jnp.sum(dims * q) / jnp.sum(dims)
            feats = _custom_autograd(feats * mask[:, :, None], theta)
            flag = np.asarray(mask).sum(0) > 0  # update_flag: rows with a kept modality
        else:
            flag = np.ones(label.shape[0], bool)
        concat = jnp.concatenate([feats[0], feats[1]], axis=1)[flag]  # ConcatFusion on cleaned_fea
        kernel = jnp.concatenate([p["fusion"]["branches"][m]["kernel"] for m in NAMES], axis=0)
        out = concat @ kernel + p["fusion"]["bias"][None]
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, label[flag][:, None], axis=1)), (perf, q)

    (loss, (perf, q)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, jnp.stack(perf), q


@pytest.fixture(scope="module")
def golden_setups():
    return {tg: _setup({"name": "opm", "release_theta_grad": tg}) for tg in (False, True)}


@pytest.mark.parametrize("theta_grad", [False, True], ids=["default", "release_theta_grad"])
def test_opm_matches_the_released_training_step(golden_setups, theta_grad):
    method, handle, params, batch = golden_setups[theta_grad]
    q_base, lam, p_exe = 0.5, 0.5, 0.7
    step = jit_gradients(method, handle)
    state = advance_to_epoch(method, method.init_method_state(params), 7)
    label = np.asarray(batch["label"])
    seen = set()
    for k in range(12):
        key = jax.random.PRNGKey(k)
        out = step(params, batch, key, state, epoch=7)  # 0-based epoch 6: the first with drops
        # calcu_q on the released performances (NumPy, float64)
        model = handle.train_model(params)
        z = model.encode(_inputs(batch))
        f64 = lambda x: np.asarray(x, np.float64)
        bias = f64(params["fusion"]["bias"])
        perf = [float(_performance(f64(z[m]), f64(params["fusion"]["branches"][m]["kernel"]), bias, label, np))
                for m in NAMES]
        q = _released_q(perf[0], perf[1], q_base, lam)
        assert max(q) > q_base and min(q) == 0.0
        np.testing.assert_allclose([out.metrics["q_x1"], out.metrics["q_x2"]], q, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([out.metrics["ratio_x1"], out.metrics["ratio_x2"]],
                                   [perf[0] / perf[1], perf[1] / perf[0]], rtol=1e-5)
        np.testing.assert_allclose(out.metrics["theta"], q.mean(), rtol=1e-5)  # equal latent sizes
        # the same fixed draw on both sides
        execute, keep = draw_drops(key, jnp.asarray(q, jnp.float32), label.shape[0], p_exe)
        execute, mask = bool(execute), np.asarray(keep, np.float32)
        if execute in seen and len(seen) == 2:
            continue
        seen.add(execute)
        assert float(out.metrics["executed"]) == float(execute)
        loss, grads, ref_perf, ref_q = jax.jit(
            lambda p, e=execute, mk=mask: _released_step(handle, p, batch, e, mk, q_base, lam,
                                                         theta_grad))(params)
        np.testing.assert_allclose(ref_q, q, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ref_perf, perf, rtol=1e-5)
        np.testing.assert_allclose(out.metrics["task"], loss, rtol=1e-5)
        assert_trees_close(out.grads, grads, rtol=2e-4)
        if execute:
            np.testing.assert_allclose(out.metrics[f"kept_{NAMES[int(np.argmax(q))]}"],
                                       mask[int(np.argmax(q))].mean(), rtol=1e-6)
    assert seen == {False, True}  # both an executed and a skipped drop were compared


def test_before_start_epoch_and_at_evaluation_it_is_joint_training(golden_setups):
    method, handle, params, batch = golden_setups[False]
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), method.init_method_state(params))
    assert float(out.metrics["executed"]) == 0.0 and float(out.metrics["theta"]) == 0.0
    assert_trees_close(out.grads, _reference_grads("joint", handle, params, batch), rtol=1e-5)
    model = handle.eval_model(params)
    np.testing.assert_array_equal(method.predict(model, batch)["logits"], model(_inputs(batch))["logits"])


def test_three_modalities_of_different_sizes():
    from flax import nnx

    from mcr_jax.data.types import DatasetInfo
    from mcr_jax.models import MultimodalModel
    from tests.helpers.method_setup import bind

    names, dims = ("a", "b", "c"), {"a": 4, "b": 8, "c": 12}
    info = DatasetInfo(name="toy3", modalities=names, input_shapes={m: (6,) for m in names}, num_classes=3)
    specs = {m: {"kind": "mlp", "in_features": 6, "hidden": (8,), "out_dim": dims[m], "dropout": 0.0} for m in names}
    model = MultimodalModel(names, specs, num_classes=3, rngs=nnx.Rngs(params=0, dropout=1))
    method = get_method(ml_collections.ConfigDict({"name": "opm", "start_epoch": 1, "p_exe": 1.0}), info)
    handle, params = bind(method, model)
    rng = np.random.default_rng(0)
    batch = {m: jnp.asarray(rng.normal(size=(32, 6)) * (1 + 2 * i), jnp.float32) for i, m in enumerate(names)}
    batch.update(label=jnp.asarray(rng.integers(0, 3, 32), jnp.int32), mask=jnp.ones((32,), jnp.float32))
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), method.init_method_state(params))
    rho = np.asarray([out.metrics[f"ratio_{m}"] for m in names], np.float64)
    q = np.asarray([out.metrics[f"q_{m}"] for m in names], np.float64)
    want = [min(0.5 * (1 + 0.5 * math.tanh(r - 1)), 1.0) if r > 1 else 0.0 for r in rho]
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7)
    d = np.asarray([dims[m] for m in names], np.float64)
    np.testing.assert_allclose(out.metrics["theta"], (d * q).sum() / d.sum(), rtol=1e-5)
    assert q.max() > 0.5 and float(out.metrics["executed"]) == 1.0
    assert float(out.metrics[f"kept_{names[int(np.argmin(rho))]}"]) == 1.0  # the weakest is never dropped
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(out.grads))


# ---- (c) one smoke run through the trainer -----------------------------------------------------------


def test_smoke_run(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "opm", "start_epoch": 1})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for h in history:
        train = h["train"]
        assert np.isfinite(train["loss"])
        for key in ("theta", "executed", *(f"{p}_{m}" for p in ("q", "ratio", "kept") for m in NAMES)):
            assert key in train and np.isfinite(train[key]), key
        assert 0.0 <= train["theta"] < 1.0 and 0.0 < train["executed"] <= 1.0


# ---- (d) clear errors ---------------------------------------------------------------------------------


def test_opm_refuses_what_it_cannot_do():
    info = toy_data()[1]
    assert get_method(ml_collections.ConfigDict({"name": "opm"}), info).opts["q_base"] == 0.5  # defaults alone
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "opm"}), toy_regression_info())
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "opm"}, fusion="concat_mlp")
    with pytest.raises(ValueError, match="unknown method 'opm' options"):
        get_method(ml_collections.ConfigDict({"name": "opm", "alpha": 1.0}), info)
    with pytest.raises(ValueError, match="probabilities"):
        get_method(ml_collections.ConfigDict({"name": "opm", "q_base": 1.5}), info)
    with pytest.raises(ValueError, match="start_epoch"):
        get_method(ml_collections.ConfigDict({"name": "opm", "start_epoch": 0}), info)
