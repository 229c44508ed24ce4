"""CREMA-D (audio-visual emotion recognition, 6 classes) as a manual-download TFDS builder.

Example (stored → as read by :func:`mcr_jax.data.tfds_source.grain_batches`):

* ``audio``: float32 ``[257, 188]``: 3 s at 22.05 kHz (tiled/cut), clipped to [-1, 1], centred
  STFT n_fft 512 hop 353, ``log(|S| + 1e-7)`` (see :mod:`.audio_video`).
* ``video``: uint8 ``[3, S, S, 3]``, the first 3 frames of the 1-fps JPEG frames, resized to S×S
  (``frame_size``, default 224) → float32 ImageNet-normalised at read time.
* ``label``: int32, NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5 (the reference's order).
* ``actor``: int32 actor id (1001–1091); ``clip_id``: the file stem, e.g. ``1001_DFA_ANG_XX``.

Splits (``split_mode``):

* ``"speaker"`` (default): speaker-disjoint. The sorted actor ids are permuted with ``seed`` and
  cut into ``num_folds`` near-equal folds; fold ``fold`` is the test set, fold ``fold + 1``
  (mod ``num_folds``) the validation set, the rest the training set. The actor lists of every
  split are written to the dataset metadata (``metadata.json`` next to the records).
* ``"random"``: the common clip-level split of the field, NOT speaker-disjoint: clips permuted with
  ``seed``; ``test_fraction`` of them (default 0.1 → 744 of 7,442, the usual 6,698 / 744) form the
  test set, then ``val_fraction`` of the rest the validation set (0 → no validation split).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import numpy as np
import soundfile
import tensorflow_datasets as tfds

from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.builders.common import ManualBuilder, logger, manual_dir_error, require_paths

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
EMOTION_TO_LABEL = {e: i for i, e in enumerate(EMOTIONS)}
CLASS_NAMES = ("neutral", "happy", "sad", "fear", "disgust", "anger")
CLIP_RE = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")

LAYOUT = """\
<manual_dir>/
  AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav      e.g. AudioWAV/1001_DFA_ANG_XX.wav
  VideoFrames/<actor>_<sentence>_<emotion>_<level>/*.jpg  1-fps JPEG frames of VideoFlash/<clip>.flv
                                                          (sorted names = time order)"""


@dataclasses.dataclass(eq=False, kw_only=True)
class CremaDConfig(tfds.core.BuilderConfig):
    """Options of the CREMA-D builder (see the module docstring)."""

    frame_size: int = 224
    num_frames: int = 3
    sample_rate: int = 22050
    duration_s: float = 3.0
    n_fft: int = 512
    hop: int = 353
    stft_pad_mode: str = "constant"
    split_mode: str = "speaker"
    num_folds: int = 10
    fold: int = 0
    seed: int = 0
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    skip_incomplete: bool = False


def parse_clip_name(stem: str) -> dict[str, Any] | None:
    """``"1001_DFA_ANG_XX"`` → {actor: 1001, sentence: "DFA", emotion: "ANG", level: "XX",
    label: 5}; None when the name does not follow the CREMA-D pattern or the emotion is unknown."""
    m = CLIP_RE.match(stem)
    if not m or m.group(3) not in EMOTION_TO_LABEL:
        return None
    return {
        "actor": int(m.group(1)),
        "sentence": m.group(2),
        "emotion": m.group(3),
        "level": m.group(4),
        "label": EMOTION_TO_LABEL[m.group(3)],
    }


def speaker_folds(actors: list[int], *, num_folds: int, fold: int, seed: int) -> dict[str, list[int]]:
    """Seeded speaker-disjoint split: {"train", "validation", "test"} → sorted actor ids."""
    actors = sorted(set(actors))
    if num_folds < 3:
        raise ValueError(f"num_folds must be >= 3 (test, validation, train), got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    if len(actors) < num_folds:
        raise ValueError(f"{len(actors)} actors cannot be split into {num_folds} folds")
    perm = np.random.default_rng(seed).permutation(len(actors))
    folds = [sorted(actors[i] for i in chunk) for chunk in np.array_split(perm, num_folds)]
    test, val = folds[fold], folds[(fold + 1) % num_folds]
    train = sorted(a for a in actors if a not in set(test) | set(val))
    return {"train": train, "validation": val, "test": test}


class CremaD(ManualBuilder):
    """CREMA-D audio-visual emotion recognition (6 classes), from a manual download.

    7,442 clips of 91 actors. Build from AudioWAV/*.wav and 1-fps JPEG frames; see the module
    docstring of mcr_jax.data.builders.cremad and docs/datasets_manual.md.
    """

    name = "mcr_cremad"
    VERSION = tfds.core.Version(av.VERSION)
    RELEASE_NOTES = av.RELEASE_NOTES
    DATASET = "CREMA-D"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://github.com/CheyneyComputerScience/CREMA-D"
    BUILDER_CONFIG_CLASS = CremaDConfig
    BUILDER_CONFIGS = [CremaDConfig(name="default")]

    @classmethod
    def check_manual_dir(cls, manual_dir, config) -> None:
        require_paths(cls.DATASET, manual_dir, ["AudioWAV/", "VideoFrames/"], LAYOUT)
        if not any(n.lower().endswith(".wav") for n in os.listdir(os.path.join(manual_dir, "AudioWAV"))):
            raise manual_dir_error(cls.DATASET, manual_dir, "AudioWAV/ holds no .wav file.", LAYOUT)

    def _audio_frames(self) -> int:
        cfg = self.builder_config
        n = int(round(cfg.sample_rate * cfg.duration_s))
        return av.num_stft_frames(n, n_fft=cfg.n_fft, hop=cfg.hop)

    def _features(self):
        cfg = self.builder_config
        s = cfg.frame_size
        return tfds.features.FeaturesDict(
            {
                "audio": av.stored_tensor((cfg.n_fft // 2 + 1, self._audio_frames()), np.float32),
                "video": av.stored_tensor((cfg.num_frames, s, s, 3), np.uint8),
                "label": tfds.features.Scalar(dtype=np.int32),
                "actor": tfds.features.Scalar(dtype=np.int32),
                "clip_id": tfds.features.Text(),
            }
        )

    def _make_splits(self, manual_dir):
        cfg = self.builder_config
        clips, ignored, incomplete = [], [], []
        for fname in sorted(os.listdir(os.path.join(manual_dir, "AudioWAV"))):
            stem, ext = os.path.splitext(fname)
            meta = parse_clip_name(stem) if ext.lower() == ".wav" else None
            if meta is None:
                ignored.append(fname)
                continue
            wav = os.path.join(manual_dir, "AudioWAV", fname)
            frames = av.list_frames(os.path.join(manual_dir, "VideoFrames", stem))
            problem = None
            if not frames:
                problem = f"no JPEG frames in VideoFrames/{stem}/"
            elif soundfile.info(wav).frames == 0:
                problem = f"empty audio AudioWAV/{fname}"
            if problem:
                incomplete.append(problem)
                continue
            clips.append({"stem": stem, "wav": wav, "frames": frames, **meta})
        if ignored:
            logger.warning("CREMA-D: ignored %d files not named <actor>_<sentence>_<emotion>_<level>.wav, "
                           "e.g. %s", len(ignored), ignored[:3])
        if incomplete and not cfg.skip_incomplete:
            raise manual_dir_error(
                self.DATASET, manual_dir,
                f"{len(incomplete)} clips are incomplete, e.g. {incomplete[:5]}. Extract the missing "
                "frames, or pass skip_incomplete=True to leave these clips out.", LAYOUT)
        if incomplete:
            logger.warning("CREMA-D: skipped %d incomplete clips, e.g. %s", len(incomplete), incomplete[:5])
        if not clips:
            raise manual_dir_error(self.DATASET, manual_dir, "no usable clip found.", LAYOUT)

        meta: dict[str, Any] = {
            "modalities": ["audio", "video"],
            "input_shapes": {
                "audio": [cfg.n_fft // 2 + 1, self._audio_frames()],
                "video": [cfg.num_frames, cfg.frame_size, cfg.frame_size, 3],
            },
            "class_names": list(CLASS_NAMES),
            "num_classes": len(CLASS_NAMES),
            "task": "classification",
            "emotion_codes": list(EMOTIONS),
            "skipped_incomplete": incomplete,
            "ignored_files": len(ignored),
        }
        if cfg.split_mode == "speaker":
            actors = speaker_folds([c["actor"] for c in clips], num_folds=cfg.num_folds, fold=cfg.fold,
                                   seed=cfg.seed)
            by_actor = {a: s for s, group in actors.items() for a in group}
            splits = {s: [c for c in clips if by_actor[c["actor"]] == s] for s in actors}
            meta["split_mode"] = "speaker_disjoint"
        elif cfg.split_mode == "random":
            splits = self._random_split(clips)
            meta["split_mode"] = "random_clip_level_NOT_speaker_disjoint"
        else:
            raise ValueError(f"split_mode must be 'speaker' or 'random', got {cfg.split_mode!r}")
        meta["actors"] = {s: sorted({c["actor"] for c in items}) for s, items in splits.items()}
        meta["clips"] = {s: sorted(c["stem"] for c in items) for s, items in splits.items()}
        return splits, meta

    def _random_split(self, clips):
        cfg = self.builder_config
        order = np.random.default_rng(cfg.seed).permutation(len(clips))
        n_test = int(round(cfg.test_fraction * len(clips)))
        rest = [clips[i] for i in order[n_test:]]
        n_val = int(round(cfg.val_fraction * len(rest)))
        splits = {"train": rest[n_val:], "test": [clips[i] for i in order[:n_test]]}
        if n_val:
            splits["validation"] = rest[:n_val]
        return splits

    def _make_example(self, item):
        cfg = self.builder_config
        length = int(round(cfg.sample_rate * cfg.duration_s))
        audio = av.fit_audio(av.read_wav(item["wav"], cfg.sample_rate), length)
        spec = av.log_stft(audio, n_fft=cfg.n_fft, hop=cfg.hop, pad_mode=cfg.stft_pad_mode)
        idx = av.pick_indices(len(item["frames"]), cfg.num_frames, "first")
        video = av.load_frames([item["frames"][i] for i in idx], cfg.frame_size)
        return item["stem"], {
            "audio": spec,
            "video": video,
            "label": np.int32(item["label"]),
            "actor": np.int32(item["actor"]),
            "clip_id": item["stem"],
        }
