"""quality's data and nets: real MNIST and FSDD in memory, and the small conv
autoencoder both sides of a row train (scripts/benchmarks/quality.py says how)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

DIM = 64  # the latent width of the nets and of every quantizer in the harness
FSDD_TEST_SPEAKERS = ("theo",)
FSDD_STRIDE = 16
FSDD_RMS_DB = -20.0


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNIST:
    name = "mnist"
    eval_batch = 500

    def __init__(self, root: Path, train_limit: int | None, test_limit: int | None):
        raw = root / "MNIST" / "raw"
        self.train = (
            torch.from_numpy(read_idx(raw / "train-images-idx3-ubyte.gz")[:train_limit].copy())
            .float()
            .div(255)
            .unsqueeze(1)
        )
        self.test = (
            torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte.gz")[:test_limit].copy())
            .float()
            .div(255)
            .unsqueeze(1)
        )
        self.train_size, self.test_size = len(self.train), len(self.test)
        self.test_var = float(self.test.var())

    def net(self) -> nn.Module:
        return ConvAE(nn.Conv2d, nn.ConvTranspose2d, kernel=4, stride=2, padding=1)

    def train_batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.train[indices], None

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for start in range(0, self.test_size, self.eval_batch):
            yield self.test[start : start + self.eval_batch], None


class FSDD:
    name = "fsdd"
    eval_batch = 32

    def __init__(self, root: Path, train_limit: int | None, test_limit: int | None):
        import soundfile as sf

        from vqtrain.data.audio import normalize_loudness

        files = sorted((root / "fsdd" / "recordings").glob("*.wav"))
        if not files:
            raise FileNotFoundError(f"no WAV files under {root / 'fsdd' / 'recordings'}")
        split: dict[str, list[Tensor]] = {"train": [], "test": []}
        for path in files:
            part = "test" if path.stem.split("_")[1] in FSDD_TEST_SPEAKERS else "train"
            limit = {"train": train_limit, "test": test_limit}[part]
            if limit is not None and len(split[part]) >= limit:
                continue
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            if rate != 8000:
                raise ValueError(f"{path}: {rate} Hz, expected 8000")
            split[part].append(normalize_loudness(torch.from_numpy(audio.mean(1)), FSDD_RMS_DB))
        self.train = split["train"]
        self.test = sorted(split["test"], key=len)  # evaluation batches of similar lengths: little padding
        self.train_size, self.test_size = len(self.train), len(self.test)
        self.test_var = float(torch.cat(self.test).var())

    def net(self) -> nn.Module:
        return ConvAE(nn.Conv1d, nn.ConvTranspose1d, kernel=8, stride=4, padding=2)

    @staticmethod
    def pad(clips: list[Tensor]) -> tuple[Tensor, Tensor]:
        length = -(-max(len(c) for c in clips) // FSDD_STRIDE) * FSDD_STRIDE
        x = torch.zeros(len(clips), 1, length)
        mask = torch.zeros(len(clips), length, dtype=torch.bool)
        for i, clip in enumerate(clips):
            x[i, 0, : len(clip)] = clip
            mask[i, : len(clip)] = True
        return x, mask

    def train_batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.pad([self.train[i] for i in indices.tolist()])

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for start in range(0, self.test_size, self.eval_batch):
            yield self.pad(self.test[start : start + self.eval_batch])


class ConvAE(nn.Module):
    """Two strided convs down to DIM channels, the mirror up; images (B, 1, H, W) or audio (B, 1, T)."""

    def __init__(self, conv, deconv, kernel: int, stride: int, padding: int):
        super().__init__()
        self.stride = stride * stride
        self.encoder = nn.Sequential(
            conv(1, 32, kernel, stride, padding), nn.ReLU(), conv(32, DIM, kernel, stride, padding)
        )
        self.decoder = nn.Sequential(
            deconv(DIM, 32, kernel, stride, padding), nn.ReLU(), deconv(32, 1, kernel, stride, padding)
        )

    def latent_mask(self, mask: Tensor | None) -> Tensor | None:
        """Sample mask (B, T) -> latent mask (B, T / stride): a latent is real where its first sample is."""
        return None if mask is None else mask[:, :: self.stride]
