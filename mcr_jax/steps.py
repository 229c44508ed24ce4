"""The jitted pieces of training: one step, one whole epoch over device-resident data, evaluation.

Pure functions of the typed state (:class:`mcr_jax.state.TrainState`); :mod:`mcr_jax.train` jits
them with the mesh's shardings and owns the loop around them.

- :func:`make_train_step`: ``(state, batch) -> (state, metrics)``. A non-finite metric leaves the
  state unchanged and records the step and the offending terms (the trainer checks them once per
  epoch).
- :func:`make_epoch_fn`: ``(state, arrays, rows) -> (state, metrics [steps])``: a whole training
  epoch over a split held on the device, as **one call**: ``lax.scan`` runs the same step over the
  batches gathered on the device from ``rows`` (``[steps, B]`` example indices, a few KB). The
  trainer passes the host pipeline's order (``Dataset.batch_layout``), so a compiled epoch sees
  exactly the batches of the streamed loop — the same results whichever engine runs, and a
  multi-process run (which streams) still matches a single-process one. Host work per epoch: a
  constant number of dispatches. Used for in-memory datasets; streamed ones use the step loop.
- :func:`make_eval_step` / :func:`make_eval_fn`: predictions, per-example-weighted loss and the
  MIPD balance diagnostic of one batch, or of a whole device-resident split in one call (the same
  padded batches as the host pipeline: the last batch repeats example 0 with mask 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcr_jax.data.types import INDEX_KEY
from mcr_jax.losses import mipd_divergences, sample_permutations
from mcr_jax.methods.base import ModelHandle
from mcr_jax.state import StepOutput, TrainState

#: the key of the evaluation MIPD diagnostic's permutations (folded with the batch index).
EVAL_PERMUTATION_SEED = 0


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def make_train_step(method, tx, graphdef_train, graphdef_eval, metric_names, base_learning_rate: float = 0.0, *,
                    mesh=None):
    """``(state, batch) -> (state, metrics)`` for one batch (see the module docstring).

    Traced hyperparameters (``state.hparams``) reach the method as a value: the step calls
    ``method.with_hparams(state.hparams)`` (:meth:`Method.with_hparams`, a bound copy); a
    traced ``learning_rate`` scales the optimizer's updates by ``learning_rate / base_learning_rate``
    (every optimizer here is linear in its learning rate, so this is training at that rate, the
    whole schedule scaled). ``mesh`` reaches the method through the :class:`ModelHandle`."""

    def step(state: TrainState, batch):
        key, sub = jax.random.split(state.key)
        handle = ModelHandle(graphdef_train, graphdef_eval, state.rest, mesh, epoch=state.epoch)
        bound = method.with_hparams(state.hparams)
        out = StepOutput(*bound.gradients(handle, state.params, batch, sub, state.method_state))
        mets = dict(out.metrics, grad_norm=optax.tree.norm(out.grads))
        updates, new_opt = tx.update(out.grads, state.opt_state, state.params, **out.tx_kwargs)
        if "learning_rate" in state.hparams:
            if not base_learning_rate > 0:
                raise ValueError("a traced learning rate needs optim.learning_rate > 0 (it scales the updates).")
            ratio = state.hparams["learning_rate"] / base_learning_rate
            updates = jax.tree.map(lambda u: u * ratio.astype(u.dtype), updates)
        new_params = optax.apply_updates(state.params, updates)
        bad = jnp.stack([~jnp.all(jnp.isfinite(mets[n])) for n in metric_names])
        ok = ~jnp.any(bad)
        keep = lambda new, old: jax.tree.map(lambda a, b: a if _is_key(a) else jnp.where(ok, a, b), new, old)  # noqa: E731
        first = state.bad_step < 0
        new_state = TrainState(
            params=keep(new_params, state.params),
            rest=keep(out.rest, state.rest),
            opt_state=keep(new_opt, state.opt_state),
            method_state=keep(out.method_state, state.method_state),
            key=key,
            step=state.step + 1,
            epoch=state.epoch,
            bad_step=jnp.where(first & ~ok, state.step, state.bad_step),
            bad_terms=jnp.where(first & ~ok, jnp.sum(bad.astype(jnp.int32) << jnp.arange(len(metric_names))),
                                state.bad_terms),
            hparams=state.hparams,
        )
        return new_state, mets

    return step


def gather_batch(arrays: dict, rows: jax.Array, mask: jax.Array | None = None, base=None) -> dict:
    """``{k: v[base + rows]}`` plus the ``mask`` column (all ones unless given) and the ``index``
    column (``rows``: each row's example index in the split), as the host pipeline's batches.
    ``base``: where the split starts in ``arrays`` (several splits held in one set of arrays)."""
    where = rows if base is None else base + rows
    batch = {k: v[where] for k, v in arrays.items()}
    batch["mask"] = jnp.ones(rows.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    batch[INDEX_KEY] = rows.astype(jnp.int32)
    return batch


def make_epoch_fn(step, *, batch_sharding=None):
    """``(state, arrays, rows) -> (state, {metric: [steps]})``: one epoch as one ``lax.scan`` over
    the batches ``{k: arrays[k][rows[i]]}`` (``rows``: ``[steps, B]`` int32)."""

    def epoch(state, arrays, rows):
        def body(state, rows):
            batch = gather_batch(arrays, rows)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return step(state, batch)

        return jax.lax.scan(body, state, rows)

    return epoch


def make_eval_step(method, graphdef_eval, num_samples: int):
    """``(params, rest, batch, index) -> outputs``: predictions and a MIPD balance diagnostic per
    modality over the batch's valid rows.

    The diagnostic draws ``num_samples`` fresh derangements of the valid rows per batch, from a
    fixed key folded with the batch's ``index`` in the split: deterministic (every model is scored
    with the same permutations), never the identity, and padded rows take no part."""

    def step(params, rest, batch, index, hparams=None):
        model = nnx.merge(graphdef_eval, params, rest)
        return _scored(method.with_hparams(hparams), model, batch, index)

    def _scored(method, model, batch, index):
        out = method.predict(model, batch)
        res = {"logits": out["logits"], "unimodal": out["unimodal"],
               "loss": method.task.loss(out["logits"], batch["label"], batch["mask"])}
        if method.uses_fusion and num_samples > 0:
            names = method.modalities
            valid = batch["mask"] > 0
            key = jax.random.fold_in(jax.random.PRNGKey(EVAL_PERMUTATION_SEED), index)
            perms = sample_permutations(key, num_samples, batch["label"].shape[0], valid=valid)
            res["mipd"] = mipd_divergences(
                out["logits"], lambda xs: method.fuse(model, dict(zip(names, xs, strict=True))),
                [out["latents"][m] for m in names], perms, mask=valid,
                divergence=method.task.divergence)
        return res

    return step


def eval_layout(num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """``(rows, mask)``, each ``[num_batches, batch_size]``: the evaluation batches of a split, the
    last one padded with example 0 and mask 0 (the host pipeline's layout)."""
    nb = -(-num_examples // batch_size)
    flat = jnp.arange(nb * batch_size)
    valid = flat < num_examples
    return jnp.where(valid, flat, 0).reshape(nb, batch_size), valid.reshape(nb, batch_size)


def make_eval_fn(eval_step, *, batch_sharding=None):
    """``(params, rest, arrays, hparams, rows, mask, first, base) -> outputs`` with a leading
    ``[num_batches]`` axis (plus ``mask`` and ``label``): the batches ``arrays[base + rows[i]]``
    (``rows``, ``mask``: ``[num_batches, B]``; ``rows`` the examples' indices in their split,
    ``base`` where the split starts in ``arrays``) in one call, batch ``i`` scored as
    ``eval_step(..., first + i)``.

    The layout is an argument, not a constant of the program, so one compiled program scores any
    split whose arrays it is given in chunks of the same ``[num_batches, B]`` shape (the trainer
    scores validation and test with one program; :func:`eval_layout` gives a split's layout)."""

    def run(params, rest, arrays, hparams, rows, mask, first, base):
        return scan_split(lambda batch, i: eval_step(params, rest, batch, i, hparams), arrays, rows, mask, first,
                          base, batch_sharding=batch_sharding)

    return run


def scan_split(fn, arrays, rows, mask, first, base, *, batch_sharding=None):
    """``fn(batch, index)`` for every batch ``arrays[base + rows[i]]`` of a device-resident split
    (``rows``, ``mask``: ``[num_batches, B]``; batch ``i`` has index ``first + i``), in one
    ``lax.scan``: its outputs with a leading ``[num_batches]`` axis, plus ``mask`` and ``label``."""

    def body(_, xs):
        i, r, m = xs
        batch = gather_batch(arrays, r, m, base)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return None, dict(fn(batch, i), mask=batch["mask"], label=batch["label"])

    index = first + jnp.arange(rows.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, None, (index, rows, mask))[1]


__all__ = ["EVAL_PERMUTATION_SEED", "eval_layout", "gather_batch", "make_epoch_fn", "make_eval_fn",
           "make_eval_step", "make_train_step", "scan_split"]
