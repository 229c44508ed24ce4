"""The training loop: ``train_and_evaluate(config, workdir)``.

One jitted step over plain parameter pytrees (the NNX model is split once; the traced function
merges it), validation every epoch, model selection on validation only (ties on the selection
metric broken by the lower validation loss), early stopping on patience (never before the
method's ``earliest_stop_epoch()``, e.g. a full ReconBoost cycle), the test split evaluated once
at the selected checkpoint, orbax checkpoints every epoch (an interrupted run restarted with the
same command resumes from the last finished epoch and ends with the same result), metrics as JSON
lines, a per-epoch progress line with ETA, and a clear stop on a non-finite loss naming the step
and the term.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mcr_jax import guards, inputs, metrics, parallel, tensorboard
from mcr_jax.checkpoint import Checkpointer, from_saveable, host_copy, load_pretrained, non_finite_leaves
from mcr_jax.config import resolve_config
from mcr_jax.data.pipeline import num_batches
from mcr_jax.methods import ModelHandle, combine_logits, get_method
from mcr_jax.methods.base import EpochContext, model_inputs
from mcr_jax.optim import make_optimizer
from mcr_jax.options import as_dict, merge_options
from mcr_jax.state import StepOutput, TrainState, init_state, split_model
from mcr_jax.steps import EVAL_PERMUTATION_SEED, make_epoch_fn, make_eval_fn, make_eval_step, make_train_step
from mcr_jax.tasks import Task, get_task


def _log(msg: str) -> None:
    if parallel.is_primary():
        print(msg, flush=True)


def _scalar(x) -> int:
    return int(np.asarray(parallel.to_host(x)))


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _eval_batches(run, params, rest, split):
    """``[(host outputs, host batch)]`` over a split: one compiled call when the split is on the
    device, else one call per batch of the host pipeline (same batches, same results)."""
    if split in run.device_arrays:
        return split_eval_output(parallel.to_host(run.eval_fn[split](params, rest, run.device_arrays[split])))
    return [parallel.to_host((run.eval_step(params, rest, batch, jnp.int32(index)), batch))
            for index, batch in enumerate(run.batches(split, run.eval_batch_size, train=False, epoch=0))]


def evaluate(run, params, rest, split) -> tuple[dict, dict]:
    """Metrics of every head on a whole split (padding removed), plus the raw outputs."""
    return summarize_eval(run.method, _eval_batches(run, params, rest, split))


def split_eval_output(out: dict) -> list[tuple[dict, dict]]:
    """A whole-split evaluation output (leading ``[num_batches]`` axis, with ``mask`` and ``label``)
    as the ``[(outputs, batch)]`` list :func:`summarize_eval` reads."""
    return [({k: jax.tree.map(lambda a, i=i: a[i], v) for k, v in out.items()},
             {"mask": out["mask"][i], "label": out["label"][i]}) for i in range(out["mask"].shape[0])]


def summarize_eval(method, batches) -> tuple[dict, dict]:
    """Metrics of every head from per-batch evaluation outputs ``[(outputs, batch)]`` (host arrays;
    padded rows removed by the batches' masks), plus the concatenated raw outputs."""
    logits, uni, labels, losses, mipd = [], {}, [], [], []
    for out, host in batches:
        valid = np.asarray(host["mask"]) > 0
        logits.append(np.asarray(out["logits"])[valid])
        labels.append(np.asarray(host["label"])[valid])
        for m, v in out["unimodal"].items():
            uni.setdefault(m, []).append(np.asarray(v)[valid])
        losses.append((float(out["loss"]), int(valid.sum())))
        if "mipd" in out and valid.sum() >= 2:  # a batch's valid rows, weighted by their number
            mipd.append((np.asarray(out["mipd"]), int(valid.sum())))
    outputs = {"logits": np.concatenate(logits), "labels": np.concatenate(labels),
               "unimodal": {m: np.concatenate(v) for m, v in uni.items()}}
    report_uni = method.uses_fusion and method.reports_unimodal_heads
    heads = {"fused": outputs["logits"], **(outputs["unimodal"] if report_uni else {})}
    res = {"heads": method.task.head_metrics(heads, outputs["labels"]),
           "loss": sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)}
    if method.task.categorical and report_uni:
        res["error_groups"] = metrics.error_groups(outputs["logits"], outputs["unimodal"], outputs["labels"])
    if mipd:
        mean = np.average([d for d, _ in mipd], axis=0, weights=[n for _, n in mipd])
        res["mipd"] = {m: float(mean[i]) for i, m in enumerate(method.modalities)}
    return res, outputs


