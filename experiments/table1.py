"""The paper's Table 1 for one dataset, in one command, with the MCR authors' own hyperparameters.

    python -m experiments.table1 --dataset cremad --manual_dir /data/CREMA-D --data_dir /data/tfds \
        --workdir runs/table1_cremad
    python -m experiments.table1 --dataset mosi_vat ...      # cremad ave ucf101 mosi mosi_vat mosei mosei_vat
    python -m experiments.table1 --dataset cremad --smoke ...  # tiny models, one epoch: the command end to end
    python -m experiments.table1 --dataset cremad --rows unimodal,ensemble,mcr ...  # some rows only

Every row of the dataset's block in the MCR release's ``run.sh`` (kkontras/MCR, commit
``338d370``, sections "CREMA-D Res", "AVE Res", "UCF", "MOSEI V-T", "MOSEI V-T-A", "MOSI V-T",
"MOSI V-T-A") becomes one row here with that line's method options, learning rate, weight decay
and batch size (:data:`ROWS`; the flag-to-option mapping is in :data:`FLAGS_TO_OPTIONS`). Rows run
through :func:`mcr_jax.study.run_comparison` in the release's order, over ``--seeds`` (default 0, 1,
2), each seed's runs reused or resumed when the command is run again; a progress line with an
ETA over the whole table follows each row. The output is ``table.md`` and ``results.json`` in the
workdir: test accuracy (mean ± sample std over the seeds, 95 % t-interval) beside the paper's value
where :data:`PAPER` has it.

Choices where the protocol is ambiguous:

* **Folds and seeds.** ``run.sh`` trains one fold per dataset (``--fold 0`` for CREMA-D, AVE and
  MOSI; ``--fold 1`` for UCF and MOSEI) and the paper reports mean ± std over three runs. We keep
  the release's fold (the dataset config's built split: CREMA-D speaker-disjoint fold 0 of our
  builder, AVE's and UCF's official split 1, the CMU standard split) and vary the training seed
  (0, 1, 2): the spread is over training randomness on one split, not over splits.
* **Epochs, schedule, early stopping** are the dataset config's (``experiments/configs/``), which
  follow the release's default configs; ``run.sh`` does not change them.
* **``--pre``** (MCR starts from the unimodal runs' encoders) is kept: the MCR rows marked so start
  from their seed's unimodal runs (``init.pretrained``).
* **Flags without a counterpart here** are listed per row in ``unmapped`` and reported in the
  table's notes rather than guessed (e.g. ReconBoost's ``--alpha``; ``--lib``).

:data:`PAPER` holds the paper's Table 1 values to print beside ours. It is empty: the release's
README shows the table as an image and the paper's text was not readable from this project's
machines, so no number was typed in from memory; add them as ``{dataset: {label: (mean, std)}}``
from the paper and the column fills.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import flags, logging

from experiments.flags import (
    FLAGS,
    check_comparison,
    configure_progress,
    define_int_list,
    define_progress_flags,
    enable_compilation_cache,
    int_list,
    run,
)
from mcr_jax import guards, names, progress
from mcr_jax.report import TABLE_STATISTICS, format_table
from mcr_jax.study import run_comparison

RELEASE = "kkontras/MCR run.sh at 338d370"

#: how a ``run.sh`` flag becomes an option of ours, per method (the release's names → ours)
FLAGS_TO_OPTIONS = {
    "agm": {"--alpha": "alpha"},
    "ogm_ge": {"--alpha": "alpha"},
    "mlb": {"--alpha": "alpha", "--tanh_mode_beta": "beta"},
    "mslr": {"--kmepoch": "window", "--ilr_c/--ilr_g": "preset mcr_authors (initial multipliers 0.7 / 1.3)"},
    "mmcosine": {"--mmcosine_scaling": "scale"},
    "dnr": {"--alpha": "alpha", "--kmepoch": "reinit_num (the port's cap on re-initialisations)"},
    "mmpareto": {"--alpha": "scale"},
    "reconboost": {"--recon_weight2 / --recon_weight1": "reconcile_weight",
                   "--recon_epochstages": "stage_epochs", "--recon_ensemblestages": "rectify_epochs"},
    "mcr": {"--l": "mipd_weight", "--multil": "uni_weight", "--num_samples": "num_permutations",
            "--reg_by": "strategy", "--contr_coeff": "con_weight", "--pre": "init from the unimodal runs"},
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 1: a comparison label, its method options and training settings."""

    label: str
    method: dict = dataclasses.field(default_factory=dict)
    lr: float | None = None
    wd: float | None = None
    batch_size: int | None = None
    pre: bool = False  # starts from its seed's unimodal runs (run.sh --pre)
    unmapped: tuple = ()

    def overrides(self) -> dict:
        out: dict = {}
        if self.method:
            out["method"] = dict(self.method)
        optim = {k: v for k, v in (("learning_rate", self.lr), ("weight_decay", self.wd)) if v is not None}
        if optim:
            out["optim"] = optim
        if self.batch_size is not None:
            out["train"] = {"batch_size": self.batch_size}
        return out


