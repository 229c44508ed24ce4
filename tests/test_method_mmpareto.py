"""MMPareto tests: the Pareto integration of gradients against NumPy, and the released training step.

Golden reference: ``GeWu-Lab/MMPareto_ICML2024``, ``code/MMPareto.py`` (``train_epoch``) and
``code/min_norm_solvers.py`` (``MinNormSolver.find_min_norm_element`` for two vectors), transcribed
step by step in plain JAX / NumPy (the model's forward pass is the only piece of this library it
uses; it does not import the method's helpers), and compared with ``gradients`` leaf by leaf.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mcr_jax.methods import get_method
from mcr_jax.methods.mmpareto import integrate, pareto_weights
from tests.helpers.method_checks import abs_sum as _abs_sum
from tests.helpers.method_checks import assert_trees_close as _assert_trees_close
from tests.helpers.method_checks import cross_entropy as _cross_entropy
from tests.helpers.method_checks import f64 as _np
from tests.helpers.method_checks import replace_leaves as _replace
from tests.helpers.method_checks import step_gradients as _grads
from tests.helpers.method_setup import build
from tests.helpers.method_setup import toy_data as _data

_setup = build


# ---- the Pareto integration and the model's gradients, against NumPy -----------------------------


def _min_norm_weight(g1, g2):
    """argmin over [0, 1] of ||a g1 + (1-a) g2|| by ternary search (the norm is convex in a)."""
    lo, hi = 0.0, 1.0
    norm = lambda a: np.linalg.norm(a * g1 + (1 - a) * g2)
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, m2) if norm(m1) <= norm(m2) else (m1, hi)
    return 0.5 * (lo + hi)


def _pareto_numpy(g_mm, g_u, gamma, scope):
    """MMPareto for one encoder given as lists of arrays."""
    f1, f2 = np.concatenate([x.ravel() for x in g_mm]), np.concatenate([x.ravel() for x in g_u])
    cos = f1 @ f2 / (np.linalg.norm(f1) * np.linalg.norm(f2))
    a = 0.5 if cos > 0 else _min_norm_weight(f1, f2)
    h = [2 * (a * x + (1 - a) * y) for x, y in zip(g_mm, g_u, strict=True)]
    s = [x + y for x, y in zip(g_mm, g_u, strict=True)]
    if scope == "encoder":
        r = np.sqrt(sum((x**2).sum() for x in s)) / np.sqrt(sum((x**2).sum() for x in h))
        return [gamma * max(r, 1.0) * x for x in h], a
    return [gamma * max(np.linalg.norm(y) / np.linalg.norm(x), 1.0) * x for x, y in zip(h, s, strict=True)], a


@pytest.mark.parametrize("scope", ["tensor", "encoder"])
@pytest.mark.parametrize("case", ["conflicting", "aligned"])
def test_mmpareto_integration_matches_numpy(case, scope):
    rng = np.random.default_rng(0)
    g_mm = [rng.normal(size=(3, 4)), rng.normal(size=(5,))]
    g_u = [rng.normal(size=(3, 4)) * 3.0, rng.normal(size=(5,)) * 3.0]
    sign = -1.0 if case == "conflicting" else 1.0
    g_u = [sign * (x + 2 * y) for x, y in zip(g_u, g_mm, strict=True)]
    want, a = _pareto_numpy(g_mm, g_u, 1.5, scope)
    got, mets = integrate([jnp.asarray(x) for x in g_mm], [jnp.asarray(x) for x in g_u], scale=1.5, scope=scope)
    assert (float(mets["cos"]) > 0) == (case == "aligned")
    np.testing.assert_allclose(mets["alpha_mm"], a, atol=1e-5)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    if case == "aligned":  # equal halves: h is the plain sum, scaled by gamma
        for x, u, v in zip(got, g_mm, g_u, strict=True):
            np.testing.assert_allclose(x, 1.5 * (u + v), rtol=1e-5)


def test_mmpareto_weights_degenerate_cases():
    zero = [jnp.zeros(3)]
    a_mm, a_u, cos = pareto_weights(zero, zero)  # the original's solver: <g1, g2> >= ||g1||^2 -> 0.999
    assert float(a_mm) == pytest.approx(0.999) and float(a_u) == pytest.approx(0.001, rel=1e-4) and float(cos) == 0.0
    out, _ = integrate(zero, zero, scale=1.5)
    assert float(jnp.abs(out[0]).sum()) == 0 and bool(jnp.all(jnp.isfinite(out[0])))
    g = [jnp.array([1.0, -2.0, 0.5])]  # a vanished unimodal gradient: weight 0.001, rescaled to gamma * g_mm
    a_mm, _, _ = pareto_weights(g, zero)
    assert float(a_mm) == pytest.approx(0.001)
    np.testing.assert_allclose(integrate(g, zero, scale=1.5)[0][0], 1.5 * g[0], rtol=1e-5)
    a_mm, _, _ = pareto_weights([jnp.array([1.0, 0.0])], [jnp.array([-1.0, 0.0])])  # opposite: g_mm + g_u = 0 at ½
    assert float(a_mm) == 0.5


def test_mmpareto_gradients_on_the_model():
    method, handle, params, batch, _ = _setup({"name": "mmpareto"})
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch)
    assert kwargs == {}

    def losses(p):
        out = method.forward(handle.train_model(p), batch)
        fused = optax.softmax_cross_entropy_with_integer_labels(out["logits"], batch["label"]).mean()
        uni = sum(optax.softmax_cross_entropy_with_integer_labels(out["unimodal"][m], batch["label"]).mean()
                  for m in method.modalities)
        return fused, uni

    g_mm = jax.grad(lambda p: losses(p)[0])(params)
    g_u = jax.grad(lambda p: losses(p)[1])(params)
    # every non-encoder parameter: the plain multi-loss gradient
    for part in ("heads", "fusion"):
        jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, a + b, rtol=1e-5, atol=1e-7),
                     grads[part], g_mm[part], g_u[part])
    for m in method.modalities:
        leaves_mm = [_np(x) for x in jax.tree.leaves(g_mm["encoders"][m])]
        leaves_u = [_np(x) for x in jax.tree.leaves(g_u["encoders"][m])]
        want, a = _pareto_numpy(leaves_mm, leaves_u, 1.5, "tensor")
        np.testing.assert_allclose(mets[f"alpha_mm_{m}"], a, atol=1e-4)
        for x, y in zip(jax.tree.leaves(grads["encoders"][m]), want, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert _abs_sum(grads["encoders"]) > 0
    with pytest.raises(ValueError, match="rescale_scope"):
        get_method(ml_collections.ConfigDict({"name": "mmpareto", "rescale_scope": "layer"}), _data()[1])


# ---- golden: the released training step (MinNormSolver for two vectors) --------------------------


_TORCH_MODULES = {("encoders", "x1"): "audio_net", ("encoders", "x2"): "visual_net",
                  ("heads", "x1"): "head_audio", ("heads", "x2"): "head_video"}


def _torch_name(path):
    """The ``named_parameters()`` name the original's ``AVClassifier`` (in ``DataParallel``) would give
    this leaf: encoders ``audio_net`` / ``visual_net``, unimodal heads ``head_audio`` / ``head_video``,
    the fusion head ``head``."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    module = _TORCH_MODULES.get(tuple(keys[:2]))
    rest = keys[2:] if module else keys[1:]
    return ".".join(["module", module or "head", *rest])


