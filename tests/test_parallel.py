"""Data parallelism on 8 fake CPU devices: sharded == single device, one compilation, the local
permutation scope, clear errors, and a 2-process run on localhost against the single-process one."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax import parallel, train
from mcr_jax.programs import Programs


def two_device_config():
    cfg = synthetic.get_config("smoke")
    cfg.train.batch_size = 24
    cfg.train.num_epochs = 2
    cfg.eval.batch_size = 32
    cfg.parallel.num_devices = 0  # every device: 2 processes x 1 device in the worker
    return cfg


def _one_step(cfg, num_devices):
    run = Programs.single(cfg, mesh=parallel.make_mesh(num_devices))
    batch = next(run.run_batches(1, None))
    state, mets = run.train_step(run.states, batch)  # one run: leading axis K = 1
    return run, jax.device_get(state.params), jax.tree.map(lambda m: m[0], jax.device_get(mets))


@pytest.mark.parametrize("method", ["joint", "mcr"])
def test_sharded_step_equals_single_device(method):
    cfg = synthetic.get_config("smoke")
    if method != "mcr":
        cfg.method = {"name": method}
    run8, params8, mets8 = _one_step(cfg, 8)
    _, params1, mets1 = _one_step(cfg, 1)
    assert run8.mesh.devices.size == 8
    batch = next(run8.run_batches(1, None))
    assert len(batch["x1"].sharding.device_set) == 8  # the batch really is split over the devices
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params8, params1)
    np.testing.assert_allclose(mets8["loss"], mets1["loss"], rtol=1e-5)


def test_step_compiles_once():
    run = Programs.single(synthetic.get_config("smoke"), mesh=parallel.make_mesh(8))
    state = run.states
    for epoch in (1, 2):
        for batch in run.run_batches(epoch, None):
            state, _ = run.train_step(state, batch)
    assert run.train_step._cache_size() == 1


def test_local_permutation_scope_stays_on_its_shard_and_differs_from_global():
    mesh = parallel.make_mesh(8)
    z = jnp.arange(32.0)[:, None]  # row b holds b
    perms = parallel.sample_local_permutations(jax.random.PRNGKey(0), 3, 32, 8)
    out = np.asarray(parallel.local_permute(mesh, z, perms))[..., 0]  # [S, B]
    rows = np.arange(32)
    assert np.all(out // 4 == rows[None] // 4)  # each partner comes from the same device's 4 rows
    assert not np.all(out == rows[None])
    for s in range(3):
        for d in range(8):
            assert sorted(out[s, 4 * d:4 * d + 4]) == list(range(4 * d, 4 * d + 4))
    cfg = synthetic.get_config("smoke")
    cfg.method.permutation_scope = "local"
    _, params_local, mets_local = _one_step(cfg, 8)
    _, _, mets_global = _one_step(synthetic.get_config("smoke"), 8)
    assert np.isfinite(mets_local["loss"])
    assert float(mets_local["mipd_x1"]) != pytest.approx(float(mets_global["mipd_x1"]), rel=1e-6)


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_local_scope_expectation_does_not_depend_on_the_device_count(num_devices):
    """One-hot latents: every pair of distinct rows gives the same JSD c, so a derangement gives
    MIPD = c exactly, on any number of devices (fixed points would give c (1 - 1/B_local))."""
    from mcr_jax.losses import jsd_from_logits, mipd_divergences

    b = 16
    mesh = parallel.make_mesh(num_devices)
    z = [jnp.eye(b), jnp.eye(b)]
    fuse = lambda xs: 5.0 * (xs[0] + xs[1])  # noqa: E731
    clean = fuse(z)
    c = float(jsd_from_logits(clean[0], 5.0 * (z[0][1] + z[1][0])))
    for seed in range(4):
        perms = parallel.sample_local_permutations(jax.random.PRNGKey(seed), 8, b, num_devices)
        perturbed = [parallel.local_permute(mesh, zm, perms) for zm in z]
        d = mipd_divergences(clean, fuse, z, perturbed_latents=perturbed)
        np.testing.assert_allclose(d, c, rtol=1e-5)


def test_bad_device_and_batch_combinations():
    cfg = synthetic.get_config("smoke")
    cfg.train.batch_size = 30
    with pytest.raises(ValueError, match="train.batch_size=30 is not divisible by the 8 devices"):
        Programs.single(cfg, mesh=parallel.make_mesh(8))
    cfg = synthetic.get_config("smoke")
    cfg.eval.batch_size = 20
    with pytest.raises(ValueError, match="eval.batch_size=20 is not divisible by the 8 devices"):
        Programs.single(cfg, mesh=parallel.make_mesh(8))
    with pytest.raises(ValueError, match="9 but 8 devices"):
        parallel.make_mesh(9)
    with pytest.raises(ValueError, match="coordinator address"):
        parallel.initialize("localhost:1", 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_the_single_process_run(tmp_path):
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.mp_worker", str(i), port, str(tmp_path / "mp")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    cfg = two_device_config()
    cfg.parallel.num_devices = 2
    single = train.train_and_evaluate(cfg, str(tmp_path / "single"))
    with open(tmp_path / "mp" / "results.json") as f:
        multi = json.load(f)
    hist = lambda d: [json.loads(line)["train"]["loss"] for line in open(d / "metrics.jsonl")]
    np.testing.assert_allclose(hist(tmp_path / "mp"), hist(tmp_path / "single"), rtol=1e-5)
    assert multi["best_epoch"] == single["best_epoch"]
    fused = lambda r: r["test"]["heads"]["fused"]["accuracy"]
    np.testing.assert_allclose(fused(multi), fused(single))
    assert "epoch 1/2" in outs[0] and "] done in " in outs[0]  # only process 0 logs
    assert "epoch" not in outs[1] and "done in" not in outs[1]
