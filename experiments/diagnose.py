"""The diagnosis part of the reproduction study (``python -m experiments.reproduce --study diagnosis``).

Three questions, each answered with measurements:

1. **Does the MIPD gradient reach the weak encoder, and at which λ_M does it matter?** MCR's tuned
   configuration trains with the ``grad_norms`` diagnostic at λ_M = tuned, 0.1 (the reference's
   CREMA-D value) and 1.0 (one vectorised program), and reports per player the norm of the task
   gradient and of the MIPD gradient (after the game) over training.
2. **The MIPD diagnostic (study e):** on every synthetic sweep point already run, the test MIPD of
   each modality under joint training and MCR, and MCR − joint (paired per seed) for the weak
   modality's MIPD and its unique examples' accuracy.
3. **Batch composition:** how often a permuted partner has the sample's own class (then swapping
   its latent carries no label information), at the training batch size and class frequencies.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mcr_jax import guards, metrics

LAMBDAS = (0.1, 1.0)


def group_accuracy(results: dict, sample_type) -> float:
    """A run's test accuracy on one synthetic sample type (-1 shared, i unique to modality i), NaN
    when the split has none."""
    return float(results["test"].get("by_sample_type", {}).get(str(int(sample_type)), np.nan))


def _ci(values, scale: float = 100.0, digits: int = 1) -> str:
    ms = metrics.mean_std(list(values))
    lo, hi = ms["ci95"]
    return f"{scale * ms['mean']:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def gradient_study(options, tuned_mcr_config) -> tuple[str, dict]:
    from mcr_jax.dynamics import read_history
    from mcr_jax.seeds import train_grid

    base, chosen = tuned_mcr_config()
    base.method.grad_norms = True
    lambdas = sorted({float(base.method.mipd_weight), *LAMBDAS})
    seeds = list(options.eval_seeds)
    root = os.path.join(options.workdir, "diagnosis", "grad_norms")
    grid = train_grid(base, root, seeds, [{"mipd_weight": v} for v in lambdas])
    modalities = grid[0]["per_seed"][0]["modalities"]
    histories = {v: [read_history(os.path.join(root, f"config_{i}", f"seed_{s}")) for s in seeds]
                 for i, v in enumerate(lambdas)}
    lines = [f"MCR's tuned configuration {chosen} with the per-term gradient-norm diagnostic, λ_M varied; seeds "
             f"{seeds}. Per player (encoder + own fusion branch), the norm of the gradient each weighted term "
             "contributes, averaged over the steps of the first 5 epochs and of all epochs run, then over "
             "seeds; the ratio is MIPD / task. Test accuracy % (mean over seeds) on the right.", "",
             "| λ_M | player | task, ep. 1–5 | MIPD, ep. 1–5 | ratio | task, all | MIPD, all | ratio | "
             "contrastive, all | fused acc % | unique-x2 acc % | MIPD x2 ×100 |", "|---" * 12 + "|"]
    curves = {}
    for i, v in enumerate(lambdas):
        runs = grid[i]["per_seed"]
        acc = 100 * np.mean([r["test"]["heads"]["fused"]["accuracy"] for r in runs])
        u2 = 100 * np.mean([group_accuracy(r, 1) for r in runs])
        mipd2 = 100 * np.mean([r["test"]["mipd"][modalities[-1]] for r in runs])
        for m in modalities:
            def series(term, m=m, v=v):
                return [np.array([rec["train"][f"gnorm_{term}_{m}"] for rec in h]) for h in histories[v] if h]

            task, mipd, con = series("task"), series("mipd"), series("con")
            early = [np.mean([t[:5].mean() for t in task]), np.mean([d[:5].mean() for d in mipd])]
            full = [np.mean([t.mean() for t in task]), np.mean([d.mean() for d in mipd])]
            curves[(v, m)] = (task, mipd)
            lines.append(f"| {v:g} | {m} | {early[0]:.3g} | {early[1]:.3g} | {early[1] / early[0]:.3f} | "
                         f"{full[0]:.3g} | {full[1]:.3g} | {full[1] / full[0]:.3f} | "
                         f"{np.mean([c.mean() for c in con]):.3g} | {acc:.1f} | {u2:.1f} | {mipd2:.2f} |")
    return "\n".join(lines), {"lambdas": lambdas, "modalities": modalities, "curves": curves}


def gradient_chart(data: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lambdas, modalities = data["lambdas"], data["modalities"]
    fig, axes = plt.subplots(1, len(lambdas), figsize=(4.2 * len(lambdas), 3.4), squeeze=False)
    colors = ["#c44e52", "#4c72b0", "#55a868"]
    for ax, v in zip(axes[0], lambdas, strict=True):
        for k, m in enumerate(modalities):
            task, mipd = data["curves"][(v, m)]
            length = min(len(t) for t in task)
            ax.plot(np.arange(1, length + 1), np.mean([t[:length] for t in task], 0), color=colors[k % 3], ls="--",
                    label=f"task → {m}")
            ax.plot(np.arange(1, length + 1), np.mean([d[:length] for d in mipd], 0), color=colors[k % 3],
                    label=f"MIPD → {m}")
        ax.set_yscale("log")
        ax.set_title(f"λ_M = {v:g}", fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("gradient norm per player (mean over steps, seeds)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    guards.write_figure(fig, path, dpi=110)
    return path


def mipd_study(workdir: str, points) -> tuple[str, list]:
    """Table (e) from the finished sweep studies under ``<workdir>/synthetic``."""
    rows = []
    lines = ["| proportions (shared, u1, u2) | joint MIPD x1 | joint MIPD x2 | MCR MIPD x1 | MCR MIPD x2 | "
             "MCR − joint: MIPD x2 ×100 | MCR − joint: unique-x2 acc | MCR − joint: unique-x1 acc |",
             "|---" * 8 + "|"]
    for p in points:
        path = os.path.join(workdir, "synthetic", "p_" + "_".join(f"{x:.2f}" for x in p), "results.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            out = json.load(f)
        joint, mcr = out["runs"]["joint"], out["runs"]["mcr"]

        def mipd(runs, m):
            return [r["test"]["mipd"][m] for r in runs]

        def group(runs, t):
            return [group_accuracy(r, t) for r in runs]

        u1 = "–" if p[1] == 0 else _ci(np.subtract(group(mcr, 0), group(joint, 0)))
        lines.append(f"| {p} | {100 * np.mean(mipd(joint, 'x1')):.2f} | {100 * np.mean(mipd(joint, 'x2')):.2f} | "
                     f"{100 * np.mean(mipd(mcr, 'x1')):.2f} | {100 * np.mean(mipd(mcr, 'x2')):.2f} | "
                     f"{_ci(np.subtract(mipd(mcr, 'x2'), mipd(joint, 'x2')), digits=2)} | "
                     f"{_ci(np.subtract(group(mcr, '1'), group(joint, '1')))} | {u1} |")
        rows.append((p, out))
    return "\n".join(lines), rows


def batch_composition(config) -> str:
    """How often a derangement partner shares the sample's class, measured on training batches."""
    import jax

    from mcr_jax.data import load
    from mcr_jax.losses import sample_permutations

    data = load(config.data)
    b = int(config.train.batch_size)
    same = []
    key = jax.random.PRNGKey(0)
    for i, batch in enumerate(data.batches("train", b, train=True, seed=0, epoch=1)):
        perms = np.asarray(sample_permutations(jax.random.fold_in(key, i), 32, b))
        y = np.asarray(batch["label"])
        same.append(np.mean(y[perms] == y[None]))
    return (f"At batch size {b}, {100 * np.mean(same):.1f} % of the permuted partners (S = 32 derangements per "
            f"batch, one epoch) have the sample's own class (uniform classes: (B/C − 1)/(B − 1) = "
            f"{100 * (b / data.info.num_classes - 1) / (b - 1):.1f} %).")


def study_diagnosis(options, tuned_mcr_config, write, points) -> None:
    """Runs the three diagnoses (module docstring). ``options``: the reproduction's options
    (:class:`experiments.reproduce.Options`: ``eval_seeds``, ``workdir``, ``out``); ``tuned_mcr_config()``
    → (config, chosen options); ``write(name, text)`` writes a table; ``points``: the synthetic sweep
    points to read."""
    grad_text, grad_data = gradient_study(options, tuned_mcr_config)
    gradient_chart(grad_data, os.path.join(options.out, "diagnosis_grad_norms.png"))
    mipd_text, _ = mipd_study(options.workdir, points)
    base, _ = tuned_mcr_config()
    text = ("## Diagnosis\n\n### Gradient norms per player\n\n" + grad_text
            + "\n\n### The MIPD diagnostic (e)\n\nTest MIPD ×100 per modality (mean over the tuned studies' "
              "evaluation seeds) and paired MCR − joint differences, mean [95 % t-interval], per synthetic point:\n\n"
            + mipd_text + "\n\n### Batch composition\n\n" + batch_composition(base))
    write("diagnosis", text)


__all__ = ["batch_composition", "group_accuracy", "gradient_study", "mipd_study", "study_diagnosis"]