def _mcr(lam, multil, *, s=32, contr=1.0, lr=None, wd=None, batch=None, pre=True, lib=False):
    return Row("mcr", dict(mipd_weight=lam, uni_weight=multil, num_permutations=s, strategy="greedy",
                           con_weight=contr), lr, wd, batch, pre, ("--lib 1",) if lib else ())


def _base(lr=None, wd=None, joint_lr=None, joint_wd=None):
    """The rows every block starts with: unimodal runs and their ensemble (one setting: the ensemble
    combines those very runs), joint training and multi-loss (``joint_lr``/``joint_wd``, default the same)."""
    jl, jw = (lr if joint_lr is None else joint_lr), (wd if joint_wd is None else joint_wd)
    return [Row("unimodal", lr=lr, wd=wd), Row("ensemble", lr=lr, wd=wd), Row("joint", lr=jl, wd=jw),
            Row("multiloss", lr=jl, wd=jw)]


def _pre(lr=None, wd=None):
    return [Row("uni_pre_finetuned", lr=lr, wd=wd), Row("uni_pre_frozen", lr=lr, wd=wd)]


#: ``{dataset: (config module, data.modalities or None, [Row])}``, transcribed from the release's run.sh
ROWS = {
    "cremad": ("cremad", None, _base(1e-3, 1e-4) + _pre(1e-4, 1e-4) + [
        Row("agm", {"alpha": 3.0}, 1e-3, 1e-4),
        Row("ogm_ge", {"alpha": 1.0}, 1e-3, 1e-4),
        Row("mlb", {"alpha": 0.5, "beta": 10.0}, 1e-3, 1e-4),
        Row("mslr", {"window": 20, "preset": "mcr_authors"}, 1e-3, 1e-4),
        Row("mmcosine", {"scale": 10.0}, 1e-3, 1e-4),
        Row("dnr", {"alpha": 3.0, "reinit_num": 3}, 1e-3, 1e-4),
        Row("mmpareto", {"scale": 1.5}, 1e-4, 1e-4),
        Row("reconboost", {"reconcile_weight": 1 / 3, "stage_epochs": 1, "rectify_epochs": 1}, 1e-4, 1e-4,
            unmapped=("--alpha 0.5",)),
        _mcr(0.1, 0.01, lr=1e-4, wd=1e-4, batch=32)]),
    "ave": ("ave", None, _base(joint_lr=1e-3, joint_wd=1e-4) + _pre(1e-3, 1e-4) + [
        Row("mslr", {"window": 10, "preset": "mcr_authors"}, 1e-3, 1e-4, unmapped=("--fold 1",)),
        Row("mmcosine", {"scale": 1.0}, 1e-3, 1e-4, unmapped=("--fold 1",)),
        Row("ogm_ge", {"alpha": 0.6}, 1e-3, 1e-4),
        Row("agm", {"alpha": 3.0}, 1e-4, 1e-4),
        Row("mlb", {"alpha": 2.0, "beta": 1.0}, 1e-3, 1e-4),
        Row("mmpareto", {"scale": 0.5}, 1e-3, 1e-4),
        Row("reconboost", {"reconcile_weight": 0.2, "stage_epochs": 1, "rectify_epochs": 1}, 1e-3, 1e-4,
            unmapped=("--alpha 0.5",)),
        Row("dnr", {"alpha": 3.0, "reinit_num": 3}, 1e-3, 1e-4),
        _mcr(0.01, 0.01, lr=1e-4, wd=1e-4, batch=32)]),
    "ucf101": ("ucf101", None, _base(1e-3, 1e-4) + _pre(1e-4, 1e-4) + [
        Row("mlb", {"alpha": 2.0, "beta": 0.5}, 1e-3, 1e-4),
        Row("mslr", {"preset": "mcr_authors"}, 1e-3, 1e-4),
        Row("mmcosine", {}, 1e-3, 1e-4),
        Row("ogm_ge", {"alpha": 0.8}, 1e-3, 1e-4),
        Row("agm", {"alpha": 2.0}, 1e-3, 1e-4),
        Row("dnr", {"alpha": 5.0, "reinit_num": 3}, 1e-3, 1e-4),
        Row("reconboost", {"reconcile_weight": 0.2, "stage_epochs": 4, "rectify_epochs": 4}, 1e-3, 1e-4,
            unmapped=("--alpha 0.5",)),
        Row("mmpareto", {"scale": 3.0}, 1e-3, 1e-4),
        _mcr(0.001, 0.1, lr=1e-4, wd=1e-4, batch=32)]),
    "mosei": ("mosei", ("vision", "text"), _base() + _pre() + [
        Row("ogm_ge", {"alpha": 0.8}), Row("agm", {"alpha": 0.5}), Row("mlb", {"alpha": 2.5}),
        Row("mmpareto", {"scale": 3.0}, unmapped=("--fold 0",)),
        _mcr(0.01, 0.1, lib=True)]),
    "mosei_vat": ("mosei", ("vision", "audio", "text"), _base() + _pre() + [
        Row("agm", {"alpha": 1.0}), Row("mlb", {"alpha": 0.5}), Row("mmpareto", {"scale": 1.0}, unmapped=("--fold 0",)),
        _mcr(0.001, 0.001, lib=True)]),
    "mosi": ("mosi", ("vision", "text"), _base(1e-4) + _pre(1e-4) + [
        Row("ogm_ge", {"alpha": 0.8}), Row("agm", {"alpha": 1.5}), Row("mlb", {"alpha": 1.5}),
        Row("mmpareto", {"scale": 1.0}, unmapped=("--fold 1",)),
        _mcr(0.001, 0.001, lr=1e-4, pre=False)]),
    "mosi_vat": ("mosi", ("vision", "audio", "text"), _base(1e-4) + _pre(1e-4) + [
        Row("agm", {"alpha": 0.5}), Row("mlb", {"alpha": 1.5}), Row("mmpareto", {"scale": 1.5}),
        _mcr(0.01, 0.01, lr=1e-4, pre=False)]),
}

