"""Contracts of mcr_jax.models: shapes, linear-fusion algebra, gradients, modes, paths, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mcr_jax.models import (
    CEBDecoder,
    LinearLateFusion,
    MLPEncoder,
    MultimodalModel,
    ResNet18Encoder,
    TransformerEncoder,
    make_encoder,
    make_fusion,
)

B, C = 4, 3
FUSION_KINDS = ("linear", "concat_mlp", "film", "gated", "transformer")
# Equal widths keep the number of distinct shapes (hence eager compilations) small.
TINY_RESNET = dict(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1))


def _rngs(seed=0):
    """RBG keys: one XLA op per random draw, much cheaper to compile eagerly than threefry."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# One tiny encoder config per kind, with an input maker for each.
ENCODER_CONFIGS = {
    "spec": dict(kind="resnet18", in_channels=1, **TINY_RESNET),  # spectrogram [B, H, W]
    "frames": dict(kind="resnet18", in_channels=3, out_dim=6, **TINY_RESNET),  # [B, T, H, W, 3]
    "seq": dict(kind="transformer", in_features=5, dim=8, depth=1, heads=2, max_len=8),  # [B, T, 5]
    "vec": dict(kind="mlp", in_features=7, hidden=(6,), out_dim=5),  # [B, 7]
}
INPUT_SHAPES = {"spec": (B, 12, 12), "frames": (B, 2, 12, 12, 3), "seq": (B, 6, 5), "vec": (B, 7)}


def _normal(seed, shape):
    """Test data from NumPy: no per-shape compilation of a JAX random kernel."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(names, seed=0):
    return {n: _normal((seed, i), INPUT_SHAPES[n]) for i, n in enumerate(names)}


def _model(names, fusion="linear", seed=0, **kwargs):
    return MultimodalModel(
        names,
        {n: ENCODER_CONFIGS[n] for n in names},
        num_classes=C,
        fusion=fusion,
        rngs=_rngs(seed),
        **kwargs,
    )


def _latents(dims, seed=0, lead=(B,)):
    return {n: _normal((seed, i), (*lead, d)) for i, (n, d) in enumerate(dims.items())}


def _jit_apply(module, *args, **kwargs):
    """``module(*args, **kwargs)`` compiled as one program (cheaper than compiling op by op)."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda st, a, k: nnx.merge(graphdef, st)(*a, **k))(state, args, kwargs)


