"""Finite scalar quantization (Mentzer et al. 2023, arXiv:2309.15505).

Each of the `len(levels)` channels is bounded with tanh (shifted by half a
level for even level counts) and rounded with a straight-through gradient. The
implicit codebook has prod(levels) codes, indexed in mixed radix. There is no
auxiliary loss; bounding, rounding and index math run in float32.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqtrain.quantizers.base import Quantizer, check_positive_int, straight_through, zero


# Levels recommended by the FSQ paper (Table 3) for a target codebook size.
RECOMMENDED_LEVELS = {
    2**8: [8, 6, 5],
    2**10: [8, 5, 5, 5],
    2**12: [7, 5, 5, 5, 5],
    2**13: [8, 8, 8, 4, 4],
    2**14: [8, 8, 8, 6, 5],
    2**16: [8, 8, 8, 5, 5, 5],
}


def fsq_levels(levels: list[int] | None, codebook_size: int | None) -> list[int]:
    """Exactly one of explicit `levels` or a target `codebook_size` (mapped by the paper's table)."""
    if (levels is None) == (codebook_size is None):
        raise ValueError("FSQ takes exactly one of `levels` or `codebook_size` (set the other to null)")
    if codebook_size is not None:
        if codebook_size not in RECOMMENDED_LEVELS:
            raise ValueError(f"FSQ codebook_size={codebook_size} has no recommended levels; use one of {sorted(RECOMMENDED_LEVELS)} or give `levels`")
        return RECOMMENDED_LEVELS[codebook_size]
    levels = list(levels)
    if not levels or any(isinstance(l, bool) or not isinstance(l, int) or l < 2 for l in levels):
        raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels!r}")
    return levels


class FSQ(Quantizer):
    def __init__(
        self,
        dim: int,
        levels: list[int] | None = None,
        num_codebooks: int = 1,
        codebook_size: int | None = None,
        scale: float | list[float] = 1.0,
        eps: float = 1e-3,
    ):
        super().__init__(dim)
        self.levels = levels = fsq_levels(levels, codebook_size)
        self.num_codebooks = check_positive_int("num_codebooks", num_codebooks)
        scale_t = torch.as_tensor(scale, dtype=torch.float32).expand(len(levels)).clone()
        if not bool((scale_t > 0).all()):
            raise ValueError(f"FSQ scale must be > 0, got {scale!r}")
        self.register_buffer("_scale", scale_t, persistent=False)
        self.unit_scale = bool((scale_t == 1).all())  # dividing and multiplying by 1 are exact: skipped
        self.eps = eps
        self.codebook_sizes = [math.prod(levels)] * num_codebooks

        levels_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_half_width", torch.div(levels_t, 2, rounding_mode="floor"), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0).long(), persistent=False)
        # bound(h) = tanh(h + shift) * half_l - offset, its constants computed once
        half_l = (levels_t - 1) * (1 + eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_half_l", half_l, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l), persistent=False)

        self.code_dim = code_dim = len(levels) * num_codebooks
        projected = dim != code_dim
        self.project_in = nn.Linear(dim, code_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(code_dim, dim) if projected else nn.Identity()

    def bound(self, h: Tensor) -> Tensor:
        """Squash to (-L/2, L/2), shifted so that rounding gives exactly L values."""
        return torch.tanh(h + self._shift) * self._half_l - self._offset

    def quantize_rows(self, x: Tensor, sample_ids: Tensor, num_samples: int):
        h = self.project_in(x).view(x.shape[0], self.num_codebooks, len(self.levels))
        if not self.unit_scale:
            h = h / self._scale
        bounded = self.bound(h)
        rounded = bounded.round()
        codes = rounded / self._half_width
        out = straight_through(bounded / self._half_width, codes) if torch.is_grad_enabled() else codes
        indices = ((rounded.detach() + self._half_width).long() * self._basis).sum(-1)
        if not self.unit_scale:
            out = out * self._scale
        out = self.project_out(out.reshape(x.shape[0], self.code_dim))
        losses = {"commitment": zero(x.device), "codebook": zero(x.device)}
        return out, indices, losses, zero(x.device)

    def decode_rows(self, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels.long()
        codes = (digits - self._half_width) / self._half_width
        return self.project_out((codes * self._scale).reshape(indices.shape[0], self.code_dim))
