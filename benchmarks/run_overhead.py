"""What a whole run costs beyond its compile and its compiled steps, measured side by side in one run.

    python -m benchmarks.run_overhead                  # everything (5–8 minutes on 2 CPU cores)
    python -m benchmarks.run_overhead --skip-main-job  # all but item 2
    python -m benchmarks.run_overhead --streamed-only  # items 5 and 6 (streamed TFDS data) only
    python -m benchmarks.run_overhead --epochs 10 --repeats 3

1. One run (synthetic config, MCR, ``--epochs`` epochs, default the config's 40): the wall time of
   ``train.train_and_evaluate`` ÷ (compile time + steps × step time). Compile time: lowering and
   compiling the three functions a run compiles (the epoch, the validation and the test
   evaluation) of a fresh :class:`~mcr_jax.programs.Programs`; step time: the compiled epoch
   alone, median over ``--reps`` calls, per step; steps: those the run took. The run's own wall
   time is split by the engine's pieces (timers wrapped around them for this measurement only).
2. The main job: ``study.run_comparison`` on the synthetic config, every default method, seeds
   0, 1, 2, in a fresh Python process (so nothing compiled or imported by the other items helps
   it); both the in-process time of ``run_comparison`` and the process's wall time, and the time
   per method.
3. Five vectorised seeds ÷ one: ``seeds.train_seeds`` with seeds 0..4 against seed 0 alone (fresh
   workdirs, checkpointing off), interleaved ``--repeats`` times, medians; and the compiled epoch
   alone, the K = 5 program ÷ the K = 1 program, interleaved rounds, medians.
4. A K = 8 grid of λ_M values (traced inputs, one seed) as one program (``seeds.train_grid``)
   against one value (a single run), whole runs, interleaved ``--repeats`` times, medians.
5. Streamed data (the paper's path): CREMA-D through its TFDS builder and grain, on fixture files
   in the real layout that this benchmark writes (18 clips, 16×16 frames; the tests' files), the
   config's ResNet-18 smoke model, batch 2 (3 steps per epoch), ``--streamed-epochs`` (4)
   epochs, checkpointing off: ``seeds.train_seeds`` with seeds
   0..4 as one program against the same five seeds as five separate ``train.train_and_evaluate``
   runs (each compiles its own program), whole runs, interleaved ``--repeats`` times, medians.
6. Device prefetch on that streamed path: the K = 5 ``train_seeds`` run with ``train.prefetch``
   2 (the default) against 0 (batches made inline), interleaved, medians; with the input wait
   fraction each writes into ``metrics.jsonl`` (the share of the epoch spent waiting for a batch).

Items 1 and 3–6 measure fresh runs: program sharing (:mod:`mcr_jax.shared_jit`) is off for them,
so a repeated run compiles its programs as a first one does; the main job (item 2) runs with the
default, sharing on.

A smoke-config run first warms the process (imports, backend start), so item 1 is not charged for
them; everything else is measured in this process after it, item 2 in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

import jax
import numpy as np
from absl import logging

from experiments.configs import cremad, synthetic
from mcr_jax import checkpoint, engine, guards, seeds, shared_jit, train
from mcr_jax.programs import Programs, RunSpec

LAMBDA_GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def quiet():
    """The trainer's progress lines go to a buffer, not the table."""
    return contextlib.redirect_stdout(io.StringIO())


def config(epochs: int | None = None, *, smoke: bool = False):
    cfg = synthetic.get_config("smoke" if smoke else None)
    if epochs:
        cfg.train.num_epochs = int(epochs)
    return cfg


# ----------------------------------------------------------------------------------------------
# 1. One run: wall time against compile + steps × step time.


