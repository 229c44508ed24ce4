"""AVE (Audio-Visual Event dataset) as 28-way classification, a manual-download TFDS builder.

Example (stored → as read by :func:`mcr_jax.data.tfds_source.grain_batches`):

* ``audio``: float32 ``[257, 1004]``: the soundtrack at 16 kHz cropped to the event segment
  ``[StartTime, EndTime)`` seconds, tiled/cut to 10 s, clipped to [-1, 1], then
  ``log(scipy.signal.spectrogram(x, 16000, nperseg=512, noverlap=353) + 1e-7)``.
* ``video``: uint8 ``[4, S, S, 3]``: 4 frames evenly spaced among the 1-fps frames inside the
  segment (frame ``i`` of the sorted frame files is second ``i`` of the video), resized to S×S
  → float32 ImageNet-normalised at read time.
* ``label``: int32, the index of the category in the sorted list of categories found in
  ``Annotations.txt`` (:data:`AVE_CATEGORIES` for the full dataset); ``clip_id``: the VideoID.

Splits: the official ``trainSet.txt`` / ``valSet.txt`` / ``testSet.txt`` (about 3,339 / 402 /
402). A segment with ``EndTime <= StartTime`` (one such line is known in ``Annotations.txt``) is
replaced by the whole video and counted in the metadata (``fixed_segments``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.builders.common import ManualBuilder, logger, manual_dir_error, require_paths

# The 28 AVE categories, sorted (label = position). (check) against your Annotations.txt: the
# builder derives the list from that file and only warns when it differs from this one.
AVE_CATEGORIES = (
    "Accordion", "Acoustic guitar", "Baby cry, infant cry", "Banjo", "Bark", "Bus", "Cat",
    "Chainsaw", "Church bell", "Clock", "Female speech, woman speaking",
    "Fixed-wing aircraft, airplane", "Flute", "Frying (food)", "Goat", "Helicopter", "Horse",
    "Male speech, man speaking", "Mandolin", "Motorcycle", "Race car, auto racing",
    "Rodents, rats, mice", "Shofar", "Toilet flush", "Train horn", "Truck", "Ukulele",
    "Violin, fiddle",
)
SPLIT_FILES = {"train": "trainSet.txt", "validation": "valSet.txt", "test": "testSet.txt"}

LAYOUT = """\
<manual_dir>/
  Annotations.txt                 lines Category&VideoID&Quality&StartTime&EndTime (header first)
  trainSet.txt valSet.txt testSet.txt   same line format: the official splits
  audio/<VideoID>.wav             the 10 s soundtrack of AVE/<VideoID>.mp4 (any rate; resampled)
  frames/<VideoID>/*.jpg          1-fps frames of the whole video, sorted names = time order"""


@dataclasses.dataclass(eq=False, kw_only=True)
class AveConfig(tfds.core.BuilderConfig):
    """Options of the AVE builder (see the module docstring)."""

    frame_size: int = 224
    num_frames: int = 4
    sample_rate: int = 16000
    duration_s: float = 10.0
    nperseg: int = 512
    noverlap: int = 353
    frame_selection: str = "uniform"
    skip_incomplete: bool = False


def parse_annotation_file(path: str) -> list[dict[str, Any]]:
    """Reads ``Category&VideoID&Quality&StartTime&EndTime`` lines (a header line is skipped)."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.lower().startswith("category&"):
                continue
            parts = line.split("&")
            if len(parts) != 5:
                raise ValueError(f"{path}:{lineno}: expected Category&VideoID&Quality&StartTime&EndTime, "
                                 f"got {line!r}")
            cat, vid, quality, start, end = (p.strip() for p in parts)
            try:
                start_s, end_s = int(float(start)), int(float(end))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: StartTime/EndTime are not numbers in {line!r}") from None
            rows.append({"category": cat, "video_id": vid.removesuffix(".mp4"), "quality": quality,
                         "start": start_s, "end": end_s})
    return rows


class Ave(ManualBuilder):
    """AVE audio-visual event classification (28 classes), from a manual download.

    4,143 ten-second YouTube videos; one event segment each. See the module docstring of
    mcr_jax.data.builders.ave and docs/datasets_manual.md.
    """

    name = "mcr_ave"
    VERSION = tfds.core.Version(av.VERSION)
    RELEASE_NOTES = av.RELEASE_NOTES
    DATASET = "AVE"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://github.com/YapengTian/AVE-ECCV18"
    BUILDER_CONFIG_CLASS = AveConfig
    BUILDER_CONFIGS = [AveConfig(name="default")]

    @classmethod
    def check_manual_dir(cls, manual_dir, config) -> None:
        required = ["Annotations.txt", *SPLIT_FILES.values(), "audio/", "frames/"]
        require_paths(cls.DATASET, manual_dir, required, LAYOUT)

    def _audio_shape(self) -> tuple[int, int]:
        cfg = self.builder_config
        n = int(round(cfg.sample_rate * cfg.duration_s))
        return cfg.nperseg // 2 + 1, 1 + (n - cfg.nperseg) // (cfg.nperseg - cfg.noverlap)

    def _features(self):
        cfg = self.builder_config
        s = cfg.frame_size
        return tfds.features.FeaturesDict({
            "audio": av.stored_tensor(self._audio_shape(), np.float32),
            "video": av.stored_tensor((cfg.num_frames, s, s, 3), np.uint8),
            "label": tfds.features.Scalar(dtype=np.int32),
            "clip_id": tfds.features.Text(),
        })

    def _make_splits(self, manual_dir):
        cfg = self.builder_config
        categories = sorted({r["category"] for r in parse_annotation_file(
            os.path.join(manual_dir, "Annotations.txt"))})
        if tuple(categories) != AVE_CATEGORIES:
            logger.warning("AVE: Annotations.txt has %d categories, not the documented 28; labels follow "
                           "the sorted categories of the file: %s", len(categories), categories)
        label_of = {c: i for i, c in enumerate(categories)}
        splits, incomplete, fixed = {}, [], 0
        for split, fname in SPLIT_FILES.items():
            items = []
            for i, row in enumerate(parse_annotation_file(os.path.join(manual_dir, fname))):
                if row["category"] not in label_of:
                    raise manual_dir_error(self.DATASET, manual_dir, f"{fname} has category "
                                           f"{row['category']!r}, absent from Annotations.txt.", LAYOUT)
                wav = os.path.join(manual_dir, "audio", row["video_id"] + ".wav")
                frames = av.list_frames(os.path.join(manual_dir, "frames", row["video_id"]))
                missing = ([f"audio/{row['video_id']}.wav"] if not os.path.isfile(wav) else []) + (
                    [f"frames/{row['video_id']}/*.jpg"] if not frames else [])
                if missing:
                    incomplete.append(f"{split}: {' and '.join(missing)}")
                    continue
                if row["end"] <= row["start"]:
                    fixed += 1
                    logger.warning("AVE: %s %s has segment [%d, %d); using the whole video", fname,
                                   row["video_id"], row["start"], row["end"])
                    row = {**row, "start": 0, "end": int(cfg.duration_s)}
                items.append({**row, "key": f"{split}-{i:05d}-{row['video_id']}", "wav": wav,
                              "frames": frames, "label": label_of[row["category"]]})
            splits[split] = items
        if incomplete and not cfg.skip_incomplete:
            raise manual_dir_error(self.DATASET, manual_dir, f"{len(incomplete)} videos lack files, e.g. "
                                   f"{incomplete[:5]}. Add them, or pass skip_incomplete=True to leave these "
                                   "videos out.", LAYOUT)
        ids = {s: {r["video_id"] for r in items} for s, items in splits.items()}
        overlap = (ids["train"] & ids["test"]) | (ids["train"] & ids["validation"])
        if overlap:
            logger.warning("AVE: %d video ids appear in train and in validation/test, e.g. %s",
                           len(overlap), sorted(overlap)[:3])
        meta = {
            "modalities": ["audio", "video"],
            "input_shapes": {"audio": list(self._audio_shape()),
                             "video": [cfg.num_frames, cfg.frame_size, cfg.frame_size, 3]},
            "class_names": categories,
            "num_classes": len(categories),
            "task": "classification",
            "fixed_segments": fixed,
            "skipped_incomplete": incomplete,
        }
        return splits, meta

    def _make_example(self, item):
        cfg = self.builder_config
        rate = cfg.sample_rate
        samples = av.read_wav(item["wav"], rate)
        segment = samples[item["start"] * rate: item["end"] * rate]
        if segment.size == 0:
            segment = samples
        if segment.size == 0:
            logger.warning("AVE: empty audio in %s; example skipped", item["wav"])
            return None
        audio = av.fit_audio(segment, int(round(rate * cfg.duration_s)))
        spec = av.log_spectrogram(audio, rate, nperseg=cfg.nperseg, noverlap=cfg.noverlap)
        frames = item["frames"]
        inside = frames[item["start"]: item["end"]] or frames
        idx = av.pick_indices(len(inside), cfg.num_frames, cfg.frame_selection)
        video = av.load_frames([inside[i] for i in idx], cfg.frame_size)
        return item["key"], {"audio": spec, "video": video, "label": np.int32(item["label"]),
                             "clip_id": item["video_id"]}
