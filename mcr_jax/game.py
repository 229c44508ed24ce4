r"""The competition game: how the modalities' MIPD gradients are combined.

Players are the modalities. Player ``m`` owns its encoder (and, for separable fusions such as
linear late fusion, its own fusion branch ``W_m``). With :math:`k \in \{-1, 0, +1\}` and weight
:math:`\lambda_M`, the MIPD terms :math:`L_j = -D_j` reach player ``m``'s parameters as

.. math::
   g_{\theta_m} = \lambda_M \Big( \nabla_{\theta_m} L_m + k \sum_{j \ne m} \nabla_{\theta_m} L_j \Big),

where :math:`\nabla_{\theta_m} L_j` is taken through the *perturbed* prediction of term ``j``.
Everything both sides of the game see — the clean prediction and parameters owned by no player
(a shared fusion bias, the layers of a non-separable fusion head) — receives the plain gradient
times :math:`s(k)`: ``s = 0`` for greedy (the two sides' contributions cancel exactly, as in the
reference code, so stopping the clean prediction's gradient is exact) and ``s = 1`` for
independent and collaborative (collaborative is then exactly the plain gradient of
:math:`\sum_m L_m`).

- **greedy** (``k = -1``, default): each modality raises the effect of perturbing its own latent and
  lowers the effect of perturbing the others — a min–max game.
- **independent** (``k = 0``): each player sees only its own term.
- **collaborative** (``k = +1``): the plain gradient of :math:`\sum_m L_m`.

There is no adaptive weighting: :math:`\lambda_M` is constant; the balancing is the sign structure.

Two equivalent implementations:

1. The optax form. :func:`add_game_gradients` is a stateless gradient transformation whose
   ``update`` takes the per-term gradients ``mipd_grads`` (leaves with a leading axis ``M``: the
   gradient of each ``L_j`` through the perturbed prediction, the clean prediction under
   ``stop_gradient``), combines them with :func:`combine_mipd_grads` and adds ``weight ×`` the
   result to the incoming gradient; :func:`competition` chains it before the inner optimizer
   (``optax.chain`` forwards ``mipd_grads=``). The clean-prediction path (``s = 1`` strategies)
   belongs to the rest of the loss.
2. The single-backward form: :func:`scale_gradient` (identity forward, cotangent × ``k``) on every
   non-perturbed latent inside the perturbed predictions, × ``s`` on the clean prediction and on the
   shared parameters used by the perturbed predictions. One ordinary backward pass of
   :math:`\lambda_M \sum_m L_m` then yields exactly the rule above (:func:`game_mipd_divergences`).

The game in the method as a whole: docs/method.md#the-game.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcr_jax.losses.mipd import mipd_divergences
from mcr_jax.players import SHARED, assign_players, path_keys  # noqa: F401 (part of this module's API)

STRATEGIES: dict[str, float] = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}


class Strategy(NamedTuple):
    """A strategy resolved once: ``k`` (the weight of the other players' terms) and ``s(k)`` (the
    weight of the clean-prediction path and of unowned parameters: 0 greedy, else 1)."""

    k: float
    s: float


def resolve_strategy(strategy: str | float | Strategy) -> Strategy:
    """The :class:`Strategy` of a name (``"greedy"``, ``"independent"``, ``"collaborative"``), of
    ``k`` itself (-1, 0 or +1), or of a :class:`Strategy` (returned as is). Every function of this
    module takes any of the three and resolves it here, once."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown game strategy {strategy!r}; use one of {tuple(STRATEGIES)} or k in (-1, 0, 1).")
        k = STRATEGIES[strategy]
    else:
        k = float(strategy)
        if k not in (-1.0, 0.0, 1.0):
            raise ValueError(
                f"the game coefficient k must be -1 (greedy), 0 (independent) or +1 (collaborative); got {k}.")
    return Strategy(k=k, s=0.0 if k < 0 else 1.0)


def _where(path) -> str:
    return "/".join(path_keys(path)) or "<root>"


