"""Discriminators for adversarial training. Every one returns `list[Judgement]`,
one per sub-discriminator: its logits, its intermediate feature maps (for
feature matching) and, for audio, the mask of real time positions they share.

Audio discriminators take `lengths` and are exact under padding: the signal's
padding is zeroed, each sub-discriminator's time axis (the last) keeps one
resolution, and positions past a clip's real frames are zeroed after every layer,
so a padded clip is judged exactly as it is alone and padding reaches no logit,
feature or gradient."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchaudio
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from vqtrain.utils import ceil_div, exists, lengths_to_mask, mask_time

NORMS = ("batch", "none")


class Judgement(NamedTuple):
    """One sub-discriminator's verdict. `mask`: None for images, else bool (B, T')
    over the last axis of the logits and of every feature map, True at real
    positions; padded positions of logits and features are zero."""

    logits: Tensor
    features: list[Tensor]
    mask: Tensor | None


class PatchGAN(nn.Module):
    """The PatchGAN of pix2pix (Isola et al. 2017, arXiv:1611.07004) as taming-transformers'
    `NLayerDiscriminator` (`taming/modules/discriminator/model.py`) builds it: a 4x4
    stride-2 conv, `num_layers - 1` more stride-2 convs doubling the width (at most
    8x `channels`), one stride-1 conv, each followed by norm and LeakyReLU(0.2), then
    a 4x4 conv to one logit per patch; convs start N(0, 0.02), norms N(1, 0.02).

    `norm="batch"` keeps taming's BatchNorm (SimVQ's recipe uses it too): the
    published numbers come with it. Real and fake images pass separately, so each
    is normalised by its own batch statistics, as there; under DDP the statistics
    are per rank. `norm="none"` drops it (and so any batch coupling)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.discriminator.norm must be one of {NORMS}, got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"model.discriminator.num_layers must be >= 1, got {num_layers}")
        widths = [channels * min(2**n, 8) for n in range(num_layers + 1)]
        blocks = [nn.Sequential(nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2))]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1
            batch_norm = norm == "batch"  # the norm's shift replaces the conv's bias
            layers = [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(widths[n])] if batch_norm else []
            blocks.append(nn.Sequential(*layers, nn.LeakyReLU(0.2)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> list[Judgement]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return [Judgement(self.head(x), features, None)]


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
            spec = self.spectrogram(mask_time(x.float(), lengths))  # (B, C, freq, frames), complex
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
