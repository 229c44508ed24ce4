"""OGM-GE tests: the coefficient rule and gradient scaling against NumPy, and the released training step.

Golden reference: ``GeWu-Lab/OGM-GE_CVPR2022``, ``main.py`` (``train_epoch``), transcribed step by
step in plain JAX / NumPy (the model's forward pass is the only piece of this library it uses; it
does not import the method's helpers), and compared with ``gradients`` leaf by leaf.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.ogm_ge import ge_noise, ogm_coefficients
from mcr_jax.models import MultimodalModel
from tests.helpers.method_checks import NAMES
from tests.helpers.method_checks import advance_to_epoch as _advance_to_epoch
from tests.helpers.method_checks import assert_scaled as _assert_scaled
from tests.helpers.method_checks import cached_gradients as _grads
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_checks import jit_gradients as _jit_gradients
from tests.helpers.method_checks import leaves as _leaves
from tests.helpers.method_checks import owner as _owner
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_setup import bind, build
from tests.helpers.method_setup import build_with_fusion_bias as _setup
from tests.helpers.method_setup import toy_data as _data
from tests.helpers.numpy_refs import softmax as _softmax

# ---- the coefficient rule and the scaled gradients, against NumPy --------------------------------


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
    assert state == {}  # the epoch is the trainer's (ModelHandle.epoch)
    inside, _, _, _, mets = _grads(method, handle, params, batch, state, key=0, epoch=2)
    other_key = _grads(method, handle, params, batch, state, key=1, epoch=2)[0]
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
    after = _grads(method, handle, params, batch, state, epoch=3)[0]
    _assert_scaled(after, joint, [1.0, 1.0], ())


def _numpy_coefficients(handle, params, batch, alpha):
    """OGM's k_m in float64 NumPy: branch scores z_m W_m + b/2, summed true-class probabilities, ratio."""
    model = handle.train_model(params)
    out = model(_inputs(batch))
    branches = model.fusion.branch_logits(out["latents"])
    bias = np.asarray(model.fusion.bias[...], np.float64)
    y = np.asarray(batch["label"])
    s = [_softmax(np.asarray(branches[m], np.float64) + bias[None] / 2)[np.arange(len(y)), y].sum() for m in NAMES]
    return [1 - math.tanh(alpha * r) if r > 1 else 1.0 for r in (s[0] / s[1], s[1] / s[0])]


@pytest.mark.parametrize("epoch", [1, 2, 3, 5, 6, 40])
def test_the_window_follows_the_trainers_epoch(epoch):
    """The coefficients of (1-based) epoch e: the NumPy k_m inside ``start_epoch <= e <= end_epoch``
    (both ends inclusive), 1 outside; the same method state in every epoch."""
    method, handle, params, batch = _setup({"name": "ogm_ge", "ge": False, "start_epoch": 3, "end_epoch": 5,
                                           "alpha": 0.7})
    mets = _grads(method, handle, params, batch, method.init_method_state(params), epoch=epoch)[4]
    want = _numpy_coefficients(handle, params, batch, 0.7) if 3 <= epoch <= 5 else [1.0, 1.0]
    assert min(_numpy_coefficients(handle, params, batch, 0.7)) < 1.0
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], want, rtol=1e-5)


def test_ogm_refuses_what_it_cannot_do():
    _, info, _ = _data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    with pytest.raises(ValueError, match="classification only"):
        get_method(ml_collections.ConfigDict({"name": "ogm_ge"}), rinfo)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "ogm_ge"}, fusion="concat_mlp")
    with pytest.raises(ValueError, match="unknown method 'ogm_ge' options"):
        get_method(ml_collections.ConfigDict({"name": "ogm_ge", "beta": 1.0}), info)


# ---- golden: the released training step (a tiny two-ResNet audio-visual model) -------------------


CNN = {"kind": "resnet18", "widths": (4, 4, 4, 4), "blocks": (1, 1, 1, 1)}


