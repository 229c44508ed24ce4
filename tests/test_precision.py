"""Mixed precision: ``model.dtype = "bfloat16"`` against float32.

The encoders and a non-separable fusion head compute in bfloat16; parameters, optimizer state,
batch-norm statistics, latents, logits and every loss reduction stay float32. Tolerances: bf16
keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2 % per operation); through a ResNet or a
transformer these add up to about 1-3 % of the output's norm, so the forward tolerance is 5 % of
the norm.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import synthetic
from mcr_jax import seeds as seeds_mod
from mcr_jax.models import MultimodalModel
from mcr_jax.models.layers import compute_dtype

ENCODERS = {
    "a": {"kind": "resnet18", "in_channels": 1, "widths": (8, 16, 16, 32), "blocks": (1, 1, 1, 1), "out_dim": 16},
    "v": {"kind": "transformer", "in_features": 12, "dim": 16, "max_len": 8},
}


def _model(dtype, fusion="concat_mlp"):
    return MultimodalModel(("a", "v"), ENCODERS, num_classes=5, fusion=fusion, dtype=dtype, rngs=nnx.Rngs(0))


def _inputs():
    return {"a": jax.random.normal(jax.random.key(1), (6, 32, 32)),
            "v": jax.random.normal(jax.random.key(2), (6, 8, 12))}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("fusion", ["linear", "concat_mlp", "transformer"])
def test_bf16_forward_is_close_to_float32_and_leaves_in_float32(fusion):
    x = _inputs()
    f32, bf16 = _model("float32", fusion)(x), _model("bfloat16", fusion)(x)
    for m in ("a", "v"):  # the ResNet and the transformer encoder
        assert bf16["latents"][m].dtype == jnp.float32
        assert _rel(f32["latents"][m], bf16["latents"][m]) < 0.05
        assert 0 < _rel(f32["latents"][m], bf16["latents"][m])  # it did compute in bf16
    assert bf16["logits"].dtype == jnp.float32 and _rel(f32["logits"], bf16["logits"]) < 0.05
    for m in ("a", "v"):
        assert bf16["unimodal"][m].dtype == jnp.float32


def test_bf16_convolutions_and_matmuls_run_in_bf16_with_float32_parameters():
    model = _model("bfloat16", "concat_mlp")
    graphdef, state = nnx.split(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)["logits"]

    text = str(jax.make_jaxpr(forward)(state, _inputs()))
    convs = [line for line in text.splitlines() if "conv_general_dilated" in line]
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert convs and all("bf16" in line for line in convs)
    assert any("bf16" in line for line in dots)  # encoder and fusion matmuls


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match=r"model.dtype must be one of \['bfloat16', 'float32'\]; got 'float16'"):
        compute_dtype("float16")
    cfg = synthetic.get_config("smoke")
    cfg.model.dtype = "fp16"
    from mcr_jax import guards
    from mcr_jax.config import resolve_config

    with pytest.raises(ValueError, match="model.dtype must be one of"):
        guards.validate_config(resolve_config(cfg))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MCR on the synthetic benchmark, 3 seeds, float32 and bf16 (same data, same seeds)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = synthetic.get_config("smoke")
        cfg.data.num_train, cfg.data.num_validation, cfg.data.num_test = 480, 300, 120
        cfg.train.num_epochs, cfg.train.patience = 6, 0
        cfg.parallel.num_devices = 1
        cfg.model.dtype = dtype
        out[dtype] = seeds_mod.train_seeds(cfg, str(tmp_path_factory.mktemp(dtype)), [0, 1, 2])["per_seed"]
    return out


def test_a_short_bf16_run_reaches_the_float32_validation_accuracy(trained):
    acc = {d: np.array([r["validation"]["heads"]["fused"]["accuracy"] for r in runs]) for d, runs in trained.items()}
    assert acc["float32"].mean() > 0.5  # it learned (5 classes: chance is 0.2)
    # Within noise: the paired difference over the 3 seeds stays inside 2 points plus two of its own
    # standard errors (the seed-to-seed spread of this run is about 1-2 points).
    diff = acc["bfloat16"] - acc["float32"]
    print("validation accuracy, float32", acc["float32"], "bf16", acc["bfloat16"])
    assert abs(diff.mean()) <= 0.02 + 2 * diff.std(ddof=1) / math.sqrt(len(diff)), (acc, diff)


def test_bf16_mipd_stays_within_its_bounds(trained):
    for run in trained["bfloat16"]:
        values = [v for split in ("validation", "test") for v in run[split]["mipd"].values()]
        assert values and all(0.0 <= v <= math.log(2) + 1e-6 for v in values), values
        assert run["config"]["model"]["dtype"] == "bfloat16"
