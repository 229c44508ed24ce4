"""Greedy tests: the released switching rule and conditional learning speed, re-balancing steps, the
random variant, the conditional utilisation rate, and runs through the trainer.

Golden reference: nyukat/greedy_multimodal_learning, ``src/callbacks.py``: ``Bias_Mitigation_Strong``
(``compute_BDR`` over ``model.named_parameters()``, ``on_backward_end``, ``on_epoch_begin``) and
``Bias_Mitigation_Random``, transcribed below from the released code only (nothing of
``mcr_jax.methods.greedy`` is used in them). The release's groups are found by parameter *names*
(``net_view_<i>`` = stream ``i``, ``mmtm`` + ``visual`` / ``skeleton`` = the excitation into stream
0 / 1, other ``mmtm`` parameters = shared); our late-fusion model's leaves are handed to it under
the names the module docstring's mapping gives them.
"""

import json
import os
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from mcr_jax import data as data_lib
from mcr_jax import train
from mcr_jax.methods import get_method
from mcr_jax.methods.greedy import conditional_speeds, conditional_utilization, next_mode, step_speeds
from mcr_jax.tasks import get_task
from tests.helpers.method_checks import NAMES, abs_sum, at_epoch, ce, f64, jit_gradients, leaves, reference_gradients
from tests.helpers.method_checks import inputs as inputs_of
from tests.helpers.method_setup import build, toy_data, toy_regression_info

# ---- the release, transcribed ---------------------------------------------------------------------


class ReleaseStrong:
    """``Bias_Mitigation_Strong`` (``training_guided.gin``: epsilon 0.01, curation_windowsize 5,
    starting_epoch 2, branchnames ['net_view_0', 'net_view_1'], MMTMnames ['visual', 'skeleton']);
    ``self.named`` stands for ``self.model.named_parameters()`` as ``(name, Σθ², Σg²)``."""

    def __init__(self, epsilon, curation_windowsize, starting_epoch=2):
        self.epsilon, self.curation_windowsize, self.starting_epoch = epsilon, curation_windowsize, starting_epoch
        self.branchnames, self.MMTMnames = ["net_view_0", "net_view_1"], ["visual", "skeleton"]
        self.named = []
        # on_train_begin
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.curation_mode, self.caring_modality, self.unlock = False, None, False

    def compute_BDR(self):
        wn_main, wn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        gn_main, gn_bypass = [0] * len(self.branchnames), [0] * len(self.branchnames)
        for name, wn, gn in self.named:
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(self.MMTMnames):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind, _ in enumerate(self.MMTMnames):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(self.branchnames):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        BDR_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)
        BDR_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)
        return BDR_0 - BDR_1

    def on_backward_end(self):
        self.d_BDR = None
        if self.unlock:
            if not self.curation_mode:
                self.d_BDR = self.compute_BDR()
                if abs(self.d_BDR) > self.epsilon:
                    biased_direction = np.sign(self.d_BDR)
                    self.curation_mode = True
                    self.curation_step = 0
                    if biased_direction == -1:  # BDR0<BDR1
                        self.caring_modality = 1
                    elif biased_direction == 1:  # BDR0>BDR1
                        self.caring_modality = 0
                else:
                    self.curation_mode = False
                    self.caring_modality = 0
            else:
                self.curation_step += 1
                if self.curation_step == self.curation_windowsize:
                    self.curation_mode = False
        else:
            self.d_BDR = self.compute_BDR()
            self.curation_mode = False
            self.caring_modality = 0

    def on_epoch_begin(self, epoch):
        if epoch >= self.starting_epoch:
            self.unlock = True


class ReleaseRandom:
    """``Bias_Mitigation_Random``, with Python's ``random`` as in the release."""

    def __init__(self):
        self.curation_mode, self.caring_modality, self.unlock, self.starting_epoch = False, None, False, 2

    def on_backward_end(self):
        if self.unlock:
            mode = random.choice([0, 1, 2])
            if mode == 0:
                self.curation_mode, self.caring_modality = False, 0
            elif mode == 1:
                self.curation_mode, self.caring_modality = True, 1
            else:
                self.curation_mode, self.caring_modality = True, 0
        else:
            self.curation_mode, self.caring_modality = False, 0

    def on_epoch_begin(self, epoch):
        if epoch >= self.starting_epoch:
            self.unlock = True


