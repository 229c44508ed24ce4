"""UCF101 (action recognition) as a manual-download TFDS builder, audio-visual or RGB + flow.

Variants (``modality_pair``):

* ``"audio_visual"`` (default, the paper's): ``video`` uint8 ``[4, S, S, 3]`` and ``audio``
  float32 ``[257, 136]`` (the first 3 s at 16 kHz, tiled if shorter, clipped to [-1, 1], centred
  STFT n_fft 512 hop 353, ``log(|S| + 1e-7)``). Only classes whose clips have a soundtrack are
  kept: a class is kept when at least ``audio_class_min_fraction`` (default 0.5) of its listed
  clips have ``audio/<clip>.wav``; kept clips without audio are dropped and counted. The
  documented count is 51 classes (check); labels are re-numbered 0..K-1 in ``classInd.txt`` order.
* ``"rgb_flow"``: ``video`` as above and ``flow`` uint8 ``[4, S, S, 2]`` (horizontal u, vertical
  v; 128 ≈ no motion → float32 ``(x - 127.5) / 127.5`` at read time). All 101 classes.

Frames: 4 frames evenly spaced over the clip's frames (``frame_selection="uniform"``; "first"
takes the first 4), resized to S×S; flow frames are chosen the same way among the flow images.

Splits: ``test`` = ``testlist0{split_index}.txt``. ``train`` / ``validation`` are carved from
``trainlist0{split_index}.txt`` by group id: the group ids (gXX) of the training list are permuted
with ``seed`` and the first ``round(val_fraction * #groups)`` (at least 1) go to validation, for
every class. A group is therefore never split across train and validation; the group lists are
written to the metadata.
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

GROUP_RE = re.compile(r"_g(\d+)_c(\d+)$")

LAYOUT = """\
<manual_dir>/
  ucfTrainTestlist/classInd.txt               "1 ApplyEyeMakeup" ...
  ucfTrainTestlist/trainlist0{K}.txt          "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
  ucfTrainTestlist/testlist0{K}.txt           "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
  frames/<clip>/*.jpg                         1-fps RGB frames of UCF-101/<Class>/<clip>.avi
  audio/<clip>.wav                            (audio_visual) the soundtrack, for clips that have one
  flow/u/<clip>/*.jpg  flow/v/<clip>/*.jpg    (rgb_flow) optical-flow components as grayscale JPEGs
  where <clip> is the file stem, e.g. v_ApplyEyeMakeup_g08_c01"""


@dataclasses.dataclass(eq=False, kw_only=True)
class Ucf101Config(tfds.core.BuilderConfig):
    """Options of the UCF101 builder (see the module docstring)."""

    modality_pair: str = "audio_visual"
    split_index: int = 1
    frame_size: int = 224
    num_frames: int = 4
    frame_selection: str = "uniform"
    sample_rate: int = 16000
    duration_s: float = 3.0
    n_fft: int = 512
    hop: int = 353
    stft_pad_mode: str = "constant"
    audio_class_min_fraction: float = 0.5
    val_fraction: float = 0.1
    seed: int = 0
    skip_incomplete: bool = False


def read_class_index(path: str) -> list[str]:
    """``classInd.txt`` → class names ordered by their 1-based index."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                idx, name = line.split()
                pairs.append((int(idx), name))
    return [name for _, name in sorted(pairs)]


def read_split_list(path: str, classes: list[str]) -> list[dict[str, Any]]:
    """Reads a train/test list; the class comes from the directory part (case-insensitive)."""
    by_lower = {c.lower(): i for i, c in enumerate(classes)}
    clips = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rel = line.split()[0].replace("\\", "/")
            class_dir, _, fname = rel.rpartition("/")
            stem = os.path.splitext(fname)[0]
            m = GROUP_RE.search(stem)
            if class_dir.lower() not in by_lower or not m:
                raise ValueError(f"{path}:{lineno}: expected <Class>/v_<Class>_gXX_cYY.avi with a class of "
                                 f"classInd.txt, got {line.strip()!r}")
            clips.append({"stem": stem, "class_index": by_lower[class_dir.lower()], "group": int(m.group(1))})
    return clips


def group_split(groups: list[int], *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train groups, validation groups) from the distinct group ids."""
    ids = sorted(set(groups))
    if len(ids) < 2:
        raise ValueError(f"need at least 2 groups to carve a validation set, got {ids}")
    n_val = min(len(ids) - 1, max(1, int(round(val_fraction * len(ids)))))
    perm = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in perm[:n_val])
    return sorted(set(ids) - set(val)), val


class Ucf101(ManualBuilder):
    """UCF101 action recognition (audio-visual 51-class subset, or RGB + optical flow).

    13,320 clips of 101 actions. See the module docstring of mcr_jax.data.builders.ucf101 and
    docs/datasets_manual.md.
    """

    name = "mcr_ucf101"
    VERSION = tfds.core.Version(av.VERSION)
    RELEASE_NOTES = av.RELEASE_NOTES
    DATASET = "UCF101"
    LAYOUT = LAYOUT
    HOMEPAGE = "https://www.crcv.ucf.edu/data/UCF101.php"
    BUILDER_CONFIG_CLASS = Ucf101Config
    BUILDER_CONFIGS = [Ucf101Config(name="default")]

    @classmethod
    def check_manual_dir(cls, manual_dir, config) -> None:
        k = config.split_index
        req = ["ucfTrainTestlist/classInd.txt", f"ucfTrainTestlist/trainlist0{k}.txt",
               f"ucfTrainTestlist/testlist0{k}.txt", "frames/"]
        if config.modality_pair == "audio_visual":
            req.append("audio/")
        elif config.modality_pair == "rgb_flow":
            req += ["flow/u/", "flow/v/"]
        else:
            raise ValueError(
                f"modality_pair must be 'audio_visual' or 'rgb_flow', got {config.modality_pair!r}")
        require_paths(cls.DATASET, manual_dir, req, LAYOUT)

    def _second(self) -> str:
        return "audio" if self.builder_config.modality_pair == "audio_visual" else "flow"

    def _shapes(self) -> dict[str, list[int]]:
        cfg = self.builder_config
        t, s = cfg.num_frames, cfg.frame_size
        if self._second() == "audio":
            n = int(round(cfg.sample_rate * cfg.duration_s))
            return {"audio": [cfg.n_fft // 2 + 1, av.num_stft_frames(n, n_fft=cfg.n_fft, hop=cfg.hop)],
                    "video": [t, s, s, 3]}
        return {"video": [t, s, s, 3], "flow": [t, s, s, 2]}

    def _features(self):
        shapes = self._shapes()
        feats = {m: av.stored_tensor(shape, np.float32 if m == "audio" else np.uint8) for m, shape in shapes.items()}
        feats.update({"label": tfds.features.Scalar(dtype=np.int32),
                      "group": tfds.features.Scalar(dtype=np.int32), "clip_id": tfds.features.Text()})
        return tfds.features.FeaturesDict(feats)

    def _make_splits(self, manual_dir):
        cfg = self.builder_config
        lists = os.path.join(manual_dir, "ucfTrainTestlist")
        classes = read_class_index(os.path.join(lists, "classInd.txt"))
        train = read_split_list(os.path.join(lists, f"trainlist0{cfg.split_index}.txt"), classes)
        test = read_split_list(os.path.join(lists, f"testlist0{cfg.split_index}.txt"), classes)
        meta: dict[str, Any] = {}
        keep = list(range(len(classes)))
        if self._second() == "audio":
            has_audio = {c["stem"]: self._has_audio(manual_dir, c["stem"]) for c in train + test}
            keep = []
            for ci in range(len(classes)):
                flags = [has_audio[c["stem"]] for c in train + test if c["class_index"] == ci]
                if flags and np.mean(flags) >= cfg.audio_class_min_fraction:
                    keep.append(ci)
            kept = set(keep)
            dropped = [c["stem"] for c in train + test
                       if c["class_index"] in kept and not has_audio[c["stem"]]]
            train = [c for c in train if c["class_index"] in kept and has_audio[c["stem"]]]
            test = [c for c in test if c["class_index"] in kept and has_audio[c["stem"]]]
            meta["clips_without_audio_dropped"] = dropped
            if len(classes) == 101 and len(keep) != 51:
                logger.warning("UCF101: %d classes have audio, not the documented 51", len(keep))
        new_label = {ci: i for i, ci in enumerate(keep)}
        train_groups, val_groups = group_split([c["group"] for c in train], val_fraction=cfg.val_fraction,
                                               seed=cfg.seed)
        splits = {"train": [c for c in train if c["group"] in set(train_groups)],
                  "validation": [c for c in train if c["group"] in set(val_groups)], "test": test}
        incomplete = []
        for name, items in splits.items():
            kept = []
            for c in items:
                paths = self._paths(manual_dir, c["stem"])
                if all(paths.values()):
                    kept.append({**c, **paths, "label": new_label[c["class_index"]]})
                else:
                    incomplete.append(f"{name}: {c['stem']} lacks {[k for k, v in paths.items() if not v]}")
            splits[name] = kept
        if incomplete and not cfg.skip_incomplete:
            raise manual_dir_error(self.DATASET, manual_dir, f"{len(incomplete)} clips lack frames, e.g. "
                                   f"{incomplete[:5]}. Add them, or pass skip_incomplete=True.", LAYOUT)
        meta.update({
            "modalities": list(self._shapes()),
            "input_shapes": self._shapes(),
            "class_names": [classes[ci] for ci in keep],
            "num_classes": len(keep),
            "task": "classification",
            "groups": {"train": train_groups, "validation": val_groups,
                       "test": sorted({c["group"] for c in test})},
            "skipped_incomplete": incomplete,
        })
        return splits, meta

    @staticmethod
    def _has_audio(manual_dir: str, stem: str) -> bool:
        path = os.path.join(manual_dir, "audio", stem + ".wav")
        return os.path.isfile(path) and soundfile.info(path).frames > 0

    def _paths(self, manual_dir: str, stem: str) -> dict[str, Any]:
        paths = {"frames": av.list_frames(os.path.join(manual_dir, "frames", stem))}
        if self._second() == "audio":
            paths["wav"] = os.path.join(manual_dir, "audio", stem + ".wav")
        else:
            paths["flow_u"] = av.list_frames(os.path.join(manual_dir, "flow", "u", stem))
            paths["flow_v"] = av.list_frames(os.path.join(manual_dir, "flow", "v", stem))
        return paths

    def _make_example(self, item):
        cfg = self.builder_config
        idx = av.pick_indices(len(item["frames"]), cfg.num_frames, cfg.frame_selection)
        example = {"video": av.load_frames([item["frames"][i] for i in idx], cfg.frame_size),
                   "label": np.int32(item["label"]), "group": np.int32(item["group"]),
                   "clip_id": item["stem"]}
        if self._second() == "audio":
            n = int(round(cfg.sample_rate * cfg.duration_s))
            audio = av.fit_audio(av.read_wav(item["wav"], cfg.sample_rate)[:n], n)
            example["audio"] = av.log_stft(audio, n_fft=cfg.n_fft, hop=cfg.hop, pad_mode=cfg.stft_pad_mode)
        else:
            n_flow = min(len(item["flow_u"]), len(item["flow_v"]))
            fidx = av.pick_indices(n_flow, cfg.num_frames, cfg.frame_selection)
            u = av.load_frames([item["flow_u"][i] for i in fidx], cfg.frame_size, mode="L")
            v = av.load_frames([item["flow_v"][i] for i in fidx], cfg.frame_size, mode="L")
            example["flow"] = np.concatenate([u, v], axis=-1)
        return item["stem"], example
