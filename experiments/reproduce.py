"""The reproduction study of docs/reproduction.md: tuned, many-seed tests of the paper's claims.

    python -m experiments.reproduce --study synthetic --workdir runs/repro      # the default point
    python -m experiments.reproduce --study sweep_ratio,sweep_u2 --workdir runs/repro
    python -m experiments.reproduce --study mfeat --workdir runs/repro
    python -m experiments.reproduce --study ablation,game,perturbation,perturbation_ref --workdir runs/repro
    python -m experiments.reproduce --study balanced,sensitivity,diagnosis --workdir runs/repro
    python -m experiments.reproduce --study all --workdir runs/repro               # everything

Every study writes ``<out>/<study>.md`` (its tables, with the protocol and wall time in the header)
and ``<out>/<study>*.png`` (default ``--out docs/reproduction``); its runs go to
``<workdir>/<study or setting>/``. Reruns reuse finished runs, so a study interrupted half-way
resumes; the wall time kept is that of the run that did the work (a rerun that takes less than
half of it, having reused finished runs, keeps the earlier time).

Protocol (the same for every method, see mcr_jax.study): ``--budget`` configurations per method,
chosen on mean validation accuracy over ``--tune_seeds``, reported on test over ``--eval_seeds``;
MCR's variants (ablation, game, perturbations, balanced, sensitivity, diagnosis) start from the
configuration MCR's tuning chose on the default synthetic point (validation only) and change what
their names say, over ``--variant_seeds`` (sensitivity and diagnosis: ``--eval_seeds``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.diagnose import group_accuracy
from experiments.flags import (
    check_comparison,
    check_config,
    define_int_list,
    define_progress_flags,
    help_epilogue,
    int_list,
    name_list,
    run,
)
from mcr_jax import guards, metrics, names, study
from mcr_jax.report import DEFAULT_METHODS, TABLE_STATISTICS, format_table

#: the paper's Fig. 1 axis: unique-to-x1 : shared = 0, 1/3, 1, 3 with unique-to-x2 fixed at 0.2
RATIO_SWEEP = ((0.8, 0.0, 0.2), (0.6, 0.2, 0.2), (0.4, 0.4, 0.2), (0.2, 0.6, 0.2))
#: the weak modality's unique share u2 = 0.1 … 0.5, no unique-to-x1 examples
U2_SWEEP = ((0.9, 0.0, 0.1), (0.8, 0.0, 0.2), (0.7, 0.0, 0.3), (0.5, 0.0, 0.5))
MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
#: declared before any run: the two disjoint halves of the views, and one with the weakest view
MFEAT_TRIPLES = (("fou", "fac", "kar"), ("pix", "zer", "mor"), ("fou", "pix", "mor"))
#: MCR changed one thing at a time (dotted config overrides on the tuned configuration)
ABLATIONS = {
    "mcr (tuned)": {},
    "independent game": {"method.strategy": "independent"},
    "collaborative game": {"method.strategy": "collaborative"},
    "− MIPD (λ_M = 0)": {"method.mipd_weight": 0.0},
    "− contrastive (λ_Con = 0)": {"method.con_weight": 0.0},
    "− unimodal CE (λ_uni = 0)": {"method.uni_weight": 0.0},
    "+ CEB (λ_CEB = 0.1)": {"method.ceb_weight": 0.1, "model.ceb": True},
}
PERTURBATIONS = {
    "permute latent (tuned)": {},
    "noise latent": {"method.perturbation": "noise"},
    "zero latent": {"method.perturbation": "zero"},
    "noise input": {"method.perturbation": "noise", "method.perturb_space": "input"},
    "zero input": {"method.perturbation": "zero", "method.perturb_space": "input"},
}
#: the game at λ_M where the MIPD term moves the model (the tuned λ_M may be too small for that)
GAME = {f"{k}, λ_M = {lam:g}": {"method.strategy": k, "method.mipd_weight": lam}
        for lam in (0.1, 1.0) for k in ("greedy", "independent", "collaborative")}
#: the perturbations again at the reference λ_M = 0.1
PERTURBATIONS_REF = {k.replace(" (tuned)", "") + ", λ_M = 0.1": {**v, "method.mipd_weight": 0.1}
                     for k, v in PERTURBATIONS.items()}
#: λ_M when neither modality is easier (class means of norm 5 in both; x2 still holds the unique examples)
BALANCED = {f"λ_M = {lam:g}, scales (5, 5)": {"data.embedding_scale": (5.0, 5.0), "method.mipd_weight": lam}
            for lam in (0.0, 0.01, 0.1, 1.0)}
SENSITIVITY_MIPD = (0.0, 0.001, 0.01, 0.1, 1.0, 3.0)
SENSITIVITY_S = (1, 4, 16, 32, 64)

@dataclasses.dataclass(frozen=True)
class Options:
    """What every study reads: built once from the command line (:meth:`from_flags`) in :func:`main`."""

    config: ml_collections.ConfigDict  # the synthetic base config
    mfeat_config: ml_collections.ConfigDict
    workdir: str  # where the runs go
    out: str  # where the tables (.md) and figures (.png) go
    methods: tuple[str, ...]  # the methods of the tuned studies
    budget: int  # configurations per method with hyperparameters
    tune_seeds: tuple[int, ...]  # choosing configurations (validation)
    eval_seeds: tuple[int, ...]  # reporting the chosen configuration (test)
    variant_seeds: tuple[int, ...]  # the MCR variant studies
    settings: tuple[int, ...]  # a sweep / mfeat study restricted to these setting indices (empty: all)

    @classmethod
    def from_flags(cls, f) -> Options:
        return cls(config=f.config, mfeat_config=f.mfeat_config, workdir=f.workdir, out=f.out,
                   methods=tuple(m.strip() for m in f.methods.split(",") if m.strip()), budget=int(f.budget),
                   tune_seeds=tuple(int_list(f.tune_seeds)), eval_seeds=tuple(int_list(f.eval_seeds)),
                   variant_seeds=tuple(int_list(f.variant_seeds)), settings=tuple(int_list(f.settings)))


def _tag(proportions) -> str:
    return "p_" + "_".join(f"{p:.2f}" for p in proportions)


def _override(config, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted overrides (``{"method.strategy": "independent"}``)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _timed(path: str, fn):
    """Runs ``fn``; keeps the wall time of the run that did the work in ``path`` (a rerun that
    reuses every finished run keeps the earlier time)."""
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    previous = None
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)["wall_s"]
    if previous is None or wall > 0.5 * previous:
        guards.write_json_atomic(path, {"wall_s": wall})
        return out, wall
    return out, previous


def _study(opts: Options, config, workdir: str, fixed: dict | None = None) -> tuple[dict, float]:
    os.makedirs(workdir, exist_ok=True)
    return _timed(os.path.join(workdir, "wall_time.json"), lambda: study.run_study(
        config, workdir, list(opts.methods), budget=opts.budget, tune_seeds=list(opts.tune_seeds),
        eval_seeds=list(opts.eval_seeds), fixed=fixed))


def _protocol_line(out: dict) -> str:
    p = out["protocol"]
    return (f"Protocol: {p['budget']} configurations per method with hyperparameters (grids in "
            f"`GRID` of each method's module), chosen by {p['selection']} {p['tune_seeds']}; test over "
            f"seeds {p['eval_seeds']}, {TABLE_STATISTICS}.")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _write(opts: Options, name: str, text: str) -> str:
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, f"{name}.md")
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    print(text)
    return path


def _fused(out: dict, label: str) -> list[float]:
    return [r["test"]["heads"]["fused"][out["metric"]] for r in out["runs"][label]]


def _ci(values, scale: float = 100.0) -> str:
    ms = metrics.mean_std(list(values))
    if ms["n"] < 2:
        return f"{scale * ms['mean']:.1f}"
    lo, hi = ms["ci95"]
    return f"{scale * ms['mean']:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]"


def _chosen_lines(out: dict) -> str:
    return "\n".join(f"- {k}: {v or '(no hyperparameters)'}" for k, v in out["chosen"].items()
                     if not k.startswith("unimodal"))


# ---- (a) the default point and the two synthetic sweeps ------------------------------------------
def synthetic_point(opts: Options, proportions) -> tuple[dict, float]:
    c = ml_collections.ConfigDict(opts.config.to_dict())
    c.data.proportions = tuple(float(p) for p in proportions)
    return _study(opts, c, os.path.join(opts.workdir, "synthetic", _tag(proportions)))


def study_synthetic(opts: Options) -> None:
    out, wall = synthetic_point(opts, tuple(opts.config.data.proportions))
    study.paired_chart(out, os.path.join(opts.out, "synthetic_paired.png"))
    study.write_dynamics(out, os.path.join(opts.out, "synthetic_dynamics.png"), per_run=False)
    text = (f"## The default synthetic point, proportions {tuple(opts.config.data.proportions)} "
            f"(wall time {_minutes(wall)})\n\n{_protocol_line(out)}\n\n"
            + format_table(out["summary"], out["modalities"])
            + "\n\nMCR against the best other method by mean validation accuracy: " + _versus_best(out)
            + "\n\nPaired test differences (same seeds), points, mean [95 % t-interval]:\n\n"
            + study.format_paired(out) + "\n\nChosen options (validation):\n\n" + _chosen_lines(out))
    _write(opts, "synthetic", text)


def _selected(opts: Options, points):
    chosen = opts.settings
    return [p for i, p in enumerate(points) if not chosen or i in chosen]


def study_sweep(opts: Options, name: str, points, axis_label: str, axis_values) -> None:
    outs, walls = [], []
    for p in _selected(opts, points):
        out, wall = synthetic_point(opts, p)
        outs.append(out)
        walls.append(wall)
    values = [axis_values(p) for p in _selected(opts, points)]
    labels = list(outs[0]["runs"])
    modalities = outs[0]["modalities"]
    types = sorted({t for o in outs for t in o["summary"][labels[0]].get("by_sample_type", {})}, key=int)
    type_names = {t: ("shared" if int(t) < 0 else f"unique-{modalities[int(t)]}") for t in types}
    lines = [f"## Sweep of {axis_label} (wall time {_minutes(sum(walls))}: "
             + ", ".join(_minutes(w) for w in walls) + ")", "", _protocol_line(outs[0]), "",
             "Fused test accuracy %, mean [95 % t-interval] per point; 'change': the per-seed change from the "
             f"first to the last point ({values[0]} → {values[-1]}); 'MCR's change − this': MCR's change minus "
             "the method's, per seed (> 0: MCR degrades less); means [95 % t-interval]:", "",
             "| method | " + " | ".join(f"{axis_label} = {v}" for v in values) + " | change | MCR's change − this |",
             "|---" * (len(values) + 3) + "|"]

    def change(label):
        return np.subtract(_fused(outs[-1], label), _fused(outs[0], label))

    for label in labels:
        cells = [_ci_abs(_fused(o, label)) for o in outs]
        versus = _ci(change("mcr") - change(label)) if "mcr" in labels and label != "mcr" else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_ci(change(label))} | {versus} |")
    lines += ["", "MCR against the best other method by mean validation accuracy (unimodal runs excluded), "
              "per point, paired test difference:", ""]
    for v, o in zip(values, outs, strict=True):
        lines.append(f"- {axis_label} = {v}: " + _versus_best(o))
    for t in types:
        lines += ["", f"Test accuracy % on the **{type_names[t]}** examples (mean over seeds; – where the point "
                  "has none):", "", "| method | " + " | ".join(f"{v}" for v in values) + " |",
                  "|---" * (len(values) + 1) + "|"]
        for label in labels:
            cells = []
            for o in outs:
                ms = o["summary"][label].get("by_sample_type", {}).get(t)
                cells.append("–" if ms is None or not np.isfinite(ms["mean"]) else f"{100 * ms['mean']:.1f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Paired test differences of every method against joint training, the ensemble and MCR, per point:"]
    for v, o in zip(values, outs, strict=True):
        lines += ["", f"{axis_label} = {v}:", "", study.format_paired(o)]
    lines += ["", "Chosen options per point (validation):"]
    for v, o in zip(values, outs, strict=True):
        lines += ["", f"{axis_label} = {v}:", "", _chosen_lines(o)]
    _write(opts, name, "\n".join(lines))
    _sweep_chart(outs, values, axis_label, type_names, os.path.join(opts.out, f"{name}.png"))


def _versus_best(out: dict) -> str:
    """``best: MCR − best [CI]`` for the non-MCR method with the best mean validation accuracy."""
    if "mcr" not in out["runs"]:
        return "–"
    val = {k: np.mean([r["validation"]["heads"]["fused"][out["metric"]] for r in rs]) for k, rs in out["runs"].items()
           if k != "mcr" and not k.startswith("unimodal")}
    best = max(val, key=val.get)
    return f"{best} (validation {100 * val[best]:.2f} %): MCR − {best} = " + _ci(
        np.subtract(_fused(out, "mcr"), _fused(out, best)))


def _ci_abs(values) -> str:
    ms = metrics.mean_std(list(values))
    if ms["n"] < 2:
        return f"{100 * ms['mean']:.1f}"
    lo, hi = ms["ci95"]
    return f"{100 * ms['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


HIGHLIGHT = {"mcr": ("#c44e52", 2.2), "joint": ("black", 1.8), "ensemble": ("#4c72b0", 1.8)}


def _sweep_chart(outs, values, axis_label, type_names, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in outs[0]["runs"] if not k.startswith("unimodal")]
    panels = [("fused", None)] + [(type_names[t], t) for t in type_names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    x = np.arange(len(values))
    for ax, (title, t) in zip(axes[0], panels, strict=True):
        for label in labels:
            color, lw = HIGHLIGHT.get(label, ("#999999", 0.8))
            if t is None:
                y = [100 * np.mean(_fused(o, label)) for o in outs]
            else:
                y = [100 * o["summary"][label].get("by_sample_type", {}).get(t, {"mean": np.nan})["mean"]
                     for o in outs]
            ax.plot(x, y, color=color, lw=lw, marker="o", ms=3, label=label if label in HIGHLIGHT else None)
        ax.set_xticks(x, [str(v) for v in values])
        ax.set_xlabel(axis_label)
        ax.set_title(f"test accuracy %: {title}", fontsize=9)
    axes[0, 0].legend(fontsize=8, title="grey: other methods", title_fontsize=7)
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=110)
    return path


# ---- (b) UCI mfeat: every pair and three triples ----------------------------------------------
def mfeat_settings(tune_views=()) -> list[tuple[str, ...]]:
    """Every pair of views and the triples; the tuning pair in its own order where it appears."""
    sets = list(itertools.combinations(MFEAT_VIEWS, 2)) + list(MFEAT_TRIPLES)
    return [tuple(tune_views) if set(v) == set(tune_views) else v for v in sets]


def study_mfeat(opts: Options) -> None:
    """Every method tuned once, on the mfeat config's own view pair (validation), then reported with
    those options on every view set (the cut that makes 18 view sets fit this machine's budget)."""
    from mcr_jax.data.mfeat import parse_views

    tune_views = parse_views(opts.mfeat_config.data.views)
    settings = _selected(opts, mfeat_settings(tune_views))

    def config_for(views):
        c = ml_collections.ConfigDict(opts.mfeat_config.to_dict())
        c.data.views = tuple(views)
        return c

    tuned, tune_wall = _study(opts, config_for(tune_views), os.path.join(opts.workdir, "mfeat", "_".join(tune_views)))
    fixed = {k: v for k, v in tuned["chosen"].items() if not k.startswith("unimodal")}
    outs, walls = [], []
    for views in settings:
        if tuple(views) == tune_views:
            out, wall = tuned, tune_wall
        else:
            out, wall = _study(opts, config_for(views), os.path.join(opts.workdir, "mfeat", "_".join(views)), fixed)
        outs.append(out)
        walls.append(wall)
    labels = [k for k in outs[0]["runs"] if not k.startswith("unimodal")]
    others = [k for k in labels if k not in ("joint", "ensemble")]
    lines = [f"## UCI mfeat: {len(settings)} view sets (wall time {_minutes(sum(walls))}, of which tuning on "
             f"{'+'.join(tune_views)} {_minutes(tune_wall)})", "",
             _protocol_line(tuned) + f" The options were chosen once, on the {'+'.join(tune_views)} pair "
             "(validation), and every other view set reports those options (no tuning per view set).", "",
             "Chosen options:", "", _chosen_lines(tuned), "",
             "Test accuracy %: joint training and the ensemble (mean over seeds), their paired difference "
             "(ensemble − joint, mean [95 % t-interval]; > 0 means the jointly trained model loses to the "
             "unimodal ensemble: competition), then each method's paired difference to joint training (mean):", "",
             "| views | joint | ensemble | ens − joint | " + " | ".join(others) + " | MCR − best other by validation |",
             "|---" * (5 + len(others)) + "|"]
    competition = []
    for views, o in zip(settings, outs, strict=True):
        gap = np.subtract(_fused(o, "ensemble"), _fused(o, "joint"))
        ms = metrics.mean_std(list(gap))
        if ms["ci95"][0] > 0:
            competition.append((views, o))
        cells = [f"{100 * np.mean(np.subtract(_fused(o, k), _fused(o, 'joint'))):+.1f}" for k in others]
        lines.append(f"| {'+'.join(views)} | {100 * np.mean(_fused(o, 'joint')):.1f} | "
                     f"{100 * np.mean(_fused(o, 'ensemble')):.1f} | {_ci(gap)} | " + " | ".join(cells)
                     + f" | {_versus_best(o)} |")
    lines += ["", f"Where competition exists (the ensemble beats joint training, interval above 0): "
              f"{len(competition)} of {len(settings)} view sets"
              + (": " + ", ".join("+".join(v) for v, _ in competition) if competition else "") + "."]
    lines += _wins_table(outs, labels, "view sets")
    if competition:
        lines += _wins_table([o for _, o in competition], labels, "view sets with competition")
    _write(opts, "mfeat", "\n".join(lines))
    _mfeat_chart(settings, outs, others, os.path.join(opts.out, "mfeat.png"))
    study.write_dynamics(tuned, os.path.join(opts.out, "mfeat_dynamics.png"), per_run=False)


def _wins_table(outs, labels, where: str) -> list[str]:
    """Per method, over the view sets: mean paired difference to joint and to the ensemble, and on
    how many the per-seed interval lies above / below 0."""
    lines = ["", f"Summary over {len(outs)} {where} (paired per-seed differences, points; "
             "'above' / 'below': view sets whose 95 % interval lies entirely above / below 0):", "",
             "| method | − joint: mean | above / below | − ensemble: mean | above / below |", "|---|---|---|---|---|"]
    for label in labels:
        row = [label]
        for ref in ("joint", "ensemble"):
            if label == ref:
                row += ["–", "–"]
                continue
            diffs = [metrics.mean_std(list(np.subtract(_fused(o, label), _fused(o, ref)))) for o in outs]
            above = sum(d["ci95"][0] > 0 for d in diffs)
            below = sum(d["ci95"][1] < 0 for d in diffs)
            row += [f"{100 * np.mean([d['mean'] for d in diffs]):+.2f}", f"{above} / {below}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _mfeat_chart(settings, outs, labels, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[100 * np.mean(np.subtract(_fused(o, k), _fused(o, "joint"))) for k in labels] for o in outs])
    lim = max(1e-6, np.nanmax(np.abs(grid)))
    fig, ax = plt.subplots(figsize=(0.7 * len(labels) + 3, 0.35 * len(settings) + 1.8))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(settings)), ["+".join(v) for v in settings], fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="test accuracy − joint (points, mean over seeds)")
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=110)
    return path


