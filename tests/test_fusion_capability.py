"""A new separable fusion head needs one class and one registry line: the methods read its declared
capabilities (``separable``, ``branch_logits`` / ``combine`` / ``shared_offset``), not its type."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import players
from mcr_jax.models import FUSIONS, FusionHead, build_model, register_fusion
from mcr_jax.train import train_and_evaluate


class ScaledLateFusion(FusionHead):
    """ℓ = Σ_m s_m · z_m W_m + b: linear late fusion with a learned scale per modality."""

    separable = True

    def __init__(self, modalities, latent_dims, num_classes, *, rngs):
        self._init_layout(modalities, latent_dims, num_classes)
        self.branches = nnx.Dict({m: nnx.Dict({"proj": nnx.Linear(self.latent_dims[m], self.num_classes,
                                                                  use_bias=False, rngs=rngs),
                                               "scale": nnx.Param(jnp.ones(()))})
                                  for m in self.modalities})
        self.bias = nnx.Param(jnp.zeros((self.num_classes,)))

    def branch_logits(self, latents):
        self._check(latents)
        return {m: self.branches[m]["scale"][...] * self.branches[m]["proj"](latents[m]) for m in self.modalities}

    def combine(self, branch_logits):
        out = sum(branch_logits[m] for m in self.modalities)
        return out + self.bias[...].reshape((1,) * (out.ndim - 1) + (-1,))

    def shared_offset(self):
        return self.bias[...]

    def __call__(self, latents):
        return self.combine(self.branch_logits(latents))


@pytest.fixture
def scaled_late():
    register_fusion("scaled_late_test", ScaledLateFusion)
    yield "scaled_late_test"
    FUSIONS.pop("scaled_late_test")


def _config(method: str, fusion: str):
    cfg = synthetic.get_config(f"smoke,method={method}")
    cfg.model.fusion = fusion
    cfg.parallel.num_devices = 1
    cfg.train.num_epochs = 2
    return cfg


def test_a_registered_separable_head_trains_mcr_fast_path_and_ogm_ge(scaled_late, tmp_path):
    from mcr_jax.data import load
    from mcr_jax.methods import get_method

    cfg = _config("mcr", scaled_late)
    info = load(cfg.data).info
    model = build_model(cfg.model, info, seed=0)
    method = get_method(cfg.method, info)
    assert method._fast_path(model)  # permutes branch logits, as for linear late fusion
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    owners = players.assign_players(params, info.modalities)
    assert owners["fusion"]["branches"]["x2"]["scale"] == 1 and owners["fusion"]["bias"] == players.SHARED
    latents = {m: jnp.ones((3, model.fusion.latent_dims[m])) for m in info.modalities}
    np.testing.assert_allclose(model.fusion(latents), model.fusion.combine(model.fusion.branch_logits(latents)))
    for name in ("mcr", "ogm_ge"):
        res = train_and_evaluate(_config(name, scaled_late), str(tmp_path / name))
        assert res["config"]["model"]["fusion"] == scaled_late and res["epochs_run"] == 2
        assert np.isfinite(res["test"]["heads"]["fused"]["accuracy"])


def test_methods_refuse_heads_without_the_capability(scaled_late):
    from mcr_jax.data import load
    from mcr_jax.methods import get_method

    info = load(_config("mcr", scaled_late).data).info
    model = build_model(_config("mmcosine", scaled_late).model, info, seed=0)
    with pytest.raises(ValueError, match="branch_kernel"):  # separable, but its branches are not one matrix
        get_method(ml_collections.ConfigDict({"name": "mmcosine"}), info).check_model(model)
    concat = build_model(_config("ogm_ge", "concat_mlp").model, info, seed=0)
    with pytest.raises(ValueError, match="separable fusion head"):
        get_method(ml_collections.ConfigDict({"name": "ogm_ge"}), info).check_model(concat)
    with pytest.raises(ValueError, match="already registered"):
        register_fusion(scaled_late, FusionHead)


def test_players_groups_and_leaf_ids():
    params = {"encoders": {"x1": {"w": jnp.zeros(2)}, "x2": {"w": jnp.zeros(2), "b": jnp.zeros(1)}},
              "fusion": {"branches": {"x2": {"k": jnp.zeros(1)}}, "bias": jnp.zeros(1)}}
    # flatten order: encoders/x1/w, encoders/x2/b, encoders/x2/w, fusion/bias, fusion/branches/x2/k
    assert players.leaf_ids(params, ("x1", "x2")) == {"x1": [0], "x2": [1, 2]}
    flags = jax.tree_util.tree_map_with_path(lambda p, _: players.in_group(p, "branches"), params)
    assert jax.tree.leaves(flags) == [False, False, False, False, True]
    with pytest.raises(ValueError, match="no parameters under fusion/branches"):
        players.leaf_ids(params, ("x1", "x2"), "branches")
