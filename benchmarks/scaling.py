"""Throughput of the sharded training step against the number of devices.

    python -m benchmarks.scaling                     # 1, 2, 4, 8 fake CPU devices (a sanity check)
    python -m benchmarks.scaling --real --devices 1,2,4,8   # the machine's real accelerators

Global batch fixed (strong scaling), MCR single-backward on the synthetic benchmark's MLP model,
the trainer's own jitted step (mcr_jax.programs.Programs). Fake CPU devices share this machine's cores,
so they check that the sharded step runs and what the partitioning costs, not speed-up; real
GPUs/TPUs measure scaling. Times are medians over interleaved rounds.
"""

import argparse
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--method", default="mcr")
    p.add_argument("--real", action="store_true", help="use the real devices instead of fake CPU devices")
    args = p.parse_args(argv)
    counts = [int(d) for d in args.devices.split(",")]
    if not args.real:
        if "jax" in sys.modules:
            raise SystemExit("run this as a script: fake devices must be set before JAX starts")
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(counts)}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from experiments.configs import synthetic
    from mcr_jax import parallel
    from mcr_jax.programs import Programs

    cfg = synthetic.get_config()
    cfg.train.batch_size = args.batch_size
    cfg.eval.batch_size = args.batch_size
    if args.method != "mcr":
        cfg.method = {"name": args.method}
    runs, states, batches = {}, {}, {}
    for n in counts:
        run = Programs.single(cfg, mesh=parallel.make_mesh(n))
        runs[n], states[n] = run, run.states
        batches[n] = next(run.run_batches(1, None))
        for _ in range(3):
            states[n], m = run.train_step(states[n], batches[n])
        jax.block_until_ready(m)
    samples = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                states[n], m = runs[n].train_step(states[n], batches[n])
            jax.block_until_ready(states[n])
            samples[n].append((time.perf_counter() - t0) / args.iters)
    dev = jax.devices()[0]
    print(f"# scaling on {dev.device_kind} ({jax.default_backend()}{'' if args.real else ', fake CPU devices'}), "
          f"method {args.method}, global batch {args.batch_size}, jax {jax.__version__}")
    print("| devices | step ms | examples/s | × 1 device |")
    print("|---|---|---|---|")
    base = float(np.median(samples[counts[0]]))
    for n in counts:
        t = float(np.median(samples[n]))
        print(f"| {n} | {t * 1e3:.2f} | {args.batch_size / t:.0f} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
