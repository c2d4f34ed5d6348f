"""Nearest-code search and k-means, batched over groups and chunked over rows.

The search is one matmul per chunk: argmin_k ||c_k||^2 - 2 x.c_k (||x||^2 does
not change the argmin). Chunking bounds the (rows x codes) score matrix, so a
65,536-code codebook never materialises a full tokens x codes matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Float32 elements of one chunk's score matrix: 2^24 = 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**24


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, cosine: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """x (G, N, d), codebook (G, K, d) -> int64 (G, N) index of the nearest code.

    For cosine distance both sides must already be l2-normalised."""
    groups, num_rows, _ = x.shape
    num_codes = codebook.shape[1]
    indices = torch.empty(groups, num_rows, dtype=torch.long, device=x.device)
    if num_rows == 0:
        return indices
    codebook_t = codebook.transpose(1, 2)
    if cosine:  # maximise x.c
        bias, alpha = torch.zeros(groups, 1, num_codes, device=x.device, dtype=x.dtype), -1.0
    else:
        bias, alpha = codebook.pow(2).sum(-1).unsqueeze(1), -2.0
    chunk = max(1, chunk_elements // (groups * num_codes))
    for start in range(0, num_rows, chunk):
        part = x[:, start : start + chunk]
        scores = torch.baddbmm(bias, part, codebook_t, alpha=alpha)
        indices[:, start : start + chunk] = scores.argmin(-1)
    return indices


def gather_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook (G, K, d), indices (G, N) -> (G, N, d); differentiable in the codebook."""
    groups = torch.arange(codebook.shape[0], device=indices.device)[:, None]
    return codebook[groups, indices]


def bincount_groups(indices: Tensor, num_codes: int) -> Tensor:
    """indices (G, N) -> float32 counts (G, K)."""
    groups = indices.shape[0]
    offsets = torch.arange(groups, device=indices.device)[:, None] * num_codes
    return torch.bincount((indices + offsets).reshape(-1), minlength=groups * num_codes).view(groups, num_codes).float()


def sum_by_code(x: Tensor, indices: Tensor, num_codes: int) -> Tensor:
    """x (G, N, d), indices (G, N) -> (G, K, d) sums of the rows assigned to each code."""
    groups, _, dim = x.shape
    offsets = torch.arange(groups, device=indices.device)[:, None] * num_codes
    sums = x.new_zeros(groups * num_codes, dim)
    sums.index_add_(0, (indices + offsets).reshape(-1), x.reshape(-1, dim))
    return sums.view(groups, num_codes, dim)


@torch.no_grad()
def kmeans(x: Tensor, num_codes: int, iters: int, cosine: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means per group. x (G, N, d) with N >= 1 -> (centroids (G, K, d), counts (G, K)).

    With fewer rows than codes the starting centroids repeat rows (sampled with
    replacement); empty clusters keep their previous centroid."""
    groups, num_rows, _ = x.shape
    if num_rows >= num_codes:
        start = torch.stack([torch.randperm(num_rows, generator=generator)[:num_codes] for _ in range(groups)])
    else:
        start = torch.randint(num_rows, (groups, num_codes), generator=generator)
    centroids = gather_codes(x, start.to(x.device))
    counts = torch.zeros(groups, num_codes, device=x.device)
    for _ in range(iters):
        assign = nearest_codes(x, centroids, cosine=cosine)
        counts = bincount_groups(assign, num_codes)
        sums = sum_by_code(x, assign, num_codes)
        updated = sums / counts.clamp_min(1).unsqueeze(-1)
        if cosine:
            updated = torch.nn.functional.normalize(updated, dim=-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, updated, centroids)
    return centroids, counts
