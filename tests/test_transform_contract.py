"""The contract every optax gradient transformation of the package keeps (as optax tests its own):
init/update keep the parameters' structure, shapes and dtypes; jit, device and host arguments change
nothing (chex variants);
``optax.inject_hyperparams`` works; composing with ``optax.chain`` forwards the extra arguments;
a missing extra argument is a clear error. A scan of the package fails when a new transformation
is not in the table."""

import functools
import importlib
import inspect
import pkgutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import mcr_jax
from mcr_jax import game, optim, players
from mcr_jax.methods import inforeg

PARAMS = {
    "encoders": {"a": {"kernel": jnp.arange(6.0).reshape(2, 3) / 7, "bias": jnp.ones((3,))},
                 "b": {"kernel": -jnp.arange(4.0).reshape(2, 2) / 5}},
    "fusion": {"bias": jnp.asarray([0.3, -0.2])},
}
PLAYERS = game.assign_players(PARAMS, ("a", "b"), require_all=False)
GRADS = jax.tree.map(lambda p: jnp.cos(p) + 0.1, PARAMS)
MIPD_GRADS = jax.tree.map(lambda p: jnp.stack([jnp.sin(p), p - 0.5]), PARAMS)


def _optimizer():
    cfg = ml_collections.ConfigDict(dict(name="adam_l2", learning_rate=1e-2, weight_decay=1e-3, grad_clip=1.0))
    return optim.make_optimizer(cfg, total_steps=10)


#: name → (factory, hyperparameters, extra update arguments, the argument that must be given)
TABLE = {
    "add_game_gradients": (functools.partial(game.add_game_gradients, players=PLAYERS), {"weight": 0.5},
                           {"mipd_grads": MIPD_GRADS}, "mipd_grads"),
    "competition": (functools.partial(game.competition, optax.sgd(0.1), players=PLAYERS, strategy="independent"),
                    {"weight": 0.5}, {"mipd_grads": MIPD_GRADS}, "mipd_grads"),
    "scale_by_player": (functools.partial(players.scale_by_player, PLAYERS), {},
                        {"player_scales": jnp.asarray([2.0, 0.5]), "shared_scale": jnp.asarray(0.0)},
                        "player_scales"),
    "make_optimizer": (_optimizer, {}, {}, None),
    "add_proximal_pull": (functools.partial(inforeg.add_proximal_pull, PLAYERS), {},
                          {"prox_coeffs": jnp.asarray([0.5, 2.0]), "anchor": jax.tree.map(lambda p: 0.5 * p, PARAMS)},
                          "prox_coeffs"),
}


def _assert_like_params(updates):
    assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(PARAMS), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def _returns_transformation(fn) -> bool:
    try:
        ann = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return "GradientTransformation" in str(ann)


def test_every_transformation_of_the_package_is_in_the_table():
    found = set()
    for mod in pkgutil.walk_packages(mcr_jax.__path__, "mcr_jax."):
        module = importlib.import_module(mod.name)
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and _returns_transformation(fn):
                found.add(name)
    assert found == set(TABLE), f"add the new transformations to TABLE: {sorted(found - set(TABLE))}"


class TransformVariantsTest(chex.TestCase):
    """init/update under jit and without it, with the arguments on the device and as host NumPy
    arrays (chex variants, the way optax tests its own transformations)."""

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    @parameterized.parameters(*sorted(TABLE))
    def test_init_and_update_keep_the_parameter_structure_and_every_variant_agrees(self, name):
        factory, hyper, extra, _ = TABLE[name]
        tx = factory(**hyper)
        state = tx.init(PARAMS)
        updates, new_state = tx.update(GRADS, state, PARAMS, **extra)
        _assert_like_params(updates)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        got, got_state = self.variant(tx.update)(GRADS, state, PARAMS, **extra)
        _assert_like_params(got)
        _close(got, updates)
        _close(got_state, new_state)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_inject_hyperparams_gives_the_same_updates(name):
    factory, hyper, extra, _ = TABLE[name]
    plain = factory(**hyper)
    injected = optax.inject_hyperparams(factory)(**hyper)
    state = injected.init(PARAMS)
    assert set(state.hyperparams) == set(hyper)
    want, _ = plain.update(GRADS, plain.init(PARAMS), PARAMS, **extra)
    got, _ = jax.jit(injected.update)(GRADS, state, PARAMS, **extra)
    _close(got, want)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_chain_forwards_the_extra_arguments(name):
    factory, hyper, extra, _ = TABLE[name]
    tx = factory(**hyper)
    want, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS, **extra)
    chained = optax.chain(optax.identity(), factory(**hyper), optax.scale(-1.0))
    got, _ = chained.update(GRADS, chained.init(PARAMS), PARAMS, **extra)
    _close(got, jax.tree.map(lambda w: -w, want))


@pytest.mark.parametrize("name", sorted(n for n in TABLE if TABLE[n][3]))
def test_a_missing_extra_argument_is_a_clear_error(name):
    factory, hyper, _, required = TABLE[name]
    tx = factory(**hyper)
    with pytest.raises(ValueError, match=required):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


def test_scale_by_player_scales_each_owner():
    tx = players.scale_by_player(PLAYERS)
    out, _ = tx.update(GRADS, tx.init(PARAMS), player_scales=jnp.asarray([2.0, 0.5]), shared_scale=3.0)
    _close(out["encoders"]["a"], jax.tree.map(lambda g: 2.0 * g, GRADS["encoders"]["a"]))
    _close(out["encoders"]["b"], jax.tree.map(lambda g: 0.5 * g, GRADS["encoders"]["b"]))
    _close(out["fusion"], jax.tree.map(lambda g: 3.0 * g, GRADS["fusion"]))


def test_add_game_gradients_adds_the_weighted_combination():
    tx = game.add_game_gradients(players=PLAYERS, strategy="greedy", weight=0.25)
    out, _ = tx.update(GRADS, tx.init(PARAMS), mipd_grads=MIPD_GRADS)
    combined = game.combine_mipd_grads(MIPD_GRADS, PLAYERS, "greedy")
    _close(out, jax.tree.map(lambda g, c: g + 0.25 * c, GRADS, combined))
