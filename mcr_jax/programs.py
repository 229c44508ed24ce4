"""The compiled programs of a set of K runs that share one static configuration.

A run is one seed of a config, optionally with its own traced hyperparameters (a grid point, see
:mod:`mcr_jax.seeds`). K runs with the same static configuration — data, model, method and
optimizer, differing only in seed, traced values and per-run initial weights — train as **one**
program: their :class:`~mcr_jax.state.TrainState` are stacked on a leading ``[K]`` axis and every
program below maps over it (``jax.vmap``; for K = 1 the single run's function itself, so a single
run compiles exactly the program it always had). A single run is K = 1.

- :meth:`Programs.train_epoch`: one training epoch of all K runs.
  *Device-resident data* (in-memory splits, one process): ``vmap ∘ lax.scan`` over the batches
  gathered on the device from each run's ``[steps, B]`` example indices — one call per epoch.
  *Streamed data* (TFDS/grain, several processes, or ``train.compiled_epochs = False``): the host
  pipeline assembles a ``[K, B]`` batch per step, in which run ``k`` gets exactly the batch it would
  get alone (its own shuffled order, augmentation and sampling weights), and a vmapped step consumes
  it. A background thread prepares and transfers the next ``train.prefetch`` batches while the
  current step runs; the fraction of the epoch spent waiting for input is returned (the engine
  writes it into ``metrics.jsonl``).
- :meth:`Programs.evaluate`: a whole split for all K runs: one compiled call for a device-resident
  split, else the vmapped evaluation step over the host batches (the same padded batches for every
  run); an :class:`~mcr_jax.evaluation.EvalOutput`.
- per run (host hooks, Shapley): ``features_fn``, ``fuse_fn``, ``fresh_params``, ``subset_predict``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mcr_jax import data as data_lib
from mcr_jax import parallel
from mcr_jax.checkpoint import load_pretrained
from mcr_jax.config import resolve_config
from mcr_jax.data.pipeline import num_batches
from mcr_jax.evaluation import SHAPLEY_ABSENT, EvalOutput, make_subset_predict
from mcr_jax.methods import get_method
from mcr_jax.methods.base import ModelHandle, model_inputs
from mcr_jax.models.build import build_model
from mcr_jax.optim import make_optimizer
from mcr_jax.shared_jit import shared_jit
from mcr_jax.state import StepOutput, TrainState, init_state, split_model
from mcr_jax.steps import eval_layout, make_epoch_fn, make_eval_fn, make_eval_step, make_train_step, scan_split

#: the splits the trainer evaluates (validation every epoch, both at the end)
EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass
class RunSpec:
    """One run: its seed, traced hyperparameters (``{option: value}``; empty for an ordinary run),
    full config and directory (results, history, its own checkpoint)."""

    seed: int
    hparams: dict
    config: Any
    dir: str


def stack(trees):
    """Stacks pytrees of the same structure on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _on_device(*trees) -> bool:
    """Whether every leaf of ``trees`` is a JAX array (then one compiled call does a whole tree:
    one dispatch instead of one per leaf; the same values)."""
    leaves = jax.tree.leaves(trees)
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


_take = jax.jit(lambda tree, k: jax.tree.map(lambda x: x[k], tree))
_put = jax.jit(lambda tree, k, value: jax.tree.map(lambda x, v: x.at[k].set(v), tree, value))
_put_rows = jax.jit(lambda tree, index, rows: jax.tree.map(lambda x, *vs: x.at[index].set(jnp.stack(vs)), tree,
                                                           *rows))


def take(tree, k: int):
    """Entry ``k`` of a stacked pytree."""
    if _on_device(tree):
        return _take(tree, k)
    return jax.tree.map(lambda x: x[k], tree)


def put(tree, k: int, value):
    """A stacked pytree with entry ``k`` replaced (device arrays: a new tree; NumPy: in place)."""
    if _on_device(tree, value):
        return _put(tree, k, value)

    def one(x, v):
        if isinstance(x, np.ndarray):
            x[k] = v
            return x
        return x.at[k].set(v)

    return jax.tree.map(one, tree, value)


def put_rows(tree, rows: dict):
    """A stacked pytree with entry ``k`` replaced by ``rows[k]`` for every ``k`` of ``rows``: one
    update per leaf, however many runs changed (device arrays: a new tree; NumPy: in place)."""
    index = sorted(rows)
    if _on_device(tree, [rows[k] for k in index]):
        return _put_rows(tree, np.asarray(index, np.int32), [rows[k] for k in index])
    new = stack([rows[k] for k in index])

    def one(x, v):
        if isinstance(x, np.ndarray):
            x[index] = np.asarray(v)
            return x
        return x.at[np.asarray(index)].set(v)

    return jax.tree.map(one, tree, new)


