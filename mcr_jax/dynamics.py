"""Training dynamics: per-epoch validation accuracy of the fused and each unimodal head, and the
per-modality MIPD, read from a run's ``metrics.jsonl`` and drawn per run or averaged over runs.

This is the picture used in the modality-competition literature to show one modality winning: the
fused accuracy follows the strong modality's head while the weak one stalls, and the weak
modality's MIPD (how much the fused prediction moves when its latent is permuted) stays near 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from mcr_jax import guards


def read_history(run_dir: str) -> list[dict]:
    """The per-epoch records of a finished or running run (``[]`` when it has none yet); a damaged
    ``metrics.jsonl`` is a ValueError naming the file and the line."""
    return guards.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


def curves(history: Sequence[Mapping], modalities: Sequence[str], *, metric: str = "accuracy") -> dict:
    """``{series: np.ndarray [epochs]}`` of one run: ``fused``, each ``<m>`` head (where the method
    trains unimodal heads) and ``mipd_<m>`` (where it fuses); NaN where an epoch lacks the value."""
    names = ["fused", *modalities]
    out = {}
    for name in names:
        out[name] = np.array([r["val"].get(f"{name}_{metric}", np.nan) for r in history], dtype=np.float64)
    for m in modalities:
        out[f"mipd_{m}"] = np.array([r["val"].get(f"mipd_{m}", np.nan) for r in history], dtype=np.float64)
    return {k: v for k, v in out.items() if v.size and not np.all(np.isnan(v))}


def average_curves(histories: Sequence[Sequence[Mapping]], modalities: Sequence[str], *,
                   metric: str = "accuracy") -> dict:
    """Mean over runs of :func:`curves`, epoch by epoch; a run that stopped early contributes its
    epochs only (``{series: (mean [E], count [E])}``, E the longest run)."""
    per_run = [curves(h, modalities, metric=metric) for h in histories if h]
    keys = [k for k in dict.fromkeys(k for c in per_run for k in c)]
    out = {}
    for k in keys:
        length = max(len(c[k]) for c in per_run if k in c)
        stack = np.full((len(per_run), length), np.nan)
        for i, c in enumerate(per_run):
            if k in c:
                stack[i, : len(c[k])] = c[k]
        count = np.sum(~np.isnan(stack), axis=0)
        with np.errstate(invalid="ignore"):
            mean = np.nansum(stack, axis=0) / np.maximum(count, 1)
        out[k] = (np.where(count > 0, mean, np.nan), count)
    return out


def _draw(ax_acc, ax_mipd, series: Mapping, modalities: Sequence[str], title: str, scale: float) -> None:
    colors = ["#c44e52", "#4c72b0", "#55a868", "#8172b2", "#ccb974", "#64b5cd"]
    if "fused" in series:
        y = series["fused"]
        ax_acc.plot(np.arange(1, len(y) + 1), scale * y, color="black", lw=1.8, label="fused")
    for i, m in enumerate(modalities):
        c = colors[i % len(colors)]
        if m in series:
            y = series[m]
            ax_acc.plot(np.arange(1, len(y) + 1), scale * y, color=c, ls="--", lw=1.2, label=f"{m} head")
        if f"mipd_{m}" in series:
            y = series[f"mipd_{m}"]
            ax_mipd.plot(np.arange(1, len(y) + 1), y, color=c, lw=1.2, label=f"MIPD {m}")
    ax_acc.set_title(title, fontsize=9)
    ax_acc.tick_params(labelsize=7)
    ax_mipd.tick_params(labelsize=7)
    ax_mipd.set_xlabel("epoch", fontsize=8)


def dynamics_chart(runs: Mapping[str, Sequence[Sequence[Mapping]]], path: str, modalities: Sequence[str], *,
                   metric: str = "accuracy", title: str = "", columns: int = 5) -> str:
    """One panel pair per label (validation ``metric`` of every head above, per-modality MIPD below),
    each the epoch-wise mean over that label's runs (one run: that run's curves). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k, hs in runs.items() if any(hs)]
    if not labels:
        raise ValueError("dynamics_chart: none of the runs has a metrics.jsonl history.")
    cols = min(columns, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(2.9 * cols, 3.6 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2] * rows})
    scale = 100.0 if metric == "accuracy" else 1.0
    for i, label in enumerate(labels):
        r, c = divmod(i, cols)
        avg = average_curves(runs[label], modalities, metric=metric)
        n = len([h for h in runs[label] if h])
        _draw(axes[2 * r, c], axes[2 * r + 1, c], {k: v[0] for k, v in avg.items()}, modalities,
              f"{label} (n = {n})" if n > 1 else label, scale)
    for j in range(len(labels), rows * cols):
        r, c = divmod(j, cols)
        axes[2 * r, c].axis("off")
        axes[2 * r + 1, c].axis("off")
    axes[0, 0].set_ylabel(f"val {metric}{' %' if scale == 100 else ''}", fontsize=8)
    axes[1, 0].set_ylabel("val MIPD", fontsize=8)
    handles, names = [], []
    for ax in (axes[0, 0], axes[1, 0]):
        h, n = ax.get_legend_handles_labels()
        handles += h
        names += n
    for label in labels[1:]:  # heads missing from the first panel (e.g. joint training has none)
        k = labels.index(label)
        r, c = divmod(k, cols)
        for ax in (axes[2 * r, c], axes[2 * r + 1, c]):
            for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
                if n not in names:
                    handles.append(h)
                    names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    guards.write_figure(fig, path, dpi=100)
    return path


def run_chart(run_dir: str, modalities: Sequence[str], *, metric: str = "accuracy", title: str = "") -> str | None:
    """``<run_dir>/dynamics.png`` for one run (None when the run has no history)."""
    history = read_history(run_dir)
    if not history:
        return None
    return dynamics_chart({title or os.path.basename(run_dir): [history]}, os.path.join(run_dir, "dynamics.png"),
                          modalities, metric=metric)


__all__ = ["average_curves", "curves", "dynamics_chart", "read_history", "run_chart"]
