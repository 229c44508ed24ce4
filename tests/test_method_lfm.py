"""LFM tests: the alignment term, the two weight schedules and the weight update against float64
NumPy; the released loss and weight update (golden); one trainer run; the clear errors.

Golden reference: njustkmg/NeurIPS24-LFM (commit ad44fa0), ``Crema_epoch_learnable.py``:
``Alignment`` (lines 37-44: ``F.kl_div(p.log(), m, reduction='batchmean')`` = sum m (log m - log p) / B),
``getAlpha_Learnable`` (lines 55-97: ``L_total = alpha[0] * loss_cls + alpha[1] * loss_alignment``,
``theta_grads = grad(L_total, create_graph)``, ``cls_grads = grad(loss_cls)``,
``hessian_vector_prod = grad(theta_grads, params, grad_outputs=cls_grads)``,
``alpha_grad = hessian_vector_prod[0].mean()``, the halving of ``lr_alpha``, the clip to
[0.05, 0.95] and ``alpha[0] = 1 - alpha[1]``), ``train_audio_video`` lines 113-117
(``loss = 2 * (cls_k[0] * loss_cls + cls_k[1] * loss_alignment)``) and ``getAlpha_Learnable_Fitted``
lines 46-52. The loss is transcribed below into NumPy without ``mcr_jax.methods``; its gradient with
respect to the logits is taken by float64 central differences and carried to the parameters through
the model's own VJP. The Hessian-vector product is taken as the release does (reverse over reverse:
the gradient of <grad L_total, g_cls> with g_cls held fixed), while the module uses forward over reverse.
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.methods import get_method
from mcr_jax.methods.lfm import alignment, alpha_step, fitted_alpha, mean_pair_alignment
from tests.helpers.method_checks import NAMES, assert_trees_close, f64, inputs, jit_gradients, smoke_run
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data
from tests.helpers.method_setup import toy_regression_info as _regression_info
from tests.helpers.numpy_refs import softmax

# ---- the release, transcribed into NumPy -------------------------------------------------------------


def _np_alignment(o_p, o_q):
    """``Alignment(p, q)``: softmax, then ``F.kl_div(p.log(), m, 'batchmean')`` (= sum m (log m - log p) / B)."""
    p, q = softmax(f64(o_p)), softmax(f64(o_q))
    m = 0.5 * p + 0.5 * q
    b = len(p)
    kl_p_m = np.sum(m * (np.log(m) - np.log(p))) / b
    kl_q_m = np.sum(m * (np.log(m) - np.log(q))) / b
    return 0.5 * (kl_p_m + kl_q_m)


def _np_loss(fused, uni, y, cls_k):
    """``train_audio_video``: ``2 * (cls_k[0] * CE(fused) + cls_k[1] * Alignment)`` (pairs averaged for M > 2)."""
    pairs = [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]]
    align = sum(_np_alignment(uni[a], uni[b]) for a, b in pairs) / len(pairs)
    return 2.0 * (cls_k[0] * _ce(fused, y) + cls_k[1] * align)


def _num_grad(f, x, eps=1e-6):
    x = f64(x).copy()
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f(x)
        x[idx] = old - eps
        lo = f(x)
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


def _np_fitted(epoch):
    c1 = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    c2 = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]
    return [sum(c * epoch**i for i, c in enumerate(c1)), sum(c * epoch**i for i, c in enumerate(c2))]


def _np_alpha_update(epoch, alpha, lr_alpha, alpha_grad):
    """``getAlpha_Learnable``'s ``torch.no_grad()`` block (lines 86-94)."""
    alpha = list(alpha)
    if epoch % 20 == 0 and epoch != 0:
        lr_alpha = lr_alpha / 2
    alpha[1] -= lr_alpha * alpha_grad
    alpha[1] = max(0.05, min(0.95, alpha[1]))
    alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha


# ---- unit tests against float64 NumPy ------------------------------------------------------------------