# ---- (c, d, sensitivity) MCR's variants from its tuned configuration --------------------------
_TUNED: dict = {}


def tuned_mcr_config(opts: Options) -> tuple[ml_collections.ConfigDict, dict]:
    """MCR at the options its tuning chose (validation) on the default synthetic point."""
    from mcr_jax.report import comparison_config
    from mcr_jax.seeds import with_options

    if "mcr" not in _TUNED:
        out, _ = synthetic_point(opts, tuple(opts.config.data.proportions))
        _TUNED["mcr"] = out["chosen"]["mcr"]
    chosen = _TUNED["mcr"]
    return with_options(comparison_config(opts.config, "mcr", {}), chosen), chosen


def run_variants(opts: Options, name: str, variants: dict, reference: str):
    from mcr_jax.seeds import train_seeds

    base, chosen = tuned_mcr_config(opts)
    seeds = list(opts.variant_seeds)
    root = os.path.join(opts.workdir, name)

    def run():
        return {label: train_seeds(_override(base, ov), os.path.join(root, f"variant_{i}"), seeds)["per_seed"]
                for i, (label, ov) in enumerate(variants.items())}

    os.makedirs(root, exist_ok=True)
    runs, wall = _timed(os.path.join(root, "wall_time.json"), run)
    return runs, wall, chosen, seeds


