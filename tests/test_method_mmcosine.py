"""MMCosine tests: cosine logits and their gradients against NumPy, and the released training step and evaluation.

Golden reference: ``GeWu-Lab/MMCosine_ICASSP23``, ``main_CD.py`` (``train_epoch`` with
``--mmcosine True`` and ``valid``), ``models/fusion_modules.py`` (``ConcatFusion``: one ``fc_out`` on
``cat(a, v)``), transcribed step by step in plain JAX / NumPy (the model's forward pass is the only
piece of this library it uses; it does not import the method's helpers).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.methods import get_method
from tests.helpers.method_checks import abs_sum as _abs_sum
from tests.helpers.method_checks import assert_trees_close as _assert_trees_close
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_checks import cross_entropy as _cross_entropy
from tests.helpers.method_checks import f64 as _np
from tests.helpers.method_checks import replace_leaves as _replace
from tests.helpers.method_checks import step_gradients as _grads
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data
from tests.helpers.method_setup import toy_regression_info as _regression_info

_setup = build


# ---- cosine logits, their loss and gradients, against NumPy --------------------------------------


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
    with pytest.raises(ValueError, match="unknown method 'mmcosine' options"):
        get_method(ml_collections.ConfigDict({"name": "mmcosine", "scaling": 10}), info)


# ---- golden: the released training step and evaluation -------------------------------------------


def _f_normalize(x, dim):
    """``torch.nn.functional.normalize(x, dim=dim)``: ``x / max(||x||_2, 1e-12)``."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=dim, keepdims=True)), 1e-12)


class OriginalMMCosine:
    """``main_CD.py`` with ``--mmcosine True --fusion_method concat`` (``--lam 0``: no NCE term).

    ``ConcatFusion.fc_out.weight`` (``[C, D_a + D_v]``) is this model's two branch kernels, transposed
    and concatenated; the release slices it at its feature size (512), here at ``D_a``."""

    def __init__(self, handle, *, scaling):
        self.handle, self.scaling = handle, scaling
        self.grad = jax.jit(jax.value_and_grad(self._train_loss))

    @staticmethod
    def fc_out(params):
        br = params["fusion"]["branches"]
        return jnp.concatenate([br["x1"]["kernel"].T, br["x2"]["kernel"].T], axis=1), params["fusion"]["bias"]

    def _cosine_outputs(self, params, a, v):
        weight, _ = self.fc_out(params)
        d = a.shape[1]
        out_a = jnp.matmul(_f_normalize(a, 1), _f_normalize(jnp.transpose(weight[:, :d], (1, 0)), 0))
        out_v = jnp.matmul(_f_normalize(v, 1), _f_normalize(jnp.transpose(weight[:, d:], (1, 0)), 0))
        return out_a * self.scaling, out_v * self.scaling

    def _train_loss(self, params, batch):
        model = self.handle.train_model(params)  # model.train()
        latents = model.encode({"x1": batch["x1"], "x2": batch["x2"]})
        a, v = latents["x1"], latents["x2"]
        out_a, out_v = self._cosine_outputs(params, a, v)
        out = out_a + out_v  # line 118: the model's own (linear) ``out`` is replaced
        return _cross_entropy(out, batch["label"])  # + args.lam * nce_loss, lam = 0

    def valid(self, params, batch):
        """``valid``: fused prediction = the model's ``out`` = fc_out(cat(a, v)); unimodal = the cosines."""
        model = self.handle.eval_model(params)  # model.eval()
        latents = model.encode({"x1": batch["x1"], "x2": batch["x2"]})
        a, v = latents["x1"], latents["x2"]
        weight, bias = self.fc_out(params)
        out = jnp.concatenate([a, v], axis=1) @ weight.T + bias[None, :]  # nn.Linear
        out_a, out_v = self._cosine_outputs(params, a, v)
        return out, out_a, out_v


@pytest.fixture(scope="module")
def mmcosine_setup():
    method, handle, params, batch, _ = build({"name": "mmcosine", "scale": 7.0})
    # unequal class-weight norms and a non-zero fusion bias: cosine and linear logits then differ
    br = params["fusion"]["branches"]
    params = _replace(params, {
        "['fusion']['branches']['x1']['kernel']": br["x1"]["kernel"] * jnp.linspace(0.5, 3.0, 5)[None],
        "['fusion']['bias']": jnp.linspace(-1.0, 1.0, 5)})
    step = jax.jit(lambda p, b: method.gradients(handle, p, b, jax.random.PRNGKey(0), {}))
    return method, handle, params, batch, step


def test_mmcosine_matches_the_released_training_step(mmcosine_setup):
    method, handle, params, batch, step = mmcosine_setup
    assert bool(jnp.all(batch["mask"] == 1))
    ref = OriginalMMCosine(handle, scaling=7.0)
    for b in (batch, dict(batch, x1=batch["x1"] * 4.0, x2=batch["x2"] * 0.25)):
        grads, kw, _, _, mets = step(params, b)
        want_loss, want = ref.grad(params, b)
        assert kw == {}
        np.testing.assert_allclose(mets["loss"], want_loss, rtol=1e-5)
        _assert_trees_close(grads, want)
    # fc_out.bias and the (absent in the original) unimodal heads get no gradient
    assert float(jnp.abs(grads["fusion"]["bias"]).sum()) == 0.0
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(grads["heads"]))


@pytest.mark.parametrize("eval_logits", [None, "cosine", "linear"], ids=["default", "cosine", "linear"])
def test_mmcosine_evaluation_outputs(mmcosine_setup, eval_logits):
    """Unimodal outputs are the cosine branches (as ``valid``); the fused prediction is the cosine sum
    (the default, as the MCR authors' port) or the plain linear head (``"linear"``, the released ``valid``)."""
    _, handle, params, batch, _ = mmcosine_setup
    cfg = {"name": "mmcosine", "scale": 7.0}
    if eval_logits is not None:
        cfg["eval_logits"] = eval_logits
    method = build(cfg)[0]
    linear, out_a, out_v = OriginalMMCosine(handle, scaling=7.0).valid(params, batch)
    model = handle.eval_model(params)
    got = method.predict(model, batch)
    np.testing.assert_allclose(got["unimodal"]["x1"], out_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["unimodal"]["x2"], out_v, rtol=1e-5, atol=1e-5)
    want = linear if eval_logits == "linear" else out_a + out_v
    np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(linear, out_a + out_v, atol=1e-2)  # the two choices do differ here
    # the MIPD diagnostic's fusion function agrees with the prediction
    np.testing.assert_allclose(method.fuse(model, got["latents"]), got["logits"], rtol=1e-5, atol=1e-5)


def test_mmcosine_rejects_unknown_eval_logits():
    with pytest.raises(ValueError, match="eval_logits"):
        build({"name": "mmcosine", "eval_logits": "bias"})
