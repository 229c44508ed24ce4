"""The grain reader (batches, padding, per-process slices, augmentation) and the audio/frame helpers.

The reader tests use an in-memory random-access source shaped like a decoded TFDS example, so they
run in milliseconds; the builders' own tests read real array_record files.
"""

import socket

import numpy as np
import pytest
import soundfile
from absl import flags as absl_flags

from mcr_jax.data.builders import audio_video as av
from mcr_jax.data.tfds_source import (
    FrameAugment,
    batch_layout,
    grain_batches,
    make_augment_fn,
    split_batches,
    to_model_inputs,
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


class ListSource:
    """Random-access source of decoded examples (uint8 video, float32 audio, int label, bytes id)."""

    def __init__(self, n, t=2, size=12):
        rng = np.random.default_rng(0)
        self.items = [
            {"video": rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8),
             "audio": rng.normal(size=(5, 7)).astype(np.float32),
             "label": i % 3, "clip_id": f"clip{i}".encode()}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


INFO = {"modalities": ["audio", "video"]}


def collect(it):
    return list(it)


@pytest.mark.parametrize("n,bs", [(10, 4), (8, 4), (3, 8)])
def test_eval_batches_cover_every_example_once_and_mask_padding(n, bs):
    batches = collect(grain_batches(ListSource(n), bs, shuffle=False, seed=0, epoch=0, drop_remainder=False))
    assert len(batches) == -(-n // bs)
    for b in batches:
        assert b["mask"].dtype == np.float32 and b["mask"].shape == (bs,)
        assert b["video"].shape == (bs, 2, 12, 12, 3) and b["video"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.sum() == n and set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.sort(index[mask == 1]), np.arange(n))
    assert (mask[n:] == 0).all() and (mask[:n] == 1).all()
    ids = np.concatenate([b["clip_id"] for b in batches])[mask == 1]
    assert sorted(ids) == sorted(f"clip{i}" for i in range(n))


def test_train_batches_drop_remainder_and_shuffle_by_seed_and_epoch():
    src = ListSource(10)
    run = lambda seed, epoch: np.concatenate([b["index"] for b in grain_batches(
        src, 4, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True)])
    a = run(0, 0)
    assert a.shape == (8,) and len(set(a.tolist())) == 8
    np.testing.assert_array_equal(a, run(0, 0))
    assert not np.array_equal(a, run(0, 1))
    assert not np.array_equal(a, run(1, 0))
    batches = collect(grain_batches(src, 4, shuffle=True, seed=0, epoch=0, drop_remainder=True))
    assert all(b["mask"].sum() == 4 for b in batches)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("augment", [False, True])
def test_process_slices_concatenate_to_the_global_batch(drop, augment):
    src = ListSource(11)
    aug = FrameAugment(("video",)) if augment else None
    kw = dict(shuffle=True, seed=3, epoch=2, drop_remainder=drop, augment_fn=aug)
    glob = collect(grain_batches(src, 4, **kw))
    parts = [collect(grain_batches(src, 4, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(glob)
    for b, (p0, p1) in zip(glob, zip(*parts, strict=True), strict=True):
        assert p0["index"].shape == (2,)
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), b[key])


def test_batch_layout_rejects_bad_process_arguments():
    with pytest.raises(ValueError, match="divisible"):
        batch_layout(10, 3, shuffle=False, seed=0, epoch=0, drop_remainder=True, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        batch_layout(10, 4, shuffle=False, seed=0, epoch=0, drop_remainder=True, process_index=2,
                     process_count=2)


def test_augmentation_only_in_training_and_seeded_per_example():
    src = ListSource(6, size=16)
    stored = np.stack([av.normalize_frames(it["video"]) for it in src.items])
    ev = collect(split_batches(src, INFO, 6, train=False))
    np.testing.assert_array_equal(ev[0]["video"], stored)  # evaluation: no augmentation
    tr = collect(split_batches(src, INFO, 6, train=True, seed=1, epoch=0))[0]
    assert tr["video"].shape == stored.shape and tr["video"].dtype == np.float32
    changed = [not np.allclose(tr["video"][k], stored[i]) for k, i in enumerate(tr["index"])]
    assert all(changed)
    np.testing.assert_array_equal(tr["audio"], np.stack([src.items[i]["audio"] for i in tr["index"]]))
    again = collect(split_batches(src, INFO, 6, train=True, seed=1, epoch=0))[0]
    np.testing.assert_array_equal(again["video"], tr["video"])
    other = collect(split_batches(src, INFO, 6, train=True, seed=1, epoch=1))[0]
    by_index = lambda b: b["video"][np.argsort(b["index"])]
    assert not np.allclose(by_index(other), by_index(tr))


def test_make_augment_fn_picks_frame_modalities():
    assert make_augment_fn({"modalities": ["vision", "audio", "text"]}) is None
    assert make_augment_fn({"modalities": ["video", "flow"]}).keys == ("video", "flow")


def test_flip_mirrors_frames_and_flow_u():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 8, 8, 2), dtype=np.uint8)
    out = av.augment_frames(frames, rng, scale=(1.0, 1.0), flip_prob=1.0)
    np.testing.assert_array_equal(out, frames[:, :, ::-1])
    flow = av.augment_frames(frames, rng, scale=(1.0, 1.0), flip_prob=1.0, is_flow=True)
    np.testing.assert_array_equal(flow[..., 0], 255 - frames[:, :, ::-1, 0])
    np.testing.assert_array_equal(flow[..., 1], frames[:, :, ::-1, 1])
    same = av.augment_frames(frames, rng, scale=(1.0, 1.0), flip_prob=0.0)
    np.testing.assert_array_equal(same, frames)


def test_random_resized_crop_box_stays_inside_and_respects_area():
    rng = np.random.default_rng(1)
    for _ in range(200):
        left, top, right, bottom = av.random_resized_crop_box(30, 40, rng, scale=(0.2, 0.5))
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top) / 1200
        assert 0.15 <= area <= 0.55


def test_to_model_inputs_normalises_frames_and_flow():
    ex = to_model_inputs({"video": np.full((1, 2, 2, 3), 255, np.uint8), "flow": np.array([[0, 255]], np.uint8),
                          "label": 3, "x": np.zeros(2, np.float64), "s": b"abc", "ok": True})
    np.testing.assert_allclose(ex["video"][0, 0, 0], (1 - av.IMAGENET_MEAN) / av.IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(ex["flow"], [[-1.0, 1.0]])
    assert ex["label"].dtype == np.int32 and ex["x"].dtype == np.float32 and ex["s"] == "abc"
    assert ex["ok"].dtype == np.bool_


# ----------------------------------------------------------------------------- audio helpers
def naive_log_stft(x, n_fft, hop):
    x = np.pad(np.asarray(x, np.float64), n_fft // 2)
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    basis = np.exp(-2j * np.pi * np.outer(np.arange(n_fft // 2 + 1), n) / n_fft)
    cols = [basis @ (x[s:s + n_fft] * window) for s in range(0, len(x) - n_fft + 1, hop)]
    return np.log(np.abs(np.stack(cols, axis=1)) + 1e-7)


def test_log_stft_matches_a_naive_dft():
    x = np.random.default_rng(0).uniform(-1, 1, 300)
    ours = av.log_stft(x, n_fft=32, hop=11)
    ref = naive_log_stft(x, 32, 11)
    assert ours.shape == ref.shape == (17, 1 + 300 // 11)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,frames", [(66150, 188), (48000, 136)])
def test_log_stft_frame_counts_of_the_reference(n, frames):
    assert av.num_stft_frames(n) == frames
    assert av.log_stft(np.zeros(n, np.float32)).shape == (257, frames)
    assert av.log_stft(np.zeros(n, np.float32), pad_mode="reflect").shape == (257, frames)


def test_log_spectrogram_gives_1004_frames_for_10s_at_16k():
    spec = av.log_spectrogram(np.random.default_rng(0).uniform(-1, 1, 160000), 16000)
    assert spec.shape == (257, 1004) and spec.dtype == np.float32 and np.isfinite(spec).all()


def test_fit_audio_tiles_cuts_and_clips():
    out = av.fit_audio(np.array([0.5, 2.0, -3.0], np.float32), 7)
    np.testing.assert_array_equal(out, [0.5, 1.0, -1.0, 0.5, 1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="empty"):
        av.fit_audio(np.zeros(0, np.float32), 4)


def test_read_wav_resamples_and_averages_channels(tmp_path):
    t = np.arange(8000) / 8000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.ones_like(t)
    soundfile.write(tmp_path / "a.wav", np.stack([left, right], 1), 8000, subtype="FLOAT")
    out = av.read_wav(tmp_path / "a.wav", 16000)
    assert out.shape == (16000,) and out.dtype == np.float32
    assert abs(out[1000:15000].mean() - 0.05) < 0.01
    np.testing.assert_allclose(av.read_wav(tmp_path / "a.wav", 8000), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("n,want,mode,expected", [
    (5, 3, "first", [0, 1, 2]),
    (2, 3, "first", [0, 1, 1]),
    (6, 4, "uniform", [0, 2, 3, 5]),
    (10, 4, "uniform", [0, 3, 6, 9]),
    (3, 4, "uniform", [0, 1, 1, 2]),
    (1, 4, "uniform", [0, 0, 0, 0]),
])
def test_pick_indices(n, want, mode, expected):
    assert av.pick_indices(n, want, mode) == expected


def test_worker_processes_give_the_same_batches():
    src = ListSource(7)
    kw = dict(shuffle=True, seed=0, epoch=0, drop_remainder=False, augment_fn=FrameAugment())
    ref = collect(grain_batches(src, 4, **kw))
    parsed = absl_flags.FLAGS.is_parsed()
    got = collect(grain_batches(src, 4, worker_count=1, **kw))
    assert absl_flags.FLAGS.is_parsed() == parsed  # the global flags are left as they were
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_augmentation_seed_is_per_example_not_per_position():
    src = ListSource(6, size=16)
    for it in src.items[1:]:
        it["video"] = src.items[0]["video"].copy()  # identical content: only the seed differs
    aug = FrameAugment()
    kw = dict(shuffle=True, seed=5, epoch=0, drop_remainder=True, augment_fn=aug)
    big = collect(grain_batches(src, 6, **kw))[0]
    assert len({big["video"][k].tobytes() for k in range(6)}) == 6
    small = collect(grain_batches(src, 2, **kw))
    small_video = {int(i): v for b in small for i, v in zip(b["index"], b["video"], strict=True)}
    for i, v in zip(big["index"], big["video"], strict=True):
        np.testing.assert_array_equal(small_video[int(i)], v)
