"""mcr_jax: the Multimodal Competition Regularizer (MCR) and balanced multimodal learning in JAX.

The pure losses and the competition game are available at the top level::

    import mcr_jax
    d = mcr_jax.mipd_divergences(clean_logits, fuse_fn, [z_audio, z_video], perms)
    tx = mcr_jax.competition(optax.adam(1e-4), players=players, strategy="greedy", weight=0.1)

Two installs. ``pip install mcr_jax`` gives the core, which needs only jax, flax, optax, chex and numpy: this
package, :mod:`mcr_jax.losses`, :mod:`mcr_jax.game`, :mod:`mcr_jax.players` and :mod:`mcr_jax.models`.
``pip install "mcr_jax[train]"`` adds what the trainer, the datasets, the baselines (:mod:`mcr_jax.methods`)
and the experiment scripts import (ml-collections, absl, orbax, grain, TFDS, ...). The quantities computed
are stated in docs/method.md.
"""

from mcr_jax import losses
from mcr_jax.game import (
    SHARED,
    STRATEGIES,
    Strategy,
    add_game_gradients,
    assign_players,
    combine_mipd_grads,
    competition,
    game_mipd_divergences,
    path_keys,
    per_term_grads,
    resolve_strategy,
    scale_gradient,
    scale_params_for_term,
    scale_shared_params,
)
from mcr_jax.losses import *  # noqa: F403
from mcr_jax.losses import __all__ as _losses_all
from mcr_jax.players import scale_by_player

__version__ = "0.1.0"

__all__ = [
    "SHARED",
    "STRATEGIES",
    "Strategy",
    "add_game_gradients",
    "assign_players",
    "combine_mipd_grads",
    "competition",
    "game_mipd_divergences",
    "losses",
    "path_keys",
    "per_term_grads",
    "scale_gradient",
    "scale_params_for_term",
    "resolve_strategy",
    "scale_by_player",
    "scale_shared_params",
    *_losses_all,
]
