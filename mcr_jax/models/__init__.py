"""Flax NNX models: encoders, fusion heads, unimodal heads, CEB decoder, the multimodal model,
and :func:`build_model` (config + dataset info → model)."""

from mcr_jax.models.build import build_model, encoder_spec
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
    is_separable,
    make_fusion,
    register_fusion,
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
    "build_model",
    "encoder_spec",
    "is_separable",
    "make_encoder",
    "make_fusion",
    "register_fusion",
]
