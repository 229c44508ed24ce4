"""The synthetic unique/shared benchmark (paper §4.1; docs/method.md#synthetic-benchmark; docs/data.md), in plain numpy.

Generative process for ``M`` modalities and ``C`` classes (all from one seed):

* fixed parameters, per modality ``m``: class means ``mu_m[c] ~ N(0, s_m² / d · I_d)`` (so
  ``E‖mu_m[c]‖² = s_m²``, with ``s_m`` the ``embedding_scale`` and ``d`` the ``raw_dim``) and a
  projection ``P_m ∈ R^{d × D}`` with i.i.d. ``U(0, 1)`` entries (``D = projected_dim = 100``);
* per example: ``y ~ U{0..C-1}``, a type ``t ∈ {shared, unique to 1, …, unique to M}`` (exact counts
  from ``proportions``, randomly placed), noise ``n_m ~ N(0, I_d)`` and

      r_m = n_m + [t = shared or t = unique to m] · mu_m[y],    x_m = r_m P_m   (float32 [D]).

So a shared example carries its label in every modality; a unique-to-m example only in modality m,
the other modalities are pure (projected) noise. ``sample_type`` stores ``-1`` for shared and ``i``
for unique to ``modalities[i]`` (0-based), ``int8``.

Random streams: ``SeedSequence(seed).spawn(4)`` gives one stream for the parameters and one per
split, so the test set does not change when only the training size changes, and the class means
and projections are the same for every point of a `sweep_unique_ratio` sweep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from mcr_jax.data.pipeline import standardize
from mcr_jax.data.types import ArraySplit, DatasetInfo
from mcr_jax.options import merge_options

SPLITS = ("train", "validation", "test")
SHARED = -1

# The default (docs/data.md, "Synthetic: the default and why"): modality x1 is easy (class means of
# norm 8) and alone solves the 80 % shared examples; modality x2 is hard (norm 3) and is needed for
# the 20 % unique-to-2 examples. With 500 training examples two unimodal MLPs ensembled beat one
# jointly trained late-fusion MLP, and the joint model is ~20 points worse than the unimodal x2
# model on the unique-to-2 group: modality competition (numbers and command in docs/data.md).
DEFAULTS = dict(
    name="synthetic",
    num_classes=5,
    num_modalities=2,
    raw_dim=100,
    projected_dim=100,
    embedding_scale=(8.0, 3.0),
    proportions=(0.8, 0.0, 0.2),
    num_train=500,
    num_validation=500,
    num_test=5000,
    seed=0,
    standardize=True,
)


def default_config() -> ml_collections.ConfigDict:
    """The default synthetic config (see `DEFAULTS` and docs/data.md for every field)."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def modality_names(num_modalities: int) -> tuple[str, ...]:
    """``("x1", …, "xM")``: the modality names of the synthetic benchmark."""
    return tuple(f"x{m + 1}" for m in range(num_modalities))


def parse_proportions(proportions, num_modalities: int) -> np.ndarray:
    """Proportions as a float64 array ``[M + 1]``: ``(shared, unique to 1, …, unique to M)``.

    Accepts a sequence of ``M + 1`` numbers or a mapping ``{"shared": s, "unique": (u_1, …, u_M)}``.
    Raises ``ValueError`` unless all entries are ``>= 0`` and they sum to 1 (within 1e-6).
    """
    if isinstance(proportions, Mapping) or hasattr(proportions, "to_dict"):
        p = dict(proportions.to_dict() if hasattr(proportions, "to_dict") else proportions)
        if set(p) != {"shared", "unique"}:
            raise ValueError(
                f"proportions as a mapping needs exactly the keys 'shared' and 'unique', got {sorted(p)}."
            )
        values = [p["shared"], *list(p["unique"])]
    elif isinstance(proportions, Sequence) and not isinstance(proportions, str):
        values = list(proportions)
    else:
        raise ValueError(f"proportions must be a sequence or a mapping, got {proportions!r}.")
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (num_modalities + 1,):
        raise ValueError(
            f"proportions needs {num_modalities + 1} entries (shared, then unique to each of the "
            f"{num_modalities} modalities), got {len(values)}: {values}; set it when changing num_modalities."
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"proportions must be finite and >= 0, got {values}.")
    if abs(arr.sum() - 1.0) > 1e-6:
        raise ValueError(f"proportions must sum to 1, got {values} (sum {arr.sum():.6g}).")
    return arr