#: ``eval.shapley_absent``: how the Shapley diagnostic replaces an absent modality
SHAPLEY_ABSENT = ("zero_input", "zero", "mean")


def shapley(run, params, rest, split, hparams=None) -> dict:
    """The Shapley modality-contribution diagnostic (BalanceMM's ``Calculate_Shapley``) on a split:
    ``{"shapley": {m: φ_m}, "shapley_subsets": {"x1+x2": v, ..., "none": v(∅)}}``, or ``{}`` when
    ``eval.shapley`` is off or the method's prediction is not the fused head.

    ``v(S)`` is the fused prediction's headline metric on the whole split (padding removed) with the
    modalities outside ``S`` absent, oriented so that larger is better (classification: accuracy, as
    BalanceMM; regression: −MAE). An absent modality is replaced (``eval.shapley_absent``) by
    "zero_input": its input zeroed before the encoders (BalanceMM: ``torch.zeros_like`` of the input
    in the models' ``forward(padding=...)``), the method's own prediction; "zero" / "mean": its latent
    zeroed / set to the split's mean latent, fused by ``method.fuse`` (as MIPD permutes latents).
    ``φ_m`` averages ``m``'s marginal contribution over the orders (:func:`metrics.shapley_values`)."""
    method, ec = run.method, run.config.eval
    if not (bool(ec.shapley) and method.uses_fusion):
        return {}
    names, task, mode = tuple(run.info.modalities), method.task, str(ec.shapley_absent)

    def host_pass(keep):
        logits, latents, labels = [], {}, []
        keep = jnp.asarray(keep, jnp.float32)
        for batch in run.batches(split, run.eval_batch_size, train=False, epoch=0):
            out, host = parallel.to_host((run.subset_predict(params, rest, batch, keep, dict(hparams or {})), batch))
            valid = np.asarray(host["mask"]) > 0
            logits.append(np.asarray(out["logits"])[valid])
            labels.append(np.asarray(host["label"])[valid])
            for m, z in out["latents"].items():
                latents.setdefault(m, []).append(np.asarray(z)[valid])
        return np.concatenate(logits), {m: np.concatenate(v) for m, v in latents.items()}, np.concatenate(labels)

    full, latents, labels = host_pass(np.ones(len(names)))

    def predict(subset):
        if mode == "zero_input":
            return full if len(subset) == len(names) else host_pass([float(m in subset) for m in names])[0]
        fill = {m: (np.zeros_like(z[0]) if mode == "zero" else z.mean(axis=0)) for m, z in latents.items()}
        return run.fuse_fn(params, rest, {m: z if m in subset else np.broadcast_to(fill[m], z.shape).copy()
                                          for m, z in latents.items()})

    def score(logits):
        return task.oriented(task.headline, task.head_metrics({"fused": logits}, labels)["fused"][task.headline])

    values = metrics.subset_values(names, predict, score)
    return {"shapley": metrics.shapley_values(values, names),
            "shapley_subsets": {metrics.subset_key(s): v for s, v in values.items()}}


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


# ----------------------------------------------------------------------------------------------
# Set-up helpers.


