"""VQGAN-class image encoder and decoder: residual blocks of GroupNorm + swish +
3x3 conv, a channel multiplier per resolution, self-attention at the lowest
resolution, downsampling by 2^(len(ch_mult) - 1).

The layout of taming-transformers (Esser et al. 2021, arXiv:2012.09841;
`taming/modules/diffusionmodules/model.py`: `Encoder`, `Decoder`, `ResnetBlock`,
`AttnBlock`) and of the MAGVIT-2-style nets in SimVQ's official code
(`taming/modules/diffusionmodules/improved_model.py`), which drop the attention
and upsample by a conv to 4x the channels plus depth-to-space. `attention` and
`upsample` choose between the two; `ch_mult`, `num_res_blocks` and `channels`
(taming's `ch`) mean what they mean there. Differences from both: every conv
has a bias, the middle holds two residual blocks (with attention between them
when on), and the decoder has `num_res_blocks` blocks per resolution (taming's
has one more: set the decoder's `num_res_blocks` one higher to match).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vqtrain.nets.conv import ImageEncoder

UPSAMPLERS = ("nearest", "depth_to_space")


def check_widths(channels: int, ch_mult: list[int], norm_groups: int) -> list[int]:
    """Channel counts per resolution; every one must split into `norm_groups` groups."""
    ch_mult = list(ch_mult)
    if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
        raise ValueError(f"model.encoder/decoder.ch_mult must be a non-empty list of integers >= 1, got {ch_mult}")
    widths = [channels * m for m in ch_mult]
    if any(w % norm_groups for w in widths):
        raise ValueError(
            f"model.encoder/decoder.channels x ch_mult = {widths} must all be divisible by norm_groups={norm_groups}"
        )
    return widths


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus the input
    (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(
            normalize(in_channels, groups),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            normalize(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (taming's AttnBlock), residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[-2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(rearrange(attended, "b 1 (h w) c -> b c h w", h=height))


def middle(channels: int, groups: int, attention: bool, dropout: float) -> nn.Sequential:
    """The lowest resolution: residual block, attention (if on), residual block."""
    layers = [ResnetBlock(channels, channels, groups, dropout)]
    if attention:
        layers.append(AttnBlock(channels, groups))
    layers.append(ResnetBlock(channels, channels, groups, dropout))
    return nn.Sequential(*layers)


class Upsample(nn.Module):
    """x2: nearest neighbour then a 3x3 conv (taming), or a 3x3 conv to 4x the
    channels then depth-to-space (SimVQ / MAGVIT-2)."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in UPSAMPLERS:
            raise ValueError(f"model.decoder.upsample must be one of {UPSAMPLERS}, got {mode!r}")
        self.mode = mode
        self.conv = nn.Conv2d(channels, channels * (4 if mode == "depth_to_space" else 1), 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "nearest":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return rearrange(self.conv(x), "b (s t c) h w -> b c (h s) (w t)", s=2, t=2)


class VQGANEncoder(ImageEncoder):
    """conv_in; per resolution `num_res_blocks` residual blocks then a stride-2 3x3
    conv (none after the last); middle; norm, swish, 1x1 conv to `out_channels`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: int = 128,
        ch_mult: list[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        widths = check_widths(channels, ch_mult, norm_groups)
        self.stride = 2 ** (len(widths) - 1)
        self.out_channels = out_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        width = channels
        for level, out in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, out, norm_groups, dropout))
                width = out
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [
            middle(width, norm_groups, attention, dropout),
            normalize(width, norm_groups),
            nn.SiLU(),
            nn.Conv2d(width, out_channels, 1),
        ]
        self.net = nn.Sequential(*layers)


class VQGANDecoder(nn.Module):
    """Mirror of VQGANEncoder: conv_in, middle, per resolution (lowest first)
    residual blocks then x2 upsampling (none after the highest), norm, swish,
    and `conv_out`, the last layer (VQGAN's adaptive weight is taken there)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: int = 128,
        ch_mult: list[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        upsample: str = "nearest",
    ):
        super().__init__()
        widths = check_widths(channels, ch_mult, norm_groups)
        self.in_channels = in_channels
        width = widths[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1),
            middle(width, norm_groups, attention, dropout),
        ]
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(width, widths[level], norm_groups, dropout))
                width = widths[level]
            if level > 0:
                layers.append(Upsample(width, upsample))
        layers += [normalize(width, norm_groups), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor, lengths: Tensor | None = None, size: int | None = None) -> Tensor:
        return self.conv_out(self.net(z))
