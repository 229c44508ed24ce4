"""Audio and frame preprocessing shared by the audio-visual builders (NumPy, SciPy, PIL only).

Two spectrogram recipes appear in the reference preprocessing:

* :func:`log_stft` (CREMA-D, UCF101): a centred STFT, ``n_fft`` 512, hop 353, periodic Hann
  window, magnitude, ``log(|S| + 1e-7)``. Centring pads ``n_fft // 2`` samples on both sides
  (zeros by default, which is what ``librosa.stft`` does since librosa 0.10; librosa < 0.10
  reflected the signal, available as ``pad_mode="reflect"``). The frame count is then
  ``1 + n // hop``: 66,150 samples (3 s at 22.05 kHz) give 188 frames and 48,000 samples (3 s at
  16 kHz) give 136, the shapes 257×188 and 257×136 of the reference.
* :func:`log_spectrogram` (AVE): ``scipy.signal.spectrogram`` with its defaults (Tukey window,
  constant detrend, power spectral density), ``nperseg`` 512, ``noverlap`` 353, no centring,
  ``log(S + 1e-7)``: 160,000 samples (10 s at 16 kHz) give ``1 + (160000 - 512) // 159`` = 1004
  frames.

Frames are stored as uint8 ``[T, S, S, C]`` (resized to S×S, aspect ratio not kept, as the
reference's evaluation ``Resize((224, 224))``) and converted to float32 at read time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import scipy.signal
import soundfile
from PIL import Image

#: the stored format of the audio-visual builders: 1.1.0 keeps every tensor as raw bytes
#: (``tfds.features.Encoding.BYTES``); 1.0.0 kept them as protobuf number lists, about 50× slower
#: to decode (26 ms against 0.5 ms for one CREMA-D example here) and a third larger
VERSION = "1.1.0"
RELEASE_NOTES = {"1.0.0": "First mcr_jax release.",
                 "1.1.0": "Tensors stored as raw bytes: about 50x faster to decode, a quarter smaller on disk. "
                          "A 1.0.0 build is not read by this version: build again from the manual download."}


def stored_tensor(shape, dtype):
    """A TFDS tensor feature stored as raw bytes (decoded by a copy, not a protobuf number list)."""
    import tensorflow_datasets as tfds

    return tfds.features.Tensor(shape=tuple(shape), dtype=dtype, encoding=tfds.features.Encoding.BYTES)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------- audio
def read_wav(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Reads an audio file as mono float32 in [-1, 1] at ``sample_rate`` Hz.

    Channels are averaged; other rates are converted with a polyphase resampler
    (``scipy.signal.resample_poly``). Returns ``[N]`` float32 (``N`` may be 0 for an empty file).
    """
    data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != sample_rate and mono.size:
        g = math.gcd(int(rate), int(sample_rate))
        mono = scipy.signal.resample_poly(mono, sample_rate // g, int(rate) // g)
    return np.asarray(mono, np.float32)


def tile_to_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Repeats ``samples`` ``[N]`` end to end and cuts the result to ``[length]``.

    Raises ``ValueError`` for an empty signal (there is nothing to tile).
    """
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"tile_to_length expects a 1-D signal, got shape {samples.shape}")
    if samples.size == 0:
        raise ValueError("tile_to_length got an empty signal (0 samples)")
    reps = -(-length // samples.size)
    return np.tile(samples, reps)[:length]


def fit_audio(samples: np.ndarray, length: int) -> np.ndarray:
    """Tiles/cuts ``[N]`` to ``[length]`` and clips it to [-1, 1] (the reference's recipe)."""
    return np.clip(tile_to_length(samples, length), -1.0, 1.0).astype(np.float32)


def num_stft_frames(num_samples: int, *, n_fft: int = 512, hop: int = 353, center: bool = True) -> int:
    """Number of STFT frames :func:`log_stft` produces for ``num_samples`` samples."""
    if center:
        return 1 + num_samples // hop
    return 1 + (num_samples - n_fft) // hop


def log_stft(
    samples: np.ndarray,
    *,
    n_fft: int = 512,
    hop: int = 353,
    center: bool = True,
    pad_mode: str = "constant",
    eps: float = 1e-7,
) -> np.ndarray:
    """Log-magnitude STFT ``log(|STFT(x)| + eps)`` of ``[N]`` → ``[n_fft // 2 + 1, frames]`` float32.

    Periodic Hann window of length ``n_fft``, no normalisation (librosa's convention). With
    ``center`` the signal is padded by ``n_fft // 2`` on both sides (``pad_mode`` "constant" =
    zeros, or "reflect"), so frame ``t`` is centred on sample ``t * hop``.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim != 1:
        raise ValueError(f"log_stft expects a 1-D signal, got shape {x.shape}")
    if center:
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        x = np.pad(x, n_fft // 2, mode=pad_mode)
    if x.size < n_fft:
        raise ValueError(f"signal of {x.size} samples is shorter than n_fft={n_fft}")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.fft.rfft(frames * window, axis=-1).T
    return np.log(np.abs(spec) + eps).astype(np.float32)


def log_spectrogram(
    samples: np.ndarray, sample_rate: int, *, nperseg: int = 512, noverlap: int = 353, eps: float = 1e-7
) -> np.ndarray:
    """``log(scipy.signal.spectrogram(x, fs, nperseg, noverlap) + eps)``: ``[N]`` → ``[nperseg//2+1, T]``.

    SciPy's defaults are kept (Tukey(0.25) window, constant detrend, PSD scaling), with
    ``T = 1 + (N - nperseg) // (nperseg - noverlap)``.
    """
    _, _, spec = scipy.signal.spectrogram(
        np.asarray(samples, np.float64), sample_rate, nperseg=nperseg, noverlap=noverlap
    )
    return np.log(spec + eps).astype(np.float32)


# ---------------------------------------------------------------------------------------- frames
def list_frames(directory: str | os.PathLike) -> list[str]:
    """Sorted image files (jpg/jpeg/png) in ``directory``; ``[]`` when it does not exist."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(FRAME_EXTENSIONS))
    return [os.path.join(directory, n) for n in names]


def pick_indices(num_available: int, num_wanted: int, mode: str = "first") -> list[int]:
    """Chooses ``num_wanted`` frame indices out of ``num_available``.

    ``mode="first"``: the first frames (the last one repeated when there are too few);
    ``"uniform"``: evenly spaced over the clip, the rounded ``linspace`` from the first to the last
    frame (which repeats frames when there are too few). Raises ``ValueError`` when there is no
    frame at all.
    """
    if num_available <= 0:
        raise ValueError("no frames to choose from")
    if mode == "first":
        idx = list(range(min(num_available, num_wanted)))
    elif mode == "uniform":
        return np.round(np.linspace(0, num_available - 1, num_wanted)).astype(int).tolist()
    else:
        raise ValueError(f"frame selection mode must be 'first' or 'uniform', got {mode!r}")
    return idx + [idx[-1]] * (num_wanted - len(idx))


def load_frames(paths: Sequence[str], size: int, *, mode: str = "RGB") -> np.ndarray:
    """Loads images and resizes each to ``size``×``size`` (bilinear): uint8 ``[T, size, size, C]``.

    ``mode`` is a PIL mode: "RGB" (C = 3) or "L" (C = 1, e.g. one optical-flow component).
    """
    out = []
    for p in paths:
        with Image.open(p) as img:
            arr = np.asarray(img.convert(mode).resize((size, size), Image.BILINEAR), np.uint8)
        out.append(arr if arr.ndim == 3 else arr[..., None])
    return np.stack(out)


def normalize_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` → float32 ``(x / 255 - mean) / std`` with ImageNet statistics."""
    x = frames.astype(np.float32)  # one float32 copy, then in place (the same values, fewer passes)
    x /= np.float32(255.0)
    x -= IMAGENET_MEAN
    x /= IMAGENET_STD
    return x


def normalize_flow(flow: np.ndarray) -> np.ndarray:
    """uint8 optical-flow images (128 ≈ no motion) → float32 in [-1, 1]: ``(x - 127.5) / 127.5``."""
    return ((flow.astype(np.float32) - 127.5) / 127.5).astype(np.float32)


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, right, bottom)`` covering a ``scale`` fraction of the area
    with aspect ratio (log-uniform) in ``ratio``; 10 tries, then a centre crop of the closest
    admissible ratio (torchvision's RandomResizedCrop rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crops ``box`` out of ``[H, W, C]`` uint8 and resizes it to ``size`` = (H, W), bilinear (an RGB
    image in one call, which gives the same values as band by band; other channel counts band by band)."""
    if image.shape[-1] == 3:
        return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR, box=box), np.uint8)
    chans = [
        np.asarray(
            Image.fromarray(image[..., c]).resize((size[1], size[0]), Image.BILINEAR, box=box), np.uint8
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(chans, axis=-1)


def augment_frames(
    frames: np.ndarray,
    rng: np.random.Generator,
    *,
    per_frame: bool = True,
    flip_prob: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    is_flow: bool = False,
) -> np.ndarray:
    """Random resized crop (back to the stored size) + horizontal flip of uint8 ``[T, H, W, C]``.

    ``per_frame=True`` draws a new crop and flip for every frame (the OGM-GE style loaders apply the
    torchvision transform to each frame separately); ``False`` shares them across the clip. For
    optical flow (``is_flow``; channel 0 is the horizontal component) a flip also mirrors the
    horizontal motion: ``u → 255 - u``.
    """
    t, h, w, _ = frames.shape
    out = np.empty_like(frames)
    box = flip = None
    for i in range(t):
        if per_frame or box is None:
            box = random_resized_crop_box(h, w, rng, scale=scale)
            flip = rng.uniform() < flip_prob
        img = _crop_resize(frames[i], box, (h, w))
        if flip:
            img = img[:, ::-1]
            if is_flow:
                img = img.copy()
                img[..., 0] = 255 - img[..., 0]
        out[i] = img
    return out
