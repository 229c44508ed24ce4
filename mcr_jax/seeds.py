"""Several seeds as one vectorised program: ``jax.vmap`` over the initial states and data orders.

:func:`train_seeds` trains every seed of a config at once. The seeds' :class:`~mcr_jax.state.TrainState`
are stacked on a leading ``[K]`` axis and one compiled epoch (``vmap`` of the trainer's
``lax.scan`` epoch) advances all of them; each seed keeps its own data order (the host pipeline's,
shuffled by that seed), its own PRNG stream, model selection on its own validation metric, its own
early stopping (a seed that has stopped is still carried by the program, but nothing after its
stop is selected or recorded) and its own host-side method hooks. Each seed's results are those of
the same seed run alone with :func:`mcr_jax.train.train_and_evaluate` (to float tolerance; tested),
written to the same places (``<workdir>/seed_<s>/results.json``, ``metrics.jsonl``,
``predictions.npz`` and a checkpoint of its final state and selected weights, so that uni-pre can
start from it), plus ``<workdir>/summary.json``.

Where the vectorised program does not apply — streamed (TFDS) data, several processes, a method
that keeps per-run state outside its method state (``Method.vectorizable_seeds = False``; none of
ours does), uni-pre initialisation, MCR's local
permutation scope — :func:`train_seeds` falls back to running the seeds one after another (and
says so).

Checkpoints of the stacked state live in ``<workdir>/vectorized/seeds_<s1-s2-…>/`` (cadence
``train.checkpoint_every``); an interrupted run resumes from there to the uninterrupted result.
Seeds already finished (their ``results.json`` matches the config) are reused, not retrained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mcr_jax import guards, metrics, parallel, tensorboard, train
from mcr_jax.checkpoint import Checkpointer, from_saveable, host_copy, non_finite_leaves
from mcr_jax.config import resolve_config
from mcr_jax.methods.base import EpochContext, Method
from mcr_jax.options import as_dict
from mcr_jax.state import TrainState, init_state, split_model
from mcr_jax.steps import make_epoch_fn, make_eval_fn
from mcr_jax.tasks import get_task


def stack(trees):
    """Stacks pytrees of the same structure on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def take(tree, k: int):
    """Entry ``k`` of a stacked pytree."""
    return jax.tree.map(lambda x: x[k], tree)


def put(tree, k: int, value):
    """A stacked pytree with entry ``k`` replaced (device arrays: a new tree; NumPy: in place)."""
    def one(x, v):
        if isinstance(x, np.ndarray):
            x[k] = v
            return x
        return x.at[k].set(v)

    return jax.tree.map(one, tree, value)


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


@dataclasses.dataclass
class RunSpec:
    """One run of a vectorised program: its seed, traced hyperparameters, config and directory."""

    seed: int
    hparams: dict
    config: Any
    dir: str


def vectorizable(config, run) -> str | None:
    """``None`` when the seeds of ``config`` can run as one program, else the reason they cannot."""
    if run.epoch_fn is None:
        return "the training data is streamed (or several processes run): epochs are not compiled"
    if not getattr(run.method, "vectorizable_seeds", True):
        return f"method {run.method.name!r} keeps per-run state outside its method state"
    if config.method.get("pretrained", None) or config.init.pretrained:
        return "runs start from per-seed pretrained weights"
    if config.method.get("permutation_scope", "global") == "local":
        return "MCR's local permutation scope runs under shard_map"
    return None


def train_seeds(config, workdir: str, seeds, *, seed_dirs: dict | None = None) -> dict:
    """Trains ``config`` for every seed in ``seeds`` as one vectorised program (see the module
    docstring) and returns ``{"per_seed": [results], "summary": summary}``.

    ``seed_dirs`` (``{seed: dir}``, default ``<workdir>/seed_<s>``) places each seed's results
    where a single run of that seed would put them (the comparison runner's layout); the stacked
    checkpoints and ``summary.json`` go to ``workdir``."""
    seeds = guards.check_seeds(seeds)
    config = resolve_config(config)
    guards.validate_config(config)
    workdir = os.path.abspath(workdir)
    dirs = {s: os.path.abspath((seed_dirs or {}).get(s) or os.path.join(workdir, f"seed_{s}")) for s in seeds}
    configs = {s: _seed_config(config, s) for s in seeds}
    specs = [RunSpec(s, {}, configs[s], dirs[s]) for s in seeds]
    results = _train_runs(config, workdir, specs, traced=())
    return _summarize(config, workdir, seeds, results)


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


