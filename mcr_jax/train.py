"""Training: ``train_and_evaluate(config, workdir)``, one run, and the ensemble orchestrator.

A single run is the run engine (:mod:`mcr_jax.engine`) with K = 1: one jitted step over plain
parameter pytrees (the NNX model is split once; the traced function merges it), validation every
epoch, model selection on validation only, early stopping on patience, the test split evaluated
once at the selected checkpoint, orbax checkpoints (an interrupted run restarted with the same
command resumes from the last saved epoch and ends with the same result), metrics as JSON lines, a
per-epoch progress line with ETA, and a clear stop on a non-finite loss naming the step and the
term. Several seeds or grid points of one config train as one program: :mod:`mcr_jax.seeds`.

Orchestrators are "methods" that are not one trained model but combine runs: the registry
:data:`ORCHESTRATORS` maps such a ``method.name`` (``"ensemble"``) to its function
``(config, workdir) -> results``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections
import numpy as np

from mcr_jax import data as data_lib
from mcr_jax import guards, metrics, parallel, progress
from mcr_jax.config import resolve_config
from mcr_jax.engine import finished, jsonable, log, train_runs
from mcr_jax.evaluation import add_sample_type_accuracy
from mcr_jax.methods import combine_logits
from mcr_jax.options import as_dict, merge_options
from mcr_jax.programs import RunSpec
from mcr_jax.tasks import get_task


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, prepared=None) -> dict:
    """Trains ``config.method`` on ``config.data`` and returns the results (also in results.json).
    ``prepared``: this run's programs built ahead (:meth:`mcr_jax.seeds.Prepared.run`), used when
    they match."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(config)
    guards.validate_config(config)
    orchestrated = config.method.name in ORCHESTRATORS
    done = finished(workdir, config, artifacts=not orchestrated)  # before anything can overwrite it
    if done is not None:
        if not progress.in_unit():  # in a job, the unit's line says it
            log(f"[{config.method.name}] {workdir} already finished: returning its results.")
        return done
    if parallel.is_primary():
        guards.check_writable(workdir)  # before the data, the compile and an epoch of training
    with guards.workdir_lock(workdir):
        if orchestrated:
            return ORCHESTRATORS[config.method.name](config, workdir)
        spec = RunSpec(int(config.seed), {}, config, workdir)
        return train_runs([spec], programs=prepared.get([spec]) if prepared is not None else None)[0]


def unimodal_config(config, modality: str) -> ml_collections.ConfigDict:
    sub = ml_collections.ConfigDict(as_dict(config))
    sub.method = ml_collections.ConfigDict({"name": "unimodal", "modality": modality})
    if "init" in sub:
        sub.init.pretrained = {}
    return sub


def train_ensemble(config, workdir: str) -> dict:
    """Trains (or reuses) one unimodal run per modality and evaluates their combined predictions."""
    if parallel.is_primary():
        guards.check_writable(workdir)
    data = data_lib.load(config.data)
    info = data.info
    task = get_task(info.task)
    from mcr_jax.methods.ensemble import DEFAULTS as ENSEMBLE_DEFAULTS

    opts = merge_options(ENSEMBLE_DEFAULTS, config.method, where="method 'ensemble'", ignore=("name",))
    runs = dict(opts["unimodal_workdirs"] or {})
    preds = {}
    for m in info.modalities:
        wd = runs.get(m) or os.path.join(workdir, f"unimodal_{m}")
        train_and_evaluate(unimodal_config(config, m), wd)
        preds[m] = np.load(os.path.join(wd, "predictions.npz"))
    mode = opts["mode"]
    results = {"config": jsonable(as_dict(config)), "method": "ensemble", "seed": int(config.seed),
               "dataset": info.name, "modalities": list(info.modalities), "task": info.task, "mode": mode}
    for split in ("validation", "test"):
        labels = preds[info.modalities[0]][f"{split}_labels"]
        uni = {m: preds[m][f"{split}_logits"] for m in info.modalities}
        if not task.categorical:
            fused = np.mean([uni[m] for m in info.modalities], axis=0)
        else:
            per_batch = int(opts["batch_size"] or config.eval.batch_size
                            or config.train.batch_size)
            fused = combine_logits([uni[m] for m in info.modalities], mode, batch_size=per_batch)
        res = {"heads": task.head_metrics({"fused": fused, **uni}, labels)}
        if task.categorical:
            res["error_groups"] = metrics.error_groups(fused, uni, labels)
        if split == "test":
            add_sample_type_accuracy(res, fused, labels, data, info)
        results[split] = res
    results = jsonable(results)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), results)
    headline = task.headline
    progress.run_done(f"{progress.shown_name('ensemble')} seed {int(config.seed)}",
                      f"done: the unimodal runs' outputs combined ({mode}); test {headline} "
                      f"{results['test']['heads']['fused'][headline]:.4f}")
    return results



#: ``method.name`` → ``fn(config, workdir) -> results`` for the names that combine runs rather
#: than train one model (:func:`train_and_evaluate` dispatches to them).
ORCHESTRATORS: dict[str, Callable] = {"ensemble": train_ensemble}

__all__ = ["ORCHESTRATORS", "train_and_evaluate", "train_ensemble", "unimodal_config"]
