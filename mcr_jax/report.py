"""Comparing methods: run several methods × seeds on one dataset, then a table, JSON and a bar chart.

Unimodal runs are shared: the ensemble and the uni-pre methods of a seed reuse that seed's unimodal
runs (``<workdir>/seed_<s>/unimodal_<modality>``), and every run resumes or returns its stored
results when its directory already holds them, so an interrupted comparison restarts where it was.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from mcr_jax import guards, metrics
from mcr_jax.tasks import Task, get_task
from mcr_jax.train import train_and_evaluate, unimodal_config

DEFAULT_METHODS = ("unimodal", "ensemble", "ume", "joint", "multiloss", "uni_pre_frozen", "uni_pre_finetuned", "umt",
                   "ogm_ge", "agm", "mlb", "mslr", "mmcosine", "mmpareto", "reconboost", "dnr", "greedy", "gblending",
                   "pmr", "opm", "mla", "amco", "mbsd", "cml", "lfm", "inforeg", "valuation", "mcr")
# Per-method defaults on top of the config's method section (the config's own section is MCR's).
METHOD_DEFAULTS = {
    "multiloss": {"uni_weight": 1.0},
    "uni_pre_frozen": {"name": "uni_pre", "freeze": True},
    "uni_pre_finetuned": {"name": "uni_pre", "freeze": False},
    # UME (Du et al., ICML 2023): the uni-modal models' logits averaged
    "ume": {"name": "ensemble", "mode": "logits"},
}


#: methods whose config differs per seed (they start from, or combine, that seed's unimodal runs).
PER_SEED = ("ensemble", "ume", "uni_pre_frozen", "uni_pre_finetuned", "umt")


def comparison_config(config, name: str, unimodal_dirs: dict[str, str]) -> ml_collections.ConfigDict:
    """The config of one method in a comparison: the config's own method section for the method it
    was built for (``mcr`` by default, with its dataset-specific settings), else the method's
    comparison defaults (the method fills in the rest)."""
    c = ml_collections.ConfigDict(config.to_dict())
    if name == c.method.name:
        return c
    section = {"name": name, **METHOD_DEFAULTS.get(name, {})}
    if section["name"] == "uni_pre":
        section["pretrained"] = dict(unimodal_dirs)
    if section["name"] == "umt":  # the uni-modal teachers: this seed's unimodal runs
        section["teachers"] = dict(unimodal_dirs)
    if section["name"] == "ensemble":
        section["unimodal_workdirs"] = dict(unimodal_dirs)
    c.method = ml_collections.ConfigDict(section)
    return c


def run_comparison(config, workdir: str, methods=DEFAULT_METHODS, seeds=(0, 1, 2)) -> dict:
    """Runs every method for every seed; returns ``{"runs": {label: [results per seed]}, "summary": ...}``.

    A method's seeds train as one vectorised program where they can (:func:`mcr_jax.seeds.train_seeds`;
    its stacked checkpoints go to ``<workdir>/vectorized/<method>``); each seed's results land in
    ``<workdir>/seed_<s>/<method>`` either way. The ensemble and uni-pre build on each seed's
    unimodal runs and run seed by seed."""
    from mcr_jax.data import load
    from mcr_jax.seeds import train_seeds

    seeds = guards.check_seeds(seeds)
    modalities = load(config.data).info.modalities
    runs: dict[str, list[dict]] = {}

    def seed_dir(s):
        return os.path.join(workdir, f"seed_{s}")

    def all_seeds(cfg, label, name):
        out = train_seeds(cfg, os.path.join(workdir, "vectorized", name), seeds,
                          seed_dirs={s: os.path.join(seed_dir(s), name) for s in seeds})
        runs[label] = out["per_seed"]

    for name in methods:
        if name == "unimodal":
            for m in modalities:
                all_seeds(unimodal_config(config, m), f"unimodal {m}", f"unimodal_{m}")
        elif name in PER_SEED:
            for s in seeds:
                base = ml_collections.ConfigDict(config.to_dict())
                base.seed = int(s)
                unimodal_dirs = {m: os.path.join(seed_dir(s), f"unimodal_{m}") for m in modalities}
                res = train_and_evaluate(comparison_config(base, name, unimodal_dirs), os.path.join(seed_dir(s), name))
                runs.setdefault(name, []).append(res)
        else:
            all_seeds(comparison_config(config, name, {}), name, name)
    summary = summarize(runs)
    out = {"dataset": config.data.name, "modalities": list(modalities), "seeds": list(seeds), "summary": summary,
           "runs": runs}
    os.makedirs(workdir, exist_ok=True)
    guards.write_json_atomic(os.path.join(workdir, "results.json"), out)
    return out


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean ± std over seeds of the test metrics of every head, MIPD, Shapley values (when every
    seed has them) and sample-type accuracies."""
    summary = {}
    for label, results in runs.items():
        entry = {"n": len(results), "heads": {}}
        for head in results[0]["test"]["heads"]:
            keys = results[0]["test"]["heads"][head]
            entry["heads"][head] = {k: metrics.mean_std([r["test"]["heads"][head][k] for r in results]) for k in keys}
        if "mipd" in results[0]["test"]:
            entry["mipd"] = {m: metrics.mean_std([r["test"]["mipd"][m] for r in results])
                             for m in results[0]["test"]["mipd"]}
        if all("shapley" in r["test"] for r in results):
            entry["shapley"] = {m: metrics.mean_std([r["test"]["shapley"][m] for r in results])
                                for m in results[0]["test"]["shapley"]}
        if "by_sample_type" in results[0]["test"]:
            entry["by_sample_type"] = {t: metrics.mean_std([r["test"]["by_sample_type"][t] for r in results])
                                       for t in results[0]["test"]["by_sample_type"]}
        summary[label] = entry
    return summary


