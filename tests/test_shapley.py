"""The Shapley modality-contribution diagnostic: the pure rule (metrics.shapley_values) against a
brute force over orders, its axioms, and the trainer's subset values (evaluation.shapley) against a slow
evaluation of every subset on a tiny model (M = 2 and M = 3). The smoke run's results.json carrying
it is checked in tests/test_train.py (test_smoke_run_writes_everything)."""

import itertools
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mcr_jax import evaluation, metrics
from mcr_jax.data.types import DatasetInfo
from tests.helpers.method_setup import build


def brute_force(v, names):
    """φ_m as the mean over all M! orders of m's marginal contribution when it joins."""
    phi = dict.fromkeys(names, 0.0)
    orders = list(itertools.permutations(names))
    for order in orders:
        for k, m in enumerate(order):
            before = frozenset(order[:k])
            phi[m] += (v[before | {m}] - v[before]) / len(orders)
    return phi


def random_game(names, rng):
    return {frozenset(s): float(rng.normal()) for r in range(len(names) + 1)
            for s in itertools.combinations(names, r)}


@pytest.mark.parametrize("names", [("a", "b"), ("a", "b", "c")])
def test_shapley_matches_permutations_and_is_efficient(names):
    rng = np.random.default_rng(len(names))
    for _ in range(5):
        v = random_game(names, rng)
        phi = metrics.shapley_values(v, names)
        want = brute_force(v, names)
        np.testing.assert_allclose([phi[m] for m in names], [want[m] for m in names], rtol=0, atol=1e-12)
        assert math.isclose(sum(phi.values()), v[frozenset(names)] - v[frozenset()], abs_tol=1e-12)


def test_shapley_symmetry_and_null_player():
    names = ("a", "b", "c")
    rng = np.random.default_rng(0)
    base = {s: float(rng.normal()) for s in ["", "a", "ab"]}  # v depends on |S ∩ {a, b}| only: a, b symmetric
    v = {}
    for r in range(4):
        for s in itertools.combinations(names, r):
            ab = "".join(sorted(set(s) & {"a", "b"}))
            v[frozenset(s)] = base[{"": "", "a": "a", "b": "a", "ab": "ab"}[ab]]  # c changes nothing: a null player
    phi = metrics.shapley_values(v, names)
    assert math.isclose(phi["a"], phi["b"], abs_tol=1e-12)
    assert abs(phi["c"]) < 1e-12
    # Keys in any order and container; a missing subset is a clear error.
    assert metrics.shapley_values({tuple(reversed(sorted(k))): x for k, x in v.items()}, names) == phi
    with pytest.raises(ValueError, match="every subset"):
        metrics.shapley_values({k: x for k, x in v.items() if k != frozenset("ac")}, names)
    assert metrics.subset_key(()) == "none" and metrics.subset_key(("a", "c")) == "a+c"


def _three_modality_build():
    info = DatasetInfo(name="toy", modalities=("a", "b", "c"), input_shapes={m: (6,) for m in "abc"}, num_classes=3)
    rng = np.random.default_rng(1)
    batch = {m: jnp.asarray(rng.normal(size=(16, 6)), jnp.float32) for m in "abc"}
    batch["label"] = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    batch["mask"] = jnp.ones(16, jnp.float32)
    return build({"name": "joint"}, info=info, batch=batch)


def _toy_run(method, handle, params, batch):
    """A stand-in for mcr_jax.programs.Programs with what evaluation.shapley reads: two evaluation
    batches of 8, the last
    three rows padding (mask 0, contents garbage)."""
    mask = np.ones(16, np.float32)
    mask[13:] = 0
    padded = {k: (jnp.where(jnp.asarray(mask > 0).reshape((-1,) + (1,) * (v.ndim - 1)), v, 1e3 * jnp.ones_like(v))
                  if k in method.modalities else v) for k, v in batch.items()}
    padded["mask"] = jnp.asarray(mask)
    batches = [{k: v[i:i + 8] for k, v in padded.items()} for i in (0, 8)]
    gd = handle.graphdef_eval
    fuse = jax.jit(lambda p, r, z: method.fuse(nnx.merge(gd, p, r), z))
    run = types.SimpleNamespace(
        method=method, info=types.SimpleNamespace(modalities=method.modalities), eval_batch_size=8,
        config=ml_collections.ConfigDict({"eval": {"shapley": True, "shapley_absent": "zero_input"}}),
        batches=lambda split, bs, train, epoch: iter(batches),
        subset_predict=jax.jit(evaluation.make_subset_predict(method, gd)),
        fuse_fn=lambda p, r, z: np.asarray(fuse(p, r, {m: jnp.asarray(x) for m, x in z.items()})))
    return run, padded


