"""Training-step time in float32 and in bfloat16 (``model.dtype``), measured side by side in one run.

    python -m benchmarks.precision                          # mlp and cnn, batch 32
    python -m benchmarks.precision --models cremad --batch-size 8 --rounds 3 --iters 1
    python -m benchmarks.precision --gpu                    # insists on a GPU

For each model kind (experiments/step_cost.py: a small MLP pair, a reduced ResNet pair, the full
ResNet-18 pair at CREMA-D's real input shapes) and each method variant (multi-loss, MCR
single-backward), the trainer's own jitted step is compiled once per dtype and the dtypes are
timed interleaved round by round (medians), so machine noise hits them alike. ``bf16 / f32`` < 1
means bf16 is faster. On a CPU without native bf16 arithmetic expect a ratio above 1: XLA then
emulates bf16 through float32 conversions; the gain is a GPU/TPU matter.
"""

from __future__ import annotations

import argparse
import platform

import jax

from experiments.step_cost import KINDS, build_step, model_and_batch, time_side_by_side

VARIANTS = {"multiloss": {"name": "multiloss", "uni_weight": 1.0}, "mcr": {}}
DTYPES = ("float32", "bfloat16")


def rows(kind: str, batch_size: int, num_perms: int, rounds: int, iters: int) -> list[tuple]:
    out = []
    for variant, spec in VARIANTS.items():
        steps = {}
        for dtype in DTYPES:
            info, model, batch = model_and_batch(kind, batch_size, dtype=dtype)
            steps[dtype] = build_step(spec, info, model, batch, num_perms)
        times = time_side_by_side(steps, batch, rounds=rounds, iters=iters)
        out.append((kind, batch_size, variant, times["float32"] * 1e3, times["bfloat16"] * 1e3,
                    times["bfloat16"] / times["float32"],
                    (steps["float32"][2] or 0) / 2**20, (steps["bfloat16"][2] or 0) / 2**20))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn", help=f"comma-separated, from {', '.join(KINDS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-perms", type=int, default=32, help="MCR's S")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="require a GPU backend")
    args = p.parse_args(argv)
    if args.gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu given but JAX's default backend is {jax.default_backend()!r}.")
    dev = jax.devices()[0]
    print(f"# precision on {dev.device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}, "
          f"jax {jax.__version__}; S = {args.num_perms}; medians of {args.rounds} rounds × {args.iters} steps")
    print("| model | batch | variant | f32 step ms | bf16 step ms | bf16 / f32 | f32 compiled MiB "
          "| bf16 compiled MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.models.split(","):
        for row in rows(kind, args.batch_size, args.num_perms, args.rounds, args.iters):
            print("| {} | {} | {} | {:.1f} | {:.1f} | {:.2f} | {:.0f} | {:.0f} |".format(*row), flush=True)


if __name__ == "__main__":
    main()
