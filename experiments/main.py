"""Train and evaluate one method on one dataset.

    python -m experiments.main --config experiments/configs/synthetic.py --workdir runs/mcr \
        --config.method.name=mcr --config.method.strategy=greedy --seeds 0,1,2

``--config path.py:smoke`` shrinks the run to seconds. Re-running the same command resumes an
interrupted run from its last finished epoch (or returns a finished run's results).
"""


import os

from experiments.flags import (
    FLAGS,
    check_config,
    define_common_flags,
    define_int_list,
    help_epilogue,
    int_list,
    run,
    start,
)
from mcr_jax import guards
from mcr_jax.seeds import train_seeds
from mcr_jax.train import train_and_evaluate

__doc__ += help_epilogue()

define_common_flags("Where checkpoints, metrics.jsonl and results.json go.")
define_int_list("seeds", "", "Comma-separated seeds, trained as one vectorised program where possible; each "
                    "seed's results in <workdir>/seed_<s>, mean ± std in <workdir>/summary.json.")


def check():
    """Every name, key and value, before any data is loaded (a mistake: one line, exit status 2)."""
    check_config(FLAGS.config)
    if int_list(FLAGS.seeds):
        guards.check_seeds(int_list(FLAGS.seeds))


def main(argv):
    del argv
    start()
    config = FLAGS.config
    seeds = int_list(FLAGS.seeds)
    if seeds:
        summary = train_seeds(config, FLAGS.workdir, seeds)["summary"]
        print(f"test, mean ± sample std (ddof 1) [95 % t-interval for the mean] over seeds {seeds}:")
        for head, mets in summary["test"].items():
            print(head, "  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]"
                                  for k, v in mets.items()))
    else:
        res = train_and_evaluate(config, FLAGS.workdir)
        for head, mets in res["test"]["heads"].items():
            print(f"test {head}: " + ", ".join(f"{k} {v:.4f}" for k, v in mets.items()))
    print(f"results: {os.path.join(os.path.abspath(FLAGS.workdir), 'results.json')}")


if __name__ == "__main__":
    run(main, check)
