"""UMT tests: the distillation term against NumPy, the released loss, frozen teachers, a smoke run
through the trainer with teachers from unimodal runs, and the configuration errors; UME's ensemble mode.

Golden reference: GeWu-Lab/BalanceBenchmark (commit 4c1482fca5aaa8d4278af8e26020daa039e3ccf3),
``balancemm/trainer/UMT_trainer.py``, ``UMTTrainer.training_step`` (lines 129-147)::

    criterion = nn.CrossEntropyLoss(); MSE = nn.MSELoss()
    _ = model(batch=batch); out = model.encoder_result['output']
    loss = criterion(out, label)
    if self.modulation_starts <= self.current_epoch <= self.modulation_ends:
        for modality in self.loaded_model.keys():
            with torch.no_grad():
                self.loaded_model[modality](batch)
            out_unimodal = self.loaded_model[modality].encoder_result[modality]
            loss += self.scaling * MSE(out_unimodal, model.encoder_result[modality])

transcribed below into NumPy (value) and JAX (gradients, ``jax.grad`` of the same formula), with the
teachers' features computed by a *second* model's own forward pass; nothing of
``mcr_jax.methods.umt`` is used in the reference. UME (the paper's uni-modal ensemble: the mean of the
uni-modal models' logits) is checked against ``combine_logits(..., "logits")``.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import synthetic
from mcr_jax.methods import combine_logits, get_method
from mcr_jax.methods.umt import distill_loss, teacher_state
from mcr_jax.models import build_model
from mcr_jax.train import train_and_evaluate
from tests.helpers.method_checks import NAMES, assert_trees_close, at_epoch, ce, cross_entropy, f64, leaves
from tests.helpers.method_checks import inputs as _inputs
from tests.helpers.method_setup import build, toy_data

SCALING = 10.0  # the release's trainer_config.yaml UMT scaling


def _teacher_model():
    """A second tiny model (seed 1): its encoders are the teachers."""
    cfg, info, _ = toy_data()
    cfg.model.fusion = "linear"
    return build_model(cfg.model, info, seed=1)


def _state(teacher):
    from flax import nnx

    params = nnx.as_pure(nnx.split(teacher, nnx.Param, ...)[1])
    return {"teachers": teacher_state({m: params["encoders"][m] for m in NAMES}, {m: {} for m in NAMES})}


def _step(method, handle, params, batch, state, epoch=1):
    """One jitted step in (1-based) epoch ``epoch`` (the trainer's, through the handle)."""
    return jax.jit(lambda p, b, s, e: method.gradients(at_epoch(handle, e), p, b, jax.random.PRNGKey(0), s))(
        params, batch, state, jnp.int32(epoch))


# ---- (a) the distillation term against a slow float64 NumPy version ----------------------------------------


def test_distill_loss_matches_numpy_with_padding():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    total, n = 0.0, 0
    for b in range(6):
        if mask[b]:
            total += sum((float(s[b, d]) - float(t[b, d])) ** 2 for d in range(5)) / 5
            n += 1
    np.testing.assert_allclose(float(distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))), total / n,
                               rtol=1e-6)
    full = np.mean((f64(s) - f64(t)) ** 2)  # nn.MSELoss(): mean over every element
    np.testing.assert_allclose(float(distill_loss(jnp.asarray(s), jnp.asarray(t))), full, rtol=1e-6)
    g = jax.grad(lambda t_: distill_loss(jnp.asarray(s), t_))(jnp.asarray(t))
    assert float(jnp.abs(g).sum()) == 0.0  # no gradient reaches the teacher


# ---- (b) golden: the released loss and its gradients; teachers frozen; the window -------------------------


def _release_loss_numpy(logits, labels, student, teacher):
    """UMTTrainer.training_step in float64 NumPy (all rows valid)."""
    loss = ce(logits, labels)
    for m in NAMES:
        loss += SCALING * float(np.mean((f64(teacher[m]) - f64(student[m])) ** 2))
    return loss


