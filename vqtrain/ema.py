"""An exponential moving average of a model's trained weights, kept in the model
(so in every checkpoint) and swapped in wherever the model is used: validation,
test, the tokenizer and evaluation.

Why not Lightning's `EMAWeightAveraging`: it averages the whole LightningModule,
buffers included (the discriminator, codebook statistics, usage counts and
k-means flags would be averaged too), swaps them back before the module's own
`on_validation_epoch_end` (where validation usage is logged), and writes the
average over the checkpoint's `state_dict`. This one averages only the
parameters it is given, as taming-transformers' and SimVQ's `LitEma` do."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class WeightEMA(nn.Module):
    """shadow <- shadow - (1 - d_n) (shadow - param) after every update n, with
    d_n = min(decay, (1 + n) / (10 + n)) (LitEma's warm-up: early weights fade fast).
    Shadows are buffers `shadow<i>` in the order of `params`; parameters that
    need no gradient (frozen bases) are the model's own and not averaged."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float = 0.9999):
        super().__init__()
        if not 0 < decay < 1:
            raise ValueError(f"model.ema_decay must be in (0, 1) (or null for no EMA), got {decay}")
        self.decay = decay
        self.params = [p for p in params if p.requires_grad]
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        for i, param in enumerate(self.params):
            self.register_buffer(f"shadow{i}", param.detach().clone())
        self.swapped = False  # True while the model holds the shadows (validation, test)

    def shadows(self) -> list[Tensor]:
        return [getattr(self, f"shadow{i}") for i in range(len(self.params))]

    @torch.no_grad()
    def update(self, taken: Tensor | bool = True) -> None:
        """On the device throughout: reading the count back would sync host and GPU every step.
        `taken` (bool, on the device): False for a step that updated nothing, which changes nothing."""
        self.num_updates += taken
        n = self.num_updates.float()
        decay = torch.where(torch.as_tensor(taken), ((1 + n) / (10 + n)).clamp(max=self.decay), 1.0)
        for shadow, param in zip(self.shadows(), self.params):
            shadow.sub_((1 - decay) * (shadow - param))

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the shadows (twice restores both)."""
        for shadow, param in zip(self.shadows(), self.params):
            held = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(held)
        self.swapped = not self.swapped

    def shadow_keys(self, prefix: str) -> list[str]:
        return [f"{prefix}shadow{i}" for i in range(len(self.params))]
