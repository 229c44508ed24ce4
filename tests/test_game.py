"""The competition game: gradient patterns, optax form == single-backward form == the reference's
two-copy construction, and the optax plumbing (jit, inject_hyperparams, nnx.Optimizer)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mcr_jax
from mcr_jax import game, losses

STRATEGIES = ["greedy", "independent", "collaborative"]
NAMES = ("audio", "video", "text")
WEIGHT = 0.3


def make_problem(num_modalities, fusion, seed=0, batch=6, feat=4, dim=3, classes=4, hidden=5):
    r = np.random.default_rng(seed)
    names = NAMES[:num_modalities]
    f32 = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
    params = {
        "encoders": {m: f32(feat, dim) for m in names},
        "heads": {m: f32(dim, classes) for m in names},
    }
    if fusion == "linear":
        params["fusion"] = {"branches": {m: f32(dim, classes) for m in names}, "bias": f32(classes)}
    else:
        params["fusion"] = {"hidden": f32(num_modalities * dim, hidden), "hb": f32(hidden), "out": f32(hidden, classes)}
    batch_x = {m: f32(batch, feat) for m in names}
    labels = jnp.asarray(r.integers(0, classes, size=batch))
    perms = losses.sample_permutations(jax.random.key(seed), 3, batch, method="uniform")
    return names, params, batch_x, labels, perms


def encode(params, x, names):
    return [jnp.tanh(x[m] @ params["encoders"][m]) for m in names]


def mipd_inputs(fusion_params, zs, names, fusion):
    """(per-modality inputs of the MIPD fuse_fn, fuse_fn): branch logits for linear fusion."""
    if fusion == "linear":
        branches = [z @ fusion_params["branches"][m] for z, m in zip(zs, names, strict=True)]
        return branches, lambda bs: sum(bs) + fusion_params["bias"][None]

    def fuse(parts):
        h = jnp.tanh(jnp.concatenate(parts, axis=-1) @ fusion_params["hidden"] + fusion_params["hb"][None])
        return h @ fusion_params["out"]

    return zs, fuse


def rest_loss(params, x, labels, names, fusion):
    zs = encode(params, x, names)
    parts, fuse = mipd_inputs(params["fusion"], zs, names, fusion)
    ce = optax.softmax_cross_entropy_with_integer_labels(fuse(parts), labels).mean()
    uni = sum(
        optax.softmax_cross_entropy_with_integer_labels(z @ params["heads"][m], labels).mean()
        for z, m in zip(zs, names, strict=True)
    )
    return ce + 0.1 * uni


def single_backward_grad(params, x, labels, perms, names, fusion, strategy, players):
    def loss(p):
        zs = encode(p, x, names)
        parts, fuse_clean = mipd_inputs(p["fusion"], zs, names, fusion)
        clean = fuse_clean(parts)
        fusion_q = game.scale_shared_params(p["fusion"], players["fusion"], strategy)
        _, fuse_q = mipd_inputs(fusion_q, zs, names, fusion)
        d = game.game_mipd_divergences(clean, fuse_q, parts, perms, strategy=strategy)
        return rest_loss(p, x, labels, names, fusion) - WEIGHT * jnp.sum(d)

    return jax.grad(loss)(params)


def optax_form_update(params, x, labels, perms, names, fusion, strategy, players):
    def divergences(p, stop_clean, stop_perturbed):
        zs = encode(p, x, names)
        parts, fuse = mipd_inputs(p["fusion"], zs, names, fusion)
        clean = fuse(parts)
        clean = jax.lax.stop_gradient(clean) if stop_clean else clean
        return losses.mipd_divergences(clean, fuse, parts, perms, stop_perturbed=stop_perturbed)

    per_term = game.per_term_grads(lambda p: losses.mipd_loss(divergences(p, True, False)), params)
    grads = jax.grad(rest_loss)(params, x, labels, names, fusion)
    s = game.resolve_strategy(strategy).s
    if s:
        clean_path = jax.grad(lambda p: -WEIGHT * s * jnp.sum(divergences(p, False, True)))(params)
        grads = jax.tree.map(jnp.add, grads, clean_path)
    tx = game.competition(optax.sgd(1.0), players=players, strategy=strategy, weight=WEIGHT)
    updates, _ = tx.update(grads, tx.init(params), params, mipd_grads=per_term)
    return jax.tree.map(jnp.negative, updates)  # sgd(1.0): update = -gradient


def reference_two_copy_grad(params, x, labels, perms, names, fusion, strategy):
    """The reference code's construction: for term j an 'own' copy (other branches detached) and an
    'others' copy (the permuted branch detached), the clean prediction never detached; greedy adds
    them as -own + others, independent keeps -own, collaborative is the plain gradient."""

    def loss(p):
        zs = encode(p, x, names)
        parts, fuse = mipd_inputs(p["fusion"], zs, names, fusion)
        clean = fuse(parts)
        full = losses.mipd_divergences(clean, fuse, parts, perms)
        own = losses.mipd_divergences(clean, fuse, parts, perms, nonperturbed_transform=jax.lax.stop_gradient)
        others = losses.mipd_divergences(
            clean, fuse, parts, perms, permuted_latents=[jax.lax.stop_gradient(t) for t in parts]
        )
        reg = {"greedy": -own + others, "independent": -own, "collaborative": -full}[strategy]
        return rest_loss(p, x, labels, names, fusion) + WEIGHT * jnp.sum(reg)

    return jax.grad(loss)(params)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@functools.cache
def _case(num_modalities, fusion, strategy):
    names, params, x, labels, perms = make_problem(num_modalities, fusion)
    players = game.assign_players(params, names)
    static = dict(names=names, fusion=fusion, strategy=strategy)
    run = lambda fn, **kw: jax.jit(functools.partial(fn, **static, **kw))(params, x, labels, perms)
    return (
        run(single_backward_grad, players=players),
        run(optax_form_update, players=players),
        run(reference_two_copy_grad) if fusion == "linear" else None,
        params,
        players,
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fusion", ["linear", "concat_mlp"])
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_optax_form_equals_single_backward(num_modalities, fusion, strategy):
    single, optax_form, _, _, _ = _case(num_modalities, fusion, strategy)
    assert_trees_close(single, optax_form)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_single_backward_equals_reference_two_copy_construction(num_modalities, strategy):
    single, _, reference, _, _ = _case(num_modalities, "linear", strategy)
    assert_trees_close(single, reference)


def test_strategies_really_differ():
    """Guards the equivalence tests against a game that ignores its strategy."""
    greedy = _case(2, "linear", "greedy")[0]
    indep = _case(2, "linear", "independent")[0]
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), greedy, indep)
    assert diff["encoders"]["audio"] > 1e-4 and diff["fusion"]["bias"] > 1e-4


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_greedy_clean_prediction_and_shared_bias_get_no_mipd_gradient(num_modalities):
    """In the reference's two-copy construction the clean prediction's and the bias's contributions
    cancel exactly under greedy: so stopping them (our single-backward form) is exact."""
    names, params, x, _, perms = make_problem(num_modalities, "linear", seed=3)
    zs = encode(params, x, names)
    parts, fuse = mipd_inputs(params["fusion"], zs, names, "linear")
    clean = fuse(parts)

    def two_copy(clean_logits, bias):
        f = lambda bs: sum(bs) + bias[None]
        own = losses.mipd_divergences(clean_logits, f, parts, perms, nonperturbed_transform=jax.lax.stop_gradient)
        detached = [jax.lax.stop_gradient(t) for t in parts]
        oth = losses.mipd_divergences(clean_logits, f, parts, perms, permuted_latents=detached)
        return jnp.sum(-own + oth)

    g_clean, g_bias = jax.grad(two_copy, argnums=(0, 1))(clean, params["fusion"]["bias"])
    np.testing.assert_allclose(g_clean, 0.0, atol=1e-7)
    np.testing.assert_allclose(g_bias, 0.0, atol=1e-7)
    # ... while each copy alone does send gradient there.
    g_own = jax.grad(lambda c: jnp.sum(losses.mipd_divergences(c, fuse, parts, perms)))(clean)
    assert float(jnp.abs(g_own).max()) > 1e-4


def test_greedy_gradient_pattern_per_player():
    """Player m gets +grad of its own term and -grad of the others' terms (through the perturbed path)."""
    names, params, x, _, perms = make_problem(2, "linear", seed=4)
    players = game.assign_players(params, names)

    def terms(p):
        zs = encode(p, x, names)
        parts, fuse = mipd_inputs(p["fusion"], zs, names, "linear")
        return losses.mipd_loss(losses.mipd_divergences(jax.lax.stop_gradient(fuse(parts)), fuse, parts, perms))

    g = game.per_term_grads(terms, params)
    combined = game.combine_mipd_grads(g, players, "greedy")
    a, v = g["encoders"]["audio"], g["encoders"]["video"]
    np.testing.assert_allclose(combined["encoders"]["audio"], a[0] - a[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(combined["encoders"]["video"], v[1] - v[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(combined["fusion"]["bias"], 0.0)
    ind = game.combine_mipd_grads(g, players, "independent")
    np.testing.assert_allclose(ind["encoders"]["audio"], a[0], rtol=1e-6, atol=1e-7)
    col = game.combine_mipd_grads(g, players, "collaborative")
    np.testing.assert_allclose(col["fusion"]["bias"], g["fusion"]["bias"].sum(0), rtol=1e-6)


def test_scale_gradient():
    x = jnp.array([1.0, -2.0, 3.0])
    for k in [-1.0, 0.0, 0.5, 1.0]:
        y, g = jax.value_and_grad(lambda t: jnp.sum(game.scale_gradient(t, k) ** 2))(x)
        np.testing.assert_allclose(y, jnp.sum(x**2))
        np.testing.assert_allclose(g, 2 * k * x)
    tree = {"a": x, "b": (x, 2 * x)}
    g = jax.grad(lambda t: sum(jnp.sum(v) for v in jax.tree.leaves(game.scale_gradient(t, -1.0))))(tree)
    assert all(np.allclose(v, -1.0) for v in jax.tree.leaves(g))
    np.testing.assert_allclose(jax.jit(jax.grad(lambda t: jnp.sum(game.scale_gradient(t, -1.0))))(x), -1.0)


def test_strategy_validation():
    assert game.resolve_strategy("greedy") == game.Strategy(k=-1.0, s=0.0)
    assert game.resolve_strategy(1) == game.Strategy(k=1.0, s=1.0)
    assert game.resolve_strategy("independent") == (0.0, 1.0)
    rule = game.resolve_strategy("collaborative")
    assert game.resolve_strategy(rule) is rule
    with pytest.raises(ValueError, match="unknown game strategy"):
        game.resolve_strategy("selfish")
    with pytest.raises(ValueError, match="k must be"):
        game.resolve_strategy(0.5)


def test_assign_players_paths_and_errors():
    names, params, *_ = make_problem(3, "linear")
    players = game.assign_players(params, names)
    assert players["encoders"]["video"] == 1 and players["fusion"]["branches"]["text"] == 2
    assert players["fusion"]["bias"] == game.SHARED and players["heads"]["audio"] == 0
    custom = game.assign_players(params, names, patterns={"audio": [r"^encoders/audio"]})
    assert custom["encoders"]["audio"] == 0 and custom["fusion"]["branches"]["audio"] == game.SHARED
    with pytest.raises(ValueError, match="at least 2"):
        game.assign_players(params, ("audio",))
    with pytest.raises(ValueError, match="several modalities"):
        game.assign_players({"audio": {"video": jnp.zeros(1)}}, ("audio", "video"))


def test_competition_errors():
    names, params, *_ = make_problem(2, "linear")
    players = game.assign_players(params, names)
    tx = game.competition(optax.sgd(0.1), players=players)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs mipd_grads"):
        tx.update(params, state, params)
    bad = jax.tree.map(lambda p: jnp.stack([p, p]), {"encoders": params["encoders"]})
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(params, state, params, mipd_grads=bad)


class GameVariantsTest(chex.TestCase):
    """The game under jit and without it, with its arguments on the device and as host NumPy arrays
    (chex variants, as optax tests its transformations)."""

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    def test_single_backward_gradient_equals_the_two_copy_construction(self):
        names, params, x, labels, perms = make_problem(2, "linear")  # _case's problem: its reference is cached
        players = game.assign_players(params, names)
        for strategy in STRATEGIES:
            want = _case(2, "linear", strategy)[2]
            got = self.variant(functools.partial(single_backward_grad, names=names, fusion="linear", strategy=strategy,
                                                 players=players))(params, x, labels, perms)
            assert_trees_close(got, want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_competition_with_injected_weight(self):
        names, params, *_ = make_problem(2, "linear", seed=5)
        players = game.assign_players(params, names)
        r = np.random.default_rng(0)
        grads = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
        mipd_grads = jax.tree.map(lambda p: jnp.asarray(r.normal(size=(2,) + p.shape), jnp.float32), params)
        tx = optax.inject_hyperparams(game.competition)(optax.adam(1e-2), players=players, weight=0.5)
        state = tx.init(params)
        assert float(state.hyperparams["weight"]) == 0.5
        step = self.variant(lambda g, s, p, mg: tx.update(g, s, p, mipd_grads=mg))
        upd, _ = step(grads, state, params, mipd_grads)
        plain = game.competition(optax.adam(1e-2), players=players, weight=0.5)
        upd_plain, _ = plain.update(grads, plain.init(params), params, mipd_grads=mipd_grads)
        assert_trees_close(upd, upd_plain, rtol=1e-5, atol=1e-7)
        # Changing the injected weight changes the update: at 0 it is plain Adam's.
        state.hyperparams["weight"] = jnp.asarray(0.0)
        upd_zero, _ = step(grads, state, params, mipd_grads)
        upd_ref, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
        assert_trees_close(upd_zero, upd_ref, rtol=1e-5, atol=1e-7)


class TwoModalityNet(nnx.Module):
    def __init__(self, rngs):
        self.audio = nnx.Linear(3, 2, use_bias=False, rngs=rngs)
        self.video = nnx.Linear(4, 2, use_bias=False, rngs=rngs)
        self.bias = nnx.Param(jnp.zeros((2,)))

    def __call__(self, xa, xv):
        return self.audio(xa) + self.video(xv) + self.bias[...][None]


def test_nnx_optimizer_passes_mipd_grads_through():
    model = TwoModalityNet(nnx.Rngs(0))
    players = game.assign_players(model, ("audio", "video"))
    opt = nnx.Optimizer(model, game.competition(optax.sgd(1.0), players=players, weight=2.0), wrt=nnx.Param)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    xa, xv = jnp.ones((5, 3)), jnp.ones((5, 4))
    grads = nnx.grad(lambda m: jnp.sum(m(xa, xv) ** 2))(model)
    pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
    mipd_grads = jax.tree.map(lambda g: jnp.stack([jnp.ones_like(g), 3 * jnp.ones_like(g)]), pure_grads)
    opt.update(model, grads, mipd_grads=mipd_grads)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    # greedy: audio gets 1 - 3 = -2, video 3 - 1 = +2, bias 0; times weight 2; sgd(1) subtracts.
    for name, shift in [("audio", 4.0), ("video", -4.0)]:
        want = before[name]["kernel"] - pure_grads[name]["kernel"] + shift
        np.testing.assert_allclose(after[name]["kernel"], want, rtol=1e-6)
    np.testing.assert_allclose(after["bias"], before["bias"] - pure_grads["bias"], rtol=1e-6)


def test_top_level_game_api():
    assert mcr_jax.competition is game.competition and mcr_jax.SHARED == -1


# ---------------------------------------------------------------------------- no silent wrong results


def _random_like(params, lead=(), seed=0):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(r.normal(size=lead + p.shape), jnp.float32), params)


def test_competition_rejects_mipd_grads_without_the_player_axis():
    """Per-term gradients lacking the leading M axis used to broadcast into a garbage update."""
    names, params, *_ = make_problem(2, "linear")
    players = game.assign_players(params, names)
    tx = game.competition(optax.sgd(1.0), players=players)
    grads = _random_like(params, seed=1)
    with pytest.raises(ValueError, match=r"mipd_grads leaf 'encoders/audio' has shape \(4, 3\); expected \(2, 4, 3\)"):
        tx.update(grads, tx.init(params), params, mipd_grads=_random_like(params, seed=2))
    # The trailing shape must be the parameter's (a leading axis of the right size is not enough).
    bad = dict(_random_like(params, (2,), seed=3))
    bad["heads"] = {m: jnp.zeros((2, 3)) for m in names}  # params' heads are (3, 4)
    with pytest.raises(ValueError, match=r"'heads/audio' has shape \(2, 3\); expected \(2, 3, 4\)"):
        tx.update(grads, tx.init(params), params, mipd_grads=bad)
    # Shapes are static: the same check fires at trace time under jit.
    step = jax.jit(lambda g, mg: tx.update(g, tx.init(params), params, mipd_grads=mg)[0])
    with pytest.raises(ValueError, match="expected a leading axis|expected \\(2, "):
        step(grads, _random_like(params, seed=4))


def test_combine_rejects_the_wrong_number_of_terms():
    """M = 3 per-term gradients for a 2-player labelling used to sum a third, foreign term."""
    names, params, *_ = make_problem(2, "linear")
    players = game.assign_players(params, names)
    three = _random_like(params, (3,), seed=5)
    with pytest.raises(ValueError, match=r"has shape \(3, .*M=2 .*players label modalities 0\.\.1"):
        game.combine_mipd_grads(three, players, "greedy")
    # Leaves must agree: one leaf with M=3 among M=2 leaves is caught and named.
    mixed = _random_like(params, (2,), seed=6)
    mixed["fusion"]["bias"] = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"'fusion/bias' has shape \(3, 4\)"):
        game.combine_mipd_grads(mixed, players, "greedy")
    # A scalar leaf (no axis at all) is caught too.
    mixed["fusion"]["bias"] = jnp.zeros(())
    with pytest.raises(ValueError, match=r"'fusion/bias' has shape \(\)"):
        game.combine_mipd_grads(mixed, players, "greedy")


def test_combine_num_players_for_a_modality_that_owns_nothing():
    """When the last modality owns no parameter, M comes from num_players, and is checked too."""
    names, params, *_ = make_problem(2, "linear")
    players = game.assign_players(params, names)
    g3 = _random_like(params, (3,), seed=7)
    out = game.combine_mipd_grads(g3, players, "greedy", num_players=3)
    a = g3["encoders"]["audio"]
    np.testing.assert_allclose(out["encoders"]["audio"], a[0] - a[1] - a[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["fusion"]["bias"], 0.0)
    with pytest.raises(ValueError, match=r"has shape \(3, .*M=2 .*num_players"):
        game.combine_mipd_grads(g3, players, "greedy", num_players=2)
    tx = game.competition(optax.sgd(1.0), players=players, num_players=3)
    upd, _ = tx.update(_random_like(params), tx.init(params), params, mipd_grads=g3)
    assert jax.tree.structure(upd) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="player index 1 .* out of range .*M=1"):
        game.combine_mipd_grads(_random_like(params, (1,)), players, "greedy", num_players=1)


def test_assign_players_raises_for_a_modality_that_owns_no_leaf():
    """('Audio', 'video') used to make every audio leaf shared: greedy then zeroes its game gradient."""
    names, params, *_ = make_problem(2, "linear")
    with pytest.raises(ValueError, match=r"\['Audio'\] owns no parameter leaf") as err:
        game.assign_players(params, ("Audio", "video"))
    msg = str(err.value)
    assert "Top-level keys: ['encoders', 'fusion', 'heads']" in msg and "'audio'" in msg
    assert "Did you mean {'Audio': 'audio'}" in msg and "require_all=False" in msg
    with pytest.raises(ValueError, match=r"\['text'\] owns no parameter leaf"):
        game.assign_players(params, ("audio", "video", "text"))
    with pytest.raises(ValueError, match=r"\['video'\] owns no .*No path matched their patterns"):
        game.assign_players(params, names, patterns={"audio": ["^encoders/audio"], "video": ["^encoders/vidoe"]})
    # Opting out: a non-separable fusion head's layers belong to nobody.
    _, mlp_params, *_ = make_problem(2, "concat_mlp")
    fusion_players = game.assign_players(mlp_params["fusion"], names, require_all=False)
    assert set(jax.tree.leaves(fusion_players)) == {game.SHARED}
    with pytest.raises(ValueError, match="owns no parameter leaf|own no parameter leaf"):
        game.assign_players(mlp_params["fusion"], names)


def test_players_must_be_static_ints():
    """Players given as arrays under jit used to fail with a TracerBoolConversionError."""
    names, params, *_ = make_problem(2, "linear")
    players = game.assign_players(params, names)
    array_players = jax.tree.map(jnp.asarray, players)
    grads, mipd_grads = _random_like(params, seed=8), _random_like(params, (2,), seed=9)
    with pytest.raises(TypeError, match="players must be a static pytree of Python ints.*'encoders/audio'"):
        jax.jit(lambda mg, pl: game.combine_mipd_grads(mg, pl, "greedy"))(mipd_grads, array_players)

    def build_and_update(g, mg, pl):
        tx = game.competition(optax.sgd(1.0), players=pl)
        return tx.update(g, tx.init(params), params, mipd_grads=mg)[0]

    with pytest.raises(TypeError, match="not traced arrays"):
        jax.jit(build_and_update)(grads, mipd_grads, array_players)
    with pytest.raises(TypeError, match="not traced arrays"):
        jax.jit(lambda p, pl: game.scale_shared_params(p, pl, "greedy"))(params, array_players)
    # Concrete (non-traced) integer arrays are read as ints, also when closed over under jit.
    want = jax.jit(lambda g, mg: build_and_update(g, mg, players))(grads, mipd_grads)
    got = jax.jit(lambda g, mg: build_and_update(g, mg, array_players))(grads, mipd_grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="pytree of Python ints .* 'fusion/bias' is 0.5"):
        game.combine_mipd_grads(mipd_grads, {**players, "fusion": {**players["fusion"], "bias": 0.5}}, "greedy")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scale_params_for_term_gives_own_other_and_shared_parameters_their_scales(strategy):
    """Term j's perturbed prediction: modality j's own parameters keep gradient scale 1, the other
    players' get k, unowned (shared) ones s(k); the forward values are unchanged."""
    params = {"fusion": {"branches": {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}, "bias": jnp.ones((3,))}}
    players = game.assign_players(params, ("a", "b"), require_all=False)["fusion"]
    k, s = game.resolve_strategy(strategy)
    for term, (own, other) in enumerate((("a", "b"), ("b", "a"))):
        scaled = game.scale_params_for_term(params["fusion"], players, term, strategy)
        assert_trees_close(scaled, params["fusion"], rtol=0, atol=0)
        grads = jax.grad(lambda p, t=term: sum(jnp.sum(x) for x in jax.tree.leaves(
            game.scale_params_for_term(p, players, t, strategy))))(params["fusion"])
        np.testing.assert_array_equal(grads["branches"][own], np.ones((2, 3)))
        np.testing.assert_array_equal(grads["branches"][other], np.full((2, 3), k))
        np.testing.assert_array_equal(grads["bias"], np.full((3,), s))
