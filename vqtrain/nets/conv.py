"""Convolutional encoders and decoders for images (2-D) and audio (1-D).

Encoders map (B, C, ...) to latents (B, D, ...); decoders map back. Both take
`lengths` (B,) of real samples for padded audio (None for images).

Padding in 1-D: after every layer, positions past the real length at that
resolution, ceil(length / stride), are set to zero. Garbage in the padding
therefore never reaches a real position, and a padded clip sees exactly the
zeros an unpadded clip sees from the convolutions' own zero padding: the model
computes the same function of a clip whether it is padded or alone. There is
no batch normalisation anywhere, since batch statistics would mix clips.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from vqtrain.utils import TimeMasks, ceil_div, exists


class ResBlock(nn.Module):
    def __init__(self, channels: int, conv: type[nn.Module], dilation: int = 1):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(),
            conv(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.ELU(),
            conv(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ImageEncoder(nn.Module):
    """What image encoders share: `net` (B, C, H, W) -> (B, D, H / stride, W / stride),
    with sides that must divide by `stride`, said in one line rather than a shape error."""

    modality = "image"
    stride: int
    net: nn.Module

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be divisible by the encoder stride {self.stride}")
        return self.net(x)


class ConvEncoder2d(ImageEncoder):
    """Image encoder: `num_downsamples` stride-2 convolutions, each followed by residual blocks."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        num_downsamples: int = 2,
        num_res_blocks: int = 1,
    ):
        super().__init__()
        self.stride = 2**num_downsamples
        self.out_channels = out_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden_channels, 3, padding=1)]
        for _ in range(num_downsamples):
            layers += [nn.ELU(), nn.Conv2d(hidden_channels, hidden_channels, 4, stride=2, padding=1)]
            layers += [ResBlock(hidden_channels, nn.Conv2d) for _ in range(num_res_blocks)]
        layers += [nn.ELU(), nn.Conv2d(hidden_channels, out_channels, 1)]
        self.net = nn.Sequential(*layers)


class ConvDecoder2d(nn.Module):
    """Mirror of ConvEncoder2d with stride-2 transposed convolutions."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        num_upsamples: int = 2,
        num_res_blocks: int = 1,
    ):
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden_channels, 3, padding=1)]
        for _ in range(num_upsamples):
            layers += [ResBlock(hidden_channels, nn.Conv2d) for _ in range(num_res_blocks)]
            layers += [nn.ELU(), nn.ConvTranspose2d(hidden_channels, hidden_channels, 4, stride=2, padding=1)]
        layers += [nn.ELU(), nn.Conv2d(hidden_channels, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> Tensor:
        """The output conv's weight: where VQGAN's adaptive weight compares gradients."""
        return self.net[-1].weight

    def forward(self, z: Tensor, lengths: Tensor | None = None, size: int | None = None) -> Tensor:
        return self.net(z)


class Downsample1d(nn.Module):
    """Strided conv whose output has exactly ceil(T / stride) positions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, 2 * stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        extra = ceil_div(x.shape[-1], self.stride) * self.stride - x.shape[-1]
        left = self.stride // 2
        return self.conv(F.pad(x, (left, self.stride - left + extra)))


