"""Entropy terms shared by LFQ, BSQ and IBQ, bounded in memory for large codebooks.

MAGVIT-2's entropy penalty (Yu et al. 2023, arXiv:2310.05737, sec. 3.1):

    L_entropy = E_x[ H(q(c | x)) ] - gamma * H( E_x[ q(c | x) ] )

the mean per-sample entropy (pushed down: confident assignments) minus the
entropy of the batch-averaged code distribution (pushed up: every code used).
The expectation E_x is over the real rows of the batch only (rows weighted by the
base's row weights, 0 at padding) and, under DDP, over every rank's rows: the sum of q(c | x) is
all-reduced with a collective whose backward all-reduces the gradient too, so
that two ranks equal one process on the concatenated batch.

Large codebooks: nothing here builds a (rows x codes) matrix. Codes are visited
in chunks of at most `chunk_elements / rows` codes, each chunk under activation
checkpointing when gradients are on, so the backward pass recomputes one chunk
at a time instead of storing all of them.

Entropies are exact (0 log 0 = 0), in nats. vector-quantize-pytorch clamps
probabilities at 1e-5 inside the log, which adds a small bias wherever a
probability falls below 1e-5; the two agree where none does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vqtrain.distributed import is_distributed
from vqtrain.quantizers.base import row_mean

# Float32 elements of one chunk's (rows x codes) matrix: 2^22 = 16 MiB.
DEFAULT_ENTROPY_CHUNK_ELEMENTS = 2**22
TINY = torch.finfo(torch.float32).tiny


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """-sum p log p along `dim`, with 0 log 0 = 0."""
    return -(p * p.clamp_min(TINY).log()).sum(dim)


def binary_entropy_from_logits(a: Tensor) -> Tensor:
    """H(sigmoid(a)) elementwise, stable for any a: p softplus(-a) + (1 - p) softplus(a)."""
    p = torch.sigmoid(a)
    return p * F.softplus(-a) + (1 - p) * F.softplus(a)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradient over ranks as well, because
    every rank's loss depends on every rank's rows through the sum."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(t: Tensor) -> Tensor:
    """`t` summed over ranks (unchanged in a single process), differentiable."""
    if not is_distributed():
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return _AllReduceSum.apply(t)
    t = t.clone()
    dist.all_reduce(t)
    return t


def maybe_checkpoint(fn, *args, enabled: bool = True):
    """`fn(*args)`, recomputed in the backward pass instead of stored when gradients are on
    (and `enabled`: a single chunk is within the bound stored as it is, and faster so)."""
    if enabled and torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def code_bits(start: int, stop: int, num_bits: int, device) -> Tensor:
    """float32 (stop - start, num_bits) bits of the codes start..stop-1, most significant first."""
    shifts = torch.arange(num_bits - 1, -1, -1, device=device)
    return ((torch.arange(start, stop, device=device)[:, None] >> shifts) & 1).float()


def _bit_code_chunk(a: Tensor, base: Tensor, weight: Tensor, start: int, stop: int) -> Tensor:
    """Weighted sum over rows of q(c | x) for the codes start..stop-1, per codebook: (C, stop - start)."""
    bits = code_bits(start, stop, a.shape[-1], a.device)
    log_q = base.unsqueeze(-1) + torch.matmul(a, bits.T)  # (C, N, chunk)
    return torch.matmul(weight, log_q.exp())  # (C, chunk): sum_n w_n q(c | x_n)


def bit_code_probability_sums(
    a: Tensor, weight: Tensor, chunk_elements: int = DEFAULT_ENTROPY_CHUNK_ELEMENTS
) -> Tensor:
    """Bit logits a (N, C, B), row weights (N,) -> (C, 2^B) weighted sums over the N rows of q(c | x).

    For codes that are products of independent bits (LFQ, BSQ) the softmax over all
    2^B codes factorises exactly: q(c | x) = prod_i sigmoid(+-a_i), so
    log q(c | x) = sum_i log sigmoid(-a_i) + <bits(c), a>: one matmul per chunk of codes."""
    num_rows, num_codebooks, num_bits = a.shape
    num_codes = 2**num_bits
    a = a.transpose(0, 1)  # (C, N, B)
    base = F.logsigmoid(-a).sum(-1)  # (C, N): log q of code 0 (all bits 0)
    chunk = max(1, chunk_elements // max(num_rows * num_codebooks, 1))
    several = chunk < num_codes
    parts = [
        maybe_checkpoint(_bit_code_chunk, a, base, weight, s, min(s + chunk, num_codes), enabled=several)
        for s in range(0, num_codes, chunk)
    ]
    return torch.cat(parts, dim=-1)


def bit_entropy_terms(
    a: Tensor,
    weight: Tensor,
    factorized: bool,
    chunk_elements: int = DEFAULT_ENTROPY_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Bit logits a (N, C, B) of N rows weighted by `weight` (N,) -> (per-sample entropy, codebook entropy).

    per-sample: mean over rows and codebooks of H(q(c | x)) = sum_i H(sigmoid(a_i)) (exact).
    codebook: mean over codebooks of H(mean over rows of all ranks of q(c | x)); with
    `factorized`, BSQ's approximation (arXiv:2406.07548): the sum over bits of
    H(mean sigmoid(a_i)), an upper bound that costs O(N B) instead of O(N 2^B)."""
    count = all_reduce_sum_with_grad(weight.sum())
    per_sample = row_mean(binary_entropy_from_logits(a).sum(-1).mean(-1), weight)
    if factorized:
        bit_means = all_reduce_sum_with_grad(torch.einsum("n,ncb->cb", weight, torch.sigmoid(a))) / count.clamp_min(1)
        codebook = (entropy(torch.stack([bit_means, 1 - bit_means], -1)).sum(-1)).mean()
    else:
        sums = bit_code_probability_sums(a, weight, chunk_elements)
        means = all_reduce_sum_with_grad(sums) / count.clamp_min(1)  # (C, 2^B)
        codebook = entropy(means).mean()
    return per_sample, codebook