def _min_norm_element_from2(v1v1, v1v2, v2v2):
    if v1v2 >= v1v1:
        return 0.999, v1v1
    if v1v2 >= v2v2:
        return 0.001, v2v2
    gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
    return gamma, v2v2 + gamma * (v1v2 - v2v2)


def _find_min_norm_element(vecs):
    """``MinNormSolver.find_min_norm_element`` for two lists of tensors (``_min_norm_2d``, n < 3)."""
    dps, dmin, sol = {}, 1e8, None
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            dps[(i, j)] = sum(float(np.sum(vecs[i][k] * vecs[j][k])) for k in range(len(vecs[i])))
            dps[(j, i)] = dps[(i, j)]
            dps[(i, i)] = sum(float(np.sum(vecs[i][k] * vecs[i][k])) for k in range(len(vecs[i])))
            dps[(j, j)] = sum(float(np.sum(vecs[j][k] * vecs[j][k])) for k in range(len(vecs[i])))
            c, d = _min_norm_element_from2(dps[(i, i)], dps[(i, j)], dps[(j, j)])
            if d < dmin:
                dmin, sol = d, [(i, j), c, d]
    sol_vec = np.zeros(len(vecs))
    sol_vec[sol[0][0]] = sol[1]
    sol_vec[sol[0][1]] = 1 - sol[1]
    return sol_vec, sol[2]


