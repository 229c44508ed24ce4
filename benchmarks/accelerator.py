"""The accelerator check: one script to run when a GPU or TPU is lent, about 8 minutes, one table.

    python -m benchmarks.accelerator                     # on the device; prints a Markdown table
    python -m benchmarks.accelerator --small             # the same parts at toy sizes (a CPU check)

Parts (each timed on the default JAX device, each a row or rows of the table):

1. the main job (``experiments.compare`` on the synthetic benchmark, every method, 3 seeds), wall
   time of the whole command, persistent compilation cache off;
2. MCR on the synthetic benchmark, 5 seeds as one vectorised program against 1 seed (wall time);
3. the training step, MCR against multi-loss, on the MLP pair and on the full ResNet-18 pair at
   CREMA-D's real input shapes, float32 and bfloat16 (``benchmarks/precision.py``'s rows);
4. the streamed pipeline: ``--clips`` CREMA-D-shaped clips written, built, read with 0 and
   ``--workers`` reader processes (``benchmarks/pipeline.py``);
5. one epoch of MCR on those built files at full model size, streamed, with the input-wait
   fraction the engine records (``metrics.jsonl``).

Commit the printed table to ``benchmarks/RESULTS.md`` with the device named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed_command(args: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0


def main_job(work: str, small: bool) -> list[tuple[str, str]]:
    cfg = "experiments/configs/synthetic.py" + (":smoke" if small else "")
    methods = ["--methods", "unimodal,ensemble,joint,multiloss,mcr"] if small else []
    seconds = _timed_command(["-m", "experiments.compare", f"--config={cfg}", f"--workdir={work}/compare",
                              *methods], env={"MCR_JAX_COMPILATION_CACHE": ""})
    return [("main job (experiments.compare, synthetic, 3 seeds, cache off)", f"{seconds:.0f} s")]


def seeds_5_vs_1(work: str, small: bool) -> list[tuple[str, str]]:
    cfg = "experiments/configs/synthetic.py" + (":smoke" if small else "")
    env = {"MCR_JAX_COMPILATION_CACHE": ""}
    one = _timed_command(["-m", "experiments.main", f"--config={cfg}", f"--workdir={work}/seeds1", "--seeds=0"], env)
    five = _timed_command(["-m", "experiments.main", f"--config={cfg}", f"--workdir={work}/seeds5",
                           "--seeds=0,1,2,3,4"], env)
    return [("MCR synthetic, 1 seed (wall)", f"{one:.1f} s"), ("MCR synthetic, 5 vectorised seeds (wall)",
                                                               f"{five:.1f} s ({five / one:.2f}× one seed)")]


def step_rows(small: bool) -> list[tuple[str, str]]:
    from benchmarks.precision import rows

    out = []
    for kind, batch in (("mlp", 256), ("cnn" if small else "cremad", 4 if small else 32)):
        for r in rows(kind, batch, 32, rounds=3, iters=3 if small else 5):
            out.append((f"step {r[0]} batch {r[1]} {r[2]}: f32 / bf16 ms (bf16 ÷ f32)",
                        f"{r[3]:.1f} / {r[4]:.1f} ({r[5]:.2f})"))
    return out


def pipeline_rows(work: str, clips: int, workers: int, small: bool) -> tuple[list[tuple[str, str]], dict]:
    from benchmarks import pipeline

    manual, data = os.path.join(work, "manual"), os.path.join(work, "tfds")
    write_s = pipeline.write_raw(manual, clips)
    sources, info, build_s = pipeline.build(manual, data)
    out = [(f"pipeline: write {clips} raw clips / build", f"{write_s:.0f} s / {build_s:.0f} s"),
           ("pipeline: array_record size", f"{pipeline.disk_mib(data):,.0f} MiB")]
    for w in sorted({0, workers}):
        rate = pipeline.read_rate(sources["train"], info, 8 if small else 64, w, 3 if small else 10)
        out.append((f"pipeline: reader, {w} worker processes", f"{rate:,.0f} examples/s"))
    return out, {"manual": manual, "data": data}


def epoch_rows(work: str, files: dict, workers: int, small: bool) -> list[tuple[str, str]]:
    from experiments.configs import cremad
    from mcr_jax import train

    cfg = cremad.get_config("smoke" if small else None)
    cfg.data.manual_dir, cfg.data.data_dir = files["manual"], files["data"]
    cfg.data.worker_count = workers
    cfg.train.num_epochs, cfg.train.patience = 1, 0
    cfg.eval.shapley = False
    cfg.data.builder_kwargs = {}  # the dataset just built (the builder's defaults)
    if small:
        cfg.model.widths, cfg.model.blocks = (8, 8, 16, 16), (1, 1, 1, 1)
    t0 = time.perf_counter()
    res = train.train_and_evaluate(cfg, os.path.join(work, "epoch"))
    seconds = time.perf_counter() - t0
    with open(os.path.join(work, "epoch", "metrics.jsonl")) as f:
        rec = json.loads(f.readline())
    return [(f"one streamed MCR epoch, {res['steps']} steps of {cfg.train.batch_size}, {workers} reader workers",
             f"{rec['time_s']:.0f} s training ({seconds:.0f} s with compile and evaluation), "
             f"input wait {100 * rec.get('input_wait_fraction', float('nan')):.0f} %")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="toy sizes: check the script itself on a CPU")
    p.add_argument("--clips", type=int, default=1500, help="CREMA-D-shaped clips for the pipeline parts")
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--skip", default="", help="comma-separated parts to skip: main,seeds,step,pipeline,epoch")
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    import jax

    skip = set(filter(None, args.skip.split(",")))
    work = args.workdir or tempfile.mkdtemp(prefix="mcr_jax_accel_")
    dev = jax.devices()[0]
    rows: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for name, part in (("main", lambda: main_job(work, args.small)), ("seeds", lambda: seeds_5_vs_1(work, args.small)),
                       ("step", lambda: step_rows(args.small))):
        if name not in skip:
            rows += part()
            print(f"[accelerator] {name} done after {time.perf_counter() - t0:.0f} s", flush=True)
    if not {"pipeline", "epoch"} <= skip:
        clips = min(args.clips, 60) if args.small else args.clips
        got, files = pipeline_rows(os.path.join(work, "pipeline"), clips, args.workers, args.small)
        rows += got
        print(f"[accelerator] pipeline done after {time.perf_counter() - t0:.0f} s", flush=True)
        if "epoch" not in skip:
            rows += epoch_rows(os.path.join(work, "pipeline"), files, args.workers, args.small)
    print(f"\n# accelerator check on {dev.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"jax {jax.__version__}, {os.cpu_count()} CPU cores{', --small' if args.small else ''}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    print("| measurement | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