def _variant_table(runs: dict, reference: str, modalities) -> str:
    ref = [r["test"]["heads"]["fused"]["accuracy"] for r in runs[reference]]
    types = sorted(runs[reference][0]["test"].get("by_sample_type", {}), key=int)
    names = {t: ("shared" if int(t) < 0 else f"unique-{modalities[int(t)]}") for t in types}
    head = (f"| variant | fused acc % | − {reference} (points) | " + " | ".join(f"{names[t]} acc %" for t in types)
            + " | " + " | ".join(f"MIPD {m} ×100" for m in modalities) + " |")
    lines = [head, "|---" * (3 + len(types) + len(modalities)) + "|"]
    for label, rs in runs.items():
        acc = [r["test"]["heads"]["fused"]["accuracy"] for r in rs]
        diff = "–" if label == reference else _ci(np.subtract(acc, ref))
        by_type = [f"{100 * np.mean([r['test']['by_sample_type'][t] for r in rs]):.1f}" for t in types]
        mipd = [f"{100 * np.mean([r['test'].get('mipd', {}).get(m, np.nan) for r in rs]):.2f}" for m in modalities]
        lines.append(f"| {label} | {_ci_abs(acc)} | {diff} | " + " | ".join(by_type + mipd) + " |")
    return "\n".join(lines)


