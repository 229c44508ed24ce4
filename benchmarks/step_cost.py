"""Step time and compiled memory of the training strategies, measured side by side in one run.

    python -m benchmarks.step_cost                 # MLP and CNN models, this machine's default device
    python -m benchmarks.step_cost --models mlp --batch-sizes 32,256 --num-perms 1,8,32,128
    python -m benchmarks.step_cost --gpu           # insists on a GPU (fails if JAX sees none)

Every variant runs the trainer's own jitted step (mcr_jax.steps.make_train_step) on random
batches. Timing interleaves the variants round by round and reports medians, so machine noise
hits them alike; ratios are to multi-loss measured in the same rounds. Memory is XLA's compiled
estimate for one step (arguments + outputs + temporaries − aliased), not a process RSS.
"""

from __future__ import annotations

import argparse
import platform
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

VARIANTS = {
    "joint": {"name": "joint"},
    "multiloss": {"name": "multiloss", "uni_weight": 1.0},
    "mcr single-backward": {},
    "mcr optax-transform": {"game_form": "optax"},
    "mcr eval-pass": {"permuted_source": "eval_pass"},
}


def model_and_batch(kind: str, batch_size: int, seed: int = 0):
    r = np.random.default_rng(seed)
    if kind == "mlp":
        info = DatasetInfo("bench_mlp", ("x1", "x2"), {"x1": (100,), "x2": (100,)}, 5)
        encoders = {m: {"kind": "mlp", "in_features": 100, "hidden": (128,), "out_dim": 64} for m in info.modalities}
        batch = {m: r.normal(size=(batch_size, 100)).astype(np.float32) for m in info.modalities}
    else:
        info = DatasetInfo("bench_cnn", ("audio", "video"), {"audio": (128, 96), "video": (3, 64, 64, 3)}, 6)
        widths, blocks = (32, 64, 128, 256), (2, 2, 2, 2)
        encoders = {"audio": {"kind": "resnet18", "in_channels": 1, "widths": widths, "blocks": blocks},
                    "video": {"kind": "resnet18", "in_channels": 3, "widths": widths, "blocks": blocks}}
        batch = {"audio": r.normal(size=(batch_size, 128, 96)).astype(np.float32),
                 "video": r.normal(size=(batch_size, 3, 64, 64, 3)).astype(np.float32)}
    batch["label"] = r.integers(0, info.num_classes, size=batch_size).astype(np.int32)
    batch["mask"] = np.ones(batch_size, np.float32)
    model = MultimodalModel(info.modalities, encoders, num_classes=info.num_classes, rngs=nnx.Rngs(seed))
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


def run_table(kind, batch_size, num_perms, variants, rounds, iters):
    info, model, batch = model_and_batch(kind, batch_size)
    steps = {name: build_step(VARIANTS[name], info, model, batch, num_perms) for name in variants}
    times = time_side_by_side(steps, batch, rounds=rounds, iters=iters)
    base = times.get("multiloss")
    rows = []
    for name in variants:
        mem = steps[name][2]
        rows.append((kind, batch_size, num_perms, name, times[name] * 1e3, times[name] / base if base else float("nan"),
                     mem / 2**20 if mem else float("nan")))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--batch-sizes", default="32,256", help="MLP batch sizes (the CNN uses 32).")
    p.add_argument("--num-perms", default="32", help="S values for the main table.")
    p.add_argument("--scaling", action="store_true", help="also: MCR single-backward vs S and vs batch size.")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--gpu", action="store_true", help="require a GPU backend")
    args = p.parse_args(argv)
    if args.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu given but JAX's default backend is {jax.default_backend()!r}.")
    dev = jax.devices()[0]
    print(f"# step_cost on {dev.device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}")
    print("| model | batch | S | variant | step ms | × multi-loss | compiled MiB |")
    print("|---|---|---|---|---|---|---|")
    variants = list(VARIANTS)
    for kind in args.models.split(","):
        sizes = [int(b) for b in args.batch_sizes.split(",")] if kind == "mlp" else [32]
        for b in sizes:
            for s in [int(x) for x in args.num_perms.split(",")]:
                for row in run_table(kind, b, s, variants, args.rounds, args.iters if kind == "mlp" else 3):
                    print("| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.1f} |".format(*row), flush=True)
    if args.scaling:
        print("\n# MCR single-backward vs S and batch size (ratios to multi-loss at the same batch size)")
        print("| model | batch | S | variant | step ms | × multi-loss | compiled MiB |")
        print("|---|---|---|---|---|---|---|")
        for kind in args.models.split(","):
            b0 = 32
            for s in (1, 8, 32, 128):
                for row in run_table(kind, b0, s, ["multiloss", "mcr single-backward"], args.rounds,
                                     args.iters if kind == "mlp" else 3):
                    if row[3] != "multiloss":
                        print("| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.1f} |".format(*row), flush=True)
            if kind == "mlp":
                for b in (16, 64, 256, 1024):
                    for row in run_table(kind, b, 32, ["multiloss", "mcr single-backward"], args.rounds, args.iters):
                        print("| {} | {} | {} | {} | {:.2f} | {:.2f} | {:.1f} |".format(*row), flush=True)


if __name__ == "__main__":
    main()
