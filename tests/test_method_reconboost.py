"""ReconBoost tests: schedule, reconcilement loss and update masking, and the released boosting stage.

Golden reference: huacong/ReconBoost, ``train.py`` (phase 1's ``boosting_loss``) and
``models/dynamic_net.py`` (``DynamicNet.forward(mask_model=…)``: ``boost_rate · Σ`` of the other
learners' outputs, no constant term once the ensemble has members), written from the released code
only (nothing of ``mcr_jax.methods`` is used in it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mcr_jax.methods.reconboost import reconcile_loss, schedule
from mcr_jax.players import assign_players, scale_by_owner
from tests.helpers.method_checks import abs_sum as _abs_sum
from tests.helpers.method_checks import ce as _ce
from tests.helpers.method_checks import f64 as _np
from tests.helpers.method_checks import log_softmax as _log_softmax
from tests.helpers.method_checks import step_gradients as _grads
from tests.helpers.method_setup import build

_setup = build


# ---- schedule, reconcilement loss and update masking, against NumPy ------------------------------


def _update_scales(params, method, kwargs):
    """The factor each parameter's optimizer update is multiplied by (the optimizer's last link)."""
    owners = assign_players(params, method.modalities)
    return scale_by_owner(jax.tree.map(jnp.ones_like, params), owners, kwargs["player_scales"],
                          kwargs["shared_scale"])


def test_reconboost_schedule_alternates_modalities_and_rectifies():
    got = [schedule(e, stage_epochs=2, rectify_epochs=1, num_modalities=3) for e in range(10)]
    want = [(True, 0), (True, 0), (False, 0), (True, 1), (True, 1), (False, 1), (True, 2), (True, 2), (False, 2),
            (True, 0)]
    assert [(bool(b), int(a)) for b, a in got] == want
    got = [schedule(e, stage_epochs=3, rectify_epochs=0, num_modalities=2) for e in range(6)]
    assert [(bool(b), int(a)) for b, a in got] == [(True, 0)] * 3 + [(True, 1)] * 3
    traced = jax.jit(lambda e: schedule(e, stage_epochs=2, rectify_epochs=1, num_modalities=3))(jnp.int32(4))
    assert (bool(traced[0]), int(traced[1])) == (True, 1)


def test_reconboost_loss_matches_numpy():
    rng = np.random.default_rng(1)
    f, others = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 2
    y = np.array([0, 1, 2, 3, 0, 1])
    q = np.exp(_log_softmax(others))[np.arange(6), y]
    logp = _log_softmax(f)[np.arange(6), y]
    want = np.mean(-(1 - 0.3 * q) * logp)
    got = reconcile_loss(jnp.asarray(f, jnp.float32), jnp.asarray(others, jnp.float32), jnp.asarray(y), None,
                         weight=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the others' prediction is a constant: no gradient reaches it
    g = jax.grad(lambda o: reconcile_loss(jnp.asarray(f), o, jnp.asarray(y), None, weight=0.3))(jnp.asarray(others))
    assert float(jnp.abs(g).sum()) == 0


def test_reconboost_trains_only_the_active_learner_then_everything():
    method, handle, params, batch, model = _setup({"name": "reconboost", "stage_epochs": 1, "rectify_epochs": 1,
                                                   "reconcile_weight": 0.2})
    tx = method.make_optimizer(optax.adam(1e-2), params)
    opt_state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(ones, opt_state, params, player_scales=jnp.ones(2))  # momentum everywhere
    latents = model.encode({m: batch[m] for m in method.modalities})
    branch = {m: _np(latents[m]) @ _np(params["fusion"]["branches"][m]["kernel"]) for m in method.modalities}
    bias = _np(params["fusion"]["bias"])
    y = np.asarray(batch["label"])
    # epochs_done = 2: stage 1 (cycle of 2 epochs) -> boosting modality x2
    ms = {"epochs_done": jnp.asarray(2, jnp.int32)}
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch, ms)
    assert float(mets["boosting"]) == 1.0 and float(mets["active"]) == 1.0
    q = np.exp(_log_softmax(branch["x1"]))[np.arange(16), y]  # F_¬a: the other learners, no bias
    logp = _log_softmax(branch["x2"])[np.arange(16), y]
    np.testing.assert_allclose(mets["loss"], np.mean(-(1 - 0.2 * q) * logp), rtol=1e-5)
    assert _abs_sum(grads["encoders"]["x1"]) == 0 and _abs_sum(grads["fusion"]["branches"]["x1"]) == 0
    assert float(jnp.abs(grads["fusion"]["bias"]).sum()) == 0
    assert _abs_sum(grads["encoders"]["x2"]) > 0 and _abs_sum(grads["fusion"]["branches"]["x2"]) > 0
    updates, _ = tx.update(grads, opt_state, params, **kwargs)
    frozen = [updates["encoders"]["x1"], updates["fusion"]["branches"]["x1"], updates["fusion"]["bias"],
              updates["heads"]["x1"]]
    assert all(_abs_sum(u) == 0 for u in frozen)  # momentum does not move the inactive learner
    assert _abs_sum(updates["encoders"]["x2"]) > 0
    # epochs_done = 3: global rectification of the whole ensemble on the fused CE
    grads, kwargs, _, _, mets = _grads(method, handle, params, batch, {"epochs_done": jnp.asarray(3, jnp.int32)})
    assert float(mets["boosting"]) == 0.0
    np.testing.assert_allclose(mets["loss"], _ce(bias[None] + branch["x1"] + branch["x2"], y), rtol=1e-5)
    assert all(np.all(k == 1) for k in jax.tree.leaves(_update_scales(params, method, kwargs)))
    assert _abs_sum(grads["encoders"]["x1"]) > 0 and _abs_sum(grads["encoders"]["x2"]) > 0
    # the hook records finished epochs; unimodal outputs are b + f_m
    assert int(method.on_epoch_end(5, {}, ms, None)["epochs_done"]) == 5
    out = method.predict(model, batch)
    np.testing.assert_allclose(out["unimodal"]["x1"], bias[None] + branch["x1"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="separable fusion head"):
        _setup({"name": "reconboost"}, fusion="gated")


# ---- golden: the release's boosting (reconcilement) stage ----------------------------------------


WEIGHT1, WEIGHT2 = 5.0, 1.0  # README's CREMA-D command: --weight1 5.0 --weight2 1.0
BOOST_RATE = 1.0  # --boost_rate 1.0 (DynamicNet.boost_rate before any rectification step)


def _release_boosting_loss(out_obj, out_join, labels, n_class):
    target = jax.nn.one_hot(labels, n_class)
    q = jax.nn.softmax(jax.lax.stop_gradient(out_join), axis=1)  # computed under torch.no_grad()
    logp = jax.nn.log_softmax(out_obj, axis=1)
    per_example = -WEIGHT1 * jnp.mean(target * logp, -1) + WEIGHT2 * jnp.mean(target * q * logp, -1)
    return jnp.mean(per_example)


def _release_grads(handle, params, batch, active, modalities, n_class):
    """Gradients of the release's boosting loss for learner ``active``; learner ``m`` is encoder ``m``
    followed by its own branch of the linear fusion head."""

    def loss(p):
        model = nnx.merge(handle.graphdef_train, p, handle.rest)
        z = model.encode({m: batch[m] for m in modalities})
        learner = {m: z[m] @ p["fusion"]["branches"][m]["kernel"] for m in modalities}
        out_join = BOOST_RATE * sum(learner[m] for m in modalities if m != active)  # forward(mask_model=active)
        return _release_boosting_loss(learner[active], out_join, batch["label"], n_class)

    return jax.jit(jax.grad(loss))(params)


@pytest.fixture(scope="module")
def reconboost_case():
    method, handle, params, batch, _ = build({"name": "reconboost", "stage_epochs": 1, "rectify_epochs": 1,
                                              "reconcile_weight": WEIGHT2 / WEIGHT1})
    # a trained model's fusion bias is not zero: make it matter
    params = jax.tree.map(lambda x: x, params)
    params["fusion"]["bias"] = jnp.asarray([1.5, -2.0, 0.5, 3.0, -1.0], jnp.float32)
    batch = {k: v for k, v in batch.items() if k != "mask"}  # the release has no padding mask
    step = jax.jit(lambda p, b, s: method.gradients(handle, p, b, jax.random.PRNGKey(0), s))
    return method, handle, params, batch, step


@pytest.mark.parametrize("epochs_done,active", [(0, "x1"), (2, "x2")])
def test_reconboost_reconcilement_gradients_match_the_release(reconboost_case, epochs_done, active):
    method, handle, params, batch, step = reconboost_case
    grads, kwargs, _, _, metrics = step(params, batch, {"epochs_done": jnp.asarray(epochs_done, jnp.int32)})
    assert float(metrics["boosting"]) == 1.0 and method.modalities[int(metrics["active"])] == active
    want = _release_grads(handle, params, batch, active, method.modalities, method.info.num_classes)
    # the release's loss is (w1 / C) · mean[-(1 - (w2 / w1) q_y) log p_y]; the method drops w1 / C
    scale = WEIGHT1 / method.info.num_classes
    jax.tree.map(lambda g, w: np.testing.assert_allclose(scale * np.asarray(g), w, rtol=2e-4, atol=1e-7),
                 grads, want)
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(want["encoders"][active])) > 0
    # only the active learner moves (the release's optimizer holds only its parameters)
    mask = _update_scales(params, method, kwargs)
    other = [m for m in method.modalities if m != active][0]
    learner = lambda m: jax.tree.leaves(mask["encoders"][m]) + jax.tree.leaves(mask["fusion"]["branches"][m])
    assert all(np.all(k == 1) for k in learner(active)) and all(np.all(k == 0) for k in learner(other))
    assert np.all(mask["fusion"]["bias"] == 0)
