"""Fusion heads f_c([z_1, …, z_M]) → fused logits ℓ and the CEB decoder.

Every fusion head is built from the ordered modality names, their latent sizes ``D_m`` and the
number of outputs ``C``, and maps ``latents: dict[name, [..., D_m]]`` → ``[..., C]``. Leading axes
(``[B]``, or ``[S, B]`` for stacked permutations) must agree across modalities and are kept.
``fuse(latents)`` is the same as calling the head. All heads work for any M ≥ 2 and are
differentiable with respect to every latent.

Parameter naming matters to the game (``mcr_jax.game`` assigns parameters to modality players by
looking for a modality name in the parameter path): only :class:`LinearLateFusion`, whose
per-modality matrices are separable, keys parameters by modality name (``branches[name]``). The
non-separable heads keep their per-modality sub-layers in ``nnx.List``s indexed by the modality's
position in ``modalities``, so they stay shared parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mcr_jax.models.layers import MLP, TransformerBlock, at_least_float32, check_modality_names

Latents = Mapping[str, jax.Array]


class FusionHead(nnx.Module):
    """Base class: stores the modality layout, validates latents, flattens leading axes.

    Subclasses implement ``_fuse(flat: dict[name, [N, D_m]]) -> [N, C]``.

    Capabilities a head declares (the methods read these, never the head's type):

    - ``separable`` (class attribute, default False): the prediction is
      ``combine(branch_logits(latents))``, where ``branch_logits`` maps ``{m: [..., D_m]}`` to
      per-modality logits ``{m: [..., C]}`` that depend on ``z_m`` only, and ``combine`` adds them
      and a shared offset (``shared_offset()``, ``[C]``). Each modality's own parameters live under
      ``branches/<m>`` (so :mod:`mcr_jax.players` gives them to that modality). MCR's fast path
      permutes branch logits instead of latents; OGM-GE, MSLR (``unimodal_source='branch'``) and
      ReconBoost read each modality's branch as its unimodal prediction.
    - ``branch_kernel(m)`` (optional): the ``[D_m, C]`` matrix with ``branch_logits[m] = z_m W_m``
      (MMCosine normalises it).
    """

    separable: bool = False

    def branch_logits(self, latents: Latents) -> dict[str, jax.Array]:
        raise NotImplementedError(f"{type(self).__name__} is not separable: it has no per-modality branch logits.")

    def combine(self, branch_logits: Latents) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} is not separable: it cannot combine branch logits.")

    def shared_offset(self) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} is not separable: it has no shared offset.")

    def _init_layout(self, modalities: Sequence[str], latent_dims: Mapping[str, int], num_classes: int) -> None:
        modalities = check_modality_names(modalities, "a fusion head")
        missing = [m for m in modalities if m not in latent_dims]
        if missing:
            raise ValueError(f"latent_dims has no entry for {missing} (got {dict(latent_dims)})")
        self.modalities = modalities
        # Static attributes must be hashable (they live in the GraphDef): a tuple, not a dict.
        self._dims = tuple(int(latent_dims[m]) for m in modalities)
        self.num_classes = int(num_classes)

    @property
    def latent_dims(self) -> dict[str, int]:
        """``{name: D_m}`` in modality order."""
        return dict(zip(self.modalities, self._dims, strict=True))

    def _check(self, latents: Latents) -> tuple[int, ...]:
        """Validate ``latents`` and return their common leading shape."""
        missing = [m for m in self.modalities if m not in latents]
        if missing:
            raise ValueError(f"{type(self).__name__}: latents for {missing} are missing (got {sorted(latents)})")
        lead = None
        for m in self.modalities:
            z = latents[m]
            if z.ndim < 1 or z.shape[-1] != self.latent_dims[m]:
                raise ValueError(
                    f"{type(self).__name__}: latent {m!r} has shape {z.shape}, expected [..., {self.latent_dims[m]}]"
                )
            if lead is None:
                lead = z.shape[:-1]
            elif z.shape[:-1] != lead:
                raise ValueError(
                    f"{type(self).__name__}: latent {m!r} has leading shape {z.shape[:-1]}, "
                    f"but {self.modalities[0]!r} has {lead}"
                )
        return lead

    def __call__(self, latents: Latents) -> jax.Array:
        """``{name: [..., D_m]}`` → fused logits ``[..., C]``."""
        lead = self._check(latents)
        flat = {m: latents[m].reshape((-1, self.latent_dims[m])) for m in self.modalities}
        return at_least_float32(self._fuse(flat)).reshape((*lead, self.num_classes))

    def fuse(self, latents: Latents) -> jax.Array:
        """Same as calling the head: ``{name: [..., D_m]}`` → ``[..., C]``."""
        return self(latents)

    def _fuse(self, flat: dict[str, jax.Array]) -> jax.Array:
        raise NotImplementedError

    def _concat(self, flat: dict[str, jax.Array]) -> jax.Array:
        """``[N, ΣD_m]`` in modality order."""
        return jnp.concatenate([flat[m] for m in self.modalities], axis=-1)


class LinearLateFusion(FusionHead):
    """ℓ = Σ_m z_m W_m + b: one bias-free ``[D_m, C]`` matrix per modality, one shared bias.

    This equals a single linear layer on the concatenated latents. ``branches[name]`` is an
    ``nnx.Linear(D_m, C, use_bias=False)``; ``bias`` is an ``nnx.Param`` of shape ``[C]``. Each
    branch is initialised like one slice of that concatenated layer (LeCun normal with fan-in
    ΣD_m). ``branch_logits`` / ``combine`` let a caller permute branch logits instead of latents:
    ``fuse(latents) == combine(branch_logits(latents))`` exactly (it is the same computation).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        latent_dims: Mapping[str, int],
        num_classes: int,
        *,
        rngs: nnx.Rngs,
    ):
        self._init_layout(modalities, latent_dims, num_classes)
        total = sum(self.latent_dims.values())
        branches = {}
        for m in self.modalities:
            d = self.latent_dims[m]
            # variance 1 / ΣD_m, as for one slice of a linear layer over the concatenation.
            init = nnx.initializers.variance_scaling(d / total, "fan_in", "truncated_normal")
            branches[m] = nnx.Linear(d, self.num_classes, use_bias=False, kernel_init=init, rngs=rngs)
        self.branches = nnx.Dict(branches)
        self.bias = nnx.Param(jnp.zeros((self.num_classes,), jnp.float32))

    separable = True

    def branch_logits(self, latents: Latents) -> dict[str, jax.Array]:
        """``{name: [..., D_m]}`` → ``{name: z_m W_m}``, each ``[..., C]`` (no bias)."""
        self._check(latents)
        return {m: self.branches[m](latents[m]) for m in self.modalities}

    def combine(self, branch_logits: Latents) -> jax.Array:
        """``{name: [..., C]}`` → ``Σ_m branch_m + b`` ``[..., C]`` (summed in modality order)."""
        missing = [m for m in self.modalities if m not in branch_logits]
        if missing:
            raise ValueError(f"branch logits for {missing} are missing (got {sorted(branch_logits)})")
        out = branch_logits[self.modalities[0]]
        for m in self.modalities[1:]:
            if branch_logits[m].shape != out.shape:
                raise ValueError(
                    f"branch logits {m!r} shape {branch_logits[m].shape} != {self.modalities[0]!r} shape {out.shape}"
                )
            out = out + branch_logits[m]
        if out.shape[-1] != self.num_classes:
            raise ValueError(f"branch logits have {out.shape[-1]} classes, expected {self.num_classes}")
        bias = self.bias[...]
        return out + bias.reshape((1,) * (out.ndim - 1) + (self.num_classes,))

    def shared_offset(self) -> jax.Array:
        """The shared bias ``b`` ``[C]``."""
        return self.bias[...]

    def branch_kernel(self, name: str) -> jax.Array:
        """``W_m`` ``[D_m, C]``."""
        return self.branches[name].kernel[...]

    def __call__(self, latents: Latents) -> jax.Array:
        """``{name: [..., D_m]}`` → ``[..., C]`` = ``combine(branch_logits(latents))``."""
        return self.combine(self.branch_logits(latents))