def _variant_chart(runs: dict, reference: str, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = [r["test"]["heads"]["fused"]["accuracy"] for r in runs[reference]]
    items = [(k, metrics.mean_std(list(np.subtract([r["test"]["heads"]["fused"]["accuracy"] for r in v], ref))))
             for k, v in runs.items() if k != reference]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(items) + 1.5))
    means = [100 * d["mean"] for _, d in items]
    errs = [100 * (d["ci95"][1] - d["ci95"][0]) / 2 for _, d in items]
    ax.barh(np.arange(len(items)), means, xerr=errs, capsize=3, color="#4c72b0")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(np.arange(len(items)), [k for k, _ in items])
    ax.set_xlabel(f"test accuracy − {reference} (points), 95 % t-interval")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=110)
    return path


def study_variants(opts: Options, name: str, variants: dict, title: str, extra=None) -> None:
    reference = next(iter(variants))
    runs, wall, chosen, seeds = run_variants(opts, name, variants, reference)
    modalities = runs[reference][0]["modalities"]
    text = (f"## {title} (wall time {_minutes(wall)})\n\nEvery variant changes MCR's tuned configuration "
            f"{chosen} (chosen on validation on the default synthetic point) as its name says; test over seeds "
            f"{seeds}; differences to the first row are paired per seed, mean [95 % t-interval].\n\n"
            + _variant_table(runs, reference, modalities))
    if extra is not None:
        text += "\n\n" + extra(opts, runs)
    _write(opts, name, text)
    _variant_chart(runs, reference, os.path.join(opts.out, f"{name}.png"), title)


