"""Discriminators for adversarial training. Every one returns `list[Judgement]`,
one per sub-discriminator: its logits, its intermediate feature maps (for
feature matching) and, for audio, the mask of real time positions they share."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

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