def _param_paths(model):
    return [tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("fusion", FUSION_KINDS)
@pytest.mark.parametrize(
    "names", [("spec", "seq"), ("frames", "vec"), ("spec", "seq", "vec")], ids=lambda n: "+".join(n)
)
def test_output_shapes(names, fusion):
    model = _model(names, fusion)
    out = model({**_inputs(names), "label": jnp.zeros((B,), jnp.int32)})  # extra key is ignored
    assert out["logits"].shape == (B, C)
    assert model.modalities == names
    for n in names:
        assert out["latents"][n].shape == (B, model.latent_dims[n])
        assert out["unimodal"][n].shape == (B, C)
    assert all(np.isfinite(np.asarray(out["logits"])).ravel())


def test_regression_single_output_and_ceb_decoder():
    names = ("vec", "seq")
    model = _model(names, ceb=True)
    out = MultimodalModel(names, {n: ENCODER_CONFIGS[n] for n in names}, num_classes=1, rngs=_rngs(0))(_inputs(names))
    assert out["logits"].shape == (B, 1)
    total = sum(model.latent_dims.values())
    recon = model.ceb_decoder(jax.lax.stop_gradient(model(_inputs(names))["logits"]))
    assert recon.shape == (B, total)
    ceb_paths = [p for p in _param_paths(model) if p[0] == "ceb_decoder"]
    assert sorted(ceb_paths) == [("ceb_decoder", "fc1", "kernel"), ("ceb_decoder", "fc2", "kernel")]
    assert _model(names).ceb_decoder is None


def test_ceb_decoder_matches_numpy():
    dec = CEBDecoder(3, 4, 10, rngs=_rngs(1))
    y = _normal(2, (5, 3))
    w1, w2 = (np.asarray(dec.fc1.kernel[...], np.float64), np.asarray(dec.fc2.kernel[...], np.float64))
    expected = np.maximum(np.asarray(y, np.float64) @ w1, 0.0) @ w2
    np.testing.assert_allclose(np.asarray(dec(y)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- linear late fusion


def test_linear_fusion_equals_combine_of_branches_and_numpy():
    dims = {"a": 3, "b": 5, "c": 2}
    fusion = LinearLateFusion(tuple(dims), dims, C, rngs=_rngs(0))
    fusion.bias[...] = jnp.arange(C, dtype=jnp.float32) + 0.5  # non-zero bias, so it is checked
    for lead in [(B,), (2, B)]:  # plain batch and stacked [S, B] rows
        z = _latents(dims, lead=lead)
        fused = fusion.fuse(z)
        np.testing.assert_array_equal(np.asarray(fused), np.asarray(fusion.combine(fusion.branch_logits(z))))
        expected = sum(
            np.asarray(z[n], np.float64) @ np.asarray(fusion.branches[n].kernel[...], np.float64) for n in dims
        ) + np.asarray(fusion.bias[...], np.float64)
        assert fused.shape == (*lead, C)
        np.testing.assert_allclose(np.asarray(fused), expected, rtol=1e-5, atol=1e-5)


def test_linear_fusion_perturbing_one_latent_moves_only_its_branch():
    dims = {"a": 3, "b": 4, "c": 2}
    fusion = LinearLateFusion(tuple(dims), dims, C, rngs=_rngs(0))
    z = _latents(dims)
    z_perm = {**z, "a": z["a"][jnp.array([1, 2, 3, 0])]}
    before, after = fusion.branch_logits(z), fusion.branch_logits(z_perm)
    assert not np.allclose(np.asarray(before["a"]), np.asarray(after["a"]))
    for n in ("b", "c"):
        np.testing.assert_array_equal(np.asarray(before[n]), np.asarray(after[n]))
    np.testing.assert_allclose(
        np.asarray(fusion(z_perm) - fusion(z)), np.asarray(after["a"] - before["a"]), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", FUSION_KINDS)
@pytest.mark.parametrize("num_modalities", [2, 3])
def test_fusion_gradient_reaches_every_latent(kind, num_modalities):
    dims = dict(list({"a": 3, "b": 4, "c": 5}.items())[:num_modalities])
    fusion = make_fusion(kind, tuple(dims), dims, C, rngs=_rngs(0))
    z = _latents(dims)
    w = _normal(7, (B, C))
    graphdef, state = nnx.split(fusion)
    loss = lambda lat, st: jnp.sum(nnx.merge(graphdef, st)(lat) * w)
    grads = jax.jit(jax.grad(loss))(z, state)  # one compilation instead of many eager ones
    for n in dims:
        assert grads[n].shape == z[n].shape
        assert float(jnp.max(jnp.abs(grads[n]))) > 0.0, f"no gradient reaches latent {n!r}"


# ----------------------------------------------------------------------------- train / eval


def test_batchnorm_train_updates_stats_eval_is_deterministic():
    enc = ResNet18Encoder(1, **TINY_RESNET, rngs=_rngs(0))
    x = 3.0 + 2.0 * _normal(1, (B, 12, 12))
    # nnx.state holds live references to the variables: copy the values out.
    batch_stats = lambda: [np.array(v) for v in jax.tree.leaves(nnx.state(enc, nnx.BatchStat))]
    stats0 = batch_stats()
    assert len(stats0) == 2 * 12  # mean, var of 12 batch norms: stem, 4 blocks × 2, 3 stride-2 shortcuts

    enc.eval()
    y_eval = enc(x)
    np.testing.assert_array_equal(np.asarray(enc(x)), np.asarray(y_eval))
    for after, before in zip(batch_stats(), stats0, strict=True):
        np.testing.assert_array_equal(after, before)

    enc.train()
    y_train = enc(x)
    changed = [not np.allclose(a, b) for a, b in zip(batch_stats(), stats0, strict=True)]
    assert all(changed), "train mode must update every batch-norm statistic"
    assert not np.allclose(np.asarray(y_train), np.asarray(y_eval))


def test_dropout_active_only_in_train_mode():
    enc = MLPEncoder(7, hidden=(64,), out_dim=5, dropout=0.5, rngs=_rngs(0))
    x = _normal(1, (B, 7))
    enc.train()
    assert not np.allclose(np.asarray(enc(x)), np.asarray(enc(x)))
    enc.eval()
    np.testing.assert_array_equal(np.asarray(enc(x)), np.asarray(enc(x)))
    manual = enc.mlp.out(nnx.relu(enc.mlp.layers[0](x)))
    np.testing.assert_allclose(np.asarray(enc(x)), np.asarray(manual), rtol=1e-6)


# ----------------------------------------------------------------------------- parameter paths


def test_parameter_paths_carry_modality_names():
    names = ("audio", "video")
    model = MultimodalModel(
        names,
        {"audio": ENCODER_CONFIGS["spec"], "video": ENCODER_CONFIGS["frames"]},
        num_classes=C,
        rngs=_rngs(0),
    )
    paths = _param_paths(model)
    assert {p[0] for p in paths} == {"encoders", "heads", "fusion"}
    for p in paths:
        if p[0] in ("encoders", "heads"):
            assert p[1] in names, p
    fusion_paths = sorted(p for p in paths if p[0] == "fusion")
    assert fusion_paths == [
        ("fusion", "bias"),
        ("fusion", "branches", "audio", "kernel"),
        ("fusion", "branches", "video", "kernel"),
    ]
    for n in names:
        assert ("heads", n, "kernel") in paths and ("heads", n, "bias") in paths
        assert any(p[:2] == ("encoders", n) for p in paths)


@pytest.mark.parametrize("kind", ["concat_mlp", "film", "gated", "transformer"])
def test_non_separable_fusions_keep_parameters_shared(kind):
    dims = {"audio": 3, "video": 4}
    fusion = make_fusion(kind, tuple(dims), dims, C, rngs=_rngs(0))
    for path in _param_paths(fusion):
        assert not set(path) & set(dims), f"{path} would be assigned to a modality player"


# ----------------------------------------------------------------------------- encoders


def test_resnet_frames_equal_per_frame_mean():
    enc = ResNet18Encoder(3, **TINY_RESNET, out_dim=6, rngs=_rngs(0))
    enc.eval()  # batch norm statistics must not depend on how frames are batched
    frames = _normal(3, (2, 3, 12, 12, 3))
    per_frame = jnp.stack([_jit_apply(enc, frames[:, t]) for t in range(frames.shape[1])], axis=1)
    np.testing.assert_allclose(
        np.asarray(_jit_apply(enc, frames)), np.asarray(jnp.mean(per_frame, axis=1)), rtol=1e-5, atol=1e-5
    )


def test_resnet_spectrogram_gets_channel_axis_and_checks_channels():
    enc = ResNet18Encoder(1, **TINY_RESNET, rngs=_rngs(0))
    enc.eval()
    x = _normal(4, (2, 12, 12))
    np.testing.assert_array_equal(np.asarray(enc(x)), np.asarray(enc(x[..., None])))
    with pytest.raises(ValueError, match="channels"):
        enc(jnp.zeros((2, 12, 12, 3)))


def test_transformer_ignores_padded_steps():
    enc = TransformerEncoder(5, dim=8, depth=2, heads=2, max_len=8, rngs=_rngs(0))
    lengths = np.array([6, 3, 1, 4])
    mask = jnp.asarray(np.arange(6)[None, :] < lengths[:, None])
    x = _normal(5, (B, 6, 5))
    garbage = _normal(6, x.shape) * 100.0
    x_other_pad = jnp.where(mask[..., None], x, garbage)
    out = enc(x, mask=mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(enc(x_other_pad, mask=mask)))
    # A padded row equals encoding just its real steps without padding.
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(_jit_apply(enc, x[1:2, :3])[0]), rtol=1e-5, atol=1e-5)
    # ...while a real step does matter.
    x_real_changed = x.at[1, 0].add(1.0)
    assert not np.allclose(np.asarray(enc(x_real_changed, mask=mask)[1]), np.asarray(out[1]))


def test_model_passes_masks_to_transformer_encoders():
    names = ("seq", "vec")
    model = _model(names)
    inputs = _inputs(names)
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [2], [3], [5]]))
    z_masked = model.encode(inputs, masks={"seq": mask})["seq"]
    z_plain = model.encode(inputs)["seq"]
    assert not np.allclose(np.asarray(z_masked), np.asarray(z_plain))
    np.testing.assert_allclose(
        np.asarray(z_masked), np.asarray(model.encoders["seq"](inputs["seq"], mask=mask)), rtol=1e-6
    )
    with pytest.raises(ValueError, match="takes no mask"):
        model.encode(inputs, masks={"vec": jnp.ones((B, 7), bool)})


