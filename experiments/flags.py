"""Command-line flags shared by main.py and compare.py, and the start-up they drive."""

from absl import flags, logging
from ml_collections import config_flags

from mcr_jax import parallel

FLAGS = flags.FLAGS


def define_common_flags(workdir_help: str) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=False)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (or JAX_PROCESS_ID).")
    flags.mark_flags_as_required(["config", "workdir"])


def start() -> None:
    """Quiet library logs; join a multi-host run when the flags or environment say so."""
    logging.set_verbosity(logging.WARNING)
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]
