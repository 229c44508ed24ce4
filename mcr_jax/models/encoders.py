"""Per-modality encoders f_m(x_m; θ_m) → z_m ∈ R^{D_m} and their factory.

Every encoder is an ``nnx.Module`` taking ``rngs`` as a keyword, exposes ``out_features`` (its
latent size D), ``input_ranks`` (the input ranks it accepts, batch axis included) and
``accepts_mask`` (whether ``__call__`` takes a ``mask`` keyword). ``model.train()`` /
``model.eval()`` switch their dropout and batch-norm layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mcr_jax.models.layers import MLP, TransformerBlock, make_dropout, mean_over_steps
from mcr_jax.models.resnet import ResNet18Encoder


class MLPEncoder(nnx.Module):
    """MLP encoder for vector inputs: ``[B, in_features]`` → ``[B, out_dim]``.

    Hidden layers are Linear → ReLU → dropout; the output layer is linear (not activated).
    """

    input_ranks = (2,)
    accepts_mask = False

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (128,),
        out_dim: int = 64,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.mlp = MLP(in_features, tuple(hidden), out_dim, dropout=dropout, rngs=rngs)
        self.in_features = in_features
        self.out_features = out_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, in_features]`` → ``[B, out_dim]``."""
        if x.ndim != 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"MLPEncoder expects [B, {self.in_features}] inputs, got shape {x.shape}")
        return self.mlp(x)


class TransformerEncoder(nnx.Module):
    """Transformer encoder for feature sequences: ``[B, T, in_features]`` (+ mask) → ``[B, dim]``.

    Linear input projection, learned positional embedding (``max_len`` positions), ``depth``
    pre-LN blocks, final LayerNorm, and a mean over the real steps. ``mask`` ``[B, T]`` (True =
    real step, default all True) hides padded steps as attention keys and from the pooling, and
    padded inputs are zeroed first, so the output does not depend on what the padding holds.
    """

    input_ranks = (3,)
    accepts_mask = True

    def __init__(
        self,
        in_features: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 512,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.max_len = max_len
        self.out_features = dim
        self.input_proj = nnx.Linear(in_features, dim, rngs=rngs)
        self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, dim), jnp.float32))
        self.dropout = make_dropout(dropout, rngs=rngs)
        self.blocks = nnx.List(
            [TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``x`` ``[B, T, in_features]``, ``mask`` ``[B, T]`` bool or None → ``[B, dim]``."""
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"TransformerEncoder expects [B, T, {self.in_features}] inputs, got shape {x.shape}")
        b, t, _ = x.shape
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        if mask is None:
            mask = jnp.ones((b, t), dtype=bool)
        elif mask.shape != (b, t):
            raise ValueError(f"mask shape {mask.shape} does not match inputs {x.shape}: want [B, T]")
        mask = mask.astype(bool)
        x = jnp.where(mask[..., None], x, jnp.zeros_like(x))
        h = self.input_proj(x) + self.pos_embedding[...][None, :t]
        h = self.dropout(h)
        # Every query may attend to the real keys only: [B, 1, T, T].
        attn_mask = nnx.make_attention_mask(jnp.ones((b, t), dtype=bool), mask)
        for block in self.blocks:
            h = block(h, mask=attn_mask)
        return mean_over_steps(self.norm(h), mask)


ENCODERS: dict[str, type[nnx.Module]] = {
    "mlp": MLPEncoder,
    "resnet18": ResNet18Encoder,
    "transformer": TransformerEncoder,
}


def make_encoder(kind: str, **kwargs: Any) -> nnx.Module:
    """Build an encoder by name: ``"mlp"``, ``"resnet18"`` or ``"transformer"``.

    ``kwargs`` go to the encoder's constructor and must include ``rngs``, e.g.
    ``make_encoder("mlp", in_features=100, hidden=(64,), out_dim=32, rngs=nnx.Rngs(0))``.
    """
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[kind](**kwargs)


__all__ = ["ENCODERS", "MLPEncoder", "ResNet18Encoder", "TransformerEncoder", "make_encoder"]
