"""MBSD tests: the pairwise rule against slow float64 NumPy, the released loss and its gradients
(golden), the window, one smoke run through the trainer, and the configuration errors.

Golden reference: GeWu-Lab/BalanceBenchmark (commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3),
``balancemm/trainer/MBSD_trainer.py``, ``MBSDTrainer.training_step`` (lines 95-231); two modalities
(lines 119-159, the window test at 129, the joint-only branch at 226-228)::

    loss['out'] = criterion(m['out'], label)
    loss_modality[k] = criterion(model.unimodal_result[k], label)
    prediction[k] = softmax(model.unimodal_result[k])
    if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
        loss_RS = 1/C * torch.sum((unimodal_result[k0] - unimodal_result[k1])**2, dim=1)
        for i in range(B):
            if y_pred[k0][i] == label[i] or y_pred[k1][i] == label[i]:
                w[i] = max(p0[i][y], p1[i][y]) - min(p0[i][y], p1[i][y])
            ps[i] = max(p0[i][y], p1[i][y]); pw[i] = min(p0[i][y], p1[i][y])
        loss_KL = F.kl_div(ps, pw, reduction='none')          # = pw * (log pw - ps)
        loss_KL = w @ loss_KL / B; loss_RS = w @ loss_RS / B
        total = loss['out'] + loss_modality[k0] + loss_modality[k1] + loss_RS + loss_KL
    else:
        total = loss['out']

three modalities (lines 160-224): the same per pair (0,1), (0,2), (1,2), ``loss_RS`` on the softmax
``prediction`` (not the logits), KL and RS each averaged over the three pairs. The unimodal logits
are ``unimodal_result[m] = z_m W_m^T + b / M`` (``balancemm/models/avclassify_model.py``,
``unimodality_calculate``). Transcribed below into a per-sample float64 NumPy loop (values) and a JAX
per-sample transcription (gradients: nothing is detached in the release); nothing of
``mcr_jax.methods.mbsd`` is used in the references.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.mbsd import mbsd_terms
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import (
    NAMES,
    assert_trees_close,
    ce,
    cross_entropy,
    f64,
    jit_gradients,
    leaves,
    reference_gradients,
    step_gradients,
)
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_setup import build, toy_data, toy_regression_info, with_fusion_bias

# ---- the release's rule in float64 NumPy (per-sample loop, as MBSD_trainer.py) ----------------------------


def _softmax(x):
    x = f64(x)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _pair_numpy(ua, ub, labels, rs_on_probs):
    """``(w·KL / B, w·RS / B)`` of one pair, sample by sample (Python max/min, torch kl_div)."""
    ua, ub = f64(ua), f64(ub)
    pa, pb = _softmax(ua), _softmax(ub)
    n, c = ua.shape
    kl_sum = rs_sum = 0.0
    for i in range(n):
        y = int(labels[i])
        w = 0.0
        if int(np.argmax(pa[i])) == y or int(np.argmax(pb[i])) == y:
            w = max(pa[i, y], pb[i, y]) - min(pa[i, y], pb[i, y])
        ps, pw = max(pa[i, y], pb[i, y]), min(pa[i, y], pb[i, y])
        kl = pw * (np.log(pw) - ps) if pw > 0 else 0.0  # F.kl_div(ps, pw, reduction='none')
        ra, rb = (pa[i], pb[i]) if rs_on_probs else (ua[i], ub[i])
        rs = 1.0 / c * float(np.sum((ra - rb) ** 2))
        kl_sum += w * kl
        rs_sum += w * rs
    return kl_sum / n, rs_sum / n


def _release_terms_numpy(uni, names, labels):
    """The release's (loss_KL, loss_RS): one pair for M = 2 (RS on logits), the 3 pairs' mean for M = 3."""
    if len(names) == 2:
        return _pair_numpy(uni[names[0]], uni[names[1]], labels, False)
    pairs = [(0, 1), (0, 2), (1, 2)]
    terms = [_pair_numpy(uni[names[a]], uni[names[b]], labels, True) for a, b in pairs]
    return sum(t[0] for t in terms) / 3, sum(t[1] for t in terms) / 3


# ---- (a) the rule against NumPy ------------------------------------------------------------------------------


def test_terms_match_numpy_two_and_three_modalities_with_padding():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=12)
    uni = {m: rng.normal(scale=2.0, size=(12, 4)).astype(np.float32) for m in ("a", "b", "c")}
    uni["a"][np.arange(12), labels] += 2.0  # many correct rows, so that w > 0 often
    for names in (("a", "b"), ("a", "b", "c")):
        kl, rs = mbsd_terms({m: jnp.asarray(uni[m]) for m in names}, names, jnp.asarray(labels))
        want = _release_terms_numpy(uni, names, labels)
        np.testing.assert_allclose([float(kl), float(rs)], want, rtol=1e-5, atol=1e-7)
    # rs_input forces logits (or probabilities) for any M
    kl, rs = mbsd_terms({m: jnp.asarray(uni[m]) for m in "ab"}, ("a", "b"), jnp.asarray(labels), rs_input="probs")
    np.testing.assert_allclose(float(rs), _pair_numpy(uni["a"], uni["b"], labels, True)[1], rtol=1e-5)
    # padding rows are left out: the mean over valid rows
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1], np.float32)
    keep = mask > 0
    kl, rs = mbsd_terms({m: jnp.asarray(uni[m]) for m in "ab"}, ("a", "b"), jnp.asarray(labels), jnp.asarray(mask))
    want = _pair_numpy(uni["a"][keep], uni["b"][keep], labels[keep], False)
    np.testing.assert_allclose([float(kl), float(rs)], want, rtol=1e-5, atol=1e-7)
    # four modalities: the mean over the six pairs
    uni["d"] = rng.normal(size=(12, 4)).astype(np.float32)
    names = ("a", "b", "c", "d")
    kl, _ = mbsd_terms({m: jnp.asarray(uni[m]) for m in names}, names, jnp.asarray(labels))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    want = np.mean([_pair_numpy(uni[a], uni[b], labels, True)[0] for a, b in pairs])
    np.testing.assert_allclose(float(kl), want, rtol=1e-5, atol=1e-7)


# ---- (b) golden: the released loss and gradients on the tiny model ----------------------------------------


@pytest.fixture(scope="module")
def branch_setup():
    method, handle, params, batch, _ = build({"name": "mbsd"})
    return method, handle, with_fusion_bias(params), batch


def _release_unimodal(p, feats, num):
    """``unimodal_result[m] = z_m W_m^T + b / M`` from the parameters (the release's concat slices)."""
    return {m: feats[m] @ p["fusion"]["branches"][m]["kernel"] + p["fusion"]["bias"][None] / num for m in NAMES}


def _release_loss_jax(p, handle, batch, source):
    """The release's two-modality total loss in JAX (its per-sample loop written over the batch axis;
    Python's ``max(a, b)`` / ``min(a, b)`` pick ``a`` on ties), for its gradients."""
    out = handle.train_model(p)(_inputs(batch))
    labels = batch["label"]
    uni = _release_unimodal(p, out["latents"], 2) if source == "branch" else out["unimodal"]
    total = cross_entropy(out["logits"], labels) + sum(cross_entropy(uni[m], labels) for m in NAMES)
    pa, pb = jax.nn.softmax(uni["x1"], axis=1), jax.nn.softmax(uni["x2"], axis=1)
    n, c = pa.shape
    a, b = pa[jnp.arange(n), labels], pb[jnp.arange(n), labels]
    ps = jnp.where(b > a, b, a)  # max(a, b)
    pw = jnp.where(b < a, b, a)  # min(a, b)
    hit = (jnp.argmax(pa, axis=-1) == labels) | (jnp.argmax(pb, axis=-1) == labels)
    w = jnp.where(hit, ps - pw, 0.0)
    loss_kl = jnp.dot(w, pw * (jnp.log(pw) - ps)) / n  # torch.mm(w, F.kl_div(ps, pw, 'none')) / B
    loss_rs = jnp.dot(w, 1.0 / c * jnp.sum((uni["x1"] - uni["x2"]) ** 2, axis=1)) / n
    return total + loss_rs + loss_kl


def test_loss_and_gradients_match_the_release_branch_mode(branch_setup):
    method, handle, params, batch = branch_setup
    labels = batch["label"]
    assert float(batch["mask"].min()) == 1.0  # the release has no padding rows
    out = step_gradients(method, handle, params, batch)
    fwd = handle.train_model(params)(_inputs(batch))
    uni = _release_unimodal(params, fwd["latents"], 2)
    kl, rs = _release_terms_numpy(uni, NAMES, labels)
    p = {m: _softmax(uni[m]) for m in NAMES}
    rows = np.arange(len(labels))
    weighted = sum((p[m].argmax(-1) == np.asarray(labels)) for m in NAMES) > 0
    assert int(weighted.sum()) >= 2 and abs(kl) > 0  # the distillation terms are exercised
    assert np.any(np.abs(p["x1"][rows, labels] - p["x2"][rows, labels])[weighted] > 1e-3)
    want = ce(fwd["logits"], labels) + ce(uni["x1"], labels) + ce(uni["x2"], labels) + kl + rs
    np.testing.assert_allclose(float(out.metrics["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose([float(out.metrics["kl"]), float(out.metrics["rs"])], [kl, rs], rtol=1e-4, atol=1e-7)
    for m in NAMES:
        np.testing.assert_allclose(float(out.metrics[f"uni_{m}"]), ce(uni[m], labels), rtol=1e-5)
    want_grads = jax.jit(jax.grad(lambda p: _release_loss_jax(p, handle, batch, "branch")))(params)
    assert_trees_close(out.grads, want_grads, rtol=1e-4)
    # the separate unimodal heads are not used in branch mode (as the release has none)
    assert all(float(np.abs(g).sum()) == 0.0 for path, g in leaves(out.grads) if path.startswith("['heads']"))


def test_heads_mode_matches_the_release_rule_on_the_unimodal_heads():
    method, handle, params, batch, _ = build({"name": "mbsd", "unimodal_source": "heads"})
    out = step_gradients(method, handle, params, batch)
    want = jax.jit(jax.grad(lambda p: _release_loss_jax(p, handle, batch, "heads")))(params)
    assert_trees_close(out.grads, want, rtol=1e-4)
    assert any(float(np.abs(g).sum()) > 0 for path, g in leaves(out.grads) if path.startswith("['heads']"))


def test_window_outside_is_the_joint_loss(branch_setup):
    _, handle, params, batch = branch_setup
    late = get_method(ml_collections.ConfigDict({"name": "mbsd", "start_epoch": 2, "end_epoch": 2}), toy_data()[1])
    late.check_model(handle.train_model(params))
    step = jit_gradients(late, handle)  # one compilation for the three epochs
    key = jax.random.PRNGKey(0)
    state = late.init_method_state(params)
    out = step(params, batch, key, state)  # epoch 1: before the window
    assert float(out.metrics["active"]) == 0.0
    assert_trees_close(out.grads, reference_gradients("joint", handle, params, batch), rtol=1e-5)
    assert float(step(params, batch, key, state, epoch=2).metrics["active"]) == 1.0
    assert float(step(params, batch, key, state, epoch=3).metrics["active"]) == 0.0  # epoch 3: after it
    assert state == {}  # the epoch is the trainer's (ModelHandle.epoch), not the method's


# ---- (c) one smoke run through the trainer ----------------------------------------------------------------


def test_smoke_run_logs_the_terms(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "mbsd"})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    assert all(np.isfinite(res["test"]["heads"][m]["accuracy"]) for m in NAMES)  # the branches, reported
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for h in history:
        assert {"kl", "rs", "active", "task"} <= set(h["train"])
        assert np.isfinite(h["train"]["rs"]) and h["train"]["active"] == 1.0


# ---- (d) clear errors ---------------------------------------------------------------------------------------


def test_configuration_errors():
    info = toy_data()[1]
    method = get_method(ml_collections.ConfigDict({"name": "mbsd"}), info)
    assert method.opts["distill_weight"] == 1.0 and method.opts["end_epoch"] == 81
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "mbsd"}), toy_regression_info())
    one = DatasetInfo(name="toy", modalities=("x1",), input_shapes={"x1": info.input_shapes["x1"]}, num_classes=5)
    with pytest.raises(ValueError, match="at least two modalities"):
        get_method(ml_collections.ConfigDict({"name": "mbsd"}), one)
    for key, value in (("unimodal_source", "probe"), ("rs_input", "features"), ("distill_weight", -1.0),
                       ("start_epoch", 0)):
        with pytest.raises(ValueError, match=key):
            get_method(ml_collections.ConfigDict({"name": "mbsd", key: value}), info)
    with pytest.raises(ValueError, match="separable"):
        build({"name": "mbsd", "unimodal_source": "branch"}, fusion="concat_mlp")
    method, *_ = build({"name": "mbsd"}, fusion="concat_mlp")  # auto: the unimodal heads
    assert method.opts["unimodal_source"] == "auto"
