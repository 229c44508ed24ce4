"""mcr_jax.shared_jit: identical programs compile once per process, anything else compiles apart."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcr_jax import shared_jit as sj


@pytest.fixture(autouse=True)
def sharing_on():
    sj.set_sharing(True)
    yield
    sj.set_sharing(True)


def _affine(scale):
    def f(x, y):
        return {"out": jnp.tanh(x * scale) @ y, "sum": jnp.sum(x)}

    return f


def test_two_functions_with_the_same_program_compile_once_and_give_jit_results():
    x, y = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), jnp.ones((4, 2))
    before = sj.stats()
    a, b = sj.shared_jit(_affine(1.75)), sj.shared_jit(_affine(1.75))  # two closures, one program
    out_a, out_b = a(x, y), b(x, y)
    after = sj.stats()
    assert after["compiled"] - before["compiled"] == 1
    assert after["shared"] - before["shared"] == 1
    ref = jax.jit(_affine(1.75))(x, y)
    for k in ref:
        np.testing.assert_array_equal(out_a[k], ref[k])
        np.testing.assert_array_equal(out_b[k], ref[k])
    a(x + 1.0, y)  # same signature: no new program
    assert a._cache_size() == 1 and sj.stats()["compiled"] == after["compiled"]


def test_functions_that_differ_in_a_captured_constant_are_not_shared():
    x = jnp.arange(1000.0)
    c1, c2 = np.arange(1000.0, dtype=np.float32), 2 * np.arange(1000.0, dtype=np.float32)
    f1, f2 = sj.shared_jit(lambda v: v + c1), sj.shared_jit(lambda v: v + c2)
    np.testing.assert_array_equal(f1(x), x + c1)
    np.testing.assert_array_equal(f2(x), x + c2)


def test_different_shapes_or_output_structure_compile_apart():
    f = sj.shared_jit(lambda v: v * 2)
    g = sj.shared_jit(lambda v: (v * 2,))  # same computation, a tuple around the result
    assert f(jnp.ones(3)).shape == (3,) and f(jnp.ones(5)).shape == (5,)
    assert f._cache_size() == 2
    out = g(jnp.ones(3))
    assert isinstance(out, tuple) and out[0].shape == (3,)


def test_switched_off_every_function_compiles_its_own():
    sj.set_sharing(False)
    before = sj.stats()
    x = jnp.ones((2, 3))
    sj.shared_jit(_affine(0.5))(x, jnp.ones((3, 1)))
    sj.shared_jit(_affine(0.5))(x, jnp.ones((3, 1)))
    assert sj.stats()["shared"] == before["shared"]


def test_threads_asking_for_the_same_program_compile_it_once():
    x, y = jnp.ones((5, 4)), jnp.ones((4, 3))
    fns = [sj.shared_jit(_affine(3.25)) for _ in range(4)]
    before = sj.stats()["compiled"]
    outs = [None] * len(fns)

    def call(i):
        outs[i] = fns[i](x, y)["out"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sj.stats()["compiled"] - before == 1
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
