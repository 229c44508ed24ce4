"""What depends on the kind of prediction task, decided once from the dataset's ``task`` field.

A :class:`Task` bundles the training loss, the divergence MIPD compares predictions with, the
metrics and which of them headline a table or select a model; its labels are checked by
``mcr_jax.data.checks.LABEL_CHECKS[name]`` (the data layer's, which sits below this module). Code that
needs one of these asks the task (``method.task.loss(...)``, ``task.headline``) instead of testing
the task's name; a new kind of task is one more :class:`Task` in :data:`TASKS` (and its label check
in :mod:`mcr_jax.data.checks`).

- **classification**: ``[B, C]`` logits, int labels in ``[0, C)``; cross-entropy; MIPD by the
  Jensen–Shannon divergence; accuracy headlines and selects.
- **regression**: ``[B, 1]`` outputs, real labels; L1 loss; MIPD by the squared difference; MAE
  headlines, the validation loss selects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax import metrics
from mcr_jax.data.checks import LABEL_CHECKS
from mcr_jax.losses.reduce import masked_mean


def _cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), mask)


def _l1(outputs: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
    return masked_mean(jnp.abs(outputs[:, 0] - labels.astype(outputs.dtype)), mask)


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of prediction task (see the module docstring).

    Attributes:
      name: ``"classification"`` or ``"regression"`` (the dataset's ``DatasetInfo.task``).
      categorical: labels are class indices and outputs logits over ``C`` classes (error groups,
        per-sample-type accuracy and the class-probability rules of OGM-GE, MMCosine, … need it).
      divergence: what MIPD compares the clean and perturbed predictions with
        (:data:`mcr_jax.losses.DIVERGENCES`).
      headline: the test metric that tables, charts and logs report.
      headline_scale, headline_unit, headline_name: how tables and charts print it (accuracy × 100
        as "acc %", "accuracy (%)").
      default_select: the validation metric that selects a model unless ``train.select`` says otherwise.
      selectable: ``{metric: larger is better}`` — the validation metrics a run may select on.
      balance_metric: the per-modality validation score that a balancing rule reads (MSLR).
    """

    name: str
    categorical: bool
    divergence: str
    headline: str
    headline_scale: float
    headline_unit: str
    headline_name: str
    default_select: str
    selectable: Mapping[str, bool]
    balance_metric: str
    _loss: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
    _metrics: Callable[[np.ndarray, np.ndarray], dict]

    def loss(self, outputs: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """The training loss, averaged over the rows where ``mask`` is nonzero (cross-entropy of
        ``[B, C]`` logits and int labels; L1 of ``[B, 1]`` outputs and real labels)."""
        return self._loss(outputs, labels, mask)

    def head_metrics(self, outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, dict[str, float]]:
        """Metrics for every head: ``{"fused": {...}, "<modality>": {...}}`` (host-side NumPy)."""
        return {name: self._metrics(values, labels) for name, values in outputs.items()}

    def selection_metric(self, select: str = "") -> str:
        """``select`` checked against :attr:`selectable`; ``""`` gives :attr:`default_select`."""
        select = select or self.default_select
        if select not in self.selectable:
            raise ValueError(f"train.select={select!r} is not a validation metric of a {self.name} task; use one "
                             f"of {sorted(self.selectable)} (or '' for the default).")
        return select

    def oriented(self, select: str, value: float) -> float:
        """``value`` of validation metric ``select`` (``"loss"`` included) turned so that larger is better."""
        if select == "loss":
            return -float(value)
        return float(value) if self.selectable[select] else -float(value)


CLASSIFICATION = Task(
    name="classification", categorical=True, divergence="jsd", headline="accuracy", headline_scale=100.0,
    headline_unit="acc %", headline_name="accuracy (%)", default_select="accuracy",
    selectable={"accuracy": True, "macro_f1": True, "loss": False, "ece": False, "top5": True},
    balance_metric="accuracy", _loss=_cross_entropy, _metrics=metrics.classification_metrics)

REGRESSION = Task(
    name="regression", categorical=False, divergence="mse", headline="mae", headline_scale=1.0,
    headline_unit="MAE", headline_name="MAE", default_select="loss",
    selectable={"loss": False, "mae": False, "binary_accuracy": True, "corr": True, "acc7": True},
    balance_metric="binary_accuracy", _loss=_l1, _metrics=metrics.regression_metrics)

#: every task by name (the values of ``DatasetInfo.task``).
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, REGRESSION)}
assert set(TASKS) == set(LABEL_CHECKS), "every task needs a label check in mcr_jax.data.checks"


def get_task(task: Any) -> Task:
    """The :class:`Task` of a name (or a ``DatasetInfo``, or a ``Task``); a clear error for others."""
    if isinstance(task, Task):
        return task
    name = getattr(task, "task", task)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}.")
    return TASKS[name]


__all__ = ["CLASSIFICATION", "REGRESSION", "TASKS", "Task", "get_task"]
