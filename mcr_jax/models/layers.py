"""Small building blocks shared by encoders and fusion heads.

Everything here is shape-generic over leading batch axes unless stated otherwise and free of
implicit rank promotion (the tests run with ``jax_numpy_rank_promotion="raise"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def check_modality_names(modalities: Sequence[str], owner: str) -> tuple[str, ...]:
    """The modality names as a tuple, after checking there are at least 2 and no duplicates."""
    modalities = tuple(modalities)
    if len(modalities) < 2:
        raise ValueError(f"{owner} needs at least 2 modalities, got {modalities}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modality names must be unique, got {modalities}")
    return modalities


#: the compute dtypes a model may use (``model.dtype``); parameters are float32 either way
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype of a ``model.dtype`` name; a ValueError naming the allowed ones otherwise."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(COMPUTE_DTYPES)}; got {name!r}.")
    return COMPUTE_DTYPES[name]


def compute_in(module: nnx.Module, dtype) -> nnx.Module:
    """Makes every flax layer inside ``module`` (Linear, Conv, LayerNorm, BatchNorm, attention: the
    layers with a ``param_dtype``) compute in ``dtype``: inputs and parameters are cast to it for the
    computation, while the parameters themselves (and batch-norm statistics, which flax keeps in at
    least float32) stay as they were created. Returns ``module``."""
    for _, sub in nnx.iter_modules(module):
        if hasattr(sub, "param_dtype") and hasattr(sub, "dtype"):
            sub.dtype = dtype
    return module


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32 when it is a lower-precision float (bf16 compute), unchanged otherwise
    (float32, float64, integers)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def make_dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """An ``nnx.Dropout`` that only holds an RNG stream when it actually drops something.

    A rate of 0 gives an identity layer without RNG state, so models built without dropout carry
    no ``rngs`` variables in their state.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must lie in [0, 1), got {rate}")
    return nnx.Dropout(rate, rngs=rngs if rate > 0.0 else None)


class MLP(nnx.Module):
    """Linear → ReLU → dropout for every hidden width, then a final linear layer.

    Maps ``[..., in_features]`` to ``[..., out_features]``; the output is not activated.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        widths = (in_features, *tuple(hidden))
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.dropout = make_dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(widths[-1], out_features, rngs=rngs)
        self.in_features = in_features
        self.out_features = out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in_features]`` → ``[..., out_features]``."""
        for layer in self.layers:
            x = self.dropout(nnx.relu(layer(x)))
        return self.out(x)


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU).

    Maps ``[B, T, dim]`` to ``[B, T, dim]``. ``mask`` is a boolean attention mask broadcastable to
    ``[B, heads, T, T]`` (True = may attend), e.g. from ``nnx.make_attention_mask``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=dim,
            qkv_features=dim,
            out_features=dim,
            dropout_rate=dropout,
            deterministic=False,
            decode=False,
            keep_rngs=dropout > 0.0,
            rngs=rngs,
        )
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)
        self.dropout = make_dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``[B, T, dim]`` → ``[B, T, dim]``."""
        x = x + self.dropout(self.attn(self.norm1(x), mask=mask))
        h = self.dropout(nnx.gelu(self.fc1(self.norm2(x))))
        return x + self.dropout(self.fc2(h))


def mean_over_steps(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` ``[B, T, D]`` over the steps where ``mask`` ``[B, T]`` is True → ``[B, D]``.

    Masked steps contribute exactly nothing (they are selected away, not multiplied by 0, so even
    NaN padding is harmless). A row with no valid step gives zeros.
    """
    m = mask[..., None]
    total = jnp.sum(jnp.where(m, x, jnp.zeros_like(x)), axis=-2)
    count = jnp.maximum(jnp.sum(m.astype(x.dtype), axis=-2), 1.0)
    return total / count
