"""The run engine: K ≥ 1 runs of one static configuration trained together, each with its own books.

:func:`train_runs` drives :class:`~mcr_jax.programs.Programs` (the compiled programs) through the
epochs and keeps, per run, the host-side bookkeeping written once here: meta and resume, the
config check, model selection on validation only (ties on the selection metric broken by the lower
validation loss) and early stopping (each run its own; a run that has stopped is still carried by
the program but nothing after its stop is selected or recorded; never before the method's
``earliest_stop_epoch()``), the method's epoch hook, the epoch record (``metrics.jsonl``,
TensorBoard), checkpoints, and at the end the selected weights evaluated on validation and test
(:mod:`mcr_jax.evaluation`) into ``results.json`` and ``predictions.npz``.

A single run (K = 1) keeps its checkpoints in ``<run dir>/checkpoints``. K > 1 runs keep the stacked
state in ``state_dir`` (cadence ``train.checkpoint_every``) and, when they finish, each run's own
checkpoint in its directory, as a single run leaves it (so uni-pre can start from it). An
interrupted set resumes from its newest good checkpoint to the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from mcr_jax import evaluation, guards, parallel, progress, tensorboard
from mcr_jax.checkpoint import Checkpointer, from_saveable, host_copy, non_finite_leaves
from mcr_jax.methods.base import EpochContext, Method
from mcr_jax.options import as_dict
from mcr_jax.programs import Programs, RunSpec, put, put_rows, take
from mcr_jax.tasks import Task, get_task


def log(msg: str) -> None:
    """A note on its own line (:func:`mcr_jax.progress.say`; none under ``quiet``)."""
    progress.say(msg)


def warn(msg: str) -> None:
    """A warning on its own line, printed in every progress mode."""
    progress.say(msg, warning=True)


def jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def selection_metric(config, task: Task | str) -> str:
    """The validation metric that selects the model: ``train.select``, else the task's default
    (accuracy for classification, the loss for regression); a clear error for another task's metric."""
    return get_task(task).selection_metric(config.train.select or "")


def selection_value(val: dict, select: str, task: Task | str = "classification") -> float:
    """The selection metric's value on validation, oriented so that larger is better."""
    value = val["loss"] if select == "loss" else val["heads"]["fused"][select]
    return get_task(task).oriented(select, value)


def improves(value: float, loss: float, meta: dict) -> bool:
    """Whether an epoch's validation result beats the best so far: a larger selection value, or an
    equal one with a lower validation loss (accuracy ties are common on small validation splits;
    without the tie-break the earliest tied epoch, often a barely trained model, would win)."""
    best = meta["best_value"]
    return value > best or (value == best and loss < meta.get("best_loss", float("inf")))


def checkpoint_every(config, programs: Programs) -> int:
    """``train.checkpoint_every`` (epochs); 0 = automatic: every epoch when batches are streamed (an
    epoch can take minutes), a handful of saves per run when the data is on the device (an epoch
    takes milliseconds and a save is the dominant cost). The last epoch is always saved."""
    every = int(config.train.checkpoint_every or 0)
    if every < 0:
        raise ValueError(f"train.checkpoint_every must be >= 0 (0 = automatic); got {every}.")
    if every:
        return every
    return max(1, int(config.train.num_epochs) // 4) if programs.compiled else 1


def _unusable_npz(path: str) -> str | None:
    """Why ``path`` cannot be read back as an ``.npz`` (None: every array reads)."""
    try:
        with np.load(path) as f:
            for key in f.files:
                f[key]
    except FileNotFoundError:
        return "is missing"
    except Exception as e:  # a truncated or overwritten file: BadZipFile, ValueError, EOFError, ...
        return f"is unreadable ({type(e).__name__})"
    return None


def _complete(res) -> bool:
    """Whether a stored results object has what its readers take from it: the config and, for
    validation and test, the fused head's metrics."""
    if not isinstance(res, dict) or not isinstance(res.get("config"), dict):
        return False
    for split in ("validation", "test"):
        heads = res.get(split, {}).get("heads") if isinstance(res.get(split), dict) else None
        if not isinstance(heads, dict) or not isinstance(heads.get("fused"), dict):
            return False
    return True


def finished(workdir: str, config, *, artifacts: bool = True) -> dict | None:
    """The stored results of a finished run in ``workdir``, or None: not finished, or unusable — its
    results file damaged or incomplete, its ``metrics.jsonl`` damaged, or (``artifacts``) a file that a
    later run reads from it
    (``predictions.npz``; the selected weights in ``checkpoints/`` when the run checkpoints) missing
    or unreadable; an unusable run is redone, with a log line naming the file. A finished run of
    another config is refused, naming the differing keys."""
    path = os.path.join(workdir, "results.json")
    res = guards.read_json_or_none(path, log=warn)
    if res is None:
        return None
    if not _complete(res):
        warn(f"{path} is incomplete (it lacks the config or the validation/test results): the run is redone.")
        return None
    guards.check_same_config(res["config"], jsonable(as_dict(config)), workdir, "a finished run")
    history = os.path.join(workdir, "metrics.jsonl")
    try:
        guards.read_jsonl(history)
    except (OSError, ValueError) as e:
        warn(f"{e} The finished run in {workdir} is redone.")
        return None
    if artifacts:
        npz = os.path.join(workdir, "predictions.npz")
        why = _unusable_npz(npz)
        if why:
            warn(f"{npz} {why}: the finished run in {workdir} is redone.")
            return None
        ckpts = os.path.join(workdir, "checkpoints")
        if bool(config.train.checkpoint) and not (
                os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))):
            warn(f"{ckpts} holds no checkpoint (its selected weights are read by uni-pre and UMT): the finished "
                f"run in {workdir} is redone.")
            return None
    return res


