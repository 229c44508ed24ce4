r"""MMCosine: modality-wise cosine logits.

Xu, Feng, Zhang, Hu, *MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained
Learning*, ICASSP 2023 (arXiv 2303.05338). Each modality's branch of the linear late fusion head
becomes a cosine classifier: the latent :math:`z_m` and every class column :math:`w_{m,c}` of the
branch matrix :math:`W_m` are L2-normalised, and the fused logit is the scaled sum over modalities

.. math::
   \ell_c = s \sum_m \cos(z_m, w_{m,c}) = s \sum_m \frac{z_m^\top w_{m,c}}{\|z_m\|\,\|w_{m,c}\|},
   \qquad L = \mathrm{CE}(\ell, y).

Every modality's contribution is bounded by :math:`s`: no modality can dominate the fused logit by
growing its feature or weight norms.

The released code
-----------------
``GeWu-Lab/MMCosine_ICASSP23`` (the authors' repository; read at commit 00ba0a9), CREMA-D:
``main_CD.py`` (``train_epoch``, ``valid``), ``models/basic_model.py`` (``AVClassifier``: two
ResNet-18 encoders, pooled 512-d features ``a``, ``v``, then ``fusion_module``) and
``models/fusion_modules.py`` (``ConcatFusion``: ``fc_out = Linear(1024, C)`` on ``cat(a, v)``, which
returns ``a, v, fc_out(cat(a, v))``). (As published, ``models/basic_model.py`` imports an
``Elementwise_addition`` that ``fusion_modules.py`` does not define; the rule is read from
``main_CD.py``.) One training step with ``--mmcosine True``:

1. ``a, v, out = model(spec, image)`` in training mode (line 109).
2. Lines 113-118: ``out_a = mm(F.normalize(a, dim=1), F.normalize(fc_out.weight[:, :512].T,
   dim=0)) * scaling``, ``out_v`` the same with ``fc_out.weight[:, 512:]``, ``out = out_a + out_v``:
   the model's own ``out`` (linear, with bias) is discarded for training. ``F.normalize`` is
   ``x / max(||x||, 1e-12)``; the weight is normalised per class column of each modality's slice.
   (The first release, commit b69b9e3, lacked line 118 and so trained the plain linear head; the
   line was added in 214797c.)
3. Line 141: ``loss = CrossEntropy(out, label) + lam * NCE(a, v, label)`` with ``--lam 0`` by default
   (the NCE term is the supplementary material's). ``loss.backward()``; ``fc_out.bias`` gets no
   gradient (PyTorch's SGD then skips it, weight decay included).
4. SGD (lr 1e-3, momentum 0.9, weight decay 1e-4), StepLR(100, 0.1), 200 epochs, batch 32;
   ``--scaling 10`` (the argparse default and the README's command).
5. ``valid`` (lines 181-198): the unimodal predictions are the cosine branches ``out_a``, ``out_v``
   (“approximate uni-modal evaluation”), but the **fused prediction is the model's** ``out`` =
   ``fc_out(cat(a, v))``: the plain linear layer, with its untrained bias; ``out_a + out_v`` is not
   formed there.

The MCR authors' port (``kkontras/MCR``, ``models/MCR_Models.py``, ``Base_Model.forward`` with
``mmcosine``; ``mmcosine_scaling`` 10 by default, 10 on CREMA-D and 1 on AVE in their README) forms
``pred = pred_a + pred_v`` from the same cosine branches in the model's forward, so their fused
prediction is the cosine sum at evaluation too.

What is computed here
---------------------
Training: the loss above on :meth:`MMCosine.forward` (``s · Σ_m cos(z_m, W_m)``; the branch
kernels ``fusion/branches/<m>/kernel`` are ``fc_out.weight``'s slices, transposed). The shared
fusion bias and the unimodal heads receive zero gradient (only weight decay, if configured).
Evaluation: ``unimodal`` = the branch terms :math:`s\cos(z_m, w_{m,c})`; the fused ``logits`` =
the cosine sum (``eval_logits = "cosine"``, default) or the plain linear head
:math:`\sum_m z_m W_m + b` (``eval_logits = "linear"``, the released ``valid``).

Options (``method`` section) and their defaults
-----------------------------------------------
``scale`` (s = 10, the release's ``--scaling`` default), ``eval_logits`` (``"cosine"``: follows the
MCR authors' port and the paper's cosine classifier rather than the released ``valid``; ``"linear"``
reproduces the released ``valid``).

Remaining differences from the released code
--------------------------------------------
- **Fused prediction at evaluation**: cosine by default (see ``eval_logits``). With
  ``eval_logits = "linear"`` the bias is this library's (zero at initialisation, decayed if weight
  decay is on) instead of PyTorch's untrained uniform initialisation.
- **Fusion heads**: linear late fusion only (the release's ``--fusion_method concat``). Its gated
  and FiLM heads (``--fusion_method gated`` is the README's example) apply the cosine to the
  fusion module's per-modality outputs and slices of its output layer; not provided here.
- **No NCE term** (``--lam``, 0 by default in the release).
- **Any M >= 2** modalities (the release has two, split at the hard-coded feature size 512).
- **Padding rows** (batch mask) are left out of the loss.
- **Optimizer**: the trainer's (the original: SGD with momentum 0.9, weight decay 1e-4, step decay).

Needs linear late fusion (``model.fusion = "linear"``) and classification (a cosine classifier has
no meaning for a scalar regression output).
"""

