"""Compare methods on one dataset: several methods × seeds, a table, results.json and a bar chart.

    python -m experiments.compare --config experiments/configs/synthetic.py --workdir runs/compare \
        --methods unimodal,ensemble,joint,multiloss,mcr --seeds 0,1,2

Runs resume: re-running the command skips finished runs and resumes interrupted ones.
"""

import os

from absl import flags

from experiments.flags import (
    FLAGS,
    check_comparison,
    define_common_flags,
    define_int_list,
    help_epilogue,
    int_list,
    name_list,
    run,
    start,
)
from mcr_jax import guards
from mcr_jax.report import DEFAULT_METHODS, TABLE_STATISTICS, bar_chart, format_table
from mcr_jax.study import run_comparison

__doc__ += help_epilogue(comparison=True)

define_common_flags("Directory for every run, results.json, table.md and the chart.")
flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "Comma-separated methods (the list below --help's text).")
define_int_list("seeds", "0,1,2", "Comma-separated seeds.")


def check():
    """Every method name, the config and the seeds, before any data is loaded or anything compiles
    (a mistake: one line, exit status 2)."""
    check_comparison(FLAGS.config, name_list(FLAGS.methods))
    guards.check_seeds(int_list(FLAGS.seeds))


def main(argv):
    del argv
    start()
    methods = name_list(FLAGS.methods)
    seeds = int_list(FLAGS.seeds)
    out = run_comparison(FLAGS.config, FLAGS.workdir, methods, seeds)
    task = next(iter(out["runs"].values()))[0]["task"]
    table = format_table(out["summary"], out["modalities"], task=task)
    header = (f"{out['dataset']}: test metrics over seeds {out['seeds']}, {TABLE_STATISTICS} "
              f"(model selected on validation)")
    with open(os.path.join(FLAGS.workdir, "table.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    chart = bar_chart(out["summary"], os.path.join(FLAGS.workdir, "comparison.png"), task=task, title=out["dataset"])
    print("\n" + header + "\n\n" + table + "\n")
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}\nchart:   {chart}")


if __name__ == "__main__":
    run(main, check)
