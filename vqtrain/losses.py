"""Reconstruction losses averaged over real samples only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqtrain.utils import channel_mask, exists


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