def _cosine_similarity(x, y, eps=1e-8):  # F.cosine_similarity(x, y, dim=0); only its sign is used
    return float(x @ y) / max(float(np.linalg.norm(x) * np.linalg.norm(y)), eps)


class OriginalMMPareto:
    """One step of ``train_epoch`` in ``code/MMPareto.py`` (CREMA-D, ``gamma = 1.5``)."""

    def __init__(self, handle, gamma=1.5):
        self.handle, self.gamma = handle, gamma

        def losses(params, batch):
            out = handle.train_model(params)({"x1": batch["x1"], "x2": batch["x2"]})  # out, out_a, out_v
            return (_cross_entropy(out["logits"], batch["label"]),
                    _cross_entropy(out["unimodal"]["x1"], batch["label"]),
                    _cross_entropy(out["unimodal"]["x2"], batch["label"]))

        def all_grads(params, batch):
            per_loss = [jax.grad(lambda p, i=i: losses(p, batch)[i])(params) for i in range(3)]
            total = jax.grad(lambda p: sum(losses(p, batch)))(params)
            return per_loss, total

        self._grads = jax.jit(all_grads)

    def step(self, params, batch):
        per_loss, total = self._grads(params, batch)
        named = lambda tree: {_torch_name(p): np.asarray(x, np.float64)  # noqa: E731
                              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        per_loss = [named(g) for g in per_loss]
        param_grad = named(total)  # (loss_mm + loss_a + loss_v).backward()
        names = list(param_grad)
        record_names_audio, record_names_visual = [], []
        for name in names:
            if "head" in name:
                continue
            if "audio" in name:
                record_names_audio.append(name)
                continue
            if "visual" in name:
                record_names_visual.append(name)
                continue
        grads_audio, grads_visual = {}, {}
        for idx, loss_type in enumerate(["both", "audio", "visual"]):  # loss.backward(retain_graph=True)
            g = per_loss[idx]
            if loss_type in ("both", "audio"):
                grads_audio[loss_type] = {n: g[n] for n in record_names_audio}
                grads_audio[loss_type]["concat"] = np.concatenate([g[n].ravel() for n in record_names_audio])
            if loss_type in ("both", "visual"):
                grads_visual[loss_type] = {n: g[n] for n in record_names_visual}
                grads_visual[loss_type]["concat"] = np.concatenate([g[n].ravel() for n in record_names_visual])
        this_cos_audio = _cosine_similarity(grads_audio["both"]["concat"], grads_audio["audio"]["concat"])
        this_cos_visual = _cosine_similarity(grads_visual["both"]["concat"], grads_visual["visual"]["concat"])
        if this_cos_audio > 0:
            audio_k = [0.5, 0.5]
        else:
            audio_k, _ = _find_min_norm_element([list(grads_audio[t].values()) for t in ["both", "audio"]])
        if this_cos_visual > 0:
            visual_k = [0.5, 0.5]
        else:
            visual_k, _ = _find_min_norm_element([list(grads_visual[t].values()) for t in ["both", "visual"]])
        out = dict(param_grad)
        for name in names:
            layer = re.split("[_.]", name)
            if "head" in layer:
                continue
            for mod, k, grads in (("audio", audio_k, grads_audio), ("visual", visual_k, grads_visual)):
                if mod in layer:
                    three_norm = np.linalg.norm(param_grad[name])
                    new_grad = 2 * k[0] * grads["both"][name] + 2 * k[1] * grads[mod][name]
                    new_norm = np.linalg.norm(new_grad)
                    diff = three_norm / new_norm
                    out[name] = diff * new_grad * self.gamma if diff > 1 else new_grad * self.gamma
        tree = jax.tree_util.tree_map_with_path(lambda p, _: out[_torch_name(p)], total)
        return tree, {"cos": [this_cos_audio, this_cos_visual], "k_mm": [float(audio_k[0]), float(visual_k[0])]}


@pytest.fixture(scope="module")
def mmpareto_setup():
    method, handle, params, batch, _ = build({"name": "mmpareto"})
    step = jax.jit(lambda p, b: method.gradients(handle, p, b, jax.random.PRNGKey(0), {}))
    return method, handle, params, batch, step


def _scenarios(params):
    """Parameter sets that reach every branch of the rule (the initialisation alone already conflicts):
    ``aligned``: each unimodal head a positive multiple of its fusion branch, so each encoder's two
    gradients agree (equal halves); ``conflict``: a negative multiple, so they point against each other
    (the closed-form min-norm weights); ``vanished``: the fusion branch of x1 and the unimodal head of
    x2 zeroed, so x1's fused gradient and x2's unimodal gradient vanish (the solver's 0.999 and 0.001
    cases, where the rescale factor ``diff`` is ~500)."""
    br, heads = params["fusion"]["branches"], params["heads"]
    aligned = _replace(params, {f"['heads']['{m}']['kernel']": 3.0 * br[m]["kernel"] for m in ("x1", "x2")})
    conflict = _replace(params, {f"['heads']['{m}']['kernel']": -3.0 * br[m]["kernel"] for m in ("x1", "x2")})
    vanished = _replace(params, {"['fusion']['branches']['x1']['kernel']": jnp.zeros_like(br["x1"]["kernel"]),
                                 "['heads']['x2']['kernel']": jnp.zeros_like(heads["x2"]["kernel"])})
    return {"init": params, "aligned": aligned, "conflict": conflict, "vanished": vanished}


def test_mmpareto_matches_the_released_training_step(mmpareto_setup):
    method, handle, params, batch, step = mmpareto_setup
    assert bool(jnp.all(batch["mask"] == 1))
    ref = OriginalMMPareto(handle, gamma=1.5)
    seen = {}
    for label, p in _scenarios(params).items():
        grads, kw, _, _, mets = step(p, batch)
        want, info = ref.step(p, batch)
        assert kw == {}
        _assert_trees_close(grads, want)
        for i, m in enumerate(("x1", "x2")):
            np.testing.assert_allclose(mets[f"alpha_mm_{m}"], info["k_mm"][i], rtol=1e-4, atol=1e-6)
            assert (float(mets[f"cos_{m}"]) > 0) == (info["cos"][i] > 0)
            seen[(label, m)] = info["k_mm"][i]
        assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["encoders"]))
    # every case of the original's rule was exercised
    assert seen[("aligned", "x1")] == seen[("aligned", "x2")] == 0.5
    assert all(0.001 < seen[("conflict", m)] < 0.999 and seen[("conflict", m)] != 0.5 for m in ("x1", "x2"))
    assert seen[("vanished", "x1")] == 0.999 and seen[("vanished", "x2")] == 0.001