def write_history(workdir: str, history: list) -> None:
    """``<workdir>/metrics.jsonl``: one JSON record per epoch, rewritten atomically (process 0)."""
    if not parallel.is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".tmp", path)


def _fresh_meta() -> dict:
    return {"epoch": 0, "best_epoch": 0, "best_value": -float("inf"), "best_loss": float("inf"), "bad_epochs": 0,
            "history": [], "stopped_early": False, "train_time_s": 0.0, "steps": 0}


class _Store:
    """Where the books and the state of a run set are checkpointed: a single run's own
    ``checkpoints/`` (its state unstacked, its meta at the top: the layout uni-pre and UMT read), or
    the stacked state of K runs under ``state_dir``."""

    def __init__(self, programs: Programs, specs: list[RunSpec], state_dir: str, enabled: bool):
        self.single = len(specs) == 1
        self.what = "an interrupted run" if self.single else "an interrupted vectorised run"
        self.ckpt = Checkpointer(specs[0].dir if self.single else state_dir, enabled=enabled)
        if self.single:
            self.config_json = jsonable(as_dict(specs[0].config))
        else:  # keyed by each run's folder, so a difference is named as runs.<folder>.config.<key>
            root = os.path.commonpath([os.path.abspath(sp.dir) for sp in specs])
            self.config_json = jsonable({"runs": {os.path.relpath(os.path.abspath(sp.dir), root):
                                                  {"config": as_dict(sp.config), "hparams": dict(sp.hparams)}
                                                  for sp in specs}})

    def save(self, epoch, states, best, metas):
        if self.single:
            self.ckpt.save(epoch, take(states, 0), take(best, 0), dict(metas[0], config=self.config_json))
        else:
            self.ckpt.save(epoch, states, best, {"epoch": epoch, "per_seed": metas, "config": self.config_json})

    def newest(self) -> int | None:
        """The newest epoch whose checkpoint is completely written (None: none, or checkpointing off)."""
        if not self.ckpt.enabled:
            return None
        try:
            return self.ckpt.latest_epoch()
        except Exception:  # reading the folder failed while reporting an interrupt: say nothing wrong
            return None

    def _check_config(self, meta: dict) -> None:
        """Before any array is restored: the checkpoint's stored config must be this run's."""
        stored = meta.get("config")
        if stored is None:
            raise ValueError(f"{self.ckpt.workdir} holds checkpoints that do not record their config (written by "
                             "an older version); delete its checkpoints/ folder to start fresh.")
        guards.check_same_config(stored, self.config_json, self.ckpt.workdir, self.what)

    def restore(self, states, best):
        """``(states, best, metas)`` from the newest good checkpoint, or None."""
        if not self.ckpt.enabled:
            return None
        like = (take(states, 0), take(best, 0)) if self.single else (states, best)
        restored = self.ckpt.restore_latest_good(*like, log=warn, check=self._check_config)
        if restored is None:
            return None
        state, chosen, meta = restored
        if self.single:
            meta = {k: v for k, v in meta.items() if k not in ("config", "checksums", "layout")}
            meta.setdefault("steps", int(np.asarray(parallel.to_host(state.step))))
            return (jax.tree.map(lambda x: x[None], state), jax.tree.map(lambda x: np.asarray(x)[None], chosen),
                    [meta])
        return state, chosen, meta["per_seed"]


