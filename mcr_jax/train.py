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

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mcr_jax import guards, inputs, metrics, parallel
from mcr_jax.checkpoint import Checkpointer, from_saveable, host_copy, non_finite_leaves
from mcr_jax.data.pipeline import num_batches
from mcr_jax.losses import mipd_divergences, sample_permutations
from mcr_jax.methods import ModelHandle, combine_logits, get_method, task_loss
from mcr_jax.methods.base import EpochContext, model_inputs
from mcr_jax.optim import make_optimizer


def _log(msg: str) -> None:
    if parallel.is_primary():
        print(msg, flush=True)


def _scalar(x) -> int:
    return int(np.asarray(parallel.to_host(x)))


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------------------------
# Steps.


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def make_train_step(method, tx, graphdef_train, graphdef_eval, metric_names):
    """``(state, batch) -> (state, metrics)``; a non-finite step leaves the state unchanged and
    records the step and the offending terms (checked on the host once per epoch)."""

    def step(state, batch):
        key, sub = jax.random.split(state["key"])
        handle = ModelHandle(graphdef_train, graphdef_eval, state["rest"])
        grads, tx_kwargs, new_rest, new_ms, mets = method.gradients(handle, state["params"], batch, sub,
                                                                    state["method_state"])
        mets = dict(mets, grad_norm=optax.tree.norm(grads))
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"], **tx_kwargs)
        new_params = optax.apply_updates(state["params"], updates)
        bad = jnp.stack([~jnp.all(jnp.isfinite(mets[n])) for n in metric_names])
        ok = ~jnp.any(bad)
        keep = lambda new, old: jax.tree.map(lambda a, b: a if _is_key(a) else jnp.where(ok, a, b), new, old)
        first = state["bad_step"] < 0
        new_state = {
            "params": keep(new_params, state["params"]),
            "rest": keep(new_rest, state["rest"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "method_state": keep(new_ms, state["method_state"]),
            "key": key,
            "step": state["step"] + 1,
            "bad_step": jnp.where(first & ~ok, state["step"], state["bad_step"]),
            "bad_terms": jnp.where(first & ~ok, jnp.sum(bad.astype(jnp.int32) << jnp.arange(len(metric_names))),
                                   state["bad_terms"]),
        }
        return new_state, mets

    return step


#: the key of the evaluation MIPD diagnostic's permutations (folded with the batch index).
EVAL_PERMUTATION_SEED = 0


def make_eval_step(method, graphdef_eval, num_samples: int):
    """``(params, rest, batch, index) -> outputs``: predictions and a MIPD balance diagnostic per
    modality over the batch's valid rows.

    The diagnostic draws ``num_samples`` fresh derangements of the valid rows per batch, from a
    fixed key folded with the batch's ``index`` in the split: deterministic (every model is scored
    with the same permutations), never the identity, and padded rows take no part."""

    def step(params, rest, batch, index):
        model = nnx.merge(graphdef_eval, params, rest)
        out = method.predict(model, batch)
        res = {"logits": out["logits"], "unimodal": out["unimodal"],
               "loss": task_loss(out["logits"], batch["label"], batch["mask"], method.task)}
        if method.uses_fusion and num_samples > 0:
            names = method.modalities
            valid = batch["mask"] > 0
            key = jax.random.fold_in(jax.random.PRNGKey(EVAL_PERMUTATION_SEED), index)
            perms = sample_permutations(key, num_samples, batch["label"].shape[0], valid=valid)
            res["mipd"] = mipd_divergences(
                out["logits"], lambda xs: method.fuse(model, dict(zip(names, xs, strict=True))),
                [out["latents"][m] for m in names], perms, mask=valid,
                divergence="mse" if method.task == "regression" else "jsd")
        return res

    return step


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(run, params, rest, split) -> tuple[dict, dict]:
    """Metrics of every head on a whole split (padding removed), plus the raw outputs."""
    method = run.method
    logits, uni, labels, losses, mipd = [], {}, [], [], []
    for index, batch in enumerate(run.batches(split, run.eval_batch_size, train=False, epoch=0)):
        out, host = parallel.to_host((run.eval_step(params, rest, batch, jnp.int32(index)), batch))
        valid = np.asarray(host["mask"]) > 0
        logits.append(out["logits"][valid])
        labels.append(np.asarray(host["label"])[valid])
        for m, v in out["unimodal"].items():
            uni.setdefault(m, []).append(v[valid])
        losses.append((float(out["loss"]), int(valid.sum())))
        if "mipd" in out and valid.sum() >= 2:  # a batch's valid rows, weighted by their number
            mipd.append((out["mipd"], int(valid.sum())))
    outputs = {"logits": np.concatenate(logits), "labels": np.concatenate(labels),
               "unimodal": {m: np.concatenate(v) for m, v in uni.items()}}
    report_uni = method.uses_fusion and method.reports_unimodal_heads
    heads = {"fused": outputs["logits"], **(outputs["unimodal"] if report_uni else {})}
    res = {"heads": metrics.head_metrics(heads, outputs["labels"], method.task),
           "loss": sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)}
    if method.task == "classification" and report_uni:
        res["error_groups"] = metrics.error_groups(outputs["logits"], outputs["unimodal"], outputs["labels"])
    if mipd:
        mean = np.average([d for d, _ in mipd], axis=0, weights=[n for _, n in mipd])
        res["mipd"] = {m: float(mean[i]) for i, m in enumerate(method.modalities)}
    return res, outputs


def selection_metric(config, task: str) -> str:
    """The validation metric that selects the model: ``train.select``, else loss (regression) or accuracy."""
    select = config.train.get("select", None) or ("loss" if task == "regression" else "accuracy")
    if select not in guards.SELECTABLE[task]:
        raise ValueError(f"train.select={select!r} is not a validation metric of a {task} task; use one of "
                         f"{sorted(guards.SELECTABLE[task])} (or '' for the default).")
    return select


def selection_value(val: dict, select: str, task: str = "classification") -> float:
    """The selection metric's value on validation, oriented so that larger is better."""
    if select == "loss":
        return -float(val["loss"])
    value = float(val["heads"]["fused"][select])
    return value if guards.SELECTABLE[task][select] else -value


def improves(value: float, loss: float, meta: dict) -> bool:
    """Whether an epoch's validation result beats the best so far: a larger selection value, or an
    equal one with a lower validation loss (accuracy ties are common on small validation splits;
    without the tie-break the earliest tied epoch, often a barely trained model, would win)."""
    best = meta["best_value"]
    return value > best or (value == best and loss < meta.get("best_loss", float("inf")))


# ----------------------------------------------------------------------------------------------
# Set-up helpers.


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
        best = Checkpointer(wd).restore_best({"params": params, "rest": rest})
        best = from_saveable(best, {"params": params, "rest": rest})
        for part in ("encoders", "heads"):
            params[part][m] = best["params"][part][m]
            if part in best["rest"] and m in best["rest"][part]:
                rest[part][m] = best["rest"][part][m]
    return params, rest


def _finished(workdir: str, config) -> dict | None:
    """The stored results of a finished run in ``workdir`` (None: not finished, or its results file
    is damaged); a finished run of another config is refused, naming the differing keys."""
    res = guards.read_json_or_none(os.path.join(workdir, "results.json"), log=_log)
    if res is None:
        return None
    guards.check_same_config(res.get("config", {}), _jsonable(_config_dict(config)), workdir, "a finished run")
    return res



# ----------------------------------------------------------------------------------------------
# Set-up: everything a run needs, placed on the mesh.


class Run:
    """What :func:`setup` builds: data, method, state on the mesh, the jitted steps, helpers."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def batches(self, split: str, batch_size: int, *, train: bool, epoch: int):
        """This process's slice of each global batch, assembled into global sharded arrays."""
        for local in self.data.batches(split, batch_size, train=train, seed=self.seed, epoch=epoch,
                                       process_index=jax.process_index(), process_count=jax.process_count()):
            yield parallel.global_batch(local, self.mesh)


def setup(config, *, mesh=None) -> Run:
    """Loads the data, builds model, method and optimizer, places the state and compiles the steps."""
    data = inputs.load(config.data)
    info = data.info
    method = get_method(config.method, info)
    mesh = mesh if mesh is not None else parallel.make_mesh(int(config.get("parallel", {}).get("num_devices", 0)))
    method.mesh = mesh
    seed = int(config.seed)
    model = inputs.build_model(config.model, info, seed=seed)
    method.check_model(model)
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    tc = config.train
    batch_size, epochs = int(tc.batch_size), int(tc.num_epochs)
    eval_bs = int(config.get("eval", {}).get("batch_size", 0) or batch_size)
    parallel.check_batch_size(batch_size, mesh)
    parallel.check_batch_size(eval_bs, mesh, "eval.batch_size")
    steps_per_epoch = num_batches(data.size("train"), batch_size, drop_remainder=True)
    if steps_per_epoch < 1:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {data.size('train')} training examples.")
    tx = method.make_optimizer(make_optimizer(config.optim, epochs * steps_per_epoch), params)
    pretrained = config.method.get("pretrained", None) or config.get("init", {}).get("pretrained", None)
    if pretrained:  # uni-pre, or any method started from unimodal runs (config.init.pretrained)
        params, rest = load_pretrained(params, rest, dict(pretrained), info.modalities)

    state = {"params": params, "rest": rest, "opt_state": tx.init(params),
             "method_state": method.init_method_state(params), "key": jax.random.PRNGKey(seed),
             "step": jnp.zeros((), jnp.int32), "bad_step": -jnp.ones((), jnp.int32),
             "bad_terms": jnp.zeros((), jnp.int32)}
    state = parallel.replicate(state, mesh)
    sample = next(data.batches("train", batch_size, train=True, seed=seed, epoch=1))
    shapes = jax.eval_shape(lambda p, r, b, k, ms: method.gradients(ModelHandle(graphdef_train, graphdef_eval, r),
                                                                     p, b, k, ms)[4],
                            params, rest, sample, state["key"], state["method_state"])
    metric_names = sorted(shapes) + ["grad_norm"]
    rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    train_step = jax.jit(make_train_step(method, tx, graphdef_train, graphdef_eval, metric_names),
                         in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(method, graphdef_eval, int(config.get("eval", {}).get("mipd_samples", 8))),
                        in_shardings=(rep, rep, shard, rep))
    encode = jax.jit(lambda p, r, b: nnx.merge(graphdef_eval, p, r).encode(*model_inputs(b, info.modalities)),
                     in_shardings=(rep, rep, shard))
    run = Run(config=config, data=data, info=info, method=method, mesh=mesh, seed=seed, state=state,
              train_step=train_step, eval_step=eval_step, metric_names=metric_names, steps_per_epoch=steps_per_epoch,
              batch_size=batch_size, eval_batch_size=eval_bs, graphdef_train=graphdef_train,
              graphdef_eval=graphdef_eval, tx=tx)

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

    run.features_fn, run.fresh_params = features_fn, fresh_params
    return run

# ----------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config.method`` on ``config.data`` and returns the results (also in results.json)."""
    workdir = os.path.abspath(workdir)
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
    data, info, method, state, tc = run.data, run.info, run.method, run.state, config.train
    epochs, batch_size = int(tc.num_epochs), run.batch_size
    train_step, metric_names, steps_per_epoch = run.train_step, run.metric_names, run.steps_per_epoch

    ckpt = Checkpointer(workdir, enabled=bool(tc.get("checkpoint", True)))
    best = host_copy({"params": state["params"], "rest": state["rest"]})
    config_json = _jsonable(_config_dict(config))
    meta = {"epoch": 0, "best_epoch": 0, "best_value": -float("inf"), "best_loss": float("inf"), "bad_epochs": 0,
            "history": [], "stopped_early": False, "train_time_s": 0.0, "config": config_json}
    restored = ckpt.restore_latest_good(state, best, log=_log) if ckpt.enabled else None
    if restored is not None:
        stored = restored[2].get("config")
        if stored is None:
            raise ValueError(f"{workdir} holds checkpoints that do not record their config (written by an older "
                             "version); delete its checkpoints/ folder to start fresh.")
        guards.check_same_config(stored, config_json, workdir, "an interrupted run")
        state, best, meta = restored
        _log(f"[{config.method.name}] resuming {workdir} after epoch {meta['epoch']} (step {_scalar(state['step'])}).")

    patience = int(tc.get("patience", 0) or 0)
    earliest_stop = int(method.earliest_stop_epoch())
    select = selection_metric(config, info.task)
    start = meta["epoch"] + 1
    session_time = 0.0
    for epoch in range(start, epochs + 1):
        if meta["stopped_early"]:
            break
        t0 = time.perf_counter()
        step_metrics = []
        for batch in run.batches("train", batch_size, train=True, epoch=epoch):
            state, mets = train_step(state, batch)
            step_metrics.append(mets)
        step_metrics = parallel.to_host(step_metrics)  # one transfer per epoch
        train_means = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
        if _scalar(state["bad_step"]) >= 0:
            terms = [n for i, n in enumerate(metric_names) if (_scalar(state["bad_terms"]) >> i) & 1]
            raise FloatingPointError(
                f"non-finite {', '.join(terms)} at step {_scalar(state['bad_step'])} (epoch {epoch}); the update was "
                f"skipped and training stopped. The inputs were checked for NaN/Inf and label range when loaded, so "
                f"lower optim.learning_rate (or check the method's own hyperparameters).")
        val, _ = evaluate(run, state["params"], state["rest"], "validation")
        value = selection_value(val, select, info.task)
        improved = improves(value, float(val["loss"]), meta)
        if improved:
            best = host_copy({"params": state["params"], "rest": state["rest"]})
            meta.update(best_epoch=epoch, best_value=value, best_loss=float(val["loss"]), bad_epochs=0)
        else:
            meta["bad_epochs"] += 1
        epoch_time = time.perf_counter() - t0
        meta["train_time_s"] += epoch_time
        ctx = EpochContext(epoch=epoch, steps_per_epoch=steps_per_epoch, state=state,
                           features_fn=run.features_fn, fresh_params_fn=run.fresh_params)
        state["method_state"] = method.on_epoch_end(epoch, val, state["method_state"], ctx)
        record = {"epoch": epoch, "step": _scalar(state["step"]), "train": train_means,
                  "val": {"loss": val["loss"], **{f"{h}_{k}": v for h, d in val["heads"].items() for k, v in d.items()},
                          **{f"mipd_{m}": v for m, v in val.get("mipd", {}).items()}},
                  "time_s": epoch_time}
        meta["history"].append(_jsonable(record))
        meta["epoch"] = epoch
        if patience and meta["bad_epochs"] >= patience and epoch >= earliest_stop and epoch < epochs:
            meta["stopped_early"] = True
        _write_history(workdir, meta["history"])
        session_time += epoch_time  # the ETA uses this session's epochs (not the time before a resume)
        eta = session_time / (epoch - start + 1) * (epochs - epoch) if not meta["stopped_early"] else 0
        main_metric = "mae" if info.task == "regression" else "accuracy"
        _log(f"[{config.method.name}] epoch {epoch:3d}/{epochs}  loss {train_means['loss']:.4f}  "
             f"val {main_metric} {val['heads']['fused'][main_metric]:.4f}{' *' if improved else '  '}  "
             f"{epoch_time:5.1f}s  ETA {eta:5.0f}s" + ("  (early stop)" if meta["stopped_early"] else ""))
        ckpt.save(epoch, state, best, meta)
    ckpt.close()

    best = from_saveable(best, {"params": state["params"], "rest": state["rest"]})
    bad = non_finite_leaves(best)
    if bad:
        raise FloatingPointError(f"the selected weights (epoch {meta['best_epoch']}) hold non-finite values in "
                                 f"{bad[:5]}; refusing to publish results from them. Delete {workdir}/checkpoints "
                                 "to retrain.")
    best = parallel.replicate(best, run.mesh)
    val, val_out = evaluate(run, best["params"], best["rest"], "validation")
    test, test_out = evaluate(run, best["params"], best["rest"], "test")
    for name, res in (("validation", val), ("test", test)):
        if not np.isfinite(res["loss"]):
            raise FloatingPointError(f"the selected weights give a non-finite {name} loss; refusing to write "
                                     f"results.json. Delete {workdir}/checkpoints to retrain.")
    _add_sample_type_accuracy(test, test_out["logits"], test_out["labels"], data, info)
    _save_predictions(workdir, {"validation": val_out, "test": test_out})
    results = {"config": _jsonable(_config_dict(config)), "method": config.method.name, "seed": run.seed,
               "dataset": info.name, "modalities": list(info.modalities), "task": info.task,
               "best_epoch": meta["best_epoch"], "epochs_run": meta["epoch"], "selection": f"val_{select}",
               "stopped_early": meta["stopped_early"], "steps": _scalar(state["step"]),
               "train_time_s": meta["train_time_s"], "validation": val, "test": test}
    results = _jsonable(results)
    if parallel.is_primary():
        guards.write_json_atomic(os.path.join(workdir, "results.json"), results)
    fused = test["heads"]["fused"]
    _log(f"[{config.method.name}] done: best epoch {meta['best_epoch']}, test "
         + ", ".join(f"{k} {v:.4f}" for k, v in fused.items()))
    return results


def _add_sample_type_accuracy(res: dict, logits, labels, data, info) -> None:
    """Synthetic data: the fused accuracy per sample type (-1 shared, m unique to modality m)."""
    sample_type = data.split_arrays("test", "sample_type")
    if sample_type is not None and info.task == "classification":
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
    sub = ml_collections.ConfigDict(_config_dict(config))
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
    from mcr_jax.methods.common import check_options
    from mcr_jax.methods.ensemble import DEFAULTS as ENSEMBLE_DEFAULTS

    check_options(config.method, ENSEMBLE_DEFAULTS, "ensemble")
    runs = dict(config.method.get("unimodal_workdirs", None) or {})
    preds = {}
    for m in info.modalities:
        wd = runs.get(m) or os.path.join(workdir, f"unimodal_{m}")
        train_and_evaluate(unimodal_config(config, m), wd)
        preds[m] = np.load(os.path.join(wd, "predictions.npz"))
    mode = config.method.get("mode", "standardized")
    results = {"config": _jsonable(_config_dict(config)), "method": "ensemble", "seed": int(config.seed),
               "dataset": info.name, "modalities": list(info.modalities), "task": info.task, "mode": mode}
    for split in ("validation", "test"):
        labels = preds[info.modalities[0]][f"{split}_labels"]
        uni = {m: preds[m][f"{split}_logits"] for m in info.modalities}
        if info.task == "regression":
            fused = np.mean([uni[m] for m in info.modalities], axis=0)
        else:
            per_batch = int(config.method.get("batch_size", 0) or config.get("eval", {}).get("batch_size", 0)
                            or config.train.batch_size)
            fused = combine_logits([uni[m] for m in info.modalities], mode, batch_size=per_batch)
        res = {"heads": metrics.head_metrics({"fused": fused, **uni}, labels, info.task)}
        if info.task == "classification":
            res["error_groups"] = metrics.error_groups(fused, uni, labels)
        if split == "test":
            _add_sample_type_accuracy(res, fused, labels, data, info)
        results[split] = res
    results = _jsonable(results)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), results)
    return results


def run_seeds(config, workdir: str, seeds) -> dict:
    """Runs ``train_and_evaluate`` per seed in ``<workdir>/seed_<s>`` and aggregates mean ± std."""
    per_seed = []
    seeds = guards.check_seeds(seeds)
    for s in seeds:
        sub = ml_collections.ConfigDict(_config_dict(config))
        sub.seed = int(s)
        per_seed.append(train_and_evaluate(sub, os.path.join(workdir, f"seed_{s}")))
    summary = {"method": config.method.name, "seeds": list(seeds), "test": {}}
    for head, mets in per_seed[0]["test"]["heads"].items():
        summary["test"][head] = {k: metrics.mean_std([r["test"]["heads"][head][k] for r in per_seed]) for k in mets}
    if parallel.is_primary():
        guards.write_json_atomic(os.path.join(workdir, "summary.json"), _jsonable(summary))
    return summary


__all__ = ["Run", "evaluate", "setup", "load_pretrained", "run_seeds", "train_and_evaluate", "train_ensemble"]
