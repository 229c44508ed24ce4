"""CREMA-D builder on a tiny fixture in the real raw layout (AudioWAV/*.wav, VideoFrames/<clip>/*.jpg)."""

import os
import socket

import numpy as np
import pytest
import soundfile
from PIL import Image

from mcr_jax.data.builders import CremaD
from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.builders.common import ManualDirError
from mcr_jax.data.builders.cremad import parse_clip_name, speaker_folds
from mcr_jax.data.tfds_source import load_tfds_dataset, split_batches

# The reference's label order, written out independently of the builder.
EXPECTED_LABEL = {"NEU": 0, "HAP": 1, "SAD": 2, "FEA": 3, "DIS": 4, "ANG": 5}
ACTORS = [1001, 1002, 1003, 1004, 1005, 1006]
EMOS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
SENTENCES = ["DFA", "IEO", "ITH"]
SIZE = 16


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_frames(directory, levels, shape=(20, 28)):
    """Frames of mean grey ``level`` with a horizontal ramp (so crops and flips change them)."""
    os.makedirs(directory, exist_ok=True)
    ramp = np.broadcast_to(3 * (np.arange(shape[1]) - shape[1] // 2), shape)
    for k, level in enumerate(levels):
        img = np.repeat((level + ramp)[..., None], 3, axis=-1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(directory, f"{k + 1:03d}.jpg"))


def write_cremad(root, *, rate=16000):
    """18 clips (6 actors × 3), audio at ``rate`` (resampled by the builder), 4 frames each whose
    mean grey level encodes the frame number (60, 100, 140, 180)."""
    stems = []
    for a_i, actor in enumerate(ACTORS):
        for s_i, sent in enumerate(SENTENCES):
            emo = EMOS[(a_i + s_i) % 6]
            stem = f"{actor}_{sent}_{emo}_XX"
            t = np.arange(int(0.4 * rate)) / rate
            wav = 0.3 * np.sin(2 * np.pi * (200 + 50 * len(stems)) * t)
            os.makedirs(root / "AudioWAV", exist_ok=True)
            soundfile.write(root / "AudioWAV" / f"{stem}.wav", wav, rate)
            write_frames(root / "VideoFrames" / stem, [60, 100, 140, 180])
            stems.append(stem)
    (root / "AudioWAV" / "README.txt").write_text("not a clip")
    return stems


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cremad_raw")
    stems = write_cremad(root)
    data_dir = tmp_path_factory.mktemp("cremad_tfds")
    sources, info = load_tfds_dataset(
        CremaD, data_dir=data_dir, manual_dir=root, split_names=("train", "validation", "test"),
        builder_kwargs={"frame_size": SIZE, "num_folds": 3, "fold": 0})
    return root, stems, data_dir, sources, info


def test_info_describes_the_dataset(built):
    _, stems, _, sources, info = built
    assert info["modalities"] == ["audio", "video"]
    assert info["input_shapes"] == {"audio": (257, 188), "video": (3, SIZE, SIZE, 3)}
    assert info["num_classes"] == 6 and info["task"] == "classification"
    assert info["class_names"][EXPECTED_LABEL["ANG"]] == "anger"
    assert sum(info["split_sizes"].values()) == len(stems) == sum(len(s) for s in sources.values())
    assert info["metadata"]["split_mode"] == "speaker_disjoint"
    assert info["metadata"]["ignored_files"] == 1


def test_examples_have_the_agreed_format_and_labels(built):
    root, _, _, sources, _ = built
    seen = 0
    for src in sources.values():
        for i in range(len(src)):
            ex = src[i]
            assert ex["audio"].shape == (257, 188) and ex["audio"].dtype == np.float32
            assert np.isfinite(ex["audio"]).all()
            assert ex["video"].shape == (3, SIZE, SIZE, 3) and ex["video"].dtype == np.uint8
            stem = ex["clip_id"].decode()
            actor, _, emo, _ = stem.split("_")
            assert ex["label"] == EXPECTED_LABEL[emo] and ex["actor"] == int(actor)
            # the first three frames in time order (grey 60, 100, 140; the 4th, 180, unused)
            np.testing.assert_allclose(ex["video"].reshape(3, -1).mean(1), [60, 100, 140], atol=3)
            # audio: 16 kHz file resampled to 22.05 kHz, tiled to 3 s, then the log-STFT
            ref = av.log_stft(av.fit_audio(av.read_wav(root / "AudioWAV" / f"{stem}.wav", 22050), 66150))
            np.testing.assert_allclose(ex["audio"], ref, rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == 18


def test_splits_are_speaker_disjoint_and_recorded(built):
    _, _, _, sources, info = built
    actors = {s: {int(sources[s][i]["actor"]) for i in range(len(sources[s]))} for s in sources}
    assert not actors["train"] & actors["validation"]
    assert not actors["train"] & actors["test"]
    assert not actors["validation"] & actors["test"]
    assert set().union(*actors.values()) == set(ACTORS)
    recorded = info["metadata"]["actors"]
    assert {s: set(v) for s, v in recorded.items()} == actors
    assert recorded == speaker_folds(ACTORS, num_folds=3, fold=0, seed=0)


def test_grain_reader_on_built_source(built):
    _, _, _, sources, info = built
    src = sources["train"]
    batches = list(split_batches(src, info, 4, train=False))
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == len(src) and len(mask) == 4 * len(batches)
    assert np.sort(np.concatenate([b["index"] for b in batches])[mask == 1]).tolist() == list(range(len(src)))
    b = batches[0]
    assert b["video"].dtype == np.float32 and b["video"].shape == (4, 3, SIZE, SIZE, 3)
    np.testing.assert_allclose(b["video"][0], av.normalize_frames(src[0]["video"]))
    tr = next(split_batches(src, info, 2, train=True, seed=0, epoch=0))
    stored = np.stack([av.normalize_frames(src[int(i)]["video"]) for i in tr["index"]])
    assert tr["video"].shape == stored.shape and not np.allclose(tr["video"], stored)


def test_rebuilding_reuses_the_built_dataset(built):
    _, _, data_dir, _, info = built
    sources, again = load_tfds_dataset(CremaD, data_dir=data_dir, manual_dir=None, split_names=("test",),
                                       builder_kwargs={"frame_size": SIZE, "num_folds": 3, "fold": 0})
    assert again["split_sizes"] == info["split_sizes"] and list(sources) == ["test"]
    with pytest.raises(ValueError, match="unknown split"):
        load_tfds_dataset(CremaD, data_dir=data_dir, split_names=("dev",),
                          builder_kwargs={"frame_size": SIZE, "num_folds": 3, "fold": 0})


def test_speaker_folds_rotate_and_cover():
    actors = list(range(1001, 1092))
    f0 = speaker_folds(actors, num_folds=10, fold=0, seed=0)
    f1 = speaker_folds(actors, num_folds=10, fold=1, seed=0)
    assert sorted(f0["train"] + f0["validation"] + f0["test"]) == actors
    assert f1["test"] == f0["validation"] and f0["test"] != f1["test"]
    assert speaker_folds(actors, num_folds=10, fold=0, seed=1)["test"] != f0["test"]
    assert len(f0["test"]) in (9, 10)


def test_parse_clip_name():
    assert parse_clip_name("1076_MTI_SAD_XX") == {"actor": 1076, "sentence": "MTI", "emotion": "SAD",
                                                  "level": "XX", "label": 2}
    assert parse_clip_name("1001_DFA_XYZ_XX") is None and parse_clip_name("readme") is None


def test_random_split_is_labelled_not_speaker_disjoint(tmp_path):
    root = tmp_path / "raw"
    stems = write_cremad(root, rate=22050)
    sources, info = load_tfds_dataset(CremaD, data_dir=tmp_path / "tfds", manual_dir=root,
                                      split_names=("train", "validation", "test"),
                                      builder_kwargs={"frame_size": 8, "split_mode": "random"})
    assert "NOT_speaker_disjoint" in info["metadata"]["split_mode"]
    assert info["split_sizes"] == {"train": 14, "validation": 2, "test": 2}
    ids = [sources[s][i]["clip_id"].decode() for s in sources for i in range(len(sources[s]))]
    assert sorted(ids) == sorted(stems)


def test_missing_frames_fail_with_the_clip_named_unless_skipped(tmp_path):
    root = tmp_path / "raw"
    stems = write_cremad(root)
    for f in os.listdir(root / "VideoFrames" / stems[4]):
        os.remove(root / "VideoFrames" / stems[4] / f)
    kw = {"frame_size": 8, "num_folds": 3}
    with pytest.raises(ManualDirError, match=f"VideoFrames/{stems[4]}") as err:
        load_tfds_dataset(CremaD, data_dir=tmp_path / "a", manual_dir=root, builder_kwargs=kw)
    assert str(root) in str(err.value) and "skip_incomplete" in str(err.value)
    _, info = load_tfds_dataset(CremaD, data_dir=tmp_path / "b", manual_dir=root,
                                builder_kwargs={**kw, "skip_incomplete": True})
    assert sum(info["split_sizes"].values()) == 17
    assert stems[4] in info["metadata"]["skipped_incomplete"][0]


def test_a_split_larger_than_the_writers_memory_buffer_builds_without_tensorflow(tmp_path, monkeypatch):
    # TFDS spills a split beyond its in-memory buffer (1 GiB) to shuffle-bucket files through
    # tf.io.gfile; a real CREMA-D training split is 4 GB. Shrink the buffer so the fixture spills.
    from tensorflow_datasets.core import shuffle

    from mcr_jax.data.builders import CremaD
    from mcr_jax.data.tfds_source import load_tfds_dataset

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    raw = tmp_path / "raw"
    stems = write_cremad(raw)
    sources, info = load_tfds_dataset(CremaD, data_dir=tmp_path / "tfds", manual_dir=raw,
                                      builder_kwargs={"frame_size": 16, "num_folds": 3, "fold": 0})
    assert sum(len(s) for s in sources.values()) == len(stems)
    ids = sorted(sources[s][i]["clip_id"].decode() for s in sources for i in range(len(sources[s])))
    assert ids == sorted(stems)
