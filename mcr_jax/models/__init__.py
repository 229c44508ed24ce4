"""Flax NNX models: encoders, fusion heads, unimodal heads, CEB decoder, the multimodal model."""

from mcr_jax.models.encoders import (
    ENCODERS,
    MLPEncoder,
    ResNet18Encoder,
    TransformerEncoder,
    make_encoder,
)
from mcr_jax.models.fusion import (
    FUSIONS,
    CEBDecoder,
    ConcatMLPFusion,
    FiLMFusion,
    FusionHead,
    GatedFusion,
    LinearLateFusion,
    TransformerFusion,
    make_fusion,
)
from mcr_jax.models.multimodal import MultimodalModel

__all__ = [
    "CEBDecoder",
    "ConcatMLPFusion",
    "ENCODERS",
    "FUSIONS",
    "FiLMFusion",
    "FusionHead",
    "GatedFusion",
    "LinearLateFusion",
    "MLPEncoder",
    "MultimodalModel",
    "ResNet18Encoder",
    "TransformerEncoder",
    "TransformerFusion",
    "make_encoder",
    "make_fusion",
]
