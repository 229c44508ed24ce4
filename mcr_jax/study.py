"""Tuned comparisons: methods × hyperparameter grids × seeds, with an equal budget per method.

Protocol (what :func:`run_study` does, and what its table says it did):

1. **Equal budget.** Each method's grid is declared next to its defaults (``GRID`` in its module,
   :func:`mcr_jax.methods.method_grid`). A study tries ``budget`` configurations of every method
   that has hyperparameters: the whole grid when it has at most ``budget`` points, else
   ``budget`` points drawn without replacement (seeded by ``grid_seed``) from its product. Methods
   without hyperparameters (unimodal, joint, ensemble, uni-pre) have one configuration.
2. **Selection on validation only.** Every configuration is trained on the ``tune_seeds``; the one
   with the best mean validation metric (the trainer's selection metric) is chosen. Test numbers
   are never looked at to choose.
3. **Report on test over ``eval_seeds``** (at least 5 by default) with the chosen configuration;
   runs shared with tuning (same configuration and seed) are reused, not retrained.
4. **Paired differences.** For every method, the per-seed difference of its test metric against
   joint training, the ensemble and MCR (those of them in the study; same seed, so seed-level
   variation cancels), with the mean and the 95 % Student-t interval.

The tuning runs of a method — every grid point × every tune seed — train as **one** vectorised
program when the grid's options are the method's traceable continuous hyperparameters (λ's,
coefficients, the learning rate: traced inputs, :func:`mcr_jax.seeds.train_grid`); otherwise each
point is its own program, vectorised over the seeds. :func:`run_comparison` is the untuned special
case (every method at its defaults, a grid of one); the tables, charts and comparison labels are in
:mod:`mcr_jax.report`.
"""

from __future__ import annotations

import itertools
import os

import ml_collections
import numpy as np

from mcr_jax import dynamics, guards, metrics
from mcr_jax import progress as progress_lines
from mcr_jax.engine import selection_metric
from mcr_jax.methods import method_grid
from mcr_jax.report import (
    DEFAULT_METHODS,
    METHOD_DEFAULTS,
    comparison_config,
    needs_unimodal_runs,
    per_modality,
    summarize,
    with_overrides,
)
from mcr_jax.tasks import get_task
from mcr_jax.train import train_and_evaluate, unimodal_config

#: the references of the paired differences: every method is compared with each that was run
BASELINES = ("joint", "ensemble", "mcr")