from __future__ import annotations

from mcr_jax.losses import l2_normalize
from mcr_jax.methods.base import Method, model_inputs
from mcr_jax.models.fusion import is_separable

DEFAULTS = dict(scale=10.0, eval_logits="cosine")
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(scale=[1.0, 5.0, 10.0, 20.0])
EVAL_LOGITS = ("cosine", "linear")


def cosine_logits(z, kernel, scale: float):
    """``s · cos(z, w_c)``: ``z [..., D]``, ``kernel [D, C]`` (class columns) → ``[..., C]``."""
    if z.shape[-1] != kernel.shape[0]:
        raise ValueError(f"latent shape {z.shape} does not match branch kernel shape {kernel.shape} ([D, C]).")
    return scale * (l2_normalize(z, -1) @ l2_normalize(kernel, 0))


class MMCosine(Method):
    """Cosine-normalised per-modality fusion logits; config: ``scale`` (s, 10), ``eval_logits``."""

    name = "mmcosine"
    reports_unimodal_heads = True
    traceable = ("scale",)

    def __init__(self, config, info):
        super().__init__(config, info)
        opts = self.opts
        self.require_classes("cosine class logits")
        self.scale = float(opts["scale"])
        if self.scale <= 0:
            raise ValueError(f"method.scale (s) must be > 0; got {self.scale}.")
        self.eval_logits = opts["eval_logits"]
        if self.eval_logits not in EVAL_LOGITS:
            raise ValueError(f"method.eval_logits must be one of {list(EVAL_LOGITS)}; got {self.eval_logits!r}.")

    def check_model(self, model) -> None:
        if not is_separable(model.fusion) or not callable(getattr(model.fusion, "branch_kernel", None)):
            raise ValueError("MMCosine normalises each modality's fusion weights W_m and needs a separable fusion head "
                             f"with linear branches (branch_kernel; e.g. model.fusion = 'linear'); got "
                             f"{type(model.fusion).__name__}.")

    def branch_logits(self, model, latents):
        """``{m: s · cos(z_m, W_m) [B, C]}`` from the fusion head's branch kernels."""
        scale = self.hp("scale", self.scale)
        return {m: cosine_logits(latents[m], model.fusion.branch_kernel(m), scale)
                for m in self.modalities}

    def _cosine_sum(self, branches):
        logits = branches[self.modalities[0]]
        for m in self.modalities[1:]:
            logits = logits + branches[m]
        return logits

    def fuse(self, model, latents):
        """The evaluation prediction from latents (the MIPD diagnostic permutes latents through it)."""
        if self.eval_logits == "linear":
            return model.fuse(latents)
        return self._cosine_sum(self.branch_logits(model, latents))

    def forward(self, model, batch):
        """The training forward pass: ``logits`` = the cosine sum, ``unimodal`` = its branch terms."""
        inputs, masks = model_inputs(batch, self.modalities)
        latents = model.encode(inputs, masks)
        branches = self.branch_logits(model, latents)
        return {"latents": latents, "logits": self._cosine_sum(branches), "unimodal": branches}

    def predict(self, model, batch):
        out = self.forward(model, batch)
        logits = model.fuse(out["latents"]) if self.eval_logits == "linear" else out["logits"]
        return {"logits": logits, "unimodal": out["unimodal"], "latents": out["latents"]}