def _slow_values(method, handle, params, batch, absent):
    """Every subset's accuracy on the 13 valid rows, eager and unbatched, accuracy in NumPy."""
    model = nnx.merge(handle.graphdef_eval, params, handle.rest)
    valid = {k: v[:13] for k, v in batch.items()}
    labels = np.asarray(valid["label"])
    latents = method.predict(model, valid)["latents"]
    names, out = method.modalities, {}
    for r in range(len(names) + 1):
        for s in itertools.combinations(names, r):
            if absent == "zero_input":
                x = {k: (jnp.zeros_like(v) if k in names and k not in s else v) for k, v in valid.items()}
                logits = method.predict(model, x)["logits"]
            else:
                z = {m: (latents[m] if m in s else jnp.broadcast_to(
                    jnp.zeros_like(latents[m][0]) if absent == "zero" else np.mean(np.asarray(latents[m]), 0),
                    latents[m].shape)) for m in names}
                logits = method.fuse(model, z)
            out[frozenset(s)] = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    return out


@pytest.mark.parametrize("three", [False, True])
def test_diagnostic_matches_a_slow_evaluation_of_every_subset(three):
    method, handle, params, batch, _ = _three_modality_build() if three else build({"name": "joint"})
    names = method.modalities
    # Perturbed parameters: an encoder's latent of a zero input is no longer zero ("zero_input" ≠ "zero").
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.03 * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys, strict=True)])
    run, padded = _toy_run(method, handle, params, batch)  # compiled once, every replacement
    tables = []
    for absent in evaluation.SHAPLEY_ABSENT:
        run.config.eval.shapley_absent = absent
        res = evaluation.shapley(run, params, handle.rest, "test")
        tables.append(res["shapley_subsets"])
        want = _slow_values(method, handle, params, padded, absent)
        assert set(res["shapley_subsets"]) == {metrics.subset_key(s) for r in range(len(names) + 1)
                                              for s in itertools.combinations(names, r)}
        for s, v in want.items():
            key = metrics.subset_key(tuple(m for m in names if m in s))
            assert math.isclose(res["shapley_subsets"][key], v, abs_tol=1e-9), (absent, key)
        phi = brute_force(want, names)
        np.testing.assert_allclose([res["shapley"][m] for m in names], [phi[m] for m in names], atol=1e-9)
    assert tables[0] != tables[1] != tables[2]  # the three replacements differ on this model
    assert len(set(tables[0].values())) > 2  # and the subsets' values are not all alike
    run.config.eval.shapley = False
    assert evaluation.shapley(run, params, handle.rest, "test") == {}


def test_the_device_resident_pass_equals_the_batch_by_batch_pass():
    """Programs.subset_split (the whole split in one compiled program, used when the split is on the
    device) gives evaluation.shapley the same logits, latents and labels as the host batch loop, so
    the same Shapley values and subset values, for every way of making a modality absent."""
    from experiments.configs import synthetic
    from mcr_jax.programs import Programs

    cfg = synthetic.get_config("smoke")
    cfg.data.num_test = 70  # test in several chunks of validation's layout, the last one padded
    cfg.eval.batch_size = 16
    cfg.parallel.num_devices = 1
    progs = Programs.single(cfg)
    assert progs.compiled
    params = jax.tree.map(lambda x: x[0], progs.states.params)
    rest = jax.tree.map(lambda x: x[0], progs.states.rest)
    batch_by_batch = types.SimpleNamespace(**{n: getattr(progs, n) for n in (
        "method", "info", "config", "eval_batch_size", "batches", "subset_predict", "fuse_fn")})
    for keep in ([1.0, 1.0], [1.0, 0.0], [0.0, 0.0]):
        split = progs.subset_split(params, rest, "test", keep, {})
        assert split[0].shape[0] == 70 and split[2].shape == (70,)
    for mode in evaluation.SHAPLEY_ABSENT:
        progs.config.eval.shapley_absent = mode  # the programs' own (resolved) config, shared by both
        for split in ("validation", "test"):
            device = evaluation.shapley(progs, params, rest, split)
            host = evaluation.shapley(batch_by_batch, params, rest, split)
            assert device["shapley_subsets"] == pytest.approx(host["shapley_subsets"], abs=1e-12), (mode, split)
            assert device["shapley"] == pytest.approx(host["shapley"], abs=1e-12), (mode, split)
    # the pieces themselves, against the host loop's
    keep = np.array([1.0, 0.0], np.float32)
    logits, latents, labels = progs.subset_split(params, rest, "test", keep, {})
    ref_logits, ref_labels = [], []
    for batch in progs.batches("test", progs.eval_batch_size, train=False, epoch=0):
        out = jax.device_get(progs.subset_predict(params, rest, batch, jnp.asarray(keep), {}))
        valid = np.asarray(batch["mask"]) > 0
        ref_logits.append(np.asarray(out["logits"])[valid])
        ref_labels.append(np.asarray(batch["label"])[valid])
    np.testing.assert_allclose(logits, np.concatenate(ref_logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(labels, np.concatenate(ref_labels))
    assert set(latents) == set(progs.info.modalities)