def run_comparison(config, workdir: str, methods=DEFAULT_METHODS, seeds=(0, 1, 2), *,
                   overrides: dict | None = None, from_unimodal=(), progress=None, compile_ahead: bool = True) -> dict:
    """Runs every method for every seed; returns ``{"runs": {label: [results per seed]}, "summary": ...}``.

    A method's seeds train as one vectorised program where they can (:func:`mcr_jax.seeds.train_seeds`;
    its stacked checkpoints go to ``<workdir>/vectorized/<method>``); each seed's results land in
    ``<workdir>/seed_<s>/<method>`` either way. The ensemble and uni-pre build on each seed's
    unimodal runs and run seed by seed.

    ``overrides``: ``{label: {section: {option: value}}}`` set on that label's config (a row's own
    hyperparameters, learning rate, batch size; :func:`mcr_jax.report.with_overrides`; the
    ``unimodal`` label's also reach the unimodal runs). ``from_unimodal``: labels whose runs start
    from their seed's unimodal runs' selected encoders (``init.pretrained``), run seed by seed.
    ``progress``: called with ``(label, seeds_done)`` after each label (an ETA across a table).
    ``compile_ahead``: while a method trains, the next vectorised method's programs are built and
    compiled on a background thread (:class:`mcr_jax.seeds.Prepared`; the results are the same
    either way)."""
    from mcr_jax.data import load
    from mcr_jax.seeds import Prepared, train_seeds

    seeds = guards.check_seeds(seeds)
    modalities = load(config.data).info.modalities
    runs: dict[str, list[dict]] = {}

    def seed_dir(s):
        return os.path.join(workdir, f"seed_{s}")

    def vectorized_dir(name):
        return os.path.join(workdir, "vectorized", name)

    def seed_dirs(name):
        return {s: os.path.join(seed_dir(s), name) for s in seeds}

    # The work in order: ("seeds", label, dir name, config) trains every seed as one program;
    # ("run", name, seed, config) one seed's run from that seed's unimodal runs (ensemble, uni-pre,
    # ``from_unimodal``); ("done", name) reports progress.
    overrides = dict(overrides or {})
    units: list[tuple] = []
    for name in methods:
        own = overrides.get(name)
        if per_modality(name):
            units += [("seeds", f"unimodal {m}", f"unimodal_{m}", with_overrides(unimodal_config(config, m), own))
                      for m in modalities]
        elif needs_unimodal_runs(name) or name in from_unimodal:
            for s in seeds:
                base = ml_collections.ConfigDict(config.to_dict())
                base.seed = int(s)
                unimodal_dirs = {m: os.path.join(seed_dir(s), f"unimodal_{m}") for m in modalities}
                cfg = comparison_config(base, name, unimodal_dirs, own)
                if name in from_unimodal:
                    cfg.init.pretrained = dict(unimodal_dirs)
                units.append(("run", name, s, cfg))
        else:
            units.append(("seeds", name, name, comparison_config(config, name, {}, own)))
        units.append(("done", name))
    work = [u for u in units if u[0] != "done"]
    following = {id(a): b for a, b in zip(work, work[1:], strict=False)}

    def prepare(unit, current):
        """The unit's programs, built on a background thread. A per-seed run may read other runs
        (uni-pre's encoders, UMT's teachers): it is prepared only while a run of the same method
        trains, when the runs it reads are finished."""
        if unit[0] == "seeds":
            return Prepared.seeds(unit[3], vectorized_dir(unit[2]), seeds, seed_dirs=seed_dirs(unit[2]))
        if current[0] == "run" and current[1] == unit[1]:
            return Prepared.run(unit[3], os.path.join(seed_dir(unit[2]), unit[1]))
        return None

    ahead = None  # (unit, Prepared): the next unit's programs, compiled on a background thread meanwhile
    progress_lines.job(len(work))
    try:
        for unit in units:
            if unit[0] == "done":
                if progress is not None:
                    progress(unit[1], len(seeds))
                continue
            prepared = ahead[1] if ahead is not None and ahead[0] is unit else None
            nxt, ahead = following.get(id(unit)), None
            if compile_ahead and nxt is not None:
                made = prepare(nxt, unit)
                ahead = (nxt, made) if made is not None else None
            if unit[0] == "seeds":
                _, label, name, cfg = unit
                runs_label = f"{label} × {len(seeds)} runs" if len(seeds) > 1 else f"{label} seed {seeds[0]}"
                with progress_lines.unit(runs_label, {cfg.method.name: label}):
                    out = train_seeds(cfg, vectorized_dir(name), seeds, seed_dirs=seed_dirs(name), prepared=prepared)
                runs[label] = out["per_seed"]
            else:
                _, name, s, cfg = unit
                with progress_lines.unit(f"{name} seed {s}", {cfg.method.name: name}):
                    res = train_and_evaluate(cfg, os.path.join(seed_dir(s), name), prepared=prepared)
                runs.setdefault(name, []).append(res)
    finally:
        progress_lines.job(0)
    summary = summarize(runs)
    out = {"dataset": config.data.name, "modalities": list(modalities), "seeds": list(seeds), "summary": summary,
           "runs": runs}
    os.makedirs(workdir, exist_ok=True)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), out)
    return out


def best_configuration(scored: list[dict], name: str = "") -> int:
    """The index of the configuration with the largest mean validation value (``val_mean``); a NaN
    mean (a tune seed whose selection metric was undefined) never wins, and all-NaN is an error."""
    finite = [i for i, s in enumerate(scored) if np.isfinite(s["val_mean"])]
    if not finite:
        raise ValueError(f"study: every configuration of {name!r} has an undefined (NaN) mean validation value; "
                         "nothing can be chosen. Check the selection metric (train.select) for this task.")
    return max(finite, key=lambda i: scored[i]["val_mean"])


def study_grid(label: str) -> dict:
    """The tuning grid of a study's method label (``uni_pre_frozen`` is ``uni_pre`` with options)."""
    return method_grid(METHOD_DEFAULTS.get(label, {}).get("name", label))


