"""The pure losses against plain float64 NumPy versions, plus the jit/vmap/gradient contracts."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcr_jax
from mcr_jax import losses
from tests.helpers import numpy_refs as ref

RTOL = 1e-5
ATOL = 1e-6


def _rng(seed=0):
    return np.random.default_rng(seed)


def mlp_fuse_params(dims, hidden, classes, seed=0):
    r = _rng(seed)
    return {
        "w1": r.normal(size=(sum(dims), hidden)).astype(np.float32) / np.sqrt(sum(dims)),
        "b1": r.normal(size=(hidden,)).astype(np.float32) * 0.1,
        "w2": r.normal(size=(hidden, classes)).astype(np.float32),
    }


def jax_mlp_fuse(params):
    def fuse(zs):
        h = jnp.tanh(jnp.concatenate(zs, axis=-1) @ params["w1"] + params["b1"][None])
        return h @ params["w2"]

    return fuse


def numpy_mlp_fuse(params):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def fuse(zs):
        h = np.tanh(np.concatenate(zs, axis=-1) @ p["w1"] + p["b1"][None])
        return h @ p["w2"]

    return fuse


# ---------------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4)], ids=["BxC", "AxBxC"])
def test_jsd_matches_numpy(shape):
    r = _rng(1)
    p, q = r.normal(size=shape) * 3, r.normal(size=shape) * 3
    got = losses.jsd_from_logits(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(got, ref.jsd_rows(p, q), rtol=1e-4, atol=1e-6)


def test_kl_and_squared_difference_match_numpy():
    r = _rng(2)
    p, q = r.normal(size=(5, 4)), r.normal(size=(5, 4))
    np.testing.assert_allclose(losses.kl_from_logits(jnp.asarray(p), jnp.asarray(q)), ref.kl_rows(p, q), rtol=1e-4)
    np.testing.assert_allclose(
        losses.squared_difference(jnp.asarray(p), jnp.asarray(q)), np.mean((p - q) ** 2, axis=-1), rtol=1e-5
    )


def test_jsd_bounds_identity_and_disjoint():
    r = _rng(3)
    p = jnp.asarray(r.normal(size=(64, 7)) * 5, jnp.float32)
    q = jnp.asarray(r.normal(size=(64, 7)) * 5, jnp.float32)
    d = losses.jsd_from_logits(p, q)
    assert bool(jnp.all(d >= 0)) and bool(jnp.all(d <= math.log(2)))
    np.testing.assert_allclose(losses.jsd_from_logits(p, p), 0.0, atol=1e-7)
    # Two one-hot distributions on different classes: the JSD reaches ln 2.
    a = jnp.array([[1e4, -1e4, 0.0]])
    b = jnp.array([[-1e4, 1e4, 0.0]])
    np.testing.assert_allclose(losses.jsd_from_logits(a, b), math.log(2), rtol=1e-6)


def test_jsd_finite_values_and_gradients_at_extreme_logits():
    a = jnp.array([[1e4, -1e4, 3.0], [0.0, 1e4, -1e4]])
    b = jnp.array([[-1e4, 1e4, 0.0], [1e4, 1e4, 1e4]])
    val, grads = jax.value_and_grad(lambda x, y: jnp.sum(losses.jsd_from_logits(x, y)), argnums=(0, 1))(a, b)
    assert bool(jnp.isfinite(val))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_divergence_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        losses.jsd_from_logits(jnp.zeros((3, 4)), jnp.zeros((3, 5)))


# ---------------------------------------------------------------------------------- permutations


@pytest.mark.parametrize("method", ["shift", "uniform"])
@pytest.mark.parametrize("derangement", [False, True], ids=["perm", "derangement"])
def test_permutations_are_permutations(method, derangement):
    perms = np.asarray(
        losses.sample_permutations(jax.random.key(0), 16, 9, derangement=derangement, method=method)
    )
    assert perms.shape == (16, 9) and perms.dtype == np.int32
    for row in perms:
        assert sorted(row.tolist()) == list(range(9))
        if derangement:
            assert not np.any(row == np.arange(9))


@pytest.mark.parametrize("method", ["shift", "uniform"])
@pytest.mark.parametrize("derangement", [False, True], ids=["perm", "derangement"])
def test_permutation_partner_is_uniform(method, derangement):
    """Each row's partner sigma(b) is uniform over the batch (over the other rows for derangements)."""
    b, s = 5, 4000
    perms = np.asarray(
        jax.jit(
            lambda k: losses.sample_permutations(k, s, b, derangement=derangement, method=method), static_argnums=()
        )(jax.random.key(7))
    )
    counts = np.zeros((b, b))
    for row in perms:
        counts[np.arange(b), row] += 1
    expected = np.full((b, b), s / (b - 1 if derangement else b))
    if derangement:
        np.fill_diagonal(expected, 0)
    assert np.all(np.abs(counts - expected) < 0.15 * expected.max())


