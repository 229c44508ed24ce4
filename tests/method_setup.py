"""Shared set-up of the method tests: a toy batch of the synthetic smoke data and a method bound to
the real model, as the trainer would build them (train- and eval-mode graphs, pure parameters)."""

import functools

import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import inputs
from mcr_jax.methods import ModelHandle, get_method


@functools.cache
def toy_data(batch_size: int = 16):
    """``(smoke config, DatasetInfo, one training batch as jnp arrays)``."""
    cfg = synthetic.get_config("smoke")
    data = inputs.load(cfg.data)
    batch = next(data.batches("train", batch_size, train=True, seed=0, epoch=1))
    return cfg, data.info, {k: jnp.asarray(v) for k, v in batch.items()}


def build(method_cfg, *, fusion="linear", ceb=False, info=None, batch=None, dropout=0.0):
    """``(method, handle, params, batch, model)`` for a method config on the toy data."""
    cfg, dinfo, dbatch = toy_data()
    info = info or dinfo
    batch = dbatch if batch is None else batch
    cfg.model.fusion = fusion
    cfg.model.ceb = ceb
    cfg.model.dropout = dropout
    model = inputs.build_model(cfg.model, info, seed=0)
    method = get_method(ml_collections.ConfigDict(method_cfg), info)
    method.check_model(model)
    model.eval()
    gd_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    return method, ModelHandle(gd, gd_eval, nnx.as_pure(rest)), nnx.as_pure(params), batch, model