def _static_owner(owner: Any, where: str) -> int:
    """A player label as a Python int; a clear ``TypeError`` for traced or non-integer labels.

    Players select per-term gradients and gradient scales at trace time, so they must be static:
    a traced label (players passed as a ``jit``/``vmap`` argument, or injected by
    ``optax.inject_hyperparams``) cannot be branched on.
    """
    if isinstance(owner, jax.core.Tracer):
        raise TypeError(
            f"players must be a static pytree of Python ints (a modality index, or SHARED = {SHARED}; e.g. from "
            f"assign_players), not traced arrays; the label of parameter {where!r} is {owner}. Close over the "
            "players instead of passing them as an argument of a jit/vmap/grad-transformed function (with "
            "optax.inject_hyperparams, list 'players' in static_args)."
        )
    if isinstance(owner, (int, np.integer)) and not isinstance(owner, (bool, np.bool_)):
        return int(owner)
    if (isinstance(owner, (np.ndarray, jax.Array)) and np.shape(owner) == ()
            and np.issubdtype(owner.dtype, np.integer)):
        return int(owner)  # a concrete integer scalar
    raise TypeError(
        f"players must be a pytree of Python ints (a modality index, or SHARED = {SHARED}) shaped like the "
        f"parameters; the label of parameter {where!r} is {owner!r} of type {type(owner).__name__}."
    )


def _static_players(players: Any) -> Any:
    """``players`` with every label checked and turned into a Python int (see :func:`_static_owner`)."""
    return jax.tree_util.tree_map_with_path(lambda path, o: _static_owner(o, _where(path)), players)


# --------------------------------------------------------------------------------------------
# The single-backward form.


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_grad(x, k):
    return x


def _scale_grad_fwd(x, k):
    return x, None


def _scale_grad_bwd(k, _, g):
    return (jax.tree.map(lambda t: t * jnp.asarray(k, t.dtype), g),)


_scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def scale_gradient(x: Any, k: float) -> Any:
    """Identity in the forward pass; multiplies the cotangent by ``k`` in the backward pass.

    ``k = 0`` is ``stop_gradient`` and ``k = 1`` the identity (both without a custom rule).
    Works on any pytree of arrays.
    """
    k = float(k)
    if k == 1.0:
        return x
    if k == 0.0:
        return jax.lax.stop_gradient(x)
    return _scale_grad(x, k)


def scale_shared_params(params: Any, players: Any, strategy: str | float) -> Any:
    """Scales the gradient of every parameter owned by no player by ``s(k)`` (single-backward form).

    Apply to the parameters that the perturbed predictions use (e.g. a shared fusion bias).
    """
    s = resolve_strategy(strategy).s
    return jax.tree.map(lambda p, owner: scale_gradient(p, s) if owner == SHARED else p, params,
                        _static_players(players))


def scale_params_for_term(params: Any, players: Any, term: int, strategy: str | float) -> Any:
    """Gradient scales of the parameters used by term ``term``'s perturbed prediction.

    For fusion heads whose parameters belong to players (e.g. per-modality matrices that are not
    folded into branch outputs): the perturbed modality's own parameters keep scale 1, the other
    players' get ``k``, unowned ones ``s(k)``. Pass one fuse function per term to
    :func:`game_mipd_divergences`.
    """
    k, s = resolve_strategy(strategy)

    def scale(p, owner):
        if owner == SHARED:
            return scale_gradient(p, s)
        return p if owner == term else scale_gradient(p, k)

    return jax.tree.map(scale, params, _static_players(players))


def game_mipd_divergences(
    clean_logits: jax.Array,
    fuse_fn: Callable[[list[jax.Array]], jax.Array],
    latents: Sequence[jax.Array],
    permutations: jax.Array | None = None,
    *,
    strategy: str | float = "greedy",
    **mipd_kwargs,
) -> jax.Array:
    """:func:`mcr_jax.losses.mipd_divergences` wired for the single-backward game.

    The clean logits get gradient scale ``s(k)`` and every non-perturbed latent inside the
    perturbed predictions gets ``k``. ``fuse_fn`` must already use parameters passed through
    :func:`scale_shared_params`. The returned values equal the plain divergences ``[M]``; only
    the gradient of ``-weight * sum(D)`` is shaped by the game.
    """
    k, s = resolve_strategy(strategy)
    return mipd_divergences(
        scale_gradient(clean_logits, s),
        fuse_fn,
        latents,
        permutations,
        nonperturbed_transform=lambda z: scale_gradient(z, k),
        **mipd_kwargs,
    )