def over_runs(fn, k: int, in_axes: tuple):
    """``fn`` mapped over the leading ``[K]`` axis of the arguments whose ``in_axes`` entry is 0
    (``None``: shared by the runs). For ``k == 1`` the single run's ``fn`` itself, between a squeeze
    and an expand of that axis: a single run is the program it always was."""
    if k > 1:
        return jax.vmap(fn, in_axes=in_axes)

    def one(*args):
        args = [jax.tree.map(lambda x: x[0], a) if ax == 0 else a for a, ax in zip(args, in_axes, strict=True)]
        return jax.tree.map(lambda x: x[None], fn(*args))

    return one


def compiled_epochs(config, data) -> bool:
    """Whether whole epochs run as one compiled call: in-memory training data, one process, and
    ``train.compiled_epochs`` not switched off."""
    return (bool(config.train.compiled_epochs) and jax.process_count() == 1
            and hasattr(data, "in_memory") and data.in_memory("train"))


class _Prefetch:
    """Iterates ``produce()``'s items, made ``size`` ahead on a background thread (``size`` 0: inline).

    ``waited`` is the time the consumer spent blocked on the next item. An exception in the
    producer is raised in the consumer; closing (or leaving the ``with`` block) stops the thread."""

    _DONE = object()

    def __init__(self, produce, size: int):
        self.waited = 0.0
        self._size = int(size)
        self._stop = threading.Event()
        if self._size <= 0:
            self._it = iter(produce())
            return
        self._queue: queue.Queue = queue.Queue(maxsize=self._size)
        self._thread = threading.Thread(target=self._fill, args=(produce,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, produce):
        try:
            for item in produce():
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as e:  # raised again in the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        if self._size <= 0:
            try:
                return next(self._it)
            finally:
                self.waited += time.perf_counter() - t0
        item = self._queue.get()
        self.waited += time.perf_counter() - t0
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        if self._size > 0:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Programs:
    """Data, method, model structure, the stacked initial state and the compiled programs of the
    runs ``specs`` (see the module docstring).

    Args:
      specs: the runs; their configs must share everything but the seed, the traced options and
        the per-run initial weights (``method.pretrained``, ``init.pretrained``, UMT's teachers).
      data: the loaded dataset of ``specs[0].config.data`` (loaded here when not given).
      mesh: the device mesh (default: ``parallel.num_devices`` devices).
    """

    def __init__(self, specs: list[RunSpec], *, data=None, mesh=None):
        if not specs:
            raise ValueError("Programs needs at least one run.")
        self.specs = list(specs)
        self.k = len(self.specs)
        config = self.config = resolve_config(self.specs[0].config)
        self.data = data if data is not None else data_lib.load(config.data)
        info = self.info = self.data.info
        self.method = get_method(config.method, info)
        self.mesh = mesh if mesh is not None else parallel.make_mesh(int(config.parallel.num_devices))
        for split in ("train", "validation", "test"):
            if self.data.size(split) < 1:
                raise ValueError(f"the {split} split of dataset {info.name!r} is empty: a run needs examples in "
                                 "train (to learn), validation (to select) and test (to report); check the "
                                 "config.data split sizes or the dataset files.")
        tc = config.train
        self.batch_size, epochs = int(tc.batch_size), int(tc.num_epochs)
        self.eval_batch_size = int(config.eval.batch_size or self.batch_size)
        parallel.check_batch_size(self.batch_size, self.mesh)
        parallel.check_batch_size(self.eval_batch_size, self.mesh, "eval.batch_size")
        self.steps_per_epoch = num_batches(self.data.size("train"), self.batch_size, drop_remainder=True)
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={self.batch_size} exceeds the {self.data.size('train')} "
                             "training examples.")
        if str(config.eval.shapley_absent) not in SHAPLEY_ABSENT:
            raise ValueError(f"eval.shapley_absent={config.eval.shapley_absent!r}; choose one of {SHAPLEY_ABSENT}.")
        self.prefetch = int(tc.prefetch)
        if self.prefetch < 0:
            raise ValueError(f"train.prefetch must be >= 0 (0 = no prefetch); got {self.prefetch}.")

        model = build_model(config.model, info, seed=int(self.specs[0].seed))
        self.method.check_model(model)
        self.graphdef_train, self.graphdef_eval, params, rest = split_model(model)
        self.tx = self.method.make_optimizer(make_optimizer(config.optim, epochs * self.steps_per_epoch), params)
        first = self._initial_state(self.specs[0], params, rest, self.method)
        others = [self._initial_state(sp) for sp in self.specs[1:]]
        self.states = parallel.replicate(stack([first, *others]), self.mesh)
        self.compiled = compiled_epochs(config, self.data)
        self._compile(first)

    @classmethod
    def single(cls, config, *, mesh=None, data=None) -> Programs:
        """The programs of one run of ``config`` (K = 1), e.g. to drive its steps by hand."""
        config = resolve_config(config)
        return cls([RunSpec(int(config.seed), {}, config, "")], data=data, mesh=mesh)

    # ---- set-up ------------------------------------------------------------------------------
    def _initial_state(self, spec: RunSpec, params=None, rest=None, method=None) -> TrainState:
        """Run ``spec``'s state before its first step: its seed's model (or the given one), its
        pretrained weights, its method state (its own method instance: per-run options such as
        UMT's teachers), its traced values."""
        if params is None:
            model = build_model(spec.config.model, self.info, seed=int(spec.seed))
            method = get_method(spec.config.method, self.info)
            method.check_model(model)
            _, _, params, rest = split_model(model)
        pretrained = spec.config.method.get("pretrained", None) or spec.config.init.pretrained
        if pretrained:  # uni-pre, or any method started from unimodal runs (init.pretrained)
            params, rest = load_pretrained(params, rest, dict(pretrained), self.info.modalities)
        return init_state(params, rest, self.tx, method, int(spec.seed), hparams=spec.hparams)

    def _compile(self, one: TrainState) -> None:
        config, method, mesh, k = self.config, self.method, self.mesh, self.k
        gtrain, geval, info = self.graphdef_train, self.graphdef_eval, self.info
        sample = next(self.data.batches("train", self.batch_size, train=True, seed=int(self.specs[0].seed), epoch=1))
        shapes = jax.eval_shape(lambda p, r, b, key, ms: StepOutput(*method.gradients(
            ModelHandle(gtrain, geval, r, mesh), p, b, key, ms)).metrics,
            one.params, one.rest, sample, one.key, one.method_state)
        self.metric_names = sorted(shapes) + ["grad_norm"]
        rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        self.run_batch_sharding = NamedSharding(mesh, P(None, parallel.DATA))  # [K, B]: B over the devices
        self.step = make_train_step(method, self.tx, gtrain, geval, self.metric_names,
                                    float(config.optim.learning_rate), mesh=mesh)
        self.eval_step = make_eval_step(method, geval, int(config.eval.mipd_samples))
        self.train_step = shared_jit(over_runs(self.step, k, (0, 0)), in_shardings=(rep, self.run_batch_sharding),
                                     out_shardings=(rep, rep), donate_argnums=0)
        self._eval_step = shared_jit(over_runs(self.eval_step, k, (0, 0, None, None, 0)),
                                  in_shardings=(rep, rep, shard, rep, rep))
        self.device_arrays: dict[str, Any] = {}
        self._epoch_fn = self._eval_fn = self._subset_fn = None
        if self.compiled:
            self.device_arrays["train"] = parallel.replicate(self.data.arrays("train"), mesh)
            self._epoch_fn = shared_jit(over_runs(make_epoch_fn(self.step, batch_sharding=shard), k, (0, None, 0)),
                                        in_shardings=(rep, rep, rep), out_shardings=(rep, rep), donate_argnums=0)
            self._place_eval_splits()
            fn = make_eval_fn(self.eval_step, batch_sharding=shard)
            self._eval_fn = shared_jit(over_runs(fn, k, (0, 0, None, 0, None, None, None, None)),
                                       in_shardings=(rep,) * 8)
            subset = make_subset_predict(method, geval)
            self._subset_fn = shared_jit(
                lambda p, r, arrays, keep, hparams, rows, mask, first, base: scan_split(
                    lambda batch, i: subset(p, r, batch, keep, hparams), arrays, rows, mask, first, base,
                    batch_sharding=shard), in_shardings=(rep,) * 9)

        encode = shared_jit(lambda p, r, b: nnx.merge(geval, p, r).encode(*model_inputs(b, info.modalities)),
                            in_shardings=(rep, rep, shard))
        fuse = shared_jit(lambda p, r, z: method.fuse(nnx.merge(geval, p, r), z))
        self.subset_predict = shared_jit(make_subset_predict(method, geval))

        def features_fn(p, r, split):
            feats, labels = {}, []
            for batch in self.batches(split, self.eval_batch_size, train=False, epoch=0):
                out, host = parallel.to_host((encode(p, r, batch), batch))
                valid = np.asarray(host["mask"]) > 0
                for m, z in out.items():
                    feats.setdefault(m, []).append(z[valid])
                labels.append(np.asarray(host["label"])[valid])
            return {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels)

        def fresh_params(new_seed):
            fresh = build_model(config.model, info, seed=int(new_seed))
            return parallel.replicate(nnx.as_pure(nnx.split(fresh, nnx.Param, ...)[1]), mesh)

        def fuse_fn(p, r, latents):
            return np.asarray(parallel.to_host(fuse(p, r, {m: jnp.asarray(v) for m, v in latents.items()})))

        self.features_fn, self.fresh_params, self.fuse_fn = features_fn, fresh_params, fuse_fn

    def _place_eval_splits(self) -> None:
        """Validation and test on the devices for the compiled evaluation: both splits in one set of
        arrays (validation first) when their columns agree in everything but the row count, so one
        program scores both; each split in chunks of the validation split's ``[num_batches, B]``
        layout (validation in one call; test in as many as it needs, its last chunk padded with
        batches of mask 0 that are dropped)."""
        hosts = {s: self.data.arrays(s) for s in EVAL_SPLITS}
        same = jax.tree.structure(hosts["validation"]) == jax.tree.structure(hosts["test"]) and all(
            a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(hosts["validation"]), jax.tree.leaves(hosts["test"]), strict=True))
        if same:
            both = parallel.replicate(jax.tree.map(lambda *xs: np.concatenate(xs), *hosts.values()), self.mesh)
        layouts = {s: tuple(np.asarray(a) for a in eval_layout(self.data.size(s), self.eval_batch_size))
                   for s in EVAL_SPLITS}
        chunk = layouts["validation"][0].shape[0]
        self._eval_splits: dict[str, tuple] = {}
        base = 0
        for split in EVAL_SPLITS:
            rows, mask = layouts[split]
            nb = rows.shape[0]
            pad = -nb % chunk
            rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)]).astype(np.int32)
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
            arrays = both if same else parallel.replicate(hosts[split], self.mesh)
            chunks = [parallel.replicate((rows[j:j + chunk], mask[j:j + chunk], np.int32(j),
                                          np.int32(base if same else 0)), self.mesh) for j in range(0, nb, chunk)]
            self._eval_splits[split] = (arrays, chunks, nb)
            base += self.data.size(split)

    def precompile(self) -> dict[str, float]:
        """Lowers and compiles the training epoch and the evaluation now rather than at their first
        call (device-resident data; nothing to do otherwise); returns the seconds each took. The
        comparison runner calls it on a background thread for the next method while the current
        one trains."""
        times: dict[str, float] = {}
        if self._epoch_fn is None:
            return times
        t0 = time.perf_counter()
        self._epoch_fn.compile(self.states, self.device_arrays["train"], self.epoch_rows(1))
        times["epoch"] = time.perf_counter() - t0
        for split in EVAL_SPLITS:
            arrays, chunks, _ = self._eval_splits[split]
            if split != "validation" and arrays is self._eval_splits["validation"][0]:
                continue  # the validation program scores this split too
            t0 = time.perf_counter()
            self._eval_fn.compile(self.states.params, self.states.rest, arrays, self.states.hparams, *chunks[0])
            times[f"eval_{split}"] = time.perf_counter() - t0
        return times

    # ---- batches -----------------------------------------------------------------------------
    def batches(self, split: str, batch_size: int, *, train: bool, epoch: int, seed: int | None = None, weights=None):
        """One run's batches (default: the first run's seed): this process's slice of each global
        batch, assembled into global arrays sharded over the mesh."""
        seed = int(self.specs[0].seed if seed is None else seed)
        for local in self.data.batches(split, batch_size, train=train, seed=seed, epoch=epoch,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       weights=weights):
            yield parallel.global_batch(local, self.mesh)

    def run_batches(self, epoch: int, weights):
        """The ``[K, B]`` training batches of ``epoch``: row ``k`` is run ``k``'s own batch, placed on
        the devices (the producer side of the prefetch)."""
        its = [self.data.batches("train", self.batch_size, train=True, seed=int(sp.seed), epoch=epoch,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 weights=None if weights is None else weights[i])
               for i, sp in enumerate(self.specs)]
        for locals_ in zip(*its, strict=True):
            stacked = {key: np.stack([np.asarray(b[key]) for b in locals_]) for key in locals_[0]}
            yield {key: jax.make_array_from_process_local_data(self.run_batch_sharding, v)
                   for key, v in stacked.items()}

    def epoch_rows(self, epoch: int, weights=None) -> np.ndarray:
        """``[K, steps, B]`` int32: each run's training batches' example indices for ``epoch`` (the
        host pipeline's order for its seed; drawn ``∝ weights[k]`` when given)."""
        return np.stack([self.data.batch_layout("train", self.batch_size, train=True, seed=int(sp.seed), epoch=epoch,
                                                weights=None if weights is None else weights[i])[0]
                         for i, sp in enumerate(self.specs)]).astype(np.int32)

    # ---- programs ----------------------------------------------------------------------------
    def set_epoch(self, states: TrainState, epoch: int) -> TrainState:
        """The states with their epoch field set to ``epoch`` (1-based; the step hands it to the method)."""
        return states._replace(epoch=parallel.replicate(jnp.full((self.k,), epoch, jnp.int32), self.mesh))

    def train_epoch(self, states: TrainState, epoch: int, weights=None) -> tuple[TrainState, dict, float | None]:
        """One training epoch of every run: ``(states, {metric: [K, steps]}, input wait fraction)``.
        ``weights``: per run, the method's sampling weights or None (the ordinary shuffled epoch).
        The wait fraction (streamed data only; None for device-resident data) is the share of the
        epoch's wall time the step loop spent waiting for its next batch."""
        if weights is not None and all(w is None for w in weights):
            weights = None
        states = self.set_epoch(states, epoch)
        if self._epoch_fn is not None:
            states, mets = self._epoch_fn(states, self.device_arrays["train"], self.epoch_rows(epoch, weights))
            return states, {k: np.asarray(v) for k, v in parallel.to_host(mets).items()}, None
        t0, step_metrics = time.perf_counter(), []
        with _Prefetch(lambda: self.run_batches(epoch, weights), self.prefetch) as batches:
            for batch in batches:
                states, m = self.train_step(states, batch)
                step_metrics.append(m)
            waited = batches.waited
        step_metrics = parallel.to_host(step_metrics)  # one transfer per epoch
        mets = {k: np.stack([np.asarray(m[k]) for m in step_metrics], axis=1) for k in step_metrics[0]}
        return states, mets, waited / max(time.perf_counter() - t0, 1e-9)

    def evaluate(self, params, rest, hparams, split: str) -> EvalOutput:
        """Every run's outputs on ``split`` (stacked ``params`` / ``rest`` / ``hparams``)."""
        if self._eval_fn is not None:
            arrays, chunks, nb = self._eval_splits[split]
            parts = parallel.to_host([self._eval_fn(params, rest, arrays, hparams, *c) for c in chunks])
            out = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1)[:, :nb], *parts)
            return EvalOutput.from_scanned(out)
        outs, masks, labels = [], [], []
        for index, batch in enumerate(self.batches(split, self.eval_batch_size, train=False, epoch=0)):
            outs.append(self._eval_step(params, rest, batch, jnp.int32(index), hparams))
            masks.append(batch["mask"])
            labels.append(batch["label"])
        outs, masks, labels = parallel.to_host((outs, masks, labels))
        return EvalOutput.from_batches(outs, masks, labels)

    def subset_split(self, params, rest, split: str, keep, hparams):
        """One run's ``subset_predict`` (inputs of modality ``i`` zeroed where ``keep[i] == 0``) over
        a whole device-resident split, in as many calls as the evaluation: ``(logits [N, C],
        {modality: latents [N, ...]}, labels [N])`` of the split's examples in order; None when the
        split is not on the device (then :func:`mcr_jax.evaluation.shapley` goes batch by batch)."""
        if self._subset_fn is None:
            return None
        arrays, chunks, nb = self._eval_splits[split]
        keep = jnp.asarray(keep, jnp.float32)
        parts = parallel.to_host([self._subset_fn(params, rest, arrays, keep, hparams, *c) for c in chunks])
        out = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:nb], *parts)
        valid = out["mask"].reshape(-1) > 0

        def rows(x):
            return x.reshape(-1, *x.shape[2:])[valid]

        return rows(out["logits"]), {m: rows(z) for m, z in out["latents"].items()}, rows(out["label"])

    def compile_counts(self) -> dict[str, int]:
        """How many programs each compiled function holds (each compiles once per run set; tested)."""
        counts = {"train_step": self.train_step._cache_size(), "eval_step": self._eval_step._cache_size()}
        if self._epoch_fn is not None:
            counts["epoch"] = self._epoch_fn._cache_size()  # precompiled programs included
            counts["eval"] = self._eval_fn._cache_size()
        return counts


__all__ = ["Programs", "RunSpec", "compiled_epochs", "over_runs", "put", "put_rows", "stack", "take"]