def _finished(workdir: str, config) -> dict | None:
    """The stored results of a finished run in ``workdir`` (None: not finished, or its results file
    is damaged); a finished run of another config is refused, naming the differing keys."""
    res = guards.read_json_or_none(os.path.join(workdir, "results.json"), log=_log)
    if res is None:
        return None
    guards.check_same_config(res.get("config", {}), _jsonable(as_dict(config)), workdir, "a finished run")
    return res



# ----------------------------------------------------------------------------------------------
# Set-up: everything a run needs, placed on the mesh.


@dataclasses.dataclass
class Run:
    """What :func:`setup` builds: data, method, state on the mesh, the jitted steps, helpers.

    ``epoch_fn`` (a whole training epoch in one call) and ``eval_fn`` (a whole split) exist for
    splits held on the device (``device_arrays``: in-memory datasets, one process); otherwise the
    trainer loops over ``train_step`` / ``eval_step`` batch by batch."""

    config: Any
    data: Any
    info: Any
    method: Any
    mesh: Any
    seed: int
    state: TrainState
    train_step: Callable
    eval_step: Callable
    metric_names: list
    steps_per_epoch: int
    batch_size: int
    eval_batch_size: int
    graphdef_train: Any
    graphdef_eval: Any
    tx: Any
    step_fn: Callable | None = None
    eval_step_fn: Callable | None = None
    device_arrays: dict = dataclasses.field(default_factory=dict)
    epoch_fn: Callable | None = None
    eval_fn: dict = dataclasses.field(default_factory=dict)
    features_fn: Callable | None = None
    fresh_params: Callable | None = None
    fuse_fn: Callable | None = None
    subset_predict: Callable | None = None

    def batches(self, split: str, batch_size: int, *, train: bool, epoch: int, weights=None):
        """This process's slice of each global batch, assembled into global sharded arrays
        (``weights``: the method's per-example sampling weights, training only)."""
        for local in self.data.batches(split, batch_size, train=train, seed=self.seed, epoch=epoch,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       weights=weights):
            yield parallel.global_batch(local, self.mesh)

    def epoch_rows(self, epoch: int, weights=None) -> np.ndarray:
        """``[steps, batch]`` int32: the training batches' example indices for ``epoch``, the host
        pipeline's order (shuffled by seed and epoch; drawn ``∝ weights`` when the method gives
        sampling weights), for the compiled epoch."""
        rows, _ = self.data.batch_layout("train", self.batch_size, train=True, seed=self.seed, epoch=epoch,
                                         weights=weights)
        return rows.astype(np.int32)


def compiled_epochs(config, data) -> bool:
    """Whether whole epochs run as one compiled call: in-memory training data, one process, and
    ``train.compiled_epochs`` not switched off."""
    return (bool(config.train.compiled_epochs) and jax.process_count() == 1
            and hasattr(data, "in_memory") and data.in_memory("train"))


def setup(config, *, mesh=None) -> Run:
    """Loads the data, builds model, method and optimizer, places the state and compiles the steps."""
    config = resolve_config(config)
    data = inputs.load(config.data)
    info = data.info
    method = get_method(config.method, info)
    mesh = mesh if mesh is not None else parallel.make_mesh(int(config.parallel.num_devices))
    seed = int(config.seed)
    model = inputs.build_model(config.model, info, seed=seed)
    method.check_model(model)
    graphdef_train, graphdef_eval, params, rest = split_model(model)

    tc = config.train
    batch_size, epochs = int(tc.batch_size), int(tc.num_epochs)
    eval_bs = int(config.eval.batch_size or batch_size)
    parallel.check_batch_size(batch_size, mesh)
    parallel.check_batch_size(eval_bs, mesh, "eval.batch_size")
    steps_per_epoch = num_batches(data.size("train"), batch_size, drop_remainder=True)
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {data.size('train')} training examples.")
    tx = method.make_optimizer(make_optimizer(config.optim, epochs * steps_per_epoch), params)
    pretrained = config.method.get("pretrained", None) or config.init.pretrained
    if pretrained:  # uni-pre, or any method started from unimodal runs (config.init.pretrained)
        params, rest = load_pretrained(params, rest, dict(pretrained), info.modalities)

    state = parallel.replicate(init_state(params, rest, tx, method, seed), mesh)
    sample = next(data.batches("train", batch_size, train=True, seed=seed, epoch=1))
    shapes = jax.eval_shape(lambda p, r, b, k, ms: StepOutput(*method.gradients(
        ModelHandle(graphdef_train, graphdef_eval, r, mesh), p, b, k, ms)).metrics,
        params, rest, sample, state.key, state.method_state)
    metric_names = sorted(shapes) + ["grad_norm"]
    rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    step = make_train_step(method, tx, graphdef_train, graphdef_eval, metric_names,
                           float(config.optim.learning_rate), mesh=mesh)
    train_step = jax.jit(step, in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)
    raw_eval = make_eval_step(method, graphdef_eval, int(config.eval.mipd_samples))
    eval_step = jax.jit(raw_eval, in_shardings=(rep, rep, shard, rep))
    encode = jax.jit(lambda p, r, b: nnx.merge(graphdef_eval, p, r).encode(*model_inputs(b, info.modalities)),
                     in_shardings=(rep, rep, shard))
    run = Run(config=config, data=data, info=info, method=method, mesh=mesh, seed=seed, state=state,
              train_step=train_step, eval_step=eval_step, metric_names=metric_names, steps_per_epoch=steps_per_epoch,
              batch_size=batch_size, eval_batch_size=eval_bs, graphdef_train=graphdef_train,
              graphdef_eval=graphdef_eval, tx=tx, step_fn=step, eval_step_fn=raw_eval)
    if compiled_epochs(config, data):
        for split in ("train", "validation", "test"):
            run.device_arrays[split] = parallel.replicate(data.arrays(split), mesh)
        run.epoch_fn = jax.jit(make_epoch_fn(step, batch_sharding=shard), in_shardings=(rep, rep, rep),
                               out_shardings=(rep, rep), donate_argnums=0)
        for split in ("validation", "test"):
            run.eval_fn[split] = jax.jit(make_eval_fn(raw_eval, num_examples=data.size(split), batch_size=eval_bs,
                                                      batch_sharding=shard), in_shardings=(rep, rep, rep))

    def features_fn(p, r, split):
        feats, labels = {}, []
        for batch in run.batches(split, eval_bs, train=False, epoch=0):
            out, host = parallel.to_host((encode(p, r, batch), batch))
            valid = np.asarray(host["mask"]) > 0
            for m, z in out.items():
                feats.setdefault(m, []).append(z[valid])
            labels.append(np.asarray(host["label"])[valid])
        return {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels)

    def fresh_params(new_seed):
        fresh = inputs.build_model(config.model, info, seed=int(new_seed))
        return parallel.replicate(nnx.as_pure(nnx.split(fresh, nnx.Param, ...)[1]), mesh)

    fuse = jax.jit(lambda p, r, z: method.fuse(nnx.merge(graphdef_eval, p, r), z))

    def fuse_fn(p, r, latents):
        return np.asarray(parallel.to_host(fuse(p, r, {m: jnp.asarray(v) for m, v in latents.items()})))

    if str(config.eval.shapley_absent) not in SHAPLEY_ABSENT:
        raise ValueError(f"eval.shapley_absent={config.eval.shapley_absent!r}; choose one of {SHAPLEY_ABSENT}.")

    run.features_fn, run.fresh_params, run.fuse_fn = features_fn, fresh_params, fuse_fn
    run.subset_predict = jax.jit(make_subset_predict(method, graphdef_eval))
    return run


def make_subset_predict(method, graphdef_eval):
    """``(params, rest, batch, keep [M], hparams) -> {"logits", "latents"}``: the method's evaluation
    prediction with the inputs of modality ``i`` zeroed where ``keep[i] == 0`` (sequence masks kept),
    for :func:`shapley`."""

    def subset_predict(p, r, batch, keep, hparams):
        model = nnx.merge(graphdef_eval, p, r)
        batch = dict(batch)
        for i, m in enumerate(method.modalities):
            batch[m] = jnp.where(keep[i] > 0, batch[m], jnp.zeros_like(batch[m]))
        with method.tracing({k: v for k, v in hparams.items() if k != "learning_rate"}):
            out = method.predict(model, batch)
        return {"logits": out["logits"], "latents": out["latents"]}

    return subset_predict


# ----------------------------------------------------------------------------------------------
# The loop, in named pieces.


def train_epoch(run: Run, state: TrainState, epoch: int) -> tuple[TrainState, dict[str, float]]:
    """One training epoch: the compiled epoch when the data is on the device, else the step loop.
    Returns the new state and the epoch's mean of every step metric; raises on a non-finite step."""
    weights = run.method.sampling_weights(state.method_state)  # None: the ordinary shuffled epoch
    if run.epoch_fn is not None:
        state, mets = run.epoch_fn(state, run.device_arrays["train"], run.epoch_rows(epoch, weights))
        mets = parallel.to_host(mets)
        means = {k: float(np.mean(v)) for k, v in mets.items()}
    else:
        step_metrics = []
        for batch in run.batches("train", run.batch_size, train=True, epoch=epoch, weights=weights):
            state, m = run.train_step(state, batch)
            step_metrics.append(m)
        step_metrics = parallel.to_host(step_metrics)  # one transfer per epoch
        means = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
    if _scalar(state.bad_step) >= 0:
        terms = [n for i, n in enumerate(run.metric_names) if (_scalar(state.bad_terms) >> i) & 1]
        raise FloatingPointError(
            f"non-finite {', '.join(terms)} at step {_scalar(state.bad_step)} (epoch {epoch}); the update was "
            f"skipped and training stopped. The inputs were checked for NaN/Inf and label range when loaded, so "
            f"lower optim.learning_rate (or check the method's own hyperparameters).")
    return state, means


def checkpoint_every(config, run: Run) -> int:
    """``train.checkpoint_every`` (epochs); 0 = automatic: every epoch when batches are streamed (an
    epoch can take minutes), a handful of saves per run when the data is on the device (an epoch
    takes milliseconds and a save is the dominant cost). The last epoch is always saved."""
    every = int(config.train.checkpoint_every or 0)
    if every < 0:
        raise ValueError(f"train.checkpoint_every must be >= 0 (0 = automatic); got {every}.")
    if every:
        return every
    return max(1, int(config.train.num_epochs) // 4) if run.epoch_fn is not None else 1


def _start(run: Run, workdir: str, ckpt: Checkpointer) -> tuple[TrainState, dict, dict]:
    """``(state, best, meta)``: restored from the newest good checkpoint, or fresh."""
    config, state = run.config, run.state
    best = host_copy({"params": state.params, "rest": state.rest})
    config_json = _jsonable(as_dict(config))
    meta = {"epoch": 0, "best_epoch": 0, "best_value": -float("inf"), "best_loss": float("inf"), "bad_epochs": 0,
            "history": [], "stopped_early": False, "train_time_s": 0.0, "config": config_json}
    restored = ckpt.restore_latest_good(state, best, log=_log) if ckpt.enabled else None
    if restored is None:
        return state, best, meta
    stored = restored[2].get("config")
    if stored is None:
        raise ValueError(f"{workdir} holds checkpoints that do not record their config (written by an older "
                         "version); delete its checkpoints/ folder to start fresh.")
    guards.check_same_config(stored, config_json, workdir, "an interrupted run")
    state, best, meta = restored
    _log(f"[{config.method.name}] resuming {workdir} after epoch {meta['epoch']} (step {_scalar(state.step)}).")
    return state, best, meta


def _select(run: Run, state: TrainState, val: dict, epoch: int, best, meta: dict, select: str):
    """Model selection after an epoch: returns ``(best, improved)`` and updates ``meta``."""
    value = selection_value(val, select, run.info.task)
    improved = improves(value, float(val["loss"]), meta)
    if improved:
        best = host_copy({"params": state.params, "rest": state.rest})
        meta.update(best_epoch=epoch, best_value=value, best_loss=float(val["loss"]), bad_epochs=0)
    else:
        meta["bad_epochs"] += 1
    return best, improved


def _finish(run: Run, workdir: str, state: TrainState, best, meta: dict, select: str) -> dict:
    """Evaluates the selected weights on validation and test and writes the results (never from
    non-finite weights or losses)."""
    config, info = run.config, run.info
    best = from_saveable(best, {"params": state.params, "rest": state.rest})
    bad = non_finite_leaves(best)
    if bad:
        raise FloatingPointError(f"the selected weights (epoch {meta['best_epoch']}) hold non-finite values in "
                                 f"{bad[:5]}; refusing to publish results from them. Delete {workdir}/checkpoints "
                                 "to retrain.")
    best = parallel.replicate(best, run.mesh)
    val, val_out = evaluate(run, best["params"], best["rest"], "validation")
    test, test_out = evaluate(run, best["params"], best["rest"], "test")
    val.update(shapley(run, best["params"], best["rest"], "validation"))
    test.update(shapley(run, best["params"], best["rest"], "test"))
    for name, res in (("validation", val), ("test", test)):
        if not np.isfinite(res["loss"]):
            raise FloatingPointError(f"the selected weights give a non-finite {name} loss; refusing to write "
                                     f"results.json. Delete {workdir}/checkpoints to retrain.")
    _add_sample_type_accuracy(test, test_out["logits"], test_out["labels"], run.data, info)
    _save_predictions(workdir, {"validation": val_out, "test": test_out})
    results = {"config": _jsonable(as_dict(config)), "method": config.method.name, "seed": run.seed,
               "dataset": info.name, "modalities": list(info.modalities), "task": info.task,
               "best_epoch": meta["best_epoch"], "epochs_run": meta["epoch"], "selection": f"val_{select}",
               "stopped_early": meta["stopped_early"], "steps": _scalar(state.step),
               "train_time_s": meta["train_time_s"], "compiled_epochs": run.epoch_fn is not None,
               "validation": val, "test": test}
    results = _jsonable(results)
    if parallel.is_primary():
        guards.write_json_atomic(os.path.join(workdir, "results.json"), results)
    fused = test["heads"]["fused"]
    _log(f"[{config.method.name}] done: best epoch {meta['best_epoch']}, test "
         + ", ".join(f"{k} {v:.4f}" for k, v in fused.items()))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config.method`` on ``config.data`` and returns the results (also in results.json)."""
    workdir = os.path.abspath(workdir)
    config = resolve_config(config)
    guards.validate_config(config)
    if config.method.name == "ensemble":
        return train_ensemble(config, workdir)
    done = _finished(workdir, config)
    if done is not None:
        _log(f"[{config.method.name}] {workdir} already finished: returning its results.")
        return done
    if parallel.is_primary():
        guards.check_writable(workdir)  # before the data, the compile and an epoch of training

    run = setup(config)
    info, method, tc = run.info, run.method, config.train
    epochs = int(tc.num_epochs)
    ckpt = Checkpointer(workdir, enabled=bool(tc.checkpoint))
    every = checkpoint_every(config, run)
    state, best, meta = _start(run, workdir, ckpt)
    patience = int(tc.patience or 0)
    earliest_stop = int(method.earliest_stop_epoch())
    select = selection_metric(config, info.task)
    start = meta["epoch"] + 1
    session_time = 0.0
    for epoch in range(start, epochs + 1):
        if meta["stopped_early"]:
            break
        t0 = time.perf_counter()
        state, train_means = train_epoch(run, state, epoch)
        val, _ = evaluate(run, state.params, state.rest, "validation")
        best, improved = _select(run, state, val, epoch, best, meta, select)
        epoch_time = time.perf_counter() - t0
        meta["train_time_s"] += epoch_time
        ctx = EpochContext(epoch=epoch, steps_per_epoch=run.steps_per_epoch, state=state,
                           features_fn=run.features_fn, fresh_params_fn=run.fresh_params, fuse_fn=run.fuse_fn)
        new_ms = method.on_epoch_end(epoch, val, ctx.state.method_state, ctx)
        state = ctx.state._replace(method_state=new_ms)
        record = {"epoch": epoch, "step": _scalar(state.step), "train": train_means,
                  "val": {"loss": val["loss"], **{f"{h}_{k}": v for h, d in val["heads"].items() for k, v in d.items()},
                          **{f"mipd_{m}": v for m, v in val.get("mipd", {}).items()}, **ctx.logged},
                  "time_s": epoch_time}
        meta["history"].append(_jsonable(record))
        if tensorboard.enabled(config) and parallel.is_primary():
            tensorboard.log_epoch(workdir, meta["history"][-1])
        meta["epoch"] = epoch
        if patience and meta["bad_epochs"] >= patience and epoch >= earliest_stop and epoch < epochs:
            meta["stopped_early"] = True
        _write_history(workdir, meta["history"])
        session_time += epoch_time  # the ETA uses this session's epochs (not the time before a resume)
        eta = session_time / (epoch - start + 1) * (epochs - epoch) if not meta["stopped_early"] else 0
        main_metric = get_task(info.task).headline
        _log(f"[{config.method.name}] epoch {epoch:3d}/{epochs}  loss {train_means['loss']:.4f}  "
             f"val {main_metric} {val['heads']['fused'][main_metric]:.4f}{' *' if improved else '  '}  "
             f"{epoch_time:5.2f}s  ETA {eta:5.0f}s" + ("  (early stop)" if meta["stopped_early"] else ""))
        if epoch % every == 0 or epoch == epochs or meta["stopped_early"]:
            ckpt.save(epoch, state, best, meta)
    ckpt.close()
    tensorboard.close(workdir)
    return _finish(run, workdir, state, best, meta, select)


def _add_sample_type_accuracy(res: dict, logits, labels, data, info) -> None:
    """Synthetic data: the fused accuracy per sample type (-1 shared, m unique to modality m)."""
    sample_type = data.split_arrays("test", "sample_type")
    if sample_type is not None and get_task(info.task).categorical:
        correct = np.argmax(logits, -1) == labels
        res["by_sample_type"] = {int(t): float(correct[sample_type == t].mean()) for t in np.unique(sample_type)}


def _write_history(workdir: str, history: list) -> None:
    if not parallel.is_primary():
        return
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".tmp", path)


def _save_predictions(workdir: str, outs: dict) -> None:
    if not parallel.is_primary():
        return
    arrays = {}
    for split, out in outs.items():
        arrays[f"{split}_logits"] = out["logits"]
        arrays[f"{split}_labels"] = out["labels"]
        for m, v in out["unimodal"].items():
            arrays[f"{split}_unimodal_{m}"] = v
    np.savez(os.path.join(workdir, "predictions.npz"), **arrays)


# ----------------------------------------------------------------------------------------------
# Orchestrated methods and several seeds.


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
    data = inputs.load(config.data)
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
    results = {"config": _jsonable(as_dict(config)), "method": "ensemble", "seed": int(config.seed),
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
            _add_sample_type_accuracy(res, fused, labels, data, info)
        results[split] = res
    results = _jsonable(results)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results


__all__ = ["EVAL_PERMUTATION_SEED", "Run", "evaluate", "load_pretrained", "make_train_step", "setup",
           "train_and_evaluate", "train_ensemble", "train_epoch"]
