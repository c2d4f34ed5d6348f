"""Nearest-code search and k-means, batched over groups and chunked over rows.

The search is one matmul per chunk: argmin_k ||c_k||^2 - 2 x.c_k (||x||^2 does
not change the argmin). Chunking bounds the (rows x codes) score matrix, so a
65,536-code codebook never materialises a full tokens x codes matrix. The chunk
is sized for the device (`chunk_elements_for`): on CPU for the cache, on a GPU
for its free memory, so that a large search is a handful of launches. On CPU
the bias ||c_k||^2 rides in the matmul as an extra input column of ones (no
separate pass over the scores) and the argmin runs in two vectorised stages.

Counts and sums by code are scatter-adds into fixed-size buffers (no
`bincount`, whose output size depends on the data: a host-device sync on CUDA).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# Float32 elements of one chunk's score matrix on CPU: 2^22 = 16 MiB. Small enough
# to stay in cache between the matmul and the argmin, large enough (64 rows at
# 65,536 codes) to keep the matmul efficient.
DEFAULT_CHUNK_ELEMENTS = 2**22
# On a GPU: a sixteenth of the free memory, between 16 MiB and 2^28 elements (1 GiB),
# so that 16,384 rows x 65,536 codes take four launches.
GPU_CHUNK_ELEMENTS = (2**22, 2**28)


@functools.cache
def chunk_elements_for(device: torch.device) -> int:
    """Score-matrix elements per chunk on `device` (read once per device)."""
    if device.type != "cuda":
        return DEFAULT_CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    low, high = GPU_CHUNK_ELEMENTS
    return int(min(max(free // 16 // 4, low), high))


# Codes per block of the two-stage argmin on CPU (see `argmin_last`).
ARGMIN_BLOCK = 128


@torch.no_grad()
def nearest_codes(x: Tensor, codebook: Tensor, cosine: bool = False, chunk_elements: int | None = None) -> Tensor:
    """x (G, N, d), codebook (G, K, d) -> int64 (G, N) index of the nearest code
    (the first one among exact ties). `chunk_elements`: the device's size when None.

    For cosine distance both sides must already be l2-normalised."""
    if chunk_elements is None:
        chunk_elements = chunk_elements_for(x.device)
    groups, num_rows, dim = x.shape
    num_codes = codebook.shape[1]
    indices = torch.empty(groups, num_rows, dtype=torch.long, device=x.device)
    if num_rows == 0:
        return indices
    # score_k = x.(-2 c_k) + ||c_k||^2  (cosine: x.(-c_k))
    weights = codebook.transpose(1, 2) * (-1.0 if cosine else -2.0)  # (G, d, K)
    bias = None if cosine else codebook.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
    block = num_codes
    if x.device.type == "cpu":
        # [x, 1] . [-2 c_k, ||c_k||^2]; codes padded to whole argmin blocks score +inf, never chosen
        block = min(ARGMIN_BLOCK, num_codes)
        folded = weights.new_zeros(groups, dim + 1, -(-num_codes // block) * block)
        folded[:, :dim, :num_codes] = weights
        if bias is not None:
            folded[:, dim:, :num_codes] = bias
        folded[:, dim, num_codes:] = float("inf")
        weights, bias = folded, None
        x = torch.cat([x, x.new_ones(groups, num_rows, 1)], dim=-1)
    width = weights.shape[-1]
    chunk = min(num_rows, max(1, chunk_elements // (groups * width)))
    buffer = x.new_empty(groups * chunk * width)  # one score buffer, reused by every chunk
    for start in range(0, num_rows, chunk):
        part = x[:, start : start + chunk]
        scores = buffer[: groups * part.shape[1] * width].view(groups, part.shape[1], width)
        if bias is None:
            torch.bmm(part, weights, out=scores)
        else:  # the bias added in float32 even where the matmul itself runs in TF32
            torch.baddbmm(bias, part, weights, out=scores)
        indices[:, start : start + chunk] = argmin_last(scores, block)
    return indices


def argmin_last(scores: Tensor, block: int) -> Tensor:
    """`scores.argmin(-1)` (first index among ties) for a last dimension that is a
    multiple of `block`, in two stages: the minimum of every block, the first block
    holding the overall minimum, then the argmin within that block alone. On CPU
    this is several times faster than `Tensor.argmin`, whose kernel is not
    vectorised (`amin` is)."""
    if scores.shape[-1] == block:
        return scores.argmin(-1)
    blocks_per_row = scores.shape[-1] // block
    blocks = scores.reshape(-1, blocks_per_row, block)
    best = blocks.amin(-1).argmin(-1)
    rows = torch.arange(best.shape[0], device=best.device).mul_(blocks_per_row).add_(best)
    within = blocks.view(-1, block).index_select(0, rows).argmin(-1)
    return best.mul_(block).add_(within).view(scores.shape[:-1])


def gather_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """codebook (G, K, d), indices (G, N) -> (G, N, d); differentiable in the codebook.

    One `index_select` over the flattened codebooks: faster than advanced indexing,
    forward and backward (index_add_ instead of a sorting index_put_)."""
    groups, num_codes, dim = codebook.shape
    rows = codebook.reshape(groups * num_codes, dim).index_select(0, flat_indices(indices, num_codes))
    return rows.view(*indices.shape, dim)


def flat_indices(indices: Tensor, num_codes: int) -> Tensor:
    """(G, N) indices into G codebooks of `num_codes` -> (G * N,) indices into them stacked
    (no offsets for one codebook: every op counts when a GPU waits for the host to launch it)."""
    if indices.shape[0] == 1:
        return indices.reshape(-1)
    offsets = torch.arange(indices.shape[0], device=indices.device)[:, None] * num_codes
    return (indices + offsets).reshape(-1)


def count_by_code(indices: Tensor, num_codes: int, weight: Tensor | None = None) -> Tensor:
    """indices (G, N) -> float32 (G, K) counts (sums of the rows' `weight` (N,), if given).
    Exact: sums of 0s and 1s stay integers, in any order."""
    groups, num_rows = indices.shape
    if weight is None:
        values = torch.ones(groups * num_rows, device=indices.device)
    else:
        values = weight if groups == 1 else weight.repeat(groups)
    counts = torch.zeros(groups * num_codes, device=indices.device)
    return counts.index_add_(0, flat_indices(indices, num_codes), values).view(groups, num_codes)


def sum_by_code(x: Tensor, indices: Tensor, num_codes: int) -> Tensor:
    """x (G, N, d), indices (G, N) -> (G, K, d) sums of the rows assigned to each code."""
    groups, _, dim = x.shape
    sums = x.new_zeros(groups * num_codes, dim)
    sums.index_add_(0, flat_indices(indices, num_codes), x.reshape(-1, dim))
    return sums.view(groups, num_codes, dim)


@torch.no_grad()
def kmeans(x: Tensor, fallback: Tensor, iters: int, cosine: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means per group. x (G, N, d) with N >= 1, fallback (G, K, d) ->
    (centroids (G, K, d), counts (G, K)).

    Codes start on distinct rows, so no two codes are ever identical: twin codes
    would split their points by float rounding, which depends on the batch shape.
    With fewer distinct rows than codes, every distinct row becomes a code and the
    surplus codes keep their `fallback` values (distinct, and restarted later as
    dead codes). Empty clusters keep their previous centroid."""
    centroids = fallback.clone()
    for g in range(x.shape[0]):
        rows = x[g].unique(dim=0)  # sorted: the order does not depend on the batch layout
        take = min(rows.shape[0], centroids.shape[1])
        start = torch.randperm(rows.shape[0], generator=generator)[:take].to(x.device)
        centroids[g, :take] = rows[start]
    counts = torch.zeros(centroids.shape[:2], device=x.device)
    for _ in range(iters):
        assign = nearest_codes(x, centroids, cosine=cosine)
        counts = count_by_code(assign, centroids.shape[1])
        sums = sum_by_code(x, assign, centroids.shape[1])
        updated = sums / counts.clamp_min(1).unsqueeze(-1)
        if cosine:
            updated = torch.nn.functional.normalize(updated, dim=-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, updated, centroids)
    return centroids, counts
