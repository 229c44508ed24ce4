"""AGM tests: Shapley responses, coefficients and running means against NumPy, and the released training step.

Golden reference: ``lihong2303/AGM_ICCV2023``, ``run/CREMAD_main.py`` (``train``: scores,
coefficients, running means, window, gradient clipping) and ``model/CREMAD_net.py`` (``GradMod``:
the counterfactual passes and the backward hooks that scale each modality's output gradient),
transcribed step by step in plain JAX / NumPy (the model's forward pass is the only piece of this
library it uses; it does not import the method's helpers), and compared with ``gradients`` leaf by leaf.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.agm import agm_coefficients, shapley_responses
from tests.helpers.method_checks import NAMES
from tests.helpers.method_checks import advance_to_epoch as _advance_to_epoch
from tests.helpers.method_checks import assert_trees_close as _assert_trees_close
from tests.helpers.method_checks import cached_gradients as _grads
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_checks import jit_gradients as _jit_gradients
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_setup import build
from tests.helpers.method_setup import build_with_fusion_bias as _setup
from tests.helpers.method_setup import toy_data as _data

# ---- Shapley responses, coefficients, scores and running means, against NumPy --------------------


def test_shapley_responses_match_the_permutation_definition():
    rng = np.random.default_rng(0)
    names = ("a", "b", "c")
    z = {m: rng.normal(size=(4, 3)) for m in names}
    z0 = {m: rng.normal(size=(4, 3)) for m in names}
    w = {m: rng.normal(size=(3, 2)) for m in names}

    def fuse(lat):  # non-additive, so the weights matter
        lin = sum(np.asarray(lat[m]) @ w[m] for m in names)
        return np.tanh(lin) + np.asarray(lat["a"])[:, :2] * np.asarray(lat["b"])[:, 1:]

    def value(coalition):
        return fuse({m: z[m] if m in coalition else z0[m] for m in names})

    want = {m: 0.0 for m in names}
    for order in itertools.permutations(names):  # mean marginal contribution over all orderings
        for i, m in enumerate(order):
            want[m] = want[m] + (value(set(order[: i + 1])) - value(set(order[:i]))) / 6
    got = shapley_responses(fuse, z, z0, names)
    for m in names:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-10)
    np.testing.assert_allclose(sum(got.values()), value(set(names)) - value(set()), rtol=1e-10)


def test_agm_coefficients():
    s, mean = np.array([1.0, 2.0]), np.array([1.5, 1.5])
    r, r_mean = np.exp([s[1] - s[0], s[0] - s[1]]), np.array([1.0, 1.0])
    np.testing.assert_allclose(agm_coefficients(jnp.asarray(s), jnp.asarray(mean), 3.0),
                               np.exp(3.0 * (r_mean - r)), rtol=1e-5)
    s3, m3 = np.array([1.0, 2.0, 0.5]), np.array([1.2, 1.4, 1.0])

    def ratios(v):
        return np.exp([np.mean(np.delete(v, i)) - v[i] for i in range(3)])

    np.testing.assert_allclose(agm_coefficients(jnp.asarray(s3), jnp.asarray(m3), 0.5),
                               np.exp(0.5 * (ratios(m3) - ratios(s3))), rtol=1e-5)
    # the gap is capped: a modality far behind its usual ratio is accelerated by at most exp(α·max_gap)
    np.testing.assert_allclose(agm_coefficients(jnp.asarray([5.0, 0.0]), jnp.asarray([0.0, 5.0]), 1.0, 2.0)[0],
                               math.exp(2.0), rtol=1e-5)


def test_agm_gradients_and_running_average():
    # The full gradient rule (routing through the modality outputs, clipping, window) is checked
    # against the released code below (test_agm_matches_the_released_training_step); here: scores,
    # coefficients, state.
    method, handle, params, batch = _setup({"name": "agm", "clip_norm": 0.0})
    joint = _reference_grads("joint", handle, params, batch)
    # NumPy scores: the original's modality outputs φ_m + f(0,0)/2 of the eval-mode model, CE vs labels.
    model = handle.eval_model(params)
    z = model.encode(_inputs(batch))
    z0 = model.encode({m: jnp.zeros_like(batch[m]) for m in NAMES})
    f = {(a, v): np.asarray(model.fuse({"x1": z["x1"] if a else z0["x1"], "x2": z["x2"] if v else z0["x2"]}),
                            np.float64) for a in (0, 1) for v in (0, 1)}
    outs = [0.5 * (f[1, 1] - f[0, 1] + f[1, 0]), 0.5 * (f[1, 1] - f[1, 0] + f[0, 1])]
    y = np.asarray(batch["label"])
    s = np.array([_ce(p, y) for p in outs])
    r = np.exp([s[1] - s[0], s[0] - s[1]])
    # First step: the running means are still 0 (reference ratio 1), and are updated after k is formed.
    first, _, _, s1, mets = _grads(method, handle, params, batch, method.init_method_state(params))
    k = np.exp(3.0 * (1.0 - r))
    assert int(s1["count"]) == 1
    np.testing.assert_allclose(s1["score_mean"], s, rtol=1e-5)
    np.testing.assert_allclose([mets["score_x1"], mets["score_x2"]], s, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-4)
    np.testing.assert_allclose(s1["scale"], k, rtol=1e-4)
    # the shared bias enters every coalition alike: its gradient is scaled by the mean coefficient
    np.testing.assert_allclose(first["fusion"]["bias"], np.mean(k) * joint["fusion"]["bias"], rtol=1e-4, atol=1e-7)
    # A later step: k = exp(α (r̃ − r)) with r̃ from the previous means, then the cumulative mean.
    state = dict(method.init_method_state(params), count=jnp.asarray(3, jnp.int32),
                 score_mean=jnp.asarray([1.2, 2.5], jnp.float32))
    grads, _, _, new_state, mets = _grads(method, handle, params, batch, state)
    r_mean = np.exp([2.5 - 1.2, 1.2 - 2.5])
    k = np.exp(3.0 * np.minimum(r_mean - r, 10.0))
    assert int(new_state["count"]) == 4
    np.testing.assert_allclose(new_state["score_mean"], (3 * np.array([1.2, 2.5]) + s) / 4, rtol=1e-5)
    np.testing.assert_allclose([mets["coeff_x1"], mets["coeff_x2"]], k, rtol=1e-4)
    np.testing.assert_allclose(grads["fusion"]["bias"], np.mean(k) * joint["fusion"]["bias"], rtol=1e-4, atol=1e-7)


def test_agm_regression_with_a_non_separable_fusion():
    _, info, batch = _data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    method, handle, params, _ = _setup({"name": "agm"}, fusion="concat_mlp", info=rinfo)
    rbatch = dict(batch, label=jnp.linspace(-3.0, 3.0, 16))
    state = dict(method.init_method_state(params), count=jnp.asarray(2, jnp.int32),
                 score_mean=jnp.asarray([1.0, 2.0], jnp.float32))
    grads, _, _, new_state, mets = _grads(method, handle, params, rbatch, state)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in mets.values()) and int(new_state["count"]) == 3
    assert all(float(mets[f"score_{m}"]) > 0 for m in NAMES)


# ---- golden: the released training step (GradMod's backward hooks, clipping, window) -------------


def _with_random_biases(params, seed=0):
    """Non-zero biases everywhere: encoders then map a zero input to a non-zero latent, and the
    fusion bias is non-zero, so the empty-coalition output f(0, 0) is not zero."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if not jax.tree_util.keystr(path).endswith("['bias']"):
            return x
        return jnp.asarray(rng.normal(scale=0.5, size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


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
        grads, kw, _, new_state, mets = step(params, b, key, state, epoch=epoch)
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
    inside = step(params, batch, jax.random.PRNGKey(0), _advance_to_epoch(method, far, 2), epoch=2)
    k = np.array([inside[4]["coeff_x1"], inside[4]["coeff_x2"]])
    assert k.max() > 100.0  # not clipped: the fusion gradient of the boosted modality is huge
    g = np.asarray(inside[0]["fusion"]["branches"]["x2"]["kernel"])
    assert np.abs(g).max() > 1.0
    after = step(params, batch, jax.random.PRNGKey(0), _advance_to_epoch(method, dict(inside[3]), 3), epoch=3)
    assert float(after[4]["coeff_x1"]) == float(after[4]["coeff_x2"]) == 1.0
    _assert_trees_close(after[0], joint_grads)