#: inputs beyond this magnitude overflow float32 arithmetic (a square exceeds 3.4e38 above ~1.8e19).
OVERFLOWING_INPUT = 1e18


def _largest_input(programs: Programs) -> float | None:
    """The largest |x| among the floating inputs of an in-memory training split (None: streamed)."""
    data, largest = programs.data, None
    for m in programs.info.modalities:
        x = data.split_arrays("train", m) if data.in_memory("train") else None
        if x is None or not np.issubdtype(np.asarray(x).dtype, np.floating):
            continue
        top = float(np.max(np.abs(x))) if np.size(x) else 0.0
        largest = top if largest is None else max(largest, top)
    return largest


def _check_finite_steps(programs: Programs, states, active, epoch) -> None:
    bad, terms = (np.asarray(x) for x in parallel.to_host((states.bad_step, states.bad_terms)))
    for i in active:
        if bad[i] >= 0:
            names = [n for j, n in enumerate(programs.metric_names) if (int(terms[i]) >> j) & 1]
            who = "" if programs.k == 1 else f"seed {programs.specs[i].seed}: "
            largest = _largest_input(programs)
            if largest is not None and largest > OVERFLOWING_INPUT:
                advice = (f"The training inputs reach |x| = {largest:.1e}, beyond what float32 arithmetic can "
                          "square (about 1.8e19): the inputs overflow, not the learning rate. Rescale or "
                          "standardise them.")
            else:
                advice = ("The inputs were checked for NaN/Inf and label range when loaded, so lower "
                          "optim.learning_rate (or check the method's own hyperparameters).")
            raise FloatingPointError(
                f"{who}non-finite {', '.join(names)} at step {int(bad[i])} (epoch {epoch}); the update was "
                f"skipped and training stopped. {advice}")


def train_runs(specs: list[RunSpec], *, state_dir: str | None = None, data=None, mesh=None,
               programs: Programs | None = None) -> list[dict]:
    """Trains the runs ``specs`` (one static configuration, see :class:`Programs`) as one program
    and returns each run's results (also in ``<spec.dir>/results.json``). ``state_dir``: where K > 1
    runs checkpoint their stacked state."""
    started = time.perf_counter()
    programs = programs if programs is not None else Programs(specs, data=data, mesh=mesh)
    config, info, k = programs.config, programs.info, programs.k
    select = selection_metric(config, info.task)
    every = checkpoint_every(config, programs)
    store = _Store(programs, specs, state_dir or specs[0].dir, bool(config.train.checkpoint))
    states = programs.states
    best = host_copy({"params": states.params, "rest": states.rest})
    metas = [_fresh_meta() for _ in specs]
    restored = store.restore(states, best)
    if restored is not None:
        states, best, metas = restored
        states = parallel.replicate(states, programs.mesh)
        for sp, m in zip(specs, metas, strict=True):  # the records up to the checkpoint (a damaged or longer
            write_history(sp.dir, m["history"])        # metrics.jsonl is rewritten from the checkpoint's)
        where = specs[0].dir if k == 1 else f"{store.ckpt.workdir} (seeds {[sp.seed for sp in specs]})"
        log(f"[{config.method.name}] resuming {where} after epoch {metas[0]['epoch']}"
            + (f" (step {int(np.asarray(parallel.to_host(states.step))[0])})." if k == 1 else "."))
    start = min(m["epoch"] for m in metas) + 1
    try:
        states, best, metas = _epochs(programs, specs, store, states, best, metas, start, every, select)
    except KeyboardInterrupt:
        saved = store.newest()
        where = f"the last checkpoint holds epoch {saved}" if saved else "no epoch is checkpointed yet"
        warn(f"[{config.method.name}] interrupted ({where}); rerun the same command to resume.")
        raise
    store.ckpt.close()
    for sp in specs:
        tensorboard.close(sp.dir)
    return _finish(programs, specs, states, best, metas, select, started)