#: the paper's Table 1, ``{dataset: {label: (mean %, std %)}}`` (see the module docstring: empty)
PAPER: dict[str, dict[str, tuple[float, float]]] = {}


def dataset_config(dataset: str, *, smoke: bool, manual_dir: str, data_dir: str):
    """The experiment config of a Table-1 dataset (``smoke``: tiny models, one epoch)."""
    import importlib

    if dataset not in ROWS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(ROWS)}.")
    module, modalities, _ = ROWS[dataset]
    cfg = importlib.import_module(f"experiments.configs.{module}").get_config("smoke" if smoke else None)
    if manual_dir:
        cfg.data.manual_dir = manual_dir
    if data_dir:
        cfg.data.data_dir = data_dir
    if modalities is not None:
        cfg.data.modalities = modalities
    return cfg


def table_rows(dataset: str, labels=None, *, smoke: bool = False) -> list[Row]:
    """The rows :func:`run_table` runs: ``dataset``'s block, or those of ``labels`` in the block's
    order (``smoke``: each keeps the smoke config's batch size instead of the release's)."""
    rows = ROWS[dataset][2]
    if labels:
        unknown = sorted(set(labels) - {r.label for r in rows})
        if unknown:
            raise ValueError(f"rows {unknown} are not in the {dataset} block; it has {[r.label for r in rows]}.")
        rows = [r for r in rows if r.label in set(labels)]
    if smoke:
        rows = [dataclasses.replace(r, batch_size=None) for r in rows]
    return rows


