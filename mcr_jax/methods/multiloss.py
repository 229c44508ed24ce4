"""Multi-loss: the fused task loss plus a weighted task loss on every unimodal head."""

from mcr_jax.methods.base import Method, unimodal_losses

DEFAULTS = dict(uni_weight=1.0)
#: the tuning grid of a study (mcr_jax.study).
GRID = dict(uni_weight=[0.1, 0.3, 1.0, 3.0])


class MultiLoss(Method):
    """``L = CE(ℓ, y) + λ_uni Σ_m CE(u_m, y)``; config: ``uni_weight`` (default 1.0)."""

    name = "multiloss"
    reports_unimodal_heads = True
    traceable = ("uni_weight",)

    def __init__(self, config, info):
        super().__init__(config, info)

    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        out = self.forward(model, batch)
        fused = self.task.loss(out["logits"], batch["label"], batch.get("mask"))
        uni = unimodal_losses(out, batch, self.task, self.modalities)
        weight = self.hp("uni_weight", float(self.opts["uni_weight"]))
        total = fused + weight * sum(uni.values())
        return total, {"task": fused, **{f"uni_{m}": v for m, v in uni.items()}}, model
