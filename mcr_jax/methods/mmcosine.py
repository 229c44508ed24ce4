r"""MMCosine: modality-wise cosine logits (Xu, Feng, Zhang, Hu; ICASSP 2023, arXiv 2303.05338).

Each modality's branch of the linear late fusion head becomes a cosine classifier: the latent
:math:`z_m` and every class column :math:`w_{m,c}` of the branch matrix :math:`W_m` are
L2-normalised, and the fused logit is the scaled sum over modalities

.. math::
   \ell_c = s \sum_m \cos(z_m, w_{m,c}) = s \sum_m \frac{z_m^\top w_{m,c}}{\|z_m\|\,\|w_{m,c}\|},
   \qquad L = \mathrm{CE}(\ell, y).

Because every modality's contribution is bounded by :math:`s`, no modality can dominate the fused
logit by growing its feature or weight norms.

Choices (documented, as the paper leaves them open or the interface asks for them):

- ``scale`` (s, default 10): the reference release's ``--scaling`` default and the value of its
  run command.
- The fusion head's shared bias is **not** used (the paper's logit has no bias); it receives no
  gradient (only weight decay, if configured).
- The prediction at evaluation is the same cosine fusion (:meth:`MMCosine.forward` is used by both
  the loss and :meth:`~mcr_jax.methods.base.Method.predict`). The per-modality outputs reported as
  ``unimodal`` are the branch terms :math:`s\cos(z_m, w_{m,c})` (as the reference evaluates its
  unimodal accuracies); the model's separate unimodal heads are not trained.
- Normalisation uses ``x / max(||x||, 1e-12)`` (PyTorch's ``F.normalize``).

Needs linear late fusion (``model.fusion = "linear"``: the branches' weights ``W_m``) and
classification (a cosine classifier has no meaning for a scalar regression output); any number of
modalities M >= 2.
"""

from __future__ import annotations

import jax.numpy as jnp

from mcr_jax.methods.base import Method, model_inputs
from mcr_jax.methods.common import check_options
from mcr_jax.models import LinearLateFusion

DEFAULTS = dict(scale=10.0)
_EPS = 1e-12


def l2_normalize(x, axis: int):
    """``x / max(||x||_2, 1e-12)`` along ``axis``."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _EPS)


def cosine_logits(z, kernel, scale: float):
    """``s · cos(z, w_c)``: ``z [..., D]``, ``kernel [D, C]`` (class columns) → ``[..., C]``."""
    if z.shape[-1] != kernel.shape[0]:
        raise ValueError(f"latent shape {z.shape} does not match branch kernel shape {kernel.shape} ([D, C]).")
    return scale * (l2_normalize(z, -1) @ l2_normalize(kernel, 0))


class MMCosine(Method):
    """Cosine-normalised per-modality fusion logits; config: ``scale`` (s, 10)."""

    name = "mmcosine"
    reports_unimodal_heads = True

    def __init__(self, config, info):
        super().__init__(config, info)
        check_options(config, DEFAULTS, "MMCosine")
        if self.task != "classification":
            raise ValueError("MMCosine is defined for classification only (cosine class logits); "
                             f"dataset {info.name!r} is a {self.task} task.")
        self.scale = float(config.get("scale", DEFAULTS["scale"]))
        if self.scale <= 0:
            raise ValueError(f"method.scale (s) must be > 0; got {self.scale}.")

    def check_model(self, model) -> None:
        if not isinstance(model.fusion, LinearLateFusion):
            raise ValueError("MMCosine normalises each modality's fusion weights W_m and needs linear late fusion "
                             f"(model.fusion = 'linear'); got {type(model.fusion).__name__}.")

    def branch_logits(self, model, latents):
        """``{m: s · cos(z_m, W_m) [B, C]}`` from the fusion head's branch kernels."""
        return {m: cosine_logits(latents[m], model.fusion.branches[m].kernel[...], self.scale)
                for m in self.modalities}

    def fuse(self, model, latents):
        branches = self.branch_logits(model, latents)
        return sum(branches[m] for m in self.modalities)

    def forward(self, model, batch):
        inputs, masks = model_inputs(batch, self.modalities)
        latents = model.encode(inputs, masks)
        branches = self.branch_logits(model, latents)
        logits = branches[self.modalities[0]]
        for m in self.modalities[1:]:
            logits = logits + branches[m]
        return {"latents": latents, "logits": logits, "unimodal": branches}
