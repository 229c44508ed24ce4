"""UCF101 builder on a tiny fixture in the real list format, audio-visual and RGB + flow."""

import os
import socket

import numpy as np
import pytest
import soundfile
from PIL import Image

from mcr_jax.data.builders import Ucf101
from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.builders.common import ManualDirError
from mcr_jax.data.builders.ucf101 import group_split, read_split_list
from mcr_jax.data.tfds_source import load_tfds_dataset, split_batches

SIZE = 16
# Real class names, including the list files' odd spelling v_HandStandPushups of HandstandPushups.
CLASSES = ["ApplyEyeMakeup", "Basketball", "HandstandPushups"]
FILE_CLASS = {"ApplyEyeMakeup": "ApplyEyeMakeup", "Basketball": "Basketball",
              "HandstandPushups": "HandStandPushups"}
TRAIN_GROUPS, TEST_GROUPS = [8, 9, 10, 11], [1, 2]
NO_AUDIO = "Basketball"  # its clips have no soundtrack → dropped from the audio-visual variant


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def stem(cls, g, c=1):
    return f"v_{FILE_CLASS[cls]}_g{g:02d}_c{c:02d}"


def write_images(directory, levels, mode="RGB"):
    os.makedirs(directory, exist_ok=True)
    for k, level in enumerate(levels):
        shape = (10, 14, 3) if mode == "RGB" else (10, 14)
        Image.fromarray(np.full(shape, level, np.uint8)).save(os.path.join(directory, f"frame{k + 1:06d}.jpg"))


def write_ucf(root):
    lists = root / "ucfTrainTestlist"
    os.makedirs(lists)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    train = [f"{c}/{stem(c, g)}.avi {i + 1}" for g in TRAIN_GROUPS for i, c in enumerate(CLASSES)]
    test = [f"{c}/{stem(c, g)}.avi" for g in TEST_GROUPS for c in CLASSES]
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")
    os.makedirs(root / "audio")
    for g in TRAIN_GROUPS + TEST_GROUPS:
        for c in CLASSES:
            s = stem(c, g)
            write_images(root / "frames" / s, [20 + 30 * k for k in range(6)])  # 6 frames, grey 20..170
            write_images(root / "flow" / "u" / s, [128 + 10 * k for k in range(5)], mode="L")
            write_images(root / "flow" / "v" / s, [100] * 5, mode="L")
            if c != NO_AUDIO:
                t = np.arange(8000 * 2) / 8000  # 2 s at 8 kHz: resampled to 16 kHz and tiled to 3 s
                soundfile.write(root / "audio" / f"{s}.wav", 0.2 * np.sin(2 * np.pi * 300 * t), 8000)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf_raw")
    write_ucf(root)
    return root


@pytest.fixture(scope="module")
def audio_visual(raw, tmp_path_factory):
    return load_tfds_dataset(Ucf101, data_dir=tmp_path_factory.mktemp("ucf_tfds"), manual_dir=raw,
                             builder_kwargs={"frame_size": SIZE, "val_fraction": 0.25})


def examples(sources):
    return {s: [src[i] for i in range(len(src))] for s, src in sources.items()}


def test_audio_visual_keeps_the_classes_with_audio(audio_visual):
    sources, info = audio_visual
    assert info["modalities"] == ["audio", "video"]
    assert info["input_shapes"] == {"audio": (257, 136), "video": (4, SIZE, SIZE, 3)}
    assert info["class_names"] == ["ApplyEyeMakeup", "HandstandPushups"] and info["num_classes"] == 2
    assert info["split_sizes"] == {"train": 6, "validation": 2, "test": 4}
    expected_label = {"ApplyEyeMakeup": 0, "HandStandPushups": 1}
    for exs in examples(sources).values():
        for ex in exs:
            assert ex["label"] == expected_label[ex["clip_id"].decode().split("_")[1]]
            assert ex["audio"].shape == (257, 136) and ex["audio"].dtype == np.float32
            assert np.isfinite(ex["audio"]).all()
            assert ex["video"].shape == (4, SIZE, SIZE, 3) and ex["video"].dtype == np.uint8
            # frames 0, 2, 3, 5 of 6 (evenly spaced) → grey 20, 80, 110, 170
            np.testing.assert_allclose(ex["video"].reshape(4, -1).mean(1), [20, 80, 110, 170], atol=3)


