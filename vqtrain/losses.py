"""Losses averaged over real samples (or real time positions) only: reconstruction
(MSE or L1, multi-resolution STFT) and the adversarial terms of GAN training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from vqtrain.utils import ceil_div, channel_mask, exists, lengths_to_mask, mask_time

if TYPE_CHECKING:
    from vqtrain.discriminators import Judgement

DISTANCES = ("l2", "l1")
ADVERSARIAL_KINDS = ("hinge", "non_saturating")


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `values` (B, ..., T) over the positions where `mask` (B, T) is True,
    every channel in between counted. Zero, not NaN, when nothing is real."""
    values = values.float()
    if not exists(mask):
        return values.mean()
    weight = channel_mask(mask, values)
    return torch.where(weight, values, 0.0).sum() / weight.sum().clamp_min(1)


def masked_mse(x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over real samples; `mask` (B, T) for (B, C, T) signals."""
    return masked_mean((x_hat.float() - x.float()).pow(2), mask)


def masked_l1(x_hat: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error over real samples (VQGAN's pixel loss)."""
    return masked_mean((x_hat.float() - x.float()).abs(), mask)


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
            if exists(lengths):  # frame i is centred on sample i * hop, as in MultiScaleMelLoss
                real = lengths_to_mask(ceil_div(lengths, hop), distance.shape[-1])
                distance = torch.where(real, distance, 0.0).sum() / real.sum().clamp_min(1)
            total = total + distance.mean()
        return total / len(self.fft_sizes)


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
            signal, target = (mask_time(s.float(), lengths) for s in (x_hat, x))
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
    """Signal-domain MSE (`distance="l2"`) or L1 (`"l1"`), plus an optional weighted
    multi-resolution STFT term."""

    def __init__(self, stft_weight: float = 0.0, fft_sizes: list[int] = (256, 512, 1024), distance: str = "l2"):
        super().__init__()
        if stft_weight < 0:
            raise ValueError(f"stft_weight must be >= 0, got {stft_weight}")
        if distance not in DISTANCES:
            raise ValueError(f"model.reconstruction.distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = masked_mse if distance == "l2" else masked_l1
        self.stft_weight = stft_weight
        self.stft = MultiResolutionSTFTLoss(fft_sizes) if stft_weight > 0 else None

    def forward(self, x_hat: Tensor, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        """`mask` (B, T) and `lengths` (B,) mark the same real samples of padded audio."""
        loss = self.distance(x_hat, x, mask)
        if exists(self.stft):
            if exists(mask) and not exists(lengths):
                raise ValueError("the STFT term of padded audio needs the clips' lengths beside the mask")
            loss = loss + self.stft_weight * self.stft(x_hat, x, lengths)
        return loss


# --- adversarial terms (over the sub-discriminators of a `list[Judgement]`) --------------


def check_kind(kind: str) -> None:
    if kind not in ADVERSARIAL_KINDS:
        raise ValueError(f"adversarial loss kind must be one of {ADVERSARIAL_KINDS}, got {kind!r}")


def discriminator_loss(real: Sequence[Judgement], fake: Sequence[Judgement], kind: str = "hinge") -> Tensor:
    """The discriminator's loss, mean over sub-discriminators; fake judgements are of
    detached reconstructions. As taming-transformers' `hinge_d_loss` / `vanilla_d_loss`:
    hinge 0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) (Lim & Ye 2017, arXiv:1705.02894);
    non-saturating 0.5 (E[softplus(-D(x))] + E[softplus(D(x_hat))]) (Goodfellow et al. 2014)."""
    check_kind(kind)
    # penalties on real logits (wanted high) and on fake ones (wanted low)
    if kind == "hinge":
        on_real, on_fake = (lambda t: F.relu(1 - t)), (lambda t: F.relu(1 + t))
    else:
        on_real, on_fake = (lambda t: F.softplus(-t)), F.softplus
    losses = [
        0.5 * (masked_mean(on_real(r.logits), r.mask) + masked_mean(on_fake(f.logits), f.mask))
        for r, f in zip(real, fake)
    ]
    return torch.stack(losses).mean()


def generator_adversarial_loss(fake: Sequence[Judgement], kind: str = "hinge") -> Tensor:
    """The generator's adversarial loss, mean over sub-discriminators: hinge -E[D(x_hat)]
    (taming's `g_loss`), non-saturating E[softplus(-D(x_hat))] = -E[log sigmoid D(x_hat)]."""
    check_kind(kind)
    losses = [masked_mean(-f.logits if kind == "hinge" else F.softplus(-f.logits), f.mask) for f in fake]
    return torch.stack(losses).mean()


def feature_matching_loss(real: Sequence[Judgement], fake: Sequence[Judgement]) -> Tensor:
    """L1 between the discriminator's features of real and reconstructed signals
    (MelGAN, Kumar et al. 2019, arXiv:1910.06711): mean over each sub-discriminator's
    layers, then over sub-discriminators; real features are detached."""
    per_sub = [
        torch.stack([masked_mean((b - a.detach()).abs(), f.mask) for a, b in zip(r.features, f.features)]).mean()
        for r, f in zip(real, fake)
    ]
    return torch.stack(per_sub).mean()
