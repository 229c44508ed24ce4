"""Orbax checkpoints of the training state, the selected (best) weights and the loop's bookkeeping.

One checkpoint per finished epoch (the newest two are kept); each holds three items:

- ``state``: parameters, non-parameter model state, optimizer state, method state, PRNG key, step;
- ``best``: the parameters and model state selected on validation so far;
- ``meta``: JSON — epoch, best epoch and value, patience left, the per-epoch history, config.

Typed PRNG keys (NNX dropout streams) are stored as their raw key data and re-wrapped on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def from_saveable(tree: Any, like: Any) -> Any:
    def back(x, ref):
        if _is_typed_key(ref):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        return x

    return jax.tree.map(back, tree, like)


class Checkpointer:
    """Saves and restores ``(state, best, meta)`` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2, enabled: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.enabled = enabled
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "best", "meta"))

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, best: Any, meta: dict) -> None:
        if not self.enabled:
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_saveable(state)),
            best=ocp.args.StandardSave(to_saveable(best)),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(epoch, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, epoch: int, state_like: Any, best_like: Any) -> tuple[Any, Any, dict]:
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(t))
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(state_like)),
                best=ocp.args.StandardRestore(abstract(best_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return (from_saveable(restored.state, state_like), from_saveable(restored.best, best_like),
                dict(restored.meta))

    def restore_best(self, best_like: Any, epoch: int | None = None) -> Any:
        """Only the selected weights (for uni-pre initialisation and for evaluation)."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: train that run first.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(best_like))
        restored = self.manager.restore(epoch, args=ocp.args.Composite(best=ocp.args.StandardRestore(abstract)))
        return from_saveable(restored.best, best_like)

    def close(self) -> None:
        self.manager.close()


def host_copy(tree: Any) -> Any:
    """A NumPy copy of a pytree, typed keys as raw key data (safe against buffer donation);
    :func:`from_saveable` turns it back."""
    from mcr_jax import parallel

    return jax.tree.map(np.array, parallel.to_host(to_saveable(tree)))
