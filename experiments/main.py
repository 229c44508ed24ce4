"""Train and evaluate one method on one dataset.

    python -m experiments.main --config experiments/configs/synthetic.py --workdir runs/mcr \
        --config.method.name=mcr --config.method.strategy=greedy --seeds 0,1,2

``--config path.py:smoke`` shrinks the run to seconds. Re-running the same command resumes an
interrupted run from its last finished epoch (or returns a finished run's results).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mcr_jax import parallel
from mcr_jax.train import run_seeds, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=False)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and results.json go.")
flags.DEFINE_string("seeds", "", "Comma-separated seeds: run each in <workdir>/seed_<s> and report mean ± std.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (or JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
    if seeds:
        summary = run_seeds(config, FLAGS.workdir, seeds)
        for head, mets in summary["test"].items():
            print(head, "  ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in mets.items()))
    else:
        train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
