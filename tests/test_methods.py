"""Each training method's loss and gradients on a toy batch, through the real model."""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import game, losses
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import MCR
from mcr_jax.models import MultimodalModel
from tests.helpers.method_setup import build, toy_data

_data = toy_data


def _setup(method_cfg, fusion="linear", ceb=False, info=None, batch=None):
    return build(method_cfg, fusion=fusion, ceb=ceb, info=info, batch=batch)


def _grads(method, handle, params, batch, key=0):
    fn = jax.jit(lambda p, b, k: method.gradients(handle, p, b, k, {}))
    return fn(params, batch, jax.random.PRNGKey(key))


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_joint_and_multiloss_losses():
    method, handle, params, batch, model = _setup({"name": "joint"})
    out = model({m: batch[m] for m in method.modalities})
    _, _, _, _, mets = _grads(method, handle, params, batch)
    np.testing.assert_allclose(mets["loss"], _ce(out["logits"], batch["label"]), rtol=1e-5)
    method, handle, params, batch, _ = _setup({"name": "multiloss", "uni_weight": 0.5})
    _, _, _, _, mets = _grads(method, handle, params, batch)
    uni = sum(_ce(out["unimodal"][m], batch["label"]) for m in method.modalities)
    np.testing.assert_allclose(mets["loss"], _ce(out["logits"], batch["label"]) + 0.5 * uni, rtol=1e-5)


def test_unimodal_touches_only_its_modality():
    method, handle, params, batch, _ = _setup({"name": "unimodal", "modality": "x2"})
    grads = _grads(method, handle, params, batch)[0]
    norms = jax.tree_util.tree_map_with_path(lambda p, g: (jax.tree_util.keystr(p), float(jnp.abs(g).sum())), grads)
    for path, norm in jax.tree.leaves(norms, is_leaf=lambda x: isinstance(x, tuple)):
        own = "'x2'" in path and ("encoders" in path or "heads" in path)
        assert (norm > 0) == own, path
    with pytest.raises(ValueError, match="method.modality"):
        _setup({"name": "unimodal", "modality": "x9"})


def test_mcr_loss_value_matches_the_pure_losses():
    cfg = dict(synthetic.get_config("smoke").method)
    method, handle, params, batch, model = _setup(cfg)
    names = method.modalities
    _, _, _, _, mets = _grads(method, handle, params, batch, key=3)
    out = model({m: batch[m] for m in names})
    zs = [out["latents"][m] for m in names]
    con = losses.supervised_ntxent(zs, batch["label"], temperature=0.5)
    perms = losses.sample_permutations(jax.random.split(jax.random.PRNGKey(3))[0], cfg["num_permutations"], 16)
    d = losses.mipd_divergences(out["logits"], lambda xs: model.fuse(dict(zip(names, xs, strict=True))), zs, perms)
    uni = sum(_ce(out["unimodal"][m], batch["label"]) for m in names)
    want = _ce(out["logits"], batch["label"]) + 0.01 * uni + 1.0 * con - 0.1 * jnp.sum(d)
    np.testing.assert_allclose(mets["loss"], want, rtol=1e-4)
    np.testing.assert_allclose([mets["mipd_x1"], mets["mipd_x2"]], d, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "independent", "collaborative"])
@pytest.mark.parametrize("fusion", ["linear", "concat_mlp"])
def test_mcr_optax_form_equals_single_backward_on_the_model(fusion, strategy):
    base = dict(synthetic.get_config("smoke").method, strategy=strategy)
    single, handle, params, batch, _ = _setup(base, fusion=fusion)
    g_single = _grads(single, handle, params, batch)[0]
    opt_method, handle2, params2, _, _ = _setup(dict(base, game_form="optax"), fusion=fusion)
    grads, kwargs, _, _, _ = _grads(opt_method, handle2, params2, batch)
    tx = opt_method.make_optimizer(optax.sgd(1.0), params2)
    updates, _ = tx.update(grads, tx.init(params2), params2, **kwargs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -b, rtol=3e-4, atol=3e-6), g_single, updates)


