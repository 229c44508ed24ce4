"""Shared checks of the method tests: jitted gradient steps, plain NumPy / JAX reference maths, and
leaf-by-leaf comparisons of parameter trees (used by ``tests/test_method_*.py``)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcr_jax.methods import ModelHandle, get_method
from tests.helpers.method_setup import toy_data

NAMES = ("x1", "x2")  # the toy data's modalities
# where a modality's parameters sit in the toy model's parameter tree
PREFIX = {"encoders": "['encoders']", "heads": "['heads']", "branches": "['fusion']['branches']"}


# ---- running a method's gradient step ---------------------------------------------------------------


def at_epoch(handle, epoch):
    """A copy of ``handle`` whose current (1-based) epoch is ``epoch``, as the trainer's step gives it."""
    return ModelHandle(handle.graphdef_train, handle.graphdef_eval, handle.rest, handle.mesh,
                       epoch=jnp.asarray(epoch, jnp.int32))


def cached_gradients(method, handle, params, batch, state, key=0, epoch=1):
    """``method.gradients`` in epoch ``epoch`` under jit (compiled once per method instance and input shapes)."""
    if not hasattr(method, "_test_step"):
        method._test_step = jax.jit(lambda p, b, k, s, e: method.gradients(at_epoch(handle, e), p, b, k, s))
    return method._test_step(params, batch, jax.random.PRNGKey(key), state, jnp.int32(epoch))


def step_gradients(method, handle, params, batch, method_state=None, epoch=1):
    """One jitted ``method.gradients`` call with key 0 in epoch ``epoch`` (``method_state`` defaults
    to the initial one)."""
    ms = method.init_method_state(params) if method_state is None else method_state
    return jax.jit(lambda p, b, s, e: method.gradients(at_epoch(handle, e), p, b, jax.random.PRNGKey(0), s))(
        params, batch, ms, jnp.int32(epoch))


def jit_gradients(method, handle):
    """``(params, batch, key, state, epoch=1) -> method.gradients(...)`` in that (1-based) epoch, jitted."""
    step = jax.jit(lambda p, b, k, s, e: method.gradients(at_epoch(handle, e), p, b, k, s))
    return lambda p, b, k, s, epoch=1: step(p, b, k, s, jnp.int32(epoch))


def reference_gradients(name, handle, params, batch, **cfg):
    """The gradients of another (plain) method, e.g. ``"joint"``, on the same model and batch."""
    ref = get_method(ml_collections.ConfigDict({"name": name, **cfg}), toy_data()[1])
    return cached_gradients(ref, handle, params, batch, {})[0]


def advance_to_epoch(method, state, epoch):
    """The trainer's epoch hook, called after each finished epoch (1-based) until ``epoch`` starts
    (the epoch itself reaches the step through the handle: :func:`at_epoch`, ``epoch=`` above)."""
    for finished in range(1, epoch):
        state = method.on_epoch_end(finished, {}, state, None)
    return state


def inputs(batch):
    """The modality inputs of a toy batch."""
    return {m: batch[m] for m in NAMES}


# ---- reference maths ----------------------------------------------------------------------------------


def f64(x):
    return np.asarray(x, np.float64)


def log_softmax(x):
    x = f64(x)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ce(logits, labels):
    """Mean cross-entropy of integer ``labels`` under ``logits``, in float64 NumPy."""
    labels = np.asarray(labels)
    return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def cross_entropy(logits, label):
    """``nn.CrossEntropyLoss()`` in JAX (differentiable): the batch mean."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, label[:, None], axis=1))


# ---- parameter trees ------------------------------------------------------------------------------


def leaves(tree, dtype=None):
    """``[(keystr path, leaf as a NumPy array)]``, optionally cast to ``dtype``."""
    return [(jax.tree_util.keystr(p), np.asarray(x, dtype)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abs_sum(tree):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree))


def replace_leaves(params, updates):
    """A copy of ``params`` with ``{keystr: new array}`` substituted."""
    return jax.tree_util.tree_map_with_path(lambda p, x: updates.get(jax.tree_util.keystr(p), x), params)


def owner(path, parts):
    """Which modality's scaled group a parameter path belongs to (-1: none), read off the path."""
    for part in parts:
        for i, m in enumerate(NAMES):
            if path.startswith(f"{PREFIX[part]}['{m}']"):
                return i
    return -1


def assert_scaled(grads, reference, coeffs, parts):
    """grads == reference × coeffs[m] on modality m's `parts`, == reference elsewhere."""
    for (path, g), (_, r) in zip(leaves(grads), leaves(reference), strict=True):
        own = owner(path, parts)
        want = r * float(coeffs[own]) if own >= 0 else r
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7, err_msg=path)


def apply_coefficients(grads, owner_fn, coeffs):
    """The released ``param.grad *= coeff_m`` on the parameters ``owner_fn`` assigns to modality m."""
    out = []
    for path, g in leaves(grads):
        own = owner_fn(path)
        out.append((path, g * coeffs[own] if own >= 0 else g))
    return out


def assert_leaves_close(got, want_leaves, rtol=1e-5, atol=1e-7):
    """``got`` (a tree) equals ``want_leaves`` (``[(path, array)]``), path by path."""
    for (path, g), (wpath, w) in zip(leaves(got), want_leaves, strict=True):
        assert path == wpath
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=path)


def assert_trees_close(got, want, rtol=2e-4):
    """Two trees agree leaf by leaf (float64), with an absolute tolerance relative to each leaf's scale."""
    for (path, g), (wpath, w) in zip(leaves(got, np.float64), leaves(want, np.float64), strict=True):
        assert path == wpath
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1e-3, float(np.abs(w).max())), err_msg=path)


def smoke_run(tmp_path, method_cfg: dict):
    """A 2-epoch trainer run of ``method_cfg`` on the synthetic smoke data: ``(results, history)``
    with finite fused test accuracy checked (``history``: the ``metrics.jsonl`` records)."""
    import json
    import os

    from experiments.configs import synthetic
    from mcr_jax.train import train_and_evaluate

    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict(method_cfg)
    res = train_and_evaluate(cfg, str(tmp_path))
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        return res, [json.loads(line) for line in f]
