"""Unimodal training: one modality's encoder and unimodal head, nothing else.

The model is the full multimodal model (so checkpoints are interchangeable with the other methods
and can initialise "uni-pre" runs); only ``encoders[m]`` and ``heads[m]`` receive gradient. The
method's prediction is that head's output.
"""

from mcr_jax.methods.base import Method, model_inputs

DEFAULTS = dict(modality="")


class Unimodal(Method):
    """Config: ``modality`` (one of the dataset's modalities)."""

    name = "unimodal"
    uses_fusion = False
    #: one run per modality in a comparison or a study (``unimodal <m>``).
    per_modality = True

    def __init__(self, config, info):
        super().__init__(config, info)
        m = self.opts["modality"]
        if m not in self.modalities:
            raise ValueError(
                f"method 'unimodal' needs method.modality set to one of {list(self.modalities)}; got {m!r}.")
        self.modality = m

    def _logits(self, model, batch):
        inputs, masks = model_inputs(batch, (self.modality,))
        mask = None if masks is None else masks.get(self.modality)
        enc = model.encoders[self.modality]
        z = enc(inputs[self.modality], mask=mask) if getattr(enc, "accepts_mask", False) else enc(inputs[self.modality])
        return z, model.heads[self.modality](z)

    def loss(self, handle, params, batch, key, method_state):
        model = handle.train_model(params)
        _, logits = self._logits(model, batch)
        loss = self.task.loss(logits, batch["label"], batch.get("mask"))
        return loss, {"task": loss}, model

    def predict(self, model, batch):
        z, logits = self._logits(model, batch)
        return {"logits": logits, "unimodal": {self.modality: logits}, "latents": {self.modality: z}}