def grid_points(name: str, budget: int, grid_seed: int = 0, grid: dict | None = None) -> list[dict]:
    """The configurations a study tries for method ``name``: at most ``budget`` option dicts."""
    grid = study_grid(name) if grid is None else grid
    if not grid:
        return [{}]
    keys = sorted(grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    if len(points) <= budget:
        return points
    rng = np.random.default_rng(grid_seed)
    chosen = sorted(rng.choice(len(points), size=budget, replace=False).tolist())
    return [points[i] for i in chosen]


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean and 95 % t-interval of the per-seed differences ``a - b`` (same seeds, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need the same seeds: {len(a)} vs {len(b)} values.")
    return metrics.mean_std([x - y for x, y in zip(a, b, strict=True)])


def _train_config(config, name: str, options: dict, seeds, root: str, modalities) -> list[dict]:
    """Every seed of one configuration of one method, in ``<root>/seed_<s>`` (vectorised where possible)."""
    from mcr_jax.seeds import train_seeds, with_options

    if per_modality(name):
        raise ValueError("unimodal runs are made per modality by the study itself.")
    if needs_unimodal_runs(name):
        out = []
        for s in seeds:
            base = ml_collections.ConfigDict(config.to_dict())
            base.seed = int(s)
            uni = {m: os.path.join(os.path.dirname(os.path.dirname(root)), f"unimodal_{m}", "config_0", f"seed_{s}")
                   for m in modalities}
            for m in modalities:  # the ensemble and uni-pre need this seed's unimodal runs
                train_and_evaluate(unimodal_config(base, m), uni[m])
            cfg = with_options(comparison_config(base, name, uni), options)
            out.append(train_and_evaluate(cfg, os.path.join(root, f"seed_{s}")))
        return out
    return train_seeds(with_options(comparison_config(config, name, {}), options), root, seeds)["per_seed"]


def run_study(config, workdir: str, methods, *, budget: int = 4, tune_seeds=(0, 1, 2),
              eval_seeds=(0, 1, 2, 3, 4), grid_seed: int = 0, min_eval_seeds: int = 5,
              charts: bool = True, fixed: dict | None = None) -> dict:
    """Runs the study of the module docstring; returns (and writes to ``<workdir>/results.json``)
    ``{"protocol", "tuning", "chosen", "summary", "paired", "runs", "run_dirs"}``; with ``charts``
    also the training-dynamics charts (:func:`write_dynamics`).

    ``fixed`` (``{method: options}``) skips the tuning of those methods and reports the given
    options (e.g. chosen by an earlier study's validation on another split of the same data);
    ``protocol["fixed"]`` records them."""
    from mcr_jax.data import load

    tune_seeds, eval_seeds = guards.check_seeds(tune_seeds), guards.check_seeds(eval_seeds)
    if len(eval_seeds) < min_eval_seeds:
        raise ValueError(f"a study reports on test over at least {min_eval_seeds} seeds; got {eval_seeds}.")
    if int(budget) < 1:
        raise ValueError(f"budget must be >= 1 configuration per method; got {budget}.")
    info = load(config.data).info
    select = selection_metric(config, info.task)
    key = get_task(info.task).headline
    labels = []
    for name in methods:
        labels += [f"unimodal {m}" for m in info.modalities] if per_modality(name) else [name]
    tuning, chosen, runs, chosen_root = {}, {}, {}, {}
    for name in methods:
        if per_modality(name):
            for m in info.modalities:
                root = os.path.join(workdir, f"unimodal_{m}", "config_0")
                from mcr_jax.seeds import train_seeds

                runs[f"unimodal {m}"] = train_seeds(unimodal_config(config, m), root, eval_seeds)["per_seed"]
                chosen[f"unimodal {m}"] = {}
            continue
        points = [dict(fixed[name])] if fixed and name in fixed else grid_points(name, int(budget), grid_seed)
        if len(points) > 1 and not needs_unimodal_runs(name):  # the grid × tune seeds: one program
            from mcr_jax.seeds import train_grid

            grid = train_grid(comparison_config(config, name, {}), os.path.join(workdir, name), tune_seeds, points)
            per_point = [g["per_seed"] for g in grid]
        else:
            per_point = [_train_config(config, name, options, tune_seeds if len(points) > 1 else eval_seeds,
                                       _config_root(workdir, name, i, fixed), info.modalities)
                         for i, options in enumerate(points)]
        scored = []
        for i, (options, results) in enumerate(zip(points, per_point, strict=True)):
            vals = [_val_value(r, select, info.task) for r in results]
            scored.append({"options": options, "root": _config_root(workdir, name, i, fixed),
                           "val_mean": float(np.mean(vals)), "val_per_seed": vals})
        best = best_configuration(scored, name)
        tuning[name] = scored
        chosen[name] = scored[best]["options"]
        chosen_root[name] = scored[best]["root"]
        runs[name] = _train_config(config, name, scored[best]["options"], eval_seeds, scored[best]["root"],
                                   info.modalities)
    run_dirs = {f"unimodal {m}": os.path.join(workdir, f"unimodal_{m}", "config_0") for m in info.modalities}
    run_dirs.update({name: chosen_root[name] for name in chosen_root})
    run_dirs = {label: [os.path.join(run_dirs[label], f"seed_{s}") for s in eval_seeds] for label in labels}
    summary = summarize({label: runs[label] for label in labels})
    test = {label: [r["test"]["heads"]["fused"][key] for r in runs[label]] for label in labels}
    paired = {ref: {label: paired_difference(test[label], test[ref]) for label in labels if label != ref}
              for ref in BASELINES if ref in test}
    out = {"dataset": info.name, "modalities": list(info.modalities), "metric": key,
           "protocol": {"budget": int(budget), "tune_seeds": list(tune_seeds), "eval_seeds": list(eval_seeds),
                        "grid_seed": int(grid_seed), "selection": f"mean validation {select} over the tune seeds",
                        "grids": {name: study_grid(name) for name in methods if not per_modality(name)},
                        "fixed": {k: v for k, v in (fixed or {}).items() if k in methods}},
           "tuning": tuning, "chosen": chosen, "summary": summary, "paired": paired, "runs": runs,
           "run_dirs": run_dirs}
    os.makedirs(workdir, exist_ok=True)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), out)
    if charts:
        write_dynamics(out, os.path.join(workdir, "dynamics.png"))
    return out


