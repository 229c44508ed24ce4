"""Command-line flags shared by main.py, compare.py and study.py, and the start-up they drive.

Each entry point runs :func:`run` (``app.run`` with :func:`parse_flags` as its flags parser, its own
up-front ``check`` and Ctrl-C a one-line message); nothing here touches ``sys.argv``. A mistake on the
command line (an unknown flag, config key, method, dataset or fusion head; a bad value) ends the
program before anything is loaded or compiled with one line, ``error: …``, and exit status 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mcr_jax import guards, names, parallel, progress
from mcr_jax.progress import DEFAULT_INTERVAL_S

FLAGS = flags.FLAGS
# The flags the helpers below define belong to the entry point that calls them (absl's --help
# lists the main module's flags only).
flags.disclaim_key_flags()


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
    """The value of ``--config`` in ``argv`` (the last one given, as absl takes it)."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            value = a[len("--config="):]
        elif a == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _argv_methods(argv: list[str]) -> list[str]:
    """The method names ``argv`` asks for: ``--config.method.name=<m>`` and the config argument's
    ``method=<m>`` word."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--config.method.name="):
            out.append(a.split("=", 1)[1])
        elif a == "--config.method.name" and i + 1 < len(argv):
            out.append(argv[i + 1])
    value = _config_value(argv) or ""
    for word in value.partition(":")[2].split(","):
        key, sep, name = word.strip().partition("=")
        if sep and key == "method" and name:
            out.append(name)
    return out


def _load_config(value: str):
    """The config that ``--config=<file>[:<arg>]`` names, built as the flag builds it."""
    import importlib.util

    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_mcr_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys():
        path = f"{prefix}{k}"
        out.append(path)
        if hasattr(node[k], "keys"):
            out += _dotted_keys(node[k], path + ".")
    return out


def unknown_override(argv: list[str]) -> str | None:
    """The first ``--config.<key>=…`` of ``argv`` whose key the config does not have, as a one-line
    message naming the closest key the config has (or, when none is close, that section's options);
    None when every key exists (or the config cannot be built, whose own error then stands)."""
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
        parts = path.split(".")
        node = config
        for i, key in enumerate(parts):
            if not hasattr(node, "keys"):
                break
            if key not in node:
                seen, rest = ".".join(parts[:i]), ".".join(parts[i:])
                depth = len(parts) - i
                same_depth = [k for k in _dotted_keys(node) if k.count(".") == depth - 1]
                close = names.closest(rest, same_depth)
                if close:
                    return f"unknown config key {path!r}; did you mean {(seen + '.' if seen else '') + close!r}?"
                return f"unknown config key {path!r}; {seen or 'the config'} has: {', '.join(sorted(node.keys()))}"
            node = node[key]
    return None


#: the exit status of a command-line mistake (a wrong flag, key, name or value), as argparse's
USAGE_ERROR = 2


def fail(message: str) -> None:
    """Ends the program with ``error: <message>`` (one line) on stderr and exit status 2."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    sys.exit(USAGE_ERROR)


def _flag_error(error: Exception, argv: list[str]) -> str:
    """One line for absl's error: a config file that raised is named as typed, with the last line
    of its error (the exception), not the traceback."""
    text = str(error)
    if "Error whilst parsing config file" in text:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"--config={_config_value(argv)}: {last}"
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """The ``flags_parser`` of the entry points: parses ``argv`` with ``method_into_config_arg``
    applied (so ``--config.method.name=<name>`` selects that method's config section). Every mistake
    (an unknown method, flag or config key, a value of the wrong type) ends the program with one
    line, ``error: …``, and exit status 2 (:func:`fail`). Returns the remaining arguments."""
    try:
        for name in _argv_methods(argv):
            names.check_method(name)
    except names.UnknownName as e:
        fail(str(e))
    typed = list(argv)
    argv = method_into_config_arg(argv)
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
    except flags.Error as e:
        message = _flag_error(e, typed)
    fail(message)


def check_config(config) -> None:
    """The checks a run makes of its config before any work (:func:`mcr_jax.config.resolve_config`,
    :func:`mcr_jax.guards.validate_config`, the method's option names) and the names it refers to
    (method, dataset, fusion head, encoder), run up front: a ``ValueError`` naming the field."""
    from mcr_jax.config import resolve_config
    from mcr_jax.methods import method_defaults
    from mcr_jax.options import merge_options

    method = config.method.get("name", None)
    names.check_method(method)
    names.check_dataset(config.data.get("name", None))
    if config.model.get("fusion", None) is not None:
        names.check_fusion(config.model.fusion)
    if config.model.get("encoder", None):
        names.check_encoder(config.model.encoder)
    merge_options(method_defaults(method), config.method, where=f"method {method!r}", ignore=("name",))
    guards.validate_config(resolve_config(config))


def check_comparison(config, labels, overrides: dict | None = None) -> None:
    """:func:`check_config` for every comparison label of ``labels`` (each a name
    :func:`mcr_jax.names.check_label` knows) on ``config``, with its ``overrides``."""
    from mcr_jax.report import comparison_config

    if not labels:
        raise ValueError("no methods given; e.g. --methods joint,mcr.")
    for label in labels:
        names.check_label(label)
    check_config(config)
    for label in labels:
        check_config(comparison_config(config, label, {}, (overrides or {}).get(label)))


def name_list(text: str) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]``."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def help_epilogue(comparison: bool = False) -> str:
    """The lines of an entry point's ``--help`` saying where the config keys are and which names
    there are (``comparison``: also the labels its ``--methods`` takes)."""
    methods = (f"Methods (--methods): {', '.join(names.comparison_labels())}.\n" if comparison else
               f"Methods (--config.method.name): {', '.join(names.method_names())}.\n")
    return ("\nConfig keys: the sections and options of the config file (experiments/configs/<dataset>.py, "
            "built on experiments/configs/base.py; the library defaults in mcr_jax/config.py); set any with "
            "--config.<section>.<option>=<value>.\n" + methods
            + f"Datasets (config.data.name): {', '.join(names.dataset_names())}.\n"
            f"Fusion heads (config.model.fusion): {', '.join(names.fusion_names())}.\n")


