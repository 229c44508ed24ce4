"""One training step of a method variant, compiled and timed side by side with others in one process.

:func:`build_step` compiles the trainer's own jitted step (:func:`mcr_jax.steps.make_train_step`) for
a method variant on :func:`model_and_batch`'s model and random batch, with XLA's compiled memory
estimate; :func:`time_side_by_side` interleaves the variants round by round and returns medians, so
machine noise hits them alike. Used by ``benchmarks/step_cost.py`` and the perturbation-cost table of
``experiments/reproduce.py``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments.configs.base import method_config
from mcr_jax.data.types import DatasetInfo
from mcr_jax.methods import ModelHandle, get_method
from mcr_jax.models import MultimodalModel
from mcr_jax.optim import make_optimizer
from mcr_jax.state import init_state, split_model
from mcr_jax.steps import make_train_step

#: the model kinds of :func:`model_and_batch`: a small MLP pair, a reduced ResNet pair on small
#: inputs, and the full ResNet-18 pair at CREMA-D's real input shapes (docs/data.md: a 257×188
#: log-STFT and 3 frames of 224×224 RGB; 6 classes)
KINDS = ("mlp", "cnn", "cremad")


def model_and_batch(kind: str, batch_size: int, seed: int = 0, dtype: str = "float32"):
    """``(info, model, batch)`` for a benchmark: ``kind`` one of :data:`KINDS`, the model computing in
    ``dtype`` (``float32`` or ``bfloat16``), a random batch of ``batch_size`` on the device."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {KINDS}.")
    r = np.random.default_rng(seed)
    if kind == "mlp":
        info = DatasetInfo("bench_mlp", ("x1", "x2"), {"x1": (100,), "x2": (100,)}, 5)
        encoders = {m: {"kind": "mlp", "in_features": 100, "hidden": (128,), "out_dim": 64} for m in info.modalities}
        batch = {m: r.normal(size=(batch_size, 100)).astype(np.float32) for m in info.modalities}
    else:
        audio, frame, widths = ((128, 96), 64, (32, 64, 128, 256)) if kind == "cnn" else ((257, 188), 224,
                                                                                          (64, 128, 256, 512))
        info = DatasetInfo(f"bench_{kind}", ("audio", "video"), {"audio": audio, "video": (3, frame, frame, 3)}, 6)
        blocks = (2, 2, 2, 2)
        encoders = {"audio": {"kind": "resnet18", "in_channels": 1, "widths": widths, "blocks": blocks},
                    "video": {"kind": "resnet18", "in_channels": 3, "widths": widths, "blocks": blocks}}
        batch = {"audio": r.normal(size=(batch_size, *audio)).astype(np.float32),
                 "video": r.normal(size=(batch_size, 3, frame, frame, 3)).astype(np.float32)}
    batch["label"] = r.integers(0, info.num_classes, size=batch_size).astype(np.int32)
    batch["mask"] = np.ones(batch_size, np.float32)
    model = MultimodalModel(info.modalities, encoders, num_classes=info.num_classes, dtype=dtype, rngs=nnx.Rngs(seed))
    return info, model, {k: jnp.asarray(v) for k, v in batch.items()}


def build_step(variant: dict, info, model, batch, num_perms: int):
    if variant.get("name") in ("joint", "multiloss"):
        mcfg = ml_collections.ConfigDict(variant)
    else:
        mcfg = method_config("mcr")
        mcfg.num_permutations = num_perms
        for k, v in variant.items():
            mcfg[k] = v
    method = get_method(mcfg, info)
    gd, gd_eval, params, rest = split_model(model)
    # own copies: the step donates its state, and the variants start from the same weights
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    optim = ml_collections.ConfigDict(dict(name="adam_l2", learning_rate=1e-4, weight_decay=1e-4, eps=1e-7))
    tx = method.make_optimizer(make_optimizer(optim, 1000), params)
    state = init_state(params, rest, tx, method, seed=0)._replace(epoch=jnp.ones((), jnp.int32))  # epoch 1
    names = sorted(jax.eval_shape(
        lambda p, r, b, k, ms: method.gradients(ModelHandle(gd, gd_eval, r), p, b, k, ms).metrics,
        params, rest, batch, state.key, state.method_state)) + ["grad_norm"]
    step = jax.jit(make_train_step(method, tx, gd, gd_eval, names), donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    nbytes = None
    if mem is not None:
        nbytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                  - mem.alias_size_in_bytes)
    return step, state, nbytes


def time_side_by_side(steps: dict, batch, *, rounds: int, iters: int) -> dict[str, float]:
    states = {k: v[1] for k, v in steps.items()}
    for k, (fn, _, _) in steps.items():  # warm-up
        for _ in range(2):
            states[k], m = fn(states[k], batch)
        jax.block_until_ready(m)
    samples = {k: [] for k in steps}
    for _ in range(rounds):
        for k, (fn, _, _) in steps.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                states[k], m = fn(states[k], batch)
            jax.block_until_ready(states[k])
            samples[k].append((time.perf_counter() - t0) / iters)
    return {k: float(np.median(v)) for k, v in samples.items()}
