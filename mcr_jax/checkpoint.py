"""Orbax checkpoints of the training state, the selected (best) weights and the loop's bookkeeping.

One checkpoint per finished epoch (the newest two are kept), written asynchronously in a single
process (:meth:`Checkpointer.save`); each holds three items:

- ``state``: parameters, non-parameter model state, optimizer state, method state, PRNG key, step;
- ``best``: the parameters and model state selected on validation so far;
- ``meta``: JSON — epoch, best epoch and value, patience left, the per-epoch history, the run's
  resolved config, the layout (paths, shapes, dtypes) of ``state`` and ``best``, and a SHA-256
  checksum of ``state``, of ``best`` and of the rest of ``meta`` itself.

Verified restores. A checkpoint is accepted only when orbax reads it, its checksums (the
bookkeeping's included) match what was saved and every floating-point leaf is finite. Before any
array is read, the caller's ``check(meta)`` (the engine compares the stored config) and the layout
are compared: a checkpoint of another config or of another model/method structure is refused with
a ``ValueError`` and left where it is — it is not damaged, only not this run's.
:meth:`Checkpointer.restore_latest_good` tries the newest step first; a step that fails is named,
moved aside to ``<workdir>/broken_checkpoints/`` and the next older one is tried, so a damaged
file costs at most the epochs since the previous step, never a wrong result.
:meth:`Checkpointer.restore_best` (the selected weights, e.g. for uni-pre) refuses a step that
fails verification.

Typed PRNG keys (NNX dropout streams) are stored as their raw key data and re-wrapped on restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def _plain(tree: Any) -> Any:
    """A NamedTuple state (:class:`mcr_jax.state.TrainState`) as a dict, as it is stored."""
    return tree._asdict() if hasattr(tree, "_asdict") else tree


def _rebuild(tree: Any, like: Any) -> Any:
    return type(like)(**tree) if hasattr(like, "_asdict") else tree


def _host(tree: Any) -> Any:
    from mcr_jax import parallel

    return parallel.to_host(to_saveable(tree))


def checksum(tree: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order (typed keys as key data)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(_host(_plain(tree))):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def layout(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype and shape (typed keys as key data): the structure a
    checkpoint must have to be restored into ``tree``; no array is read."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(to_saveable(_plain(tree)))[0]:
        h.update(f"{jax.tree_util.keystr(path)}:{np.dtype(leaf.dtype).str}{tuple(np.shape(leaf))};".encode())
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """SHA-256 of the bookkeeping (``meta`` without its ``checksums``), as JSON with sorted keys."""
    body = {k: v for k, v in meta.items() if k != "checksums"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of floating-point leaves holding NaN or Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(_host(tree))[0]:
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad.append(jax.tree_util.keystr(path))
    return bad


class CheckpointError(RuntimeError):
    """A checkpoint step that cannot be read or fails verification."""


class Checkpointer:
    """Saves and restores ``(state, best, meta)`` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2, enabled: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.enabled = enabled
        self.max_to_keep = max_to_keep
        # One process: a save returns once its arrays are copied to the host and the files are
        # written on orbax's thread while training goes on; every read, the next save and close()
        # wait for it first. Several processes write collectively, synchronously, as before.
        self.asynchronous = jax.process_count() == 1
        if enabled and os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(f"{self.directory} is a file, not a checkpoint folder; move or delete it "
                                     "(the run then starts from scratch), or choose another --workdir.")
        self.manager = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                               enable_async_checkpointing=self.asynchronous)
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "best", "meta"))

    def wait(self) -> None:
        """Until the save in flight (if any) is completely written; its error, if it failed, is raised here."""
        self.manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        self.wait()
        return self.manager.latest_step()

    def save(self, epoch: int, state: Any, best: Any, meta: dict) -> None:
        """Saves step ``epoch``. Asynchronous (one process): the arrays and the bookkeeping are
        copied first, so the caller may change or donate its own while the files are written."""
        if not self.enabled:
            return
        self.wait()
        if self.asynchronous:
            state, best, meta = host_copy(_plain(state)), host_copy(best), json.loads(json.dumps(meta))
        meta = dict(meta, layout={"state": layout(state), "best": layout(best)})
        meta["checksums"] = {"state": checksum(state), "best": checksum(best), "meta": meta_checksum(meta)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_saveable(_plain(state))),
            best=ocp.args.StandardSave(to_saveable(best)),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(epoch, args=args, force=True)
        if not self.asynchronous:
            self.wait()

    def restore(self, epoch: int, state_like: Any, best_like: Any) -> tuple[Any, Any, dict]:
        abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(t))
        self.wait()
        restored = self.manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(_plain(state_like))),
                best=ocp.args.StandardRestore(abstract(best_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = _rebuild(from_saveable(dict(restored.state), _plain(state_like)), state_like)
        return state, from_saveable(restored.best, best_like), dict(restored.meta)

    def read_meta(self, epoch: int) -> dict:
        """Step ``epoch``'s bookkeeping alone, verified against its checksum (no array is read);
        :class:`CheckpointError` when it is unreadable or was changed."""
        where = self._step_dir(epoch)
        self.wait()
        try:
            meta = dict(self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from e
        sums = meta.get("checksums") or {}
        if "meta" not in sums:
            raise CheckpointError(f"checkpoint {where} has no checksum of its bookkeeping (written by an older "
                                  "version).")
        if meta_checksum(meta) != sums["meta"]:
            raise CheckpointError(f"checkpoint {where}: its bookkeeping (meta: epoch, history, config) does not match "
                                  "its saved checksum (the file was changed or damaged).")
        return meta

    def check_layout(self, epoch: int, meta: dict, state_like: Any, best_like: Any) -> None:
        """A ``ValueError`` (nothing moved) when step ``epoch`` holds trees of another structure."""
        stored = meta.get("layout") or {}
        for name, tree in (("state", state_like), ("best", best_like)):
            if stored.get(name) != layout(tree):
                raise ValueError(
                    f"{self.directory} holds a checkpoint (epoch {epoch}) whose {name} has another structure "
                    "(parameter paths, shapes or dtypes) than this run's: it was made with another model, method or "
                    f"option. It was left untouched. Rerun with the config that made it, use another --workdir, or "
                    f"delete {self.directory} to start fresh.")

    def _step_dir(self, epoch: int) -> str:
        return os.path.join(self.directory, str(epoch))

    def verified_restore(self, epoch: int, state_like: Any, best_like: Any) -> tuple[Any, Any, dict]:
        """:meth:`restore`, then the checksums and finiteness checked; :class:`CheckpointError` naming
        the step directory and the cause when anything is wrong."""
        where = self._step_dir(epoch)
        try:
            state, best, meta = self.restore(epoch, state_like, best_like)
        except Exception as e:  # orbax surfaces damaged files as many exception types
            raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from e
        sums = meta.get("checksums")
        if sums is None:
            raise CheckpointError(f"checkpoint {where} has no checksums (written by an older version).")
        for name, tree in (("state", state), ("best", best)):
            if checksum(tree) != sums.get(name):
                raise CheckpointError(f"checkpoint {where}: the {name} arrays do not match their saved checksum "
                                      "(the files were changed or damaged).")
            bad = non_finite_leaves(tree)
            if bad:
                raise CheckpointError(f"checkpoint {where}: non-finite values in {name} {bad[:3]}.")
        return state, best, meta

    def restore_latest_good(self, state_like: Any, best_like: Any, log=print,
                            check=None) -> tuple[Any, Any, dict] | None:
        """The newest step that passes :meth:`verified_restore` (None when there is no step at all).

        Each step's bookkeeping is read and verified first; ``check(meta)`` (e.g. the config
        comparison) and the layout comparison then run before any array is read, and their
        ``ValueError`` propagates with nothing moved. A damaged step is reported through ``log``,
        moved to ``<workdir>/broken_checkpoints/`` (so training can write that epoch again) and the
        next older step is tried. When every step fails, raises :class:`CheckpointError` listing why."""
        failures = []
        while True:
            epoch = self.latest_epoch()
            if epoch is None:
                if failures:
                    raise CheckpointError("no checkpoint step of " + self.directory + " could be restored:\n  "
                                          + "\n  ".join(failures)
                                          + f"\nThe broken steps are in {self._broken_dir()}; delete the workdir "
                                          "to start fresh.")
                return None
            try:
                meta = self.read_meta(epoch)
                if check is not None:
                    check(meta)
                self.check_layout(epoch, meta, state_like, best_like)
                return self.verified_restore(epoch, state_like, best_like)
            except CheckpointError as e:
                failures.append(str(e))
                moved = self._set_aside(epoch)
                log(f"{e}\n  moved it to {moved}; falling back to the previous checkpoint.")

    def _broken_dir(self) -> str:
        return os.path.join(self.workdir, "broken_checkpoints")

    def _set_aside(self, epoch: int) -> str:
        from mcr_jax import parallel

        target = os.path.join(self._broken_dir(), str(epoch))
        self.manager.close()
        if parallel.is_primary():
            os.makedirs(self._broken_dir(), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(self._step_dir(epoch), target)
        self.manager = self._open()
        return target

    def restore_best(self, best_like: Any, epoch: int | None = None) -> Any:
        """Only the selected weights (for uni-pre initialisation and for evaluation), verified
        against their checksum; a damaged step raises :class:`CheckpointError`."""
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: train that run first.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_saveable(best_like))
        where = self._step_dir(epoch)
        self.wait()
        try:
            restored = self.manager.restore(epoch, args=ocp.args.Composite(best=ocp.args.StandardRestore(abstract),
                                                                           meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from e
        best = from_saveable(restored.best, best_like)
        expected = dict(restored.meta).get("checksums", {}).get("best")
        if expected is None or checksum(best) != expected:
            raise CheckpointError(f"checkpoint {where}: the selected weights do not match their saved checksum.")
        bad = non_finite_leaves(best)
        if bad:
            raise CheckpointError(f"checkpoint {where}: non-finite values in the selected weights {bad[:3]}.")
        return best

    def close(self) -> None:
        """Waits for the save in flight, then releases the manager."""
        self.wait()
        self.manager.close()


def host_copy(tree: Any) -> Any:
    """A NumPy copy of a pytree, typed keys as raw key data (safe against buffer donation);
    :func:`from_saveable` turns it back."""
    from mcr_jax import parallel

    return jax.tree.map(np.array, parallel.to_host(to_saveable(tree)))


def _check_unimodal_run(workdir: str, modality: str) -> None:
    """A ``ValueError`` unless ``workdir``'s stored config is a unimodal run of ``modality`` (so
    swapped or mistyped ``method.pretrained`` folders never load the wrong encoder)."""
    path = os.path.join(workdir, "results.json")
    try:
        with open(path) as f:
            method = json.load(f)["config"]["method"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"uni-pre: {path} does not record the run's config ({type(e).__name__}); retrain the "
                         f"unimodal run of {modality!r} there.") from None
    if method.get("name") != "unimodal" or method.get("modality") != modality:
        raise ValueError(f"uni-pre: method.pretrained[{modality!r}] = {workdir} holds a "
                         f"{method.get('name')!r} run of modality {method.get('modality')!r}, not a unimodal run of "
                         f"{modality!r}; point it at that modality's unimodal run.")


def load_pretrained(params, rest, workdirs: dict[str, str], modalities) -> tuple[Any, Any]:
    """Copies ``encoders[m]`` and ``heads[m]`` (and their model state) from unimodal runs' selected weights."""
    params, rest = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, rest)
    missing = [m for m in modalities if m not in workdirs]
    if missing:
        raise ValueError(f"pretrained workdirs are missing for modalities {missing}.")
    for m in modalities:
        wd = os.path.expanduser(workdirs[m])
        if not os.path.exists(os.path.join(wd, "results.json")):
            raise FileNotFoundError(f"uni-pre: the unimodal run for {m!r} in {wd} has not finished (no results.json); "
                                    f"train it first (method.name=unimodal, method.modality={m}).")
        _check_unimodal_run(wd, m)
        best = Checkpointer(wd).restore_best({"params": params, "rest": rest})
        best = from_saveable(best, {"params": params, "rest": rest})
        for part in ("encoders", "heads"):
            params[part][m] = best["params"][part][m]
            if part in best["rest"] and m in best["rest"][part]:
                rest[part][m] = best["rest"][part][m]
    return params, rest