MMTM = {"x1": "visual", "x2": "skeleton"}


def release_named(params, grads, groups):
    """Our leaves under the release's names, by the module docstring's mapping (heads: no group)."""
    named = []
    for (path, w), (_, g) in zip(leaves(params, np.float64), leaves(grads, np.float64), strict=True):
        row = lambda name, w=w, g=g, path=path: (name + path, float((w ** 2).sum()), float((g ** 2).sum()))  # noqa: E731
        for i, m in enumerate(NAMES):
            other = NAMES[1 - i]
            if path.startswith(f"['encoders']['{m}']"):
                named.append(row(f"net_view_{i}."))
                if groups == "cross":  # the branch of m carries m into the other modality's bypass
                    named.append(row(f"mmtm.fc_{MMTM[other]}."))
            if path.startswith(f"['fusion']['branches']['{m}']"):
                named.append(row(f"net_view_{i}." if groups == "cross" else f"mmtm.fc_{MMTM[m]}."))
                if groups == "cross":
                    named.append(row(f"mmtm.fc_{MMTM[other]}."))
        if path.startswith("['fusion']") and "['branches']" not in path:
            named.append(row("mmtm.fc_squeeze."))
    return named


def smoke_batches(epoch):
    cfg = synthetic.get_config("smoke")
    data = data_lib.load(cfg.data)
    return [{k: jnp.asarray(v) for k, v in b.items()}
            for b in data.batches("train", 24, train=True, seed=0, epoch=epoch)]


# ---- golden: the guided rule and the conditional learning speed ------------------------------------


@pytest.mark.parametrize("groups,rebalance", [("cross", "branch"), ("fusion", "release"), ("cross", "release")])
def test_guided_switching_and_speed_match_the_release(groups, rebalance):
    """Four epochs of SGD: the mode of every step, and d = BDR_0 − BDR_1 after every normal step, as
    the released callback computes them from the same parameters and gradients."""
    cfg = {"name": "greedy", "speed_groups": groups, "rebalance": rebalance, "window": 3, "epsilon": 0.002}
    method, handle, params, _, _ = build(cfg)
    tx = method.make_optimizer(optax.sgd(0.5), params)
    opt_state, ms = tx.init(params), method.init_method_state(params)
    step = jit_gradients(method, handle)
    release = ReleaseStrong(epsilon=0.002, curation_windowsize=3)
    modes, computed = [], 0
    for epoch in range(1, 5):
        release.on_epoch_begin(epoch)
        for t, batch in enumerate(smoke_batches(epoch)):
            want = (release.curation_mode, release.caring_modality if release.curation_mode else None)
            got = (bool(ms["rebalancing"]), int(ms["caring"]) if bool(ms["rebalancing"]) else None)
            assert got == want, f"epoch {epoch} step {t}"
            modes.append(got)
            grads, kwargs, _, ms, mets = step(params, batch, jax.random.PRNGKey(t), ms, epoch=epoch)
            release.named = release_named(params, grads, groups)
            release.on_backward_end()
            if release.d_BDR is not None:
                computed += 1
                d = float(mets["speed_x1"]) - float(mets["speed_x2"])
                np.testing.assert_allclose(d, release.d_BDR, rtol=2e-4, atol=1e-6)
                assert float(mets["speed_gap"]) == pytest.approx(abs(release.d_BDR), rel=2e-4, abs=1e-6)
            updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
            params = optax.apply_updates(params, updates)
        ms = method.on_epoch_end(epoch, {}, ms, None)
    assert computed > 5 and sum(m[0] for m in modes) >= 3  # the rule did fire; windows of 3 steps
    if groups == "cross":  # on these batches it cares for either modality in turn
        assert {m[1] for m in modes if m[0]} == {0, 1}