def test_permutation_errors():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples"):
        losses.sample_permutations(key, 0, 4)
    with pytest.raises(ValueError, match="derangement"):
        losses.sample_permutations(key, 2, 1)
    with pytest.raises(ValueError, match="valid"):
        losses.sample_permutations(key, 2, 4, valid=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="method"):
        losses.sample_permutations(key, 2, 4, method="sorted")


def test_default_sampler_draws_derangements():
    perms = np.asarray(losses.sample_permutations(jax.random.key(3), 64, 4))
    assert not np.any(perms == np.arange(4)), "the default sampler must never pair a row with itself"


def test_default_sampler_variance_matches_uniform_derangements():
    """The default's estimate has the variance of S independent uniform derangements (the identity
    draws of shifts allowed to be 0 made it 2-4x noisier), and its mean is B/(B-1) times the
    uniform-permutation estimate."""
    b, s, n = 16, 8, 3000
    latents, _, fuse, clean, _ = _mipd_case(2, batch=b)
    keys = jax.random.split(jax.random.key(0), n)

    def draws(**kw):
        one = lambda k: losses.mipd_divergences(clean, fuse, latents, losses.sample_permutations(k, s, b, **kw))  # noqa: E731
        return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)

    default, uniform_der, uniform = draws(), draws(method="uniform"), draws(method="uniform", derangement=False)
    ratio = default.var(0) / uniform_der.var(0)
    assert np.all(ratio < 1.25) and np.all(ratio > 0.8), ratio
    np.testing.assert_allclose(default.mean(0), uniform.mean(0) * b / (b - 1), rtol=0.02)


@pytest.mark.parametrize("method", ["shift", "uniform"])
@pytest.mark.parametrize("derangement", [False, True], ids=["perm", "derangement"])
def test_valid_rows_are_permuted_among_themselves(method, derangement):
    valid = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], bool)
    perms = np.asarray(losses.sample_permutations(jax.random.key(1), 400, 9, derangement=derangement, method=method,
                                                  valid=jnp.asarray(valid)))
    idx = np.flatnonzero(valid)
    counts = np.zeros((9, 9))
    for row in perms:
        assert sorted(row.tolist()) == list(range(9))
        np.testing.assert_array_equal(row[~valid], np.flatnonzero(~valid))  # padded rows stay put
        assert set(row[valid].tolist()) == set(idx.tolist())
        if derangement:
            assert not np.any(row[valid] == idx)
        counts[np.arange(9), row] += 1
    sub = counts[np.ix_(idx, idx)]
    expected = np.full_like(sub, 400 / (len(idx) - 1 if derangement else len(idx)))
    if derangement:
        np.fill_diagonal(expected, 0)
    assert np.all(np.abs(sub - expected) < 0.35 * expected.max())


