"""Codebook health: utilization, perplexity, dead codes, effective rank, per-digit usage.
Reconstruction quality (PSNR, SSIM, LPIPS, rFID, SI-SNR, ...) is `vqtrain.quality`.

Indices come straight from the quantizer: (B, ...) or (B, ..., Q), -1 at
padding, which is never counted. Each index column (a residual level, a group,
an FSQ codebook) is its own codebook; the headline figures average over them.
Counts are summed across ranks (torchmetrics' sync), last-use steps take the max.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vqtrain.distributed import all_reduce_max


def count_codes(indices: Tensor, codebook_sizes: list[int]) -> Tensor:
    """indices (..., Q) or (...) -> int64 counts (Q, max K); -1 ignored.

    A scatter-add into a fixed-size count, not `bincount` or a boolean index:
    those size their output from the data, a host-device sync on a GPU."""
    columns, width = len(codebook_sizes), max(codebook_sizes)
    flat = indices.reshape(-1, columns)
    bins = flat if columns == 1 else flat + torch.arange(columns, device=flat.device) * width
    bins = torch.where(flat >= 0, bins, columns * width).reshape(-1)  # -1 -> one spare bin, dropped
    counts = torch.zeros(columns * width + 1, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, bins, torch.ones_like(bins))[:-1].view(columns, width)


def usage_summary(counts: Tensor, codebook_sizes: list[int]) -> dict[str, Tensor]:
    """Counts (Q, K) over some tokens -> per codebook:

    - utilization: the fraction of the K codes used at least once by those tokens;
    - entropy_utilization: the usage entropy over log K (1 = every code equally often),
      which, unlike a count of codes used, does not grow with the number of tokens;
    - perplexity: exp of the usage entropy, the number of equally used codes it equals;
    - dead_codes: codes not used by those tokens;

    plus their mean over codebooks (a sum for dead codes)."""
    sizes = torch.tensor(codebook_sizes, device=counts.device, dtype=torch.float32)
    counts = counts.float()
    used = (counts > 0).sum(-1).float()
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    per_codebook = {
        "utilization": used / sizes,
        "entropy_utilization": torch.where(sizes > 1, entropy / sizes.log().clamp_min(1e-30), torch.ones_like(sizes)),
        "perplexity": entropy.exp(),
        "dead_codes": sizes - used,
    }
    summary = {name: values.mean() for name, values in per_codebook.items()}
    summary["dead_codes"] = per_codebook["dead_codes"].sum()
    return {**summary, "per_codebook": per_codebook}


class CodebookUsage(Metric):
    """Code counts over a window (an epoch, or a number of training steps).
    `update` takes counts (`count_codes`), so one count serves every tracker."""

    full_state_update = False

    def __init__(self, codebook_sizes: list[int], persistent: bool = False):
        super().__init__()
        self.codebook_sizes = list(codebook_sizes)
        self.add_state(
            "counts",
            torch.zeros(len(codebook_sizes), max(codebook_sizes), dtype=torch.long),
            dist_reduce_fx="sum",
            persistent=persistent,
        )

    def update(self, counts: Tensor) -> None:
        self.counts += counts

    def compute(self) -> dict[str, Tensor]:
        return usage_summary(self.counts, self.codebook_sizes)


class LastUse(nn.Module):
    """The last step each code was used at, kept in checkpoints: a code is dead
    when it went unused for the last `window` steps."""

    def __init__(self, codebook_sizes: list[int], window: int):
        super().__init__()
        if window < 1:
            raise ValueError(f"dead_code_window must be >= 1, got {window}")
        self.codebook_sizes = list(codebook_sizes)
        self.window = window
        self.register_buffer("last_step", torch.full((len(codebook_sizes), max(codebook_sizes)), -1, dtype=torch.long))
        sizes = torch.tensor(codebook_sizes)[:, None]
        self.register_buffer("real_code", torch.arange(max(codebook_sizes))[None] < sizes, persistent=False)

    def update(self, counts: Tensor, step: int) -> None:
        """`counts` from `count_codes` of this step's indices."""
        self.last_step.masked_fill_(counts > 0, step)

    def dead_codes(self, step: int) -> Tensor:
        last = all_reduce_max(self.last_step.clone())
        alive = (last >= 0) & (last > step - self.window)
        return (self.real_code & ~alive).sum()


# --- a second kind of collapse: codes used, but spanning few dimensions -------------


def effective_rank(matrix: Tensor) -> Tensor:
    """Effective rank of a (codes x d) matrix (Roy & Vetterli 2007, EUSIPCO):
    exp of the Shannon entropy of the singular values normalised to sum 1,
    exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j. It is exactly k for k equal
    non-zero singular values, lies in [1, rank] otherwise, and is 0 for a matrix
    without rows or with only zeros. Computed in float64."""
    if matrix.ndim != 2:
        raise ValueError(f"effective_rank expects a 2-d (codes x d) matrix, got shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    s = torch.linalg.svdvals(matrix.detach().double())
    total = s.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64, device=matrix.device)
    p = s / total
    return torch.exp(-(p * p.clamp_min(1e-300).log()).sum())