class ConcatMLPFusion(FusionHead):
    """Concatenate the latents (modality order) → MLP (Linear → ReLU → dropout)* → Linear(C)."""

    def __init__(
        self,
        modalities: Sequence[str],
        latent_dims: Mapping[str, int],
        num_classes: int,
        *,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._init_layout(modalities, latent_dims, num_classes)
        total = sum(self.latent_dims.values())
        self.mlp = MLP(total, tuple(hidden), self.num_classes, dropout=dropout, rngs=rngs)

    def _fuse(self, flat: dict[str, jax.Array]) -> jax.Array:
        return self.mlp(self._concat(flat))


class FiLMFusion(FusionHead):
    """Feature-wise linear modulation: one modality's features are scaled and shifted by the others.

    The conditioned modality c (``conditioned``, default the first) is projected,
    h = W_c z_c ∈ R^H. Every other modality j produces (γ_j, β_j) = split(W_j z_j + b_j). For
    M > 2 the FiLM parameters of the other modalities are averaged: γ = mean_j γ_j, β = mean_j β_j.
    Logits = W_out((1 + γ) ⊙ h + β). The ``1 +`` centres the modulation at the identity at
    initialisation; the reference's FiLM uses γ ⊙ h + β (the same family, re-parametrised).
    ``film[i]`` belongs to the i-th non-conditioned modality, in ``modalities`` order.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        latent_dims: Mapping[str, int],
        num_classes: int,
        *,
        hidden: int = 128,
        conditioned: str | None = None,
        rngs: nnx.Rngs,
    ):
        self._init_layout(modalities, latent_dims, num_classes)
        conditioned = self.modalities[0] if conditioned is None else conditioned
        if conditioned not in self.modalities:
            raise ValueError(f"conditioned={conditioned!r} is not one of {self.modalities}")
        self.conditioned = conditioned
        self.conditioners = tuple(m for m in self.modalities if m != conditioned)
        self.hidden = hidden
        self.proj = nnx.Linear(self.latent_dims[conditioned], hidden, rngs=rngs)
        self.film = nnx.List([nnx.Linear(self.latent_dims[m], 2 * hidden, rngs=rngs) for m in self.conditioners])
        self.out = nnx.Linear(hidden, self.num_classes, rngs=rngs)

    def _fuse(self, flat: dict[str, jax.Array]) -> jax.Array:
        params = jnp.mean(
            jnp.stack([layer(flat[m]) for layer, m in zip(self.film, self.conditioners, strict=True)]),
            axis=0,
        )
        gamma, beta = params[:, : self.hidden], params[:, self.hidden :]
        h = self.proj(flat[self.conditioned])
        return self.out((1.0 + gamma) * h + beta)


class GatedFusion(FusionHead):
    """Sigmoid-gated sum of per-modality projections.

    h_m = W_m z_m ∈ R^H, g_m = σ(G_m [z_1; …; z_M]) ∈ (0, 1)^H (each gate sees all latents),
    logits = W_out Σ_m g_m ⊙ h_m. With M = 2 this generalises the reference's gated fusion (one
    modality's sigmoid gate multiplies the other's features). ``proj[i]`` / ``gates[i]`` belong to
    ``modalities[i]``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        latent_dims: Mapping[str, int],
        num_classes: int,
        *,
        hidden: int = 128,
        rngs: nnx.Rngs,
    ):
        self._init_layout(modalities, latent_dims, num_classes)
        total = sum(self.latent_dims.values())
        self.proj = nnx.List([nnx.Linear(self.latent_dims[m], hidden, rngs=rngs) for m in self.modalities])
        self.gates = nnx.List([nnx.Linear(total, hidden, rngs=rngs) for _ in self.modalities])
        self.out = nnx.Linear(hidden, self.num_classes, rngs=rngs)

    def _fuse(self, flat: dict[str, jax.Array]) -> jax.Array:
        cat = self._concat(flat)
        fused = sum(
            nnx.sigmoid(gate(cat)) * proj(flat[m])
            for gate, proj, m in zip(self.gates, self.proj, self.modalities, strict=True)
        )
        return self.out(fused)


