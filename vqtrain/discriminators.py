"""Discriminators for adversarial training.

Every discriminator's `forward(x, lengths=None)` returns one `Judgement` per
sub-discriminator. Audio ones are exact under padding: the signal's padding is
zeroed, each sub-discriminator's time axis (the last) keeps one resolution, and
positions past a clip's real frames are zeroed after every layer, so a padded clip
is judged exactly as it is alone and padding reaches no logit, feature or gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from vqtrain.losses import zero_padding
from vqtrain.utils import ceil_div, exists, lengths_to_mask


class Judgement(NamedTuple):
    """One sub-discriminator's verdict: `logits`, the feature maps its layers gave (for
    feature matching), and `mask`: None for images, else bool (B, T') over the time
    axis (the last dim) of the logits and of every feature map, True at real positions
    (padded positions of logits and features are zero)."""

    logits: Tensor
    features: list[Tensor]
    mask: Tensor | None


class STFTDiscriminator(nn.Module):
    """EnCodec's STFT sub-discriminator: the complex STFT (real and imaginary parts as
    channels) through weight-normalised 2-D convs that dilate in time (1, 2, 4) and
    stride in frequency only, LeakyReLU between. Défossez et al. 2022,
    https://arxiv.org/abs/2210.13438; DiscriminatorSTFT in audiocraft
    (audiocraft/adversarial/discriminators/msstftd.py), whose (time, freq) kernel (3, 9)
    and stride (1, 2) are (9, 3) and (2, 1) here, time being the last axis.

    The STFT is centred with zero padding (frame i centred on sample i * hop), so a
    clip has ceil(length / hop) real frames, whatever it is padded with."""

    def __init__(
        self,
        n_fft: int,
        hop_length: int,
        in_channels: int = 1,
        filters: int = 32,
        dilations: list[int] = (1, 2, 4),
        kernel_size: tuple[int, int] = (9, 3),
        negative_slope: float = 0.3,
    ):
        super().__init__()
        freq_kernel, time_kernel = kernel_size
        if freq_kernel % 2 == 0 or time_kernel % 2 == 0:
            raise ValueError(f"model.discriminator.kernel_size must be odd (freq, time), got {kernel_size}")
        self.hop_length = hop_length
        self.spectrogram = torchaudio.transforms.Spectrogram(
            n_fft=n_fft, hop_length=hop_length, normalized=True, center=True, pad_mode="constant", power=None
        )
        self.activation = nn.LeakyReLU(negative_slope)

        def conv(inputs: int, outputs: int, kernel: tuple[int, int], stride: int = 1, dilation: int = 1) -> nn.Module:
            padding = (kernel[0] // 2, dilation * (kernel[1] // 2))
            return weight_norm(nn.Conv2d(inputs, outputs, kernel, (stride, 1), padding, (1, dilation)))

        square = (time_kernel, time_kernel)
        self.convs = nn.ModuleList(
            [conv(2 * in_channels, filters, kernel_size)]
            + [conv(filters, filters, kernel_size, stride=2, dilation=d) for d in dilations]
            + [conv(filters, filters, square)]
        )
        self.post = conv(filters, 1, square)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Judgement:
        """`x` (B, C, T) -> logits (B, 1, F', frames), features (B, filters, F'', frames)."""
        with torch.autocast(x.device.type, enabled=False):
            spec = self.spectrogram(zero_padding(x.float(), lengths))  # (B, C, freq, frames), complex
        z = torch.cat([spec.real, spec.imag], dim=1)
        mask = lengths_to_mask(ceil_div(lengths, self.hop_length), z.shape[-1]) if exists(lengths) else None

        def masked(t: Tensor) -> Tensor:
            return t if mask is None else torch.where(mask[:, None, None], t, 0.0)

        z, features = masked(z), []
        for conv in self.convs:
            z = masked(self.activation(conv(z)))
            features.append(z)
        return Judgement(masked(self.post(z)), features, mask)


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's MS-STFT discriminator: STFT sub-discriminators at several window
    lengths (hop = window / 4); EnCodec's are 2048, 1024, 512, 256, 128 at 24 kHz
    (audiocraft config/solver/compression/default.yaml: 32 filters, LeakyReLU 0.3)."""

    def __init__(self, n_ffts: list[int] = (2048, 1024, 512, 256, 128), **kwargs):
        super().__init__()
        n_ffts = list(n_ffts)
        if not n_ffts or any(n < 4 for n in n_ffts):
            raise ValueError(f"model.discriminator.n_ffts must be a non-empty list of sizes >= 4, got {n_ffts}")
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, n // 4, **kwargs) for n in n_ffts)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> list[Judgement]:
        return [discriminator(x, lengths) for discriminator in self.discriminators]