class Upsample1d(nn.Module):
    """Transposed conv (computed at the input rate) with exactly T * stride outputs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        padding = (stride + 1) // 2
        self.conv = (
            nn.ConvTranspose1d(
                in_channels,
                out_channels,
                2 * stride,
                stride=stride,
                padding=padding,
                output_padding=2 * padding - stride,
            )
            if stride > 1
            else nn.Conv1d(in_channels, out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def zero_biases(net: nn.Module) -> None:
    """Start every bias at zero. Audio is quiet (an RMS near 0.1) next to PyTorch's
    default biases (up to 1/sqrt(fan_in)): they would swamp the signal, leave
    the latents nearly constant and every code but one unused from the start."""
    for module in net.modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and exists(module.bias):
            nn.init.zeros_(module.bias)


def residual_stack1d(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(channels, nn.Conv1d, 1), ResBlock(channels, nn.Conv1d, 3)])


def masked_stack(blocks: nn.ModuleList, x: Tensor, masks: TimeMasks, stride: int) -> Tensor:
    """Run blocks, re-zeroing the padding after each: every conv sees zeros past the end."""
    for block in blocks:
        x = masks(block(x), stride)
    return x


def check_strides(strides: list[int]) -> list[int]:
    strides = list(strides)
    if not strides or any(not isinstance(s, int) or s < 1 for s in strides):
        raise ValueError(f"strides must be a non-empty list of integers >= 1, got {strides}")
    return strides


class MaskedEncoder1d(nn.Module):
    """The masked forward pass of 1-D encoders: a stem, then per stride a residual
    stack (`blocks`) and a downsampling (`downs`), then a head. Subclasses build the
    parts; every activation must map 0 to 0, so a masked input stays zero into the
    next convolution."""

    modality = "audio"
    strides: list[int]
    stem: nn.Module
    blocks: nn.ModuleList
    downs: nn.ModuleList
    head: nn.Module

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        masks = TimeMasks(lengths)
        x = masks(self.stem(masks(x)))
        stride = 1
        for block, down, s in zip(self.blocks, self.downs, self.strides):
            x = masked_stack(block, x, masks, stride)
            stride *= s
            x = masks(down(x), stride)
        return masks(self.head(x), stride)


class MaskedDecoder1d(nn.Module):
    """The masked forward pass of 1-D decoders: a stem, then per stride (`strides`,
    in decoding order) an upsampling (`ups`) and a residual stack (`blocks`), then a
    head; the output is cut to `size` samples."""

    strides: list[int]
    stem: nn.Module
    ups: nn.ModuleList
    blocks: nn.ModuleList
    head: nn.Module

    def forward(self, z: Tensor, lengths: Tensor | None = None, size: int | None = None) -> Tensor:
        masks = TimeMasks(lengths)
        stride = math.prod(self.strides)
        x = masks(self.stem(z), stride)
        for up, block, s in zip(self.ups, self.blocks, self.strides):
            stride //= s
            x = masks(up(x), stride)
            x = masked_stack(block, x, masks, stride)
        x = self.head(x)
        if exists(size):
            x = x[..., :size]
        return masks(x)


class ConvEncoder1d(MaskedEncoder1d):
    """Audio encoder: a stem, then per stride a dilated residual block and a
    strided conv (channels double), then a 1x1 head to the latent dim."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 32, strides: list[int] = (2, 4, 4)):
        super().__init__()
        self.strides = check_strides(strides)
        self.stride = math.prod(self.strides)
        self.out_channels = out_channels
        self.stem = nn.Conv1d(in_channels, hidden_channels, 7, padding=3)
        blocks, downs, channels = [], [], hidden_channels
        for s in self.strides:
            blocks.append(residual_stack1d(channels))
            downs.append(nn.Sequential(nn.ELU(), Downsample1d(channels, channels * 2, s)))
            channels *= 2
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.head = nn.Sequential(nn.ELU(), nn.Conv1d(channels, out_channels, 3, padding=1))
        zero_biases(self)


class ConvDecoder1d(MaskedDecoder1d):
    """Mirror of ConvEncoder1d; output cut to `size` samples."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 32, strides: list[int] = (2, 4, 4)):
        super().__init__()
        self.strides = check_strides(strides)[::-1]
        self.in_channels = in_channels
        channels = hidden_channels * 2 ** len(self.strides)
        self.stem = nn.Conv1d(in_channels, channels, 7, padding=3)
        ups, blocks = [], []
        for s in self.strides:
            ups.append(nn.Sequential(nn.ELU(), Upsample1d(channels, channels // 2, s)))
            channels //= 2
            blocks.append(residual_stack1d(channels))
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.ELU(), nn.Conv1d(channels, out_channels, 7, padding=3))
        zero_biases(self)
