"""The interface every training strategy implements, and the helpers they share.

A method turns a model and a batch into gradients. The trainer (``mcr_jax.train``) owns the loop,
the data, evaluation and checkpoints; it calls, per step and inside one ``jax.jit``::

    out = method.gradients(handle, params, batch, key, method_state)   # a mcr_jax.state.StepOutput
    updates, opt_state = tx.update(out.grads, opt_state, params, **out.tx_kwargs)

Most methods only write :meth:`Method.loss`; methods that edit gradients (OGM-GE, the game's
optax form, …) override :meth:`Method.gradients`. Host-side hooks (:meth:`on_epoch_end`) let a
method adapt between epochs from validation metrics.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mcr_jax.data.types import DatasetInfo
from mcr_jax.options import merge_options
from mcr_jax.state import StepOutput
from mcr_jax.tasks import Task, get_task


class ModelHandle:
    """Builds NNX models from plain parameter pytrees inside a traced function.

    ``train_model(params)`` merges the training-mode graph (batch statistics, dropout on) with
    ``params`` and the non-parameter state ``rest``; ``eval_model(params)`` merges the
    evaluation-mode graph (running statistics) with the same arrays — the reference's second
    encoder pass uses it. ``rest_of(model)`` reads the updated non-parameter state back.
    ``mesh``: the run's device mesh (None outside the trainer), for methods that place work on
    devices themselves (MCR's device-local permutations). ``epoch``: the current training epoch,
    1-based (an int32 scalar; the trainer's step fills it from ``TrainState.epoch``), for methods
    whose rule depends on the epoch (a window of epochs, a schedule); None outside the trainer, which
    :func:`current_epoch` reads as the first epoch.
    """

    def __init__(self, graphdef_train, graphdef_eval, rest, mesh=None, epoch=None):
        self.graphdef_train = graphdef_train
        self.graphdef_eval = graphdef_eval
        self.rest = rest
        self.mesh = mesh
        self.epoch = epoch

    def train_model(self, params):
        return nnx.merge(self.graphdef_train, params, self.rest)

    def eval_model(self, params):
        return nnx.merge(self.graphdef_eval, params, self.rest)

    @staticmethod
    def rest_of(model):
        return nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))


def current_epoch(handle: ModelHandle) -> jax.Array:
    """The handle's current epoch (1-based, int32 scalar): ``handle.epoch``, or 1 (the first epoch)
    for a handle that carries none (built outside the trainer's step, e.g. by a test)."""
    return jnp.asarray(1 if handle.epoch is None else handle.epoch, jnp.int32)


def model_inputs(batch: Mapping[str, jax.Array], modalities) -> tuple[dict, dict | None]:
    """Splits a batch into ``{modality: x}`` and ``{modality: sequence mask}`` (or None)."""
    inputs = {m: batch[m] for m in modalities}
    masks = {m: batch[f"{m}_mask"] for m in modalities if f"{m}_mask" in batch}
    return inputs, (masks or None)


class EpochContext:
    """What a method's host-side epoch hook may read and change.

    - ``epoch``: the epoch just finished (1-based); ``steps_per_epoch``;
    - ``params`` / ``rest``: current parameters and non-parameter state (pure pytrees);
    - ``replace_params(params)``: install new parameters (e.g. a partial re-initialisation); the
      optimizer state is kept; the trainer reads the new :class:`~mcr_jax.state.TrainState` back
      from ``state``;
    - ``features(split)``: ``({modality: [N, D_m]}, labels [N])`` — the encoders' latents (eval mode)
      over a whole split, padding removed;
    - ``fresh_params(seed)``: the parameters of a newly initialised model (same structure);
    - ``fuse(latents)``: the method's fused prediction (``Method.fuse``, evaluation mode, current
      parameters) of ``{modality: [N, D_m]}`` latents, as a host array ``[N, C]``;
    - ``log(metrics)``: ``{name: float}`` added to this epoch's validation record (``metrics.jsonl``
      ``val``, TensorBoard ``val/``), e.g. a diagnostic computed here;
    - ``graphdef_eval``: the model's evaluation-mode graph definition (``nnx.merge(graphdef_eval,
      params, rest)`` builds the model; None where the caller gives none).
    """

    def __init__(self, *, epoch, steps_per_epoch, state=None, features_fn, fresh_params_fn, fuse_fn=None,
                 graphdef_eval=None, state_fn=None):
        self.epoch = epoch
        self.graphdef_eval = graphdef_eval
        self.steps_per_epoch = steps_per_epoch
        # ``state``, or ``state_fn()`` made when first read (the trainer's hooks of most methods never
        # read it, and taking one run's state out of K stacked runs costs a dispatch per leaf)
        self._state = state
        self._state_fn = state_fn
        #: whether the hook installed new parameters (:meth:`replace_params`)
        self.replaced = False
        self._features_fn = features_fn
        self._fresh_params_fn = fresh_params_fn
        self._fuse_fn = fuse_fn
        #: what the hook logged with :meth:`log` (the trainer adds it to the epoch's ``val`` record).
        self.logged: dict[str, float] = {}

    @property
    def state(self):
        if self._state is None and self._state_fn is not None:
            self._state = self._state_fn()
        return self._state

    @property
    def params(self):
        return self.state.params

    @property
    def rest(self):
        return self.state.rest

    def replace_params(self, params) -> None:
        jax.tree.map(lambda a, b: None, self.state.params, params)  # same structure, or an error
        self._state = self.state._replace(params=params)
        self.replaced = True

    def features(self, split: str):
        return self._features_fn(self.params, self.rest, split)

    def fresh_params(self, seed: int):
        return self._fresh_params_fn(seed)

    def fuse(self, latents):
        if self._fuse_fn is None:
            raise ValueError("this epoch context has no fusion function (the trainer passes fuse_fn).")
        return self._fuse_fn(self.params, self.rest, latents)

    def log(self, metrics) -> None:
        self.logged.update({str(k): float(v) for k, v in dict(metrics).items()})


class Method:
    """Base class: joint training of the fused head (subclasses change the loss or the gradients).

    Args:
      config: the ``method`` section of the experiment config (an ``ml_collections.ConfigDict``).
      info: the dataset's :class:`~mcr_jax.data.types.DatasetInfo`.
    """

    name = "base"
    #: whether the method's prediction is the fused head (False: a unimodal head, see unimodal.py).
    uses_fusion = True
    #: whether the unimodal heads are trained (or pre-trained) and worth reporting; joint training
    #: leaves them at their initialisation, so their accuracy and the error groups would mislead.
    reports_unimodal_heads = False

    # ---- what the orchestrators (mcr_jax.report, mcr_jax.study, mcr_jax.seeds, mcr_jax.engine) ask
    #: whether a run of this method starts from, or combines, its seed's unimodal runs (uni-pre
    #: initialises from them, UMT distils from them): a comparison then trains those first and runs
    #: the method seed by seed, its config naming that seed's unimodal run directories.
    needs_unimodal_runs: bool = False
    #: whether the method trains one modality per run (the unimodal method): a comparison or a study
    #: then makes one run per modality (``unimodal <m>``) instead of one run.
    per_modality: bool = False
    #: whether :meth:`sampling_weights` may return weights (True exactly for the methods overriding
    #: it): the engine asks for them before every training epoch only then.
    gives_sampling_weights: bool = False

    #: continuous options that may be *traced* hyperparameters (a grid of their values then trains
    #: as one vectorised program, see mcr_jax.seeds); read them in traced code with :meth:`hp`.
    traceable: tuple[str, ...] = ()

    def __init__(self, config, info: DatasetInfo):
        #: the traced hyperparameters this instance is bound to (``{option: traced scalar}``; empty
        #: unless the instance is a copy made by :meth:`with_hparams`).
        self.hparams: dict = {}
        self.config = config
        self.info = info
        #: the resolved options: :meth:`option_defaults` updated by the config (unknown keys refused)
        self.opts = merge_options(self.option_defaults(), config, where=f"method {self.name!r}", ignore=("name",))
        self.modalities = tuple(info.modalities)
        #: the :class:`~mcr_jax.tasks.Task` (loss, divergence, metrics) of the dataset.
        self.task = get_task(info.task)

    def require_classes(self, why: str) -> None:
        """A clear ``ValueError`` unless the task is classification (``why``: what needs classes)."""
        if not self.task.categorical:
            raise ValueError(f"{self.name} is defined for classification only ({why}); dataset "
                             f"{self.info.name!r} is a {self.task.name} task.")

    @classmethod
    def option_defaults(cls) -> dict:
        """The method's options and their defaults: its module's ``DEFAULTS`` (or a class attribute
        ``defaults``), defined once there; the experiment configs' ``method`` sections start from them."""
        defaults = getattr(cls, "defaults", None)
        if defaults is None:
            defaults = getattr(sys.modules[cls.__module__], "DEFAULTS", {})
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}

    def require_separable(self, model, why: str) -> None:
        """A clear ``ValueError`` unless the model's fusion head is separable (per-modality branches)."""
        from mcr_jax.models.fusion import is_separable

        if not is_separable(model.fusion):
            raise ValueError(f"{self.name} needs a separable fusion head (e.g. model.fusion = 'linear'): {why}; "
                             f"got {type(model.fusion).__name__}.")

    # ---- traced hyperparameters ---------------------------------------------------------------
    def with_hparams(self, hparams) -> Method:
        """A shallow copy of this method bound to the traced values ``hparams`` (``{option: value}``;
        a traced ``learning_rate`` is the trainer's and is left out): :meth:`hp` and :meth:`tuned` of
        the copy read them. The trainer calls ``method.with_hparams(state.hparams).gradients(...)``
        inside the traced step (as ``optax.inject_hyperparams`` rebuilds its transformation from the
        traced values); the instance itself is left unchanged."""
        hparams = {k: v for k, v in dict(hparams or {}).items() if k != "learning_rate"}
        unknown = set(hparams) - set(self.traceable)
        if unknown:
            raise ValueError(f"{self.name}: options {sorted(unknown)} cannot be traced; traceable: "
                             f"{sorted(self.traceable)} and learning_rate.")
        bound = copy.copy(self)
        bound.hparams = hparams
        return bound

    def hp(self, name: str, static):
        """Option ``name``'s value in traced code: the traced value when this instance is bound to
        one (:meth:`with_hparams`, a study axis), else ``static`` (the configured value, a Python number)."""
        return self.hparams.get(name, static)

    def tuned(self, name: str) -> bool:
        """Whether option ``name`` is traced in this binding (then a term must be computed even when
        its configured weight is 0: another run of the program may weigh it)."""
        return name in self.hparams

    # ---- set-up (host) -----------------------------------------------------------------------
    def vectorizable(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether several runs (seeds, grid points) of this method may share one
        instance in one vectorised program (:mod:`mcr_jax.seeds`), and why not when they may not (the
        reason is logged; empty when ``ok``). Default: they may (everything per-run lives in the
        method state). A method that keeps per-run configuration on the instance, or whose step
        cannot be stacked, returns ``(False, reason)``."""
        return True, ""

    def earliest_stop_epoch(self) -> int:
        """The first epoch after which early stopping may end the run (default 0: any epoch).

        A method with a schedule (e.g. ReconBoost, which trains one modality per stage) returns the
        epoch by which every part of the model has been trained at least once; the trainer keeps
        counting epochs without improvement but does not stop before this epoch."""
        return 0

    def check_model(self, model) -> None:
        """Raise a clear error when the model cannot serve this method (called once per model).

        Only checks: the method keeps nothing of the model on the instance (one instance may serve
        models of different shapes); what it needs of the model's structure it reads from the
        parameters (:meth:`init_method_state`), the :class:`ModelHandle` inside traced code, or the
        :class:`EpochContext` in host hooks."""

    def make_optimizer(self, base: optax.GradientTransformation, params) -> optax.GradientTransformation:
        """Wraps the configured optimizer if the method needs to (default: unchanged)."""
        return base

    def init_method_state(self, params, rest=None) -> Any:
        """Method-specific state carried through the steps (running averages, coefficients…).

        ``params`` / ``rest``: the model's starting parameters and non-parameter state (pure pytrees;
        the trainer passes both, most methods read neither)."""
        return {}

    # ---- inside jit --------------------------------------------------------------------------
    def forward(self, model, batch):
        inputs, masks = model_inputs(batch, self.modalities)
        return model(inputs, masks)

    def loss(self, handle: ModelHandle, params, batch, key, method_state):
        """``(scalar loss, {term: scalar}, model)`` for one batch (default: the fused task loss).

        The model is built with ``handle.train_model(params)``; it is returned so that the
        trainer can read its updated batch statistics.
        """
        model = handle.train_model(params)
        out = self.forward(model, batch)
        loss = self.task.loss(out["logits"], batch["label"], batch.get("mask"))
        return loss, {"task": loss}, model

    def gradients(self, handle: ModelHandle, params, batch, key, method_state) -> StepOutput:
        """Returns a :class:`~mcr_jax.state.StepOutput` (grads, tx_kwargs, rest, method_state, metrics)."""

        def fn(p):
            loss, metrics, model = self.loss(handle, p, batch, key, method_state)
            return loss, (metrics, handle.rest_of(model))

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        metrics = dict(metrics, loss=loss)
        return StepOutput(grads, {}, new_rest, method_state, metrics)

    def fuse(self, model, latents: Mapping[str, jax.Array]) -> jax.Array:
        """The method's fused prediction from latents (``{m: [N, D_m]}`` → ``[N, C]``); the trainer's
        MIPD diagnostic permutes latents through it. Methods with their own fusion override it."""
        return model.fuse(latents)

    def predict(self, model, batch) -> dict[str, Any]:
        """Evaluation outputs: ``logits [B, C]`` (the method's prediction) and ``unimodal`` heads."""
        out = self.forward(model, batch)
        return {"logits": out["logits"], "unimodal": out["unimodal"], "latents": out["latents"]}

    # ---- host hooks --------------------------------------------------------------------------
    def sampling_weights(self, method_state):
        """Per-example sampling weights of the next training epoch (float ``[N_train]``,
        nonnegative, not all zero), or None (the default) for the ordinary shuffled epoch.

        Called by the trainer on the host before each training epoch with that epoch's method
        state (one seed's, in a vectorised run); the epoch's rows are then drawn with replacement
        ``∝ weights`` (:func:`mcr_jax.data.layout.example_order`).
        """
        del method_state
        return None

    def on_epoch_end(self, epoch: int, val_metrics: Mapping[str, Any], method_state, ctx: EpochContext):
        """Called after each epoch's validation, before the checkpoint is written.

        Returns the method state for the next epoch: the same pytree structure, shapes and dtypes
        (it lives inside the jitted step's state). ``ctx`` gives access to the model's parameters
        and features (see :class:`EpochContext`); a method may replace the parameters there.
        """
        return method_state


def unimodal_losses(out, batch, task: Task, modalities) -> dict[str, jax.Array]:
    """``{m: task loss of unimodal head m}`` over the batch's valid rows."""
    return {m: task.loss(out["unimodal"][m], batch["label"], batch.get("mask")) for m in modalities}
