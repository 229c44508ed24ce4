"""What keeps a run from producing a wrong result silently: config checks before training, config
comparison on resume, atomic JSON writes, and reading a results file that may be damaged.

Each guarantee and its test are listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from typing import Any

from mcr_jax import parallel
from mcr_jax.optim import check_options
from mcr_jax.tasks import TASKS, get_task


def write_json_atomic(path: str, obj: Any, *, indent: int | None = 1) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file in the same folder and
    ``os.replace``: a reader (or a rerun after a kill) sees the old file or the new one, never half.
    In a multi-process run only process 0 writes (every process holds the same results)."""
    if not parallel.is_primary():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_figure(fig, path: str, *, dpi: int = 110) -> str:
    """Saves a matplotlib figure as ``path`` (process 0 only, like :func:`write_json_atomic`) and
    closes it; returns ``path``."""
    if parallel.is_primary():
        fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def read_json_or_none(path: str, log=print) -> dict | None:
    """The JSON object in ``path``; ``None`` (with a log line) when it is missing or unreadable, so
    that a damaged results file counts as "not finished" and the run is redone."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        log(f"{path} is unreadable ({type(e).__name__}: {e}); treating the run as not finished.")
        return None
    if not isinstance(out, dict):
        log(f"{path} does not hold a JSON object; treating the run as not finished.")
        return None
    return out


def read_jsonl(path: str) -> list[dict]:
    """The JSON records of ``path``, one per line (``[]`` when the file is missing); a line that is not
    a JSON object (a file truncated by a crash, or overwritten) is a ValueError naming the file and
    the line."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not a JSON record ({e}); the file is damaged.") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {n}: not a JSON object; the file is damaged.")
            out.append(rec)
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as ``key: old -> new`` lines."""
    a, b = flatten(old), flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: {show(va)} -> {show(vb)}")
    return lines


#: config sections that change only what is written beside the results (not the results): a
#: difference there, or their absence in an older run's config, never blocks a resume or a reuse
OUTPUT_ONLY = ("log.",)
#: options that change how fast a run goes, never its results (the batches are the same for every
#: reader worker count and prefetch depth): not compared either, so a run can resume on a machine
#: with another core count
SPEED_ONLY = ("train.prefetch:", "data.worker_count:")


def check_same_config(stored: dict, current: dict, workdir: str, what: str) -> None:
    """Raises when ``workdir`` holds a run (``what``) made with another config (keys under
    :data:`OUTPUT_ONLY` and :data:`SPEED_ONLY` are not compared). A section option missing from the stored config that
    is now at its default (an option added since that run, whose behaviour it had) is no difference."""
    from mcr_jax.config import flat_defaults

    defaults, old, now = flat_defaults(), flatten(stored), flatten(current)
    added = {k for k in set(now) - set(old) if k in defaults and now[k] == defaults[k]}
    diff = [line for line in config_diff(stored, current)
            if not line.startswith(OUTPUT_ONLY + SPEED_ONLY) and line.split(":", 1)[0] not in added]
    if diff:
        raise ValueError(
            f"{workdir} holds {what} made with a different config; differing keys (stored -> now):\n  "
            + "\n  ".join(diff)
            + f"\nRerun with the stored config to resume it, use another --workdir, or delete {workdir} "
            "to start fresh.")


def validate_config(config, task: str | None = None) -> None:
    """Rejects config values that would train nothing or select wrongly, before any work is done
    (``config`` resolved by :func:`mcr_jax.config.resolve_config`)."""
    check_options(config.optim)
    if "model" in config:
        from mcr_jax.models.layers import compute_dtype

        compute_dtype(config.model.get("dtype", "float32"))  # a ValueError naming the allowed ones
    tc = config.train
    epochs = tc.num_epochs
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"train.num_epochs must be an integer >= 1; got {epochs!r}.")
    patience = tc.patience
    if patience is None:
        patience = 0
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
        raise ValueError(f"train.patience must be an integer >= 0 (0 = no early stopping); got {patience!r}.")
    batch = tc.batch_size
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"train.batch_size must be an integer >= 1; got {batch!r}.")
    eval_batch = config.eval.batch_size
    if eval_batch is not None and (not isinstance(eval_batch, int) or isinstance(eval_batch, bool) or eval_batch < 0):
        raise ValueError(f"eval.batch_size must be an integer >= 1 (or 0: the training batch size); got "
                         f"{eval_batch!r}.")
    select = tc.select or ""
    if select:
        allowed = sorted(get_task(task).selectable if task else set().union(*(t.selectable for t in TASKS.values())))
        if select not in allowed:
            raise ValueError(f"train.select={select!r} is not a validation metric of this "
                             f"{task or 'run'}; use one of {allowed} (or '' for the default).")


def check_seeds(seeds) -> list[int]:
    """Seeds as distinct ints; a repeated seed would count one run twice in the summary."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given; e.g. --seeds 0,1,2.")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"seeds must be distinct; {dup} repeated in {seeds} (it would count one run twice).")
    return seeds


LOCK_FILE = ".mcr_jax.lock"


def _holder(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """One process per workdir: an exclusive lock file ``<workdir>/.mcr_jax.lock`` (pid, host) held
    while training writes there. A second process is refused in one line naming the holder; a lock
    whose process is gone (same host) is stale and taken over. Only process 0 of a multi-process
    run takes it (the others write nothing)."""
    if not parallel.is_primary():
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is None or (held.get("host") == me["host"] and not _alive(int(held.get("pid", -1)))):
                try:  # stale (its process is gone) or half-written by a process killed while taking it
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            if held == me:
                raise RuntimeError(f"{workdir} is already locked by this process (a nested run into the same "
                                   "workdir); give the inner run its own --workdir.") from None
            raise RuntimeError(f"{workdir} is in use by process {held.get('pid')} on {held.get('host')} (lock file "
                               f"{path}); wait for it to finish, or delete the lock file if that process is "
                               "gone.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RuntimeError(f"could not take the lock {path}: another process keeps replacing it.")
    try:
        yield
    finally:
        if _holder(path) == me:
            os.remove(path)


def check_writable(workdir: str) -> None:
    """Fails before training when ``workdir`` cannot be written (not after a whole epoch)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to the workdir {workdir} ({e.strerror or e}); choose a writable "
                              "--workdir.") from e