def test_speed_groups_and_rule_for_any_number_of_modalities():
    rng = np.random.default_rng(0)
    g, w = rng.uniform(0.1, 2, size=7), rng.uniform(1, 3, size=7)  # M = 3: enc ×3, branches ×3, shared
    main, bypass = step_speeds(jnp.asarray(g), jnp.asarray(w), 3, "cross")
    own_g, own_w = g[:3] + g[3:6], w[:3] + w[3:6]
    np.testing.assert_allclose(main, own_g / own_w, rtol=1e-6)
    np.testing.assert_allclose(bypass, (own_g.sum() - own_g + g[6]) / (own_w.sum() - own_w + w[6]), rtol=1e-6)
    main, bypass = step_speeds(jnp.asarray(g), jnp.asarray(w), 3, "fusion")
    np.testing.assert_allclose(main, g[:3] / w[:3], rtol=1e-6)
    np.testing.assert_allclose(bypass, (g[3:6] + g[6]) / (w[3:6] + w[6]), rtol=1e-6)
    bdr, gap = conditional_speeds(jnp.asarray([1.0, 2.0, 4.0]), jnp.asarray([3.0, 1.0, 4.0]))
    np.testing.assert_allclose(bdr, np.log10([3.0, 0.5, 1.0]), rtol=1e-6)
    assert float(gap) == pytest.approx(np.log10(6.0), rel=1e-6)
    assert float(conditional_speeds(jnp.zeros(3), jnp.ones(3))[1]) == 0  # no speed yet: no gap
    state = {"rebalancing": jnp.int32(0), "caring": jnp.int32(0), "window_step": jnp.int32(0)}
    kw = dict(epsilon=0.5, window=2, variant="guided")
    assert [int(x) for x in next_mode(state, bdr, gap, unlocked=True, **kw)] == [1, 0, 0]  # argmax BDR
    assert [int(x) for x in next_mode(state, bdr, gap, unlocked=False, **kw)] == [0, 0, 0]  # epoch 1
    assert int(next_mode(state, bdr, gap, unlocked=True, **dict(kw, epsilon=0.8))[0]) == 0  # below ε
    reb = {"rebalancing": jnp.int32(1), "caring": jnp.int32(2), "window_step": jnp.int32(0)}
    assert [int(x) for x in next_mode(reb, bdr, gap, unlocked=True, **kw)] == [1, 2, 1]
    assert [int(x) for x in next_mode(dict(reb, window_step=jnp.int32(1)), bdr, gap, unlocked=True, **kw)][:2] == [0, 2]


# ---- golden: the random variant ----------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3])
def test_random_variant_draws_like_the_release(m):
    n = 6000
    state = {"rebalancing": jnp.int32(0), "caring": jnp.int32(0), "window_step": jnp.int32(0)}
    draw = jax.jit(jax.vmap(lambda k, u: next_mode(state, jnp.zeros(m), jnp.float32(0), unlocked=u, epsilon=0.0,
                                                   window=5, variant="random", key=k)[:2], in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    reb, caring = (np.asarray(x) for x in draw(keys, True))
    ours = np.bincount(np.where(reb > 0, caring + 1, 0), minlength=m + 1) / n
    np.testing.assert_allclose(ours, np.full(m + 1, 1 / (m + 1)), atol=0.025)
    assert not np.any(np.asarray(draw(keys[:50], False)[0]))  # before starting_epoch: normal steps only
    if m == 2:  # the release's frequencies of (normal, care 0, care 1)
        random.seed(0)
        rel, counts = ReleaseRandom(), np.zeros(3)
        rel.on_epoch_begin(2)
        for _ in range(n):
            rel.on_backward_end()
            counts[rel.caring_modality + 1 if rel.curation_mode else 0] += 1
        np.testing.assert_allclose(ours, counts / n, atol=0.035)


# ---- the steps: normal = joint training; re-balancing = the caring modality alone ------------------


def _latents(model, batch):
    model.train()
    return {m: np.asarray(z, np.float64) for m, z in model.encode({m: batch[m] for m in NAMES}).items()}


def _reb_state(method, params, caring, count=3):
    ms = method.init_method_state(params)
    rng = np.random.default_rng(1)
    means = {m: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for m, v in ms["latent_mean"].items()}
    return dict(ms, rebalancing=jnp.int32(1), caring=jnp.int32(caring), latent_mean=means,
                latent_count=jnp.int32(count))


def test_a_normal_step_is_joint_training():
    method, handle, params, batch, _ = build({"name": "greedy", "rebalance": "branch"})
    grads, kwargs, _, ms, mets = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0),
                                                               method.init_method_state(params))
    want = reference_gradients("joint", handle, params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want)
    assert np.all(np.asarray(kwargs["player_scales"]) == 1) and float(kwargs["shared_scale"]) == 1
    assert float(mets["rebalancing"]) == 0 and int(ms["rebalancing"]) == 0  # epoch 1: locked
    assert int(ms["latent_count"]) == 1 and float(np.abs(np.asarray(ms["mu_main"])).min()) > 0