def run_table(dataset: str, config, workdir: str, seeds, *, labels=None, smoke: bool = False, log=progress.say) -> dict:
    """Every row of ``dataset``'s block (or those of ``labels``, in the block's order) on ``config``;
    writes, prints and returns the table (see the module docstring; ``log``: the progress lines).
    ``smoke``: the rows keep the smoke config's batch size instead of the release's."""
    rows = table_rows(dataset, labels, smoke=smoke)
    started, done = time.perf_counter(), [0]

    def progress(label, _):
        done[0] += 1
        spent = time.perf_counter() - started
        eta = spent / done[0] * (len(rows) - done[0])
        log(f"[table1 {dataset}] {done[0]}/{len(rows)} rows done ({label}); {spent:,.0f} s so far, "
            f"ETA {eta:,.0f} s (rows differ in cost: a rough guide)")

    out = run_comparison(config, workdir, [r.label for r in rows], seeds,
                         overrides={r.label: r.overrides() for r in rows},
                         from_unimodal=tuple(r.label for r in rows if r.pre), progress=progress)
    task = next(iter(out["runs"].values()))[0]["task"]
    table = format_table(out["summary"], out["modalities"], task=task)
    paper = PAPER.get(dataset, {})
    lines = [f"Table 1, {dataset} ({'+'.join(out['modalities'])}): test metrics over seeds {list(seeds)}, "
             f"{TABLE_STATISTICS} (model selected on validation); hyperparameters from {RELEASE}.", "", table, "",
             "Paper (mean ± std %): " + (", ".join(f"{k} {m:.1f} ± {s:.1f}" for k, (m, s) in paper.items())
                                          if paper else "not in this repository (experiments/table1.py, PAPER)."),
             "", "Rows and their release flags without a counterpart here:"]
    for r in rows:
        lines.append(f"- {r.label}: options {json.dumps(r.method, sort_keys=True)}, lr {r.lr}, wd {r.wd}"
                     + (f", batch {r.batch_size}" if r.batch_size else "")
                     + (", from the unimodal runs" if r.pre else "")
                     + (f"; unmapped: {', '.join(r.unmapped)}" if r.unmapped else ""))
    text = "\n".join(lines) + "\n"
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(text)
    guards.write_json_atomic(os.path.join(workdir, "table1.json"),
                             {"dataset": dataset, "seeds": list(seeds), "summary": out["summary"],
                              "rows": [dataclasses.asdict(r) for r in rows], "release": RELEASE})
    print("\n" + text, flush=True)
    return out


__doc__ += ("\nRows of each dataset's block (--rows):\n"
            + "".join(f"  {d}: {', '.join(r.label for r in block)}\n" for d, (_, _, block) in ROWS.items()))

flags.DEFINE_string("dataset", None, f"The Table-1 block to run: {', '.join(ROWS)}.")
flags.DEFINE_string("manual_dir", "", "The downloaded files (docs/datasets_manual.md); needed until built.")
flags.DEFINE_string("data_dir", "", "Where the built array_record files go (default: the config's).")
flags.DEFINE_string("workdir", None, "Where every run, table.md and table1.json go.")
flags.DEFINE_integer("worker_count", 0, "Reader processes (config.data.worker_count); on a GPU machine, the "
                     "spare CPU cores (benchmarks/RESULTS.md).", lower_bound=0)
define_progress_flags()
flags.DEFINE_boolean("smoke", False, "Tiny models and one epoch: checks the whole command in minutes.")
define_int_list("seeds", "0,1,2", "Training seeds (the release's fold, see the module docstring).")
flags.DEFINE_list("rows", [], "Only these rows (labels, e.g. unimodal,ensemble,mcr; each block's below); default: "
                  "the whole block.")
flags.mark_flags_as_required(["dataset", "workdir"])


def _config():
    config = dataset_config(FLAGS.dataset, smoke=FLAGS.smoke, manual_dir=FLAGS.manual_dir, data_dir=FLAGS.data_dir)
    config.data.worker_count = FLAGS.worker_count
    return config


def check():
    """The dataset, every row name, every row's config (its options and training settings) and the
    seeds, before any data is loaded or anything compiles (a mistake: one line, exit status 2)."""
    names.check("dataset", FLAGS.dataset, list(ROWS), "Table 1 datasets")
    block = [r.label for r in ROWS[FLAGS.dataset][2]]
    for label in FLAGS.rows:
        names.check("row", label, block, f"rows of the {FLAGS.dataset} block")
    rows = table_rows(FLAGS.dataset, FLAGS.rows, smoke=FLAGS.smoke)
    check_comparison(_config(), [r.label for r in rows], {r.label: r.overrides() for r in rows})
    guards.check_seeds(int_list(FLAGS.seeds))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    configure_progress()
    enable_compilation_cache()
    run_table(FLAGS.dataset, _config(), FLAGS.workdir, int_list(FLAGS.seeds), labels=FLAGS.rows, smoke=FLAGS.smoke)


if __name__ == "__main__":
    run(main, check)