def _cnn_setup(method_cfg):
    """A tiny two-ResNet audio-visual model (as the original's CREMA-D model) and one batch."""
    info = DatasetInfo(name="toy_av", modalities=("audio", "visual"),
                       input_shapes={"audio": (16, 16), "visual": (16, 16, 3)}, num_classes=4)
    model = MultimodalModel(info.modalities, {"audio": dict(CNN, in_channels=1), "visual": dict(CNN, in_channels=3)},
                            num_classes=4, rngs=nnx.Rngs(params=0, dropout=1))
    method = get_method(ml_collections.ConfigDict(method_cfg), info)
    handle, params = bind(method, model)
    params["fusion"]["bias"] = jnp.linspace(-1.0, 1.0, 4)
    rng = np.random.default_rng(0)
    batch = {"audio": jnp.asarray(rng.normal(size=(8, 16, 16)), jnp.float32),
             "visual": jnp.asarray(rng.normal(size=(8, 16, 16, 3)) * 2.0 + 0.5, jnp.float32),
             "label": jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3], jnp.int32), "mask": jnp.ones((8,), jnp.float32)}
    return method, handle, params, batch


def _original_ogm_grads(handle, params, batch):
    """``loss.backward()`` on the joint loss, plus the scores the original computes from the same pass."""

    def loss_fn(p):
        model = handle.train_model(p)
        latents = model.encode({m: batch[m] for m in ("audio", "visual")})
        out = model.fuse(latents)
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1)), latents

    (_, latents), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, latents


def _original_ogm_coefficients(params, latents, label, alpha):
    """``train_epoch``: out_a = a·W_a + b/2 (concat fusion), summed true-class softmax, Eq. (10)."""
    bias = np.asarray(params["fusion"]["bias"], np.float64)

    def score(m):
        out = np.asarray(latents[m], np.float64) @ np.asarray(params["fusion"]["branches"][m]["kernel"], np.float64)
        out = out + bias[None, :] / 2
        p = np.exp(out - out.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        return sum(p[i, label[i]] for i in range(out.shape[0]))

    score_a, score_v = score("audio"), score("visual")
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))
    return 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0


def _modulated(path, leaf):
    """The original's selection: ``'audio'``/``'visual'`` in the top-level module name and a 4-D gradient."""
    for i, m in enumerate(("audio", "visual")):
        if path.startswith(f"['encoders']['{m}']") and leaf.ndim == 4:
            return i
    return -1


@pytest.mark.parametrize("ge", [False, True], ids=["ogm", "ogm_ge"])
def test_ogm_ge_matches_the_released_training_step(ge):
    cfg = {"name": "ogm_ge"} if ge else {"name": "ogm_ge", "ge": False}
    method, handle, params, batch = _cnn_setup(cfg)
    step = _jit_gradients(method, handle)
    joint, latents = jax.jit(lambda p, b: _original_ogm_grads(handle, p, b))(params, batch)
    coeffs = _original_ogm_coefficients(params, latents, np.asarray(batch["label"]), alpha=1.0)
    assert min(coeffs) < 1.0
    state = method.init_method_state(params)
    # 1-based epochs 1 and 51 are the original's 0-based epochs 0 and 50 (modulation_starts/ends); 52 is not.
    for epoch, inside in [(1, True), (51, True), (52, False)]:
        state = _advance_to_epoch(method, method.init_method_state(params), epoch)
        grads, kw, _, _, mets = step(params, batch, jax.random.PRNGKey(epoch), state, epoch=epoch)
        assert kw == {}
        want_k = coeffs if inside else (1.0, 1.0)
        np.testing.assert_allclose([mets["coeff_audio"], mets["coeff_visual"]], want_k, rtol=1e-5)
        standardised, n_noised, n_kernels = [], 0, sum(_modulated(path, r) >= 0 for path, r in _leaves(joint))
        for (path, g), (_, r) in zip(_leaves(grads, np.float64), _leaves(joint, np.float64), strict=True):
            own = _modulated(path, r) if inside else -1
            if own < 0 or not ge:  # OGM: parms.grad *= coeff on the 4-D kernels; everything else untouched
                want = r * coeffs[own] if own >= 0 else r
                np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(r).max()), err_msg=path)
                continue
            # OGM-GE: grad * coeff + N(0, (std(grad) + 1e-8)^2), torch's std being the unbiased one
            z = (g - r * coeffs[own]) / (r.std(ddof=1) + 1e-8)
            if z.size >= 100:
                assert abs(z.std() - 1) < 0.35 and abs(z.mean()) < 0.35, path
            standardised.append(z.ravel())
            n_noised += 1
        if standardised:  # all noised entries together: a standard normal sample of ~2,600 values
            z = np.concatenate(standardised)
            assert abs(z.std() - 1) < 0.06 and abs(z.mean()) < 0.06, (z.size, z.mean(), z.std())
        assert n_kernels == 2 * 12  # per encoder: the stem, 2 per block, 3 shortcut convolutions
        assert n_noised == (n_kernels if (ge and inside) else 0)


