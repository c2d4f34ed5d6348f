"""The neural-codec encoder and decoder (SEANet as in EnCodec, with DAC's choices).

Per stride, three residual units with dilations 1, 3, 9 (kernel 7), then a strided
conv that doubles the channels; the decoder mirrors it with transposed convs and
ends in tanh. Every conv is weight-normalised; the activation is DAC's Snake or
SEANet's ELU. DAC: Kumar et al. 2023, https://arxiv.org/abs/2306.06546 and
github.com/descriptinc/descript-audio-codec (dac/model/dac.py, dac/nn/layers.py);
EnCodec: Défossez et al. 2022, https://arxiv.org/abs/2210.13438.

Exact under padding as `conv.py` nets are (the same masked forward passes): a padded
clip computes what it computes alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from vqtrain.nets.conv import Downsample1d, MaskedDecoder1d, MaskedEncoder1d, Upsample1d, check_strides, zero_biases

ACTIVATIONS = ("snake", "elu")


class Snake1d(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned alpha per channel: a periodic
    inductive bias for waveforms (Ziyin et al. 2020, https://arxiv.org/abs/2006.08195;
    DAC's Snake1d, whose 1e-9 keeps alpha -> 0 finite). Snake(0) = 0, as masking needs."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def make_activation(name: str, channels: int) -> nn.Module:
    if name == "snake":
        return Snake1d(channels)
    if name == "elu":
        return nn.ELU()
    raise ValueError(f"model.encoder.activation / model.decoder.activation must be one of {ACTIVATIONS}, got {name!r}")


class ResidualUnit(nn.Module):
    """x + conv1x1(act(conv_k,dilated(act(x)))): DAC's ResidualUnit (kernel 7)."""

    def __init__(self, channels: int, dilation: int, kernel_size: int, act: str):
        super().__init__()
        self.block = nn.Sequential(
            make_activation(act, channels),
            nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=(kernel_size - 1) * dilation // 2),
            make_activation(act, channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def residual_units(channels: int, dilations: list[int], kernel_size: int, act: str) -> nn.ModuleList:
    return nn.ModuleList([ResidualUnit(channels, d, kernel_size, act) for d in dilations])


def check_kernel(kernel_size: int) -> int:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"model.encoder.kernel_size must be odd (same padding both sides), got {kernel_size}")
    return kernel_size


def weight_normalize(net: nn.Module) -> None:
    """Weight norm on every conv (Salimans & Kingma 2016), as DAC and EnCodec do; after
    the biases are zeroed, so the weights start as initialised."""
    zero_biases(net)
    for module in list(net.modules()):
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            weight_norm(module)


class CodecEncoder(MaskedEncoder1d):
    """Waveform (B, C, T) -> latents (B, D, ceil(T / prod(strides)))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        strides: list[int] = (2, 4, 5, 8),
        dilations: list[int] = (1, 3, 9),
        kernel_size: int = 7,
        activation: str = "snake",
    ):
        super().__init__()
        self.strides = check_strides(strides)
        self.stride = math.prod(self.strides)
        self.out_channels = out_channels
        kernel_size = check_kernel(kernel_size)
        self.stem = nn.Conv1d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2)
        blocks, downs, channels = [], [], hidden_channels
        for s in self.strides:
            blocks.append(residual_units(channels, dilations, kernel_size, activation))
            downs.append(nn.Sequential(make_activation(activation, channels), Downsample1d(channels, channels * 2, s)))
            channels *= 2
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.head = nn.Sequential(
            make_activation(activation, channels), nn.Conv1d(channels, out_channels, 3, padding=1)
        )
        weight_normalize(self)


class CodecDecoder(MaskedDecoder1d):
    """Latents (B, D, T') -> waveform (B, C, T' * prod(strides)) in (-1, 1), cut to `size`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        strides: list[int] = (2, 4, 5, 8),
        dilations: list[int] = (1, 3, 9),
        kernel_size: int = 7,
        activation: str = "snake",
    ):
        super().__init__()
        self.strides = check_strides(strides)[::-1]
        self.in_channels = in_channels
        kernel_size = check_kernel(kernel_size)
        channels = hidden_channels * 2 ** len(self.strides)
        self.stem = nn.Conv1d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        ups, blocks = [], []
        for s in self.strides:
            ups.append(nn.Sequential(make_activation(activation, channels), Upsample1d(channels, channels // 2, s)))
            channels //= 2
            blocks.append(residual_units(channels, dilations, kernel_size, activation))
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.head = nn.Sequential(
            make_activation(activation, channels),
            nn.Conv1d(channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.Tanh(),
        )
        weight_normalize(self)

    @property
    def last_layer(self) -> Tensor:
        """The output conv's weight direction (weight norm's `v`): where VQGAN's adaptive weight compares gradients."""
        return self.head[1].parametrizations.weight.original1
