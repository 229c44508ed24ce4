"""The multimodal model: per-modality encoders, unimodal heads, a fusion head, an optional CEB decoder.

Attribute names are part of the contract (``mcr_jax.game`` finds a modality's parameters by its
name in the parameter path):

- ``encoders[name]`` — the encoder f_m of modality ``name`` (θ_m);
- ``heads[name]`` — the unimodal linear head f_{c_m}: ``nnx.Linear(D_m, C)``;
- ``fusion`` — the fusion head f_c (for linear late fusion, W_m lives under ``branches[name]``);
- ``ceb_decoder`` — the CEB decoder h, or None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from mcr_jax.models.encoders import make_encoder
from mcr_jax.models.fusion import CEBDecoder, is_separable, make_fusion
from mcr_jax.models.layers import at_least_float32, check_modality_names, compute_dtype, compute_in

Arrays = Mapping[str, jax.Array]


def _build_encoder(name: str, spec: Any, rngs: nnx.Rngs) -> nnx.Module:
    """An encoder module as given, or built from a config ``{"kind": ..., **constructor kwargs}``."""
    if isinstance(spec, nnx.Module):
        return spec
    if hasattr(spec, "to_dict") and not isinstance(spec, Mapping):  # ml_collections.ConfigDict
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        cfg = dict(spec)
        if "kind" not in cfg:
            raise ValueError(f"encoder config for {name!r} needs a 'kind' entry, got keys {sorted(cfg)}")
        return make_encoder(cfg.pop("kind"), rngs=rngs, **cfg)
    raise TypeError(f"encoder for {name!r} must be an nnx.Module or a config mapping, got {type(spec)}")


class MultimodalModel(nnx.Module):
    """Encoders + unimodal heads + fusion head for any number M ≥ 2 of named modalities.

    Args:
      modalities: ordered modality names, e.g. ``("audio", "video")``.
      encoders: ``{name: encoder}``, each an ``nnx.Module`` mapping that modality's batch to
        ``[B, D_m]``, or a config mapping ``{"kind": "mlp" | "resnet18" | "transformer", **kwargs}``
        passed to :func:`mcr_jax.models.encoders.make_encoder` (with this model's ``rngs``).
      num_classes: C (1 for regression).
      latent_dims: ``{name: D_m}``; optional when the encoders expose ``out_features``, and checked
        against it when both are there.
      fusion: fusion kind for :func:`mcr_jax.models.fusion.make_fusion` (default ``"linear"``).
      fusion_kwargs: extra constructor arguments of the fusion head.
      ceb: build the CEB decoder ``ceb_decoder`` (``C → ceb_latent_dim → ΣD_m``).
      ceb_latent_dim: its hidden size D (default: the largest D_m).
      dtype: the compute dtype of the encoders and of a non-separable fusion head, ``"float32"``
        (default) or ``"bfloat16"`` (mixed precision). Parameters, optimizer state and batch-norm
        statistics stay float32; latents and logits leave the model in float32, so every loss,
        softmax, JSD, contrastive and CEB reduction is computed in float32. The unimodal heads,
        the CEB decoder and the linear late-fusion head (one D_m × C matmul per modality, whose
        per-branch logits the game reads) compute in float32 always: their cost is negligible.
      rngs: ``nnx.Rngs``.

    The model starts in training mode (batch norm uses batch statistics, dropout is on);
    ``model.eval()`` / ``model.train()`` switch every sub-module.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        encoders: Mapping[str, Any],
        *,
        num_classes: int,
        latent_dims: Mapping[str, int] | None = None,
        fusion: str = "linear",
        fusion_kwargs: Mapping[str, Any] | None = None,
        ceb: bool = False,
        ceb_latent_dim: int | None = None,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        modalities = check_modality_names(modalities, "MultimodalModel")
        missing = [m for m in modalities if m not in encoders]
        extra = [m for m in encoders if m not in modalities]
        if missing or extra:
            raise ValueError(
                f"encoders must be keyed by exactly the modalities {modalities}: missing {missing}, unexpected {extra}"
            )
        built = {m: _build_encoder(m, encoders[m], rngs) for m in modalities}
        dims = {}
        for m in modalities:
            inferred = getattr(built[m], "out_features", None)
            given = None if latent_dims is None else latent_dims.get(m)
            if given is None and inferred is None:
                raise ValueError(
                    f"latent dimension of {m!r} unknown: pass latent_dims[{m!r}] "
                    "(its encoder has no out_features attribute)"
                )
            if given is not None and inferred is not None and int(given) != int(inferred):
                raise ValueError(f"latent_dims[{m!r}]={given} but the encoder outputs {inferred} features")
            dims[m] = int(given if given is not None else inferred)

        self._modalities = modalities
        self._latent_dims = tuple(dims[m] for m in modalities)  # hashable: lives in the GraphDef
        self.num_classes = int(num_classes)
        self.encoders = nnx.Dict(built)
        self.heads = nnx.Dict({m: nnx.Linear(dims[m], self.num_classes, rngs=rngs) for m in modalities})
        self.fusion = make_fusion(fusion, modalities, dims, self.num_classes, rngs=rngs, **dict(fusion_kwargs or {}))
        self.compute_dtype = str(dtype)
        low = compute_dtype(self.compute_dtype)
        if self.compute_dtype != "float32":
            for m in modalities:
                compute_in(self.encoders[m], low)
            if not is_separable(self.fusion):
                compute_in(self.fusion, low)
        if ceb:
            hidden = int(ceb_latent_dim) if ceb_latent_dim is not None else max(dims.values())
            self.ceb_decoder = CEBDecoder(self.num_classes, hidden, sum(dims.values()), rngs=rngs)
        else:
            self.ceb_decoder = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The ordered modality names."""
        return self._modalities

    @property
    def latent_dims(self) -> dict[str, int]:
        """``{name: D_m}`` in modality order."""
        return dict(zip(self._modalities, self._latent_dims, strict=True))

    def encode(self, inputs: Arrays, masks: Arrays | None = None) -> dict[str, jax.Array]:
        """``{name: x_m}`` → ``{name: z_m [B, D_m]}``.

        ``inputs`` may hold extra keys (``"label"``, ``"mask"``, …); they are ignored. ``masks``
        ``{name: [B, T]}`` (True = real step) is passed to encoders that take a mask (transformer
        encoders); a mask for any other encoder is an error.
        """
        missing = [m for m in self._modalities if m not in inputs]
        if missing:
            raise ValueError(
                f"inputs lack modalities {missing}; the model needs {list(self._modalities)}, got keys {sorted(inputs)}"
            )
        masks = dict(masks or {})
        latents = {}
        batch = None
        for m in self._modalities:
            x, enc = inputs[m], self.encoders[m]
            ranks = getattr(enc, "input_ranks", None)
            if ranks is not None and x.ndim not in ranks:
                raise ValueError(
                    f"modality {m!r}: {type(enc).__name__} takes inputs of rank {tuple(ranks)} "
                    f"(batch axis included), got shape {x.shape}"
                )
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(f"modality {m!r} has batch size {x.shape[0]}, but {self._modalities[0]!r} has {batch}")
            mask = masks.get(m)
            if mask is not None and not getattr(enc, "accepts_mask", False):
                raise ValueError(f"a mask was given for {m!r}, but {type(enc).__name__} takes no mask")
            z = enc(x, mask=mask) if getattr(enc, "accepts_mask", False) else enc(x)
            latents[m] = at_least_float32(z)  # a bf16 encoder's latents leave in float32
        return latents

    def fuse(self, latents: Arrays) -> jax.Array:
        """``{name: [..., D_m]}`` → fused logits ``[..., C]``."""
        return self.fusion(latents)

    def unimodal_logits(self, latents: Arrays) -> dict[str, jax.Array]:
        """``{name: [..., D_m]}`` → ``{name: u_m [..., C]}`` from the unimodal heads."""
        return {m: self.heads[m](latents[m]) for m in self._modalities}

    def __call__(self, inputs: Arrays, masks: Arrays | None = None) -> dict[str, Any]:
        """``{name: x_m}`` → ``dict(latents={name: [B, D_m]}, logits=[B, C], unimodal={name: [B, C]})``."""
        latents = self.encode(inputs, masks)
        return {
            "latents": latents,
            "logits": self.fuse(latents),
            "unimodal": self.unimodal_logits(latents),
        }