def test_validation_is_carved_by_group(audio_visual):
    sources, info = audio_visual
    groups = {s: {int(e["group"]) for e in exs} for s, exs in examples(sources).items()}
    assert not groups["train"] & groups["validation"]
    assert groups["train"] | groups["validation"] == set(TRAIN_GROUPS)
    assert groups["test"] == set(TEST_GROUPS) and len(groups["validation"]) == 1
    recorded = info["metadata"]["groups"]
    assert set(recorded["train"]) == groups["train"] and set(recorded["validation"]) == groups["validation"]
    ids = [e["clip_id"] for exs in examples(sources).values() for e in exs]
    assert len(ids) == len(set(ids))


def test_batches_normalise_frames_and_leave_audio_untouched(audio_visual):
    sources, info = audio_visual
    src = sources["test"]
    stored = lambda b, key: np.stack([src[int(i)][key] for i in b["index"]])
    ev = next(split_batches(src, info, 4, train=False))
    assert ev["video"].shape == (4, 4, SIZE, SIZE, 3) and ev["mask"].tolist() == [1.0] * 4
    np.testing.assert_allclose(ev["video"], av.normalize_frames(stored(ev, "video")))
    tr = next(split_batches(src, info, 4, train=True, seed=0, epoch=0))
    np.testing.assert_array_equal(tr["audio"], stored(tr, "audio"))  # audio is never augmented
    # uniform grey frames: crops and flips keep each frame's level, so the frame order survives
    assert tr["video"].shape == ev["video"].shape and tr["video"].dtype == np.float32
    np.testing.assert_allclose(tr["video"].mean(axis=(2, 3, 4)), ev["video"].mean(axis=(2, 3, 4)), atol=0.05)


def test_rgb_flow_variant(raw, tmp_path):
    sources, info = load_tfds_dataset(Ucf101, data_dir=tmp_path, manual_dir=raw,
                                      builder_kwargs={"frame_size": 8, "modality_pair": "rgb_flow",
                                                      "frame_selection": "first"})
    assert info["modalities"] == ["video", "flow"] and info["num_classes"] == 3
    assert info["input_shapes"] == {"video": (4, 8, 8, 3), "flow": (4, 8, 8, 2)}
    ex = sources["test"][0]
    assert ex["flow"].shape == (4, 8, 8, 2) and ex["flow"].dtype == np.uint8
    np.testing.assert_allclose(ex["flow"][..., 0].reshape(4, -1).mean(1), [128, 138, 148, 158], atol=3)
    np.testing.assert_allclose(ex["video"].reshape(4, -1).mean(1), [20, 50, 80, 110], atol=3)
    b = next(split_batches(sources["test"], info, 2, train=False))
    assert b["flow"].dtype == np.float32 and np.abs(b["flow"]).max() <= 1.0
    np.testing.assert_allclose(b["flow"][0, 0, ..., 1].mean(), (100 - 127.5) / 127.5, atol=0.03)


def test_read_split_list_and_group_split(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("HandstandPushups/v_HandStandPushups_g08_c01.avi 3\n")
    assert read_split_list(str(path), CLASSES) == [
        {"stem": "v_HandStandPushups_g08_c01", "class_index": 2, "group": 8}]
    path.write_text("Nope/v_Nope_g08_c01.avi 3\n")
    with pytest.raises(ValueError, match="l.txt:1"):
        read_split_list(str(path), CLASSES)
    train, val = group_split(list(range(8, 26)), val_fraction=0.1, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(8, 26))
    assert group_split(list(range(8, 26)), val_fraction=0.1, seed=1) != (train, val)


def test_missing_lists_or_frames_are_named(raw, tmp_path):
    with pytest.raises(ManualDirError, match="testlist02.txt") as err:
        load_tfds_dataset(Ucf101, data_dir=tmp_path, manual_dir=raw, builder_kwargs={"split_index": 2})
    assert str(raw) in str(err.value)
    with pytest.raises(ManualDirError, match="flow/u/"):
        load_tfds_dataset(Ucf101, data_dir=tmp_path, manual_dir=raw / "ucfTrainTestlist",
                          builder_kwargs={"modality_pair": "rgb_flow"})


def test_clip_without_frames_fails_unless_skipped(tmp_path):
    root = tmp_path / "raw"
    write_ucf(root)
    gone = stem("ApplyEyeMakeup", 9)
    for f in os.listdir(root / "frames" / gone):
        os.remove(root / "frames" / gone / f)
    with pytest.raises(ManualDirError, match=gone):
        load_tfds_dataset(Ucf101, data_dir=tmp_path / "a", manual_dir=root, builder_kwargs={"frame_size": 8})
    _, info = load_tfds_dataset(Ucf101, data_dir=tmp_path / "b", manual_dir=root,
                                builder_kwargs={"frame_size": 8, "skip_incomplete": True})
    assert sum(info["split_sizes"].values()) == 11