def _train_runs(config, workdir: str, specs: list[RunSpec], traced: tuple) -> list[dict]:
    """The results of every run in ``specs`` (finished runs reused): one vectorised program when
    possible, else one after another."""
    done = [train._finished(sp.dir, sp.config) for sp in specs]
    todo = [i for i, r in enumerate(done) if r is None]
    if not todo:
        return done
    if parallel.is_primary():
        guards.check_writable(workdir)
    run = train.setup(specs[todo[0]].config)
    reason = vectorizable(config, run) if len(todo) > 1 else "one run"
    if reason is None and not set(traced) <= set(run.method.traceable) | {"learning_rate"}:
        train._log(f"[{config.method.name}] options {sorted(set(traced) - set(run.method.traceable))} are not "
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
            train._log(f"[{config.method.name}] runs one after another: {reason}.")
        for i in todo:
            done[i] = train.train_and_evaluate(specs[i].config, specs[i].dir)
        return done
    tag = json.dumps([[specs[i].dir, specs[i].seed, specs[i].hparams] for i in todo], sort_keys=True)
    state_dir = os.path.join(workdir, "vectorized", "runs_" + hashlib.sha1(tag.encode()).hexdigest()[:12])
    new = _train_vectorized(config, state_dir, [specs[i] for i in todo], run)
    for i, r in zip(todo, new, strict=True):
        done[i] = r
    return done


def _initial_states(run, specs: list[RunSpec]) -> TrainState:
    states = []
    for sp in specs:
        model = train.inputs.build_model(sp.config.model, run.info, seed=sp.seed)
        run.method.check_model(model)
        _, _, params, rest = split_model(model)
        states.append(init_state(params, rest, run.tx, run.method, sp.seed, hparams=sp.hparams))
    return stack(states)


def _train_vectorized(config, workdir, specs: list[RunSpec], run) -> list[dict]:
    info, method, tc = run.info, run.method, config.train
    seeds = [sp.seed for sp in specs]
    k_seeds, epochs = len(specs), int(tc.num_epochs)
    shard = parallel.batch_sharded(run.mesh)
    epoch_fn = jax.jit(jax.vmap(make_epoch_fn(run.step_fn, batch_sharding=shard), in_axes=(0, None, 0)),
                       donate_argnums=0)
    eval_fns = {split: jax.jit(jax.vmap(make_eval_fn(run.eval_step_fn, num_examples=run.data.size(split),
                                                     batch_size=run.eval_batch_size, batch_sharding=shard),
                                        in_axes=(0, 0, None, 0)))
                for split in ("validation", "test")}
    states = parallel.replicate(_initial_states(run, specs), run.mesh)

    ckpt = Checkpointer(workdir, enabled=bool(tc.checkpoint))
    every = train.checkpoint_every(config, run)
    config_json = train._jsonable({"runs": [[sp.dir, as_dict(sp.config), sp.hparams] for sp in specs]})
    best = host_copy({"params": states.params, "rest": states.rest})
    metas = [{"epoch": 0, "best_epoch": 0, "best_value": -float("inf"), "best_loss": float("inf"), "bad_epochs": 0,
              "history": [], "stopped_early": False, "train_time_s": 0.0, "steps": 0} for _ in seeds]
    meta = {"epoch": 0, "per_seed": metas, "seeds": list(seeds), "config": config_json}
    restored = ckpt.restore_latest_good(states, best, log=train._log) if ckpt.enabled else None
    if restored is not None:
        guards.check_same_config(restored[2].get("config", {}), config_json, workdir, "an interrupted vectorised run")
        states, best, meta = restored
        metas = meta["per_seed"]
        train._log(f"[{config.method.name}] resuming {workdir} (seeds {list(seeds)}) after epoch {meta['epoch']}.")

    patience = int(tc.patience or 0)
    earliest_stop = int(method.earliest_stop_epoch())
    select = train.selection_metric(config, info.task)
    start = meta["epoch"] + 1
    for epoch in range(start, epochs + 1):
        active = [i for i, m in enumerate(metas) if not m["stopped_early"]]
        if not active:
            break
        t0 = time.perf_counter()
        weighted = type(method).sampling_weights is not Method.sampling_weights  # else no per-seed state read
        rows = np.stack([run.data.batch_layout(
            "train", run.batch_size, train=True, seed=s, epoch=epoch,
            weights=method.sampling_weights(take(states.method_state, i)) if weighted else None)[0]
            for i, s in enumerate(seeds)]).astype(np.int32)
        states, mets = epoch_fn(states, run.device_arrays["train"], rows)
        mets = parallel.to_host(mets)
        bad = np.asarray(parallel.to_host(states.bad_step))
        val_out = parallel.to_host(eval_fns["validation"](states.params, states.rest,
                                                          run.device_arrays["validation"], states.hparams))
        epoch_time = (time.perf_counter() - t0) / len(active)
        for i in active:
            s, m, run_dir = seeds[i], metas[i], specs[i].dir
            if bad[i] >= 0:
                terms = [n for j, n in enumerate(run.metric_names)
                         if (int(np.asarray(states.bad_terms)[i]) >> j) & 1]
                raise FloatingPointError(f"seed {s}: non-finite {', '.join(terms)} at step {int(bad[i])} "
                                         f"(epoch {epoch}); the update was skipped and training stopped. Lower "
                                         "optim.learning_rate (or check the method's own hyperparameters).")
            val, _ = train.summarize_eval(method, train.split_eval_output(take(val_out, i)))
            value = train.selection_value(val, select, info.task)
            improved = train.improves(value, float(val["loss"]), m)
            if improved:
                best = put(best, i, host_copy({"params": take(states.params, i), "rest": take(states.rest, i)}))
                m.update(best_epoch=epoch, best_value=value, best_loss=float(val["loss"]), bad_epochs=0)
            else:
                m["bad_epochs"] += 1
            m["train_time_s"] += epoch_time
            one = take(states, i)
            ctx = EpochContext(epoch=epoch, steps_per_epoch=run.steps_per_epoch, state=one,
                               features_fn=run.features_fn, fresh_params_fn=run.fresh_params, fuse_fn=run.fuse_fn)
            new_ms = method.on_epoch_end(epoch, val, ctx.state.method_state, ctx)
            if ctx.state is not one or new_ms is not one.method_state:  # the hook changed something:
                one = ctx.state._replace(method_state=new_ms)  # write this run's state back (a copy
                states = put(states, i, one)  # of every leaf, so only then)
            m["steps"] = int(np.asarray(one.step))
            record = {"epoch": epoch, "step": m["steps"], "train": {k: float(np.mean(v[i])) for k, v in mets.items()},
                      "val": {"loss": val["loss"],
                              **{f"{h}_{k}": v for h, d in val["heads"].items() for k, v in d.items()},
                              **{f"mipd_{mm}": v for mm, v in val.get("mipd", {}).items()}, **ctx.logged},
                      "time_s": epoch_time}
            m["history"].append(train._jsonable(record))
            m["epoch"] = epoch
            if patience and m["bad_epochs"] >= patience and epoch >= earliest_stop and epoch < epochs:
                m["stopped_early"] = True
            os.makedirs(run_dir, exist_ok=True)
            train._write_history(run_dir, m["history"])
            if tensorboard.enabled(config) and parallel.is_primary():
                tensorboard.log_epoch(run_dir, m["history"][-1])
        meta["epoch"] = epoch
        main = get_task(info.task).headline
        train._log(f"[{config.method.name} × {k_seeds} runs] epoch {epoch:3d}/{epochs}  best val {main} "
                   + " ".join(f"{abs(m['best_value']):.4f}" for m in metas)
                   + f"  {epoch_time * len(active):5.2f}s")
        if epoch % every == 0 or epoch == epochs or all(m["stopped_early"] for m in metas):
            ckpt.save(epoch, states, best, meta)
    ckpt.close()
    for sp in specs:
        tensorboard.close(sp.dir)
    return _finish(config, specs, run, states, best, metas, eval_fns, select)


def _finish(config, specs: list[RunSpec], run, states, best, metas, eval_fns, select) -> list[dict]:
    info, method = run.info, run.method
    host_best = best
    best = from_saveable(best, {"params": states.params, "rest": states.rest})
    bad = non_finite_leaves(best)
    if bad:
        raise FloatingPointError(f"selected weights hold non-finite values in {bad[:5]}; refusing to publish.")
    best = parallel.replicate(best, run.mesh)
    outs = {split: parallel.to_host(fn(best["params"], best["rest"], run.device_arrays[split], states.hparams))
            for split, fn in eval_fns.items()}
    per_seed = []
    seeds = [sp.seed for sp in specs]
    for i, sp in enumerate(specs):
        s, m, run_dir, run_config = sp.seed, metas[i], sp.dir, sp.config
        val, val_out = train.summarize_eval(method, train.split_eval_output(take(outs["validation"], i)))
        test, test_out = train.summarize_eval(method, train.split_eval_output(take(outs["test"], i)))
        chosen = {k: take(best[k], i) for k in ("params", "rest")}
        for split, res in (("validation", val), ("test", test)):
            res.update(train.shapley(run, chosen["params"], chosen["rest"], split, take(states.hparams, i)))
        for name, res in (("validation", val), ("test", test)):
            if not np.isfinite(res["loss"]):
                raise FloatingPointError(f"seed {s}: the selected weights give a non-finite {name} loss.")
        train._add_sample_type_accuracy(test, test_out["logits"], test_out["labels"], run.data, info)
        os.makedirs(run_dir, exist_ok=True)
        train._save_predictions(run_dir, {"validation": val_out, "test": test_out})
        if bool(config.train.checkpoint):  # the run's own checkpoint, as a single run leaves
            one = Checkpointer(run_dir)
            one.save(m["epoch"], take(states, i)._replace(hparams={}), take(host_best, i),
                     dict(m, config=train._jsonable(as_dict(run_config))))
            one.close()
        results = {"config": train._jsonable(as_dict(run_config)), "method": config.method.name,
                   "seed": s, "dataset": info.name, "modalities": list(info.modalities), "task": info.task,
                   "best_epoch": m["best_epoch"], "epochs_run": m["epoch"], "selection": f"val_{select}",
                   "stopped_early": m["stopped_early"], "steps": m["steps"], "train_time_s": m["train_time_s"],
                   "compiled_epochs": True, "vectorized_seeds": list(seeds), "traced_hparams": dict(sp.hparams),
                   "validation": val, "test": test}
        results = train._jsonable(results)
        if parallel.is_primary():
            guards.write_json_atomic(os.path.join(run_dir, "results.json"), results)
        per_seed.append(results)
    return per_seed


def _summarize(config, workdir, seeds, per_seed) -> dict:
    summary = {"method": config.method.name, "seeds": list(seeds), "test": {}}
    for head, mets in per_seed[0]["test"]["heads"].items():
        summary["test"][head] = {k: metrics.mean_std([r["test"]["heads"][head][k] for r in per_seed]) for k in mets}
    if parallel.is_primary():
        guards.write_json_atomic(os.path.join(workdir, "summary.json"), train._jsonable(summary))
    return {"per_seed": per_seed, "summary": summary}


__all__ = ["RunSpec", "put", "stack", "take", "train_grid", "train_seeds", "vectorizable", "with_options"]