def test_alignment_against_numpy():
    rng = np.random.default_rng(0)
    o = {m: rng.normal(size=(7, 4)) * 2 for m in "abc"}
    j = {m: jnp.asarray(v, jnp.float32) for m, v in o.items()}
    np.testing.assert_allclose(alignment(j["a"], j["b"]), _np_alignment(o["a"], o["b"]), rtol=1e-5)
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    np.testing.assert_allclose(alignment(j["a"], j["b"], jnp.asarray(mask)),
                               _np_alignment(o["a"][mask], o["b"][mask]), rtol=1e-5)
    want = np.mean([_np_alignment(o[a], o[b]) for a, b in (("a", "b"), ("a", "c"), ("b", "c"))])
    np.testing.assert_allclose(mean_pair_alignment(j, "abc"), want, rtol=1e-5)
    assert float(alignment(j["a"], j["a"])) == pytest.approx(0.0, abs=1e-6)


def test_schedules_against_numpy():
    for e in (0, 1, 7, 40, 99):
        np.testing.assert_allclose(fitted_alpha(e), _np_fitted(e), rtol=1e-5, atol=1e-6)
    alpha, lr = [0.05, 0.95], 1e-4
    a_j, lr_j = jnp.asarray(alpha, jnp.float32), jnp.asarray(lr, jnp.float32)
    for e, g in enumerate([3.0, -2.0, 500.0] + [1.0] * 19 + [1e5]):  # the last hits the lower clip
        alpha, lr = _np_alpha_update(e, alpha, lr, g)
        a_j, lr_j = alpha_step(a_j, lr_j, jnp.float32(g), e, halve_every=20, lo=0.05, hi=0.95)
        np.testing.assert_allclose(a_j, alpha, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(lr_j, lr, rtol=1e-6)
    assert lr == pytest.approx(5e-5) and alpha[1] == pytest.approx(0.05)  # halved once (epoch 20); clipped


# ---- golden: the released loss and weight update ----------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    # the golden loss of the release is written on (fused, unimodal heads): the "heads" mapping
    method, handle, params, batch, model = build({"name": "lfm", "logits": "heads"})
    return method, handle, params, batch, jit_gradients(method, handle)


def _outputs(handle, params, batch, train=True):
    model = handle.train_model(params) if train else handle.eval_model(params)
    out = model(inputs(batch), None)
    return out["logits"], out["unimodal"]


def _release_gradients(handle, params, batch, cls_k):
    """The release's loss gradient: NumPy loss, float64 numerical gradient in the logits, model VJP."""
    y = np.asarray(batch["label"])
    (fused, uni), vjp = jax.vjp(jax.jit(lambda p: _outputs(handle, p, batch)), params)
    uni_np = {m: f64(v) for m, v in uni.items()}
    g_fused = _num_grad(lambda f: _np_loss(f, uni_np, y, cls_k), fused)
    g_uni = {m: _num_grad(lambda u, m=m: _np_loss(f64(fused), {**uni_np, m: u}, y, cls_k), uni[m]) for m in NAMES}
    loss = _np_loss(f64(fused), uni_np, y, cls_k)
    cot = (jnp.asarray(g_fused, jnp.float32), {m: jnp.asarray(g_uni[m], jnp.float32) for m in uni})
    return loss, vjp(cot)[0]


def _release_alpha_grad(handle, params, batch, alpha, rows):
    """``getAlpha_Learnable``'s ``alpha_grad``: reverse-over-reverse HVP, mean of the first tensor (the
    first modality's first encoder weight, ``audio_net``'s first conv in the release)."""
    probe = {k: v[:rows] for k, v in batch.items()}
    y = probe["label"]

    def torch_terms(p):  # the release's loss_cls and Alignment, written as in PyTorch
        fused, uni = _outputs(handle, p, probe, train=False)
        cls = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(fused), y[:, None], axis=1))
        pp, qq = jax.nn.softmax(uni["x1"]), jax.nn.softmax(uni["x2"])
        mm = 0.5 * pp + 0.5 * qq
        b = pp.shape[0]
        align = 0.5 * (jnp.sum(mm * (jnp.log(mm) - jnp.log(pp))) / b + jnp.sum(mm * (jnp.log(mm) - jnp.log(qq))) / b)
        return cls, align

    @jax.jit
    def first_hvp_mean(params):
        cls_grads = jax.lax.stop_gradient(jax.grad(lambda p: torch_terms(p)[0])(params))
        theta_grad = jax.grad(lambda p: alpha[0] * torch_terms(p)[0] + alpha[1] * torch_terms(p)[1])
        hvp = jax.grad(lambda p: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(theta_grad(p)),
                                                                      jax.tree.leaves(cls_grads), strict=True)))(params)
        return jnp.mean(hvp["encoders"]["x1"]["mlp"]["layers"][0]["kernel"])

    return float(first_hvp_mean(params))