# ----------------------------------------------------------------------------- errors and factories


def test_missing_modality_and_wrong_rank_raise():
    names = ("spec", "vec")
    model = _model(names)
    inputs = _inputs(names)
    with pytest.raises(ValueError, match="lack modalities.*'vec'"):
        model({"spec": inputs["spec"], "label": jnp.zeros((B,))})
    with pytest.raises(ValueError, match="'vec'.*rank"):
        model({**inputs, "vec": inputs["vec"][:, :, None]})
    with pytest.raises(ValueError, match="'spec'.*rank"):
        model({**inputs, "spec": jnp.zeros((B, 12))})
    with pytest.raises(ValueError, match="batch size"):
        model({**inputs, "vec": inputs["vec"][:2]})


def test_factories_reject_unknown_kinds_and_check_dims():
    with pytest.raises(ValueError, match="unknown encoder kind"):
        make_encoder("lstm", rngs=_rngs(0))
    with pytest.raises(ValueError, match="unknown fusion kind"):
        make_fusion("bilinear", ("a", "b"), {"a": 2, "b": 2}, C, rngs=_rngs(0))
    with pytest.raises(ValueError, match="latent_dims"):
        MultimodalModel(
            ("a", "b"),
            {n: ENCODER_CONFIGS["vec"] for n in "ab"},
            num_classes=C,
            latent_dims={"a": 5, "b": 9},
            rngs=_rngs(0),
        )
    fusion = make_fusion("linear", ("a", "b"), {"a": 2, "b": 3}, C, rngs=_rngs(0))
    with pytest.raises(ValueError, match="expected"):
        fusion({"a": jnp.zeros((B, 2)), "b": jnp.zeros((B, 2))})


# ----------------------------------------------------------------------------- jit


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_split_merge_matches_eager(mode):
    names = ("spec", "seq", "vec")
    model = _model(names, fusion="linear")
    getattr(model, mode)()
    inputs = _inputs(names, seed=1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits_fn(state, inputs):
        return nnx.merge(graphdef, state)(inputs)["logits"]

    jitted = logits_fn(state, inputs)
    eager = model(inputs)["logits"]
    # Train-mode batch norm on 4 rows amplifies float re-association differences a little.
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-4, atol=1e-4)
