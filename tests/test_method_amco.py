"""AMCo tests: the mask schedule, the class mask and the dependence shares against float64 NumPy,
and the released training step.

Golden reference: BalanceMM, ``GeWu-Lab/BalanceBenchmark`` at commit 4c1482f,
``balancemm/trainer/AMCo_trainer.py`` (``train_loop`` lines 60-79: the mask schedule;
``training_step`` lines 116-146: the losses and the dependence flags) and
``balancemm/models/avclassify_model.py`` (``BaseClassifierAMCoModel.forward`` lines 330-355,
``unimodality_calculate`` lines 357-384: concat ``fc_out`` slices plus ``bias / M``, masked when
dependent), transcribed below in NumPy (schedule, flags, loss values) and plain JAX (the gradients:
torch is not installed), without ``linear_star`` (see the module docstring) and with the mask as one
``[C]`` row for the whole batch (the release's ``[2, C]`` only broadcasts for batches of two rows).
The transcription uses only the model's ``encode`` and raw parameters from this library; the class
mask itself is shared (``class_mask`` with the same key) so that both sides mask the same classes.
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
from mcr_jax.methods.amco import class_mask, dependence_shares, mask_ratio
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, assert_trees_close, ce, f64, jit_gradients
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_setup import build_with_fusion_bias as _setup
from tests.helpers.method_setup import toy_data, toy_regression_info

# ---- (a) the rule against slow float64 NumPy ----------------------------------------------------------


def _released_schedule(epoch0, n_batches, eps=0.3):
    """``train_loop`` lines 60-79: pt per batch, with ``l_t += current_epoch / 10`` accumulated."""
    out, l_t = [], 0.0
    for _ in range(n_batches):
        out.append(np.sin(np.pi / 2 * (min(eps, l_t) / eps)))
        l_t += epoch0 / 10
    return out


@pytest.mark.parametrize("eps", [0.3, 2.0])
def test_mask_ratio_against_the_released_schedule(eps):
    for epoch0 in range(4):
        want = _released_schedule(epoch0, 12, eps)
        got = [float(mask_ratio(k, epoch0, eps)) for k in range(12)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert _released_schedule(0, 5) == [0.0] * 5  # the first epoch never masks a class
    assert _released_schedule(1, 5)[3:] == [1.0, 1.0]  # then every class after three batches


def test_class_mask_counts_and_distribution():
    c = 6
    for ratio in (0.0, 0.3, 0.5001, 0.87, 1.0):
        m = np.asarray(class_mask(jax.random.PRNGKey(1), jnp.float32(ratio), c))
        assert set(np.unique(m)) <= {0.0, 1.0} and int((m == 0).sum()) == int(ratio * c)
    masks = jax.vmap(lambda k: class_mask(k, jnp.float32(0.5001), c))(jax.random.split(jax.random.PRNGKey(0), 3000))
    np.testing.assert_allclose(np.asarray(masks).mean(0), 0.5, atol=0.04)  # every class equally likely


def _slow_shares(logits_list, valid):
    z = np.concatenate([f64(u) for u in logits_list], axis=1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    c, rows = logits_list[0].shape[1], [i for i in range(len(valid)) if valid[i]]
    return [sum(p[i, m * c:(m + 1) * c].sum() for i in rows) / len(rows) for m in range(len(logits_list))]


@pytest.mark.parametrize("m", [2, 3])
def test_dependence_shares_against_numpy(m):
    rng = np.random.default_rng(m)
    logits = [rng.normal(size=(9, 4)) * (1 + j) for j in range(m)]
    valid = np.asarray([1, 1, 0, 1, 1, 1, 0, 1, 1], np.float32)
    got = dependence_shares([jnp.asarray(u, jnp.float32) for u in logits], jnp.asarray(valid))
    np.testing.assert_allclose(got, _slow_shares(logits, valid), rtol=1e-5)
    assert abs(float(got.sum()) - 1.0) < 1e-5


# ---- (b) golden: the released training step -------------------------------------------------------


def _released_branches(z, params, bias_scale=1.0):
    """``unimodality_calculate`` 366-377: ``z_m @ fc_out.weight[:, slice].T + fc_out.bias / all_nums``
    (the fc_out over the concatenation is our per-modality kernels stacked)."""
    kernel = jnp.concatenate([params["fusion"]["branches"][m]["kernel"] for m in NAMES], axis=0)
    bias = params["fusion"]["bias"]
    out, now = [], 0
    for m in NAMES:
        d = z[m].shape[1]
        out.append(z[m] @ kernel[now:now + d] + bias[None] / len(NAMES))
        now += d
    return out


def _released_step(handle, params, batch, dependent, mask):
    """``training_step`` inside the window: CE(Σ masked branches) + Σ_m CE(masked branch m), the
    gradients of the sum (``backward(retain_graph)`` + per-modality ``backward``), and the next flags."""
    label = batch["label"]

    def ce_j(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))

    def loss_fn(p):
        z = handle.train_model(p).encode(_inputs(batch))
        uni = _released_branches(z, p)
        uni = [u * mask[None] if dependent[i] else u for i, u in enumerate(uni)]
        out = uni[0] + uni[1]
        return ce_j(out) + ce_j(uni[0]) + ce_j(uni[1]), (out, uni)

    (loss, (out, uni)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # lines 137-146 in float64: the joint softmax over [uni_1, uni_2], each modality's mass / len(label)
    sft = np.concatenate([f64(u) for u in uni], axis=1)
    sft = np.exp(sft - sft.max(1, keepdims=True))
    sft /= sft.sum(1, keepdims=True)
    c = uni[0].shape[1]
    shares = [sft[:, i * c:(i + 1) * c].sum() / len(label) for i in range(2)]
    label_np = np.asarray(label)
    values = (ce(out, label_np), ce(uni[0], label_np), ce(uni[1], label_np))
    return float(loss), values, grads, shares, [s > 0.5 for s in shares]


@pytest.fixture(scope="module")
def golden():
    method, handle, params, batch = _setup({"name": "amco"})
    return method, handle, params, batch, jit_gradients(method, handle)


@pytest.mark.parametrize("dependent,epoch0,k", [((1, 0), 1, 1), ((0, 1), 1, 2), ((0, 0), 2, 0), ((1, 1), 3, 5)])
def test_amco_matches_the_released_training_step(golden, dependent, epoch0, k):
    method, handle, params, batch, step = golden
    c = method.info.num_classes
    state = {"step": jnp.asarray(k, jnp.int32), "dependent": jnp.asarray(dependent, jnp.int32)}
    key = jax.random.PRNGKey(7 + k)
    out = step(params, batch, key, state, epoch=epoch0 + 1)  # the trainer's 1-based epoch
    pt = _released_schedule(epoch0, k + 1)[k]
    np.testing.assert_allclose(out.metrics["mask_ratio"], pt, rtol=1e-5, atol=1e-7)
    mask = np.asarray(class_mask(key, jnp.float32(pt), c))  # the shared draw
    assert int((mask == 0).sum()) == int(pt * c)
    np.testing.assert_allclose(out.metrics["masked_classes"], int(pt * c))
    loss, (task, u1, u2), grads, shares, flags = _released_step(handle, params, batch, dependent, jnp.asarray(mask))
    np.testing.assert_allclose(out.metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose([out.metrics["task"], out.metrics["uni_x1"], out.metrics["uni_x2"]],
                               [task, u1, u2], rtol=1e-5)
    assert_trees_close(out.grads, grads, rtol=2e-4)
    np.testing.assert_allclose([out.metrics["share_x1"], out.metrics["share_x2"]], shares, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.method_state["dependent"]), np.asarray(flags, np.int32))
    assert int(out.method_state["step"]) == k + 1 and "epoch" not in out.method_state
    if 0 < pt < 1 and any(dependent):
        assert 0 < int(pt * c) < c  # a partial mask was compared


def test_outside_the_window_and_at_evaluation_it_is_joint_training(golden):
    _, handle, params, batch, _ = golden
    method = get_method(ml_collections.ConfigDict({"name": "amco", "start_epoch": 2}), toy_data()[1])
    state = method.init_method_state(params)
    state["dependent"] = jnp.ones_like(state["dependent"])
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), state)
    assert_trees_close(out.grads, _reference_grads("joint", handle, params, batch), rtol=1e-5)
    assert float(out.metrics["mask_ratio"]) == 0.0 and float(out.metrics["dependent_x1"]) == 0.0
    np.testing.assert_array_equal(out.method_state["dependent"], state["dependent"])  # flags untouched
    model = handle.eval_model(params)
    np.testing.assert_array_equal(method.predict(model, batch)["logits"], model(_inputs(batch))["logits"])
    nxt = method.on_epoch_end(3, {}, out.method_state, None)
    assert int(nxt["step"]) == 0 and not np.asarray(nxt["dependent"]).any() and "epoch" not in nxt


@pytest.mark.parametrize("epoch", [1, 2, 5])
def test_the_schedule_follows_the_trainers_epoch(golden, epoch):
    """The masking ratio of batch k of (1-based) epoch e is the NumPy formula with e - 1 (BalanceMM's
    0-based epoch): 0 through the whole first epoch, rising from batch 1 on later."""
    method, handle, params, batch, step = golden
    state = method.init_method_state(params)
    for k in range(4):
        out = step(params, batch, jax.random.PRNGKey(k), state, epoch=epoch)
        want = np.sin(np.pi / 2 * min(0.3, k * (epoch - 1) / 10.0) / 0.3)
        np.testing.assert_allclose(float(out.metrics["mask_ratio"]), want, rtol=1e-6, atol=1e-7)
        state = out.method_state
    assert int(state["step"]) == 4


@pytest.mark.parametrize("edge", ["start", "end"])
def test_the_window_edges_are_inclusive(golden, edge):
    """With ``start_epoch`` 2, ``end_epoch`` 3: a step at epoch 2 (and at 3) is the released masked step
    (a partial mask, a dependent modality), one at epoch 1 (and at 4) is joint training."""
    _, handle, params, batch, _ = golden
    method = get_method(ml_collections.ConfigDict({"name": "amco", "start_epoch": 2, "end_epoch": 3}), toy_data()[1])
    step = jit_gradients(method, handle)
    c, k = method.info.num_classes, 1
    state = {"step": jnp.asarray(k, jnp.int32), "dependent": jnp.asarray((1, 0), jnp.int32)}
    key = jax.random.PRNGKey(11)
    inside, outside = (2, 1) if edge == "start" else (3, 4)
    out = step(params, batch, key, state, epoch=inside)
    pt = _released_schedule(inside - 1, k + 1)[k]
    assert 0 < int(pt * c) < c  # a partial mask
    np.testing.assert_allclose(out.metrics["mask_ratio"], pt, rtol=1e-5, atol=1e-7)
    mask = jnp.asarray(np.asarray(class_mask(key, jnp.float32(pt), c)))
    loss, _, grads, _, flags = _released_step(handle, params, batch, (1, 0), mask)
    np.testing.assert_allclose(out.metrics["loss"], loss, rtol=1e-5)
    assert_trees_close(out.grads, grads, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(out.method_state["dependent"]), np.asarray(flags, np.int32))
    off = step(params, batch, key, state, epoch=outside)
    assert float(off.metrics["mask_ratio"]) == 0.0
    assert_trees_close(off.grads, _reference_grads("joint", handle, params, batch), rtol=1e-5)


# ---- (c) one smoke run through the trainer -----------------------------------------------------------


def test_smoke_run(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "amco"})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for h in history:
        train = h["train"]
        assert np.isfinite(train["loss"])
        per_modality = (f"{p}_{m}" for p in ("uni", "dependent", "share") for m in NAMES)
        for key in ("mask_ratio", "masked_classes", *per_modality):
            assert key in train and np.isfinite(train[key]), key
        assert abs(train["share_x1"] + train["share_x2"] - 1.0) < 1e-4
    assert history[0]["train"]["mask_ratio"] == 0.0  # the first epoch never masks (l_t stays 0)
    assert history[1]["train"]["mask_ratio"] > 0.5


# ---- (d) clear errors ---------------------------------------------------------------------------------


def test_amco_refuses_what_it_cannot_do():
    info = toy_data()[1]
    assert get_method(ml_collections.ConfigDict({"name": "amco"}), info).opts["sigma"] == 0.5  # defaults alone
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "amco"}), toy_regression_info())
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "amco"}, fusion="concat_mlp")
    with pytest.raises(ValueError, match="unknown method 'amco' options"):
        get_method(ml_collections.ConfigDict({"name": "amco", "alpha": 0.1}), info)
    with pytest.raises(ValueError, match="eps"):
        get_method(ml_collections.ConfigDict({"name": "amco", "eps": 0.0}), info)
    with pytest.raises(ValueError, match="sigma"):
        get_method(ml_collections.ConfigDict({"name": "amco", "sigma": 1.5}), info)
    with pytest.raises(ValueError, match="start_epoch"):
        get_method(ml_collections.ConfigDict({"name": "amco", "start_epoch": 3, "end_epoch": 2}), info)
    assert math.isclose(float(mask_ratio(3, 1, 0.3)), 1.0)
