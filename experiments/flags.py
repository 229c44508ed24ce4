"""Command-line flags shared by main.py, compare.py and study.py, and the start-up they drive.

Each entry point runs :func:`run` (``app.run`` with :func:`parse_flags` as its flags parser, and
Ctrl-C a one-line message); nothing here touches ``sys.argv``.
"""

import sys

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


def _config_value(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(value: str):
    """The config that ``--config=<file>[:<arg>]`` names, built as the flag builds it."""
    import importlib.util

    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_mcr_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: list[str]) -> str | None:
    """The first ``--config.<path>=…`` of ``argv`` whose path the config does not have, as a one-line
    message listing that section's options and the closest one; None when every path exists (or the
    config cannot be built, whose own error then stands)."""
    import difflib

    value = _config_value(argv)
    if value is None:
        return None
    try:
        config = _load_config(value)
    except Exception:  # the flag's own parse reports a config file that does not build
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        path = a[len("--config."):].split("=", 1)[0]
        node, seen = config, "config"
        for key in path.split("."):
            if not hasattr(node, "keys"):
                break
            if key not in node:
                known = sorted(node.keys())
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {seen}.{close[0]}?" if close else ""
                return (f"--config.{path}: {seen} has no option {key!r}.{hint} Its options: {', '.join(known)}.")
            node, seen = node[key], f"{seen}.{key}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """The ``flags_parser`` of the entry points: parses ``argv`` with ``method_into_config_arg``
    applied (so ``--config.method.name=<name>`` selects that method's config section), printing the
    usage and exiting on a bad flag like absl's default parser; an override of an option the config
    does not have is the same one-line error, listing the options it has. Returns the remaining
    arguments."""
    argv = method_into_config_arg(argv)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def run(main) -> None:
    """``app.run(main, flags_parser=parse_flags)``; Ctrl-C ends it with one line (the engine has
    already said which epoch is checkpointed) and exit status 130, not a traceback."""

    def interruptible(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted; finished epochs and runs are kept: rerun the same command to resume.\n")
            sys.exit(INTERRUPTED)

    app.run(interruptible, flags_parser=parse_flags)


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


def _is_int_list(text: str) -> bool:
    try:
        int_list(text or "")
    except ValueError:
        return False
    return True


def define_int_list(name: str, default: str, help: str) -> None:
    """A comma-separated list of integers (seeds, indices): a string flag whose value is checked when the flags
    are parsed (``--seeds 0,a`` is a one-line flag error, not a traceback at run time)."""
    flags.DEFINE_string(name, default, help)
    flags.register_validator(name, _is_int_list, message=f"--{name} must be comma-separated integers, e.g. 0,1,2")
