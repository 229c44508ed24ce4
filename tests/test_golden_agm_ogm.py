"""Golden tests: AGM and OGM-GE against transcriptions of the authors' released training steps.

- AGM: ``lihong2303/AGM_ICCV2023``, ``run/CREMAD_main.py`` (``train``: scores, coefficients, running
  means, window, gradient clipping) and ``model/CREMAD_net.py`` (``GradMod``: the counterfactual
  passes and the backward hooks that scale each modality's output gradient).
- OGM-GE: ``GeWu-Lab/OGM-GE_CVPR2022``, ``main.py`` (``train_epoch``).

The references below are written from that PyTorch code, step by step, in plain JAX / NumPy (the
model's forward pass is the only piece of this library they use); they do not import the
methods' helpers. Each method's ``gradients`` output is compared with them leaf by leaf.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import ModelHandle, get_method
from mcr_jax.models import MultimodalModel
from tests.method_setup import build


def _leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), np.asarray(x, np.float64)) for p, x in flat]


def _assert_trees_close(got, want, rtol=2e-4):
    for (path, g), (wpath, w) in zip(_leaves(got), _leaves(want), strict=True):
        assert path == wpath
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(w).max())), err_msg=path)


def _with_random_biases(params, seed=0):
    """Non-zero biases everywhere: encoders then map a zero input to a non-zero latent, and the
    fusion bias is non-zero, so the empty-coalition output f(0, 0) is not zero."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if not jax.tree_util.keystr(path).endswith("['bias']"):
            return x
        return jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _jit_gradients(method, handle):
    return jax.jit(lambda p, b, k, s: method.gradients(handle, p, b, k, s))


def _advance_to_epoch(method, state, epoch):
    """The trainer's epoch hook, called after each finished epoch (1-based) until ``epoch`` starts."""
    for finished in range(1, epoch):
        state = method.on_epoch_end(finished, {}, state, None)
    return state


# ---- AGM -------------------------------------------------------------------------------------


@jax.custom_vjp
def _backward_hook(x, scale):
    """``Modality_out`` with its full backward hook: identity forward, gradient × scale backward."""
    return x


def _backward_hook_fwd(x, scale):
    return x, scale


def _backward_hook_bwd(scale, g):
    return g * scale, jnp.zeros_like(scale)


_backward_hook.defvjp(_backward_hook_fwd, _backward_hook_bwd)


