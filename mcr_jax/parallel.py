"""Data parallelism with today's JAX idiom: one mesh axis ``"data"``, ``jax.jit`` with ``NamedSharding``.

Parameters and optimizer state are replicated, batches are sharded along ``"data"``, and the step
is written for the **global** batch: XLA inserts the collectives, so a permutation of the batch or
the contrastive similarity matrix means the same on 1 device and on 256. ``jax.shard_map`` is used
only where work is explicitly per device (the ``local`` permutation scope of MIPD).

Multi-host: call :func:`initialize` (``jax.distributed.initialize``) first; every process reads its
own contiguous slice of each global batch (``batches(..., process_index, process_count)``) and
:func:`global_batch` assembles the global array without moving data.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``).

    Arguments default to the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with none of them set (and none given) nothing
    happens, so single-host runs need no flags. On CPU the gloo collectives are switched on.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None:
        return
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError("a multi-process run needs the coordinator address, the number of processes and this "
                         f"process's id; got {coordinator_address!r}, {num_processes!r}, {process_id!r}.")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


#: the ``parallel`` section's options: ``num_devices`` (0 = every visible device, all hosts; the
#: global batch must divide evenly among them).
DEFAULTS = dict(num_devices=0)


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (0: every visible device, all hosts)."""
    devices = jax.devices()
    n = len(devices) if not num_devices else int(num_devices)
    if n < 1 or n > len(devices):
        raise ValueError(f"parallel.num_devices={num_devices} but {len(devices)} devices are visible.")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError("a multi-process run uses every device of every process: leave parallel.num_devices at 0.")
    return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    """A clear error when the global batch does not split evenly over the devices and processes."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"{what}={global_batch_size} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n} (or set parallel.num_devices).")
    if global_batch_size % jax.process_count():
        raise ValueError(f"{what}={global_batch_size} is not divisible by the {jax.process_count()} processes.")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf on every device of the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch → global arrays sharded along ``"data"`` (no data movement)."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly sharded, possibly multi-host) arrays, gathered on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def is_primary() -> bool:
    """Whether this process writes metrics, results and logs."""
    return jax.process_index() == 0


def local_permute(mesh: Mesh, z: jax.Array, local_permutations: jax.Array) -> jax.Array:
    """Permutes rows within each device's shard: ``[B, ...]`` and ``[S, B]`` local indices → ``[S, B, ...]``.

    ``local_permutations[s, d·B_l + i]`` is an index into device ``d``'s ``B_l`` rows. Runs under
    ``jax.shard_map``: no data moves between devices. (A different estimator from the global
    permutation: partners are drawn from the same device's rows only.)
    """
    spec_z = P(DATA, *([None] * (z.ndim - 1)))
    spec_out = P(None, DATA, *([None] * (z.ndim - 1)))
    return jax.shard_map(lambda zl, pl: zl[pl], mesh=mesh, in_specs=(spec_z, P(None, DATA)),
                         out_specs=spec_out)(z, local_permutations)


def sample_local_permutations(key: jax.Array, num_samples: int, batch_size: int, num_shards: int, *,
                              derangement: bool = True, method: str = "shift") -> jax.Array:
    """``[S, B]`` local indices: an independent permutation (by default a derangement) of each shard's
    ``B / num_shards`` rows."""
    from mcr_jax.losses import sample_permutations

    if batch_size % num_shards:
        raise ValueError(f"batch size {batch_size} is not divisible by {num_shards} shards.")
    per = batch_size // num_shards
    keys = jax.random.split(key, num_shards)
    perms = jax.vmap(lambda k: sample_permutations(k, num_samples, per, derangement=derangement, method=method))(keys)
    return jax.numpy.transpose(perms, (1, 0, 2)).reshape(num_samples, batch_size)