class TransformerFusion(FusionHead):
    """A small transformer over M modality tokens.

    Token m = W_m z_m + e_m (a learned type embedding per modality, ``type_embedding[i]`` for
    ``modalities[i]``); ``depth`` pre-LN blocks; LayerNorm; mean over the M tokens → Linear(C).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        latent_dims: Mapping[str, int],
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 1,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self._init_layout(modalities, latent_dims, num_classes)
        self.proj = nnx.List([nnx.Linear(self.latent_dims[m], dim, rngs=rngs) for m in self.modalities])
        self.type_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (len(self.modalities), dim), jnp.float32)
        )
        self.blocks = nnx.List(
            [TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out = nnx.Linear(dim, self.num_classes, rngs=rngs)

    def _fuse(self, flat: dict[str, jax.Array]) -> jax.Array:
        tokens = jnp.stack(
            [proj(flat[m]) for proj, m in zip(self.proj, self.modalities, strict=True)], axis=1
        )  # [N, M, dim]
        h = tokens + self.type_embedding[...][None]
        for block in self.blocks:
            h = block(h)
        return self.out(jnp.mean(self.norm(h), axis=1))


class CEBDecoder(nnx.Module):
    """CEB decoder h: Linear(C→D, no bias) → ReLU → Linear(D→ΣD_m, no bias).

    Maps class information ``[..., C]`` (stop-gradient fused logits, or one-hot labels) to a
    reconstruction of the concatenated latents ``[..., total_dim]``.
    """

    def __init__(self, num_classes: int, latent_dim: int, total_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(num_classes, latent_dim, use_bias=False, rngs=rngs)
        self.fc2 = nnx.Linear(latent_dim, total_dim, use_bias=False, rngs=rngs)
        self.num_classes = num_classes
        self.total_dim = total_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., C]`` → ``[..., total_dim]``."""
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"CEBDecoder expects [..., {self.num_classes}] inputs, got shape {x.shape}")
        return self.fc2(nnx.relu(self.fc1(x)))