class OriginalAGM:
    """One training step of the released AGM code (CREMA-D, late fusion, ``methods == "AGM"``).

    State as in ``run/CREMAD_main.py``: ``train_score_a/v`` (the running means, 0.0 before the first
    step, carried across epochs), the global ``iteration`` counter and ``GradMod.scale_a/v`` (1.0
    until ``update_scale`` is first called, then whatever was set last).
    """

    def __init__(self, handle, *, alpha, modulation_starts=0, modulation_ends=20):
        self.handle, self.alpha = handle, alpha
        self.starts, self.ends = modulation_starts, modulation_ends
        self.train_score = [0.0, 0.0]
        self.scale = [1.0, 1.0]
        self.iteration = 0
        self._grad = jax.jit(jax.value_and_grad(self._loss, has_aux=True))

    def _loss(self, params, scale, batch):
        train, evaluation = self.handle.train_model(params), self.handle.eval_model(params)

        def net(model, audio, visual):  # AVClassifier.forward: encoders + ConcatFusion (one linear layer)
            return model.fuse(model.encode({"x1": audio, "x2": visual}))

        a, v = batch["x1"], batch["x2"]
        total_out = net(train, a, v)                               # training mode, with gradient
        pad_visual_out = net(evaluation, a, jnp.zeros_like(v))     # self.net.eval(), still with gradient
        pad_audio_out = net(evaluation, jnp.zeros_like(a), v)
        m_a = _backward_hook(0.5 * (total_out - pad_audio_out + pad_visual_out), scale[0])  # Modality_Audio
        m_v = _backward_hook(0.5 * (total_out - pad_visual_out + pad_audio_out), scale[1])  # Modality_Visual
        out = m_a + m_v
        logp = jax.nn.log_softmax(out, axis=-1)
        loss = -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))  # nn.CrossEntropyLoss
        return loss, (m_a, m_v)

    @staticmethod
    def _score(out, label):
        p = np.exp(out - out.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        total = 0.0
        for k in range(out.shape[0]):
            pk = p[k, label[k]]
            total += -math.log(1e-8) if (pk < 1e-8 or np.isinf(np.log(pk))) else -math.log(pk)
        return total / out.shape[0]

    def step(self, params, batch, epoch):
        self.iteration += 1
        it = self.iteration
        # The forward pass runs before the scale is updated; the backward pass reads the new scale.
        (loss, (m_a, m_v)), _ = self._grad(params, jnp.asarray(self.scale, jnp.float32), batch)
        label = np.asarray(batch["label"])
        score_audio = self._score(np.asarray(m_a, np.float64), label)
        score_visual = self._score(np.asarray(m_v, np.float64), label)
        ratio_a = math.exp(score_visual - score_audio)
        ratio_v = math.exp(score_audio - score_visual)
        optimal_ratio_a = math.exp(self.train_score[1] - self.train_score[0])
        optimal_ratio_v = math.exp(self.train_score[0] - self.train_score[1])
        coeff_a = math.exp(self.alpha * min(optimal_ratio_a - ratio_a, 10))
        coeff_v = math.exp(self.alpha * min(optimal_ratio_v - ratio_v, 10))
        self.train_score = [self.train_score[0] * (it - 1) / it + score_audio / it,
                            self.train_score[1] * (it - 1) / it + score_visual / it]
        if self.starts <= epoch <= self.ends:
            self.scale = [coeff_a, coeff_v]               # model.update_scale(coeff_a, coeff_v)
        _, grads = self._grad(params, jnp.asarray(self.scale, jnp.float32), batch)  # loss.backward()
        # late fusion: clip the global norm to 1 when any fc_out.weight gradient leaves [-1, 1]
        fc_out = np.concatenate([np.asarray(grads["fusion"]["branches"][m]["kernel"]) for m in ("x1", "x2")])
        clipped = bool(fc_out.max() > 1 or fc_out.min() < -1)
        if clipped:  # nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0), PyTorch 1.12
            total_norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads)))
            coef = min(1.0 / (total_norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef, grads)
        return grads, {"scores": [score_audio, score_visual], "scale": list(self.scale), "clipped": clipped,
                       "loss": float(loss)}


def test_agm_matches_the_released_training_step():
    """Several steps (in the window, with clipping and without, after the window) vs the original."""
    method, handle, params, batch, _ = build({"name": "agm", "alpha": 1.0})
    params = _with_random_biases(params)
    assert bool(jnp.all(batch["mask"] == 1))
    step = _jit_gradients(method, handle)
    ref = OriginalAGM(handle, alpha=1.0)
    batches = [batch, dict(batch, x1=batch["x1"] * 3.0), dict(batch, x2=batch["x2"] * 0.3), batch]
    state = method.init_method_state(params)
    clipped, key = [], jax.random.PRNGKey(0)

    def check(b, epoch, state):
        grads, kw, _, new_state, mets = step(params, b, key, state)
        want, info = ref.step(params, b, epoch)
        assert kw == {}
        np.testing.assert_allclose([mets["score_x1"], mets["score_x2"]], info["scores"], rtol=1e-5)
        np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], info["scale"], rtol=2e-4)
        np.testing.assert_allclose(mets["loss"], info["loss"], rtol=1e-5)
        np.testing.assert_allclose(new_state["score_mean"], ref.train_score, rtol=1e-5)
        _assert_trees_close(grads, want)
        clipped.append(info["clipped"])
        return new_state

    for b in batches:  # epoch 1: inside the default window (epochs 1..20)
        state = check(b, 1, state)
    assert ref.scale[0] != pytest.approx(1.0)  # the very first steps already modulate
    # A modality far above its running mean: the exponent hits the cap 10, clipping must act.
    far = [ref.train_score[0] + 6.0, ref.train_score[1] - 6.0]
    ref.train_score = far
    state = check(batches[0], 1, dict(state, score_mean=jnp.asarray(far, jnp.float32)))
    assert max(ref.scale) == pytest.approx(math.exp(10.0), rel=1e-6)
    # After the window (epoch 21 onwards) the last coefficients stay in GradMod's hooks.
    state = _advance_to_epoch(method, state, 21)
    held = list(ref.scale)
    for b in batches[1:3]:
        state = check(b, 21, state)
    assert ref.scale == held
    assert any(clipped) and not all(clipped), clipped  # both branches of the clipping rule were exercised


