"""Evaluation of trained runs: split summaries, the MIPD diagnostic, Shapley values, error groups,
per-sample-type accuracy and the predictions file.

The compiled programs (:mod:`mcr_jax.programs`) evaluate a whole split for K runs at once and
return an :class:`EvalOutput`: flat per-row outputs ``[K, N_padded, ...]`` with one row mask
``[N_padded]`` (the same padded evaluation batches for every run), plus the per-batch scalars
(loss, MIPD) with each batch's number of valid rows. :func:`summarize` turns run ``k``'s part into
the metrics that ``results.json`` and ``metrics.jsonl`` hold; nothing here iterates batches except
the Shapley diagnostic, which scores each subset of modalities with the method's own prediction.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcr_jax import metrics, parallel
from mcr_jax.tasks import get_task

#: ``eval.shapley_absent``: how the Shapley diagnostic replaces an absent modality
SHAPLEY_ABSENT = ("zero_input", "zero", "mean")


@dataclasses.dataclass
class EvalOutput:
    """A split evaluated for K runs (host arrays).

    - ``logits`` ``[K, N, C]``, ``unimodal`` ``{m: [K, N, C_m]}``: every padded row of every batch;
    - ``labels`` / ``mask`` ``[N]``: the rows' labels and masks (0 for padding), shared by the runs;
    - ``loss`` ``[K, nb]``: each batch's mean loss over its valid rows; ``valid`` ``[nb]``: its valid
      row count; ``mipd`` ``[K, nb, M]`` or None: each batch's MIPD diagnostic per modality.
    """

    logits: np.ndarray
    unimodal: dict
    labels: np.ndarray
    mask: np.ndarray
    loss: np.ndarray
    valid: np.ndarray
    mipd: np.ndarray | None = None

    @classmethod
    def from_batches(cls, outs: list[dict], masks: list, labels: list) -> EvalOutput:
        """From per-batch outputs with a leading ``[K]`` axis (``logits``, ``unimodal``, ``loss``,
        ``mipd``) and each batch's ``mask`` / ``label`` ``[B]``."""
        valid = np.asarray([int((np.asarray(m) > 0).sum()) for m in masks])
        cat = lambda xs: np.concatenate([np.asarray(x) for x in xs], axis=1)  # noqa: E731
        return cls(logits=cat([o["logits"] for o in outs]),
                   unimodal={m: cat([o["unimodal"][m] for o in outs]) for m in outs[0]["unimodal"]},
                   labels=np.concatenate([np.asarray(x) for x in labels]),
                   mask=np.concatenate([np.asarray(x) for x in masks]),
                   loss=np.stack([np.asarray(o["loss"]) for o in outs], axis=1), valid=valid,
                   mipd=np.stack([np.asarray(o["mipd"]) for o in outs], axis=1) if "mipd" in outs[0] else None)

    @classmethod
    def from_scanned(cls, out: dict) -> EvalOutput:
        """From a whole-split evaluation of K runs whose entries carry ``[K, nb, ...]`` axes."""
        mask = np.asarray(out["mask"])[0]  # [nb, B], the same for every run
        nb, b = mask.shape
        flat = lambda x: np.asarray(x).reshape(x.shape[0], nb * b, *x.shape[3:])  # noqa: E731
        return cls(logits=flat(out["logits"]), unimodal={m: flat(v) for m, v in out["unimodal"].items()},
                   labels=np.asarray(out["label"])[0].reshape(-1), mask=mask.reshape(-1),
                   loss=np.asarray(out["loss"]), valid=(mask > 0).sum(axis=1),
                   mipd=np.asarray(out["mipd"]) if "mipd" in out else None)


