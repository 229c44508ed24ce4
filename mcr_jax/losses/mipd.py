r"""The unique-information term: MIPD estimated by perturbing one modality's latent.

For modality :math:`m` the Mutual Information Perturbation Difference is lower-bounded through the
divergence between the clean prediction and the prediction with :math:`z_m` replaced by a sample
from its marginal (Kontras et al. 2025, §3.2; docs/method.md#mipd states it with the other terms):

.. math::
   D_m = \mathbb{E}_{\sigma}\Big[\tfrac{1}{B}\sum_b
         \mathrm{JSD}\big(p(y \mid z_1, \dots, z_M)_b \,\|\,
                          p(y \mid z_1, \dots, z_m^{\sigma}, \dots, z_M)_b\big)\Big],
   \qquad L^{\mathrm{MIPD}}_m = -D_m,

where :math:`z_m^{\sigma} = z_m[\sigma]` for a random permutation :math:`\sigma` of the batch rows.
With ``S`` permutations the fusion head runs once on ``S·B`` stacked rows per modality (no Python
loop over ``S``).

Cheap permutations. ``jax.random.permutation`` is a sort; drawing ``S`` of them per step costs
more than a small model's whole step on a CPU. :func:`sample_permutations` therefore defaults to
``method="shift"``: one uniform permutation :math:`\pi` of the batch, conjugated with ``S``
independent cyclic shifts, :math:`\sigma_s = \pi \circ (\cdot + r_s) \circ \pi^{-1}`, with
:math:`r_s` uniform on ``1 … B-1`` by default. Every :math:`\sigma_s` is then a derangement (no row
keeps its own latent), and each row's partner :math:`\sigma_s(b)` is uniform over the *other*
rows, exactly as under a uniform derangement. The default estimate is therefore the MIPD of
uniform derangements, which is ``B / (B - 1)`` times the MIPD of uniform permutations (a fixed
point contributes 0): the reference samples uniform permutations, fixed points included.

``derangement=False`` lets :math:`r_s` be 0 as well; a draw :math:`r_s = 0` (probability
``1/B``) makes that whole sample the identity, which is where the shift sampler's excess variance
over independent uniform permutations comes from (given :math:`\pi` the ``S`` samples are
uncorrelated). With the default derangements the variance of the estimate is that of ``S``
independent uniform derangements (tested). ``method="uniform"`` draws ``S`` independent uniform
permutations (uniform derangements by rejection) for studies that want the reference's sampler.

Padded batches. ``valid`` (``[B]`` bool) restricts the permutations to the valid rows (they are
permuted among themselves; padded rows stay fixed) and ``mipd_divergences(..., mask=valid)``
averages over the valid rows only, so padded rows change nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcr_jax.losses._checks import (
    assert_rank,
    require_modalities,
    require_nonempty_batch,
    require_rank,
    require_same_batch,
    shape_of,
)
from mcr_jax.losses.divergences import DIVERGENCES, LN2

PERTURBATIONS = ("permute", "noise", "zero")


def sample_permutations(
    key: jax.Array,
    num_samples: int,
    batch_size: int,
    *,
    derangement: bool = True,
    method: str = "shift",
    valid: jax.Array | None = None,
) -> jax.Array:
    """Draws ``S`` permutations of ``B`` batch rows.

    Args:
      key: a PRNG key.
      num_samples: ``S >= 1``.
      batch_size: ``B >= 1`` (``>= 2`` for a derangement).
      derangement: forbid fixed points (``sigma(b) != b``); the default. ``False`` allows them (the
        reference's uniform permutations; see the module docstring for what that does to the
        estimate and its variance).
      method: ``"shift"`` (cheap; one sort of ``B`` per call, see the module docstring) or
        ``"uniform"`` (``S`` independent uniform permutations; one sort each).
      valid: optional ``[B]`` bool: only valid rows are permuted, among themselves; invalid
        (padded) rows map to themselves. With fewer than two valid rows no derangement exists and
        the valid row maps to itself.

    Returns:
      ``[S, B]`` int32; row ``s`` is a permutation of ``0..B-1``.
    """
    num_samples, batch_size = int(num_samples), int(batch_size)
    if num_samples < 1:
        raise ValueError(f"num_samples (S) must be >= 1; got {num_samples}.")
    if batch_size < 1:
        raise ValueError(f"batch_size (B) must be >= 1; got {batch_size}.")
    if derangement and batch_size < 2 and valid is None:
        raise ValueError(f"a derangement needs batch_size >= 2; got {batch_size} (pass derangement=False).")
    if valid is not None and shape_of(valid) != (batch_size,):
        raise ValueError(f"valid has shape {shape_of(valid)}; expected ({batch_size},) for batch_size {batch_size}.")
    if method not in ("shift", "uniform"):
        raise ValueError(f"unknown permutation method {method!r}; use 'shift' or 'uniform'.")
    low = 1 if derangement else 0
    if valid is None:
        if method == "shift":
            key_pi, key_r = jax.random.split(key)
            pi = jax.random.permutation(key_pi, batch_size).astype(jnp.int32)
            inv = _invert(pi)
            shifts = jax.random.randint(key_r, (num_samples, 1), low, batch_size, dtype=jnp.int32)
            return pi[(inv[None, :] + shifts) % batch_size]
        keys = jax.random.split(key, num_samples)
        if not derangement:
            return jax.vmap(lambda k: jax.random.permutation(k, batch_size).astype(jnp.int32))(keys)
        return jax.vmap(lambda k: _uniform_derangement(k, batch_size))(keys)
    valid = jnp.asarray(valid, bool)
    n = jnp.sum(valid.astype(jnp.int32))
    if method == "shift":
        key_pi, key_r = jax.random.split(key)
        order = _valid_first_order(key_pi, valid)  # valid rows in random order, then the padded ones
        pos = _invert(order)
        span = jnp.maximum(n - low, 0)
        shifts = low + jnp.floor(jax.random.uniform(key_r, (num_samples, 1)) * span).astype(jnp.int32)
        new_pos = jnp.where(valid[None, :], (pos[None, :] + shifts) % jnp.maximum(n, 1), pos[None, :])
        return order[new_pos]
    keys = jax.random.split(key, num_samples)
    return jax.vmap(lambda k: _uniform_on_valid(k, valid, n, derangement))(keys)


def _invert(perm: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _valid_first_order(key: jax.Array, valid: jax.Array) -> jax.Array:
    """A random order of the valid rows followed by the invalid rows in their order."""
    u = jax.random.uniform(key, valid.shape)
    return jnp.argsort(jnp.where(valid, u, 2.0 + jnp.arange(valid.shape[0]) / valid.shape[0])).astype(jnp.int32)


def _uniform_on_valid(key: jax.Array, valid: jax.Array, n: jax.Array, derangement: bool) -> jax.Array:
    """A uniform permutation (derangement, by rejection) of the valid rows; invalid rows fixed."""
    arange = jnp.arange(valid.shape[0], dtype=jnp.int32)

    def draw(k):
        ka, kb = jax.random.split(k)
        a, b = _valid_first_order(ka, valid), _valid_first_order(kb, valid)
        return arange.at[a].set(jnp.where(arange < n, b, a))

    if not derangement:
        return draw(key)

    def cond(carry):
        _, perm = carry
        return jnp.any((perm == arange) & valid) & (n >= 2)

    def body(carry):
        k, _ = carry
        k, sub = jax.random.split(k)
        return k, draw(sub)

    k0, sub0 = jax.random.split(key)
    return jax.lax.while_loop(cond, body, (k0, draw(sub0)))[1]


def _uniform_derangement(key: jax.Array, batch_size: int) -> jax.Array:
    """A uniform derangement by rejection (about e ≈ 2.7 draws on average)."""
    arange = jnp.arange(batch_size, dtype=jnp.int32)

    def draw(k):
        return jax.random.permutation(k, batch_size).astype(jnp.int32)

    def cond(carry):
        _, perm = carry
        return jnp.any(perm == arange)

    def body(carry):
        k, _ = carry
        k, sub = jax.random.split(k)
        return k, draw(sub)

    k0, sub0 = jax.random.split(key)
    _, perm = jax.lax.while_loop(cond, body, (k0, draw(sub0)))
    return perm


def _require_permutation_shape(permutations, batch: int | None = None, latent_shape=None) -> None:
    """``permutations`` must be ``[S, B]`` (``S >= 1``, ``B`` the batch size) of an integer dtype."""
    shape = shape_of(permutations)
    if len(shape) != 2:
        raise ValueError(
            f"permutations must have rank 2 ([S, B]: S permutations of the B batch rows); got shape {shape}. "
            "For a single permutation pass perm[None]."
        )
    dtype = jnp.result_type(permutations)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"permutations must hold integer row indices ([S, B] int32); got dtype {dtype} (shape {shape})."
        )
    if shape[0] < 1:
        raise ValueError(f"permutations has shape {shape}: S = 0 permutations; the MIPD averages over S >= 1.")
    if batch is not None and shape[1] != batch:
        seen = f"the latent has shape {latent_shape}" if latent_shape is not None else f"the batch size is {batch}"
        raise ValueError(
            f"permutations has shape {shape} but {seen}; the permutations' second axis must equal the batch size B."
        )


def _first_bad_row(perms: np.ndarray) -> str | None:
    """A description of the first row of ``perms [S, B]`` that is not a permutation of ``0..B-1``."""
    batch = perms.shape[1]
    bad = np.any(np.sort(perms, axis=1) != np.arange(batch)[None], axis=1)
    if not bad.any():
        return None
    r = int(np.argmax(bad))
    row = perms[r]
    inside = row[(row >= 0) & (row < batch)]
    counts = np.bincount(inside.astype(np.int64), minlength=batch)
    shown = row.tolist() if batch <= 16 else row[:16].tolist() + ["..."]
    problems = []
    outside = row[(row < 0) | (row >= batch)]
    if outside.size:
        problems.append(f"values outside 0..{batch - 1}: {sorted(set(outside.tolist()))[:8]}")
    if (counts > 1).any():
        problems.append(f"repeated: {np.flatnonzero(counts > 1)[:8].tolist()}")
    if (counts == 0).any():
        problems.append(f"missing: {np.flatnonzero(counts == 0)[:8].tolist()}")
    return (
        f"permutations row {r} of {perms.shape[0]} is not a permutation of 0..{batch - 1} ({'; '.join(problems)}): "
        f"{shown}. Every row must be a bijection of the batch rows (the gather's backward pass uses the "
        "inverse permutation); draw them with sample_permutations."
    )


def _permutations_ok(permutations: jax.Array, inverse: jax.Array) -> jax.Array:
    """Scalar bool, in the graph: every row is a permutation (values in range, ``inverse[perm] == arange``)."""
    batch = shape_of(permutations)[1]
    in_range = (permutations >= 0) & (permutations < batch)
    back = jnp.take_along_axis(inverse, jnp.clip(permutations, 0, batch - 1), axis=1)
    return jnp.all(in_range & (back == jnp.arange(batch, dtype=back.dtype)[None]))


def inverse_permutations(permutations: jax.Array) -> jax.Array:
    """``[S, B] -> [S, B]``: row ``s`` is the inverse of permutation ``s``."""
    _require_permutation_shape(permutations)
    num_samples, batch = shape_of(permutations)
    rows = jnp.arange(num_samples)[:, None]
    return jnp.zeros_like(permutations).at[rows, permutations].set(jnp.arange(batch, dtype=permutations.dtype)[None])


@jax.custom_vjp
def _permute_rows(z, permutations, inverse):
    return z[permutations]


def _permute_rows_fwd(z, permutations, inverse):
    return z[permutations], inverse


def _permute_rows_bwd(inverse, g):
    # The transpose of a gather by a permutation is a gather by its inverse: no scatter-add
    # (slow on CPU), one gather and a sum over the S samples.
    idx = inverse.reshape(inverse.shape + (1,) * (g.ndim - 2))
    return jnp.sum(jnp.take_along_axis(g, idx, axis=1), axis=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def permute_rows(z: jax.Array, permutations: jax.Array, inverse: jax.Array | None = None) -> jax.Array:
    """``z[permutations]``: ``[B, ...]`` and ``[S, B]`` -> ``[S, B, ...]``, with a gather-only backward pass.

    Every row of ``permutations`` must be a permutation of ``0..B-1``: the backward pass gathers
    by the inverse, which is the transpose only for a bijection (see ``mipd_divergences``'s
    ``check_permutations``).
    """
    if not shape_of(z):
        raise ValueError(f"z must have a leading batch axis [B, ...]; got shape {shape_of(z)}.")
    _require_permutation_shape(permutations, shape_of(z)[0], shape_of(z))
    if inverse is None:
        inverse = inverse_permutations(permutations)
    return _permute_rows(z, permutations, inverse)


def perturb_latent(
    z: jax.Array,
    *,
    kind: str = "permute",
    permutations: jax.Array | None = None,
    key: jax.Array | None = None,
    num_samples: int | None = None,
    noise_scale: float = 1.0,
    inverse_permutations: jax.Array | None = None,
) -> jax.Array:
    r"""Builds ``S`` perturbed copies of one modality's latent.

    - ``"permute"``: :math:`\tilde z_s = z[\sigma_s]` (needs ``permutations [S, B]``);
    - ``"noise"``: :math:`\tilde z_s = z + \text{noise\_scale}\cdot \mathrm{std}_B(z) \odot \epsilon_s`,
      :math:`\epsilon_s \sim \mathcal N(0, I)`, the std taken over the batch per feature (needs
      ``key`` and ``num_samples``);
    - ``"zero"``: :math:`\tilde z_s = 0` (every sample is the same; ``S`` copies are returned so
      the shapes agree with the other kinds).

    Args:
      z: ``[B, ...]`` latent (or branch output) of one modality.

    Returns:
      ``[S, B, ...]`` perturbed latents.
    """
    if kind == "permute":
        if permutations is None:
            raise ValueError("perturbation 'permute' needs permutations [S, B].")
        return permute_rows(z, permutations, inverse_permutations)
    if num_samples is None:
        num_samples = 1 if permutations is None else shape_of(permutations)[0]
    if num_samples < 1:
        raise ValueError(f"num_samples (S) must be >= 1; got {num_samples}.")
    if kind == "noise":
        if key is None:
            raise ValueError("perturbation 'noise' needs a PRNG key.")
        std = jax.lax.stop_gradient(jnp.std(z, axis=0, keepdims=True))
        eps = jax.random.normal(key, (num_samples,) + shape_of(z), dtype=z.dtype)
        return z[None] + noise_scale * std[None] * eps
    if kind == "zero":
        return jnp.zeros((num_samples,) + shape_of(z), dtype=z.dtype)
    raise ValueError(f"unknown perturbation {kind!r}; use one of {PERTURBATIONS}.")


def mipd_divergences(
    clean_logits: jax.Array,
    fuse_fn: Callable[[list[jax.Array]], jax.Array] | Sequence[Callable[[list[jax.Array]], jax.Array]],
    latents: Sequence[jax.Array],
    permutations: jax.Array | None = None,
    *,
    divergence: str = "jsd",
    perturbation: str = "permute",
    key: jax.Array | None = None,
    num_samples: int | None = None,
    noise_scale: float = 1.0,
    permuted_latents: Sequence[jax.Array] | None = None,
    nonperturbed_transform: Callable[[jax.Array], jax.Array] | None = None,
    stop_perturbed: bool = False,
    perturbed_latents: Sequence[jax.Array] | None = None,
    mask: jax.Array | None = None,
    check_permutations: bool | None = None,
) -> jax.Array:
    r"""Per-modality divergence :math:`D_m` between clean and perturbed predictions.

    For each modality ``m`` the fusion head runs once on ``S·B`` stacked rows: the perturbed
    latent of ``m`` and the other modalities' latents tiled ``S`` times. The result is averaged
    over the ``S·B`` rows. ``L_MIPD_m = -D_m``; the game (``mcr_jax.game``) decides how the ``M``
    terms' gradients are combined.

    Args:
      clean_logits: ``[B, C]`` fused logits of the clean pass (regression: ``[B, K]`` predictions).
        Pass ``jax.lax.stop_gradient(...)`` to keep MIPD gradients away from the clean prediction
        (exact under the greedy game).
      fuse_fn: maps a list of ``M`` arrays ``[N, ...]`` (ordered like ``latents``) to ``[N, C]``.
        For linear late fusion pass per-modality *branch logits* ``z_m W_m`` as ``latents`` and a
        ``fuse_fn`` that sums them and adds the bias: the same predictions and gradients with
        ``S·B·C`` instead of ``S·B·D·C`` work. A sequence of ``M`` functions gives modality
        ``m``'s perturbed predictions their own fusion function (the game uses this to scale the
        gradients of player-owned fusion parameters per term).
      latents: ``M >= 2`` arrays ``[B, ...]``, one per modality, from the clean pass (``B >= 1``).
      permutations: ``[S, B]`` int32 (for ``perturbation="permute"``), ``S >= 1``; every row a
        permutation of ``0..B-1`` (see ``check_permutations``).
      divergence: ``"jsd"`` (classification, default), ``"kl"`` or ``"mse"`` (regression).
      perturbation: ``"permute"`` (default), ``"noise"`` or ``"zero"``; see :func:`perturb_latent`.
      key: PRNG key for ``"noise"`` (split per modality).
      num_samples: ``S`` for ``"noise"``/``"zero"`` when no permutations are given.
      noise_scale: multiplier of the batch std for ``"noise"``.
      permuted_latents: optional ``M`` arrays ``[B, ...]`` to perturb instead of ``latents`` (the
        reference's second encoder pass in evaluation mode).
      nonperturbed_transform: applied to every non-perturbed latent inside the perturbed
        predictions; the single-backward game passes its gradient-scaling identity here.
      stop_perturbed: stop the gradient of the perturbed predictions, leaving only the path
        through ``clean_logits`` (the clean-prediction part of the game's optax form).
      perturbed_latents: optional ``M`` arrays ``[S, B, ...]`` used directly as the perturbed
        copies (e.g. latents of perturbed *inputs*, re-encoded); ``perturbation`` is then unused.
      mask: optional ``[B]`` (bool or 0/1): the average runs over the valid rows only (padded
        rows of a final batch). Draw the permutations with ``sample_permutations(...,
        valid=mask)`` so that valid rows are never paired with padded ones.
      check_permutations: how every row of ``permutations`` is verified to be a permutation of
        ``0..B-1``. Rows that are not (repeated or out-of-range indices, which a gather clamps)
        give wrong values and wrong gradients: the backward pass of the permuted gather uses the
        inverse permutation, which is the gather's transpose only for a bijection. The shape
        (``[S, B]``, ``S >= 1``, ``B`` the batch size) and the integer dtype are always checked (at
        trace time: free), and NumPy ``permutations`` (host data) always have their values checked,
        raising a ``ValueError`` naming the first bad row. Device arrays, traced or not:

        * ``None`` (default): an in-graph check (in range, and ``inverse[perm] == arange``: one
          gather of ``S·B`` indices, no host sync) turns the returned divergences, and hence their
          gradients, into NaN when any row is not a permutation, so a bad draw is loud rather than
          silently wrong (the trainer's non-finite check then stops the run; ``jax_debug_nans``
          points at it). For valid rows the values and gradients are exactly the unchecked ones.
        * ``True``: as ``None``, and a concrete (untraced) device array is also fetched and checked
          on the host, raising the ``ValueError`` (a device-to-host copy per call: for tests and
          debugging).
        * ``False``: the opt-out: no check of device arrays' values.

    Returns:
      ``[M]`` divergences ``D_m`` (each in ``[0, ln 2]`` for the JSD).

    Raises:
      ValueError: for mismatched shapes, an empty batch (``B = 0``) or ``S = 0`` samples (the mean
        would be NaN), permutations that are not ``[S, B]`` integers, or (see
        ``check_permutations``) rows that are not permutations.
    """
    num_modalities = require_modalities(latents)
    batch = require_same_batch(latents)
    require_nonempty_batch(batch, "latents", shape_of(latents[0]))
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {tuple(DIVERGENCES)}.")
    require_rank(clean_logits, 2, "clean_logits", "[B, C]")
    if shape_of(clean_logits)[0] != batch:
        raise ValueError(
            f"clean_logits has shape {shape_of(clean_logits)} but the latents have batch size {batch} "
            f"(first latent shape {shape_of(latents[0])})."
        )
    if permuted_latents is not None:
        if len(permuted_latents) != num_modalities:
            raise ValueError(
                f"permuted_latents holds {len(permuted_latents)} arrays but latents holds {num_modalities}."
            )
        for m, (a, b) in enumerate(zip(latents, permuted_latents, strict=True)):
            if shape_of(a) != shape_of(b):
                raise ValueError(f"permuted_latents[{m}] has shape {shape_of(b)} but latents[{m}] has {shape_of(a)}.")
    if perturbation == "permute" and permutations is None and perturbed_latents is None:
        raise ValueError("perturbation 'permute' needs permutations [S, B]; see sample_permutations.")
    if perturbation == "noise" and key is None and perturbed_latents is None:
        raise ValueError("perturbation 'noise' needs a PRNG key.")
    if permutations is not None:
        _require_permutation_shape(permutations, batch, shape_of(latents[0]))
        num_samples = shape_of(permutations)[0]
    elif perturbed_latents is not None:
        num_samples = shape_of(perturbed_latents[0])[0] if shape_of(perturbed_latents[0]) else 0
    elif num_samples is None:
        num_samples = 1
    if int(num_samples) < 1:
        raise ValueError(f"num_samples (S) must be >= 1; got {num_samples} (the MIPD averages over S samples).")
    uses_permutations = perturbation == "permute" and perturbed_latents is None
    if uses_permutations and not isinstance(permutations, jax.core.Tracer):
        if check_permutations is True or not isinstance(permutations, jax.Array):
            bad = _first_bad_row(np.asarray(permutations))
            if bad is not None:
                raise ValueError(bad)
    if perturbed_latents is not None:
        if len(perturbed_latents) != num_modalities:
            raise ValueError(
                f"perturbed_latents holds {len(perturbed_latents)} arrays but latents holds {num_modalities}."
            )
        for m, (z, zp) in enumerate(zip(latents, perturbed_latents, strict=True)):
            if shape_of(zp) != (num_samples,) + shape_of(z):
                raise ValueError(
                    f"perturbed_latents[{m}] has shape {shape_of(zp)}; expected {(num_samples,) + shape_of(z)} "
                    f"([S, B, ...] for latents[{m}] of shape {shape_of(z)})."
                )
    if mask is not None and shape_of(mask) != (batch,):
        raise ValueError(f"mask has shape {shape_of(mask)}; expected ({batch},) for latents of batch size {batch}.")
    inverse = inverse_permutations(permutations) if uses_permutations else None  # shared by every modality
    if perturbed_latents is not None:
        copies = list(perturbed_latents)
    else:
        copies = perturbed_copies(latents if permuted_latents is None else permuted_latents, perturbation,
                                  permutations=permutations, inverse=inverse, key=key, num_samples=num_samples,
                                  noise_scale=noise_scale)
    result = divergences_of_copies(clean_logits, fuse_fn, latents, copies, divergence=divergence,
                                   nonperturbed_transform=nonperturbed_transform, stop_perturbed=stop_perturbed,
                                   mask=mask)
    if uses_permutations and check_permutations is not False and isinstance(permutations, jax.Array):
        # Device data: no raise without a host sync; NaN values and gradients instead of wrong ones.
        result = result * jnp.where(_permutations_ok(permutations, inverse), 1.0, jnp.nan).astype(result.dtype)
    return result


def perturbed_copies(
    sources: Sequence[jax.Array],
    perturbation: str = "permute",
    *,
    permutations: jax.Array | None = None,
    inverse: jax.Array | None = None,
    key: jax.Array | None = None,
    num_samples: int | None = None,
    noise_scale: float = 1.0,
) -> list[jax.Array]:
    """The ``S`` perturbed copies ``[S, B, ...]`` of every modality's latent (:func:`perturb_latent`
    per modality; a ``"noise"`` key is split once per modality, in modality order)."""
    keys = jax.random.split(key, len(sources)) if key is not None else [None] * len(sources)
    return [perturb_latent(z, kind=perturbation, permutations=permutations, key=k, num_samples=num_samples,
                           noise_scale=noise_scale, inverse_permutations=inverse)
            for z, k in zip(sources, keys, strict=True)]


def divergences_of_copies(
    clean_logits: jax.Array,
    fuse_fn: Callable[[list[jax.Array]], jax.Array] | Sequence[Callable[[list[jax.Array]], jax.Array]],
    latents: Sequence[jax.Array],
    copies: Sequence[jax.Array],
    *,
    divergence: str = "jsd",
    nonperturbed_transform: Callable[[jax.Array], jax.Array] | None = None,
    stop_perturbed: bool = False,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""The core of the MIPD term: ``D_m = mean over S·B rows of div(p(y | x), p(y | x with z_m → copy))``.

    For each modality ``m`` the fusion head runs once on ``S·B`` stacked rows: ``copies[m]``
    (``[S, B, ...]``) in place of ``z_m`` and every other latent tiled ``S`` times (through
    ``nonperturbed_transform``). Arguments as in :func:`mipd_divergences`, which validates them;
    returns ``[M]``.
    """
    num_modalities = len(latents)
    num_samples, batch = shape_of(copies[0])[0], shape_of(latents[0])[0]
    transform = nonperturbed_transform or (lambda x: x)
    fuse_fns = list(fuse_fn) if isinstance(fuse_fn, (list, tuple)) else [fuse_fn] * num_modalities
    if len(fuse_fns) != num_modalities:
        raise ValueError(f"got {len(fuse_fns)} fusion functions for {num_modalities} modalities.")
    div = _jsd_against_clean(clean_logits) if divergence == "jsd" else _broadcast_divergence(
        DIVERGENCES[divergence], clean_logits)
    expected_shape = (num_samples * batch,) + shape_of(clean_logits)[1:]
    if mask is not None:
        weights = jnp.asarray(mask).astype(jnp.float32)
        weights = weights / (num_samples * jnp.maximum(jnp.sum(weights), 1.0))

        def reduce(x):
            return jnp.sum(x * weights[None, :].astype(x.dtype))
    else:
        reduce = jnp.mean
    out = []
    for m in range(num_modalities):
        inputs = []
        for i, z in enumerate(latents):
            zi = copies[m] if i == m else jnp.broadcast_to(transform(z)[None], (num_samples,) + shape_of(z))
            inputs.append(zi.reshape((num_samples * batch,) + shape_of(z)[1:]))
        perturbed_logits = fuse_fns[m](inputs)
        if stop_perturbed:
            perturbed_logits = jax.lax.stop_gradient(perturbed_logits)
        if shape_of(perturbed_logits) != expected_shape:
            raise ValueError(
                f"fuse_fn returned shape {shape_of(perturbed_logits)} for {num_samples * batch} stacked rows; "
                f"expected {expected_shape} to match clean_logits {shape_of(clean_logits)}."
            )
        out.append(reduce(div(perturbed_logits.reshape((num_samples,) + shape_of(clean_logits)))))
    return jnp.stack(out)


def _broadcast_divergence(div, clean_logits):
    """``[S, B, C] -> [S, B]``: ``div(clean, perturbed)`` with the clean rows broadcast over S."""
    return lambda q: div(jnp.broadcast_to(clean_logits[None], q.shape), q)


def _jsd_against_clean(clean_logits):
    r"""``[S, B, C] -> [S, B]`` JSDs against the clean rows, whose part is computed once, not S times.

    Uses :math:`\mathrm{JSD} = \tfrac12\,(\sum p\log p + \sum q \log q) - \sum m \log m` with
    :math:`\log m` from ``logaddexp`` of the log-softmaxes (equal to ``jsd_from_logits``; tested).
    """
    log_p = jax.nn.log_softmax(clean_logits, axis=-1)[None]  # [1, B, C]
    neg_entropy_p = jnp.sum(jnp.exp(log_p) * log_p, axis=-1)  # [1, B]

    def div(q_logits):
        log_q = jax.nn.log_softmax(q_logits, axis=-1)
        log_m = jnp.logaddexp(log_p, log_q) - LN2
        jsd = 0.5 * (neg_entropy_p + jnp.sum(jnp.exp(log_q) * log_q, axis=-1)) - jnp.sum(jnp.exp(log_m) * log_m, -1)
        return jnp.clip(jsd, 0.0, LN2)

    return div


def mipd_loss(divergences: jax.Array) -> jax.Array:
    """``L_MIPD_m = -D_m`` for every modality: ``[M] -> [M]`` (another rank is a ``ValueError``)."""
    assert_rank(divergences, 1, "divergences", "[M], one per modality, from mipd_divergences")
    return -divergences