@pytest.mark.parametrize("caring", [0, 1])
def test_branch_rebalancing_trains_only_the_caring_branch_on_its_modality_alone(caring):
    method, handle, params, batch, model = build({"name": "greedy", "rebalance": "branch"})
    c, other = NAMES[caring], NAMES[1 - caring]
    ms = _reb_state(method, params, caring)
    grads, kwargs, _, new_ms, mets = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), ms)
    z = _latents(model, batch)
    # the running mean, this batch included (the release's running average); the others' latent → it
    mean = {m: (z[m].mean(0) + f64(ms["latent_mean"][m]) * 3) / 4 for m in NAMES}
    np.testing.assert_allclose(new_ms["latent_mean"][other], mean[other], rtol=1e-5, atol=1e-6)
    kernel = lambda m: f64(params["fusion"]["branches"][m]["kernel"])  # noqa: E731
    logits = z[c] @ kernel(c) + mean[other][None] @ kernel(other) + f64(params["fusion"]["bias"])[None]
    np.testing.assert_allclose(mets["loss"], ce(logits, batch["label"]), rtol=1e-5)
    assert float(mets["rebalancing"]) == 1 and float(mets[f"rebalance_{c}"]) == 1
    # gradients: the caring branch's only, as jax.grad of that loss gives them
    frozen = [grads["encoders"][other], grads["fusion"]["branches"][other], grads["fusion"]["bias"], grads["heads"]]
    assert all(abs_sum(g) == 0 for g in frozen)

    def ref(p):
        zc = model.encode({m: batch[m] for m in NAMES})[c]
        rest = jnp.asarray(mean[other], jnp.float32) @ p["branches"][other]["kernel"]
        out = zc @ p["branches"][c]["kernel"] + rest[None]
        return optax.softmax_cross_entropy_with_integer_labels(out + p["bias"][None], batch["label"]).mean()

    want = jax.grad(ref)(params["fusion"])
    np.testing.assert_allclose(grads["fusion"]["branches"][c]["kernel"], want["branches"][c]["kernel"], rtol=1e-4,
                               atol=1e-7)
    assert abs_sum(grads["encoders"][c]) > 0
    # updates: Adam's momentum and the coupled weight decay do not move the frozen parameters
    tx = method.make_optimizer(optax.chain(optax.add_decayed_weights(1e-2), optax.adam(1e-2)), params)
    opt_state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(ones, opt_state, params, player_scales=jnp.ones(2))
    updates, _ = tx.update(grads, opt_state, params, **kwargs)
    assert all(abs_sum(u) == 0 for u in (updates["encoders"][other], updates["fusion"]["branches"][other],
                                         updates["fusion"]["bias"], updates["heads"]))
    assert abs_sum(updates["encoders"][c]) > 0 and abs_sum(updates["fusion"]["branches"][c]) > 0
    # re-balancing steps do not count towards the speeds; the window advances
    np.testing.assert_array_equal(new_ms["mu_main"], ms["mu_main"])
    assert int(new_ms["window_step"]) == 1 and int(new_ms["rebalancing"]) == 1 and int(new_ms["caring"]) == caring


def test_release_rebalancing_keeps_every_branch_learning():
    method, handle, params, batch, model = build({"name": "greedy", "rebalance": "release"})
    ms = _reb_state(method, params, 0)
    grads, kwargs, _, _, mets = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), ms)
    assert kwargs == {}
    z = _latents(model, batch)
    mean_x2 = jnp.asarray((z["x2"].mean(0) + f64(ms["latent_mean"]["x2"]) * 3) / 4, jnp.float32)

    def ref(p):  # (1/M)[CE(ℓ with x2 → its mean) + CE(ℓ)]
        m = handle.train_model(p)
        lat = m.encode({k: batch[k] for k in NAMES})
        cut = m.fuse({"x1": lat["x1"], "x2": jnp.broadcast_to(mean_x2, lat["x2"].shape)})
        full = m.fuse(lat)
        lab = batch["label"]
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(cut, lab).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(full, lab).mean())

    loss, want = jax.value_and_grad(ref)(params)
    np.testing.assert_allclose(mets["loss"], loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, want)
    assert abs_sum(grads["encoders"]["x2"]) > 0 and abs_sum(grads["fusion"]["bias"]) > 0


