"""The CREMA-D input pipeline at its real size: raw files → TFDS builder → training reader, measured.

    python -m benchmarks.pipeline --root /data/cremad_bench               # 7,442 clips (the real count)
    python -m benchmarks.pipeline --root /tmp/cremad_bench --clips 300    # a quick look

1. **Raw files** in CREMA-D's layout and format (docs/datasets_manual.md): ``AudioWAV/<clip>.wav``
   (3 s of 16-bit PCM at 22.05 kHz) and ``VideoFrames/<clip>/00k.jpg`` (3 frames, 1 fps, at the
   release's 480×360), random content (noise: it compresses like nothing, so disk sizes are an
   upper bound). Resumable: each file is written to a temporary name and renamed, existing files
   are kept, so an interrupted write continues where it stopped.
2. **The builder** (:class:`mcr_jax.data.builders.CremaD`, frame size 224, speaker-disjoint
   fold 0) writes the array_record files, with TFDS's progress bar. It is NOT resumable: TFDS
   prepares into a temporary directory and publishes it in one rename, so an interrupted build
   starts again (an already built dataset is reused). Measured: wall time, disk size, and the
   process's peak resident memory (TFDS buffers at most about 1 GiB of examples per split before
   it spills its shuffle buckets to disk, so the split is never held in memory whole).
3. **Read throughput** of the training reader (:func:`mcr_jax.data.tfds_source.split_batches`:
   shuffled, frames augmented, converted to float32; batch ``--batch-size``) with grain worker
   counts ``--workers``, in examples/s after one warm-up batch.
4. **Step throughput**: examples/s that one MCR training step of the full ResNet-18 pair at these
   input shapes consumes on this machine's default device (float32 and bfloat16; batch
   ``--step-batch``), so the table says whether training here would wait for input.

Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import subprocess
import time

import numpy as np

ACTORS = tuple(range(1001, 1092))
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")
EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
LEVELS = ("XX", "LO", "MD", "HI")
RELEASE_CLIPS = 7442
RATE, SECONDS, FRAMES, WIDTH, HEIGHT = 22050, 3.0, 3, 480, 360


def clip_names(count: int) -> list[str]:
    """``count`` clip names in CREMA-D's pattern, every actor present (levels vary last)."""
    combos = itertools.product(LEVELS, SENTENCES, EMOTIONS, ACTORS)
    names = [f"{a}_{s}_{e}_{lv}" for lv, s, e, a in itertools.islice(combos, count)]
    if len(names) < count:
        raise ValueError(f"at most {len(names)} distinct clip names; asked for {count}.")
    return names


def _atomic(path: str, write) -> None:
    tmp = path + ".part"
    write(tmp)
    os.replace(tmp, path)


def write_raw(manual_dir: str, count: int, seed: int = 0) -> float:
    """Writes the raw files of ``count`` clips (keeping those already there); returns seconds."""
    import soundfile
    from PIL import Image

    t0 = time.perf_counter()
    os.makedirs(os.path.join(manual_dir, "AudioWAV"), exist_ok=True)
    names = clip_names(count)
    for i, stem in enumerate(names):
        rng = np.random.default_rng([seed, i])
        wav = os.path.join(manual_dir, "AudioWAV", stem + ".wav")
        if not os.path.exists(wav):
            audio = (0.3 * rng.standard_normal(int(RATE * SECONDS))).clip(-1, 1)
            _atomic(wav, lambda p, a=audio: soundfile.write(p, a, RATE, subtype="PCM_16", format="WAV"))
        frames = os.path.join(manual_dir, "VideoFrames", stem)
        os.makedirs(frames, exist_ok=True)
        for k in range(FRAMES):
            jpg = os.path.join(frames, f"{k + 1:03d}.jpg")
            if not os.path.exists(jpg):
                img = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
                _atomic(jpg, lambda p, im=img: Image.fromarray(im).save(p, format="JPEG", quality=90))
        if (i + 1) % 500 == 0 or i + 1 == count:
            print(f"raw files: {i + 1}/{count} clips ({time.perf_counter() - t0:.0f} s)", flush=True)
    return time.perf_counter() - t0