def _perturbation_cost(opts: Options, runs) -> str:
    """Step time of every perturbation, timed side by side on the synthetic model."""
    from experiments.step_cost import build_step, model_and_batch, time_side_by_side

    base, _ = tuned_mcr_config(opts)
    info, model, batch = model_and_batch("mlp", int(base.train.batch_size))
    steps = {}
    for label, ov in PERTURBATIONS.items():
        variant = {k.split(".", 1)[1]: v for k, v in ov.items()}
        variant.update({k: base.method[k] for k in ("mipd_weight", "uni_weight", "con_weight")})
        steps[label] = build_step(variant, info, model, batch, int(base.method.num_permutations))
    steps["multiloss"] = build_step({"name": "multiloss", "uni_weight": 1.0}, info, model, batch, 1)
    times = time_side_by_side(steps, batch, rounds=7, iters=20)
    ref = times[next(iter(PERTURBATIONS))]
    lines = [f"Cost: one training step of the synthetic model (batch {batch['label'].shape[0]}, "
             f"S = {int(base.method.num_permutations)}), compiled, medians of 7 interleaved rounds of 20 steps "
             "in one process (experiments/step_cost.py):", "",
             "| variant | step ms | × permute latent |", "|---|---|---|"]
    for label, t in times.items():
        lines.append(f"| {label} | {1e3 * t:.2f} | {t / ref:.2f} |")
    return "\n".join(lines)