def write_dynamics(out: dict, path: str, *, per_run: bool = True, labels=None) -> str | None:
    """The training-dynamics charts of a study (:mod:`mcr_jax.dynamics`): ``dynamics.png`` in every
    reported run's folder (``per_run``) and, at ``path``, one panel per method averaged over its
    seeds (``labels``: which methods; default all but the unimodal runs, whose curves the methods'
    own unimodal heads show). Returns the path, or None when no run has a history."""
    metric = out["metric"]
    labels = labels or [k for k in out["run_dirs"] if not k.startswith("unimodal ")]
    if per_run:
        for label in out["run_dirs"]:
            for d in out["run_dirs"][label]:
                dynamics.run_chart(d, out["modalities"], metric=metric, title=f"{label}, {os.path.basename(d)}")
    histories = {label: [dynamics.read_history(d) for d in out["run_dirs"][label]] for label in labels}
    if not any(h for hs in histories.values() for h in hs):  # e.g. only the ensemble: nothing trained here
        return None
    return dynamics.dynamics_chart(histories, path, out["modalities"], metric=metric,
                                   title=f"{out['dataset']}: validation {metric} per head (top), MIPD per modality "
                                         f"(bottom), mean over seeds {out['protocol']['eval_seeds']}")


def _config_root(workdir: str, name: str, i: int, fixed: dict | None) -> str:
    """Where configuration ``i`` of a method runs (``fixed`` options: their own folder, so a study
    with fixed options never meets a tuned study's runs in the same workdir)."""
    return os.path.join(workdir, name, "fixed" if fixed and name in fixed else f"config_{i}")


def _val_value(results: dict, select: str, task: str) -> float:
    from mcr_jax.engine import selection_value

    return selection_value(results["validation"], select, task)


def format_paired(out: dict) -> str:
    """A Markdown table of the paired test differences (percentage points for accuracies)."""
    scale = 1.0 if out["metric"] == "mae" else 100.0
    refs = list(out["paired"])
    lines = ["| method | " + " | ".join(f"− {r}: mean [95 % CI]" for r in refs) + " |",
             "|---" * (1 + len(refs)) + "|"]
    labels = sorted({label for d in out["paired"].values() for label in d} | set(refs), key=list(out["runs"]).index)
    for label in labels:
        cells = []
        for r in refs:
            d = out["paired"][r].get(label)
            if d is None or d["n"] < 2:
                cells.append("–")
            else:
                lo, hi = d["ci95"]
                cells.append(f"{scale * d['mean']:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_chart(out: dict, path: str) -> str:
    """The paired differences against each baseline with their 95 % intervals; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 if out["metric"] == "mae" else 100.0
    refs = list(out["paired"])
    fig, axes = plt.subplots(1, len(refs), figsize=(5.5 * len(refs), 3.8), squeeze=False)
    for ax, ref in zip(axes[0], refs, strict=True):
        items = [(k, v) for k, v in out["paired"][ref].items() if v["n"] >= 2]
        means = [scale * v["mean"] for _, v in items]
        errs = [scale * (v["ci95"][1] - v["ci95"][0]) / 2 for _, v in items]
        ax.barh(np.arange(len(items)), means, xerr=errs, capsize=3,
                color=["#c44e52" if k == "mcr" else "#4c72b0" for k, _ in items])
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_yticks(np.arange(len(items)), [k for k, _ in items])
        ax.set_xlabel(f"test {out['metric']} − {ref} ({'points' if scale == 100 else 'MAE'}), 95 % CI")
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=120)
    return path


__all__ = ["format_paired", "grid_points", "paired_chart", "paired_difference", "run_study"]