def disk_mib(path: str) -> float:
    out = subprocess.run(["du", "-sk", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(manual_dir: str, data_dir: str):
    from mcr_jax.data.builders import CremaD
    from mcr_jax.data.tfds_source import load_tfds_dataset

    t0 = time.perf_counter()
    sources, info = load_tfds_dataset(CremaD, data_dir=data_dir, manual_dir=manual_dir,
                                      split_names=("train", "validation", "test"))
    return sources, info, time.perf_counter() - t0


def read_rate(source, info, batch_size: int, workers: int, batches: int) -> float:
    from mcr_jax.data.tfds_source import split_batches

    it = split_batches(source, info, batch_size, train=True, seed=0, epoch=1, worker_count=workers)
    next(it)  # warm-up: workers start, files open
    t0, n = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        n += len(batch["label"])
    rate = n / (time.perf_counter() - t0)
    close = getattr(it, "close", None)
    if close is not None:
        close()
    return rate


def step_rate(batch_size: int, dtype: str, rounds: int) -> float:
    from experiments.step_cost import build_step, model_and_batch, time_side_by_side

    info, model, batch = model_and_batch("cremad", batch_size, dtype=dtype)
    step = build_step({}, info, model, batch, 32)
    seconds = time_side_by_side({"mcr": step}, batch, rounds=rounds, iters=1)["mcr"]
    return batch_size / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="raw files go to <root>/manual, the built dataset to <root>/tfds")
    p.add_argument("--clips", type=int, default=RELEASE_CLIPS)
    p.add_argument("--workers", default="0,1,2", help="grain worker counts to read with")
    p.add_argument("--batch-size", type=int, default=64, help="reader batch size")
    p.add_argument("--batches", type=int, default=10, help="batches timed per worker count")
    p.add_argument("--step-batch", type=int, default=8, help="batch of the timed training step (0: skip)")
    p.add_argument("--step-rounds", type=int, default=3)
    args = p.parse_args(argv)
    manual, data = os.path.join(args.root, "manual"), os.path.join(args.root, "tfds")

    raw_s = write_raw(manual, args.clips)
    raw_mib = disk_mib(manual)
    rss_before = peak_rss_mib()
    sources, info, build_s = build(manual, data)
    rss_build = peak_rss_mib()
    built_mib = disk_mib(data)
    sizes = {s: len(src) for s, src in sources.items()}
    rates = {w: read_rate(sources["train"], info, args.batch_size, w, args.batches)
             for w in (int(x) for x in args.workers.split(","))}
    steps = {}
    if args.step_batch:
        import jax

        for dtype in ("float32", "bfloat16"):
            steps[dtype] = step_rate(args.step_batch, dtype, args.step_rounds)
        device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    else:
        device = "-"

    print(f"\n# CREMA-D pipeline at {args.clips} clips on {platform.machine()}, {os.cpu_count()} CPU cores; "
          f"splits {sizes}")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| raw files (WAV + JPEG), written in this run | {raw_mib:,.0f} MiB, {raw_s:,.0f} s |")
    print(f"| builder: prepare time | {build_s:,.0f} s ({args.clips / max(build_s, 1e-9):.1f} clips/s) |")
    print(f"| builder: array_record size | {built_mib:,.0f} MiB |")
    print(f"| builder: peak resident memory of the process | {rss_build:,.0f} MiB "
          f"(before the build: {rss_before:,.0f} MiB) |")
    for w, r in rates.items():
        print(f"| training reader, {w} grain worker{'s' if w != 1 else ''}, batch {args.batch_size} | "
              f"{r:,.0f} examples/s |")
    for dtype, r in steps.items():
        print(f"| MCR training step, full ResNet-18 pair, {dtype}, batch {args.step_batch}, {device} | "
              f"{r:,.1f} examples/s |")
    if steps:
        best = max(rates.values())
        need = max(steps.values())
        verdict = "input-bound" if best < need else "not input-bound"
        print(f"\nOn this machine training is {verdict}: the reader gives {best:,.0f} examples/s at best, "
              f"the step consumes {need:,.1f}.")


if __name__ == "__main__":
    main()
