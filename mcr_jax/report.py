"""Comparisons' labels, configs and tables: which runs a comparison makes for each method label
(:data:`DEFAULT_METHODS`, :func:`comparison_config`), the summary over seeds, the table and the bar
chart. Running a comparison is :func:`mcr_jax.study.run_comparison` (untuned) or
:func:`mcr_jax.study.run_study` (tuned).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mcr_jax import guards, metrics
from mcr_jax.methods import ORCHESTRATED, method_class
from mcr_jax.tasks import Task, get_task

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


def base_method(name: str) -> str:
    """The registered method (or orchestrator) behind a comparison label (``"ume"`` → ``"ensemble"``)."""
    return METHOD_DEFAULTS.get(name, {}).get("name", name)


def needs_unimodal_runs(name: str) -> bool:
    """Whether comparison method ``name``'s config differs per seed: it starts from (uni-pre, UMT:
    ``Method.needs_unimodal_runs``) or combines (an orchestrator of :data:`mcr_jax.methods.ORCHESTRATED`,
    the ensemble) that seed's unimodal runs."""
    base = base_method(name)
    return base in ORCHESTRATED or method_class(base).needs_unimodal_runs


def per_modality(name: str) -> bool:
    """Whether comparison method ``name`` makes one run per modality (``Method.per_modality``)."""
    base = base_method(name)
    return base not in ORCHESTRATED and method_class(base).per_modality


def with_overrides(config, overrides: dict | None) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``{section: {option: value}}`` set (e.g. one comparison row's
    ``{"optim": {"learning_rate": 1e-3}}``); the ``method`` section's options are set on whatever
    method section the config has."""
    c = ml_collections.ConfigDict(config.to_dict())
    for section, values in (overrides or {}).items():
        for k, v in values.items():
            c[section][k] = v
    return c


def comparison_config(config, name: str, unimodal_dirs: dict[str, str],
                      overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The config of one method in a comparison: the config's own method section for the method it
    was built for (``mcr`` by default, with its dataset-specific settings), else the method's
    comparison defaults (the method fills in the rest); then ``overrides`` (:func:`with_overrides`)."""
    c = ml_collections.ConfigDict(config.to_dict())
    if name == c.method.name:
        return with_overrides(c, overrides)
    section = {"name": name, **METHOD_DEFAULTS.get(name, {})}
    if section["name"] == "uni_pre":
        section["pretrained"] = dict(unimodal_dirs)
    if section["name"] == "umt":  # the uni-modal teachers: this seed's unimodal runs
        section["teachers"] = dict(unimodal_dirs)
    if section["name"] in ORCHESTRATED:  # the ensemble: it combines this seed's unimodal runs
        section["unimodal_workdirs"] = dict(unimodal_dirs)
    c.method = ml_collections.ConfigDict(section)
    return with_overrides(c, overrides)


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