def test_ge_noise_has_the_unbiased_std_of_each_small_tensor():
    """``ge_noise`` = (std(g, ddof 1) + 1e-8) · one standard normal draw cut into the modulated leaves
    (torch's ``Tensor.std`` is the unbiased one: on 3- and 5-entry tensors ddof 0 is 18 % / 11 % smaller)."""
    rng = np.random.default_rng(9)
    grads = {"a": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.asarray(rng.normal(size=(5, 1)),
             jnp.float32), "c": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    owners = {"a": 0, "b": 1, "c": -1}
    key = jax.random.PRNGKey(5)
    got = ge_noise(key, grads, owners)
    draw = np.asarray(jax.random.normal(key, (8,), jnp.float32), np.float64)  # the one draw: a's 3, then b's 5
    for name, sl in (("a", slice(0, 3)), ("b", slice(3, 8))):
        g = np.asarray(grads[name], np.float64)
        want = (g.std(ddof=1) + 1e-8) * draw[sl].reshape(g.shape)
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-5, err_msg=name)
    assert not np.asarray(got["c"]).any()


def test_ogm_modulate_modes_select_leaves():
    """``auto``: conv kernels of a CNN encoder, every leaf of an encoder without any; ``conv_kernels``
    refuses an encoder that has none."""
    from mcr_jax.methods.ogm_ge import modulated_owners

    params = {"encoders": {"a": {"conv": {"kernel": jnp.zeros((3, 3, 1, 2))}, "bn": {"scale": jnp.zeros((2,))}},
                           "b": {"dense": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros((2,))}}},
              "fusion": {"branches": {"a": {"kernel": jnp.zeros((2, 3))}, "b": {"kernel": jnp.zeros((2, 3))}},
                         "bias": jnp.zeros((3,))}}
    auto = modulated_owners(params, ("a", "b"), "auto")
    assert auto["encoders"]["a"] == {"conv": {"kernel": 0}, "bn": {"scale": -1}}
    assert auto["encoders"]["b"] == {"dense": {"kernel": 1, "bias": 1}}
    assert auto["fusion"]["branches"] == {"a": {"kernel": -1}, "b": {"kernel": -1}} and auto["fusion"]["bias"] == -1
    conv = modulated_owners(params, ("a", "b"), "conv_kernels")
    assert conv["encoders"]["a"]["conv"]["kernel"] == 0 and conv["encoders"]["b"]["dense"]["kernel"] == -1
    enc = modulated_owners(params, ("a", "b"), "encoder_and_branch")
    assert enc["encoders"]["a"]["bn"]["scale"] == 0 and enc["fusion"]["branches"]["b"]["kernel"] == 1
    with pytest.raises(ValueError, match="conv_kernels"):
        build({"name": "ogm_ge", "modulate": "conv_kernels"})  # the toy model's MLP encoders have no 4-D kernel
    _cnn_setup({"name": "ogm_ge", "modulate": "conv_kernels"})  # CNN encoders: accepted