def _pm(ms: dict, scale: float = 100.0, digits: int = 1, interval: bool = False) -> str:
    """``mean ± std`` (sample std), with the 95 % t-interval ``[low, high]`` when ``interval``."""
    if ms is None or ms["n"] == 0:
        return "–"
    if ms["n"] < 2:
        return f"{scale * ms['mean']:.{digits}f} (n = 1)"
    text = f"{scale * ms['mean']:.{digits}f} ± {scale * ms['std']:.{digits}f}"
    if interval and "ci95" in ms:
        lo, hi = ms["ci95"]
        text += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    return text


#: what the numbers of :func:`format_table` are; the table's header line should say it.
TABLE_STATISTICS = ("mean ± sample std (ddof 1) over seeds; the fused column adds the 95 % Student-t "
                    "interval for the mean [low, high]")


def _type_name(t: str, modalities) -> str:
    t = int(t)
    return "shared" if t < 0 else f"unique-{modalities[t]}"


def format_table(summary: dict, modalities, *, task: Task | str = "classification") -> str:
    """A Markdown table (test; :data:`TABLE_STATISTICS`): the fused metric, each unimodal head's (where the method
    trains them), the fused accuracy per synthetic sample type (where known), MIPD per modality, and the
    Shapley value per modality (in the headline's units) only when some entry has it (a table of runs
    without it is unchanged)."""
    task = get_task(task)
    key, scale, unit = task.headline, task.headline_scale, task.headline_unit
    types = sorted({t for e in summary.values() for t in e.get("by_sample_type", {})}, key=int)
    head_cols = [f"{m} head {unit}" for m in modalities]
    type_cols = [f"{_type_name(t, modalities)} acc %" for t in types]
    mipd_cols = [f"MIPD {m} ×100" for m in modalities]
    shapley = any("shapley" in e for e in summary.values())
    shapley_cols = [f"Shapley {m}" + (f" ×{scale:g}" if scale != 1 else "") for m in modalities] if shapley else []
    cols = head_cols + type_cols + mipd_cols + shapley_cols
    lines = ["| method | fused " + unit + " | " + " | ".join(cols) + " |", "|---" * (2 + len(cols)) + "|"]
    for label, entry in summary.items():
        fused = entry["heads"]["fused"].get(key)
        heads = [_pm(entry["heads"][m].get(key), scale) if m in entry["heads"] else "–" for m in modalities]
        by_type = [_pm(entry.get("by_sample_type", {}).get(t)) for t in types]
        mipd = [_pm(entry.get("mipd", {}).get(m), 100.0, 2) for m in modalities]
        phi = [_pm(entry.get("shapley", {}).get(m), scale) for m in modalities] if shapley else []
        lines.append(f"| {label} | {_pm(fused, scale, interval=True)} | "
                     + " | ".join(heads + by_type + mipd + phi) + " |")
    return "\n".join(lines)


def _half_width(ms: dict) -> float:
    lo, hi = ms.get("ci95", [float("nan")] * 2)
    return 0.0 if np.isnan(lo) else (hi - lo) / 2


def bar_chart(summary: dict, path: str, *, task: Task | str = "classification", title: str = "") -> str:
    """Fused test metric per method, error bars the 95 % t-interval for the mean; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = get_task(task)
    key, scale = task.headline, task.headline_scale
    labels = list(summary)
    means = [scale * summary[k]["heads"]["fused"][key]["mean"] for k in labels]
    stds = [scale * _half_width(summary[k]["heads"]["fused"][key]) for k in labels]
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 3.6))
    colors = ["#c44e52" if k == "mcr" else "#4c72b0" for k in labels]
    ax.bar(np.arange(len(labels)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=25, ha="right")
    ax.set_ylabel(f"test {task.headline_name}\n(bars: 95 % t-interval)")
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0.0, lo - 5 * scale / 100), None)
    ax.set_title(title)
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=120)
    return path