class Breakdown:
    """Top-level wall time of wrapped functions (a wrapped call inside another counts to the outer
    one); the first call of each gets its own row, since it compiles."""

    PIECES = [
        (train, "finished", "look for a finished run"),
        (guards, "check_writable", "check the workdir"),
        (Programs, "__init__", "programs (data, model, optimizer, placement)"),
        (engine._Store, "restore", "checkpoint restore"),
        (Programs, "train_epoch", "training epochs"),
        (Programs, "evaluate", "evaluations (validation each epoch; validation + test at the end)"),
        (engine, "host_copy", "model selection (host copy of the best weights)"),
        (engine, "write_history", "metrics.jsonl writes"),
        (checkpoint.Checkpointer, "save", "checkpoint saves"),
        (checkpoint.Checkpointer, "close", "checkpointer close"),
        (engine, "_finish", "finish (test evaluation, predictions, results.json)"),
    ]

    def __init__(self):
        self.times, self.calls, self.first = defaultdict(float), Counter(), {}
        self.depth = 0

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.depth -= 1
                if self.calls[label] == 0:
                    self.first[label] = dt
                self.calls[label] += 1
                self.times[label] += dt

        return timed

    @contextlib.contextmanager
    def installed(self):
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in self.PIECES]
        try:
            for owner, name, label in self.PIECES:
                setattr(owner, name, self.wrap(getattr(owner, name), label))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


def time_compile(progs: Programs):
    """Seconds to lower (trace) and compile each function a device-resident run compiles
    (``Programs.precompile``: the epoch, and one evaluation program for validation and test); the
    compiled epoch is returned for timing."""
    out = {("eval (validation and test)" if k == "eval_validation" else k.replace("_", " ")): v
           for k, v in progs.precompile().items()}
    return out, progs._epoch_fn.compile(progs.states, progs.device_arrays["train"], progs.epoch_rows(1))


def time_epoch(compiled, progs: Programs, reps: int) -> tuple[float, float]:
    """Median seconds of one compiled epoch call (the state threaded through, as in training) and
    of one validation evaluation call."""
    state, rows, arrays = progs.states, progs.epoch_rows(1), progs.device_arrays["train"]
    state, m = compiled(state, arrays, rows)  # warm-up
    jax.block_until_ready(m)
    epoch_s = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, m = compiled(state, arrays, rows)
        jax.block_until_ready((state.params, m))
        epoch_s.append(time.perf_counter() - t0)
    arrays, chunks, _ = progs._eval_splits["validation"]
    args = (state.params, state.rest, arrays, state.hparams, *chunks[0])
    val = progs._eval_fn.compile(*args)
    jax.block_until_ready(val(*args))
    eval_s = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(val(*args))
        eval_s.append(time.perf_counter() - t0)
    return float(np.median(epoch_s)), float(np.median(eval_s))


def one_run(epochs: int, reps: int) -> dict:
    cfg = config(epochs)
    bd = Breakdown()
    with tempfile.TemporaryDirectory() as wd, quiet(), bd.installed():
        t0 = time.perf_counter()
        res = train.train_and_evaluate(cfg, wd)
        wall = time.perf_counter() - t0
    with quiet():
        t0 = time.perf_counter()
        progs = Programs.single(config(epochs))
        setup_s = time.perf_counter() - t0
        compile_s, compiled = time_compile(progs)
        epoch_s, eval_s = time_epoch(compiled, progs, reps)
    return dict(wall=wall, steps=int(res["steps"]), epochs_run=int(res["epochs_run"]), setup=setup_s,
                compile=compile_s, epoch=epoch_s, step=epoch_s / progs.steps_per_epoch,
                steps_per_epoch=progs.steps_per_epoch, eval=eval_s, breakdown=bd)


# ----------------------------------------------------------------------------------------------
# 2. The main job, in its own process.