def study_sensitivity(opts: Options) -> None:
    from mcr_jax.seeds import train_grid

    base, chosen = tuned_mcr_config(opts)
    seeds = list(opts.eval_seeds)
    root = os.path.join(opts.workdir, "sensitivity")
    os.makedirs(root, exist_ok=True)

    def run():
        lam = train_grid(base, os.path.join(root, "mipd_weight"), seeds, [{"mipd_weight": v} for v in SENSITIVITY_MIPD])
        s = [train_grid(_override(base, {"method.num_permutations": v}), os.path.join(root, f"S_{v}"), seeds, [{}])[0]
             for v in SENSITIVITY_S]
        return {"mipd_weight": [g["per_seed"] for g in lam], "S": [g["per_seed"] for g in s]}

    runs, wall = _timed(os.path.join(root, "wall_time.json"), run)
    lines = [f"## Sensitivity of MCR to λ_M and S (wall time {_minutes(wall)})", "",
             f"From MCR's tuned configuration {chosen}, one value changed; seeds {seeds}; validation and test "
             "accuracy %, mean [95 % t-interval]; MIPD per modality on test (×100). Test numbers here were not "
             "used to choose anything.", ""]
    modalities = runs["S"][0][0]["modalities"]
    for key, values in (("mipd_weight", SENSITIVITY_MIPD), ("S", SENSITIVITY_S)):
        lines += ["", f"| {'λ_M' if key == 'mipd_weight' else 'S'} | val acc % | test acc % | unique-x2 test acc % | "
                  + " | ".join(f"MIPD {m}" for m in modalities) + " |", "|---" * (4 + len(modalities)) + "|"]
        for v, rs in zip(values, runs[key], strict=True):
            val = [r["validation"]["heads"]["fused"]["accuracy"] for r in rs]
            test = [r["test"]["heads"]["fused"]["accuracy"] for r in rs]
            u2 = [group_accuracy(r, 1) for r in rs]
            mipd = [f"{100 * np.mean([r['test']['mipd'][m] for r in rs]):.2f}" for m in modalities]
            lines.append(f"| {v} | {_ci_abs(val)} | {_ci_abs(test)} | {100 * np.mean(u2):.1f} | "
                         + " | ".join(mipd) + " |")
    _write(opts, "sensitivity", "\n".join(lines))
    _sensitivity_chart(runs, os.path.join(opts.out, "sensitivity.png"))


