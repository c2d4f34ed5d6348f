"""Reconstruction losses averaged over real samples only."""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from vqtrain.utils import ceil_div, channel_mask, exists, lengths_to_mask


def masked_mse(x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over real samples; `mask` (B, T) for (B, C, T) signals.

    Zero, not NaN, when nothing is real."""
    error = (x_hat.float() - x.float()).pow(2)
    if not exists(mask):
        return error.mean()
    weight = channel_mask(mask, error)
    return torch.where(weight, error, 0.0).sum() / weight.sum().clamp_min(1)


class MultiResolutionSTFTLoss(nn.Module):
    """L1 distance of log magnitudes over several STFT resolutions. Frames whose
    centre lies in the padding are left out; padding itself is zero on both sides."""

    def __init__(self, fft_sizes: list[int] = (256, 512, 1024), eps: float = 1e-5):
        super().__init__()
        self.fft_sizes = list(fft_sizes)
        self.eps = eps

    def forward(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None) -> Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        signal, target = x_hat.float().flatten(0, 1), x.float().flatten(0, 1)
        for n_fft in self.fft_sizes:
            hop = n_fft // 4
            window = torch.hann_window(n_fft, device=x.device)
            spec = [
                torch.stft(s, n_fft, hop, window=window, pad_mode="constant", return_complex=True).abs()
                for s in (signal, target)
            ]
            distance = (torch.log(spec[0] + self.eps) - torch.log(spec[1] + self.eps)).abs().mean(1)  # (B, frames)
            if exists(lengths):
                frames = torch.arange(distance.shape[-1], device=x.device) * hop
                real = frames[None] < lengths[:, None]
                distance = torch.where(real, distance, 0.0).sum() / real.sum().clamp_min(1)
            total = total + distance.mean()
        return total / len(self.fft_sizes)


def zero_padding(x: Tensor, lengths: Tensor | None) -> Tensor:
    """(B, C, T) with the samples past each clip's length set to zero."""
    if not exists(lengths):
        return x
    return torch.where(lengths_to_mask(lengths, x.shape[-1])[:, None], x, 0.0)


class MultiScaleMelLoss(nn.Module):
    """DAC's mel loss: the L1 distance of log10 mel magnitudes (clamped at `clamp_eps`)
    at several window lengths, hop = window / 4, each scale with its own number of mel
    bands, summed over scales (DAC weights the sum by 15), plus `mag_weight` times the
    L1 of the mel magnitudes themselves (0 in DAC). Slaney mel scale and filter norm,
    as DAC's librosa filters. Kumar et al. 2023, https://arxiv.org/abs/2306.06546,
    MelSpectrogramLoss in descript-audio-codec/dac/nn/loss.py, values of conf/base.yml.

    Padded audio: the padding of both signals is zeroed (frames near a clip's end see
    the zeros a clip alone sees), and frames whose centre lies in the padding are left
    out of the mean. Computed in float32 with autocast off."""

    def __init__(
        self,
        sample_rate: int,
        window_lengths: list[int] = (32, 64, 128, 256, 512, 1024, 2048),
        n_mels: list[int] = (5, 10, 20, 40, 80, 160, 320),
        f_min: float = 0.0,
        f_max: float | None = None,
        log_weight: float = 1.0,
        mag_weight: float = 0.0,
        clamp_eps: float = 1e-5,
    ):
        super().__init__()
        window_lengths, n_mels = list(window_lengths), list(n_mels)
        if not window_lengths or len(window_lengths) != len(n_mels):
            raise ValueError(
                f"model.reconstruction.window_lengths and n_mels must be non-empty and of equal length, "
                f"got {window_lengths} and {n_mels}"
            )
        if any(w < 4 for w in window_lengths):
            raise ValueError(
                f"model.reconstruction.window_lengths must be >= 4 (hop = window / 4), got {window_lengths}"
            )
        self.hops = [w // 4 for w in window_lengths]
        self.log_weight, self.mag_weight, self.clamp_eps = log_weight, mag_weight, clamp_eps
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate,
                n_fft=w,
                hop_length=hop,
                f_min=f_min,
                f_max=f_max,
                n_mels=m,
                power=1.0,
                center=True,
                pad_mode="constant",
                norm="slaney",
                mel_scale="slaney",
            )
            for w, hop, m in zip(window_lengths, self.hops, n_mels)
        )

    def forward(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """`x_hat`, `x` (B, C, T); `lengths` (B,) real samples, None when all are."""
        total = x.new_zeros((), dtype=torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            signal, target = (zero_padding(s.float(), lengths) for s in (x_hat, x))
            for mel, hop in zip(self.mels, self.hops):
                spec, ref = mel(signal), mel(target)  # (B, C, mels, frames)
                distance = (
                    self.log_weight
                    * (spec.clamp_min(self.clamp_eps).log10() - ref.clamp_min(self.clamp_eps).log10()).abs()
                )
                if self.mag_weight:
                    distance = distance + self.mag_weight * (spec - ref).abs()
                distance = distance.mean((1, 2))  # (B, frames)
                if exists(lengths):  # frame i is centred on sample i * hop
                    real = lengths_to_mask(ceil_div(lengths, hop), distance.shape[-1])
                    total = total + torch.where(real, distance, 0.0).sum() / real.sum().clamp_min(1)
                else:
                    total = total + distance.mean()
        return total


class ReconstructionLoss(nn.Module):
    """Time-domain MSE plus an optional weighted multi-resolution STFT term."""

    def __init__(self, stft_weight: float = 0.0, fft_sizes: list[int] = (256, 512, 1024)):
        super().__init__()
        if stft_weight < 0:
            raise ValueError(f"stft_weight must be >= 0, got {stft_weight}")
        self.stft_weight = stft_weight
        self.stft = MultiResolutionSTFTLoss(fft_sizes) if stft_weight > 0 else None

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        """`mask` (B, T) and `lengths` (B,) mark the same real samples of padded audio."""
        loss = masked_mse(x_hat, x, mask)
        if exists(self.stft):
            if exists(mask) and not exists(lengths):
                raise ValueError("the STFT term of padded audio needs the clips' lengths beside the mask")
            loss = loss + self.stft_weight * self.stft(x_hat, x, lengths)
        return loss
