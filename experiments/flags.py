"""Command-line flags shared by main.py, compare.py and study.py, and the start-up they drive.

Each entry point runs ``app.run(main, flags_parser=parse_flags)``; nothing here touches ``sys.argv``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mcr_jax import parallel

FLAGS = flags.FLAGS


def method_into_config_arg(argv: list[str]) -> list[str]:
    """``--config.method.name=<name>`` also becomes the config argument's ``method=<name>`` word, so the
    config file builds that method's own ``method`` section (its options at their defaults, each
    overridable) instead of MCR's. Returns the rewritten argv (unchanged without that flag)."""
    name = None
    for i, a in enumerate(argv):
        if a.startswith("--config.method.name="):
            name = a.split("=", 1)[1]
        elif a == "--config.method.name" and i + 1 < len(argv):
            name = argv[i + 1]
    if not name:
        return list(argv)

    def with_method(value: str) -> str:
        path, _, arg = value.partition(":")
        words = [w for w in arg.split(",") if w.strip() and not w.strip().startswith("method=")]
        return path + ":" + ",".join(words + [f"method={name}"])

    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + with_method(a[len("--config="):])
        elif a == "--config" and i + 1 < len(out):
            out[i + 1] = with_method(out[i + 1])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """The ``flags_parser`` of the entry points: parses ``argv`` with ``method_into_config_arg``
    applied (so ``--config.method.name=<name>`` selects that method's config section), printing the
    usage and exiting on a bad flag like absl's default parser. Returns the remaining arguments."""
    return app.parse_flags_with_usage(method_into_config_arg(argv))


def define_common_flags(workdir_help: str) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=False)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (or JAX_PROCESS_ID).")
    flags.mark_flags_as_required(["config", "workdir"])


#: where compiled programs are kept between command-line runs (JAX's persistent compilation
#: cache); the environment variable MCR_JAX_COMPILATION_CACHE overrides it, empty switches it off.
DEFAULT_CACHE = "~/.cache/mcr_jax/xla"


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (a second run of the same configuration then
    skips most of its compile time); returns the folder, or None when switched off."""
    import os

    import jax

    folder = os.environ.get("MCR_JAX_COMPILATION_CACHE", DEFAULT_CACHE)
    if not folder:
        return None
    folder = os.path.expanduser(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def start() -> None:
    """Quiet library logs; the persistent compilation cache; join a multi-host run when the flags or
    environment say so."""
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]
