"""Finite scalar quantization (Mentzer et al. 2023, arXiv:2309.15505).

Each of the `len(levels)` channels is bounded and rounded to one of L values
with a straight-through gradient. The implicit codebook has prod(levels)
codes, indexed in mixed radix. There is no auxiliary loss; bounding, rounding
and index math run in float32.

Two grids of L values per channel:

- standard (the FSQ paper, Sec. 3 and its Appendix A.1): the integers
  -floor(L/2) .. ceil(L/2) - 1, divided by floor(L/2). For odd L that is L
  points evenly spaced over [-1, 1]; for even L the grid is shifted by half a
  step (L = 4: -1, -0.5, 0, 0.5), so it holds 0 but is not symmetric. The
  bound is tanh, shifted by half a level for even L.
- symmetric (`symmetric: true`; Parker et al. 2024, "Scaling Transformers for
  Low-Bitrate High-Quality Speech Coding", arXiv:2411.19842, Sec. 3.2): L
  points evenly spaced over [-1, 1] for every L, 2k / (L - 1) - 1 for
  k = 0 .. L - 1 (L = 4: -1, -1/3, 1/3, 1), symmetric about 0 (so no 0 for
  even L). The bound is tanh, or, with `bound: clamp`, a hard clamp to
  [-1, 1] for inputs that are already bounded (the levels of ResidualFSQ).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqtrain.quantizers.base import Quantizer, check_choice, check_positive_int, straight_through, zero

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
            raise ValueError(
                f"FSQ codebook_size={codebook_size} has no recommended levels; use one of {sorted(RECOMMENDED_LEVELS)} or give `levels`"
            )
        return RECOMMENDED_LEVELS[codebook_size]
    levels = list(levels)
    if not levels or any(isinstance(size, bool) or not isinstance(size, int) or size < 2 for size in levels):
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
        symmetric: bool = False,
        bound: str = "tanh",
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
        self.symmetric = bool(symmetric)
        self.bound_mode = check_choice("bound", bound, {"tanh", "clamp"})
        if self.bound_mode == "clamp" and not self.symmetric:
            raise ValueError("FSQ bound='clamp' needs symmetric=true (the standard grid's bound is the shifted tanh)")
        self.codebook_sizes = [math.prod(levels)] * num_codebooks

        # A channel is bounded to grid units u, where the L values are L consecutive integers;
        # round(u) is the value, its code (u - center) / half_width in [-1, 1], its digit u - low.
        levels_t = torch.tensor(levels, dtype=torch.float32)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0).long(), persistent=False)
        if self.symmetric:  # u = (L - 1) (b + 1) / 2 in [0, L - 1], b the bounded input in [-1, 1]
            half_width = (levels_t - 1) / 2
            center, low = half_width, torch.zeros_like(levels_t)
        else:  # u in -floor(L/2) .. ceil(L/2) - 1, centred on 0
            half_width = torch.div(levels_t, 2, rounding_mode="floor")
            center, low = torch.zeros_like(levels_t), -half_width
            # bound(h) = tanh(h + shift) * half_l - offset, its constants computed once
            half_l = (levels_t - 1) * (1 + eps) / 2
            offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
            self.register_buffer("_half_l", half_l, persistent=False)
            self.register_buffer("_offset", offset, persistent=False)
            self.register_buffer("_shift", torch.atanh(offset / half_l), persistent=False)
        self.register_buffer("_half_width", half_width, persistent=False)
        self.register_buffer("_center", center, persistent=False)
        self.register_buffer("_low", low, persistent=False)

        self.code_dim = code_dim = len(levels) * num_codebooks
        projected = dim != code_dim
        self.project_in = nn.Linear(dim, code_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(code_dim, dim) if projected else nn.Identity()

    def bound(self, h: Tensor) -> Tensor:
        """Squash to grid units, so that rounding gives exactly L values per channel."""
        if self.symmetric:
            # Parker et al. 2024, Sec. 3.2: Q_L(x) = 2 / (L - 1) * floor((L - 1) (tanh(x) + 1) / 2 + 1/2) - 1;
            # this returns the bracket less its 1/2, and round() stands for floor(. + 1/2) (they differ at exact ties only)
            bounded = torch.tanh(h) if self.bound_mode == "tanh" else h.clamp(-1, 1)
            return (bounded + 1) * self._half_width
        # FSQ paper, Appendix A.1: tanh to (-L/2, L/2), shifted so that even L gives L values too
        return torch.tanh(h + self._shift) * self._half_l - self._offset

    def to_codes(self, units: Tensor) -> Tensor:
        """Grid units -> code values in [-1, 1]."""
        return (units - self._center) / self._half_width

    def quantize_rows(self, x: Tensor, weight: Tensor, sample_ids: Tensor):
        h = self.project_in(x).view(x.shape[0], self.num_codebooks, len(self.levels))
        if not self.unit_scale:
            h = h / self._scale
        bounded = self.bound(h)
        rounded = bounded.round()
        codes = self.to_codes(rounded)
        out = straight_through(self.to_codes(bounded), codes) if torch.is_grad_enabled() else codes
        indices = ((rounded.detach() - self._low).long() * self._basis).sum(-1)
        if not self.unit_scale:
            out = out * self._scale
        out = self.project_out(out.reshape(x.shape[0], self.code_dim))
        none = zero(x.device)  # FSQ has no codebook to learn and nothing to commit to
        return out, indices, {"commitment": none, "codebook": none}, none

    def decode_rows(self, indices: Tensor) -> Tensor:
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels.long()
        codes = self.to_codes(digits + self._low)
        return self.project_out((codes * self._scale).reshape(indices.shape[0], self.code_dim))
