"""Index backpropagation quantization (IBQ; Shi et al. 2024, arXiv:2412.02692).

Codes are chosen by the largest logit l_k = <h, e_k>, and the estimator is a
straight-through one-hot over the full softmax:

    one_hot = hard - sg(softmax(l)) + softmax(l),    q = one_hot @ E

so the value is exactly the chosen code e_argmax, and the gradient reaches the
logits of *every* code (hence every code and the latent) through softmax(l); the
codebook itself gets the gradient of the chosen code only, as in the paper's
code. Losses (the paper's "double quantization loss"):
codebook = ||q - sg(h)||^2 (through the one-hot, so it also moves all logits),
commitment = ||h - sg(e_argmax)||^2; loss = codebook_weight * codebook +
commitment_weight * commitment + entropy_weight * entropy, the entropy being LFQ's
over softmax(inv_temperature * l). The class default leaves the entropy off, as
the paper's class does (`use_entropy_loss=False`); configs/quantizer/ibq.yaml
turns it on at 0.05, temperature 0.01, as every published config of the paper
does: without it the latents shrink, the softmax goes flat and the codes in use
churn (docs/quantizers.md, IBQ).

Memory: the softmax is never built for all codes at once. Each pass visits the
codes in chunks of at most `chunk_elements / rows` codes: argmax, logsumexp, the
soft part softmax(l) @ E, the per-sample entropy and the per-code probability
sums are each accumulated chunk by chunk, under activation checkpointing when
gradients are on, so the backward pass recomputes one chunk at a time. Peak extra
memory is O(rows x chunk + rows x d + codes), not O(rows x codes): with 262,144
codes and the default 2^22-element chunk, 16 MiB per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqtrain.quantizers.base import (
    Quantizer,
    check_positive_int,
    check_weight,
    mse,
    row_mean,
    zero,
)
from vqtrain.quantizers.entropy import (
    DEFAULT_ENTROPY_CHUNK_ELEMENTS,
    all_reduce_sum_with_grad,
    entropy,
    maybe_checkpoint,
)
from vqtrain.quantizers.lfq import check_positive
from vqtrain.utils import exists


def _logsumexp_chunk(h: Tensor, codes: Tensor, inv_temperature: float) -> Tensor:
    """(N, 1) logsumexp over these codes of inv_temperature * <h, e>."""
    return torch.logsumexp((h @ codes.T) * inv_temperature, dim=-1, keepdim=True)


def _soft_chunk(h: Tensor, codes: Tensor, lse: Tensor) -> Tensor:
    """(N, d) sum over these codes of softmax(<h, e>)_k e_k (codes as constants)."""
    return torch.exp(h @ codes.T - lse.unsqueeze(-1)) @ codes.detach()


def _entropy_chunk(
    h: Tensor, codes: Tensor, lse: Tensor, weight: Tensor, inv_temperature: float
) -> tuple[Tensor, Tensor]:
    """Per-row -sum p log p (N,) and per-code weighted sum over rows of p (chunk,), p = softmax(tau <h, e>)."""
    log_p = (h @ codes.T) * inv_temperature - lse.unsqueeze(-1)
    p = log_p.exp()
    return -(p * log_p).sum(-1), weight @ p


class IBQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        entropy_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
        chunk_elements: int = DEFAULT_ENTROPY_CHUNK_ELEMENTS,
    ):
        super().__init__(dim)
        self.num_codes = check_positive_int("codebook_size", codebook_size)
        self.weights = {
            "codebook": check_weight("codebook_weight", codebook_weight),
            "commitment": check_weight("commitment_weight", commitment_weight),
            "entropy": check_weight("entropy_weight", entropy_weight),
        }
        self.diversity_gamma = check_weight("diversity_gamma", diversity_gamma)
        self.inv_temperature = check_positive("inv_temperature", inv_temperature)
        self.chunk_elements = check_positive_int("chunk_elements", chunk_elements)
        self.code_dim = check_positive_int("codebook_dim", codebook_dim) if exists(codebook_dim) else dim
        projected = self.code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if projected else nn.Identity()
        self.codebook_sizes = [self.num_codes]
        # the paper's code: nn.Embedding's default N(0, 1) (taming's uniform [-1/K, 1/K] makes every
        # softmax near-uniform at the start; on MNIST it left 9 % of 1024 codes used after 200 steps)
        self.embed = nn.Parameter(torch.randn(self.num_codes, self.code_dim))

    def chunks(self, num_rows: int):
        size = max(1, self.chunk_elements // max(num_rows, 1))
        return [(s, min(s + size, self.num_codes)) for s in range(0, self.num_codes, size)]

    @torch.no_grad()
    def nearest(self, h: Tensor) -> Tensor:
        """(N,) index of the largest logit <h, e_k> (the first among exact ties)."""
        best = torch.full((h.shape[0],), -float("inf"), device=h.device)
        indices = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        for start, stop in self.chunks(h.shape[0]):
            value, index = (h @ self.embed[start:stop].T).max(-1)
            better = value > best  # strict: an earlier chunk keeps a tie
            best = torch.where(better, value, best)
            indices = torch.where(better, index + start, indices)
        return indices

    def logsumexp(self, h: Tensor, inv_temperature: float) -> Tensor:
        chunks = self.chunks(h.shape[0])
        parts = [
            maybe_checkpoint(_logsumexp_chunk, h, self.embed[s:e], inv_temperature, enabled=len(chunks) > 1)
            for s, e in chunks
        ]
        return torch.logsumexp(torch.cat(parts, -1), -1)

    def quantize_rows(self, x: Tensor, weight: Tensor, sample_ids: Tensor):
        h = self.project_in(x)
        indices = self.nearest(h.detach())
        hard = self.embed.index_select(0, indices)  # backward: index_add_, in row order (indexing's is not, threaded)
        q = hard
        if torch.is_grad_enabled():
            # value exactly `hard`: soft - sg(soft) is exactly zero; gradient through the softmax of every code
            lse = self.logsumexp(h, 1.0)
            chunks = self.chunks(h.shape[0])
            soft = sum(
                maybe_checkpoint(_soft_chunk, h, self.embed[s:e], lse, enabled=len(chunks) > 1) for s, e in chunks
            )
            q = hard + (soft - soft.detach())
        losses = {"codebook": mse(q, h.detach(), weight), "commitment": mse(h, hard.detach(), weight)}
        if self.training and self.weights["entropy"] > 0:
            losses.update(self.entropy_terms(h, weight))
        else:
            losses.update(entropy=zero(x.device), per_sample_entropy=zero(x.device), codebook_entropy=zero(x.device))
        return self.project_out(q), indices.unsqueeze(-1), losses, self.weigh(losses, self.weights)

    def entropy_terms(self, h: Tensor, weight: Tensor) -> dict[str, Tensor]:
        """LFQ's entropy penalty over p = softmax(inv_temperature * <h, e>), chunked over codes."""
        tau = self.inv_temperature
        lse = self.logsumexp(h, tau)
        chunks = self.chunks(h.shape[0])
        per_row, sums = zip(
            *(
                maybe_checkpoint(_entropy_chunk, h, self.embed[s:e], lse, weight, tau, enabled=len(chunks) > 1)
                for s, e in chunks
            )
        )
        per_sample = row_mean(sum(per_row), weight)
        count = all_reduce_sum_with_grad(weight.sum())
        means = all_reduce_sum_with_grad(torch.cat(sums)) / count.clamp_min(1)
        codebook = entropy(means)
        return {
            "entropy": per_sample - self.diversity_gamma * codebook,
            "per_sample_entropy": per_sample,
            "codebook_entropy": codebook,
        }

    def decode_rows(self, indices: Tensor) -> Tensor:
        return self.project_out(self.embed[indices[:, 0]])