def test_umt_loss_and_gradients_match_the_release():
    method, handle, params, batch, _ = build({"name": "umt"})
    teacher = _teacher_model()
    teacher.eval()
    t_lat = {m: jax.lax.stop_gradient(v) for m, v in teacher.encode(_inputs(batch)).items()}
    labels = batch["label"]
    assert float(batch["mask"].min()) == 1.0  # the release has no padding rows

    out = _step(method, handle, params, batch, _state(teacher))
    fwd = handle.train_model(params)(_inputs(batch))
    want = _release_loss_numpy(fwd["logits"], labels, fwd["latents"], t_lat)
    np.testing.assert_allclose(float(out.metrics["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["task"]), ce(fwd["logits"], labels), rtol=1e-5)
    for m in NAMES:
        np.testing.assert_allclose(float(out.metrics[f"distill_{m}"]),
                                   np.mean((f64(t_lat[m]) - f64(fwd["latents"][m])) ** 2), rtol=1e-5)

    def release_jax(p):
        o = handle.train_model(p)(_inputs(batch))
        loss = cross_entropy(o["logits"], labels)
        for m in NAMES:
            loss = loss + SCALING * jnp.mean((t_lat[m] - o["latents"][m]) ** 2)
        return loss

    assert_trees_close(out.grads, jax.grad(release_jax)(params), rtol=1e-4)
    # the unimodal heads are outside the loss (as in the release): no gradient
    assert all(float(np.abs(g).sum()) == 0.0 for path, g in leaves(out.grads) if path.startswith("['heads']"))


def test_teachers_are_frozen_and_the_window_switches_distillation_off():
    method, handle, params, batch, _ = build({"name": "umt", "start_epoch": 2, "end_epoch": 3})
    state = _state(_teacher_model())
    out = _step(method, handle, params, batch, state, epoch=2)
    # the method state (the teachers) comes back unchanged, and no gradient reaches it
    for (pa, a), (pb, b) in zip(leaves(out.method_state), leaves(state), strict=True):
        assert pa == pb and np.array_equal(a, b)
    g = jax.grad(lambda t: _step(method, handle, params, batch, {"teachers": t}, epoch=2)
                 .metrics["loss"])(state["teachers"])
    assert sum(float(np.abs(x).sum()) for _, x in leaves(g)) == 0.0
    assert float(out.metrics["distill_active"]) == 1.0 and float(out.metrics["loss"]) > float(out.metrics["task"])
    # outside the window (epochs 1 and 4): the joint loss and its gradients
    joint = get_method(ml_collections.ConfigDict({"name": "joint"}), toy_data()[1])
    ref = _step(joint, handle, params, batch, {})
    for epoch in (1, 4):
        off = _step(method, handle, params, batch, state, epoch=epoch)
        assert float(off.metrics["distill_active"]) == 0.0
        np.testing.assert_allclose(float(off.metrics["loss"]), float(off.metrics["task"]), rtol=1e-7)
        assert_trees_close(off.grads, ref.grads, rtol=1e-6)
    # the epoch hook keeps the teachers (the epoch is the trainer's)
    nxt = method.on_epoch_end(2, {}, state, None)
    assert nxt["teachers"] is state["teachers"] and "epoch" not in nxt


def test_eval_teacher_mode_gives_the_teachers_eval_features():
    method, handle, params, batch, _ = build({"name": "umt", "teacher_mode": "eval"})
    teacher = _teacher_model()
    teacher.eval()
    got = jax.jit(lambda p, b, s: method.teacher_latents(handle, p, b, s["teachers"]))(params, batch, _state(teacher))
    for m, z in teacher.encode(_inputs(batch)).items():
        np.testing.assert_allclose(np.asarray(got[m]), np.asarray(z), rtol=1e-6, atol=1e-6)


def test_ume_is_the_ensemble_logits_mode():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(7, 4)) * 3
    np.testing.assert_allclose(combine_logits([a, b], "logits"), (a + b) / 2, rtol=1e-12)  # UME: mean of logits


def test_ume_probability_average_beside_it():
    """The other reading of UME (no release confirms either): ``mode="probs"``, the log of the mean of the
    models' softmax probabilities, against a NumPy paraphrase; with unequal logit scales the two readings
    predict differently on some rows."""
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(200, 5)), rng.normal(size=(200, 5)) * 6, rng.normal(size=(200, 5)) * 0.3

    def probs(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    want = np.log((probs(a) + probs(b) + probs(c)) / 3)
    got = combine_logits([a, b, c], "probs")
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert (got.argmax(1) != combine_logits([a, b, c], "logits").argmax(1)).any()


# ---- (c) a smoke run through the trainer, teachers from two unimodal runs ----------------------------------


@pytest.fixture(scope="module")
def unimodal_runs(tmp_path_factory):
    """Two 2-epoch unimodal smoke runs (one per modality): the teachers' workdirs."""
    root = tmp_path_factory.mktemp("umt_teachers")
    dirs = {}
    for m in NAMES:
        cfg = synthetic.get_config("smoke")
        cfg.method = ml_collections.ConfigDict({"name": "unimodal", "modality": m})
        dirs[m] = str(root / f"unimodal_{m}")
        train_and_evaluate(cfg, dirs[m])
    return dirs


def _umt_config(teachers):
    cfg = synthetic.get_config("smoke")
    cfg.method = ml_collections.ConfigDict({"name": "umt", "teachers": dict(teachers)})
    return cfg


@pytest.fixture(scope="module")
def umt_run(unimodal_runs, tmp_path_factory):
    """An uninterrupted 2-epoch UMT smoke run: ``(workdir, results)``."""
    workdir = str(tmp_path_factory.mktemp("umt_run"))
    return workdir, train_and_evaluate(_umt_config(unimodal_runs), workdir)


def test_smoke_umt_with_teachers_from_unimodal_runs(unimodal_runs, umt_run):
    tmp_path, res = umt_run
    cfg = _umt_config(unimodal_runs)
    assert res["epochs_run"] == 2 and np.isfinite(res["test"]["heads"]["fused"]["accuracy"])
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    for h in history:
        assert np.isfinite(h["train"]["distill"]) and h["train"]["distill"] > 0 and h["train"]["distill_active"] == 1.0
        assert {f"distill_{m}" for m in NAMES} <= set(h["train"])

    # the state holds exactly the unimodal runs' selected encoders
    from mcr_jax.checkpoint import Checkpointer, from_saveable
    from mcr_jax.programs import Programs, take

    state = take(Programs.single(cfg).states, 0)
    teachers = state.method_state["teachers"]["params"]
    like = {"params": state.params, "rest": state.rest}
    for m in NAMES:
        best = from_saveable(Checkpointer(unimodal_runs[m]).restore_best(like), like)
        for (pa, a), (pb, b) in zip(leaves(teachers[m]), leaves(best["params"]["encoders"][m]), strict=True):
            assert pa == pb and np.array_equal(a, b)


def test_a_resumed_run_uses_the_checkpointed_teachers(unimodal_runs, umt_run, tmp_path, monkeypatch):
    """Interrupted after epoch 1, resumed with *other* teachers offered by the workdirs: the result is
    the uninterrupted run's, so the teachers came back from the checkpoint."""
    from mcr_jax.checkpoint import Checkpointer
    from mcr_jax.methods.umt import UMT

    ref_dir, ref = umt_run
    original = Checkpointer.save

    def save_then_crash(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption after epoch 1")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(_umt_config(unimodal_runs), str(tmp_path))
    monkeypatch.setattr(Checkpointer, "save", original)
    real_load = UMT.load_teachers
    monkeypatch.setattr(UMT, "load_teachers",
                        lambda self, p, r: jax.tree.map(lambda x: x + 1.0, real_load(self, p, r)))
    res = train_and_evaluate(_umt_config(unimodal_runs), str(tmp_path))
    assert res["steps"] == ref["steps"] and res["test"] == ref["test"]
    a, b = np.load(os.path.join(ref_dir, "predictions.npz")), np.load(tmp_path / "predictions.npz")
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7)


# ---- (d) clear errors -------------------------------------------------------------------------------------


def test_umt_configuration_errors(tmp_path):
    info = toy_data()[1]
    method, _, params, _, _ = build({"name": "umt"})
    with pytest.raises(ValueError, match=r"method.teachers"):  # no teachers configured
        method.init_method_state(params)
    with pytest.raises(ValueError, match=r"missing \['x2'\]"):  # a modality without a teacher
        get_method(ml_collections.ConfigDict({"name": "umt", "teachers": {"x1": str(tmp_path)}}), info)
    with pytest.raises(ValueError, match="teacher_mode"):
        get_method(ml_collections.ConfigDict({"name": "umt", "teacher_mode": "frozen"}), info)
    method, _, params, _, _ = build({"name": "umt", "teachers": {m: str(tmp_path / m) for m in NAMES}})
    with pytest.raises(FileNotFoundError, match=r"teachers\['x1'\].*no finished unimodal run"):
        method.init_method_state(params)


def test_the_distillation_window_includes_its_first_and_its_last_epoch():
    """``start_epoch <= epoch <= end_epoch``, as the release's ``modulation_starts <= current_epoch <=
    modulation_ends``: with the window 2..3, epochs 2 and 3 distil, 1 and 4 do not."""
    method, handle, params, batch, _ = build({"name": "umt", "start_epoch": 2, "end_epoch": 3})
    state = _state(_teacher_model())
    active = [float(_step(method, handle, params, batch, state, epoch=e).metrics["distill_active"])
              for e in (1, 2, 3, 4)]
    assert active == [0.0, 1.0, 1.0, 0.0]
