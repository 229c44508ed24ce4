"""The trainer's typed state, what a method's step returns, and the helpers that build them.

:class:`TrainState` is the whole training state carried from step to step (one pytree, donated to
the jitted step); :class:`StepOutput` is what :meth:`mcr_jax.methods.Method.gradients` returns.
:func:`split_model` and :func:`init_state` are the one way to get from an NNX model to them (the
trainer, the benchmarks and the tests use them; nothing builds a state by hand).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    - ``params``: the model's ``nnx.Param`` leaves (a pure pytree);
    - ``rest``: the model's other state (batch statistics, dropout RNG streams);
    - ``opt_state``: the optimizer's state; ``method_state``: the method's (running averages…);
    - ``key``: the PRNG key the next step splits; ``step``: steps done (int32);
    - ``epoch``: the current training epoch, 1-based (int32; 0 before the first epoch: the trainer
      sets it before every training epoch, :meth:`mcr_jax.programs.Programs.set_epoch`); the step
      hands it to the method as :attr:`mcr_jax.methods.ModelHandle.epoch`;
    - ``bad_step`` / ``bad_terms``: the first step with a non-finite metric (-1: none) and a
      bit mask of the offending metrics (the trainer reports them once per epoch);
    - ``hparams``: traced hyperparameters ``{option: float32 scalar}`` (empty for an ordinary run;
      in a vectorised grid each run carries its own values, see :mod:`mcr_jax.seeds`).
    """

    params: Any
    rest: Any
    opt_state: Any
    method_state: Any
    key: jax.Array
    step: jax.Array
    epoch: jax.Array
    bad_step: jax.Array
    bad_terms: jax.Array
    hparams: dict = {}


class StepOutput(NamedTuple):
    """What a method's ``gradients(handle, params, batch, key, method_state)`` returns.

    - ``grads``: like ``params``; ``tx_kwargs``: extra keyword arguments for the optimizer's
      ``update`` (e.g. the game's ``mipd_grads``);
    - ``rest``: the model's updated non-parameter state; ``method_state``: the method's new state;
    - ``metrics``: ``{name: scalar}`` logged per step (``loss`` among them).
    """

    grads: Any
    tx_kwargs: dict
    rest: Any
    method_state: Any
    metrics: dict


class ModelParts(NamedTuple):
    """An NNX model split for pure-function training: the two graph definitions (training mode:
    batch statistics and dropout on; evaluation mode) and the pure parameter / other-state trees."""

    graphdef_train: Any
    graphdef_eval: Any
    params: Any
    rest: Any


def split_model(model: nnx.Module) -> ModelParts:
    """Splits ``model`` into :class:`ModelParts` (leaves the model in training mode)."""
    model.eval()
    graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelParts(graphdef_train, graphdef_eval, nnx.as_pure(params), nnx.as_pure(rest))


def init_state(params, rest, tx: optax.GradientTransformation, method, seed: int,
               hparams: dict | None = None) -> TrainState:
    """The state before the first step: fresh optimizer and method state, key from ``seed``;
    ``hparams`` (``{option: value}``) become traced float32 hyperparameters."""
    return TrainState(params=params, rest=rest, opt_state=tx.init(params),
                      method_state=method.init_method_state(params, rest), key=jax.random.PRNGKey(int(seed)),
                      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32), bad_step=-jnp.ones((), jnp.int32),
                      bad_terms=jnp.zeros((), jnp.int32),
                      hparams={k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()})


__all__ = ["ModelParts", "StepOutput", "TrainState", "init_state", "split_model"]
