"""Residual quantization (SoundStream, Zeghidour et al. 2021): level l quantizes
what levels < l left over, and the output is the sum of the levels' codes.

Any base quantizer works (`rvq` of VQ, `rsimvq` of SimVQ, `rfsq` of FSQ with
per-level scaling). Quantizer dropout trains every prefix of levels so that
decoding from the first k levels works (bitrate scalability); its random
depth comes from (seed, step[, rank]), so ranks never need to talk about it.
Every level runs on every rank at every step (possibly on zero rows), so
levels' collective operations always match across ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vqtrain.distributed import rank
from vqtrain.quantizers.base import Quantizer, check_choice, check_positive_int, zero
from vqtrain.quantizers.fsq import FSQ, fsq_levels
from vqtrain.utils import exists, hashed_uniform


class ResidualQuantizer(Quantizer):
    def __init__(
        self,
        dim: int,
        quantizer: Callable[..., Quantizer] | None = None,
        num_levels: int = 8,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        shared_codebook: bool = False,
        dropout: float = 0.0,
        dropout_min_levels: int = 1,
        dropout_mode: str = "sample",
        seed: int = 0,
    ):
        super().__init__(dim)
        self.num_levels = check_positive_int("num_levels", num_levels)
        self.code_dim = check_positive_int("codebook_dim", codebook_dim) if exists(codebook_dim) else dim
        projected = self.code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if projected else nn.Identity()

        self.level_factory = quantizer
        self.level_kwargs = {} if codebook_size is None else {"codebook_size": codebook_size}
        levels = (
            [self.make_level(0)] * num_levels if shared_codebook else [self.make_level(i) for i in range(num_levels)]
        )
        self.levels = nn.ModuleList(levels)
        if any(level.num_index_columns != 1 for level in self.levels):
            raise ValueError("residual levels must have one codebook each (groups=1, num_codebooks=1)")
        self.codebook_sizes = [level.codebook_size for level in self.levels]

        if not (0.0 <= dropout <= 1.0):
            raise ValueError(f"quantizer dropout must lie in [0, 1], got {dropout}")
        if not (1 <= dropout_min_levels <= num_levels):
            raise ValueError(f"dropout_min_levels must lie in [1, num_levels={num_levels}], got {dropout_min_levels}")
        self.dropout = float(dropout)
        self.dropout_min_levels = dropout_min_levels
        self.dropout_mode = check_choice("dropout_mode", dropout_mode, {"sample", "batch"})
        self.seed = int(seed)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    def make_level(self, level: int) -> Quantizer:
        if self.level_factory is None:
            raise ValueError("ResidualQuantizer needs `quantizer`: a factory for its levels (a Hydra _partial_)")
        return self.level_factory(dim=self.code_dim, **self.level_kwargs)

    def first_residual(self, x: Tensor) -> Tensor:
        """What level 0 quantizes: the projected input."""
        return self.project_in(x)

    def depths(self, sample_ids: Tensor) -> Tensor | None:
        """Levels used per row in this training step, or None for all of them: drawn on the
        device from (seed, step[, rank, sample]), independent of every random generator."""
        if not (self.training and self.dropout > 0):
            return None
        per_sample = self.dropout_mode == "sample"
        sample = sample_ids if per_sample else torch.zeros_like(sample_ids)
        where = rank() if per_sample else 0
        drop = hashed_uniform(self.seed, self.step, where, sample, 0) < self.dropout
        low, high = self.dropout_min_levels, self.num_levels
        depth = low + (hashed_uniform(self.seed, self.step, where, sample, 1) * (high - low + 1)).long()
        return torch.where(drop, depth.clamp_max(high), high)

    def quantize_rows(self, x: Tensor, weight: Tensor, sample_ids: Tensor):
        """Every level runs on every row (fixed shapes); rows a level drops weigh 0 there,
        and it adds nothing to them (index -1)."""
        depth = self.depths(sample_ids)
        if self.updating:
            self.step += 1
        residual = self.first_residual(x)
        total = torch.zeros_like(residual)
        indices = []
        losses = {"commitment": zero(x.device), "codebook": zero(x.device)}
        loss = zero(x.device)
        for i, level in enumerate(self.levels):
            active = None if depth is None else (depth > i)[:, None]
            level_weight = weight if active is None else weight * active[:, 0]
            out, idx, level_losses, level_loss = level.quantize_rows(residual, level_weight, sample_ids)
            if active is not None:
                out, idx = torch.where(active, out, 0.0), torch.where(active, idx, -1)
            total = total + out
            indices.append(idx[:, 0])
            residual = residual - out.detach()
            for name, value in level_losses.items():
                losses[f"{name}/level{i}"] = value
            losses["commitment"] = losses["commitment"] + level_losses["commitment"]
            losses["codebook"] = losses["codebook"] + level_losses["codebook"]
            loss = loss + level_loss
        return self.project_out(total), torch.stack(indices, -1), losses, loss

    def decode_rows(self, indices: Tensor, num_levels: int | None = None) -> Tensor:
        total = torch.zeros(indices.shape[0], self.code_dim, device=indices.device)
        for i, level in enumerate(self.levels[: num_levels or self.num_levels]):
            used = indices[:, i] >= 0
            total = total.index_put((used,), total[used] + level.decode_rows(indices[used, i : i + 1]))
        return self.project_out(total)

    def indices_to_codes(self, indices: Tensor, num_levels: int | None = None) -> Tensor:
        """Decode with the first `num_levels` levels only (all by default)."""
        if exists(num_levels):
            if not (1 <= num_levels <= self.num_levels):
                raise ValueError(f"num_levels must lie in [1, {self.num_levels}], got {num_levels}")
            if num_levels < self.num_levels:  # (a single level has no level dimension to cut)
                indices = indices.clone()
                indices[..., num_levels:] = -1
        return super().indices_to_codes(indices)


class ResidualFSQ(ResidualQuantizer):
    """Residual FSQ: level l quantizes the residual divided by a per-channel
    scale s^l, so later levels resolve ever finer detail of the same range.

    The scale rule follows from the grid: each level's L values, scaled by s,
    must cover the error the level before can leave, one of its cells.

    - standard grid (`symmetric: false`): each level bounds its input with tanh,
      so a level's codes span [-1, 1], and an input inside that span is left
      with an error of at most half a step, 1 / (L - 1) for odd L; the next
      level's [-1, 1] scaled by s = 1 / (L - 1) is that error's range: scales
      (L - 1)^-l. The input itself is not bounded (the tanh saturates instead),
      and for even L the grid is asymmetric, so the fit is only approximate.
    - symmetric grid (`symmetric: true`, arXiv:2411.19842 Sec. 3.2): the L
      values 2k / (L - 1) - 1 are the centres of L cells of width 2 / (L - 1)
      that tile [-c, c], c = L / (L - 1). The input is bounded once, softly, to
      that range, c tanh(x / c); each level then only clamps to its outer values
      (a clamp, not a tanh: a tanh would bend the already bounded residual). A
      residual lies in one cell, and the next level's whole tiling 2c, scaled by
      s = (2 / (L - 1)) / 2c = 1 / L, is exactly that cell: scales L^-l. No part
      of a cell is clipped, none of the next level's codes lies outside it.
    """

    def __init__(
        self,
        dim: int,
        levels: list[int] | None = None,
        num_levels: int = 4,
        codebook_size: int | None = None,
        symmetric: bool = False,
        **kwargs,
    ):
        self.fsq_levels = fsq_levels(levels, codebook_size)
        self.symmetric = bool(symmetric)
        super().__init__(dim, num_levels=num_levels, codebook_dim=len(self.fsq_levels), **kwargs)
        levels_t = torch.tensor(self.fsq_levels, dtype=torch.float32)
        self.register_buffer("_input_bound", levels_t / (levels_t - 1), persistent=False)

    def level_scale(self, level: int) -> list[float]:
        """Per-channel scale of `level`: L^-level on the symmetric grid, (L - 1)^-level on the standard one."""
        return [(size if self.symmetric else size - 1) ** -level for size in self.fsq_levels]

    def make_level(self, level: int) -> Quantizer:
        bound = "clamp" if self.symmetric else "tanh"
        return FSQ(self.code_dim, self.fsq_levels, scale=self.level_scale(level), symmetric=self.symmetric, bound=bound)

    def first_residual(self, x: Tensor) -> Tensor:
        """The projected input, on the symmetric grid softly bounded to [-c, c], c = L / (L - 1)."""
        h = self.project_in(x)
        if not self.symmetric:
            return h
        return torch.tanh(h / self._input_bound) * self._input_bound