def _per_modality(value, num_modalities: int, field: str) -> np.ndarray:
    """A scalar or a length-M sequence as a float64 array ``[M]``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full((num_modalities,), float(arr))
    if arr.shape != (num_modalities,):
        raise ValueError(
            f"{field} must be a number or {num_modalities} numbers (one per modality), got {value!r}; "
            f"set it when changing num_modalities."
        )
    return arr


def _type_counts(n: int, proportions: np.ndarray) -> np.ndarray:
    """Exact per-type counts ``[M + 1]`` summing to ``n`` (largest-remainder rounding)."""
    raw = proportions * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(int(seed)).spawn(1 + len(SPLITS))
    names = ("parameters", *SPLITS)
    return {k: np.random.Generator(np.random.PCG64(s)) for k, s in zip(names, children, strict=True)}


def _check(cfg: dict) -> None:
    for field in ("num_classes", "num_modalities", "raw_dim", "projected_dim"):
        if int(cfg[field]) < 1:
            raise ValueError(f"synthetic config: {field} must be >= 1, got {cfg[field]}.")
    if int(cfg["num_classes"]) < 2:
        raise ValueError(f"synthetic config: num_classes must be >= 2, got {cfg['num_classes']}.")
    for field in ("num_train", "num_validation", "num_test"):
        if int(cfg[field]) < 0:
            raise ValueError(f"synthetic config: {field} must be >= 0, got {cfg[field]}.")
    if np.any(_per_modality(cfg["embedding_scale"], int(cfg["num_modalities"]), "embedding_scale") < 0):
        raise ValueError(f"synthetic config: embedding_scale must be >= 0, got {cfg['embedding_scale']}.")


def make_parameters(config) -> dict[str, np.ndarray]:
    """The fixed parameters of a synthetic config.

    Returns:
      ``{"class_means": float64 [M, C, raw_dim], "projections": float64 [M, raw_dim, projected_dim]}``.
    """
    cfg = merge_options(DEFAULTS, config, where="synthetic dataset")
    _check(cfg)
    m, c, d, big_d = (int(cfg[k]) for k in ("num_modalities", "num_classes", "raw_dim", "projected_dim"))
    scales = _per_modality(cfg["embedding_scale"], m, "embedding_scale")
    rng = _rngs(cfg["seed"])["parameters"]
    means = np.stack([rng.standard_normal((c, d)) * (scales[i] / math.sqrt(d)) for i in range(m)])
    projections = np.stack([rng.uniform(0.0, 1.0, size=(d, big_d)) for _ in range(m)])
    return {"class_means": means, "projections": projections}


def sample_split(params: Mapping[str, np.ndarray], proportions: np.ndarray, n: int,
                 rng: np.random.Generator, *, return_raw: bool = False) -> dict[str, np.ndarray]:
    """Draw ``n`` examples with the given parameters (see the module docstring).

    Args:
      params: output of `make_parameters`.
      proportions: float array ``[M + 1]`` from `parse_proportions`.
      n: number of examples.
      rng: the split's random generator.
      return_raw: also return the pre-projection vectors as ``"raw_x1"`` … (float64 ``[n, raw_dim]``).

    Returns:
      ``{"x1": float32 [n, D], …, "label": int32 [n], "sample_type": int8 [n]}`` (plus raw entries).
    """
    means, projections = params["class_means"], params["projections"]
    num_modalities, num_classes, raw_dim = means.shape
    counts = _type_counts(n, proportions)
    types = rng.permutation(np.repeat(np.arange(-1, num_modalities, dtype=np.int8), counts))
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(modality_names(num_modalities)):
        noise = rng.standard_normal((n, raw_dim))
        carries = (types == SHARED) | (types == i)
        raw = noise + carries[:, None] * means[i][labels]
        out[name] = (raw @ projections[i]).astype(np.float32)
        if return_raw:
            out[f"raw_{name}"] = raw
    out["label"] = labels
    out["sample_type"] = types
    return out


def load_synthetic(config=None) -> tuple[dict[str, ArraySplit], DatasetInfo]:
    """Build the synthetic benchmark.

    Config fields (defaults in `DEFAULTS`): ``num_classes`` C, ``num_modalities`` M, ``raw_dim`` d,
    ``projected_dim`` D, ``embedding_scale`` (a number or M numbers: the norm of a class mean),
    ``proportions`` (shared, unique to 1, …, unique to M; or ``{"shared", "unique"}``),
    ``num_train`` / ``num_validation`` / ``num_test``, ``seed``, ``standardize`` (per-modality
    standardisation fitted on train, see `mcr_jax.data.pipeline.standardize`).

    Returns:
      ``({"train", "validation", "test"} -> ArraySplit, DatasetInfo)``; each split holds
      ``"x1" … "xM"`` float32 ``[N, D]``, ``"label"`` int32 ``[N]``, ``"sample_type"`` int8 ``[N]``.
    """
    cfg = merge_options(DEFAULTS, config, where="synthetic dataset")
    _check(cfg)
    num_modalities = int(cfg["num_modalities"])
    proportions = parse_proportions(cfg["proportions"], num_modalities)
    params = make_parameters(cfg)
    rngs = _rngs(cfg["seed"])
    splits = {
        split: ArraySplit(sample_split(params, proportions, int(cfg[f"num_{split}"]), rngs[split]))
        for split in SPLITS
    }
    names = modality_names(num_modalities)
    extra = {
        "seed": int(cfg["seed"]),
        "proportions": tuple(float(p) for p in proportions),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "sample_type_names": {SHARED: "shared", **{i: f"unique_{n}" for i, n in enumerate(names)}},
        "config": {k: v for k, v in cfg.items()},
    }
    if cfg["standardize"]:
        splits, stats = standardize(splits, modalities=names)
        extra["standardization"] = stats
    info = DatasetInfo(
        name="synthetic",
        modalities=names,
        input_shapes={n: (int(cfg["projected_dim"]),) for n in names},
        num_classes=int(cfg["num_classes"]),
        task="classification",
        extra=extra,
    )
    return splits, info


def sweep_unique_ratio(base_config, ratios: Iterable[float]) -> Iterator[ml_collections.ConfigDict]:
    """Configs that vary the unique-to-1 : shared ratio, unique-to-2 … unique-to-M held fixed.

    With base proportions ``(s, u_1, u_2, …)`` and ``T = s + u_1``, a ratio ``r = u_1 / s`` (``>= 0``;
    ``math.inf`` means no shared examples) gives ``u_1 = T·r / (1 + r)`` and ``s = T / (1 + r)``.
    Everything else, including the seed (hence class means and projections), stays as in the base.

    Yields:
      one ``ConfigDict`` per ratio, with ``proportions`` a tuple ``(s, u_1, u_2, …)``.
    """
    cfg = merge_options(DEFAULTS, base_config, where="synthetic dataset")
    base = parse_proportions(cfg["proportions"], int(cfg["num_modalities"]))
    total = float(base[0] + base[1])
    for r in ratios:
        r = float(r)
        if not r >= 0:
            raise ValueError(f"sweep_unique_ratio: ratios must be >= 0 (or math.inf), got {r}.")
        shared = 0.0 if math.isinf(r) else total / (1.0 + r)
        proportions = (shared, total - shared, *(float(u) for u in base[2:]))
        yield ml_collections.ConfigDict({**cfg, "proportions": proportions})