FUSIONS: dict[str, type[FusionHead]] = {
    "linear": LinearLateFusion,
    "concat_mlp": ConcatMLPFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "transformer": TransformerFusion,
}
_ALIASES = {"late": "linear", "linear_late": "linear", "concat": "concat_mlp"}


def register_fusion(name: str, cls: type[FusionHead], *, overwrite: bool = False) -> type[FusionHead]:
    """Adds a fusion head class to :data:`FUSIONS` (``model.fusion = name`` then builds it); its
    constructor takes ``(modalities, latent_dims, num_classes, *, rngs, **kwargs)``."""
    if name in FUSIONS and FUSIONS[name] is not cls and not overwrite:
        raise ValueError(f"a fusion head named {name!r} is already registered.")
    FUSIONS[name] = cls
    return cls


def is_separable(fusion) -> bool:
    """Whether a fusion head declares the separable capability (:class:`FusionHead`)."""
    return bool(getattr(fusion, "separable", False))


def make_fusion(
    kind: str,
    modalities: Sequence[str],
    latent_dims: Mapping[str, int],
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> FusionHead:
    """Build a fusion head by name: ``"linear"`` (alias ``"late"``), ``"concat_mlp"`` (alias
    ``"concat"``), ``"film"``, ``"gated"`` or ``"transformer"``; ``kwargs`` go to its constructor."""
    name = _ALIASES.get(kind, kind)
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion kind {kind!r}; choose one of {sorted(FUSIONS)} (aliases {sorted(_ALIASES)})")
    return FUSIONS[name](modalities, latent_dims, num_classes, rngs=rngs, **kwargs)


__all__ = [
    "CEBDecoder",
    "ConcatMLPFusion",
    "FUSIONS",
    "FiLMFusion",
    "FusionHead",
    "GatedFusion",
    "LinearLateFusion",
    "TransformerFusion",
    "is_separable",
    "make_fusion",
    "register_fusion",
]
