"""ResNet-18-style 2D CNN encoder for spectrograms and video frames (channels-last).

The layout follows the classic ResNet-18 used by the paper's audio-visual setups: a 7×7/2 stem
convolution with batch norm and a 3×3/2 max-pool, four stages of basic blocks (strides 1, 2, 2, 2),
global average pooling. Padding is explicit so that spatial sizes match the PyTorch layout
(``padding=3`` for the stem, ``1`` for 3×3 convolutions, ``0`` for 1×1 shortcuts). Batch-norm
momentum 0.9 and epsilon 1e-5 are PyTorch's defaults (PyTorch momentum 0.1 ≙ flax 0.9).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        rngs=rngs,
    )


def _bn(features: int, momentum: float, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=momentum, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3×3 conv + BN layers with an identity (or 1×1 conv + BN) shortcut.

    ``[N, H, W, cin]`` → ``[N, ceil(H / stride), ceil(W / stride), cout]``.
    """

    def __init__(self, cin: int, cout: int, stride: int, *, bn_momentum: float, rngs: nnx.Rngs):
        self.conv1 = _conv(cin, cout, 3, stride, rngs=rngs)
        self.bn1 = _bn(cout, bn_momentum, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, 1, rngs=rngs)
        self.bn2 = _bn(cout, bn_momentum, rngs=rngs)
        if stride != 1 or cin != cout:
            self.shortcut_conv = _conv(cin, cout, 1, stride, rngs=rngs)
            self.shortcut_bn = _bn(cout, bn_momentum, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(h + x)


class ResNet18Encoder(nnx.Module):
    """ResNet-18-style encoder: one modality's images/spectrograms/frames → latent ``[B, D]``.

    Accepted inputs (channels-last):

    - ``[B, H, W]``: a single-channel image such as a spectrogram (needs ``in_channels == 1``);
    - ``[B, H, W, C]``: an image with ``C == in_channels``;
    - ``[B, T, H, W, C]``: T video frames per sample. The frames are folded into the batch
      (``B·T`` images, so batch norm sees all frames), encoded, then mean-pooled over frames.

    ``D = out_dim`` when given (a linear projection after pooling), else ``widths[-1]``.
    ``widths``/``blocks`` make a smoke model tiny, e.g. ``widths=(4, 8, 8, 16), blocks=(1,1,1,1)``.
    """

    input_ranks = (3, 4, 5)
    accepts_mask = False

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        out_dim: int | None = None,
        *,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ):
        widths, blocks = tuple(widths), tuple(blocks)
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths} and blocks {blocks} must be non-empty, equal length")
        self.in_channels = in_channels
        self.stem_conv = _conv(in_channels, widths[0], 7, 2, rngs=rngs)
        self.stem_bn = _bn(widths[0], bn_momentum, rngs=rngs)
        layers = []
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(cin, width, stride, bn_momentum=bn_momentum, rngs=rngs))
                cin = width
        self.blocks = nnx.List(layers)
        self.proj = nnx.Linear(cin, out_dim, rngs=rngs) if out_dim is not None else None
        self.out_features = out_dim if out_dim is not None else cin

    def _encode_images(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, C]`` → ``[N, widths[-1]]`` (global average pool)."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W]`` | ``[B, H, W, C]`` | ``[B, T, H, W, C]`` → ``[B, D]``."""
        if x.ndim not in self.input_ranks:
            raise ValueError(
                f"ResNet18Encoder expects [B, H, W], [B, H, W, C] or [B, T, H, W, C] inputs, got shape {x.shape}"
            )
        if x.ndim == 3:
            if self.in_channels != 1:
                raise ValueError(
                    f"a [B, H, W] input {x.shape} has one channel but in_channels={self.in_channels};"
                    " add the channel axis last"
                )
            x = x[..., None]
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"input shape {x.shape} has {x.shape[-1]} channels (last axis), expected in_channels={self.in_channels}"
            )
        if x.ndim == 5:
            b, t = x.shape[:2]
            z = self._encode_images(x.reshape((b * t, *x.shape[2:])))
            z = jnp.mean(z.reshape((b, t, z.shape[-1])), axis=1)
        else:
            z = self._encode_images(x)
        if self.proj is not None:
            z = self.proj(z)
        return z
