"""MLB tests: coefficients and per-modality gradient scaling against NumPy, and the released update rule.

Golden reference: ``kkontras/MCR`` ``agents/general_agent/helpers/Bias_Infusion.py`` (identical in
``kkontras/MLB``), classes ``Bias_Infusion_MLB`` (classification: batch-mean true-class probability)
and ``Bias_Infusion_MLB_Reg`` (regression: ``F.mse_loss`` of each unimodal output), coefficients
``1 + tanh(α(r−1))`` or, with ``tanh_mode "2"``, ``1 + (β−1) tanh(α(r−1))`` for ``r > 1``; they multiply
the gradients of ``enc_m`` (encoder and its unimodal classifier) and ``fc_m_lin.weight`` (the
linear-fusion branch), not the fusion bias. The tiny model's parameter tree maps onto the released
names as ``encoders/m`` + ``heads/m`` -> ``enc_m`` and ``fusion/branches/m`` -> ``fc_m_lin.weight``.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.mlb import mlb_coefficients, mlb_ratios
from tests.helpers.method_checks import NAMES
from tests.helpers.method_checks import apply_coefficients as _apply
from tests.helpers.method_checks import assert_leaves_close as _assert_tree
from tests.helpers.method_checks import assert_scaled as _assert_scaled
from tests.helpers.method_checks import cached_gradients as _grads
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_checks import step_gradients as _step
from tests.helpers.method_setup import build, toy_data
from tests.helpers.method_setup import build_with_fusion_bias as _setup
from tests.helpers.numpy_refs import softmax as _softmax

_data = toy_data


# ---- coefficients and per-modality gradient scaling, against NumPy -------------------------------


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
    for bad, msg in [({"beta": 0.0}, "beta"), ({"gamma": 1.0}, "unknown method 'mlb' options")]:
        with pytest.raises(ValueError, match=msg):
            get_method(ml_collections.ConfigDict({"name": "mlb", **bad}), info)


# ---- golden: the released Bias_Infusion_MLB / Bias_Infusion_MLB_Reg ------------------------------


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
