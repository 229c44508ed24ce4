"""Build a registered TFDS dataset from the user's manual download, from the command line.

    python -m mcr_jax.data.build --dataset cremad --data_dir ~/tensorflow_datasets \
        --manual_dir ~/data/CREMA-D [--option fold=0 ...]

It looks the builder up in the dataset registry (:data:`mcr_jax.data.dataset.BUILDERS`), builds it
with :func:`mcr_jax.data.tfds_source.load_tfds_dataset` (never downloading anything) and prints the
built dataset's summary as JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mcr_jax.data.dataset import BUILDERS, get_builder_class
from mcr_jax.data.tfds_source import load_tfds_dataset


def parse_option(text: str) -> tuple[str, Any]:
    """``"fold=1"`` → ("fold", 1); values are read as int, float, true/false, else kept as str."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"options are key=value, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m mcr_jax.data.build --dataset cremad --data_dir D --manual_dir M
    [--option frame_size=112 ...]``: builds the dataset (if needed) and prints its summary."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Build an mcr_jax dataset from a manual download.")
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--data_dir", required=True, help="where the array_record files are written")
    parser.add_argument("--manual_dir", default=None, help="the downloaded files (docs/datasets_manual.md)")
    parser.add_argument("--option", action="append", default=[], help="builder option key=value")
    args = parser.parse_args(argv)
    kwargs = dict(parse_option(o) for o in args.option)
    _, info = load_tfds_dataset(get_builder_class(args.dataset), data_dir=args.data_dir, manual_dir=args.manual_dir,
                                split_names=(), builder_kwargs=kwargs)
    summary = {k: info[k] for k in ("name", "config", "data_dir", "modalities", "input_shapes",
                                     "num_classes", "task", "split_sizes")}
    print(json.dumps(summary, indent=2))
    return info


if __name__ == "__main__":
    main()