def _sensitivity_chart(runs, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (key, values, name) in zip(axes, (("mipd_weight", SENSITIVITY_MIPD, "λ_M"), ("S", SENSITIVITY_S, "S")),
                                       strict=True):
        x = np.arange(len(values))
        for split, color in (("validation", "#4c72b0"), ("test", "#c44e52")):
            ms = [metrics.mean_std([r[split]["heads"]["fused"]["accuracy"] for r in rs]) for rs in runs[key]]
            mean = np.array([100 * m["mean"] for m in ms])
            half = np.array([100 * (m["ci95"][1] - m["ci95"][0]) / 2 for m in ms])
            ax.errorbar(x, mean, yerr=half, color=color, marker="o", capsize=3, label=split)
        ax.set_xticks(x, [str(v) for v in values])
        ax.set_xlabel(name)
        ax.set_ylabel("fused accuracy % (95 % t-interval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=110)
    return path


def _diagnosis(opts: Options) -> None:
    from experiments.diagnose import study_diagnosis

    study_diagnosis(opts, functools.partial(tuned_mcr_config, opts), functools.partial(_write, opts),
                    list(dict.fromkeys(RATIO_SWEEP + U2_SWEEP)))


#: every study, by name (``--study`` picks some; ``all`` runs them in this order)
STUDIES: dict[str, Callable[[Options], None]] = {
    "synthetic": study_synthetic,
    "sweep_ratio": lambda opts: study_sweep(opts, "sweep_ratio", RATIO_SWEEP, "u1 : shared",
                                            lambda p: round(p[1] / p[0], 2)),
    "sweep_u2": lambda opts: study_sweep(opts, "sweep_u2", U2_SWEEP, "u2", lambda p: p[2]),
    "mfeat": study_mfeat,
    "ablation": lambda opts: study_variants(opts, "ablation", ABLATIONS, "Game strategy and loss-term ablation"),
    "game": lambda opts: study_variants(opts, "game", GAME, "The game strategies at λ_M = 0.1 and 1"),
    "perturbation": lambda opts: study_variants(opts, "perturbation", PERTURBATIONS, "Perturbation ablation",
                                             extra=_perturbation_cost),
    "perturbation_ref": lambda opts: study_variants(opts, "perturbation_ref", PERTURBATIONS_REF,
                                                 "Perturbation ablation at λ_M = 0.1"),
    "balanced": lambda opts: study_variants(opts, "balanced", BALANCED, "λ_M when the two modalities are equally easy"),
    "sensitivity": study_sensitivity,
    "diagnosis": _diagnosis,
}

#: the MCR variants each variant study trains (dotted overrides of MCR's tuned configuration)
VARIANTS = {"ablation": ABLATIONS, "game": GAME, "perturbation": PERTURBATIONS, "perturbation_ref": PERTURBATIONS_REF,
            "balanced": BALANCED}

__doc__ += help_epilogue(comparison=True) + f"Studies (--study): {', '.join(STUDIES)}, or all.\n"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/configs/synthetic.py",
                                "Synthetic base config (experiments/configs/synthetic.py[:smoke]); override any of "
                                "its keys with --config.<section>.<option>=…", lock_config=False)
config_flags.DEFINE_config_file("mfeat_config", "experiments/configs/mfeat.py", "mfeat base config (the mfeat study).",
                                lock_config=False)
flags.DEFINE_string("study", "synthetic", f"Comma-separated studies: {', '.join(STUDIES)}, or all.")
flags.DEFINE_string("workdir", "runs/repro", "Where the runs go.")
flags.DEFINE_string("out", "docs/reproduction", "Where the tables (.md) and figures (.png) go.")
flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "Methods of the tuned studies (listed below --help's text).")
define_progress_flags()
flags.DEFINE_integer("budget", 4, "Configurations per method (the same for every method with hyperparameters).")
define_int_list("tune_seeds", "0,1,2", "Seeds for choosing configurations (validation).")
define_int_list("eval_seeds", "0,1,2,3,4", "Seeds the chosen configuration is reported on (test).")
define_int_list("variant_seeds", "0,1,2,3,4,5,6,7,8,9", "Seeds of the MCR variant studies.")
define_int_list("settings", "", "Restrict a sweep / mfeat study to these setting indices (e.g. 0,1).")