def test_golden_against_release(setup):
    method, handle, params, batch, step = setup
    assert float(batch["mask"].min()) == 1.0  # the toy batch has no padding: the release's batchmean is ours
    ms = method.init_method_state(params)
    out = step(params, batch, jax.random.PRNGKey(0), ms)
    # the weight update before epoch 0 (release: cls_k = [0.05, 0.95], lr_alpha = 1e-4)
    delta = _release_alpha_grad(handle, params, batch, [0.05, 0.95], 8)
    want_alpha, want_lr = _np_alpha_update(0, [0.05, 0.95], 1e-4, delta)
    np.testing.assert_allclose(out.method_state["alpha_grad"], delta, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(out.method_state["alpha"], want_alpha, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.metrics["lr_alpha"], want_lr)
    assert abs(delta) > 1e-5  # the update is not trivially zero on this model
    # the loss and gradients with the updated weights
    loss, want = _release_gradients(handle, params, batch, want_alpha)
    np.testing.assert_allclose(out.metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["alpha_cls"] + out.metrics["alpha_align"], 1.0, rtol=1e-6)
    assert_trees_close(out.grads, want, rtol=1e-4)
    # a second step of the same epoch does not update the weights again; the next epoch does
    ms1 = out.method_state
    again = step(params, batch, jax.random.PRNGKey(0), dict(ms1, alpha_grad=jnp.float32(123.0)))
    assert float(again.method_state["alpha_grad"]) == 123.0
    np.testing.assert_array_equal(again.method_state["alpha"], ms1["alpha"])
    nxt = step(params, batch, jax.random.PRNGKey(0), method.on_epoch_end(1, {}, ms1, None), epoch=2)
    assert int(nxt.method_state["probed"]) == 2 and float(nxt.method_state["alpha_grad"]) != 123.0
    np.testing.assert_allclose(nxt.method_state["alpha"],
                               _np_alpha_update(1, list(np.asarray(ms1["alpha"], float)), 1e-4,
                                                float(nxt.method_state["alpha_grad"]))[0], rtol=1e-6, atol=1e-7)
    # before the 21st epoch (0-based 20) lr_alpha is halved, then used
    e21 = step(params, batch, jax.random.PRNGKey(0), ms1, epoch=21)
    assert int(e21.method_state["halvings"]) == 1 and float(e21.metrics["lr_alpha"]) == pytest.approx(5e-5)
    np.testing.assert_allclose(e21.method_state["alpha"],
                               _np_alpha_update(20, list(np.asarray(ms1["alpha"], float)), 1e-4,
                                                float(e21.method_state["alpha_grad"]))[0], rtol=1e-6, atol=1e-7)


def test_fitted_schedule_golden():
    method, handle, params, batch, _ = build({"name": "lfm", "schedule": "fitted", "logits": "heads"})
    ms = method.on_epoch_end(3, {}, method.init_method_state(params), None)
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), ms, epoch=4)  # = release's 3
    cls_k = _np_fitted(3)
    np.testing.assert_allclose([out.metrics["alpha_cls"], out.metrics["alpha_align"]], cls_k, rtol=1e-5)
    loss, want = _release_gradients(handle, params, batch, cls_k)
    np.testing.assert_allclose(out.metrics["loss"], loss, rtol=1e-5)
    assert_trees_close(out.grads, want, rtol=1e-4)


# ---- one trainer run -----------------------------------------------------------------------------------


def test_smoke_run(tmp_path):
    _, history = smoke_run(tmp_path, {"name": "lfm"})
    for h in history:
        t = h["train"]
        assert all(np.isfinite(t[k]) for k in ("loss", "cls", "align", "alpha_cls", "alpha_align", "lr_alpha"))
        assert t["alpha_cls"] + t["alpha_align"] == pytest.approx(1.0, abs=1e-5)
        assert 0.05 - 1e-6 <= t["alpha_align"] <= 0.95 + 1e-6
        assert np.isfinite(h["val"]["lfm_alpha_grad"])


# ---- errors and defaults -------------------------------------------------------------------------------