def test_mcr_branch_fast_path_equals_latent_path():
    base = dict(synthetic.get_config("smoke").method)
    fast, handle, params, batch, _ = _setup(base)
    slow, handle2, params2, _, _ = _setup(dict(base, branch_fast_path=False))
    g1, _, _, _, m1 = _grads(fast, handle, params, batch)
    g2, _, _, _, m2 = _grads(slow, handle2, params2, batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize(
    "options",
    [
        {"permuted_source": "eval_pass"},
        {"perturbation": "noise", "noise_scale": 0.5},
        {"perturbation": "zero"},
        {"perturbation": "noise", "perturb_space": "input"},
        {"perturbation": "zero", "perturb_space": "input"},
        {"con_form": "cross_modal", "derangement": True, "permutation_method": "uniform"},
        {"ceb_weight": 0.1, "ceb_condition": "label"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_mcr_options_give_finite_gradients(options):
    method, handle, params, batch, _ = _setup(dict(synthetic.get_config("smoke").method, **options),
                                              ceb=bool(options.get("ceb_weight")))
    grads, _, _, _, mets = _grads(method, handle, params, batch)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in mets.values())
    enc = jax.tree.leaves(grads["encoders"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in enc) and sum(float(jnp.abs(g).sum()) for g in enc) > 0
    if options.get("perturbation") == "zero" and options.get("perturb_space") != "input":
        assert float(mets["mipd_x1"]) > 0


def test_mcr_regression_uses_l1_and_squared_difference():
    cfg, info, batch = _data()
    rinfo = DatasetInfo(name="toy", modalities=info.modalities, input_shapes=info.input_shapes, num_classes=1,
                        task="regression")
    rbatch = dict(batch, label=jnp.linspace(-3.0, 3.0, 16))
    method, handle, params, _, model = _setup(dict(cfg.method), info=rinfo, batch=rbatch)
    assert method.divergence == "mse"
    _, _, _, _, mets = _grads(method, handle, params, rbatch)
    out = model({m: rbatch[m] for m in method.modalities})
    np.testing.assert_allclose(mets["task"], jnp.mean(jnp.abs(out["logits"][:, 0] - rbatch["label"])), rtol=1e-5)


def test_mcr_config_errors():
    cfg, info, _ = _data()
    for bad, msg in [({"strategy": "selfish"}, "unknown game strategy"), ({"game_form": "two"}, "game_form"),
                     ({"num_permutations": 0}, "num_permutations"), ({"lambda": 1.0}, "unknown method 'mcr' options"),
                     ({"perturb_space": "input"}, "perturb_space 'input'")]:
        with pytest.raises(ValueError, match=msg):
            MCR(ml_collections.ConfigDict(dict(cfg.method, **bad)), info)
    model = MultimodalModel(info.modalities, {"x1": {"kind": "mlp", "in_features": 100, "out_dim": 8},
                                              "x2": {"kind": "mlp", "in_features": 100, "out_dim": 6}},
                            num_classes=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="equal latent"):
        MCR(ml_collections.ConfigDict(dict(cfg.method)), info).check_model(model)


def test_uni_pre_frozen_leaves_encoders_unchanged():
    method, handle, params, batch, _ = _setup({"name": "uni_pre", "freeze": True,
                                               "pretrained": {"x1": "/nonexistent", "x2": "/nonexistent"}})
    grads = _grads(method, handle, params, batch)[0]
    tx = method.make_optimizer(optax.adam(1e-2), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).sum()) == 0 for u in jax.tree.leaves(updates["encoders"]))
    assert sum(float(jnp.abs(u).sum()) for u in jax.tree.leaves(updates["fusion"])) > 0


def test_players_of_the_real_model():
    _, _, params, _, model = _setup({"name": "joint"})
    players = game.assign_players(params, model.modalities)
    assert players["encoders"]["x1"]["mlp"]["out"]["kernel"] == 0
    assert players["fusion"]["branches"]["x2"]["kernel"] == 1 and players["fusion"]["bias"] == game.SHARED


def test_mcr_eval_pass_builds_the_perturbed_predictions_from_the_eval_pass():
    """The reference's 2-modality model: permuted *and* kept latents come from the evaluation-mode
    pass; the clean prediction is the training pass's (dropout on, so the two passes differ)."""
    opts = dict(synthetic.get_config("smoke").method, permuted_source="eval_pass")
    method, handle, params, batch, model = build(opts, dropout=0.5)
    key = jax.random.PRNGKey(3)
    *_, mets = _grads(method, handle, params, batch, key=3)
    names = method.modalities
    clean = method.forward(handle.train_model(params), batch)["logits"]
    eval_model = handle.eval_model(params)
    z_eval = eval_model.encode({m: batch[m] for m in names}, None)
    z_train = method.forward(handle.train_model(params), batch)["latents"]
    assert not np.allclose(z_eval["x1"], z_train["x1"])  # the two passes really differ
    perms = losses.sample_permutations(jax.random.split(key)[0], opts["num_permutations"], batch["label"].shape[0])
    fuse = lambda xs: eval_model.fuse(dict(zip(names, xs, strict=True)))  # noqa: E731
    want = losses.mipd_divergences(clean, fuse, [z_eval[m] for m in names], perms)
    np.testing.assert_allclose([mets["mipd_x1"], mets["mipd_x2"]], want, rtol=2e-5, atol=1e-7)


def test_mcr_local_scope_needs_derangements():
    with pytest.raises(ValueError, match="derangement"):
        MCR(ml_collections.ConfigDict({"name": "mcr", "permutation_scope": "local", "derangement": False}),
            _data()[1])


@pytest.mark.parametrize("derangement", [True, False])
def test_mcr_passes_derangement_and_method_to_the_sampler(derangement, monkeypatch):
    from mcr_jax.methods import mcr as mcr_module

    seen = []
    real = mcr_module.sample_permutations

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mcr_module, "sample_permutations", spy)
    opts = dict(synthetic.get_config("smoke").method, derangement=derangement, permutation_method="uniform")
    method, handle, params, batch, _ = build(opts)
    method.gradients(handle, params, batch, jax.random.PRNGKey(0), {})
    assert seen and all(k["derangement"] is derangement and k["method"] == "uniform" for k in seen)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_mcr_noise_scale_changes_the_divergence_as_the_pure_loss(scale):
    """Noise perturbation on the latents: the method's D_m equals the pure loss's with the same key
    and scale (so the option is passed on and acts)."""
    opts = dict(synthetic.get_config("smoke").method, perturbation="noise", noise_scale=scale,
                branch_fast_path=False)
    method, handle, params, batch, _ = build(opts)
    key = jax.random.PRNGKey(5)
    *_, mets = _grads(method, handle, params, batch, key=5)
    model = handle.train_model(params)
    out = method.forward(model, batch)
    names = method.modalities
    want = losses.mipd_divergences(out["logits"], lambda xs: model.fuse(dict(zip(names, xs, strict=True))),
                                   [out["latents"][m] for m in names], perturbation="noise",
                                   key=jax.random.split(key)[1], num_samples=opts["num_permutations"],
                                   noise_scale=scale)
    np.testing.assert_allclose([mets["mipd_x1"], mets["mipd_x2"]], want, rtol=2e-5, atol=1e-7)
