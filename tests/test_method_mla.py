"""MLA tests: the projector update and the entropy fusion against float64 NumPy, a golden comparison
with the released step and test-time fusion, update masking, one smoke run, and the clear errors.

Golden reference: Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation (commit ab6c184),
transcribed into NumPy below from the released code only (nothing of ``mcr_jax.methods.mla`` is used
in it): ``main.py`` ``train_epoch`` lines 432-442 (``out_a = fc_out(a)``, ``CrossEntropyLoss``,
``backward``, ``gs_plugin.before_update``), ``utils/utils.py`` ``GSPlugin.before_update`` lines 24-41,
``main.py`` ``calculate_entropy`` / ``calculate_gating_weights`` / ``calculate_gating_weights3``
lines 65-106 and ``valid`` lines 636-646 (``--dynamic``).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import synthetic
from mcr_jax.methods import get_method, method_grid
from mcr_jax.methods import mla as mla_module
from mcr_jax.methods.mla import entropy_weights, projector_update
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import abs_sum, f64, jit_gradients
from tests.helpers.method_setup import build, toy_data, toy_regression_info

# ---- slow float64 NumPy versions ------------------------------------------------------------------


def _np_softmax(x, axis):
    x = f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_projector(proj, r, alpha):
    proj, r = f64(proj), f64(r)
    d = len(r)
    k = [sum(proj[i, j] * r[j] for j in range(d)) for i in range(d)]
    denom = alpha + sum(r[i] * k[i] for i in range(d))
    new = np.array([[proj[i, j] - k[i] * k[j] / denom for j in range(d)] for i in range(d)])
    return new / np.sqrt((new ** 2).sum())


def _np_sample_weights(logits):
    """``[M, B, C]`` → ``[M, B]``: per example, exp(max_j e_j - e_m) / Σ."""
    m_, b_, _ = logits.shape
    out = np.zeros((m_, b_))
    for b in range(b_):
        ent = [-sum(p * np.log(p) for p in _np_softmax(logits[m, b], 0)) for m in range(m_)]
        g = [np.exp(max(ent) - e) for e in ent]
        out[:, b] = np.array(g) / sum(g)
    return out


def test_projector_update_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    proj = a @ a.T / 6
    r = rng.normal(size=6)
    for alpha in (0.1, 0.013):
        got = projector_update(jnp.asarray(proj, jnp.float32), jnp.asarray(r, jnp.float32), alpha)
        np.testing.assert_allclose(got, _np_projector(proj, r, alpha), rtol=1e-5, atol=1e-6)
    # from the identity with a tiny α the projector (up to scale) annihilates r
    p = np.asarray(projector_update(jnp.eye(6), jnp.asarray(r, jnp.float32), 1e-6), np.float64)
    assert np.abs(p @ r).max() < 1e-4 * np.abs(r).max()


def test_entropy_weights_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 4)) * np.array([0.3, 1.0, 4.0])[:, None, None]
    got = entropy_weights(jnp.asarray(logits, jnp.float32), over="sample")
    np.testing.assert_allclose(got, _np_sample_weights(logits), rtol=1e-5, atol=1e-6)
    # the release's batch form, with the last two rows padding (left out)
    mask = np.array([1, 1, 1, 0, 0])
    got = entropy_weights(jnp.asarray(logits, jnp.float32), jnp.asarray(mask), over="batch")
    want = _release_gating(*[logits[m, :3] for m in range(3)])
    np.testing.assert_allclose(got, np.broadcast_to(np.array(want)[:, None], (3, 5)), rtol=1e-5)


# ---- golden: the released code, in NumPy -----------------------------------------------------------


def _release_ce_step(a, weight, bias, label):
    """``out_a = fc_out(a)``; ``loss_a = nn.CrossEntropyLoss()(out_a, label)``; ``loss_a.backward()``
    (main.py 432-435): the loss and the gradients of ``fc_out.weight`` ``[C, D]`` and ``fc_out.bias``."""
    a = f64(a)
    out = a @ f64(weight).T + f64(bias)
    p = _np_softmax(out, 1)
    n = len(label)
    loss = -np.mean(np.log(p[np.arange(n), label]))
    delta = p.copy()
    delta[np.arange(n), label] -= 1.0
    delta /= n
    return loss, delta.T @ a, delta.sum(0)


def _release_before_update(pl, grad_w, before_batch_input, batch_index, len_dataloader, train_exp_counter):
    """utils/utils.py 24-41, ``GSPlugin.before_update`` (its ``if n == "module.weight"`` taken as
    meant: on ``fc_out.weight``; ``torch.mm(k, r)`` in the denominator read as ``torch.mm(r, k)``,
    the scalar of OWM — see the module docstring). Returns ``(Pl, grad_w)``."""
    lamda = batch_index / len_dataloader + 1
    alpha = 1.0 * 0.1 ** lamda
    if train_exp_counter != 0:
        r = np.mean(f64(before_batch_input), 0, keepdims=True)  # torch.mean(x, 0, True): [1, D]
        k = pl @ r.T  # [D, 1]
        pl = pl - (k @ k.T) / (alpha + (r @ k))  # [1, 1] denominator
        pl = pl / np.linalg.norm(pl, "fro")
        grad_w = grad_w @ pl.T
    return pl, grad_w


def _release_entropy(output):
    """main.py 65-70: softmax over dim=0, entropy summed over the whole tensor."""
    p = _np_softmax(output, 0)
    return -np.sum(p * np.log(p))


def _release_gating(*outputs):
    """main.py 72-106 (calculate_gating_weights / calculate_gating_weights3)."""
    ent = [_release_entropy(o) for o in outputs]
    mx = max(ent)
    g = [np.exp(mx - e) for e in ent]
    return [x / sum(g) for x in g]


@pytest.fixture(scope="module")
def case():
    method, handle, params, batch, model = build({"name": "mla"})
    batch = {k: v for k, v in batch.items() if k != "mask"}  # the release has no padding rows
    step = jit_gradients(method, handle)
    return method, handle, params, batch, model, step


def _features(handle, params, batch, modalities):
    model = nnx.merge(handle.graphdef_train, params, handle.rest)
    return {m: np.asarray(z) for m, z in model.encode({m: batch[m] for m in modalities}).items()}


def _state(steps, epoch_step, epoch_len, proj):
    return {"steps": jnp.asarray(steps, jnp.int32), "epoch_step": jnp.asarray(epoch_step, jnp.int32),
            "epoch_len": jnp.asarray(epoch_len, jnp.int32), "proj": jnp.asarray(proj, jnp.float32)}


@pytest.mark.parametrize("steps,epoch_step,epoch_len", [(0, 0, 0), (5, 3, 10), (8, 7, 9)])
def test_mla_step_matches_the_release(case, steps, epoch_step, epoch_len):
    method, handle, params, batch, _, step = case
    mods = method.modalities
    active = mods[steps % 2]
    feats = _features(handle, params, batch, mods)
    label = np.asarray(batch["label"])
    weight = f64(params["heads"]["x1"]["kernel"]).T  # fc_out.weight [C, D]
    bias = f64(params["heads"]["x1"]["bias"])
    # a projector with history: two earlier (released) updates from the identity
    pl = np.eye(weight.shape[1])
    for s in (1, 2):
        pl, _ = _release_before_update(pl, np.zeros_like(weight), feats[mods[s % 2]] * s, 0, 10, s)
    if steps == 0:
        pl = np.eye(weight.shape[1])
    loss, g_w, g_b = _release_ce_step(feats[active], weight, bias, label)
    want_pl, want_gw = _release_before_update(pl, g_w, feats[active], epoch_step, max(epoch_len, 1), steps)

    grads, kwargs, _, new_ms, mets = step(params, batch, jax.random.PRNGKey(0),
                                          _state(steps, epoch_step, epoch_len, pl))
    assert method.modalities[int(mets["active"])] == active
    np.testing.assert_allclose(mets["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(new_ms["proj"], want_pl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["heads"]["x1"]["kernel"], want_gw.T, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads["heads"]["x1"]["bias"], g_b, rtol=1e-4, atol=1e-7)  # bias not projected
    assert int(new_ms["steps"]) == steps + 1 and int(new_ms["epoch_step"]) == epoch_step + 1
    np.testing.assert_allclose(mets["alpha"], 0.1 ** (1 + epoch_step / epoch_len if epoch_len else 1), rtol=1e-5)

    # the active encoder's gradient is the release's backward through encoder + fc_out (no projection there)
    def release_loss(p):
        model = nnx.merge(handle.graphdef_train, p, handle.rest)
        z = model.encode({m: batch[m] for m in mods})[active]
        out = z @ p["heads"]["x1"]["kernel"] + p["heads"]["x1"]["bias"][None]
        logp = jax.nn.log_softmax(out, axis=1)
        return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))

    want_enc = jax.grad(release_loss)(params)["encoders"][active]
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7), grads["encoders"][active],
                 want_enc)
    other = [m for m in mods if m != active][0]
    assert abs_sum(grads["encoders"][other]) == 0 and abs_sum(grads["fusion"]) == 0
    assert abs_sum(grads["heads"]["x2"]) == 0


def test_mla_project_false_is_the_release_as_run(case):
    """In the release the name test ``n == "module.weight"`` never matches: P stays I, grads unchanged."""
    method, handle, params, batch, _, _ = case
    plain = get_method(ml_collections.ConfigDict({"name": "mla", "project": False}), method.info)
    ms = _state(3, 1, 4, np.eye(8))
    g, _, _, new_ms, _ = jit_gradients(plain, handle)(params, batch, jax.random.PRNGKey(0), ms)
    feats = _features(handle, params, batch, method.modalities)
    _, g_w, _ = _release_ce_step(feats["x2"], f64(params["heads"]["x1"]["kernel"]).T,
                                 params["heads"]["x1"]["bias"], np.asarray(batch["label"]))
    np.testing.assert_allclose(g["heads"]["x1"]["kernel"], g_w.T, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(new_ms["proj"], np.eye(8))


def test_mla_padding_rows_are_left_out(case):
    method, handle, params, batch, _, step = case
    mask = np.ones(len(batch["label"]), np.float32)
    mask[-5:] = 0
    padded = dict(batch, mask=jnp.asarray(mask))
    feats = _features(handle, params, batch, method.modalities)
    keep = mask > 0
    loss, _, _ = _release_ce_step(feats["x2"][keep], f64(params["heads"]["x1"]["kernel"]).T,
                                  params["heads"]["x1"]["bias"], np.asarray(batch["label"])[keep])
    pl = np.eye(8)
    want_pl, _ = _release_before_update(pl, np.zeros((5, 8)), feats["x2"][keep], 0, 1, 1)
    _, _, _, new_ms, mets = step(params, padded, jax.random.PRNGKey(0), _state(1, 0, 0, pl))
    np.testing.assert_allclose(mets["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(new_ms["proj"], want_pl, rtol=1e-4, atol=1e-6)


def test_mla_predict_is_the_dynamic_fusion(case):
    method, handle, params, batch, _, _ = case
    model = nnx.merge(handle.graphdef_eval, params, handle.rest)
    out = method.predict(model, batch)
    z = {m: f64(v) for m, v in model.encode({m: batch[m] for m in method.modalities}).items()}
    w, b = f64(params["heads"]["x1"]["kernel"]), f64(params["heads"]["x1"]["bias"])
    u = {m: z[m] @ w + b for m in method.modalities}  # fc_out(a), fc_out(v)
    for m in method.modalities:
        np.testing.assert_allclose(out["unimodal"][m], u[m], rtol=1e-4, atol=1e-5)
    lam = _np_sample_weights(np.stack([u["x1"], u["x2"]]))
    np.testing.assert_allclose(out["logits"], lam[0][:, None] * u["x1"] + lam[1][:, None] * u["x2"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(method.fuse(model, out["latents"]), out["logits"], rtol=1e-6, atol=1e-6)
    # entropy="batch": the release's valid() with --dynamic (main.py 636-646)
    released = get_method(ml_collections.ConfigDict({"name": "mla", "entropy": "batch"}), method.info)
    txt_conf, img_conf = _release_gating(u["x1"], u["x2"])
    got = released.predict(model, batch)["logits"]
    np.testing.assert_allclose(got, u["x1"] * txt_conf + u["x2"] * img_conf, rtol=1e-4, atol=1e-5)


def test_mla_only_the_active_encoder_and_the_shared_head_move(case):
    method, handle, params, batch, _, step = case
    # the release's optimizer: SGD, momentum 0.9, weight decay 1e-4 (decay would move unused leaves)
    tx = method.make_optimizer(optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(1e-2, momentum=0.9)), params)
    opt_state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(ones, opt_state, params, player_scales=jnp.ones(3))  # momentum everywhere
    grads, kwargs, _, _, mets = step(params, batch, jax.random.PRNGKey(0), _state(1, 1, 0, np.eye(8)))
    assert int(mets["active"]) == 1
    updates, _ = tx.update(grads, opt_state, params, **kwargs)
    assert abs_sum(updates["encoders"]["x2"]) > 0 and abs_sum(updates["heads"]["x1"]) > 0
    for frozen in (updates["encoders"]["x1"], updates["heads"]["x2"], updates["fusion"]):
        assert abs_sum(frozen) == 0


def test_mla_epoch_hook_records_the_epoch_length(case):
    method = case[0]
    ms = method.on_epoch_end(1, {}, _state(7, 7, 0, np.eye(8)), None)
    assert int(ms["epoch_len"]) == 7 and int(ms["epoch_step"]) == 0 and int(ms["steps"]) == 7


# ---- smoke run through the trainer -----------------------------------------------------------------


def test_mla_smoke_run_evaluates_with_the_dynamic_fusion(tmp_path, monkeypatch):
    calls = []
    original = mla_module.dynamic_fusion

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mla_module, "dynamic_fusion", recording)
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "mla"})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    assert {"x1", "x2"} <= set(res["test"]["heads"])
    assert calls  # the evaluation step was traced through the dynamic fusion
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    train = [h["train"] for h in history]
    assert all(np.isfinite(t["loss"]) for t in train)
    assert train[0]["alpha"] == pytest.approx(0.1) and train[1]["alpha"] < 0.1  # epoch length known after epoch 1


# ---- errors and defaults ----------------------------------------------------------------------------


class _Unequal:
    latent_dims = {"x1": 8, "x2": 6}


def test_mla_errors_and_defaults():
    _, info, _ = toy_data()
    method = get_method(ml_collections.ConfigDict({"name": "mla"}), info)
    assert method.name == "mla" and method.opts == {"alpha": 0.1, "project": True, "entropy": "sample"}
    assert method_grid("mla") == {"alpha": [0.01, 0.05, 0.1, 0.5]}
    with pytest.raises(ValueError, match="equal latent"):
        method.check_model(_Unequal())
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "mla"}), toy_regression_info())
    with pytest.raises(ValueError, match="entropy must be one of"):
        get_method(ml_collections.ConfigDict({"name": "mla", "entropy": "class"}), info)
    with pytest.raises(ValueError, match="alpha"):
        get_method(ml_collections.ConfigDict({"name": "mla", "alpha": 0.0}), info)
    with pytest.raises(ValueError):
        get_method(ml_collections.ConfigDict({"name": "mla", "beta": 1.0}), info)