def used_codes_effective_rank(codebooks: Tensor, counts: Tensor) -> Tensor:
    """codebooks (Q, K, d) or (K, d), counts (Q, K) or (K,) -> float64 (Q,) effective
    rank of each codebook's codes used at least once (the rows with counts > 0).

    A codebook can use every code and still span only a few dimensions; usage
    counts cannot see that, this can. Compare it with the code dimension d."""
    if codebooks.ndim == 2:
        codebooks = codebooks.unsqueeze(0)
    counts = counts.reshape(codebooks.shape[0], -1)
    if counts.shape[1] < codebooks.shape[1]:
        raise ValueError(f"counts cover {counts.shape[1]} codes, the codebook has {codebooks.shape[1]}")
    used = counts[:, : codebooks.shape[1]] > 0
    return torch.stack([effective_rank(codebook[u]) for codebook, u in zip(codebooks, used.to(codebooks.device))])


def digit_counts(counts: Tensor, radices: list[int], most_significant_first: bool = False) -> list[Tensor]:
    """Code counts (K,) of an implicit product codebook -> per digit, counts of each of
    its values: FSQ's levels (mixed radix, first channel least significant, as
    `FSQ.decode_rows`) or LFQ / BSQ bits (radices [2] * B, first channel most significant).

    Returns one int64 tensor of length radices[i] per channel i."""
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 2 for r in radices):
        raise ValueError(f"radices must be integers >= 2, got {radices!r}")
    size = math.prod(radices)
    if counts.ndim != 1 or counts.shape[0] < size:
        raise ValueError(f"counts must be 1-d with at least prod(radices) = {size} entries, got {tuple(counts.shape)}")
    counts = counts[:size]
    order = list(reversed(radices)) if most_significant_first else list(radices)
    strides = [math.prod(order[:i]) for i in range(len(order))]
    codes = torch.arange(size, device=counts.device)
    per_digit = [
        torch.zeros(r, dtype=torch.long, device=counts.device).index_add_(0, (codes // s) % r, counts.long())
        for r, s in zip(order, strides)
    ]
    return list(reversed(per_digit)) if most_significant_first else per_digit


def digit_usage(counts: Tensor, radices: list[int], most_significant_first: bool = False) -> dict[str, Tensor]:
    """Usage of each scalar level (FSQ) or bit (LFQ, BSQ) from code counts (K,):

    - entropy_utilization (C,): per channel, the entropy of its value shares over
      log(its number of values): 1 = all values equally often, 0 = a stuck channel;
    - min_share (C,): per channel, the share of its least used value (0: a value never used);
    - stuck_channels: channels that took a single value (they carry no information);

    plus the mean entropy_utilization over channels."""
    shares = [c.double() / c.sum().clamp_min(1) for c in digit_counts(counts, radices, most_significant_first)]
    entropy_util = torch.stack([-(p * p.clamp_min(1e-300).log()).sum() / math.log(len(p)) for p in shares])
    min_share = torch.stack([p.min() for p in shares])
    stuck = torch.tensor(sum(int((p > 0).sum()) <= 1 for p in shares))
    return {
        "entropy_utilization": entropy_util,
        "min_share": min_share,
        "stuck_channels": stuck,
        "mean_entropy_utilization": entropy_util.mean(),
    }


def code_vectors(quantizer) -> Tensor:
    """(Q, K, d) the codes of each index column in the quantizer's code space (before
    any output projection), for `used_codes_effective_rank`: VQ / SimVQ codebooks,
    IBQ's embedding, FSQ's level grid, LFQ / BSQ's corners {-s, +s}^B. Residual
    quantizers: their levels' codebooks, stacked (levels must have equal K and d)."""
    # BSQ is an LFQ
    from vqtrain.quantizers import FSQ, IBQ, LFQ, ResidualQuantizer, VectorQuantizer

    with torch.no_grad():
        if isinstance(quantizer, ResidualQuantizer):
            return torch.cat([code_vectors(level) for level in quantizer.levels])
        if isinstance(quantizer, VectorQuantizer):
            return quantizer.codebook.detach().clone()
        if isinstance(quantizer, IBQ):
            return quantizer.embed.detach().clone().unsqueeze(0)
        if isinstance(quantizer, LFQ):
            codes = torch.arange(quantizer.num_codes, device=quantizer._powers.device)
            bits = (codes[:, None] >> (quantizer.bits - 1 - torch.arange(quantizer.bits, device=codes.device))) & 1
            corner = torch.where(bits.bool(), quantizer.code_value, -quantizer.code_value)
            return corner.unsqueeze(0).expand(quantizer.num_codebooks, -1, -1).clone()
        if isinstance(quantizer, FSQ):
            codes = torch.arange(quantizer.codebook_sizes[0], device=quantizer._basis.device)
            digits = (codes[:, None] // quantizer._basis) % quantizer._levels.long()
            grid = quantizer.to_codes(digits + quantizer._low) * quantizer._scale
            return grid.unsqueeze(0).expand(quantizer.num_codebooks, -1, -1).clone()
    raise TypeError(f"no code vectors for {type(quantizer).__name__}")