def test_defaults_and_clear_errors():
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "lfm"}), info)
    assert method.name == "lfm" and method.opts["lr_alpha"] == 1e-4 and method.opts["alpha_init"] == 0.95
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "lfm"}), _regression_info())
    for bad in ({"schedule": "poly"}, {"logits": "fused"}, {"hvp_leaf": "last"}, {"alpha_min": 0.9, "alpha_max": 0.1},
                {"probe_rows": 0}):
        with pytest.raises(ValueError, match="lfm"):
            get_method(ml_collections.ConfigDict({"name": "lfm", **bad}), info)
    with pytest.raises(ValueError, match="unknown method 'lfm' options"):
        get_method(ml_collections.ConfigDict({"name": "lfm", "beta": 1.0}), info)
    with pytest.raises(ValueError, match="separable fusion"):
        build({"name": "lfm", "logits": "branches"}, fusion="concat_mlp")


# ---- which logits are aligned: BalanceBenchmark's default, the authors' form ---------------------------

GOLDEN_Z = {"x1": [[1.0, 0.0], [0.0, 1.0]], "x2": [[1.0, 1.0], [0.0, 2.0]]}
GOLDEN_W = {"x1": [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]], "x2": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]}
GOLDEN_B = [0.6, -0.4, 0.0]


def _golden_fusion():
    from flax import nnx

    from mcr_jax.models.fusion import LinearLateFusion

    fusion = LinearLateFusion(("x1", "x2"), {"x1": 2, "x2": 2}, 3, rngs=nnx.Rngs(0))
    for m in ("x1", "x2"):
        fusion.branches[m].kernel[...] = jnp.asarray(GOLDEN_W[m])
    fusion.bias[...] = jnp.asarray(GOLDEN_B)
    return fusion


def _golden_alignment(logits: str):
    """(A, dA/dW_x1) through the method's own mapping, on the issue's fixed inputs (α = (0, 1))."""
    from types import SimpleNamespace

    from flax import nnx

    from mcr_jax.data.types import DatasetInfo

    info = DatasetInfo("golden", ("x1", "x2"), {"x1": (2,), "x2": (2,)}, 3)
    method = get_method(ml_collections.ConfigDict({"name": "lfm", "logits": logits}), info)
    graphdef, state = nnx.split(_golden_fusion())
    latents = {m: jnp.asarray(v) for m, v in GOLDEN_Z.items()}

    def a_of(state):
        fusion = nnx.merge(graphdef, state)
        uni = {m: fusion.branches[m](latents[m]) for m in ("x1", "x2")}  # stands for unimodal heads
        out = {"latents": latents, "unimodal": uni, "logits": fusion(latents)}
        per_modality, _ = method.modality_logits(SimpleNamespace(fusion=fusion), out)
        return mean_pair_alignment(per_modality, ("x1", "x2"))

    value, grads = jax.value_and_grad(a_of)(state)
    return float(value), np.asarray(grads["branches"]["x1"]["kernel"][...])


def test_the_default_is_balancebenchmarks_branches_with_the_bias_share():
    a, grad = _golden_alignment("branches")
    assert a == pytest.approx(0.1176706, abs=2e-7)
    np.testing.assert_allclose(grad, [[0.026245, -0.018109, -0.008137], [-0.078529, 0.070326, 0.008203]], atol=2e-6)
    _, info, _ = _data()
    assert get_method(ml_collections.ConfigDict({"name": "lfm"}), info).opts["logits"] == "branches"


def test_the_authors_form_predicts_from_the_aligned_classifiers():
    method, handle, params, batch, model = build({"name": "lfm", "logits": "authors"})
    pred = method.predict(handle.eval_model(params), inputs(batch) | {"label": batch["label"], "mask": batch["mask"]})
    np.testing.assert_allclose(pred["logits"], 0.5 * (pred["unimodal"]["x1"] + pred["unimodal"]["x2"]), rtol=1e-6)
    assert method.reports_unimodal_heads
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), method.init_method_state(params))
    fusion_grads = [float(jnp.abs(g).max()) for g in jax.tree.leaves(out.grads["fusion"])]
    head_grads = [float(jnp.abs(g).max()) for g in jax.tree.leaves(out.grads["heads"])]
    assert max(fusion_grads) == 0.0 and min(head_grads) > 0.0  # the heads predict; the fusion head is unused
