"""AVE builder on a tiny fixture in the real raw layout (annotation/split files, wav, 1-fps frames)."""

import os
import socket

import numpy as np
import pytest
import soundfile
from PIL import Image

from mcr_jax.data.builders import Ave
from mcr_jax.data.builders.ave import AVE_CATEGORIES, parse_annotation_file
from mcr_jax.data.builders.common import ManualDirError
from mcr_jax.data.tfds_source import load_tfds_dataset

SIZE = 16
RATE = 16000
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
# (category, video id, start, end); the last one has the known broken segment "0&0".
VIDEOS = {
    "train": [("Church bell", "vidA0000001", 2, 5), ("Bark", "vidB0000002", 0, 10),
              ("Rodents, rats, mice", "vidC0000003", 2, 6), ("Bark", "vidD0000004", 4, 9)],
    "validation": [("Church bell", "vidE0000005", 1, 8), ("Rodents, rats, mice", "vidF0000006", 0, 10)],
    "test": [("Bark", "vidG0000007", 3, 7), ("Church bell", "vidH0000008", 0, 0)],
}
SPLIT_FILES = {"train": "trainSet.txt", "validation": "valSet.txt", "test": "testSet.txt"}
# Sorted category names → labels, written out independently of the builder.
EXPECTED_LABEL = {"Bark": 0, "Church bell": 1, "Rodents, rats, mice": 2}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tone_per_second(seconds=10):
    """Second k holds a sine at 500 * (k + 1) Hz, so the spectrum shows which seconds were kept."""
    t = np.arange(RATE) / RATE
    return np.concatenate([0.4 * np.sin(2 * np.pi * 500 * (k + 1) * t) for k in range(seconds)])


def write_ave(root):
    os.makedirs(root / "audio")
    lines = {s: [HEADER] + [f"{c}&{v}&good&{a}&{b}" for c, v, a, b in rows] for s, rows in VIDEOS.items()}
    (root / "Annotations.txt").write_text("\n".join([HEADER] + sum((ls[1:] for ls in lines.values()), [])) + "\n")
    for split, fname in SPLIT_FILES.items():
        (root / fname).write_text("\n".join(lines[split]) + "\n")
    audio = tone_per_second()
    for rows in VIDEOS.values():
        for _, vid, _, _ in rows:
            soundfile.write(root / "audio" / f"{vid}.wav", audio, RATE)
            os.makedirs(root / "frames" / vid)
            for k in range(10):  # frame k (second k) has grey level 10 + 20 k
                Image.fromarray(np.full((12, 18, 3), 10 + 20 * k, np.uint8)).save(
                    root / "frames" / vid / f"{vid}_{k + 1:02d}.jpg")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ave_raw")
    write_ave(root)
    sources, info = load_tfds_dataset(Ave, data_dir=tmp_path_factory.mktemp("ave_tfds"), manual_dir=root,
                                      builder_kwargs={"frame_size": SIZE})
    return root, sources, info


def all_examples(sources):
    return {s: [src[i] for i in range(len(src))] for s, src in sources.items()}


def test_info_and_official_splits(built):
    _, sources, info = built
    assert info["modalities"] == ["audio", "video"]
    assert info["input_shapes"] == {"audio": (257, 1004), "video": (4, SIZE, SIZE, 3)}
    assert info["class_names"] == sorted(EXPECTED_LABEL) and info["num_classes"] == 3
    assert info["split_sizes"] == {s: len(v) for s, v in VIDEOS.items()}
    assert info["metadata"]["fixed_segments"] == 1
    ids = {s: sorted(e["clip_id"].decode() for e in exs) for s, exs in all_examples(sources).items()}
    assert ids == {s: sorted(v for _, v, _, _ in rows) for s, rows in VIDEOS.items()}


def test_labels_shapes_and_frames_inside_the_segment(built):
    _, sources, _ = built
    segments = {v: (c, a, b) for rows in VIDEOS.values() for c, v, a, b in rows}
    for exs in all_examples(sources).values():
        for ex in exs:
            cat, start, end = segments[ex["clip_id"].decode()]
            if end <= start:
                start, end = 0, 10
            assert ex["label"] == EXPECTED_LABEL[cat]
            assert ex["audio"].shape == (257, 1004) and ex["audio"].dtype == np.float32
            assert ex["video"].shape == (4, SIZE, SIZE, 3) and ex["video"].dtype == np.uint8
            inside = np.arange(start, end)
            expect = inside[np.round(np.linspace(0, len(inside) - 1, 4)).astype(int)]
            np.testing.assert_allclose(ex["video"].reshape(4, -1).mean(1), 10 + 20 * expect, atol=3)


def test_audio_is_cropped_to_the_event_segment(built):
    _, sources, _ = built
    ex = next(e for e in all_examples(sources)["train"] if e["clip_id"] == b"vidA0000001")  # [2, 5)
    band = ex["audio"].mean(axis=1)  # bin width 31.25 Hz: 500 (k + 1) Hz is bin 16 (k + 1)
    inside = [band[16 * (k + 1)] for k in (2, 3, 4)]
    outside = [band[16 * (k + 1)] for k in (0, 1, 5, 6, 7)]
    assert min(inside) > max(outside) + 2.0  # outside bins sit at the floor log(1e-7) ≈ -16.1


def test_parse_annotation_file_skips_header_and_rejects_bad_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(f"{HEADER}\nBark&xyz&good&1&4\n\n")
    assert parse_annotation_file(str(path)) == [
        {"category": "Bark", "video_id": "xyz", "quality": "good", "start": 1, "end": 4}]
    path.write_text("Bark&xyz&good&1\n")
    with pytest.raises(ValueError, match="a.txt:1"):
        parse_annotation_file(str(path))


def test_documented_category_list_is_sorted_and_has_28():
    assert len(AVE_CATEGORIES) == 28 and list(AVE_CATEGORIES) == sorted(AVE_CATEGORIES)


def test_missing_split_file_or_media_is_named(tmp_path):
    root = tmp_path / "raw"
    write_ave(root)
    os.remove(root / "valSet.txt")
    with pytest.raises(ManualDirError, match="valSet.txt") as err:
        load_tfds_dataset(Ave, data_dir=tmp_path / "tfds", manual_dir=root, builder_kwargs={"frame_size": 8})
    assert str(root) in str(err.value) and "Annotations.txt" in str(err.value)  # the layout is shown
    (root / "valSet.txt").write_text(HEADER + "\n" + "Bark&vidZ0000009&good&0&10\n")
    with pytest.raises(ManualDirError, match="vidZ0000009"):
        load_tfds_dataset(Ave, data_dir=tmp_path / "tfds", manual_dir=root, builder_kwargs={"frame_size": 8})