def test_mipd_mask_uses_valid_rows_only():
    """A padded batch gives the MIPD of its valid rows, whatever the padded rows hold."""
    latents, params, fuse, _, _ = _mipd_case(2, batch=8)
    valid = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0], bool)
    perms = losses.sample_permutations(jax.random.key(2), 5, 8, valid=valid)
    got = losses.mipd_divergences(fuse(latents), fuse, latents, perms, mask=valid)
    small = [z[:5] for z in latents]
    want = ref.mipd(np.asarray(fuse(small)), numpy_mlp_fuse(params), small, np.asarray(perms)[:, :5])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    junk = [z.at[5:].set(1e3) for z in latents]
    np.testing.assert_allclose(losses.mipd_divergences(fuse(junk), fuse, junk, perms, mask=valid), got, rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        losses.mipd_divergences(fuse(latents), fuse, latents, perms, mask=valid[:4])


def test_mipd_is_its_copies_through_the_core_formula():
    """perturbed_copies + divergences_of_copies (the split of mipd_divergences) against the float64
    NumPy loops, for permuted copies and for copies given directly (noise from a known key)."""
    latents, params, fuse, clean, perms = _mipd_case(3, batch=6)
    copies = losses.perturbed_copies(latents, "permute", permutations=perms)
    assert [c.shape for c in copies] == [(3,) + z.shape for z in latents]
    got = losses.divergences_of_copies(clean, fuse, latents, copies)
    np.testing.assert_allclose(got, ref.mipd(np.asarray(clean), numpy_mlp_fuse(params), latents, np.asarray(perms)),
                               rtol=1e-4, atol=1e-6)
    noisy = losses.perturbed_copies(latents, "noise", key=jax.random.key(1), num_samples=4)
    direct = losses.mipd_divergences(clean, fuse, latents, perturbed_latents=noisy)
    np.testing.assert_allclose(losses.divergences_of_copies(clean, fuse, latents, noisy), direct, rtol=1e-6)
    via_key = losses.mipd_divergences(clean, fuse, latents, perturbation="noise", key=jax.random.key(1), num_samples=4)
    np.testing.assert_allclose(via_key, direct, rtol=1e-6)


# ---------------------------------------------------------------------------------- MIPD


def _mipd_case(num_modalities=2, batch=6, dims=(3, 4, 2), classes=5, seed=0):
    r = _rng(seed)
    dims = dims[:num_modalities]
    latents = [jnp.asarray(r.normal(size=(batch, d)), jnp.float32) for d in dims]
    params = mlp_fuse_params(dims, 8, classes, seed)
    fuse = jax_mlp_fuse(params)
    clean = fuse(latents)
    perms = losses.sample_permutations(jax.random.key(seed), 3, batch, method="uniform")
    return latents, params, fuse, clean, perms


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_mipd_matches_numpy_loops(num_modalities):
    latents, params, fuse, clean, perms = _mipd_case(num_modalities)
    got = losses.mipd_divergences(clean, fuse, latents, perms)
    want = ref.mipd(clean, numpy_mlp_fuse(params), latents, perms)
    assert got.shape == (num_modalities,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_mipd_regression_variant_matches_numpy():
    latents, params, _, _, perms = _mipd_case(2, classes=1)
    fuse = jax_mlp_fuse(params)
    clean = fuse(latents)
    got = losses.mipd_divergences(clean, fuse, latents, perms, divergence="mse")
    want = ref.mipd(clean, numpy_mlp_fuse(params), latents, perms, divergence="mse")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_identity_permutation_gives_zero():
    latents, _, fuse, clean, _ = _mipd_case(3)
    ident = jnp.tile(jnp.arange(6, dtype=jnp.int32), (4, 1))
    np.testing.assert_allclose(losses.mipd_divergences(clean, fuse, latents, ident), 0.0, atol=1e-7)


def test_mipd_jsd_bounds_and_positive_for_real_permutation():
    latents, _, fuse, clean, perms = _mipd_case(2)
    d = losses.mipd_divergences(clean, fuse, latents, perms)
    assert bool(jnp.all(d > 0)) and bool(jnp.all(d <= math.log(2)))


def test_zero_and_noise_perturbations():
    latents, params, fuse, clean, _ = _mipd_case(2)
    got = losses.mipd_divergences(clean, fuse, latents, perturbation="zero", num_samples=2)
    # NumPy: replace each modality's latent by zeros.
    nf = numpy_mlp_fuse(params)
    want = []
    for m in range(2):
        zs = [np.asarray(z, np.float64) for z in latents]
        zs[m] = np.zeros_like(zs[m])
        want.append(np.mean(ref.jsd_rows(clean, nf(zs))))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    key = jax.random.key(3)
    # noise_scale 0 is the identity; a constant latent has batch std 0, so noise leaves it alone too.
    np.testing.assert_allclose(
        losses.mipd_divergences(clean, fuse, latents, perturbation="noise", key=key, num_samples=4, noise_scale=0.0),
        0.0,
        atol=1e-7,
    )
    noisy = losses.mipd_divergences(clean, fuse, latents, perturbation="noise", key=key, num_samples=4)
    assert bool(jnp.all(noisy > 0))
    const = [jnp.ones_like(latents[0]), latents[1]]
    d_const = losses.mipd_divergences(fuse(const), fuse, const, perturbation="noise", key=key, num_samples=4)
    np.testing.assert_allclose(d_const[0], 0.0, atol=1e-7)


def test_noise_perturbation_statistics():
    z = jnp.asarray(_rng(5).normal(size=(4000, 2)) * np.array([1.0, 3.0]), jnp.float32)
    pert = losses.perturb_latent(z, kind="noise", key=jax.random.key(0), num_samples=3, noise_scale=0.5)
    assert pert.shape == (3, 4000, 2)
    diff = np.asarray(pert - z[None]).reshape(-1, 2)
    np.testing.assert_allclose(diff.std(axis=0), 0.5 * np.asarray(z).std(axis=0), rtol=0.05)


def test_noise_perturbation_holds_its_std_constant_in_the_gradient():
    """``z~_s = z + scale · std_B(z) ⊙ ε_s`` with the per-feature std a constant: d Σ_s <W_s, z~_s> / dz is
    Σ_s W_s exactly (analytic), whatever ε; with the std differentiated it would not be."""
    rng = _rng(7)
    z = jnp.asarray(rng.normal(size=(6, 3)) * np.array([1.0, 2.0, 0.5]), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    key = jax.random.key(3)

    def f(x):
        return jnp.sum(w * losses.perturb_latent(x, kind="noise", key=key, num_samples=4, noise_scale=0.7))

    np.testing.assert_allclose(jax.grad(f)(z), np.asarray(w).sum(0), rtol=1e-5, atol=1e-6)


def test_stop_perturbed_leaves_only_the_clean_path():
    """``stop_perturbed=True``: the gradient with respect to the latents is that of the divergences with
    every perturbed prediction's inputs held constant (only the clean logits differentiate)."""
    latents, _, fuse, _, perms = _mipd_case(2, batch=6)

    def stopped(zs):
        return jnp.sum(losses.mipd_divergences(fuse(zs), fuse, zs, perms, stop_perturbed=True))

    def held(zs):
        const = [jax.lax.stop_gradient(z) for z in zs]
        copies = losses.perturbed_copies(const, "permute", permutations=perms)
        return jnp.sum(losses.divergences_of_copies(fuse(zs), fuse, const, copies))

    def live(zs):
        return jnp.sum(losses.mipd_divergences(fuse(zs), fuse, zs, perms))

    g, want, full = jax.grad(stopped)(latents), jax.grad(held)(latents), jax.grad(live)(latents)
    for a, b, c in zip(g, want, full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert not np.allclose(a, c, atol=1e-4)  # the perturbed path does carry gradient when not stopped


def test_linear_fusion_branch_logit_fast_path_equals_latent_path():
    """Permuting branch logits z_m W_m == permuting z_m under linear late fusion: values and grads."""
    r = _rng(4)
    batch, dims, classes = 7, (3, 5), 4
    zs = [jnp.asarray(r.normal(size=(batch, d)), jnp.float32) for d in dims]
    ws = [jnp.asarray(r.normal(size=(d, classes)), jnp.float32) for d in dims]
    bias = jnp.asarray(r.normal(size=(classes,)), jnp.float32)
    perms = losses.sample_permutations(jax.random.key(1), 4, batch)

    def latent_path(zs, ws, bias):
        fuse = lambda xs: sum(x @ w for x, w in zip(xs, ws, strict=True)) + bias[None]
        return losses.mipd_divergences(fuse(zs), fuse, zs, perms)

    def branch_path(zs, ws, bias):
        branches = [z @ w for z, w in zip(zs, ws, strict=True)]
        combine = lambda bs: sum(bs) + bias[None]
        return losses.mipd_divergences(combine(branches), combine, branches, perms)

    np.testing.assert_allclose(latent_path(zs, ws, bias), branch_path(zs, ws, bias), rtol=1e-5, atol=1e-7)
    g1 = jax.grad(lambda *a: jnp.sum(latent_path(*a)), argnums=(0, 1, 2))(zs, ws, bias)
    g2 = jax.grad(lambda *a: jnp.sum(branch_path(*a)), argnums=(0, 1, 2))(zs, ws, bias)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_permuted_latent_only_moves_its_own_branch():
    r = _rng(6)
    batch, dims, classes = 5, (3, 4, 2), 3
    zs = [jnp.asarray(r.normal(size=(batch, d)), jnp.float32) for d in dims]
    ws = [jnp.asarray(r.normal(size=(d, classes)), jnp.float32) for d in dims]
    perm = np.array([3, 0, 4, 1, 2])
    for m in range(3):
        pert = list(zs)
        pert[m] = zs[m][perm]
        delta = sum(z @ w for z, w in zip(pert, ws, strict=True)) - sum(z @ w for z, w in zip(zs, ws, strict=True))
        np.testing.assert_allclose(delta, zs[m][perm] @ ws[m] - zs[m] @ ws[m], atol=1e-5)


def test_mipd_bad_input():
    latents, _, fuse, clean, perms = _mipd_case(2)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        losses.mipd_divergences(clean, fuse, latents[:1], perms)
    with pytest.raises(ValueError, match=r"\(6, 3\).*\(5, 4\)"):
        losses.mipd_divergences(clean, fuse, [latents[0], latents[1][:5]], perms)
    with pytest.raises(ValueError, match="clean_logits"):
        losses.mipd_divergences(clean[:4], fuse, latents, perms)
    with pytest.raises(ValueError, match="permutations"):
        losses.mipd_divergences(clean, fuse, latents, perms[:, :4])
    with pytest.raises(ValueError, match="needs permutations"):
        losses.mipd_divergences(clean, fuse, latents, None)
    with pytest.raises(ValueError, match="unknown perturbation"):
        losses.mipd_divergences(clean, fuse, latents, perms, perturbation="blur")


# ---------------------------------------------------------------------------------- contrastive


def _con_case(num_modalities=2, batch=8, dim=4, seed=0, classes=3):
    r = _rng(seed)
    zs = [jnp.asarray(r.normal(size=(batch, dim)), jnp.float32) for _ in range(num_modalities)]
    labels = jnp.asarray(r.integers(0, classes, size=batch), jnp.int32)
    return zs, labels


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_ntxent_matches_brute_force(num_modalities, use_mask):
    zs, labels = _con_case(num_modalities)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool) if use_mask else None
    got = losses.supervised_ntxent(zs, labels, temperature=0.5, mask=None if mask is None else jnp.asarray(mask))
    want = ref.ntxent(zs, np.asarray(labels), 0.5, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_cross_modal_supcon_matches_brute_force(num_modalities, use_mask):
    zs, labels = _con_case(num_modalities, seed=1)
    mask = np.array([1, 0, 1, 1, 1, 1, 1, 0], bool) if use_mask else None
    got = losses.cross_modal_supcon(zs, labels, temperature=0.3, mask=None if mask is None else jnp.asarray(mask))
    want = ref.cross_modal_supcon(zs, np.asarray(labels), 0.3, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("fn", ["supervised_ntxent", "cross_modal_supcon"])
def test_contrastive_temperature_is_checked_static_and_nan_when_traced(fn):
    loss = getattr(losses, fn)
    zs, labels = _con_case(2, seed=2)
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            loss(zs, labels, temperature=bad)
    temps = jnp.asarray([0.05, 0.3, 1.0, 0.0, -0.5], jnp.float32)
    traced = jax.jit(jax.vmap(lambda t: loss(zs, labels, temperature=t)))(temps)
    refs = ref.ntxent if fn == "supervised_ntxent" else ref.cross_modal_supcon
    for t, got in zip(np.asarray(temps)[:3], np.asarray(traced)[:3], strict=True):
        np.testing.assert_allclose(got, refs(zs, np.asarray(labels), float(t), None), rtol=2e-5)
        np.testing.assert_allclose(got, loss(zs, labels, temperature=float(t)), rtol=2e-5)
    assert np.all(np.isnan(np.asarray(traced)[3:]))  # not > 0: NaN, which stops a run


def test_ntxent_edge_cases():
    zs, _ = _con_case(2)
    # All labels different: no positive pair except each row with its other-modality copy.
    labels = jnp.arange(8)
    want = ref.ntxent(zs, np.arange(8), 0.5)
    np.testing.assert_allclose(losses.supervised_ntxent(zs, labels), want, rtol=1e-5)
    # All labels equal: no negatives, every pair's loss is 0.
    np.testing.assert_allclose(losses.supervised_ntxent(zs, jnp.zeros(8, jnp.int32)), 0.0, atol=1e-7)
    g = jax.grad(lambda z: losses.supervised_ntxent([z, zs[1]], labels))(zs[0])
    assert bool(jnp.all(jnp.isfinite(g)))


def test_contrastive_bad_input():
    zs, labels = _con_case(2)
    with pytest.raises(ValueError, match="same dimension"):
        losses.supervised_ntxent([zs[0], zs[1][:, :3]], labels)
    with pytest.raises(ValueError, match=r"labels has shape \(7,\)"):
        losses.supervised_ntxent(zs, labels[:7])
    with pytest.raises(ValueError, match="at least 2"):
        losses.cross_modal_supcon(zs[:1], labels)


def test_binarized_regression_labels():
    y = jnp.array([-2.0, -0.1, 0.0, 1.4])
    np.testing.assert_array_equal(losses.binarize_regression_labels(y), [0, 0, 1, 1])


# ---------------------------------------------------------------------------------- CEB


def test_ceb_matches_numpy_and_conditions():
    r = _rng(7)
    zs = [jnp.asarray(r.normal(size=(6, d)), jnp.float32) for d in (3, 4)]
    w1 = jnp.asarray(r.normal(size=(5, 4)), jnp.float32)
    w2 = jnp.asarray(r.normal(size=(4, 7)), jnp.float32)
    decoder = lambda c: jax.nn.relu(c @ w1) @ w2
    logits = jnp.asarray(r.normal(size=(6, 5)), jnp.float32)
    labels = jnp.asarray([0, 1, 4, 2, 2, 3])
    mask = jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)
    got = losses.ceb_term(zs, decoder, fused_logits=logits, mask=mask)
    np.testing.assert_allclose(got, ref.ceb(zs, decoder(logits), np.asarray(mask)), rtol=1e-5)
    got_label = losses.ceb_term(zs, decoder, condition="label", labels=labels, num_classes=5)
    np.testing.assert_allclose(got_label, ref.ceb(zs, decoder(jax.nn.one_hot(labels, 5))), rtol=1e-5)
    # Gradients reach the latents and the decoder, never the fused logits.
    g_logits = jax.grad(lambda lg: losses.ceb_term(zs, decoder, fused_logits=lg))(logits)
    np.testing.assert_array_equal(g_logits, 0.0)
    g_z = jax.grad(lambda z0: losses.ceb_term([z0, zs[1]], decoder, fused_logits=logits))(zs[0])
    assert float(jnp.abs(g_z).sum()) > 0
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(6, 7\)"):
        losses.ceb_loss(zs, jnp.zeros((6, 6)))
    with pytest.raises(ValueError, match="needs labels"):
        losses.ceb_condition(condition="label")


# ---------------------------------------------------------------------------------- jit / vmap


class LossVariantsTest(chex.TestCase):
    """The public losses under jit and without it, with their arguments placed on the device and
    given as host NumPy arrays (chex variants, as optax tests its transformations): every variant
    equals the float64 NumPy version, so jit == no-jit and device == host follow."""

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    def test_mipd_divergences(self):
        latents, params, fuse, clean, perms = _mipd_case(3)
        got = self.variant(lambda c, zs, p: losses.mipd_divergences(c, fuse, zs, p))(clean, latents, perms)
        np.testing.assert_allclose(got, ref.mipd(clean, numpy_mlp_fuse(params), latents, perms), rtol=1e-4, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    def test_jsd_from_logits(self):
        r = _rng(4)
        p, q = (jnp.asarray(r.normal(size=(5, 4)) * 3, jnp.float32) for _ in range(2))
        np.testing.assert_allclose(self.variant(losses.jsd_from_logits)(p, q), ref.jsd_rows(p, q), rtol=1e-4, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    def test_contrastive_forms_with_a_mask(self):
        zs, labels = _con_case(3)
        mask = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], bool)
        for fn, want in ((losses.supervised_ntxent, ref.ntxent), (losses.cross_modal_supcon, ref.cross_modal_supcon)):
            got = self.variant(lambda z, y, m, fn=fn: fn(z, y, temperature=0.3, mask=m))(zs, labels, mask)
            np.testing.assert_allclose(got, want(zs, np.asarray(labels), 0.3, np.asarray(mask)), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True, with_device=True, without_device=True)
    def test_ceb_term_on_both_conditions(self):
        r = _rng(11)
        zs = [jnp.asarray(r.normal(size=(6, d)), jnp.float32) for d in (3, 4)]
        w1, w2 = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((5, 4), (4, 7)))
        decoder = lambda c: jax.nn.relu(c @ w1) @ w2
        logits = jnp.asarray(r.normal(size=(6, 5)), jnp.float32)
        labels = jnp.asarray([0, 1, 4, 2, 2, 3], jnp.int32)
        mask = jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)
        by_logits = self.variant(lambda z, lg, m: losses.ceb_term(z, decoder, fused_logits=lg, mask=m))
        np.testing.assert_allclose(by_logits(zs, logits, mask), ref.ceb(zs, decoder(logits), np.asarray(mask)),
                                   rtol=1e-5)
        by_label = self.variant(lambda z, y: losses.ceb_term(z, decoder, condition="label", labels=y, num_classes=5))
        np.testing.assert_allclose(by_label(zs, labels), ref.ceb(zs, decoder(np.eye(5, dtype=np.float32)[labels])),
                                   rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sample_permutations_are_the_same_draw(self):
        key = jax.random.key(0)
        got = self.variant(lambda k: losses.sample_permutations(k, 4, 6))(key)
        chex.assert_trees_all_equal(got, losses.sample_permutations(key, 4, 6))
        rows = np.asarray(got)
        assert all(sorted(row) == list(range(6)) and all(row != np.arange(6)) for row in rows)  # derangements


def test_chex_checks_name_the_argument_a_silent_broadcast_or_float_label_would_hide():
    """What the losses' ValueError checks did not cover: a mask of another shape than its values
    (broadcast into a wrong mean), float class labels (a one-hot of 0.5 is a row of zeros), a
    divergence vector of another rank; the same under jit (trace time)."""
    with pytest.raises(ValueError, match=r"mask must have the shape of values"):
        losses.masked_mean(jnp.ones(4), jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=r"mask must have the shape of values"):
        jax.jit(losses.masked_mean)(jnp.ones(4), jnp.ones((4, 1)))
    np.testing.assert_allclose(losses.masked_mean(jnp.arange(4.0), jnp.asarray([1, 0, 1, 0])), 1.0)
    with pytest.raises(TypeError, match=r"labels must hold integers"):
        losses.ceb_condition(condition="label", labels=jnp.asarray([0.5, 1.0]), num_classes=3)
    with pytest.raises(ValueError, match=r"divergences must have rank 1"):
        losses.mipd_loss(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"labels must have rank 1"):
        losses.binarize_regression_labels(jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=r"p_logits must have rank >= 1"):
        losses.kl_from_logits(jnp.ones(()), jnp.ones(()))


def test_vmap_equals_loop():
    r = _rng(9)
    n, batch = 3, 6
    params = mlp_fuse_params((3, 4), 8, 5)
    fuse = jax_mlp_fuse(params)
    z0 = jnp.asarray(r.normal(size=(n, batch, 3)), jnp.float32)
    z1 = jnp.asarray(r.normal(size=(n, batch, 4)), jnp.float32)
    perms = jnp.stack([losses.sample_permutations(jax.random.key(i), 2, batch) for i in range(n)])
    labels = jnp.asarray(r.integers(0, 2, size=(n, batch)), jnp.int32)

    def mipd_one(a, b, p):
        return losses.mipd_divergences(fuse([a, b]), fuse, [a, b], p)

    def con_one(a, b, y):
        return losses.supervised_ntxent([a, b[:, :3]], y)

    for fn, args in [(mipd_one, (z0, z1, perms)), (con_one, (z0, z1, labels))]:
        batched = jax.vmap(fn)(*args)
        one = jax.jit(fn)
        looped = jnp.stack([one(*(a[i] for a in args)) for i in range(n)])
        chex.assert_trees_all_close(batched, looped, rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.key(0), n)
    batched_perms = jax.vmap(lambda k: losses.sample_permutations(k, 2, batch))(keys)
    chex.assert_trees_all_equal(batched_perms, jnp.stack([losses.sample_permutations(k, 2, batch) for k in keys]))


def test_top_level_exports():
    for name in ["jsd_from_logits", "mipd_divergences", "supervised_ntxent", "ceb_loss", "competition",
                 "scale_gradient", "assign_players", "sample_permutations"]:
        assert callable(getattr(mcr_jax, name))


# ---------------------------------------------------------------------------------- no silent wrong results


def test_mipd_checks_the_permutations_shape_and_dtype():
    latents, _, fuse, clean, perms = _mipd_case(2)
    with pytest.raises(ValueError, match=r"permutations must have rank 2 \(\[S, B\].*got shape \(6,\).*perm\[None\]"):
        losses.mipd_divergences(clean, fuse, latents, perms[0])
    with pytest.raises(ValueError, match=r"integer row indices.*float32"):
        losses.mipd_divergences(clean, fuse, latents, perms.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(0, 6\): S = 0"):
        losses.mipd_divergences(clean, fuse, latents, perms[:0])
    with pytest.raises(ValueError, match=r"permutations has shape \(3, 4\) but the latent has shape \(6, 3\)"):
        losses.mipd_divergences(clean, fuse, latents, perms[:, :4])
    # Under jit the shape checks fire at trace time.
    with pytest.raises(ValueError, match="rank 2"):
        jax.jit(lambda p: losses.mipd_divergences(clean, fuse, latents, p))(perms[0])


def test_mipd_rejects_rows_that_are_not_permutations():
    """Non-bijections gave wrong gradients (the gather's backward uses the inverse permutation)."""
    latents, _, fuse, clean, perms = _mipd_case(2)
    bad = np.asarray(perms).copy()
    bad[1, 2] = bad[1, 3]  # a repeated index, one missing
    # NumPy permutations are host data: always checked.
    with pytest.raises(ValueError, match=r"permutations row 1 of 3 is not a permutation of 0\.\.5 \(repeated"):
        losses.mipd_divergences(clean, fuse, latents, bad)
    out_of_range = np.asarray(perms).copy()
    out_of_range[2, 0] = 6
    with pytest.raises(ValueError, match=r"row 2 .*values outside 0\.\.5: \[6\]"):
        losses.mipd_divergences(clean, fuse, latents, out_of_range)
    # Device arrays: checked on request (one device-to-host copy).
    with pytest.raises(ValueError, match="row 1 of 3"):
        losses.mipd_divergences(clean, fuse, latents, jnp.asarray(bad), check_permutations=True)
    # Traced: NaN values and gradients instead of silently wrong ones.
    checked = jax.jit(lambda p: losses.mipd_divergences(clean, fuse, latents, p, check_permutations=True))
    assert bool(jnp.all(jnp.isnan(checked(jnp.asarray(bad)))))
    grad = jax.jit(jax.grad(lambda z, p: jnp.sum(losses.mipd_divergences(
        fuse([z, latents[1]]), fuse, [z, latents[1]], p, check_permutations=True))))
    assert bool(jnp.all(jnp.isnan(grad(latents[0], jnp.asarray(bad)))))
    # The same in-graph check is the default (no flag), and the opt-out leaves the values unchecked.
    default = jax.jit(lambda p: losses.mipd_divergences(clean, fuse, latents, p))
    assert bool(jnp.all(jnp.isnan(default(jnp.asarray(bad)))))
    assert bool(jnp.all(jnp.isnan(default(jnp.asarray(out_of_range)))))  # a clamped index, not a silent one
    assert bool(jnp.all(jnp.isnan(losses.mipd_divergences(clean, fuse, latents, jnp.asarray(bad)))))
    unchecked = jax.jit(lambda p: losses.mipd_divergences(clean, fuse, latents, p, check_permutations=False))
    assert bool(jnp.all(jnp.isfinite(unchecked(jnp.asarray(bad)))))
    np.testing.assert_array_equal(default(perms), unchecked(perms))  # valid rows: exactly the unchecked values
    # ... and valid permutations pass untouched.
    np.testing.assert_allclose(checked(perms), losses.mipd_divergences(clean, fuse, latents, perms), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad(latents[0], perms))))
    np.testing.assert_allclose(losses.mipd_divergences(clean, fuse, latents, np.asarray(perms)),
                               losses.mipd_divergences(clean, fuse, latents, perms), rtol=1e-6)


def test_losses_reject_an_empty_batch():
    """B = 0 (or S = 0) gave NaN (MIPD, CEB) or a meaningless 0.0 (contrastive)."""
    fuse = jax_mlp_fuse(mlp_fuse_params((3, 4), 8, 5))
    latents = [jnp.zeros((0, 3)), jnp.zeros((0, 4))]
    clean = fuse(latents)
    perms = jnp.zeros((3, 0), jnp.int32)
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3\)\): B = 0"):
        losses.mipd_divergences(clean, fuse, latents, perms)
    with pytest.raises(ValueError, match="empty batch"):
        losses.mipd_divergences(clean, fuse, latents, perturbation="zero", num_samples=2)
    full, _, fuse6, clean6, _ = _mipd_case(2)
    with pytest.raises(ValueError, match=r"num_samples \(S\) must be >= 1; got 0"):
        losses.mipd_divergences(clean6, fuse6, full, perturbed_latents=[z[None][:0] for z in full])
    zs = [jnp.zeros((0, 4)), jnp.zeros((0, 4))]
    labels = jnp.zeros((0,), jnp.int32)
    for fn in (losses.supervised_ntxent, losses.cross_modal_supcon):
        with pytest.raises(ValueError, match="empty batch"):
            fn(zs, labels)
        with pytest.raises(ValueError, match="empty batch"):
            fn(zs, labels, mask=jnp.zeros((0,), bool))
    with pytest.raises(ValueError, match="D = 0"):
        losses.supervised_ntxent([jnp.zeros((3, 0)), jnp.zeros((3, 0))], jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="empty batch"):
        losses.ceb_loss([jnp.zeros((0, 3)), jnp.zeros((0, 4))], jnp.zeros((0, 7)))
    with pytest.raises(ValueError, match="empty batch"):
        losses.ceb_loss([jnp.zeros((0, 3)), jnp.zeros((0, 4))], jnp.zeros((0, 7)), mask=jnp.zeros((0,)))
    with pytest.raises(ValueError, match="no features"):
        losses.ceb_loss([jnp.zeros((2, 0)), jnp.zeros((2, 0))], jnp.zeros((2, 0)))
    # The sampler already refused S = 0 and B = 0.
    with pytest.raises(ValueError, match="num_samples"):
        losses.sample_permutations(jax.random.key(0), 0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        losses.sample_permutations(jax.random.key(0), 2, 0, derangement=False)