def test_agm_options_window_off_and_no_clipping():
    """``after_window="off"`` drops the modulation outside the window; ``clip_norm=0`` never clips."""
    method, handle, params, batch, _ = build({"name": "agm", "alpha": 1.0, "after_window": "off", "clip_norm": 0.0,
                                              "start_epoch": 2, "end_epoch": 2})
    step = _jit_gradients(method, handle)
    joint = get_method(ml_collections.ConfigDict({"name": "joint"}), method.info)
    joint_grads = _jit_gradients(joint, handle)(params, batch, jax.random.PRNGKey(0), {})[0]
    state = method.init_method_state(params)
    far = dict(state, score_mean=jnp.asarray([5.0, 0.0], jnp.float32))
    before = step(params, batch, jax.random.PRNGKey(0), far)  # epoch 1: before the window
    _assert_trees_close(before[0], joint_grads)
    inside = step(params, batch, jax.random.PRNGKey(0), _advance_to_epoch(method, far, 2))
    k = np.array([inside[4]["coeff_x1"], inside[4]["coeff_x2"]])
    assert k.max() > 100.0  # not clipped: the fusion gradient of the boosted modality is huge
    g = np.asarray(inside[0]["fusion"]["branches"]["x2"]["kernel"])
    assert np.abs(g).max() > 1.0
    after = step(params, batch, jax.random.PRNGKey(0), _advance_to_epoch(method, dict(inside[3]), 3))
    assert float(after[4]["coeff_x1"]) == float(after[4]["coeff_x2"]) == 1.0
    _assert_trees_close(after[0], joint_grads)


# ---- OGM-GE ----------------------------------------------------------------------------------

CNN = {"kind": "resnet18", "widths": (4, 4, 4, 4), "blocks": (1, 1, 1, 1)}


def _cnn_setup(method_cfg):
    """A tiny two-ResNet audio-visual model (as the original's CREMA-D model) and one batch."""
    info = DatasetInfo(name="toy_av", modalities=("audio", "visual"),
                       input_shapes={"audio": (16, 16), "visual": (16, 16, 3)}, num_classes=4)
    model = MultimodalModel(info.modalities, {"audio": dict(CNN, in_channels=1), "visual": dict(CNN, in_channels=3)},
                            num_classes=4, rngs=nnx.Rngs(params=0, dropout=1))
    method = get_method(ml_collections.ConfigDict(method_cfg), info)
    method.check_model(model)
    model.eval()
    gd_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    handle = ModelHandle(gd, gd_eval, nnx.as_pure(rest))
    params = nnx.as_pure(params)
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
        grads, kw, _, _, mets = step(params, batch, jax.random.PRNGKey(epoch), state)
        assert kw == {}
        want_k = coeffs if inside else (1.0, 1.0)
        np.testing.assert_allclose([mets["coeff_audio"], mets["coeff_visual"]], want_k, rtol=1e-5)
        standardised, n_noised, n_kernels = [], 0, sum(_modulated(path, r) >= 0 for path, r in _leaves(joint))
        for (path, g), (_, r) in zip(_leaves(grads), _leaves(joint), strict=True):
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
