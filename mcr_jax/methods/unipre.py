"""Uni-pre: encoders initialised from unimodal training, then frozen or fine-tuned under joint training.

The encoders (and unimodal heads) are copied from the best checkpoints of unimodal runs named in
``method.pretrained`` (``{modality: workdir}``); the trainer does the copying before the first
step (see :func:`mcr_jax.checkpoint.load_pretrained`). With ``method.freeze = True`` the encoders get no
update (``optax.set_to_zero`` on their parameters), otherwise they are fine-tuned.
"""

import jax
import optax

from mcr_jax.methods.base import Method
from mcr_jax.players import in_group

DEFAULTS = dict(pretrained={}, freeze=False)


class UniPre(Method):
    """Joint (fused) loss on pre-trained encoders; config: ``pretrained``, ``freeze``."""

    name = "uni_pre"
    reports_unimodal_heads = True
    #: it starts from its seed's unimodal runs (``method.pretrained``).
    needs_unimodal_runs = True

    def __init__(self, config, info):
        super().__init__(config, info)
        opts = self.opts
        pretrained = opts["pretrained"]
        if not pretrained:
            raise ValueError("method 'uni_pre' needs method.pretrained = {modality: unimodal run workdir}; "
                             "the compare command fills it from its unimodal runs.")
        missing = [m for m in self.modalities if m not in pretrained]
        if missing:
            raise ValueError(f"method.pretrained lacks workdirs for modalities {missing}.")
        self.freeze = bool(opts["freeze"])

    def make_optimizer(self, base, params):
        if not self.freeze:
            return base
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if in_group(path, "encoders") else "train", params)
        return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)
