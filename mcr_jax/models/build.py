"""From ``config.model`` and a dataset's :class:`~mcr_jax.data.types.DatasetInfo` to a model.

    model = build_model(config.model, dataset.info, seed=0)

Each modality gets the encoder ``model.encoders[<modality>]`` (a full spec) or, failing that, the
kind ``model.encoder`` or a default by input rank (a vector → ``mlp``, anything larger →
``resnet18``); the remaining fields of the spec are filled from the model config and the input
shape (see :func:`encoder_spec`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flax import nnx

from mcr_jax.models.multimodal import MultimodalModel

if TYPE_CHECKING:
    from mcr_jax.data.types import DatasetInfo

__all__ = ["DEFAULTS", "build_model", "encoder_spec"]

#: the ``model`` section's common fields and their defaults (the experiment configs start from
#: these); encoder- and fusion-specific fields (``encoders``, ``widths``, ``blocks``,
#: ``fusion_kwargs``) are optional.
DEFAULTS = dict(hidden=(128,), latent_dim=64, dropout=0.0, fusion="linear", ceb=False, dtype="float32")


def encoder_spec(modality: str, shape: tuple[int, ...], model_cfg) -> dict:
    """The encoder config for one modality: ``model.encoders[modality]`` or a default by input rank."""
    per = model_cfg.get("encoders", None) or {}
    spec = dict(per.get(modality, {})) if modality in per else {}
    kind = spec.get("kind", None) or model_cfg.get("encoder", None) or _default_kind(shape)
    spec["kind"] = kind
    latent = int(model_cfg.get("latent_dim", DEFAULTS["latent_dim"]))
    if kind == "mlp":
        spec.setdefault("in_features", int(np.prod(shape)))
        spec.setdefault("hidden", tuple(model_cfg.get("hidden", DEFAULTS["hidden"])))
        spec.setdefault("out_dim", latent)
        spec.setdefault("dropout", float(model_cfg.get("dropout", DEFAULTS["dropout"])))
    elif kind == "transformer":
        spec.setdefault("in_features", int(shape[-1]))
        spec.setdefault("dim", latent)
        spec.setdefault("max_len", max(int(shape[0]), 8))
    elif kind == "resnet18":
        spec.setdefault("in_channels", int(shape[-1]) if len(shape) >= 3 else 1)
        spec.setdefault("widths", tuple(model_cfg.get("widths", (64, 128, 256, 512))))
        spec.setdefault("blocks", tuple(model_cfg.get("blocks", (2, 2, 2, 2))))
        spec.setdefault("out_dim", latent)
    return spec


def _default_kind(shape) -> str:
    if len(shape) == 1:
        return "mlp"
    if len(shape) == 2:
        return "resnet18"  # a spectrogram [F, T]; sequences should name "transformer" explicitly
    return "resnet18"


def build_model(model_cfg, info: DatasetInfo, *, seed: int) -> MultimodalModel:
    """The :class:`MultimodalModel` for a dataset, from ``config.model``.

    ``model`` fields: ``encoder`` (kind for every modality) or ``encoders.<modality>`` (full spec),
    ``latent_dim``, ``hidden`` (MLP), ``widths``/``blocks`` (ResNet), ``dropout``, ``fusion``
    (``linear``, ``concat_mlp``, ``film``, ``gated``, ``transformer``), ``fusion_kwargs``, ``ceb``,
    ``dtype`` (``float32`` or ``bfloat16``: the encoders' and fusion's compute dtype, see
    :class:`MultimodalModel`).
    Parameters are drawn from ``nnx.Rngs(params=seed, dropout=seed + 1)``.
    """
    encoders = {m: encoder_spec(m, info.input_shapes[m], model_cfg) for m in info.modalities}
    fusion_kwargs = model_cfg.get("fusion_kwargs", None)
    return MultimodalModel(
        info.modalities,
        encoders,
        num_classes=info.num_classes,
        fusion=model_cfg.get("fusion", DEFAULTS["fusion"]),
        fusion_kwargs=dict(fusion_kwargs) if fusion_kwargs else None,
        ceb=bool(model_cfg.get("ceb", DEFAULTS["ceb"])),
        dtype=str(model_cfg.get("dtype", DEFAULTS["dtype"])),
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )
