"""Golden tests: MMCosine and MMPareto against transcriptions of the authors' released training steps.

- MMCosine: ``GeWu-Lab/MMCosine_ICASSP23``, ``main_CD.py`` (``train_epoch`` with ``--mmcosine True``
  and ``valid``), ``models/fusion_modules.py`` (``ConcatFusion``: one ``fc_out`` on ``cat(a, v)``).
- MMPareto: ``GeWu-Lab/MMPareto_ICML2024``, ``code/MMPareto.py`` (``train_epoch``) and
  ``code/min_norm_solvers.py`` (``MinNormSolver.find_min_norm_element`` for two vectors).

The references below are written from that PyTorch code, step by step, in plain JAX / NumPy (the
model's forward pass is the only piece of this library they use); they do not import the methods'
helpers. Each method's ``gradients`` output is compared with them leaf by leaf.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.method_setup import build


def _leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), np.asarray(x, np.float64)) for p, x in flat]


def _assert_trees_close(got, want, rtol=2e-4):
    for (path, g), (wpath, w) in zip(_leaves(got), _leaves(want), strict=True):
        assert path == wpath
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(w).max())), err_msg=path)


def _replace(params, updates):
    """A copy of ``params`` with ``{keystr: new array}`` substituted."""
    return jax.tree_util.tree_map_with_path(lambda p, x: updates.get(jax.tree_util.keystr(p), x), params)


def _cross_entropy(logits, label):  # nn.CrossEntropyLoss(): the batch mean
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))


# ---- MMCosine --------------------------------------------------------------------------------


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


# ---- MMPareto --------------------------------------------------------------------------------

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
