"""A tuned comparison: every method's grid under an equal budget, chosen on validation, reported
on test over at least 5 seeds with paired differences against joint training, the ensemble and MCR.

    python -m experiments.study --config experiments/configs/synthetic.py --workdir runs/study \
        --methods unimodal,ensemble,joint,multiloss,ogm_ge,mlb,mcr --budget 4 \
        --tune_seeds 0,1,2 --eval_seeds 0,1,2,3,4

Writes results.json (the protocol, every configuration's validation scores, the chosen options,
test summaries, paired differences), table.md and paired.png into the workdir. Reruns reuse
finished runs.
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
from mcr_jax.report import DEFAULT_METHODS, TABLE_STATISTICS, format_table
from mcr_jax.study import format_paired, paired_chart, run_study

__doc__ += help_epilogue(comparison=True)

define_common_flags("Directory for every run, results.json, table.md and the chart.")
flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS), "Comma-separated methods (the list below --help's text).")
flags.DEFINE_integer("budget", 4, "Configurations tried per method (the same for every method with hyperparameters).")
define_int_list("tune_seeds", "0,1,2", "Seeds the configurations are compared on (validation only).")
define_int_list("eval_seeds", "0,1,2,3,4", "Seeds the chosen configuration is reported on (test).")
flags.DEFINE_integer("grid_seed", 0, "Seed of the draw from a grid larger than the budget.")


def check():
    """Every method name, the config, the budget and the seeds, before any data is loaded or anything
    compiles (a mistake: one line, exit status 2)."""
    check_comparison(FLAGS.config, name_list(FLAGS.methods))
    if FLAGS.budget < 1:
        raise ValueError(f"--budget must be >= 1 (configurations per method); got {FLAGS.budget}.")
    guards.check_seeds(int_list(FLAGS.tune_seeds))
    guards.check_seeds(int_list(FLAGS.eval_seeds))


def main(argv):
    del argv
    start()
    methods = name_list(FLAGS.methods)
    out = run_study(FLAGS.config, FLAGS.workdir, methods, budget=FLAGS.budget, tune_seeds=int_list(FLAGS.tune_seeds),
                    eval_seeds=int_list(FLAGS.eval_seeds), grid_seed=FLAGS.grid_seed)
    p = out["protocol"]
    header = (f"{out['dataset']}: test over seeds {p['eval_seeds']}, {TABLE_STATISTICS}; each method's options chosen "
              f"by {p['selection']} {p['tune_seeds']} among at most {p['budget']} configurations")
    chosen = "\n".join(f"- {k}: {v or '(no hyperparameters)'}" for k, v in out["chosen"].items())
    text = (header + "\n\n" + format_table(out["summary"], out["modalities"]) + "\n\nChosen options:\n" + chosen
            + "\n\nPaired test differences (same seeds), mean [95 % t-interval]:\n\n" + format_paired(out) + "\n")
    with open(os.path.join(FLAGS.workdir, "table.md"), "w") as f:
        f.write(text)
    chart = paired_chart(out, os.path.join(FLAGS.workdir, "paired.png"))
    print("\n" + text)
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}\nchart:   {chart}")


if __name__ == "__main__":
    run(main, check)
