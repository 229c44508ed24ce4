"""PMR tests: prototypes, PCE, ratio, coefficients and the entropy term against float64 NumPy; the
released loss (golden); one trainer run; the clear errors.

Golden reference: fanyunfeng-bit/Modal-Imbalance-PMR (commit 1e5c79b; the later merge 3615e48 has the same code),
``main_Prototype_grad.py``:
``EU_dist`` (lines 69-75), ``train_epoch`` lines 152-178 (``audio_sim = -EU_dist(a, audio_proto)``,
``score_*_p``, ``ratio_a_p``, ``criterion(audio_sim, label)``, the ``if ratio_a_p > 1`` choice of
``beta`` / ``lam``, ``loss = criterion(out, label) + beta * loss_proto_a + lam * loss_proto_v``) and
``calculate_prototype`` lines 382-441 (class sums / counts, then the momentum mix). It is transcribed
below into NumPy without using ``mcr_jax.methods``; its gradient is written by hand and carried to
the parameters through the model's own VJP.
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
from mcr_jax.methods.base import EpochContext
from mcr_jax.methods.pmr import (
    class_means,
    imbalance_ratios,
    pce_coefficients,
    pce_loss,
    proto_entropy,
    proto_logits,
    proto_scores,
)
from mcr_jax.state import TrainState
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, assert_trees_close, f64, inputs, jit_gradients, log_softmax
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data
from tests.helpers.method_setup import toy_regression_info as _regression_info
from tests.helpers.numpy_refs import softmax

# ---- slow float64 NumPy versions of the rule ---------------------------------------------------------


def _np_proto_logits(z, protos, tau=1.0):
    z, protos = f64(z), f64(protos)
    return np.array([[-np.sqrt(np.sum((z[i] - protos[k]) ** 2)) / tau for k in range(len(protos))]
                     for i in range(len(z))])


def _np_pce(logits, y, w):
    lp = log_softmax(logits)
    return sum(-lp[i, y[i]] * w[i] for i in range(len(y))) / max(sum(w), 1.0)


def test_rule_against_numpy():
    rng = np.random.default_rng(0)
    z = {m: rng.normal(size=(7, 4)) for m in "abc"}
    protos = {m: rng.normal(size=(3, 4)) for m in "abc"}
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    w = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
    lg = {m: proto_logits(jnp.asarray(z[m], jnp.float32), jnp.asarray(protos[m], jnp.float32), 0.5) for m in "abc"}
    want = {m: _np_proto_logits(z[m], protos[m], 0.5) for m in "abc"}
    for m in "abc":
        np.testing.assert_allclose(lg[m], want[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pce_loss(lg[m], jnp.asarray(y), jnp.asarray(w)), _np_pce(want[m], y, w), rtol=1e-5)
        p = softmax(want[m])
        ent = sum(-np.sum(p[i] * np.log(p[i])) * w[i] for i in range(7)) / w.sum()
        np.testing.assert_allclose(proto_entropy(lg[m], jnp.asarray(w)), ent, rtol=1e-5)
    s = proto_scores(lg, jnp.asarray(y), jnp.asarray(w), "abc")
    s_np = np.array([sum(softmax(want[m])[i, y[i]] * w[i] for i in range(7)) for m in "abc"])
    np.testing.assert_allclose(s, s_np, rtol=1e-5)
    rho = imbalance_ratios(s)
    np.testing.assert_allclose(rho, [s_np[i] / np.mean(np.delete(s_np, i)) for i in range(3)], rtol=1e-5)
    np.testing.assert_allclose(pce_coefficients(rho, 2.0), np.where(f64(rho) < 1, 2.0, 0.0))
    # M = 2: exactly one modality (the weaker) gets alpha; equal scores: none
    np.testing.assert_allclose(pce_coefficients(imbalance_ratios(jnp.array([3.0, 2.0])), 1.5), [0.0, 1.5])
    np.testing.assert_allclose(pce_coefficients(imbalance_ratios(jnp.array([2.0, 2.0])), 1.5), [0.0, 0.0])
    # class means: an empty class keeps its previous row
    f = rng.normal(size=(6, 3))
    means, counts = class_means(f, np.array([0, 0, 2, 2, 2, 0]), 3, previous=np.full((3, 3), 7.0))
    np.testing.assert_allclose(means, [f[[0, 1, 5]].mean(0), [7.0] * 3, f[2:5].mean(0)])
    assert counts.tolist() == [3, 0, 3]


# ---- the epoch hook: prototypes from ctx.features ------------------------------------------------------


def _ctx(params, feats):
    calls = []
    state = TrainState(params=params, rest={}, opt_state=None, method_state=None, key=None, step=None,
                       epoch=None, bad_step=None, bad_terms=None)
    ctx = EpochContext(epoch=1, steps_per_epoch=1, state=state,
                       features_fn=lambda p, r, split: calls.append(split) or feats[split],
                       fresh_params_fn=lambda s: pytest.fail("pmr must not draw new params"))
    return ctx, calls


def _release_prototypes(feats, labels, n_classes, epoch, old=None, momentum_coef=0.0):
    """calculate_prototype (lines 382-441): per-example sums, / count_class, then the momentum mix
    for epoch > 0 (0-based)."""
    protos = np.zeros((n_classes, feats.shape[1]))
    count = [0] * n_classes
    for c, lab in enumerate(labels):
        count[lab] += 1
        protos[lab, :] += feats[c, :]
    for c in range(n_classes):
        protos[c, :] /= count[c]
    return protos if epoch <= 0 else (1 - momentum_coef) * protos + momentum_coef * old


def test_epoch_hook_computes_class_means_with_momentum():
    method, _, params, _, _ = build({"name": "pmr", "momentum": 0.3, "proto_split": "validation"})
    ms = method.init_method_state(params)
    assert int(ms["ready"]) == 0 and ms["protos"]["x1"].shape == (5, 8)
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(5), 4)
    f1 = {m: rng.normal(size=(20, 8)).astype(np.float32) for m in NAMES}
    f2 = {m: rng.normal(size=(20, 8)).astype(np.float32) for m in NAMES}
    ctx, calls = _ctx(params, {"validation": (f1, y)})
    ms1 = method.on_epoch_end(1, {}, ms, ctx)
    assert calls == ["validation"] and "epoch" not in ms1 and int(ms1["ready"]) == 1
    ctx2, _ = _ctx(params, {"validation": (f2, y)})
    ms2 = method.on_epoch_end(2, {}, ms1, ctx2)
    for m in NAMES:
        p0 = _release_prototypes(f64(f1[m]), y, 5, 0)
        np.testing.assert_allclose(ms1["protos"][m], p0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ms2["protos"][m], _release_prototypes(f64(f2[m]), y, 5, 1, p0, 0.3),
                                   rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(ms2) == jax.tree.structure(ms)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ms2) == jax.tree.map(lambda a: (a.shape, a.dtype), ms)


# ---- golden: the released loss and its gradients -------------------------------------------------------

ALPHA = 2.0  # bash.sh, CREMA-D / AVE concat: --alpha 2.0


def _release_eu_dist(x1, x2):
    d = np.zeros((x1.shape[0], x2.shape[0]))
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = np.sqrt(np.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def _release_loss(out, a, v, label, audio_proto, visual_proto, alpha):
    """train_epoch, modulation 'Proto' inside the window: the loss, beta, lam, and the hand-written
    gradients d loss / d out, d a, d v (nn.CrossEntropyLoss: batch mean)."""
    audio_sim, visual_sim = -_release_eu_dist(a, audio_proto), -_release_eu_dist(v, visual_proto)
    n = len(label)
    score_a_p = sum(softmax(audio_sim)[i][label[i]] for i in range(n))
    score_v_p = sum(softmax(visual_sim)[i][label[i]] for i in range(n))
    ratio_a_p = score_a_p / score_v_p
    loss_proto_a, loss_proto_v = _ce(audio_sim, label), _ce(visual_sim, label)
    if ratio_a_p > 1:
        beta, lam = 0, 1 * alpha
    elif ratio_a_p < 1:
        beta, lam = 1 * alpha, 0
    else:
        beta, lam = 0, 0
    loss = _ce(out, label) + beta * loss_proto_a + lam * loss_proto_v
    onehot = np.eye(out.shape[1])[label]
    g_out = (softmax(out) - onehot) / n

    def g_feat(x, protos, sim, coef):  # d/dx of coef * CE(-‖x − c‖): Σ_k (p − y)_ik · (−(x_i − c_k)/d_ik) / n
        g_sim = coef * (softmax(sim) - onehot) / n
        diff = x[:, None, :] - protos[None]
        return np.einsum("ik,ikd->id", g_sim, -diff / (-sim)[:, :, None])

    return loss, beta, lam, g_out, g_feat(a, audio_proto, audio_sim, beta), g_feat(v, visual_proto, visual_sim, lam)


@pytest.fixture(scope="module")
def golden_case():
    method, handle, params, batch, model = build({"name": "pmr"})
    return method, handle, params, batch, jit_gradients(method, handle)


@pytest.mark.parametrize("weaker", ["x1", "x2"])
def test_golden_loss_and_gradients_match_the_release(golden_case, weaker):
    method, handle, params, batch, step = golden_case
    y = np.asarray(batch["label"])

    def model_out(p):
        out = handle.train_model(p)(inputs(batch))
        return out["logits"], out["latents"]["x1"], out["latents"]["x2"]

    (logits, a, v), vjp = jax.vjp(model_out, params)
    rng = np.random.default_rng(3)
    protos = {}
    for m, z in (("x1", a), ("x2", v)):  # stronger: its batch class means (+ noise); weaker: those of
        means = np.stack([f64(z)[y == k].mean(0) if (y == k).any() else np.zeros(z.shape[1]) for k in range(5)])
        means = np.roll(means, 1, axis=0) if m == weaker else means  # the wrong classes
        protos[m] = (means + 0.01 * rng.normal(size=means.shape)).astype(np.float32)
    loss, beta, lam, g_out, g_a, g_v = _release_loss(f64(logits), f64(a), f64(v), y, f64(protos["x1"]),
                                                     f64(protos["x2"]), ALPHA)
    assert (beta, lam) == ((ALPHA, 0) if weaker == "x1" else (0, ALPHA))
    ms = {"ready": jnp.ones((), jnp.int32), "protos": {m: jnp.asarray(p) for m, p in protos.items()}}
    grads, _, _, _, mets = step(params, batch, jax.random.PRNGKey(0), ms, epoch=3)
    np.testing.assert_allclose(mets["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], [beta, lam])
    (want,) = vjp(tuple(jnp.asarray(g, jnp.float32) for g in (g_out, g_a, g_v)))
    assert_trees_close(grads, want, rtol=2e-4)
    # outside the window (and before the first prototypes): the plain fused CE
    for late, epoch in ((ms, 72), ({**ms, "ready": jnp.zeros((), jnp.int32)}, 3)):
        _, _, _, _, m2 = step(params, batch, jax.random.PRNGKey(0), late, epoch=epoch)
        np.testing.assert_allclose(m2["loss"], _ce(f64(logits), y), rtol=1e-5)
        assert float(m2["coeff_x1"]) == float(m2["coeff_x2"]) == 0.0


def test_padding_rows_and_entropy_term():
    method, handle, params, batch, _ = build({"name": "pmr", "entropy_weight": 0.5, "entropy_epochs": 4})
    rng = np.random.default_rng(4)
    ms = {"ready": jnp.ones((), jnp.int32),
          "protos": {m: jnp.asarray(rng.normal(size=(5, 8)), jnp.float32) for m in NAMES}}
    step = jit_gradients(method, handle)
    _, _, _, _, mets = step(params, batch, jax.random.PRNGKey(0), ms, epoch=2)
    out = handle.train_model(params)(inputs(batch))
    y = np.asarray(batch["label"])
    lg = {m: _np_proto_logits(out["latents"][m], ms["protos"][m]) for m in NAMES}
    w = np.ones(len(y))
    s = np.array([np.sum(softmax(lg[m])[np.arange(len(y)), y]) for m in NAMES])
    rho = s / s[::-1]
    ent = {m: float(np.mean(-np.sum(softmax(lg[m]) * log_softmax(lg[m]), -1))) for m in NAMES}
    want = _ce(f64(out["logits"]), y) + sum(
        (2.0 * _np_pce(lg[m], y, w) if rho[i] < 1 else 0.0) - (0.5 * ent[m] if rho[i] > 1 else 0.0)
        for i, m in enumerate(NAMES))
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-5)
    np.testing.assert_allclose([mets["entropy_x1"], mets["entropy_x2"]], [ent["x1"], ent["x2"]], rtol=1e-5)
    # padding rows change nothing: pad the batch with garbage rows of mask 0
    pad = {k: jnp.concatenate([v, v[:8] * 0 + (0 if k == "label" else 5)], 0) for k, v in batch.items()}
    pad["mask"] = jnp.concatenate([jnp.ones(len(y)), jnp.zeros(8)])
    _, _, _, _, mets_pad = jit_gradients(method, handle)(params, pad, jax.random.PRNGKey(0), ms)
    for k in ("loss", "pce_x1", "pce_x2", "ratio_x1", "entropy_x2"):
        np.testing.assert_allclose(mets_pad[k], mets[k], rtol=1e-5)


@pytest.mark.parametrize("epoch,window,entropy", [(1, False, True), (2, True, True), (3, True, True),
                                                   (4, False, False)])
def test_window_and_entropy_edges_are_inclusive(epoch, window, entropy):
    """``start_epoch`` 2, ``end_epoch`` 3, ``entropy_epochs`` 3: the PCE terms are on at epochs 2 and 3
    (both edges), the entropy term through epoch 3 included, nothing at epoch 4 (NumPy formula)."""
    method, handle, params, batch, _ = build({"name": "pmr", "start_epoch": 2, "end_epoch": 3,
                                              "entropy_weight": 0.5, "entropy_epochs": 3})
    rng = np.random.default_rng(4)
    ms = {"ready": jnp.ones((), jnp.int32),
          "protos": {m: jnp.asarray(rng.normal(size=(5, 8)), jnp.float32) for m in NAMES}}
    mets = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), ms, epoch=epoch)[4]
    out = handle.train_model(params)(inputs(batch))
    y = np.asarray(batch["label"])
    lg = {m: _np_proto_logits(out["latents"][m], ms["protos"][m]) for m in NAMES}
    s = np.array([np.sum(softmax(lg[m])[np.arange(len(y)), y]) for m in NAMES])
    rho = s / s[::-1]
    assert (rho < 1).any() and (rho > 1).any()  # one modality gets the PCE term, the other the entropy term
    ent = {m: float(np.mean(-np.sum(softmax(lg[m]) * log_softmax(lg[m]), -1))) for m in NAMES}
    want = _ce(f64(out["logits"]), y) + sum(
        (2.0 * _np_pce(lg[m], y, np.ones(len(y))) if window and rho[i] < 1 else 0.0)
        - (0.5 * ent[m] if entropy and rho[i] > 1 else 0.0) for i, m in enumerate(NAMES))
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-5)


# ---- one trainer run -----------------------------------------------------------------------------------


def test_smoke_run(tmp_path):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "pmr"})
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    tr = [h["train"] for h in history]
    assert [t["proto_ready"] for t in tr] == [0.0, 1.0]  # prototypes computed after epoch 1
    for t in tr:
        assert all(np.isfinite(t[k]) for k in ("loss", "pce_x1", "pce_x2", "ratio_x1", "coeff_x2"))
    assert tr[0]["coeff_x1"] == tr[0]["coeff_x2"] == 0.0
    assert tr[1]["coeff_x1"] + tr[1]["coeff_x2"] == pytest.approx(2.0)  # per step exactly one gets alpha (M=2)
    assert tr[1]["pce_x1"] < tr[0]["pce_x1"]  # class-mean prototypes beat the all-zero ones


# ---- errors and defaults -------------------------------------------------------------------------------


def test_defaults_and_clear_errors():
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "pmr"}), info)
    assert method.name == "pmr" and method.opts["alpha"] == 2.0
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "pmr"}), _regression_info())
    with pytest.raises(ValueError, match="unknown method 'pmr' options"):
        get_method(ml_collections.ConfigDict({"name": "pmr", "beta": 1.0}), info)
    with pytest.raises(ValueError, match="proto_split"):
        get_method(ml_collections.ConfigDict({"name": "pmr", "proto_split": "test"}), info)
    with pytest.raises(ValueError, match="momentum"):
        get_method(ml_collections.ConfigDict({"name": "pmr", "momentum": 1.0}), info)
    one = DatasetInfo(name="toy", modalities=("x1",), input_shapes={"x1": info.input_shapes["x1"]},
                      num_classes=5)
    with pytest.raises(ValueError, match="at least two modalities"):
        get_method(ml_collections.ConfigDict({"name": "pmr"}), one)
    with pytest.raises(ValueError, match="unimodal heads"):
        get_method(ml_collections.ConfigDict({"name": "pmr"}), info).init_method_state({})