@pytest.mark.parametrize("fusion", ["gated", "concat_mlp"])
def test_any_fusion_head_and_regression(fusion):
    """A non-separable head: its layers are shared (every modality's bypass under "cross"), frozen
    while re-balancing; a normal step is still joint training. Regression trains on its L1 loss."""
    method, handle, params, batch, _ = build({"name": "greedy", "rebalance": "branch"}, fusion=fusion)
    step = jit_gradients(method, handle)
    grads, *_ = step(params, batch, jax.random.PRNGKey(0), method.init_method_state(params))
    want = reference_gradients("joint", handle, params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want)
    grads, kwargs, _, _, mets = step(params, batch, jax.random.PRNGKey(0), _reb_state(method, params, 1))
    assert abs_sum(grads["fusion"]) == 0 and abs_sum(grads["encoders"]["x1"]) == 0
    assert abs_sum(grads["encoders"]["x2"]) > 0 and np.isfinite(float(mets["loss"]))
    method, handle, params, batch, _ = build({"name": "greedy", "rebalance": "branch"}, info=toy_regression_info(),
                                             batch={**batch, "label": jnp.linspace(-1, 1, 16)})
    _, _, _, ms, mets = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0),
                                                     method.init_method_state(params))
    assert np.isfinite(float(mets["loss"])) and float(mets["speed_gap"]) >= 0
    model = build({"name": "greedy", "rebalance": "branch"})[4]
    lat = {m: np.asarray(v) for m, v in model.encode(inputs_of(batch)).items()}
    got = conditional_utilization(lambda z: z["x1"][:, :1] - z["x2"][:, :1], lat, np.asarray(batch["label"]),
                                  {m: v.mean(0) for m, v in lat.items()}, get_task("regression"))
    assert set(got) == {"util_x1", "util_x2", "without_x1_binary_accuracy", "without_x2_binary_accuracy"}


# ---- the conditional utilisation rate ---------------------------------------------------------------


def test_conditional_utilization_matches_numpy():
    rng = np.random.default_rng(3)
    z = {"a": rng.normal(size=(40, 3)), "b": rng.normal(size=(40, 2))}
    w = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(2, 4)) * 0.3}
    labels = np.argmax(z["a"] @ w["a"] + 0.5 * z["b"] @ w["b"] + rng.normal(size=(40, 4)) * 0.3, -1)
    means = {"a": z["a"].mean(0), "b": z["b"].mean(0)}
    fuse = lambda lat: lat["a"] @ w["a"] + lat["b"] @ w["b"]  # noqa: E731
    got = conditional_utilization(fuse, z, labels, means, get_task("classification"))
    acc = lambda lo: float(np.mean(np.argmax(lo, -1) == labels))  # noqa: E731
    full = acc(fuse(z))
    for m, o in (("a", "b"), ("b", "a")):
        without = acc(means[m][None] @ w[m] + z[o] @ w[o])
        assert got[f"without_{m}_accuracy"] == pytest.approx(without)
        assert got[f"util_{m}"] == pytest.approx((full - without) / full)
    assert got["util_a"] > got["util_b"]  # the model leans on a
    assert conditional_utilization(lambda lat: np.zeros((40, 4)), z, np.ones(40, int), means,
                                   get_task("classification"))["util_a"] == 0.0  # A(ℓ) = 0


# ---- options, traced ε ---------------------------------------------------------------------------------


def test_options_are_checked():
    _, info, _ = toy_data()
    for bad in ({"variant": "guided2"}, {"rebalance": "all"}, {"speed_groups": "mmtm"}, {"window": 0},
                {"epsilon": -1.0}, {"starting_epoch": 0}, {"utilization_mean": "val"}, {"utilization_every": -1}):
        with pytest.raises(ValueError, match="method\\."):
            get_method(ml_collections.ConfigDict({"name": "greedy", **bad}), info)
    with pytest.raises(ValueError, match="unknown method 'greedy' options"):
        get_method(ml_collections.ConfigDict({"name": "greedy", "alpha": 1.0}), info)