def _epochs(programs: Programs, specs: list[RunSpec], store: _Store, states, best, metas, start: int, every: int,
            select: str):
    """The epochs ``start``… of :func:`train_runs`: returns the final ``(states, best, metas)``."""
    config, method, info, k = programs.config, programs.method, programs.info, programs.k
    tc = config.train
    epochs, patience = int(tc.num_epochs), int(tc.patience or 0)
    earliest_stop = int(method.earliest_stop_epoch())
    headline = get_task(info.task).headline
    weighted = method.gives_sampling_weights
    hooked = type(method).on_epoch_end is not Method.on_epoch_end  # else the hook returns its input: skipped
    session_time = first_time = 0.0
    for epoch in range(start, epochs + 1):
        active = [i for i, m in enumerate(metas) if not m["stopped_early"]]
        if not active:
            break
        t0 = time.perf_counter()
        weights = ([method.sampling_weights(take(states.method_state, i)) for i in range(k)] if weighted else None)
        states, mets, wait = programs.train_epoch(states, epoch, weights)
        _check_finite_steps(programs, states, active, epoch)
        val_out = programs.evaluate(states.params, states.rest, states.hparams, "validation")
        vals, current, new_states = {}, None, {}
        for i in active:
            val, _ = evaluation.summarize(method, val_out, i)
            value = selection_value(val, select, info.task)
            vals[i] = (val, improves(value, float(val["loss"]), metas[i]))
            if vals[i][1]:
                if current is None:  # every run's weights in one transfer, then run i's rows on the host
                    current = host_copy({"params": states.params, "rest": states.rest})
                best = put(best, i, take(current, i))
                metas[i].update(best_epoch=epoch, best_value=value, best_loss=float(val["loss"]), bad_epochs=0)
            else:
                metas[i]["bad_epochs"] += 1
        epoch_time = (time.perf_counter() - t0) / len(active)
        steps = np.asarray(parallel.to_host(states.step))
        for i in active:
            m, sp, (val, _) = metas[i], specs[i], vals[i]
            m["train_time_s"] += epoch_time
            logged = {}
            if hooked:
                ms = take(states.method_state, i)
                ctx = EpochContext(epoch=epoch, steps_per_epoch=programs.steps_per_epoch,
                                   state_fn=lambda: take(states, i), features_fn=programs.features_fn,
                                   fresh_params_fn=programs.fresh_params, fuse_fn=programs.fuse_fn,
                                   graphdef_eval=programs.graphdef_eval)
                new_ms, logged = method.on_epoch_end(epoch, val, ms, ctx), ctx.logged
                if ctx.replaced:  # the hook installed new parameters: write this run's state back
                    states = put(states, i, ctx.state._replace(method_state=new_ms))
                elif new_ms is not ms:  # only its method state: written back for every such run at once
                    new_states[i] = new_ms
            m["steps"] = int(steps[i])
            record = {"epoch": epoch, "step": m["steps"], "train": {n: float(np.mean(v[i])) for n, v in mets.items()},
                      "val": {"loss": val["loss"],
                              **{f"{h}_{n}": v for h, d in val["heads"].items() for n, v in d.items()},
                              **{f"mipd_{mm}": v for mm, v in val.get("mipd", {}).items()}, **logged},
                      "time_s": epoch_time}
            if wait is not None:
                record["input_wait_fraction"] = wait
            m["history"].append(jsonable(record))
            m["epoch"] = epoch
            if patience and m["bad_epochs"] >= patience and epoch >= earliest_stop and epoch < epochs:
                m["stopped_early"] = True
            write_history(sp.dir, m["history"])
            if tensorboard.enabled(config) and parallel.is_primary():
                tensorboard.log_epoch(sp.dir, m["history"][-1])
        if new_states:
            states = states._replace(method_state=put_rows(states.method_state, new_states))
        # The ETA uses this session's epochs (not those before a resume) after its first, which
        # compiles: unknown (None) until a second epoch has run.
        session_time += epoch_time * len(active)
        if epoch == start:
            first_time = session_time
        n = epoch - start
        done = all(m["stopped_early"] for m in metas)
        eta = 0.0 if done or epoch == epochs else (session_time - first_time) / n * (epochs - epoch) if n else None
        if k == 1:
            val, improved = vals[0]
            text = (f"loss {float(np.mean(mets['loss'][0])):.4f}  val {headline} "
                    f"{val['heads']['fused'][headline]:.4f}{' (best)' if improved else ''}"
                    + ("  (early stop)" if done else ""))
        else:
            text = f"best val {headline} " + " ".join(f"{abs(m['best_value']):.4f}" for m in metas)
        progress.epoch_report(run_label(config, specs), epoch, epochs, text, eta)
        if epoch % every == 0 or epoch == epochs or done:
            store.save(epoch, states, best, metas)
    return states, best, metas


