"""Traced hyperparameters (``Method.traceable``): a value traced through ``method.with_hparams`` under
``jax.jit`` (and a ``jax.vmap`` over two values) gives the gradients of a method configured with that
value statically, for every traceable option of OGM-GE, AGM, MLB, MMPareto, MMCosine and ReconBoost."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mcr_jax.methods import get_method
from tests.helpers.method_setup import build_with_fusion_bias, toy_data

#: (method, option, (default value, another value)); the other value covers 0 / the other side of 1
#: where a formula could branch on it.
CASES = [
    ("ogm_ge", "alpha", (1.0, 0.3)),
    ("agm", "alpha", (3.0, 0.5)),
    ("mlb", "alpha", (0.5, 2.0)),
    ("mlb", "beta", (10.0, 0.5)),
    ("mlb", "uni_weight", (1.0, 0.0)),
    ("mmpareto", "scale", (1.5, 3.0)),
    ("mmcosine", "scale", (10.0, 1.0)),
    ("reconboost", "reconcile_weight", (0.2, 0.5)),
    ("multiloss", "uni_weight", (1.0, 0.0)),
    ("mcr", "mipd_weight", (0.1, 1.0)),
    ("mcr", "uni_weight", (0.01, 0.5)),
    ("mcr", "con_weight", (1.0, 0.3)),
]


@functools.cache
def _setup(name):
    """``(handle, params, batch)`` on the linear-fusion toy model (a non-zero fusion bias, so that rules
    reading it see it)."""
    _, handle, params, batch = build_with_fusion_bias({"name": name}, fusion="linear")
    return handle, params, batch


def _method(name, **options):
    method = get_method(ml_collections.ConfigDict({"name": name, **options}), toy_data()[1])
    handle, params, batch = _setup(name)
    return method, handle, params, batch


@functools.cache
def _static(name, option, value):
    """The gradients' leaves (grads, tx_kwargs, rest, method state, metrics) with ``option`` configured."""
    method, handle, params, batch = _method(name, **{option: value})
    state = method.init_method_state(params)
    out = jax.jit(lambda p, b, k, s: method.gradients(handle, p, b, k, s))(params, batch, jax.random.PRNGKey(3), state)
    return [np.asarray(x) for x in jax.tree.leaves(out)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,option,values", CASES, ids=[f"{n}-{o}" for n, o, _ in CASES])
def test_traced_option_matches_static(name, option, values):
    method, handle, params, batch = _method(name)
    assert option in method.traceable
    state = method.init_method_state(params)
    key = jax.random.PRNGKey(3)

    def traced(p, b, k, s, v):
        bound = method.with_hparams({option: v})
        assert bound.tuned(option) and bound is not method
        return bound.gradients(handle, p, b, k, s)

    statics = [_static(name, option, v) for v in values]
    # the option matters on this batch (else the comparison below would prove nothing)
    assert any(not np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*statics, strict=True))

    step = jax.jit(traced)
    for v, want in zip(values, statics, strict=True):
        _assert_same(jax.tree.leaves(step(params, batch, key, state, jnp.float32(v))), want)

    grid = jax.jit(jax.vmap(traced, in_axes=(None, None, None, None, 0)))
    out = jax.tree.leaves(grid(params, batch, key, state, jnp.asarray(values, jnp.float32)))
    for i, want in enumerate(statics):
        _assert_same([x[i] for x in out], want)
    assert not method.tuned(option) and method.hparams == {}  # the instance itself is left unbound


def test_untraceable_option_is_refused():
    method, *_ = _method("mmpareto")
    with pytest.raises(ValueError, match="cannot be traced"):
        method.with_hparams({"rescale_scope": jnp.float32(1.0)})
