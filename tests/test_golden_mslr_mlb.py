"""Golden tests: MSLR and MLB against transcriptions of the authors' released update rules.

The references below are written from the released PyTorch code, not from ``mcr_jax``:

- MSLR: ``kkontras/MCR`` ``agents/general_agent/helpers/Bias_Infusion.py``, class
  ``Bias_Infusion_MSLR`` (identical in ``kkontras/MLB``, same path): ``on_epoch_begin`` keeps the
  initial rates until ``keep_memory_epoch`` epochs of validation accuracy exist, then multiplies them
  by ``acc / mean(last keep_memory_epoch accuracies)``; ``on_backward_end`` multiplies the gradients
  of the encoder parameters (names with ``enc_0`` / ``enc_1``) by the result.
- MLB: same file, classes ``Bias_Infusion_MLB`` (classification: batch-mean true-class probability)
  and ``Bias_Infusion_MLB_Reg`` (regression: ``F.mse_loss`` of each unimodal output), coefficients
  ``1 + tanh(α(r−1))`` or, with ``tanh_mode "2"``, ``1 + (β−1) tanh(α(r−1))`` for ``r > 1``; they
  multiply the gradients of ``enc_m`` (encoder and its unimodal classifier) and ``fc_m_lin.weight``
  (the linear-fusion branch), not the fusion bias.

The tiny model's parameter tree maps onto the released names as ``encoders/m`` + ``heads/m`` ->
``enc_m`` and ``fusion/branches/m`` -> ``fc_m_lin.weight``; ``fusion/bias`` is the shared bias.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from tests.method_setup import build, toy_data

NAMES = ("x1", "x2")


# ---- transcriptions of the released code ------------------------------------------------------


class ReleasedMSLR:
    """``Bias_Infusion_MSLR``: per-epoch state and the per-step gradient coefficients."""

    def __init__(self, init_learning_rate, keep_memory_epoch):
        self.init_learning_rate = [float(v) for v in init_learning_rate]
        self.keep_memory_epoch = int(keep_memory_epoch)
        self.coeff_memory = [[] for _ in self.init_learning_rate]
        self.ratio = [1.0 for _ in self.init_learning_rate]

    def on_epoch_begin(self, current_epoch, last_val_acc):
        """``current_epoch`` is 0-based; ``last_val_acc`` the latest validation accuracy per modality."""
        if current_epoch < 1:
            return
        if current_epoch > self.keep_memory_epoch:
            self.ratio = [acc / np.array(mem[-self.keep_memory_epoch:]).mean()
                          for acc, mem in zip(last_val_acc, self.coeff_memory, strict=True)]
        else:
            self.ratio = [1.0 for _ in self.ratio]
        for mem, acc in zip(self.coeff_memory, last_val_acc, strict=True):
            mem.append(acc)

    def coefficients(self):
        return [r * lr for r, lr in zip(self.ratio, self.init_learning_rate, strict=True)]


def released_mslr_owner(path):
    """Which coefficient the released MSLR applies to a parameter (``enc_m`` only), -1 for none."""
    for i, m in enumerate(NAMES):
        if path.startswith(f"['encoders']['{m}']") or path.startswith(f"['heads']['{m}']"):
            return i
    return -1


def released_mlb_owner(path):
    """``"mod{m}" / "enc_{m}" / "fc_{m}_lin.weight"``: encoder, its unimodal head, its fusion branch."""
    for i, m in enumerate(NAMES):
        if any(path.startswith(p) for p in (f"['encoders']['{m}']", f"['heads']['{m}']",
                                            f"['fusion']['branches']['{m}']")):
            return i
    return -1


def released_mlb_coefficients(score_0, score_1, *, alpha, tanh_mode, beta, regression):
    """``Bias_Infusion_MLB.on_backward_end`` (``ratio_0 = score_1 / score_0``, higher score better)
    and ``Bias_Infusion_MLB_Reg.on_backward_end`` (``ratio_0 = score_0 / score_1``, scores are MSEs)."""
    if regression:
        ratio_0, ratio_1 = score_0 / score_1, score_1 / score_0
    else:
        ratio_0 = score_1 / score_0
        ratio_1 = 1 / ratio_0
    coeff_0 = 1 + math.tanh(alpha * (ratio_0 - 1))
    coeff_1 = 1 + math.tanh(alpha * (ratio_1 - 1))
    if tanh_mode == "2":
        coeff_0 = 1 + (beta - 1) * math.tanh(alpha * (ratio_0 - 1)) if ratio_0 > 1 else coeff_0
        coeff_1 = 1 + (beta - 1) * math.tanh(alpha * (ratio_1 - 1)) if ratio_1 > 1 else coeff_1
    return [coeff_0, coeff_1], [ratio_0, ratio_1]


# ---- helpers ----------------------------------------------------------------------------------


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _apply(grads, owner_fn, coeffs):
    """The released ``param.grad *= coeff_m`` on the parameters ``owner_fn`` assigns to modality m."""
    out = []
    for path, g in _leaves(grads):
        own = owner_fn(path)
        out.append((path, g * coeffs[own] if own >= 0 else g))
    return out


def _assert_tree(got, want_leaves, rtol=1e-5, atol=1e-7):
    for (path, g), (wpath, w) in zip(_leaves(got), want_leaves, strict=True):
        assert path == wpath
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=path)


def _step(method, handle, params, batch, state):
    return jax.jit(lambda p, b, s: method.gradients(handle, p, b, jax.random.PRNGKey(0), s))(params, batch, state)


def _val(acc):
    heads = {m: {"accuracy": float(a)} for m, a in zip(NAMES, acc, strict=True)}
    return {"heads": {"fused": {"accuracy": 0.0}, **heads}}


# Validation accuracies of the two unimodal predictions after epochs 1..9: both modalities move,
# so any adaptation on a partial window (epochs 2..window) changes the rates.
ACCS = np.array([[0.20, 0.30], [0.40, 0.30], [0.50, 0.20], [0.55, 0.35], [0.45, 0.50], [0.60, 0.50],
                 [0.62, 0.41], [0.58, 0.66], [0.70, 0.52]])


# ---- MSLR -------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3])
def test_mslr_rates_follow_the_released_schedule(window):
    """Epoch by epoch, the method's learning-rate multipliers equal the released coefficients: the
    initial rates until ``window`` epochs of history exist, then ``init · acc / mean(last window)``."""
    _, info, _ = toy_data()
    method = get_method(ml_collections.ConfigDict({"name": "mslr", "window": window,
                                                   "init_lr_multipliers": {"x1": 0.7, "x2": 1.3}}), info)
    ref = ReleasedMSLR((0.7, 1.3), keep_memory_epoch=window)
    state = method.init_method_state(None)
    np.testing.assert_allclose(state["multipliers"], ref.coefficients(), rtol=1e-6, err_msg="epoch 1")
    for epoch, acc in enumerate(ACCS, start=1):  # `epoch` (1-based) has just finished
        state = method.on_epoch_end(epoch, _val(acc), state, None)
        ref.on_epoch_begin(epoch, acc)  # the released 0-based epoch `epoch` is our epoch + 1
        np.testing.assert_allclose(state["multipliers"], ref.coefficients(), rtol=1e-6,
                                   err_msg=f"rates for epoch {epoch + 1}")


def test_mslr_mcr_authors_preset_scales_encoder_gradients():
    """``preset="mcr_authors"``: first modality (audio in CREMA-D, AVE) 0.7, second 1.3, on the gradients
    of the encoders only (the fusion branches and bias keep the plain fused-CE gradient)."""
    method, handle, params, batch, _ = build({"name": "mslr", "preset": "mcr_authors", "window": 2})
    ref = ReleasedMSLR((0.7, 1.3), keep_memory_epoch=2)
    state = method.init_method_state(params)
    for epoch, acc in enumerate(ACCS[:4], start=1):
        state = method.on_epoch_end(epoch, _val(acc), state, None)
        ref.on_epoch_begin(epoch, acc)
    coeffs = ref.coefficients()
    assert not np.allclose(coeffs, [0.7, 1.3])  # the rule has adapted by now
    np.testing.assert_allclose(state["multipliers"], coeffs, rtol=1e-6)

    grads, kw, _, _, _ = _step(method, handle, params, batch, state)
    assert kw == {}  # nothing for the optimizer: the gradients carry the rates

    def fused_ce(p):  # the released MSLR trains on the fused cross-entropy only
        out = handle.train_model(p)({m: batch[m] for m in NAMES})
        logp = jax.nn.log_softmax(out["logits"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None].astype(jnp.int32), axis=1))

    _assert_tree(grads, _apply(jax.grad(fused_ce)(params), released_mslr_owner, coeffs))
    inner = optax.sgd(1.0)
    assert method.make_optimizer(inner, params) is inner


def test_mslr_preset_and_option_checks():
    _, info, _ = toy_data()

    def make(**cfg):
        return get_method(ml_collections.ConfigDict({"name": "mslr", **cfg}), info)

    preset = make(preset="mcr_authors")
    np.testing.assert_allclose(preset.base, [0.7, 1.3], rtol=1e-6)  # by position: first modality 0.7
    assert preset.opts["scale"] == "gradients" and preset.opts["scale_branch"] is False
    assert preset.opts["window"] == 20 and preset.opts["partial_window"] is False
    mine = make(preset="mcr_authors", scale="updates", init_lr_multipliers={"x2": 2.0})  # explicit options win
    assert mine.opts["scale"] == "updates" and mine.opts["scale_branch"] is False
    np.testing.assert_allclose(mine.base, [1.0, 2.0])
    np.testing.assert_allclose(make(init_lr_multipliers=(0.5, 3.0)).base, [0.5, 3.0])
    three = DatasetInfo(name="toy", modalities=("a", "b", "c"), input_shapes={m: (4,) for m in "abc"},
                        num_classes=3)
    for cfg, msg, dinfo in [({"preset": "mcr_authors"}, "two-modality", three),
                            ({"preset": "authors"}, "preset", info),
                            ({"scale": "params"}, "scale", info),
                            ({"partial_window": 1}, "partial_window", info),
                            ({"init_lr_multipliers": (0.5,)}, "one value per modality", info),
                            ({"init_lr_multipliers": {"x3": 0.5}}, "unknown modalities", info),
                            ({"init_lr_multipliers": {"x1": 0.0}}, "> 0", info)]:
        with pytest.raises(ValueError, match=msg):
            get_method(ml_collections.ConfigDict({"name": "mslr", **cfg}), dinfo)


# ---- MLB --------------------------------------------------------------------------------------


def _mlb_reference_grads(handle, params, batch, regression, uni_weight=1.0):
    """Gradient of the released total loss: fused + w·Σ unimodal, CE (classification) or L1 of the
    squeezed outputs (``train_one_step_regression``)."""
    y = batch["label"]

    def loss(out_logits):
        if regression:
            return jnp.mean(jnp.abs(out_logits[:, 0] - y))
        logp = jax.nn.log_softmax(out_logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=1))

    def total(p):
        out = handle.train_model(p)({m: batch[m] for m in NAMES})
        return loss(out["logits"]) + uni_weight * sum(loss(out["unimodal"][m]) for m in NAMES)

    return jax.grad(total)(params)


@pytest.mark.parametrize("tanh_mode,beta", [("2", 10.0), (None, 2.0)], ids=["tanh_mode_2_beta10", "default_mode"])
def test_mlb_classification_matches_released(tanh_mode, beta):
    """Classification: confidences, ratios, coefficients and the scaled gradients of
    ``Bias_Infusion_MLB``. The released default (no ``tanh_mode``) is the symmetric form: β = 2 here."""
    method, handle, params, batch, _ = build({"name": "mlb", "alpha": 0.5, "beta": beta})
    batch = dict(batch, mask=jnp.ones_like(batch["mask"]))  # the released batches have no padding
    grads, _, _, _, mets = _step(method, handle, params, batch, {})

    out = handle.train_model(params)({m: batch[m] for m in NAMES})
    y = np.asarray(batch["label"])

    def score(logits):  # torch.mean(stack([softmax(out)[i][label[i]] ...]))
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return float(np.mean(p[np.arange(len(y)), y]))

    coeffs, ratios = released_mlb_coefficients(score(out["unimodal"]["x1"]), score(out["unimodal"]["x2"]),
                                               alpha=0.5, tanh_mode=tanh_mode, beta=beta, regression=False)
    np.testing.assert_allclose([mets["ratio_x1"], mets["ratio_x2"]], ratios, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], coeffs, rtol=1e-5)
    _assert_tree(grads, _apply(_mlb_reference_grads(handle, params, batch, False), released_mlb_owner, coeffs))


def test_mlb_regression_scores_with_mse_like_released():
    """Regression: ``Bias_Infusion_MLB_Reg`` compares the **MSE** of the unimodal outputs (the
    training loss itself stays L1); the L1 ratio would give other coefficients here."""
    _, info, _ = toy_data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    method, handle, params, batch, _ = build({"name": "mlb", "alpha": 0.5, "beta": 10.0}, info=rinfo)
    out = handle.train_model(params)({m: batch[m] for m in NAMES})
    u1, u2 = (np.asarray(out["unimodal"][m][:, 0], np.float64) for m in NAMES)
    # Labels nearer modality 1's outputs than modality 2's, with errors of uneven size: here the
    # MSE ratio is about 3, the L1 ratio about 1.7.
    y = 0.6 * u1 + 0.4 * u2 + 0.3 * np.linspace(-1.0, 1.0, len(u1)) ** 3
    batch = dict(batch, label=jnp.asarray(y, jnp.float32), mask=jnp.ones_like(batch["mask"]))
    y = np.asarray(batch["label"], np.float64)
    grads, _, _, _, mets = _step(method, handle, params, batch, {})

    mse = [float(np.mean((u - y) ** 2)) for u in (u1, u2)]  # F.mse_loss(out.squeeze(), label)
    coeffs, ratios = released_mlb_coefficients(*mse, alpha=0.5, tanh_mode="2", beta=10.0, regression=True)
    l1_coeffs, _ = released_mlb_coefficients(*[float(np.mean(np.abs(u - y))) for u in (u1, u2)], alpha=0.5,
                                             tanh_mode="2", beta=10.0, regression=True)
    assert np.max(np.abs(np.subtract(coeffs, l1_coeffs))) > 1.0  # the test tells MSE from L1
    np.testing.assert_allclose([mets["ratio_x1"], mets["ratio_x2"]], ratios, rtol=1e-4)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], coeffs, rtol=1e-4)
    _assert_tree(grads, _apply(_mlb_reference_grads(handle, params, batch, True), released_mlb_owner, coeffs),
                 rtol=1e-4, atol=1e-6)