#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def run(main, check=None) -> None:
    """``app.run(main, flags_parser=parse_flags)``. ``check()``, when given, runs first, once the
    flags are parsed: the entry point's up-front validation of names, config and values, whose
    ``ValueError`` is a one-line ``error: …`` with exit status 2 (:func:`fail`), before any data is
    loaded or anything compiles; errors of ``main`` itself (training) are left as they are. Ctrl-C
    ends ``main`` with one line (the engine has already said which epoch is checkpointed) and exit
    status 130, not a traceback."""

    def interruptible(argv):
        if check is not None:
            try:
                check()
            except ValueError as e:
                fail(str(e))
        try:
            return main(argv)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted; finished epochs and runs are kept: rerun the same command to resume.\n")
            sys.exit(INTERRUPTED)

    app.run(interruptible, flags_parser=parse_flags)


def define_common_flags(workdir_help: str) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file and its argument, e.g. experiments/configs/synthetic.py:smoke "
        "(experiments/configs/ holds one per dataset); override any of its keys with --config.<section>.<option>=…",
        lock_config=False)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-host: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (or JAX_PROCESS_ID).")
    define_progress_flags()
    flags.mark_flags_as_required(["config", "workdir"])


def define_progress_flags() -> None:
    """``--quiet`` and ``--progress_every`` (:mod:`mcr_jax.progress`)."""
    flags.DEFINE_bool("quiet", False, "No progress lines and no notes (warnings and the final output still print).")
    flags.DEFINE_float("progress_every", DEFAULT_INTERVAL_S,
                       "Seconds between two progress lines when the output is not a terminal (0: every epoch); "
                       "on a terminal one line per method rewrites itself.", lower_bound=0)


def configure_progress() -> None:
    """Progress as the flags of :func:`define_progress_flags` say."""
    progress.configure(quiet=FLAGS.quiet, interval_s=FLAGS.progress_every)


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
    """Quiet library logs; progress as the flags say; the persistent compilation cache; join a
    multi-host run when the flags or environment say so."""
    logging.set_verbosity(logging.WARNING)
    configure_progress()
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