def test_traced_epsilon_equals_static():
    method, handle, params, batch, _ = build({"name": "greedy", "rebalance": "branch"})
    ms = method.init_method_state(params)  # in epoch 2: unlocked
    out = jit_gradients(method, handle)(params, batch, jax.random.PRNGKey(0), ms, epoch=2)
    gap = float(out[4]["speed_gap"])
    values = (gap / 2, gap * 2)  # fires, does not fire
    statics = []
    for v in values:
        m, h, *_ = build({"name": "greedy", "rebalance": "branch", "epsilon": v})
        statics.append(jax.tree.leaves(jit_gradients(m, h)(params, batch, jax.random.PRNGKey(0), ms, epoch=2)))

    def traced(v):
        return method.with_hparams({"epsilon": v}).gradients(at_epoch(handle, 2), params, batch,
                                                              jax.random.PRNGKey(0), ms)

    grid = jax.jit(jax.vmap(traced))(jnp.asarray(values, jnp.float32))
    for i, want in enumerate(statics):
        for a, b in zip([x[i] for x in jax.tree.leaves(grid)], want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rebalancing = [int(jax.tree.map(lambda x, i=i: x[i], grid)[3]["rebalancing"]) for i in range(2)]
    assert rebalancing == [1, 0]


# ---- through the trainer ---------------------------------------------------------------------------------


def _history(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _cfg(**method):
    cfg = synthetic.get_config("smoke,method=greedy")
    cfg.train.num_epochs, cfg.train.patience, cfg.parallel.num_devices = 3, 0, 1
    for k, v in method.items():
        cfg.method[k] = v
    return cfg


def test_runs_log_the_rule_and_the_utilization_rate(tmp_path):
    res = train.train_and_evaluate(_cfg(), str(tmp_path / "guided"))
    history = _history(tmp_path / "guided")
    assert np.isfinite(res["test"]["heads"]["fused"]["accuracy"]) and set(res["test"]["heads"]) == {"fused"}
    assert history[0]["train"]["rebalancing"] == 0.0  # epoch 1: normal steps only
    assert any(h["train"]["rebalancing"] > 0 for h in history[1:])
    for h in history:
        val = h["val"]
        assert {"util_x1", "util_x2", "without_x1_accuracy", "without_x2_accuracy"} <= set(val)
        for m in NAMES:
            assert val[f"util_{m}"] == pytest.approx((val["fused_accuracy"] - val[f"without_{m}_accuracy"])
                                                     / val["fused_accuracy"])
        assert {"speed_x1", "speed_x2", "speed_gap", "rebalance_x1", "rebalance_x2"} <= set(h["train"])
    train.train_and_evaluate(_cfg(utilization_every=2, utilization_mean="running", variant="random"),
                             str(tmp_path / "random"))
    history = _history(tmp_path / "random")
    assert ["util_x1" in h["val"] for h in history] == [False, True, False]
    assert history[0]["train"]["rebalancing"] == 0.0 and history[-1]["train"]["rebalancing"] > 0


def test_three_modalities(tmp_path):
    cfg = _cfg(rebalance="release")
    cfg.data.num_modalities = 3
    cfg.data.embedding_scale = (8.0, 3.0, 3.0)
    cfg.data.proportions = (0.6, 0.0, 0.2, 0.2)
    cfg.train.num_epochs = 2
    train.train_and_evaluate(cfg, str(tmp_path))
    h = _history(tmp_path)[-1]
    assert {"util_x3", "speed_x3", "rebalance_x3"} <= set(h["val"]) | set(h["train"])


def test_vectorised_seeds_equal_separate_runs(tmp_path):
    from mcr_jax import seeds as seeds_mod
    from tests.test_seeds import _same

    cfg = _cfg()
    out = seeds_mod.train_seeds(cfg, str(tmp_path / "vec"), [0, 3])
    assert [r["vectorized_seeds"] for r in out["per_seed"]] == [[0, 3], [0, 3]]
    for s, res in zip([3], out["per_seed"][1:], strict=True):  # the second seed of the program, alone
        one = cfg.copy_and_resolve_references()
        one.seed = s
        alone = train.train_and_evaluate(one, str(tmp_path / f"alone_{s}"))
        _same(res, alone, tmp_path / "vec" / f"seed_{s}", tmp_path / f"alone_{s}")
        vec, sep = _history(tmp_path / "vec" / f"seed_{s}"), _history(tmp_path / f"alone_{s}")
        for a, b in zip(vec, sep, strict=True):
            assert a["val"]["util_x1"] == pytest.approx(b["val"]["util_x1"], abs=1e-6)
            assert a["train"]["rebalancing"] == b["train"]["rebalancing"]
