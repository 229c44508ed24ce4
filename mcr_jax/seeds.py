"""Several seeds, and grids of options, as run specifications for the one run engine.

:func:`train_seeds` trains every seed of a config; :func:`train_grid` every grid point × seed. Both
only build :class:`~mcr_jax.programs.RunSpec` and group them: runs that share one static
configuration train as **one** vectorised program (:mod:`mcr_jax.engine`, K runs stacked on a
leading axis), on device-resident and streamed data alike. Each run keeps its own data order (its
seed's shuffle), PRNG stream, model selection on its own validation metric, early stopping and
method hooks, so its results are those of the same run made alone with
:func:`mcr_jax.train.train_and_evaluate` (to float tolerance; tested), written to the same places
(``<workdir>/seed_<s>/results.json``, ``metrics.jsonl``, ``predictions.npz`` and its own checkpoint),
plus ``<workdir>/summary.json``.

A grid whose options are all traceable (``Method.traceable``, or the learning rate) trains as one
program with the options as traced inputs; otherwise each point is its own program, vectorised over
its seeds. A method whose runs cannot share a program (``Method.vectorizable()`` gives the reason,
e.g. MCR's local permutation scope) runs them one after another, and says so.

Checkpoints of the stacked state live in ``<workdir>/vectorized/runs_<hash>/`` (cadence
``train.checkpoint_every``); an interrupted run resumes from there to the uninterrupted result.
Runs already finished (their ``results.json`` matches the config) are reused, not retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import ml_collections

from mcr_jax import data as data_lib
from mcr_jax import engine, guards, metrics, parallel, train
from mcr_jax.config import resolve_config
from mcr_jax.methods import get_method
from mcr_jax.options import as_dict
from mcr_jax.programs import Programs, RunSpec, put, stack, take


def with_options(config, options: dict | None) -> ml_collections.ConfigDict:
    """A copy of ``config`` with a grid point's options set: method options, and
    ``learning_rate`` as ``optim.learning_rate``."""
    sub = ml_collections.ConfigDict(as_dict(config))
    for k, v in (options or {}).items():
        if k == "learning_rate":
            sub.optim.learning_rate = v
        else:
            sub.method[k] = v
    return sub


def _seed_config(config, seed: int, options: dict | None = None) -> ml_collections.ConfigDict:
    """``config`` for one run: its seed and, for a grid point, its options."""
    sub = with_options(config, options)
    sub.seed = int(seed)
    return sub


def vectorizable(method) -> str | None:
    """``None`` when several runs of ``method`` can share one vectorised program, else the reason
    (the method's own declaration, :meth:`Method.vectorizable`)."""
    ok, reason = method.vectorizable()
    return None if ok else reason


def _seed_specs(config, workdir: str, seeds, seed_dirs: dict | None):
    """``(seeds, config, workdir, specs)`` of :func:`train_seeds`, checked."""
    seeds = guards.check_seeds(seeds)
    config = resolve_config(config)
    guards.validate_config(config)
    workdir = os.path.abspath(workdir)
    dirs = {s: os.path.abspath((seed_dirs or {}).get(s) or os.path.join(workdir, f"seed_{s}")) for s in seeds}
    specs = [RunSpec(s, {}, _seed_config(config, s), dirs[s]) for s in seeds]
    return seeds, config, workdir, specs


def train_seeds(config, workdir: str, seeds, *, seed_dirs: dict | None = None,
                prepared: Prepared | None = None) -> dict:
    """Trains ``config`` for every seed in ``seeds`` as one vectorised program (see the module
    docstring) and returns ``{"per_seed": [results], "summary": summary}``.

    ``seed_dirs`` (``{seed: dir}``, default ``<workdir>/seed_<s>``) places each seed's results
    where a single run of that seed would put them (the comparison runner's layout); the stacked
    checkpoints and ``summary.json`` go to ``workdir``. ``prepared``: the :class:`Prepared`
    programs of this same call, built ahead (used when they match the runs left to train)."""
    seeds, config, workdir, specs = _seed_specs(config, workdir, seeds, seed_dirs)
    results = _train_runs(config, workdir, specs, traced=(), prepared=prepared)
    return _summarize(config, workdir, seeds, results)


def _runs_key(specs) -> str:
    return json.dumps([[sp.dir, sp.seed, sp.hparams, as_dict(sp.config)] for sp in specs], sort_keys=True,
                      default=str)


class Prepared:
    """The programs of a :func:`train_seeds` call, built and compiled on a background thread while
    the caller does something else (the comparison runner trains the previous method), so the next
    method's compile time overlaps the current method's training instead of adding to it.

    Nothing is written and nothing is logged from the thread. Only a fresh vectorised call is
    prepared: when a run of it already has a ``results.json`` (a rerun, a resume), when its method
    cannot vectorise, or when building fails for any reason, :meth:`get` gives None and
    :func:`train_seeds` builds its programs itself, as without preparation (so an error is raised
    there, in the caller's thread, exactly as before). The results do not depend on where the
    programs were compiled (the same programs; tested)."""

    def __init__(self, specs: list[RunSpec]):
        import threading

        self.key = _runs_key(specs)
        self.compile_s: dict[str, float] = {}
        self._programs = None
        self._thread = threading.Thread(target=self._build, args=(specs,), daemon=True,
                                        name="mcr_jax-prepare")
        self._thread.start()

    @classmethod
    def seeds(cls, config, workdir: str, seeds, *, seed_dirs: dict | None = None) -> Prepared:
        """For ``train_seeds(config, workdir, seeds, seed_dirs=seed_dirs)``."""
        return cls(_seed_specs(config, workdir, seeds, seed_dirs)[3])

    @classmethod
    def run(cls, config, workdir: str) -> Prepared:
        """For ``train.train_and_evaluate(config, workdir)`` (one run). The run must not read a run
        that is still training (``method.pretrained``, ``init.pretrained``)."""
        config = resolve_config(config)
        return cls([RunSpec(int(config.seed), {}, config, os.path.abspath(workdir))])

    def _build(self, specs) -> None:
        try:
            if any(os.path.exists(os.path.join(sp.dir, "results.json")) for sp in specs):
                return
            first = resolve_config(specs[0].config)
            if first.method.name in train.ORCHESTRATORS:
                return
            data = data_lib.load(first.data)
            if len(specs) > 1 and vectorizable(get_method(first.method, data.info)) is not None:
                return
            programs = Programs(specs, data=data)
            self.compile_s = programs.precompile()
            self._programs = programs
        except Exception:  # built again in the caller's thread, which raises the error there
            self._programs = None

    def get(self, specs) -> Programs | None:
        """The prepared programs if they are those of exactly ``specs``; waits for the thread."""
        self._thread.join()
        if self._programs is None or _runs_key(specs) != self.key:
            return None
        return self._programs


def train_grid(config, workdir: str, seeds, points: list[dict]) -> list[dict]:
    """Every grid point (``{option: value}``) of ``config``'s method for every seed, results in
    ``<workdir>/config_<i>/seed_<s>``; returns ``[{"per_seed", "summary"}]`` per point.

    When every option of the grid is one of the method's traceable continuous options (or the
    learning rate), all points × seeds train as **one** vectorised program with the options as
    traced inputs; otherwise each point is its own program (vectorised over the seeds)."""
    seeds = guards.check_seeds(seeds)
    config = resolve_config(config)
    guards.validate_config(config)
    workdir = os.path.abspath(workdir)
    keys = sorted({k for p in points for k in p})
    if any(sorted(p) != keys for p in points):
        raise ValueError(f"every grid point must set the same options; got {points}.")
    specs = [RunSpec(s, dict(p), _seed_config(config, s, p), os.path.join(workdir, f"config_{i}", f"seed_{s}"))
             for i, p in enumerate(points) for s in seeds]
    results = _train_runs(config, workdir, specs, traced=tuple(keys))
    out = []
    for i in range(len(points)):
        per = results[i * len(seeds):(i + 1) * len(seeds)]
        out.append(_summarize(config, os.path.join(workdir, f"config_{i}"), seeds, per))
    return out


def _train_runs(config, workdir: str, specs: list[RunSpec], traced: tuple,
                prepared: Prepared | None = None) -> list[dict]:
    """The results of every run in ``specs`` (finished runs reused): one vectorised program when
    possible, else one after another."""
    done = [engine.finished(sp.dir, sp.config) for sp in specs]
    todo = [i for i, r in enumerate(done) if r is None]
    if not todo:
        return done
    if parallel.is_primary():
        guards.check_writable(workdir)
    first = resolve_config(specs[todo[0]].config)
    programs = prepared.get([specs[i] for i in todo]) if prepared is not None else None
    data = programs.data if programs is not None else data_lib.load(first.data)
    method = get_method(first.method, data.info)
    reason = vectorizable(method) if len(todo) > 1 else "one run"
    if reason is None and not set(traced) <= set(method.traceable) | {"learning_rate"}:
        engine.log(f"[{config.method.name}] options {sorted(set(traced) - set(method.traceable))} are not "
                   "traceable: one program per grid point, vectorised over its seeds.")
        groups: dict[str, list[int]] = {}
        for i in todo:
            groups.setdefault(json.dumps(specs[i].hparams, sort_keys=True), []).append(i)
        for members in groups.values():
            plain = [dataclasses.replace(specs[i], hparams={}) for i in members]
            for i, r in zip(members, _train_runs(config, workdir, plain, traced=()), strict=True):
                done[i] = r
        return done
    if reason is not None:
        if len(todo) > 1:
            engine.log(f"[{config.method.name}] runs one after another: {reason}.")
        for i in todo:
            done[i] = train.train_and_evaluate(specs[i].config, specs[i].dir)
        return done
    tag = json.dumps([[specs[i].dir, specs[i].seed, specs[i].hparams] for i in todo], sort_keys=True)
    state_dir = os.path.join(workdir, "vectorized", "runs_" + hashlib.sha1(tag.encode()).hexdigest()[:12])
    with guards.workdir_lock(workdir):
        new = engine.train_runs([specs[i] for i in todo], state_dir=state_dir, data=data, programs=programs)
    for i, r in zip(todo, new, strict=True):
        done[i] = r
    return done


def _summarize(config, workdir, seeds, per_seed) -> dict:
    summary = {"method": config.method.name, "seeds": list(seeds), "test": {}}
    for head, mets in per_seed[0]["test"]["heads"].items():
        summary["test"][head] = {k: metrics.mean_std([r["test"]["heads"][head][k] for r in per_seed]) for k in mets}
    if parallel.is_primary():
        _write_summary(os.path.join(workdir, "summary.json"), engine.jsonable(summary))
    return {"per_seed": per_seed, "summary": summary}


def _write_summary(path: str, summary: dict) -> None:
    """Writes ``summary.json`` unless it already holds ``summary`` (a rerun of finished runs then
    writes nothing, and works on a read-only copy); a failed write is a log line, not an error: every
    run's own results are written already, and the summary is returned."""
    if guards.read_json_or_none(path, log=lambda _: None) == summary:
        return
    try:
        guards.write_json_atomic(path, summary)
    except OSError as e:
        engine.warn(f"could not write {path} ({type(e).__name__}: {e}); every run's results.json is in place "
                   "and the summary is returned, not saved.")


__all__ = ["Prepared", "RunSpec", "put", "stack", "take", "train_grid", "train_seeds", "vectorizable", "with_options"]
