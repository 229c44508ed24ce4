"""MSLR tests: learning-rate multipliers from validation accuracy, update scaling, and the released schedule.

Golden reference: ``kkontras/MCR`` ``agents/general_agent/helpers/Bias_Infusion.py``, class
``Bias_Infusion_MSLR`` (identical in ``kkontras/MLB``): ``on_epoch_begin`` keeps the initial rates
until ``keep_memory_epoch`` epochs of validation accuracy exist, then multiplies them by
``acc / mean(last keep_memory_epoch accuracies)``; ``on_backward_end`` multiplies the gradients of the
encoder parameters (``enc_0`` / ``enc_1``, here ``encoders/m`` + ``heads/m``) by the result.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import get_method
from mcr_jax.methods.mslr import mslr_multipliers
from tests.helpers.method_checks import NAMES
from tests.helpers.method_checks import apply_coefficients as _apply
from tests.helpers.method_checks import assert_leaves_close as _assert_tree
from tests.helpers.method_checks import assert_scaled as _assert_scaled
from tests.helpers.method_checks import cached_gradients as _grads
from tests.helpers.method_checks import leaves as _leaves
from tests.helpers.method_checks import reference_gradients as _reference_grads
from tests.helpers.method_checks import step_gradients as _step
from tests.helpers.method_setup import build, toy_data
from tests.helpers.method_setup import build_with_fusion_bias as _setup

_data = toy_data


# ---- multipliers, optimizer-update scaling and unimodal predictions ------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["full_window", "partial_window"])
def test_mslr_learning_rates_follow_validation_accuracy(partial):
    _, info, _ = _data()
    method = get_method(ml_collections.ConfigDict({"name": "mslr", "window": 3, "partial_window": partial,
                                                   "init_lr_multipliers": {"x2": 0.5}}), info)
    state = method.init_method_state(None)
    np.testing.assert_allclose(state["multipliers"], [1.0, 0.5])
    accs = np.array([[0.2, 0.3], [0.4, 0.3], [0.5, 0.2], [0.5, 0.35], [0.45, 0.5], [0.6, 0.5]])
    for t, acc in enumerate(accs):  # t = epoch - 1
        val = {"heads": {"fused": {"accuracy": 0.0}, **{m: {"accuracy": acc[i]} for i, m in enumerate(NAMES)}}}
        state = method.on_epoch_end(t + 1, val, state, None)
        prev = accs[max(0, t - 3):t]
        adapt = len(prev) == 3 or (partial and len(prev) > 0)  # default: only on a full window
        want = np.array([1.0, 0.5]) * (acc / prev.mean(0) if adapt else 1.0)
        np.testing.assert_allclose(state["multipliers"], want, rtol=1e-6, err_msg=f"epoch {t + 1}")
        assert int(state["count"]) == t + 1 and state["history"].shape == (3, 2)
    # pure rule: a NaN accuracy or an empty history leaves the base rate
    np.testing.assert_allclose(mslr_multipliers([np.nan, 0.4], np.full((2, 2), 0.2), 2, 2, [1.0, 1.0]), [1.0, 2.0])
    np.testing.assert_allclose(mslr_multipliers([0.3, 0.4], np.zeros((2, 2)), 0, 2, [2.0, 1.0]), [2.0, 1.0])


def test_mslr_scales_optimizer_updates_not_gradients():
    method, handle, params, batch = _setup({"name": "mslr"})
    state = dict(method.init_method_state(params), multipliers=jnp.asarray([2.0, 0.25], jnp.float32))
    grads, kw, _, _, mets = _grads(method, handle, params, batch, state)
    _assert_scaled(grads, _reference_grads("joint", handle, params, batch), [1.0, 1.0], ())
    np.testing.assert_allclose(kw["player_scales"], [2.0, 0.25])
    tx = method.make_optimizer(optax.adam(1e-2), params)
    updates, _ = tx.update(grads, tx.init(params), params, **kw)
    plain, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    _assert_scaled(updates, plain, [2.0, 0.25], ("encoders", "heads", "branches"))
    with pytest.raises(ValueError, match="player_scales"):
        tx.update(grads, tx.init(params), params)


def test_mslr_unimodal_predictions():
    method, handle, params, batch = _setup({"name": "mslr"})
    model = handle.eval_model(params)
    out = method.predict(model, batch)
    branches = model.fusion.branch_logits(out["latents"])
    for m in NAMES:  # additive late fusion: modality m's prediction is its branch plus half the bias
        np.testing.assert_allclose(out["unimodal"][m], branches[m] + model.fusion.bias[...][None] / 2, rtol=1e-6)
    # probe mode: the heads learn on stop-gradient latents, the encoders see the joint gradient only
    method, handle, params, batch = _setup({"name": "mslr", "unimodal_source": "probe"})
    grads = _grads(method, handle, params, batch, method.init_method_state(params))[0]
    joint = _reference_grads("joint", handle, params, batch)
    for (path, g), (_, r) in zip(_leaves(grads), _leaves(joint), strict=True):
        if path.startswith("['heads']"):
            assert np.abs(g).sum() > 0, path
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=path)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "mslr", "unimodal_source": "branch"}, fusion="concat_mlp")


# ---- golden: the released Bias_Infusion_MSLR -----------------------------------------------------


class ReleasedMSLR:
    """``Bias_Infusion_MSLR``: per-epoch state and the per-step gradient coefficients."""

    def __init__(self, init_learning_rate, keep_memory_epoch):
        self.init_learning_rate = [float(v) for v in init_learning_rate]
        self.keep_memory_epoch = int(keep_memory_epoch)
        self.coeff_memory = [[] for _ in self.init_learning_rate]
        self.ratio = [1.0 for _ in self.init_learning_rate]

    def on_epoch_begin(self, current_epoch, last_val_acc):
        """``current_epoch`` is 0-based; ``last_val_acc`` the latest validation accuracy per modality."""
        if current_epoch < 1:
            return
        if current_epoch > self.keep_memory_epoch:
            self.ratio = [acc / np.array(mem[-self.keep_memory_epoch:]).mean()
                          for acc, mem in zip(last_val_acc, self.coeff_memory, strict=True)]
        else:
            self.ratio = [1.0 for _ in self.ratio]
        for mem, acc in zip(self.coeff_memory, last_val_acc, strict=True):
            mem.append(acc)

    def coefficients(self):
        return [r * lr for r, lr in zip(self.ratio, self.init_learning_rate, strict=True)]


def released_mslr_owner(path):
    """Which coefficient the released MSLR applies to a parameter (``enc_m`` only), -1 for none."""
    for i, m in enumerate(NAMES):
        if path.startswith(f"['encoders']['{m}']") or path.startswith(f"['heads']['{m}']"):
            return i
    return -1


def _val(acc):
    heads = {m: {"accuracy": float(a)} for m, a in zip(NAMES, acc, strict=True)}
    return {"heads": {"fused": {"accuracy": 0.0}, **heads}}


# Validation accuracies of the two unimodal predictions after epochs 1..9: both modalities move,
# so any adaptation on a partial window (epochs 2..window) changes the rates.
ACCS = np.array([[0.20, 0.30], [0.40, 0.30], [0.50, 0.20], [0.55, 0.35], [0.45, 0.50], [0.60, 0.50],
                 [0.62, 0.41], [0.58, 0.66], [0.70, 0.52]])


@pytest.mark.parametrize("window", [1, 3])
def test_mslr_rates_follow_the_released_schedule(window):
    """Epoch by epoch, the method's learning-rate multipliers equal the released coefficients: the
    initial rates until ``window`` epochs of history exist, then ``init · acc / mean(last window)``."""
    _, info, _ = toy_data()
    method = get_method(ml_collections.ConfigDict({"name": "mslr", "window": window,
                                                   "init_lr_multipliers": {"x1": 0.7, "x2": 1.3}}), info)
    ref = ReleasedMSLR((0.7, 1.3), keep_memory_epoch=window)
    state = method.init_method_state(None)
    np.testing.assert_allclose(state["multipliers"], ref.coefficients(), rtol=1e-6, err_msg="epoch 1")
    for epoch, acc in enumerate(ACCS, start=1):  # `epoch` (1-based) has just finished
        state = method.on_epoch_end(epoch, _val(acc), state, None)
        ref.on_epoch_begin(epoch, acc)  # the released 0-based epoch `epoch` is our epoch + 1
        np.testing.assert_allclose(state["multipliers"], ref.coefficients(), rtol=1e-6,
                                   err_msg=f"rates for epoch {epoch + 1}")


def test_mslr_mcr_authors_preset_scales_encoder_gradients():
    """``preset="mcr_authors"``: first modality (audio in CREMA-D, AVE) 0.7, second 1.3, on the gradients
    of the encoders only (the fusion branches and bias keep the plain fused-CE gradient)."""
    method, handle, params, batch, _ = build({"name": "mslr", "preset": "mcr_authors", "window": 2})
    ref = ReleasedMSLR((0.7, 1.3), keep_memory_epoch=2)
    state = method.init_method_state(params)
    for epoch, acc in enumerate(ACCS[:4], start=1):
        state = method.on_epoch_end(epoch, _val(acc), state, None)
        ref.on_epoch_begin(epoch, acc)
    coeffs = ref.coefficients()
    assert not np.allclose(coeffs, [0.7, 1.3])  # the rule has adapted by now
    np.testing.assert_allclose(state["multipliers"], coeffs, rtol=1e-6)

    grads, kw, _, _, _ = _step(method, handle, params, batch, state)
    assert kw == {}  # nothing for the optimizer: the gradients carry the rates

    def fused_ce(p):  # the released MSLR trains on the fused cross-entropy only
        out = handle.train_model(p)({m: batch[m] for m in NAMES})
        logp = jax.nn.log_softmax(out["logits"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None].astype(jnp.int32), axis=1))

    _assert_tree(grads, _apply(jax.grad(fused_ce)(params), released_mslr_owner, coeffs))
    inner = optax.sgd(1.0)
    assert method.make_optimizer(inner, params) is inner


def test_mslr_preset_and_option_checks():
    _, info, _ = toy_data()

    def make(**cfg):
        return get_method(ml_collections.ConfigDict({"name": "mslr", **cfg}), info)

    preset = make(preset="mcr_authors")
    np.testing.assert_allclose(preset.base, [0.7, 1.3], rtol=1e-6)  # by position: first modality 0.7
    assert preset.opts["scale"] == "gradients" and preset.opts["scale_branch"] is False
    assert preset.opts["window"] == 20 and preset.opts["partial_window"] is False
    mine = make(preset="mcr_authors", init_lr_multipliers={"x2": 2.0})  # options set to other values win
    assert mine.opts["scale"] == "gradients" and mine.opts["scale_branch"] is False
    np.testing.assert_allclose(mine.base, [1.0, 2.0])
    # through an experiment config, whose method section holds every option at its default
    cfg = synthetic.get_config("smoke,method=mslr")
    cfg.method.preset = "mcr_authors"
    full = get_method(cfg.method, info)
    assert full.opts["scale"] == "gradients" and full.opts["scale_branch"] is False
    np.testing.assert_allclose(full.base, [0.7, 1.3], rtol=1e-6)
    np.testing.assert_allclose(make(init_lr_multipliers=(0.5, 3.0)).base, [0.5, 3.0])
    three = DatasetInfo(name="toy", modalities=("a", "b", "c"), input_shapes={m: (4,) for m in "abc"},
                        num_classes=3)
    for cfg, msg, dinfo in [({"preset": "mcr_authors"}, "two-modality", three),
                            ({"preset": "authors"}, "preset", info),
                            ({"scale": "params"}, "scale", info),
                            ({"partial_window": 1}, "partial_window", info),
                            ({"init_lr_multipliers": (0.5,)}, "one value per modality", info),
                            ({"init_lr_multipliers": {"x3": 0.5}}, "unknown modalities", info),
                            ({"init_lr_multipliers": {"x1": 0.0}}, "> 0", info)]:
        with pytest.raises(ValueError, match=msg):
            get_method(ml_collections.ConfigDict({"name": "mslr", **cfg}), dinfo)
