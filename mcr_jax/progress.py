"""Progress a person reads: one line per method, and an ETA for the whole job.

Every line the library prints goes through :func:`say` (notes: a resumed run, a method's
schedule, a damaged file) or through the epoch reports of :func:`epoch_report` and
:func:`run_done`. How they are shown is set once per process with :func:`configure`:

- on a terminal, one line per method that rewrites itself every epoch (the epoch, each run's best
  validation value, the method's ETA and the whole job's) and stays as the method's summary when
  it finishes;
- written to a file (or a pipe), a line every ``interval_s`` seconds at most (30 s by default;
  ``0``: every epoch) and the same summary line per method;
- ``quiet``: no progress and no notes; warnings (a damaged file, a fallback, a write that failed)
  are printed in every mode.

A job of several units (:func:`mcr_jax.study.run_comparison`: one unit per method, or per seed
for the methods run seed by seed) announces them with :func:`job` and wraps each in
:func:`unit`; the job's ETA is the current unit's own ETA plus the mean time of the units that
trained so far times the units not started (units found finished take no time and are not in
the mean). Only the primary process of a multi-host run prints.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time

from mcr_jax import parallel

#: seconds between two progress lines when the output is not a terminal (``configure(interval_s=…)``)
DEFAULT_INTERVAL_S = 30.0


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.quiet = False
        self.interval_s = DEFAULT_INTERVAL_S
        self.stream = None  # None: sys.stdout at the time of printing (so pytest's capture sees it)
        self.live = None  # None: whether the stream is a terminal
        self.line = ""  # the live line on screen now ("" when none)
        self.last_print = -float("inf")
        self.units_total = 0
        self.units_done = 0
        self.trained_s = 0.0
        self.trained_units = 0
        self.unit_start = None
        self.unit_trained = False
        self.unit_names = {}
        self.clock = time.monotonic


_S = _State()


def configure(*, quiet: bool | None = None, interval_s: float | None = None, stream=None, live: bool | None = None,
              clock=None) -> None:
    """Sets how progress is shown (see the module docstring); an argument left None keeps its
    setting (:func:`reset` goes back to the defaults). ``live``: force (True) or forbid (False) the
    rewriting line; by default it is decided by whether ``stream`` is a terminal. ``stream``:
    where lines go (default: ``sys.stdout`` at the time of printing). ``clock``: seconds, for tests."""
    if interval_s is not None and not interval_s >= 0:
        raise ValueError(f"progress interval_s must be a number of seconds >= 0, got {interval_s!r}.")
    with _S.lock:
        if quiet is not None:
            _S.quiet = bool(quiet)
        if interval_s is not None:
            _S.interval_s = float(interval_s)
        if stream is not None:
            _S.stream = stream
        if live is not None:
            _S.live = live
        if clock is not None:
            _S.clock = clock
        _S.last_print = -float("inf")


def reset() -> None:
    """Back to the defaults (a terminal line or a line per 30 s to ``sys.stdout``; no job)."""
    global _S
    _S = _State()


def _stream():
    return _S.stream if _S.stream is not None else sys.stdout


def _is_live() -> bool:
    if _S.live is not None:
        return _S.live
    isatty = getattr(_stream(), "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _write(text: str, *, keep: bool) -> None:
    """Prints ``text``: as the live line (rewritten by the next) when ``keep`` is False and the
    stream is a terminal, else as a line of its own."""
    if not parallel.is_primary():
        return
    out = _stream()
    if _is_live():
        if not keep:  # a rewritten line must not wrap: \r returns to the start of its last row only
            width = shutil.get_terminal_size((100, 24)).columns - 1
            text = text if len(text) <= width else text[:width - 1] + "…"
        clear = "\r\x1b[K" if _S.line else ""
        out.write(clear + text + ("\n" if keep else ""))
        _S.line = "" if keep else text
    else:
        out.write(text + "\n")
    out.flush()


def say(msg: str, *, warning: bool = False, detail: bool = False) -> None:
    """A note (suppressed by ``quiet``) or a warning (always printed), on a line of its own; a
    live progress line is redrawn below it. ``detail``: a run's own diagnostic (a method's
    schedule, also in its ``metrics.jsonl``), left out inside a job's unit unless every epoch is
    shown (``interval_s=0``)."""
    with _S.lock:
        if _S.quiet and not warning:
            return
        if detail and _S.unit_start is not None and _S.interval_s > 0:
            return
        line = _S.line
        _write(msg, keep=True)
        if line:
            _write(line, keep=False)


def duration(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def job(units: int) -> None:
    """Announces a job of ``units`` units (e.g. the methods of a comparison): the ETA then covers
    the whole job. A new job replaces the previous one."""
    with _S.lock:
        _S.units_total, _S.units_done = int(units), 0
        _S.trained_s, _S.trained_units = 0.0, 0
        _S.unit_start, _S.unit_trained = None, False


@contextlib.contextmanager
def unit(label: str, names: dict | None = None):
    """One unit of the announced job (``label``: how a line names it; ``names``: ``{method name:
    name shown}`` for the lines of its runs, e.g. a comparison's ``{"uni_pre": "uni_pre_frozen"}``).
    Its time counts towards the job's ETA if it trained; a unit whose runs were all finished before
    says so in one line."""
    with _S.lock:
        _S.unit_start, _S.unit_trained, _S.unit_names = _S.clock(), False, dict(names or {})
    ok = False
    try:
        yield
        ok = True
    finally:
        with _S.lock:
            trained = _S.unit_trained
            if trained and _S.unit_start is not None:
                _S.trained_s += _S.clock() - _S.unit_start
                _S.trained_units += 1
            _S.units_done += 1
            _S.unit_start, _S.unit_names = None, {}
        if ok and not trained:
            say(f"[{label}] already finished: results reused")


def in_unit() -> bool:
    """Whether a unit of a job is running (its own lines then speak for its runs)."""
    return _S.unit_start is not None


def shown_name(method: str) -> str:
    """How the lines of the running unit name ``method`` (itself unless the unit renames it)."""
    return _S.unit_names.get(method, method)


def _job_eta(unit_eta: float | None) -> str:
    """`` · job 3/28, ETA 2 min 10 s`` (empty outside a job; no ETA while the unit's is unknown)."""
    if _S.units_total <= 1:
        return ""
    where = f" · job {_S.units_done + 1}/{_S.units_total}"
    if unit_eta is None:
        return where
    left = max(0, _S.units_total - _S.units_done - 1)
    mean = _S.trained_s / _S.trained_units if _S.trained_units else None
    if mean is None and _S.unit_start is not None:  # no unit finished yet: this one's projected total
        mean = _S.clock() - _S.unit_start + unit_eta
    eta = unit_eta + (mean or 0.0) * left
    return f"{where}, ETA {duration(eta)}"


def epoch_report(label: str, epoch: int, epochs: int, text: str, unit_eta: float | None) -> None:
    """One epoch of ``label`` (``text``: its losses or best values; ``unit_eta``: seconds left for
    its runs, None while unknown): the live line on a terminal; in a file, a line when
    ``interval_s`` has passed since the last line (the summary line of :func:`run_done` follows
    the last epoch)."""
    with _S.lock:
        _S.unit_trained = True
        if _S.quiet:
            return
        eta = "" if unit_eta is None else f"  ETA {duration(unit_eta)}"
        line = f"[{label}] epoch {epoch}/{epochs}{eta}{_job_eta(unit_eta)}  {text}".rstrip()
        now = _S.clock()
        if _is_live():
            _write(line, keep=False)
        elif now - _S.last_print >= _S.interval_s:
            _write(line, keep=True)
            _S.last_print = now


def run_done(label: str, text: str) -> None:
    """The summary line of ``label`` once its runs are finished (replaces the live line)."""
    with _S.lock:
        _S.unit_trained = True
        if _S.quiet:
            return
        _write(f"[{label}] {text}", keep=True)
        _S.last_print = _S.clock()


__all__ = ["DEFAULT_INTERVAL_S", "configure", "duration", "epoch_report", "in_unit", "job", "reset", "run_done", "say",
           "shown_name", "unit"]
