"""Codebook health (utilization, perplexity, dead codes) and signal quality (PSNR, SI-SNR).

Indices come straight from the quantizer: (B, ...) or (B, ..., Q), -1 at
padding, which is never counted. Each index column (a residual level, a group,
an FSQ codebook) is its own codebook; the headline figures average over them.
Counts are summed across ranks (torchmetrics' sync), last-use steps take the max.
"""
from __future__ import annotations

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
    offsets = torch.arange(columns, device=flat.device) * width
    bins = torch.where(flat >= 0, flat + offsets, columns * width).reshape(-1)  # -1 -> one spare bin, dropped
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
        self.add_state("counts", torch.zeros(len(codebook_sizes), max(codebook_sizes), dtype=torch.long), dist_reduce_fx="sum", persistent=persistent)

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


# --- signal quality -----------------------------------------------------------------

def psnr(squared_error: Tensor, samples: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak SNR (dB) of each item from its summed squared error over its sample
    count; images in [-1, 1] have a data range of 2."""
    return 10 * torch.log10(data_range**2 / (squared_error / samples).clamp_min(1e-12))


def si_snr(estimate: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Scale-invariant SNR (dB) of each item over its real samples (weight 1),
    with the zero-mean signals of Le Roux et al. (2019)."""
    weight = weight.flatten(1)
    estimate, target = estimate.flatten(1) * weight, target.flatten(1) * weight
    count = weight.sum(1, keepdim=True).clamp_min(1)
    estimate = estimate - estimate.sum(1, keepdim=True) / count * weight
    target = target - target.sum(1, keepdim=True) / count * weight
    eps = torch.finfo(estimate.dtype).eps
    projection = ((estimate * target).sum(1, keepdim=True) + eps) / (target.pow(2).sum(1, keepdim=True) + eps) * target
    noise = estimate - projection
    return 10 * torch.log10((projection.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))