def main_job_child(out_path: str) -> None:
    """Runs ``study.run_comparison`` on the synthetic config (all default methods, seeds 0, 1, 2)
    and writes its time and the time of each method to ``out_path``."""
    logging.set_verbosity(logging.WARNING)
    from mcr_jax import report, study

    per_method = defaultdict(float)

    def timed(fn, label_of):
        def wrapped(cfg, workdir, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(cfg, workdir, *args, **kwargs)
            finally:
                per_method[label_of(workdir)] += time.perf_counter() - t0
        return wrapped

    import threading

    from jax import monitoring

    compile_s = {"all": 0.0, "background": 0.0, "count": 0}

    def on_event(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_s["all"] += seconds
            compile_s["count"] += 1
            if threading.current_thread().name == "mcr_jax-prepare":
                compile_s["background"] += seconds

    monitoring.register_event_duration_secs_listener(on_event)
    seeds.train_seeds = timed(seeds.train_seeds, os.path.basename)
    report.train_and_evaluate = timed(report.train_and_evaluate, os.path.basename)
    with tempfile.TemporaryDirectory() as wd, quiet():
        t0 = time.perf_counter()
        study.run_comparison(synthetic.get_config(), wd, report.DEFAULT_METHODS, (0, 1, 2))
        total = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump({"run_comparison": total, "per_method": per_method, "compile": compile_s}, f)


def main_job() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "main_job.json")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run_overhead", "--main-job-child", out],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the main job failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            res = json.load(f)
    return dict(res, process=wall)


# ----------------------------------------------------------------------------------------------
# 3. Vectorised seeds: 5 against 1.


def time_train_seeds(epochs: int, k: int) -> float:
    cfg = config(epochs)
    cfg.train.checkpoint = False
    with tempfile.TemporaryDirectory() as wd, quiet():
        t0 = time.perf_counter()
        seeds.train_seeds(cfg, wd, list(range(k)))
        return time.perf_counter() - t0


def time_lambda_grid(epochs: int, k: int) -> float:
    """Wall seconds of ``seeds.train_grid`` over the first ``k`` λ_M values (seed 0)."""
    cfg = config(epochs)
    cfg.train.checkpoint = False
    with tempfile.TemporaryDirectory() as wd, quiet():
        t0 = time.perf_counter()
        seeds.train_grid(cfg, wd, [0], [{"mipd_weight": v} for v in LAMBDA_GRID[:k]])
        return time.perf_counter() - t0


def time_epoch_programs(epochs: int, ks, rounds: int, iters: int) -> dict:
    """Median seconds per call of the compiled epoch of the program of seeds ``0..k-1`` for each
    ``k`` in ``ks`` (as ``seeds.train_seeds`` builds it), timed in interleaved rounds."""
    cfg = config(epochs)
    with quiet():
        data = Programs.single(cfg).data
        progs = {k: Programs([RunSpec(s, {}, seeds._seed_config(cfg, s), "") for s in range(k)], data=data)
                 for k in ks}
    run = {}
    for k, pr in progs.items():
        rows, arrays = pr.epoch_rows(1), pr.device_arrays["train"]
        state, m = pr._epoch_fn(pr.states, arrays, rows)  # warm-up (compiles)
        jax.block_until_ready(m)
        run[k] = [pr._epoch_fn, state, arrays, rows]
    samples = {k: [] for k in progs}
    for _ in range(rounds):
        for k, r in run.items():
            fn, state, arrays, rows = r
            t0 = time.perf_counter()
            for _ in range(iters):
                state, m = fn(state, arrays, rows)
            jax.block_until_ready((state.params, m))
            samples[k].append((time.perf_counter() - t0) / iters)
            r[1] = state
    return {k: float(np.median(v)) for k, v in samples.items()}


# ----------------------------------------------------------------------------------------------
# 5./6. Streamed TFDS data (fixture CREMA-D files), K = 5 seeds as one program.


def write_fixture_cremad(root: pathlib.Path) -> None:
    """CREMA-D's files in their real layout (AudioWAV/*.wav, VideoFrames/<clip>/*.jpg), small:
    the builder test's writer."""
    from tests.test_builder_cremad import write_cremad

    write_cremad(root)


STREAMED_BATCH = 2  # 3 steps per epoch on the 6 training clips of the fixture


def streamed_config(files, epochs: int, prefetch: int = 2):
    raw, data_dir = files
    cfg = cremad.get_config("smoke")
    cfg.data.manual_dir = str(raw)
    cfg.data.data_dir = str(data_dir)
    cfg.data.builder_kwargs = {"frame_size": 16, "num_folds": 3, "fold": 0}
    cfg.train.num_epochs = int(epochs)
    cfg.train.batch_size = STREAMED_BATCH
    cfg.parallel.num_devices = 1
    cfg.train.patience = 0
    cfg.train.checkpoint = False
    cfg.train.prefetch = int(prefetch)
    cfg.eval.shapley = False
    return cfg


def wait_fractions(root: str) -> list[float]:
    out = []
    for dirpath, _, files in os.walk(root):
        if "metrics.jsonl" in files:
            with open(os.path.join(dirpath, "metrics.jsonl")) as f:
                out += [json.loads(line)["input_wait_fraction"] for line in f]
    return out


def time_streamed(files, epochs: int, k: int, *, separate: bool, prefetch: int = 2) -> tuple[float, list[float]]:
    """Wall seconds of seeds ``0..k-1`` on the streamed fixture data: one vectorised program
    (``seeds.train_seeds``) or ``k`` separate single runs; and the runs' input wait fractions."""
    cfg = streamed_config(files, epochs, prefetch)
    with tempfile.TemporaryDirectory() as wd, quiet():
        t0 = time.perf_counter()
        if separate:
            for s in range(k):
                one = cfg.copy_and_resolve_references()
                one.seed = s
                train.train_and_evaluate(one, os.path.join(wd, f"seed_{s}"))
        else:
            seeds.train_seeds(cfg, wd, list(range(k)))
        wall = time.perf_counter() - t0
        return wall, wait_fractions(wd)


def streamed_items(epochs: int, k: int, repeats: int):
    """Items 5 and 6: ``({variant: median wall s}, {variant: median input wait fraction}, steps per epoch)``."""
    with tempfile.TemporaryDirectory() as tmp:
        files = (pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "tfds")
        write_fixture_cremad(files[0])
        with quiet():  # builds the TFDS dataset once (array_record), outside the timings
            train.train_and_evaluate(streamed_config(files, 1), os.path.join(tmp, "build"))
        streamed = {"one program": [], "separate": [], "no prefetch": []}
        waits = {"one program": [], "no prefetch": []}
        for _ in range(repeats):
            for label in streamed:
                wall, w = time_streamed(files, epochs, k, separate=label == "separate",
                                        prefetch=0 if label == "no prefetch" else 2)
                streamed[label].append(wall)
                if label in waits:
                    waits[label] += w
        st = {label: float(np.median(v)) for label, v in streamed.items()}
        wt = {label: float(np.median(v)) for label, v in waits.items()}
        with quiet():
            steps = Programs.single(streamed_config(files, epochs)).steps_per_epoch
    return st, wt, steps


def streamed_rows(st: dict, wt: dict, k: int, repeats: int) -> list[str]:
    def met(ok):
        return "yes" if ok else "**no**"

    return [
        f"| 5 | streamed: {k} separate `train_and_evaluate` runs (median of {repeats}) | {st['separate']:.2f} s | | |",
        f"| 5 | streamed: `train_seeds`, {k} seeds as one program (median of {repeats}) "
        f"| {st['one program']:.2f} s | | |",
        f"| 5 | streamed: one program ÷ {k} separate runs | {st['one program'] / st['separate']:.2f}× | < 1× "
        f"| {met(st['one program'] < st['separate'])} |",
        f"| 6 | streamed K = {k}: `train.prefetch` 2 (median of {repeats}; input wait fraction, median "
        f"over epochs {wt['one program']:.2f}) | {st['one program']:.2f} s | | |",
        f"| 6 | streamed K = {k}: `train.prefetch` 0, batches made inline (input wait fraction "
        f"{wt['no prefetch']:.2f}) | {st['no prefetch']:.2f} s | | |",
        f"| 6 | prefetch on ÷ off, whole run | {st['one program'] / st['no prefetch']:.2f}× | ≤ 1× "
        f"| {met(st['one program'] <= st['no prefetch'])} |",
    ]


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=0, help="epochs of items 1, 3 and 4 (0: the config's, 40)")
    p.add_argument("--streamed-epochs", type=int, default=4, help="epochs of the streamed items 5 and 6")
    p.add_argument("--streamed-only", action="store_true", help="items 5 and 6 only")
    p.add_argument("--reps", type=int, default=20, help="compiled-epoch calls timed for the step time")
    p.add_argument("--repeats", type=int, default=2, help="whole runs per variant (interleaved)")
    p.add_argument("--seeds", type=int, default=5, help="the vectorised seed count compared with one seed")
    p.add_argument("--main-job", dest="main_job", action="store_true", default=True,
                   help="run item 2, the main job (1½–2 minutes on 2 cores; the default)")
    p.add_argument("--skip-main-job", dest="main_job", action="store_false")
    p.add_argument("--main-job-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.main_job_child:
        return main_job_child(args.main_job_child)
    logging.set_verbosity(logging.WARNING)
    shared_jit.set_sharing(False)  # items 1, 3-6: fresh runs compile their own programs (docstring)
    epochs = args.epochs or int(synthetic.get_config().train.num_epochs)
    dev = jax.devices()[0]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# run_overhead on {dev.device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
          f"load average at start {load}", flush=True)

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as wd, quiet():  # warm-up: imports, backend, orbax
        train.train_and_evaluate(config(smoke=True), wd)

    if args.streamed_only:
        st, wt, steps = streamed_items(args.streamed_epochs, args.seeds, args.repeats)
        print(f"\nItems 5, 6: CREMA-D fixture files through TFDS + grain, ResNet-18 smoke, "
              f"{args.streamed_epochs} epochs × {steps} steps (batch {STREAMED_BATCH}), {args.seeds} seeds\n")
        print("| item | measurement | value | target | met |")
        print("|---|---|---|---|---|")
        for row in streamed_rows(st, wt, args.seeds, args.repeats):
            print(row)
        print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")
        return None

    r1 = one_run(epochs, args.reps)
    compile_total = sum(r1["compile"].values())
    compute = r1["steps"] * r1["step"]
    ratio1 = r1["wall"] / (compile_total + compute)

    k = args.seeds
    walls = {1: [], k: []}
    for _ in range(args.repeats):
        for kk in (1, k):
            walls[kk].append(time_train_seeds(epochs, kk))
    wall1, wallk = float(np.median(walls[1])), float(np.median(walls[k]))
    per_epoch = time_epoch_programs(epochs, (1, k), rounds=5, iters=5)
    grid = {1: [], len(LAMBDA_GRID): []}
    for _ in range(args.repeats):
        for kk in grid:
            grid[kk].append(time_lambda_grid(epochs, kk))
    grid1, gridk = float(np.median(grid[1])), float(np.median(grid[len(LAMBDA_GRID)]))

    st, wt, steps_streamed = streamed_items(args.streamed_epochs, k, args.repeats)
    se = args.streamed_epochs

    mj = main_job() if args.main_job else None

    def met(ok):
        return "yes" if ok else "**no**"

    print(f"\nsynthetic config, MCR; items 1, 3, 4: {epochs} epochs × {r1['steps_per_epoch']} steps "
          f"(batch 50, 500 training examples). Items 5, 6: CREMA-D fixture files through TFDS + grain, "
          f"ResNet-18 smoke, {se} epochs × {steps_streamed} steps (batch {STREAMED_BATCH}), {k} seeds\n")
    print("| item | measurement | value | target | met |")
    print("|---|---|---|---|---|")
    print(f"| 1 | wall time of `train_and_evaluate` (one run, {r1['epochs_run']} epochs) | {r1['wall']:.2f} s | | |")
    print(f"| 1 | compile (lower + compile: epoch {r1['compile']['epoch']:.2f} s, one evaluation program for "
          f"validation and test {r1['compile']['eval (validation and test)']:.2f} s) | {compile_total:.2f} s | | |")
    print(f"| 1 | steps × step time ({r1['steps']} × {r1['step'] * 1e3:.3f} ms; compiled epoch alone, median of "
          f"{args.reps}) | {compute:.2f} s | | |")
    print(f"| 1 | wall ÷ (compile + steps × step) | {ratio1:.2f}× | ≤ 1.5× | {met(ratio1 <= 1.5)} |")
    if mj:
        print(f"| 2 | main job: `study.run_comparison`, {len(mj['per_method'])} methods × seeds 0, 1, 2 "
              f"(in-process) | {mj['run_comparison']:.1f} s | ≤ 60 s | {met(mj['run_comparison'] <= 60)} |")
        print(f"| 2 | main job: its process (Python start, imports, `run_comparison`) | {mj['process']:.1f} s "
              f"| ≤ 60 s | {met(mj['process'] <= 60)} |")
        c = mj["compile"]
        print(f"| 2 | main job: XLA compile, all threads ({c['count']} programs) | {c['all']:.1f} s | | |")
        print(f"| 2 | main job: of which on the background thread (the next method's programs, compiled while "
              f"the current one trains) | {c['background']:.1f} s | | |")
        print(f"| 2 | main job: compile the main thread waited for (all threads − background) | "
              f"{c['all'] - c['background']:.1f} s | | |")
    else:
        print("| 2 | main job | skipped (--skip-main-job) | ≤ 60 s | |")
    print(f"| 3 | `train_seeds`, seed 0 alone (median of {args.repeats}) | {wall1:.2f} s | | |")
    print(f"| 3 | `train_seeds`, seeds 0..{k - 1} (median of {args.repeats}) | {wallk:.2f} s | | |")
    print(f"| 3 | {k} seeds ÷ 1 seed, whole run | {wallk / wall1:.2f}× | | |")
    print(f"| 3 | compiled epoch, K = {k} program ÷ K = 1 program ({per_epoch[k] * 1e3:.1f} ms ÷ "
          f"{per_epoch[1] * 1e3:.1f} ms) | {per_epoch[k] / per_epoch[1]:.2f}× | | |")
    print(f"| 4 | `train_grid`, one λ_M value (median of {args.repeats}) | {grid1:.2f} s | | |")
    print(f"| 4 | `train_grid`, K = {len(LAMBDA_GRID)} λ_M values as one program (median of {args.repeats}) "
          f"| {gridk:.2f} s | | |")
    print(f"| 4 | K = {len(LAMBDA_GRID)} λ-grid ÷ one value, whole run | {gridk / grid1:.2f}× | | |")
    for row in streamed_rows(st, wt, k, args.repeats):
        print(row)

    bd = r1["breakdown"]
    print(f"\nItem 1, where the run's {r1['wall']:.2f} s went (wall time of the engine's pieces; "
          "first call separate, it compiles):\n")
    print("| piece | calls | first call s | other calls s | share of wall |")
    print("|---|---|---|---|---|")
    accounted = 0.0
    for _, _, label in Breakdown.PIECES:
        if not bd.calls[label]:
            continue
        total = bd.times[label]
        accounted += total
        rest = total - bd.first[label]
        print(f"| {label} | {bd.calls[label]} | {bd.first[label]:.3f} | {rest:.3f} | {total / r1['wall']:.0%} |")
    other = r1["wall"] - accounted
    print(f"| other (logging, method hooks, records) | | | {other:.3f} | {other / r1['wall']:.0%} |")

    def first_minus_later(label):
        n = bd.calls[label]
        return bd.first[label] - (bd.times[label] - bd.first[label]) / (n - 1) if n > 1 else float("nan")

    print(f"\nThe compile seen from the run (first call minus the mean later call): training epoch "
          f"{first_minus_later('training epochs'):.2f} s. Measured apart, after the run: a second `Programs` "
          f"{r1['setup']:.2f} s (its eager initialisation ops already compiled), one compiled epoch "
          f"{r1['epoch'] * 1e3:.1f} ms, one validation evaluation call {r1['eval'] * 1e3:.1f} ms "
          f"(device call only, no host metrics).")

    if mj:
        print("\nItem 2, time per method of the main job (`train_seeds` for the vectorised ones, summed over the "
              "per-seed runs of the others):\n")
        print("| method | s | share |")
        print("|---|---|---|")
        for name, s in sorted(mj["per_method"].items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {s:.1f} | {s / mj['run_comparison']:.0%} |")
    print(f"\n(total benchmark time {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
