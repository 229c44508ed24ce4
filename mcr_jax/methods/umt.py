r"""UMT: Uni-Modal Teacher (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao: "On Uni-Modal Feature
Learning in Supervised Multi-Modal Learning", ICML 2023, arXiv 2305.01233; first as "Improving
Multi-Modal Learning with Uni-Modal Teachers", arXiv 2106.11059).

Code followed: the BalanceBenchmark re-implementation, ``GeWu-Lab/BalanceBenchmark`` at commit
``4c1482fca5aaa8d4278af8e26020daa039e3ccf3``: ``balancemm/trainer/UMT_trainer.py``
(``UMTTrainer.__init__`` lines 26-53: one frozen uni-modal model per modality, loaded from that
modality's ``unimodalTrainer_<m>`` run; ``UMTTrainer.training_step`` lines 129-147: the loss) and
its defaults in ``configs/trainer_config.yaml`` (``UMT: scaling 10, modulation_starts 0,
modulation_ends 80``). No release by the paper's authors was found in the searchable index (their
repositories there are unrelated), so the BalanceBenchmark code is the reference.

The rule
--------
Every modality ``m`` has a *teacher*: the encoder :math:`\phi^T_m` of a separately trained
uni-modal model, frozen. The multi-modal model (encoders :math:`\phi_m`, fusion head) is trained on

.. math::
   L = \mathrm{CE}(\ell, y) + \lambda\,[\,e_0 \le e \le e_1\,]\sum_m
       \frac{1}{B D_m}\sum_{b=1}^{B}\sum_{d=1}^{D_m}\big(\phi^T_m(x_{m,b})_d - \phi_m(x_{m,b})_d\big)^2

:math:`\ell` the fused logits, :math:`\phi_m(x_m)` the encoder's latent ``[B, D_m]`` (the release's
``encoder_result[m]``: the pooled encoder output fed to the fusion), ``λ`` = ``distill_weight``
(the release's ``scaling``), :math:`e` the epoch; the distillation term is a PyTorch ``MSELoss``
(mean over batch and features) per modality, summed over modalities. Teachers get no gradient and
no update. The prediction is the fused head (the unimodal heads are not trained, as in the release).

UME (the paper's other method: Uni-Modal Ensemble) trains one uni-modal model per modality
separately and combines their predictions; as we read the paper, it averages the uni-modal
models' output *logits* (no code for UME was found: BalanceBenchmark has no UME trainer, and no
release by the authors is in the index, so this reading is not checked against code). In this
library it is the
orchestrated ``ensemble`` method with ``mode = "logits"`` (:func:`mcr_jax.methods.ensemble.combine_logits`:
the mean of the raw logits, a mode added for UME; the other modes standardise the logits or average
probabilities, which is not UME).

Options (``DEFAULTS``)
----------------------
- ``teachers``: ``{modality: workdir of a finished unimodal run}`` (``method.name = "unimodal"``,
  ``method.modality = m``), one per modality; required (a run without it fails when its state is
  built, before any compilation; a partial mapping is refused when the method is built). The
  teachers' encoder parameters (and their non-parameter state: batch-norm statistics) are read from
  each run's selected (best) checkpoint by :meth:`UMT.init_method_state` and live in the method
  state, so they are checkpointed with the run and a resumed run uses exactly the same teachers.
- ``distill_weight`` 10.0: the release's ``scaling: 10``. Traceable (a study may trace it).
- ``start_epoch`` 1, ``end_epoch`` 81: the distillation window in the trainer's 1-based epochs,
  both ends inclusive: the release's 0-based ``modulation_starts 0 <= current_epoch <= modulation_ends 80``.
- ``teacher_mode`` ``"train"``: the teachers run in training mode, as in the release (the loaded
  teacher models are never switched to ``eval()``): batch norm normalises with the current batch's
  statistics. ``"eval"``: evaluation mode (the teacher run's running statistics, no dropout).

Differences from the release (all of them)
------------------------------------------
- Teacher weights: the unimodal run's *selected* (best-validation) weights, as ``uni_pre`` uses
  them; the release loads ``get_checkpoint_files(get_newest_path(...))[0]``, the first checkpoint
  file (sorted by name) of the newest run folder of ``unimodalTrainer_<m>``.
- Teacher architecture: the teacher encoder has the student's architecture (our unimodal runs
  train the full multi-modal model's encoder ``m``); the release builds a one-modality model with
  the same encoder config, so this is the same in practice.
- ``teacher_mode="train"``: batch norm as in the release; the release's teacher also updates its
  own running statistics, which never influence its training-mode output (here they are discarded).
  With dropout in the encoders the teacher's dropout draws the same masks as the student's pass of
  that step (the release draws independent ones); the release's encoders have no dropout.
- Padding rows (``batch["mask"] == 0``) are left out of both terms (the release has no padding):
  the distillation term is the mean over valid rows of the per-row mean over features.
- The release's config key ``alpha: 1`` for UMT is never read by its trainer; it has no
  counterpart here.
- The distilled feature is our encoder's output latent ``z_m`` (after the encoder's own output
  projection, when it has one), the input of the fusion head, as the release's ``encoder_result[m]``.
- Any number of modalities (the release: as many as its model has; the same).

Seeds: not vectorisable (:meth:`UMT.vectorizable`): each seed's config names its own teachers, and a vectorised
program shares one method instance (one ``teachers`` option) between its seeds, so the seeds of a
UMT comparison run one by one (as ``uni_pre``'s do).

Classification and regression: the task loss is the dataset task's (the release: cross-entropy).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from mcr_jax.losses import masked_mean
from mcr_jax.methods.base import Method, current_epoch, model_inputs
from mcr_jax.state import StepOutput

DEFAULTS = dict(teachers={}, distill_weight=10.0, start_epoch=1, end_epoch=81, teacher_mode="train")
#: the tuning grid of a study (mcr_jax.study): around the release's ``scaling 10``.
GRID = dict(distill_weight=[1.0, 3.0, 10.0, 30.0])
TEACHER_MODES = ("train", "eval")


def distill_loss(student, teacher, mask=None):
    """``MSELoss`` between teacher and student latents ``[B, D]``: the mean over valid rows (``mask``
    ``[B]``, 0 = padding) of the per-row mean squared difference; no gradient reaches ``teacher``."""
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    per_row = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
    return masked_mean(per_row, mask)


def teacher_state(encoder_params, encoder_rest) -> dict:
    """The method state's teacher part from ``{m: encoder params}`` and ``{m: encoder non-param state}``
    (copies; the trainer and the tests fill it the same way)."""
    copy = lambda t: jax.tree.map(jnp.array, t)
    return {"params": copy(dict(encoder_params)), "rest": copy(dict(encoder_rest))}


class UMT(Method):
    """Fused task loss + ``distill_weight`` × Σ_m MSE(student latent m, frozen teacher latent m)."""

    name = "umt"
    traceable = ("distill_weight",)
    #: the teachers are this seed's unimodal runs.
    needs_unimodal_runs = True

    def __init__(self, config, info):
        super().__init__(config, info)
        o = self.opts
        teachers = dict(o["teachers"] or {})
        missing = [m for m in self.modalities if m not in teachers]
        extra = [m for m in teachers if m not in self.modalities]
        if teachers and (missing or extra):
            raise ValueError(f"method.teachers must name one unimodal run workdir per modality "
                             f"{list(self.modalities)}: missing {missing}, unexpected {extra}.")
        if o["teacher_mode"] not in TEACHER_MODES:
            raise ValueError(f"method.teacher_mode must be one of {TEACHER_MODES}; got {o['teacher_mode']!r}.")
        if int(o["start_epoch"]) < 1 or int(o["end_epoch"]) < int(o["start_epoch"]) - 1:
            raise ValueError(f"method.start_epoch must be >= 1 and end_epoch >= start_epoch - 1; got "
                             f"{o['start_epoch']} and {o['end_epoch']}.")
        #: ``{modality: workdir}``; empty: no teachers configured (an error when training starts, see
        #: :meth:`init_method_state`; the tests give teacher parameters directly with :func:`teacher_state`).
        self.teachers = {m: str(teachers[m]) for m in self.modalities} if teachers else {}

    # ---- set-up (host) -----------------------------------------------------------------------
    def vectorizable(self) -> tuple[bool, str]:
        """Not vectorisable: each seed has its own teachers (its own unimodal runs, named in its
        config); a vectorised program shares one method instance, and with it one ``teachers`` option."""
        return False, f"method {self.name!r} keeps per-run state outside its method state (each seed's teachers)"

    def load_teachers(self, params, rest) -> dict:
        """``teacher_state`` of the selected weights of the unimodal runs in ``method.teachers``."""
        from mcr_jax.checkpoint import load_pretrained

        for m, wd in self.teachers.items():
            wd = os.path.expanduser(wd)
            if not os.path.exists(os.path.join(wd, "results.json")):
                raise FileNotFoundError(
                    f"umt: method.teachers[{m!r}] = {wd} holds no finished unimodal run (no results.json); train "
                    f"it first (method.name=unimodal, method.modality={m}).")
        if rest is None:
            raise ValueError("umt: init_method_state(params, rest) needs the model's non-parameter state (the "
                             "template of the teachers' checkpoints; the trainer passes it).")
        loaded, loaded_rest = load_pretrained(params, rest, self.teachers, self.modalities)
        enc_rest = loaded_rest["encoders"] if "encoders" in loaded_rest else {}
        return teacher_state({m: loaded["encoders"][m] for m in self.modalities},
                             {m: enc_rest[m] if m in enc_rest else {} for m in self.modalities})

    def init_method_state(self, params, rest=None):
        """The frozen teachers, read from the
        unimodal runs' checkpoints (``method.teachers``); ``params`` / ``rest`` (the model's starting
        state, which the trainer passes) are the templates the checkpoints are read into."""
        if not self.teachers:
            raise ValueError("method 'umt' needs method.teachers = {modality: unimodal run workdir} (one finished "
                             "'unimodal' run per modality); the compare command fills it from its unimodal runs.")
        teachers = self.load_teachers(params, rest)  # checks the workdirs before reading
        return {"teachers": teachers}

    # ---- inside jit --------------------------------------------------------------------------
    def teacher_latents(self, handle, params, batch, teachers) -> dict:
        """``{m: φ^T_m(x_m)}``: the student's model with every encoder's parameters replaced by the
        teacher's (and, in evaluation mode, its batch statistics by the teacher's), no gradient."""
        tp = jax.tree.map(lambda x: x, params)  # a new container; the arrays are shared
        for m in self.modalities:
            tp["encoders"][m] = teachers["params"][m]
        tp = jax.lax.stop_gradient(tp)
        if self.opts["teacher_mode"] == "eval":
            rest = jax.tree.map(lambda x: x, handle.rest)  # a new container; the arrays are shared
            for m in self.modalities:
                if "encoders" in rest and m in rest["encoders"]:
                    rest["encoders"][m] = teachers["rest"][m]
            model = nnx.merge(handle.graphdef_eval, tp, rest)
        else:
            model = nnx.merge(handle.graphdef_train, tp, handle.rest)
        inputs, masks = model_inputs(batch, self.modalities)
        return jax.lax.stop_gradient(model.encode(inputs, masks))

    def gradients(self, handle, params, batch, key, method_state):
        o, mask = self.opts, batch.get("mask")
        epoch = current_epoch(handle)
        active = (epoch >= int(o["start_epoch"])) & (epoch <= int(o["end_epoch"]))
        weight = self.hp("distill_weight", float(o["distill_weight"]))
        targets = self.teacher_latents(handle, params, batch, method_state["teachers"])

        def fn(p):
            model = handle.train_model(p)
            out = self.forward(model, batch)
            task = self.task.loss(out["logits"], batch["label"], mask)
            dist = {m: distill_loss(out["latents"][m], targets[m], mask) for m in self.modalities}
            total = task + jnp.where(active, weight, 0.0) * sum(dist.values())
            return total, ({"task": task, **{f"distill_{m}": v for m, v in dist.items()}}, handle.rest_of(model))

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(fn, has_aux=True)(params)
        metrics = dict(metrics, distill=sum(metrics[f"distill_{m}"] for m in self.modalities),
                       distill_active=active.astype(jnp.float32), loss=loss)
        return StepOutput(grads, {}, new_rest, method_state, metrics)