# --------------------------------------------------------------------------------------------
# The optax form.


def _leaves_like(treedef, tree, message: str) -> list:
    """``tree``'s leaves in ``treedef``'s order, or a ValueError naming both structures."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{message}; got {treedef} and {jax.tree.structure(tree)}.") from err


def combine_mipd_grads(
    mipd_grads: Any,
    players: Any,
    strategy: str | float,
    *,
    num_players: int | None = None,
    like: Any = None,
) -> Any:
    """Combines per-term gradients by the game rule.

    Args:
      mipd_grads: pytree like the parameters whose leaves carry a leading axis ``M``: entry ``j``
        is the gradient of ``L_MIPD_j``; leaf shapes ``(M,) + param.shape``.
      players: pytree like the parameters with int leaves: the owning modality's index, or
        ``SHARED`` (-1). Must be static (Python ints, e.g. from :func:`assign_players`), not
        traced arrays.
      strategy: ``"greedy"``, ``"independent"``, ``"collaborative"`` or ``k``.
      num_players: ``M``, the number of modalities (players). By default ``M`` is the highest
        player index + 1 (every modality owns a leaf, as :func:`assign_players` guarantees), or,
        when every leaf is shared, the first leaf's leading axis. Pass it when a modality owns no
        parameter.
      like: optional pytree like the parameters (e.g. the gradients): each leaf of ``mipd_grads``
        must then have shape ``(M,) + like_leaf.shape`` exactly.

    Returns:
      pytree like the parameters: ``g_m + k·(Σ_j g_j − g_m)`` for player ``m``'s leaves and
      ``s(k)·Σ_j g_j`` for shared leaves (not yet multiplied by the weight).

    Raises:
      ValueError: when the trees' structures differ, a leaf lacks the leading axis ``M`` (or has
        another size there), a leaf's trailing shape is not its parameter's (with ``like``), or a
        player index is out of range. Shapes are static, so the checks cost nothing under jit.
      TypeError: when a player label is not a static int (e.g. traced under jit).
    """
    k, s = resolve_strategy(strategy)
    flat, treedef = jax.tree_util.tree_flatten_with_path(mipd_grads)
    owner_leaves = _leaves_like(treedef, players, "mipd_grads and players must have the parameters' tree structure")
    like_leaves = None
    if like is not None:
        like_leaves = _leaves_like(
            treedef, like, "mipd_grads must have the tree structure of the parameters (and of the gradients)")
    wheres = [_where(path) for path, _ in flat]
    grads = [g for _, g in flat]
    owners = [_static_owner(o, w) for o, w in zip(owner_leaves, wheres, strict=True)]
    if not grads:
        return treedef.unflatten([])
    m, source = _num_terms(grads, owners, wheres, num_players)
    for g, owner, where, i in zip(grads, owners, wheres, range(len(grads)), strict=True):
        shape = tuple(jnp.shape(g))
        if like_leaves is not None:
            param_shape = tuple(jnp.shape(like_leaves[i]))
            if shape != (m,) + param_shape:
                raise ValueError(
                    f"mipd_grads leaf {where!r} has shape {shape}; expected {(m,) + param_shape}: a leading axis "
                    f"of the M={m} per-term gradients ({source}) followed by the parameter's shape {param_shape}."
                )
        elif not shape or shape[0] != m:
            raise ValueError(
                f"mipd_grads leaf {where!r} has shape {shape}; expected a leading axis of the M={m} per-term "
                f"gradients ({source}) followed by the parameter's shape, i.e. ({m}, ...)."
            )
        if owner != SHARED and not 0 <= owner < m:
            raise ValueError(
                f"player index {owner} of parameter {where!r} is out of range for per-term gradients with M={m}; "
                f"labels are 0..M-1 or SHARED ({SHARED})."
            )

    def combine(g, owner):
        if owner == SHARED:
            return s * jnp.sum(g, axis=0)
        own = g[owner]
        return own + k * (jnp.sum(g, axis=0) - own)

    return treedef.unflatten([combine(g, o) for g, o in zip(grads, owners, strict=True)])


def _num_terms(grads: list, owners: list[int], wheres: list[str], num_players: Any) -> tuple[int, str]:
    """``M`` and where it came from: ``num_players``, else the players, else the first leaf."""
    if num_players is not None:
        if isinstance(num_players, jax.core.Tracer):
            raise TypeError(
                f"num_players must be a static Python int, not a traced array ({num_players}); with "
                "optax.inject_hyperparams, list 'num_players' in static_args."
            )
        m = int(num_players)
        if m < 1:
            raise ValueError(f"num_players (M) must be >= 1; got {m}.")
        return m, "num_players"
    top = max(owners)
    if top != SHARED:
        return top + 1, f"players label modalities 0..{top}; pass num_players= if a modality owns no parameter"
    shape = tuple(jnp.shape(grads[0]))
    if not shape:
        raise ValueError(
            f"mipd_grads leaf {wheres[0]!r} has shape {shape}; every leaf needs a leading axis M of per-term "
            "gradients, (M,) + param.shape (every parameter is shared, so pass num_players=M)."
        )
    return shape[0], f"the leading axis of leaf {wheres[0]!r}; every parameter is shared"


def add_game_gradients(
    *,
    players: Any,
    strategy: str | float | Strategy = "greedy",
    weight: float | jax.Array = 0.1,
    num_players: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adds the game's combination of the per-term MIPD gradients to the incoming gradient.

    ``update(grads, state, params=None, *, mipd_grads, **extra)`` returns
    ``grads + weight * combine_mipd_grads(mipd_grads, players, strategy)``; stateless. Put it first
    in an ``optax.chain`` (which forwards ``mipd_grads=`` to every link); :func:`competition` is that
    chain. ``weight`` can be injected (``optax.inject_hyperparams``).

    ``update`` checks (at trace time, so at no cost under jit) that every ``mipd_grads`` leaf has
    shape ``(M,) + param.shape`` and raises a ``ValueError`` naming the leaf otherwise, instead of
    broadcasting a gradient without the ``M`` axis or with the wrong ``M``.
    """
    rule = resolve_strategy(strategy)
    players = _static_players(players)

    def update_fn(updates, state, params=None, *, mipd_grads=None, **extra_args):
        del params, extra_args
        if mipd_grads is None:
            raise ValueError(
                "the competition update needs mipd_grads=: the per-term MIPD gradients (leaves with a leading axis M)."
            )
        combined = combine_mipd_grads(mipd_grads, players, rule, num_players=num_players, like=updates)
        return jax.tree.map(lambda g, c: g + jnp.asarray(weight, g.dtype) * c.astype(g.dtype), updates, combined), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def competition(
    inner: optax.GradientTransformation,
    *,
    players: Any,
    strategy: str | float | Strategy = "greedy",
    weight: float | jax.Array = 0.1,
    num_players: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optimizer whose MIPD gradients are combined by the competition game first:
    ``optax.chain(add_game_gradients(...), inner)``.

    ``update(grads, state, params, *, mipd_grads, **extra)`` returns the inner optimizer's update
    of ``grads + weight * combine_mipd_grads(mipd_grads, players, strategy)``, where ``grads`` is
    the gradient of the rest of the loss (task CE, unimodal CEs, contrastive, CEB and, for
    ``s(k) = 1`` strategies, the clean-prediction path of the MIPD terms).

    ``weight`` can be injected: ``optax.inject_hyperparams(competition)(inner, players=..., weight=0.1)``.
    With ``nnx.Optimizer``, pass the keyword through: ``optimizer.update(model, grads, mipd_grads=...)``.

    Args:
      inner: the optimizer that receives the combined gradient.
      players: pytree like the parameters with int leaves (see :func:`assign_players`). Must be
        static: Python ints, not arrays traced by ``jit`` (a ``TypeError`` says so).
      strategy: ``"greedy"`` (default), ``"independent"``, ``"collaborative"``, ``k`` or a :class:`Strategy`.
      weight: ``lambda_M``.
      num_players: ``M``; by default the highest player index + 1 (see :func:`combine_mipd_grads`).
    """
    return optax.chain(add_game_gradients(players=players, strategy=strategy, weight=weight,
                                          num_players=num_players), inner)


def per_term_grads(loss_terms_fn: Callable[[Any], jax.Array], params: Any) -> Any:
    """Per-term gradients of a vector-valued loss ``params -> [M]``: leaves ``[M, ...]`` (``jacrev``)."""
    return jax.jacrev(loss_terms_fn)(params)
