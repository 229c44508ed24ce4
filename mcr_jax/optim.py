"""Optimisers and learning-rate schedules from a config section.

``config.optim`` fields: ``name`` (``"adam_l2"``: Adam with coupled L2 weight decay — the decay is
added to the gradient before Adam, as PyTorch's ``Adam(weight_decay=…)``, the reference; ``"adamw"``;
``"sgd"`` with momentum), ``learning_rate``, ``weight_decay``, ``eps``, ``momentum``, ``b1``, ``b2``,
``grad_clip`` (global norm, 0 = off), and ``schedule``:

- ``"constant"``;
- ``"cosine"``: cosine decay from ``learning_rate`` to ``min_lr`` over the whole run;
- ``"reference"``: constant for ``constant_steps`` (780) steps, then cosine annealing with warm
  restarts (``t0`` = 4, ``t_mult`` = 2, down to ``min_lr``) counted in global steps, as the
  reference code steps its scheduler.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mcr_jax.options import merge_options


def warm_restarts(base_lr: float, *, t0: int, t_mult: int, min_lr: float = 0.0):
    """Cosine annealing with warm restarts (SGDR): period ``t0 · t_mult^i`` for cycle ``i``."""
    if t0 < 1 or t_mult < 1:
        raise ValueError(f"warm restarts need t0 >= 1 and t_mult >= 1; got t0={t0}, t_mult={t_mult}.")

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        if t_mult == 1:
            cycle_start, period = jnp.floor(t / t0) * t0, jnp.float32(t0)
        else:
            # cycle i starts at t0 (t_mult^i - 1) / (t_mult - 1)
            i = jnp.floor(jnp.log1p(t * (t_mult - 1) / t0) / jnp.log(float(t_mult)))
            cycle_start = t0 * (t_mult**i - 1) / (t_mult - 1)
            period = t0 * t_mult**i
            # float rounding at a cycle boundary
            over = t >= cycle_start + period
            cycle_start = jnp.where(over, cycle_start + period, cycle_start)
            period = jnp.where(over, period * t_mult, period)
        frac = (t - cycle_start) / period
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def reference_schedule(base_lr: float, restarts, constant_steps: int):
    """``base_lr`` for the first ``constant_steps`` steps, then ``restarts(step)`` at the **global**
    step (the restart clock is not reset at ``constant_steps``: with ``t0 = 4``, ``t_mult = 2`` the
    rate at step 780 is that of step 780 of the SGDR schedule, about ``0.45 · base_lr``, and the
    restarts fall on steps 1020, 2044, 4092, …). ``optax.join_schedules`` would restart the clock."""

    def schedule(step):
        return jnp.where(jnp.asarray(step) < constant_steps, jnp.float32(base_lr), restarts(step))

    return schedule


#: the ``optim`` section's options and their defaults (the experiment configs start from these).
DEFAULTS = dict(name="adam_l2", learning_rate=1e-3, weight_decay=1e-4, eps=1e-7, b1=0.9, b2=0.999, momentum=0.9,
                schedule="constant", min_lr=0.0, constant_steps=780, t0=4, t_mult=2, grad_clip=0.0)


#: each numeric option's allowed range: (lowest, highest, whether the lowest is allowed).
RANGES = {"learning_rate": (0.0, float("inf"), False), "weight_decay": (0.0, float("inf"), True),
          "eps": (0.0, float("inf"), False), "b1": (0.0, 1.0, True), "b2": (0.0, 1.0, True),
          "momentum": (0.0, 1.0, True), "min_lr": (0.0, float("inf"), True),
          "constant_steps": (0, float("inf"), True), "t0": (1, float("inf"), True),
          "t_mult": (1, float("inf"), True), "grad_clip": (0.0, float("inf"), True)}
NAMES = ("adam_l2", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "reference")


def check_options(cfg) -> dict:
    """The resolved ``optim`` options, or a ``ValueError`` naming the first option out of its range
    (a learning rate <= 0 would publish an untrained or diverging model; a beta >= 1 never forgets)."""
    o = merge_options(DEFAULTS, cfg, where="optim")
    if o["name"] not in NAMES:
        raise ValueError(f"optim.name={o['name']!r} is not an optimizer; use one of {list(NAMES)}.")
    if o["schedule"] not in SCHEDULES:
        raise ValueError(f"optim.schedule={o['schedule']!r} is not a schedule; use one of {list(SCHEDULES)}.")
    for key, (low, high, low_ok) in RANGES.items():
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"optim.{key} must be a number; got {v!r}.")
        if v < low or (v == low and not low_ok) or v >= high:
            lo = f"{'>=' if low_ok else '>'} {low}"
            hi = "" if high == float("inf") else f" and < {high}"
            raise ValueError(f"optim.{key} must be {lo}{hi}; got {v!r}.")
    if o["min_lr"] > o["learning_rate"]:
        raise ValueError(f"optim.min_lr ({o['min_lr']}) must not exceed optim.learning_rate ({o['learning_rate']}).")
    return o


def make_schedule(cfg, total_steps: int):
    """The learning-rate schedule of an ``optim`` section."""
    o = check_options(cfg)
    lr = float(o["learning_rate"])
    kind, min_lr = o["schedule"], float(o["min_lr"])
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(lr, max(int(total_steps), 1), alpha=min_lr / lr if lr else 0.0)
    if kind == "reference":
        restarts = warm_restarts(lr, t0=int(o["t0"]), t_mult=int(o["t_mult"]), min_lr=min_lr)
        return reference_schedule(lr, restarts, int(o["constant_steps"]))
    raise ValueError(f"unknown schedule {kind!r}; use 'constant', 'cosine' or 'reference'.")


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """The configured optimizer (see the module docstring); options missing from ``cfg`` take
    :data:`DEFAULTS`, unknown ones are refused."""
    o = check_options(cfg)
    schedule = make_schedule(cfg, total_steps)
    name, wd = o["name"], float(o["weight_decay"])
    betas = dict(b1=float(o["b1"]), b2=float(o["b2"]), eps=float(o["eps"]))
    parts = []
    if float(o["grad_clip"]) > 0:
        parts.append(optax.clip_by_global_norm(float(o["grad_clip"])))
    if name == "adam_l2":
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        parts.append(optax.adam(schedule, **betas))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, **betas, weight_decay=wd))
    elif name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd))
        parts.append(optax.sgd(schedule, momentum=float(o["momentum"]) or None))
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adam_l2', 'adamw' or 'sgd'.")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