def summarize(method, out: EvalOutput, k: int = 0) -> tuple[dict, dict]:
    """Run ``k``'s metrics of every head on the split (padding removed), plus its raw outputs
    ``{"logits", "labels", "unimodal"}``.

    The loss is the mean over valid rows (each batch's mean weighted by its valid rows); the MIPD
    diagnostic is averaged over the batches with at least 2 valid rows, weighted likewise."""
    valid = out.mask > 0
    outputs = {"logits": out.logits[k][valid], "labels": out.labels[valid],
               "unimodal": {m: v[k][valid] for m, v in out.unimodal.items()}}
    report_uni = method.uses_fusion and method.reports_unimodal_heads
    heads = {"fused": outputs["logits"], **(outputs["unimodal"] if report_uni else {})}
    counts = [int(n) for n in out.valid]
    total = sum(float(loss) * n for loss, n in zip(out.loss[k], counts, strict=True))
    res = {"heads": method.task.head_metrics(heads, outputs["labels"]), "loss": total / max(sum(counts), 1)}
    if method.task.categorical and report_uni:
        res["error_groups"] = metrics.error_groups(outputs["logits"], outputs["unimodal"], outputs["labels"])
    if out.mipd is not None:
        used = [i for i, n in enumerate(counts) if n >= 2]
        if used:
            mean = np.average([out.mipd[k][i] for i in used], axis=0, weights=[counts[i] for i in used])
            res["mipd"] = {m: float(mean[i]) for i, m in enumerate(method.modalities)}
    return res, outputs


def make_subset_predict(method, graphdef_eval):
    """``(params, rest, batch, keep [M], hparams) -> {"logits", "latents"}``: the method's evaluation
    prediction with the inputs of modality ``i`` zeroed where ``keep[i] == 0`` (sequence masks kept),
    for :func:`shapley`."""

    def subset_predict(p, r, batch, keep, hparams):
        model = nnx.merge(graphdef_eval, p, r)
        batch = dict(batch)
        for i, m in enumerate(method.modalities):
            batch[m] = jnp.where(keep[i] > 0, batch[m], jnp.zeros_like(batch[m]))
        out = method.with_hparams(hparams).predict(model, batch)
        return {"logits": out["logits"], "latents": out["latents"]}

    return subset_predict


def shapley(run, params, rest, split, hparams=None) -> dict:
    """The Shapley modality-contribution diagnostic (BalanceMM's ``Calculate_Shapley``) of one run
    on a split: ``{"shapley": {m: φ_m}, "shapley_subsets": {"x1+x2": v, ..., "none": v(∅)}}``, or
    ``{}`` when ``eval.shapley`` is off or the method's prediction is not the fused head.

    ``run`` gives ``method``, ``info``, ``config``, ``eval_batch_size``, ``batches(split, batch_size,
    train=, epoch=)``, ``subset_predict`` (:func:`make_subset_predict`, jitted) and ``fuse_fn``
    (:class:`mcr_jax.programs.Programs` has them).

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
        on_device = getattr(run, "subset_split", None)  # the whole split in one program, when it is on the device
        got = None if on_device is None else on_device(params, rest, split, keep, dict(hparams or {}))
        if got is not None:
            return got
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


def add_sample_type_accuracy(res: dict, logits, labels, data, info) -> None:
    """Synthetic data: the fused accuracy per sample type (-1 shared, m unique to modality m)."""
    sample_type = data.split_arrays("test", "sample_type")
    if sample_type is not None and get_task(info.task).categorical:
        correct = np.argmax(logits, -1) == labels
        res["by_sample_type"] = {int(t): float(correct[sample_type == t].mean()) for t in np.unique(sample_type)}


def save_predictions(workdir: str, outs: dict[str, Any]) -> None:
    """``<workdir>/predictions.npz``: every split's fused logits, labels and unimodal logits (process 0)."""
    if not parallel.is_primary():
        return
    arrays = {}
    for split, out in outs.items():
        arrays[f"{split}_logits"] = out["logits"]
        arrays[f"{split}_labels"] = out["labels"]
        for m, v in out["unimodal"].items():
            arrays[f"{split}_unimodal_{m}"] = v
    np.savez(os.path.join(workdir, "predictions.npz"), **arrays)


__all__ = ["SHAPLEY_ABSENT", "EvalOutput", "add_sample_type_accuracy", "make_subset_predict", "save_predictions",
           "shapley", "summarize"]
