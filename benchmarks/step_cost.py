"""Step time and compiled memory of the training strategies, measured side by side in one run.

    python -m benchmarks.step_cost                 # MLP and CNN models, this machine's default device
    python -m benchmarks.step_cost --models mlp --batch-sizes 32,256 --num-perms 1,8,32,128
    python -m benchmarks.step_cost --gpu           # insists on a GPU (fails if JAX sees none)

Every variant runs the trainer's own jitted step (mcr_jax.steps.make_train_step) on random
batches (built and timed by experiments/step_cost.py).
Timing interleaves the variants round by round and reports medians, so machine noise
hits them alike; ratios are to multi-loss measured in the same rounds. Memory is XLA's compiled
estimate for one step (arguments + outputs + temporaries − aliased), not a process RSS.
"""

from __future__ import annotations

import argparse
import platform

import jax

from experiments.step_cost import build_step, model_and_batch, time_side_by_side

VARIANTS = {
    "joint": {"name": "joint"},
    "multiloss": {"name": "multiloss", "uni_weight": 1.0},
    "mcr single-backward": {},
    "mcr optax-transform": {"game_form": "optax"},
    "mcr eval-pass": {"permuted_source": "eval_pass"},
}


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