def _finish(programs: Programs, specs: list[RunSpec], states, best, metas, select, started: float) -> list[dict]:
    """Evaluates every run's selected weights on validation and test and writes its results (never
    from non-finite weights or losses)."""
    config, method, info, k = programs.config, programs.method, programs.info, programs.k
    host_best = best
    best = from_saveable(best, {"params": states.params, "rest": states.rest})
    for i, sp in enumerate(specs):
        if metas[i]["best_epoch"] == 0:
            raise FloatingPointError(f"{sp.dir}: no epoch's validation {select} was a number (every value NaN), so "
                                     "no model was selected; refusing to publish the initial weights. Check the "
                                     "selection metric (train.select) for this data.")
        bad = non_finite_leaves(take(best, i))
        if bad:
            raise FloatingPointError(f"the selected weights (epoch {metas[i]['best_epoch']}) of {sp.dir} hold "
                                     f"non-finite values in {bad[:5]}; refusing to publish results from them. "
                                     f"Delete {sp.dir}/checkpoints to retrain.")
    best = parallel.replicate(best, programs.mesh)
    outs = {split: programs.evaluate(best["params"], best["rest"], states.hparams, split)
            for split in ("validation", "test")}
    per_run = []
    for i, sp in enumerate(specs):
        m = metas[i]
        chosen = take(best, i)
        hparams = take(states.hparams, i)
        own = None
        if k > 1 and bool(config.train.checkpoint):  # the run's own checkpoint, as a single run leaves
            own = Checkpointer(sp.dir)                 # it; written while the run is scored
            own.save(m["epoch"], take(states, i)._replace(hparams={}), take(host_best, i),
                     dict(m, config=jsonable(as_dict(sp.config))))
        res = {}
        for split in ("validation", "test"):
            summary, out = evaluation.summarize(method, outs[split], i)
            summary.update(evaluation.shapley(programs, chosen["params"], chosen["rest"], split, hparams))
            if not np.isfinite(summary["loss"]):
                raise FloatingPointError(f"the selected weights of {sp.dir} give a non-finite {split} loss; refusing "
                                         f"to write results.json. Delete {sp.dir}/checkpoints to retrain.")
            res[split] = (summary, out)
        (val, val_out), (test, test_out) = res["validation"], res["test"]
        evaluation.add_sample_type_accuracy(test, test_out["logits"], test_out["labels"], programs.data, info)
        os.makedirs(sp.dir, exist_ok=True)
        evaluation.save_predictions(sp.dir, {"validation": val_out, "test": test_out})
        if own is not None:  # written completely before results.json says the run is finished
            own.close()
        results = {"config": jsonable(as_dict(sp.config)), "method": config.method.name, "seed": int(sp.seed),
                   "dataset": info.name, "modalities": list(info.modalities), "task": info.task,
                   "best_epoch": m["best_epoch"], "epochs_run": m["epoch"], "selection": f"val_{select}",
                   "stopped_early": m["stopped_early"], "steps": m["steps"], "train_time_s": m["train_time_s"],
                   "compiled_epochs": programs.compiled}
        if k > 1:
            results.update(vectorized_seeds=[s.seed for s in specs], traced_hparams=dict(sp.hparams))
        results = jsonable(dict(results, validation=val, test=test))
        guards.write_json_atomic(os.path.join(sp.dir, "results.json"), results)
        per_run.append(results)
    headline = get_task(info.task).headline
    progress.run_done(run_label(config, specs), f"done in {progress.duration(time.perf_counter() - started)}: "
                      f"best epoch{'s' if k > 1 else ''} " + " ".join(str(r["best_epoch"]) for r in per_run)
                      + f"; test {headline} " + " ".join(f"{r['test']['heads']['fused'][headline]:.4f}"
                                                         for r in per_run))
    return per_run


def run_label(config, specs: list[RunSpec]) -> str:
    """How progress names a set of runs: ``mcr seed 0`` or ``mcr × 3 runs`` (the method as the
    running job unit names it, else its config's name)."""
    name = progress.shown_name(config.method.name)  # a comparison's label, e.g. uni_pre_frozen
    if name == "unimodal" and config.method.get("modality"):
        name = f"unimodal {config.method.modality}"
    return f"{name} seed {specs[0].seed}" if len(specs) == 1 else f"{name} × {len(specs)} runs"


__all__ = ["RunSpec", "checkpoint_every", "finished", "improves", "selection_metric", "selection_value",
           "train_runs", "write_history"]