def study_names(text: str) -> list[str]:
    """The studies ``--study`` names (``all``: every one, in :data:`STUDIES`' order); an unknown one
    is :class:`mcr_jax.names.UnknownName`."""
    if text.strip() == "all":
        return list(STUDIES)
    chosen = name_list(text)
    if not chosen:
        raise ValueError(f"no study given; --study takes {', '.join(STUDIES)} or all.")
    for name in chosen:
        names.check("study", name, list(STUDIES), "studies (or all)")
    return chosen


def check():
    """The study names, the methods, both base configs and every MCR variant the chosen studies
    train, the budget and the seeds, before any data is loaded or anything compiles (a mistake: one
    line, exit status 2)."""
    from mcr_jax.report import comparison_config

    chosen = study_names(FLAGS.study)
    check_comparison(FLAGS.config, name_list(FLAGS.methods))
    if "mfeat" in chosen:
        check_comparison(FLAGS.mfeat_config, name_list(FLAGS.methods))
    mcr = comparison_config(FLAGS.config, "mcr", {})
    for name in chosen:
        for overrides in VARIANTS.get(name, {}).values():
            check_config(_override(mcr, overrides))
    if FLAGS.budget < 1:
        raise ValueError(f"--budget must be >= 1 (configurations per method); got {FLAGS.budget}.")
    for flag in ("tune_seeds", "eval_seeds", "variant_seeds"):
        guards.check_seeds(int_list(FLAGS[flag].value))


def main(argv):
    del argv
    from absl import logging

    from experiments.flags import configure_progress, enable_compilation_cache

    logging.set_verbosity(logging.WARNING)
    configure_progress()
    enable_compilation_cache()
    chosen = study_names(FLAGS.study)
    options = Options.from_flags(FLAGS)
    os.makedirs(options.out, exist_ok=True)
    for name in chosen:
        STUDIES[name](options)


if __name__ == "__main__":
    run(main, check)
