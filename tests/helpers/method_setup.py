"""Shared set-up of the method tests: a toy batch of the synthetic smoke data and a method bound to
the real model, as the trainer would build them (train- and eval-mode graphs, pure parameters)."""

import copy
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import data as data_lib
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import ModelHandle, get_method
from mcr_jax.models import build_model


@functools.cache
def _load_toy_data(batch_size: int):
    """Loads the smoke data once per batch size; never handed out, only copied (see ``toy_data``)."""
    cfg = synthetic.get_config("smoke")
    data = data_lib.load(cfg.data)
    batch = next(data.batches("train", batch_size, train=True, seed=0, epoch=1))
    return cfg, data.info, {k: jnp.asarray(v) for k, v in batch.items()}


def toy_data(batch_size: int = 16):
    """``(smoke config, DatasetInfo, one training batch as jnp arrays)``.

    The data are loaded once, but every call returns its own copies of the config, the info and the
    batch dict (the arrays themselves are immutable), so that a caller that changes them (``build``
    sets ``cfg.model.fusion``, a test may add a key to the batch) cannot leak into another test."""
    cfg, info, batch = _load_toy_data(batch_size)
    return copy.deepcopy(cfg), copy.deepcopy(info), dict(batch)


def toy_regression_info():
    """The toy data's ``DatasetInfo`` recast as a one-output regression task."""
    _, info, _ = toy_data()
    return DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                       task="regression")


def build(method_cfg, *, fusion="linear", ceb=False, info=None, batch=None, dropout=0.0):
    """``(method, handle, params, batch, model)`` for a method config on the toy data."""
    cfg, dinfo, dbatch = toy_data()
    info = info or dinfo
    batch = dbatch if batch is None else batch
    cfg.model.fusion = fusion
    cfg.model.ceb = ceb
    cfg.model.dropout = dropout
    model = build_model(cfg.model, info, seed=0)
    method = get_method(ml_collections.ConfigDict(method_cfg), info)
    handle, params = bind(method, model)
    return method, handle, params, batch, model


def bind(method, model):
    """Checks ``model`` for ``method`` and splits it as the trainer does: ``(ModelHandle, pure params)``
    (train- and eval-mode graphs; the params are a fresh nested dict the caller may change)."""
    method.check_model(model)
    model.eval()
    gd_eval = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelHandle(gd, gd_eval, nnx.as_pure(rest)), nnx.as_pure(params)


def with_fusion_bias(params):
    """``params`` with a non-zero shared fusion bias (``linspace(-1, 1)``), so that a rule's use of it
    (e.g. ``b / M`` in a modality's branch score) is visible."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.linspace(-1.0, 1.0, x.shape[0]) if jax.tree_util.keystr(p) == "['fusion']['bias']" else x,
        params)


def build_with_fusion_bias(method_cfg, fusion="linear", info=None):
    """``(method, handle, params, batch)`` as ``build``, with ``with_fusion_bias`` applied to the params."""
    method, handle, params, batch, _ = build(method_cfg, fusion=fusion, info=info)
    return method, handle, with_fusion_bias(params), batch
