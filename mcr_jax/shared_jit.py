"""``jax.jit`` whose compiled programs are shared by every function of the process that lowers to
the same program.

A comparison builds the same program many times: the evaluation of every method with the same
model, the three seeds of a method that runs seed by seed (uni-pre, UMT), the Shapley pass of
every run. Each is a new Python function, so ``jax.jit`` compiles each anew, although what XLA
receives is byte for byte the same. :func:`shared_jit` lowers as ``jax.jit`` does and compiles a
lowered program only if no program with the same text, argument and result structure, and devices
was compiled before in this process; otherwise it calls that executable. The results are the ones
a fresh compile gives (the same input to a deterministic compiler); nothing is written to disk
(this is not JAX's persistent compilation cache, which stays off when ``MCR_JAX_COMPILATION_CACHE``
is empty).

Sharing is safe only when everything an executable depends on is in its text: constants a function
closes over are embedded in the program (they are, with JAX's default
``jax_use_simplified_jaxpr_constants=False``); an executable that carries constants as hidden
arguments is never shared. ``MCR_JAX_SHARE_PROGRAMS=0`` (read at import) or :func:`set_sharing`
switches sharing off (every function compiles its own programs, as ``jax.jit``).
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import jax

#: at most this many distinct programs are kept by the process-wide table (least recently used
#: dropped; a function keeps the programs it uses either way).
MAX_PROGRAMS = 256

_enabled = os.environ.get("MCR_JAX_SHARE_PROGRAMS", "1").strip() not in ("0", "false", "False", "")
_lock = threading.Lock()
_table: collections.OrderedDict = collections.OrderedDict()  # key -> Compiled
_building: dict = {}  # key -> Event: a program being compiled by another thread
_counts = {"compiled": 0, "shared": 0}


def set_sharing(enabled: bool) -> None:
    """Switches sharing on or off for the functions called from now on (the table is emptied)."""
    global _enabled
    with _lock:
        _enabled = bool(enabled)
        _table.clear()


def stats() -> dict[str, int]:
    """``{"compiled": programs compiled, "shared": compiles saved by sharing}`` since the start."""
    with _lock:
        return dict(_counts)


def _hidden_constants(compiled) -> bool:
    return bool(getattr(getattr(compiled, "_params", None), "const_args", ()))


def _compile(lowered):
    """The executable of ``lowered``: the shared one when the same program was compiled before."""
    if not _enabled:
        return lowered.compile()
    devices = tuple(d.id for d in jax.devices())
    key = (lowered.as_text(), lowered.in_tree, lowered.out_tree, devices)
    while True:
        with _lock:
            if key in _table:
                _table.move_to_end(key)
                _counts["shared"] += 1
                return _table[key]
            wait = _building.get(key)
            if wait is None:
                _building[key] = threading.Event()
                break
        wait.wait()  # another thread compiles it; then look again (or compile, if it failed)
    try:
        compiled = lowered.compile()
        with _lock:
            _counts["compiled"] += 1
            if not _hidden_constants(compiled):
                _table[key] = compiled
                while len(_table) > MAX_PROGRAMS:
                    _table.popitem(last=False)
        return compiled
    finally:
        with _lock:
            _building.pop(key).set()


class SharedJit:
    """A jitted function (see the module docstring): call it, ``compile(*args)`` it ahead, or
    ``lower(*args)`` it, as a ``jax.jit`` function. Its own programs are kept per argument
    signature (shapes, dtypes, shardings, structure), so lowering happens once per signature."""

    def __init__(self, fn, **jit_kwargs):
        self._jit = jax.jit(fn, **jit_kwargs)
        self._own: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(args) -> tuple:
        leaves, tree = jax.tree.flatten(args)

        def one(x):
            if isinstance(x, jax.Array):
                return (x.shape, x.dtype, x.weak_type, x.sharding)
            if hasattr(x, "shape") and hasattr(x, "dtype"):
                return (type(x), x.shape, x.dtype)
            return (type(x),)  # a Python scalar: traced, its value is not part of the program

        return (tree, *map(one, leaves))

    def lower(self, *args):
        return self._jit.lower(*args)

    def compile(self, *args):
        """The executable for these arguments (compiled, or taken from the process-wide table)."""
        sig = self._signature(args)
        with self._lock:
            compiled = self._own.get(sig)
        if compiled is None:
            compiled = _compile(self._jit.lower(*args))
            with self._lock:
                self._own[sig] = compiled
        return compiled

    def __call__(self, *args) -> Any:
        return self.compile(*args)(*args)

    def _cache_size(self) -> int:
        """How many programs this function holds (one per argument signature)."""
        return len(self._own)


def shared_jit(fn, **jit_kwargs) -> SharedJit:
    """``jax.jit(fn, **jit_kwargs)`` with its programs shared (see the module docstring)."""
    return SharedJit(fn, **jit_kwargs)


__all__ = ["MAX_PROGRAMS", "SharedJit", "set_sharing", "shared_jit", "stats"]
