"""Reconstruction losses against values worked out independently: the masked MSE
by hand, the STFT loss with numpy's FFT on frames cut by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqtrain.losses import MultiResolutionSTFTLoss, ReconstructionLoss, masked_mse

EPS = 1e-5


def test_masked_mse_averages_over_real_samples_of_every_channel():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])  # (B=1, C=2, T=4)
    mask = torch.tensor([[True, True, False, False]])
    # real: 1, 2 (channel 0) and 1, 1 (channel 1) against zeros -> (1 + 4 + 1 + 1) / 4
    assert masked_mse(torch.zeros_like(x), x, mask).item() == pytest.approx(7 / 4)
    assert masked_mse(torch.zeros_like(x), x).item() == pytest.approx((1 + 4 + 9 + 16 + 4) / 8)


def test_masked_mse_is_zero_not_nan_when_nothing_is_real():
    x = torch.ones(2, 1, 3)
    assert masked_mse(torch.zeros_like(x), x, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def log_magnitudes(signal: np.ndarray, n_fft: int) -> np.ndarray:
    """(frames, bins): frames every n_fft / 4 samples, centred, zero padding, periodic Hann window."""
    hop = n_fft // 4
    padded = np.pad(signal, n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[i * hop : i * hop + n_fft] * window for i in range(1 + len(signal) // hop)])
    return np.log(np.abs(np.fft.rfft(frames, axis=-1)) + EPS)


def stft_distance(estimate: np.ndarray, target: np.ndarray, lengths: list[int], n_fft: int) -> float:
    """Mean over the real frames of all items (centre inside the clip) of the mean |log-magnitude difference|."""
    per_frame = [np.abs(log_magnitudes(e, n_fft) - log_magnitudes(t, n_fft)).mean(-1) for e, t in zip(estimate, target)]
    real = [d[np.arange(len(d)) * (n_fft // 4) < n] for d, n in zip(per_frame, lengths)]
    return float(np.concatenate(real).mean())


@pytest.fixture
def signals() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=generator, dtype=torch.float64)
    return x + 0.3 * torch.randn(2, 1, 64, generator=generator, dtype=torch.float64), x


@pytest.mark.parametrize("n_fft", [8, 16])
def test_stft_loss_matches_numpy_over_whole_signals(signals, n_fft: int):
    x_hat, x = signals
    every_frame = [65, 65]  # without lengths the frame centred on the end counts too
    expected = stft_distance(x_hat[:, 0].numpy(), x[:, 0].numpy(), every_frame, n_fft)
    loss = MultiResolutionSTFTLoss([n_fft], eps=EPS)(x_hat, x, None)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_stft_loss_counts_only_frames_centred_in_the_clip(signals):
    x_hat, x = signals
    lengths = [64, 21]  # item 1: frames at 0, 4, ..., 20 of 17 are real (n_fft 16, hop 4)
    expected = stft_distance(x_hat[:, 0].numpy(), x[:, 0].numpy(), lengths, 16)
    loss = MultiResolutionSTFTLoss([16], eps=EPS)(x_hat, x, torch.tensor(lengths))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() != pytest.approx(stft_distance(x_hat[:, 0].numpy(), x[:, 0].numpy(), [64, 64], 16), rel=1e-3)


def test_stft_loss_averages_its_resolutions_and_is_zero_for_a_perfect_reconstruction(signals):
    x_hat, x = signals
    both = MultiResolutionSTFTLoss([8, 16], eps=EPS)(x_hat, x, None).item()
    alone = [MultiResolutionSTFTLoss([n], eps=EPS)(x_hat, x, None).item() for n in (8, 16)]
    assert both == pytest.approx(sum(alone) / 2)
    assert MultiResolutionSTFTLoss([8, 16])(x, x, None).item() == 0.0


def test_reconstruction_loss_adds_the_weighted_stft_term(signals):
    x_hat, x = signals
    lengths = torch.tensor([64, 21])
    mask = torch.arange(64) < lengths[:, None]
    loss = ReconstructionLoss(stft_weight=0.5, fft_sizes=[16])(x_hat, x, mask, lengths)
    expected = masked_mse(x_hat, x, mask) + 0.5 * MultiResolutionSTFTLoss([16])(x_hat, x, lengths)
    assert loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="needs the clips' lengths beside the mask"):
        ReconstructionLoss(stft_weight=0.5, fft_sizes=[16])(x_hat, x, mask)
