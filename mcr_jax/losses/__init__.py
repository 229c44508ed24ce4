"""Pure MCR losses: functions of arrays (jax + numpy only), usable under jit and vmap."""

from mcr_jax.losses.ceb import CEB_CONDITIONS, ceb_condition, ceb_loss, ceb_term
from mcr_jax.losses.contrastive import (
    CONTRASTIVE,
    binarize_regression_labels,
    cross_modal_supcon,
    l2_normalize,
    supervised_ntxent,
)
from mcr_jax.losses.divergences import DIVERGENCES, LN2, jsd_from_logits, kl_from_logits, squared_difference
from mcr_jax.losses.mipd import (
    PERTURBATIONS,
    divergences_of_copies,
    mipd_divergences,
    mipd_loss,
    perturb_latent,
    perturbed_copies,
    sample_permutations,
)
from mcr_jax.losses.reduce import masked_mean

__all__ = [
    "CEB_CONDITIONS",
    "CONTRASTIVE",
    "DIVERGENCES",
    "LN2",
    "PERTURBATIONS",
    "binarize_regression_labels",
    "ceb_condition",
    "ceb_loss",
    "ceb_term",
    "cross_modal_supcon",
    "divergences_of_copies",
    "jsd_from_logits",
    "kl_from_logits",
    "l2_normalize",
    "masked_mean",
    "mipd_divergences",
    "mipd_loss",
    "perturb_latent",
    "perturbed_copies",
    "sample_permutations",
    "squared_difference",
    "supervised_ntxent",
]
