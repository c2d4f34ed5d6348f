"""The contract every quantizer keeps, and the pieces they share.

A quantizer sees rows: `Quantizer.forward` flattens `(B, ..., D)` to rows and
applies the mask first: padded rows are set to zero and weigh 0, so padding can
never reach a loss, a gradient, a codebook update or a usage count. The method
runs on every row (fixed shapes: no boolean indexing, no host-device sync on a
GPU) in float32 with autocast off, and every mean, count and statistic it takes
is weighted by the row weights; the output is zero (index -1) at padding.

A non-finite value at a real position is refused with an error outside a
training forward (inference, validation: one host read). In a training forward,
which must not wait on the device, it makes every weight 0 for that step, so
that no statistic moves; the NaN still reaches the loss, where the model sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vqtrain.utils import all_finite, exists, l2norm


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, ..., D), dtype of the input, exactly zero where masked
    indices: Tensor  # int64 (B, ...) or (B, ..., Q), -1 where masked
    losses: dict[str, Tensor]  # raw terms for logging: always "codebook" and "commitment"
    loss: Tensor  # weighted sum of the terms: what the model adds to its objective


def mse(x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """Mean squared error over the rows (dim 0) of `x` and `y`, weighted by
    `weight` (N,); 0, not NaN, when no row weighs anything."""
    return row_mean((x - y).pow(2).flatten(1).sum(-1), weight) / max(math.prod(x.shape[1:]), 1)


class CommitmentAndCodebook(torch.autograd.Function):
    """VQ-VAE's two terms for h and q (G, N, d) and row weights (N,): the commitment
    `mse(h, sg(q))` and the codebook term `mse(sg(h), q)`. Their values are equal, so it is
    computed once, and each term passes its gradient to its own side only: the gradients
    autograd would give, in about half the kernels (a small model's GPU step is bound by
    the host's launches)."""

    @staticmethod
    def forward(ctx, h: Tensor, q: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        diff = h - q
        total_weight = weight.sum().clamp_min(1)
        ctx.size = h.shape[0] * h.shape[2]  # values per row
        value = (diff.pow(2).sum((0, 2)) * weight).sum() / total_weight / ctx.size  # as `mse`, to the bit
        ctx.save_for_backward(diff, weight, total_weight)
        return value, value.clone()

    @staticmethod
    def backward(ctx, commitment_grad: Tensor, codebook_grad: Tensor):
        diff, weight, total_weight = ctx.saved_tensors
        twice = diff * 2

        def toward(grad: Tensor) -> Tensor:  # autograd's order for `mse`, so its bits too
            return (grad / ctx.size / total_weight * weight).view(1, -1, 1) * twice

        h_grad = toward(commitment_grad) if ctx.needs_input_grad[0] else None
        q_grad = toward(codebook_grad).neg_() if ctx.needs_input_grad[1] else None
        return h_grad, q_grad, None


def commitment_and_codebook(h: Tensor, q: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(commitment, codebook) = (mse(h, sg(q)), mse(sg(h), q)) over rows of h, q (G, N, d)."""
    return CommitmentAndCodebook.apply(h, q, weight)


def row_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean of per-row values (N,); 0 when no row weighs anything."""
    return (values * weight).sum() / weight.sum().clamp_min(1)


def real_rows(x: Tensor, weight: Tensor) -> Tensor:
    """`x` (..., N, d) with the rows of weight 0 set to zero: statistics taken from it
    see no padding and no non-finite value (0 x NaN would be NaN)."""
    return torch.where(weight[:, None] > 0, x, 0.0)


def zero(device: torch.device) -> Tensor:
    return torch.zeros((), device=device)


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Value exactly `q`, gradient passed unchanged to `x` (none to `q`)."""
    return q.detach() + (x - x.detach())


class RotationTrick(torch.autograd.Function):
    """Value exactly `q`; gradient to `x` through the rotation and rescaling that
    map `x` onto `q`, treated as constants (Fifty et al. 2024, arXiv:2410.06424):
    d out / d x = s R with R = I - 2 w w^T + 2 v u^T, s = |q| / |x|, u = x / |x|,
    v = q / |q|, w = (u + v) / |u + v|. Written as a function with its own backward,
    so that neither pass builds the rotated vector: a third of autograd's passes."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:
        x_norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        q_norm = q.norm(dim=-1, keepdim=True)
        u = x / x_norm
        v = q / q_norm.clamp_min(1e-12)  # l2norm(q)
        w = l2norm(u + v)
        ctx.save_for_backward(u, v, w, q_norm / x_norm)
        return q.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, v, w, scale = ctx.saved_tensors
        g = grad * scale  # (s R)^T g = s (g - 2 w (w.g) + 2 u (v.g))
        return g - 2 * (g * w).sum(-1, keepdim=True) * w + 2 * (g * v).sum(-1, keepdim=True) * u, None


def rotation_trick(x: Tensor, q: Tensor) -> Tensor:
    """Value exactly `q`; gradient to `x` as if `q` were the rotated, rescaled `x` (see RotationTrick)."""
    return RotationTrick.apply(x, q.detach())


ESTIMATORS = {"ste": straight_through, "rotation": rotation_trick}


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_weight(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


class Quantizer(nn.Module):
    """Base class: masking, dtype handling and output assembly.

    Subclasses implement `quantize_rows` and `decode_rows` on real rows only
    and set `codebook_sizes` (one entry per index column).
    """

    codebook_sizes: list[int]
    compiled_bookkeeping = False  # whether its codebook statistics update runs compiled (`compile_bookkeeping`)

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_positive_int("dim", dim)

    # -- what subclasses provide ------------------------------------------
    def quantize_rows(self, x: Tensor, weight: Tensor, sample_ids: Tensor):
        """float32 (N, D) rows -> (quantized (N, D), indices (N, Q), losses, loss).

        `weight` (N,) is 1 for a real row and 0 for padding (zero rows) or for every
        row of a non-finite input: losses are weighted means, statistics weighted
        sums. `sample_ids` (N,) says which batch item each row came from."""
        raise NotImplementedError

    def decode_rows(self, indices: Tensor) -> Tensor:
        """int64 (N, Q) indices of real rows -> float32 (N, D) codes."""
        raise NotImplementedError

    # -- the shared contract ----------------------------------------------
    @property
    def num_index_columns(self) -> int:
        return len(self.codebook_sizes)

    @property
    def codebook_size(self) -> int:
        """Codes per codebook (per level for residual quantizers)."""
        return self.codebook_sizes[0]

    @property
    def effective_codebook_size(self) -> int:
        """Distinct codes a position can take: the product over index columns."""
        return math.prod(self.codebook_sizes)

    @property
    def updating(self) -> bool:
        """Codebook statistics (EMA, k-means, restarts) change only in a training
        forward with gradients on: never in eval, a sanity check or under no_grad."""
        return self.training and torch.is_grad_enabled()

    def forward(self, z: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        if z.ndim < 2 or z.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects channel-last input (B, ..., {self.dim}), got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise TypeError(f"quantizer input must be floating point, got {z.dtype}")
        lead = z.shape[:-1]
        if exists(mask):
            if mask.dtype != torch.bool or mask.shape != lead:
                raise ValueError(f"mask must be bool of shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(z.device)
        rows = z.reshape(-1, self.dim)
        rows_per_sample = math.prod(lead[1:])
        sample_ids = torch.arange(rows.shape[0], device=z.device) // max(rows_per_sample, 1)
        if exists(mask):
            keep = mask.reshape(-1, 1)
            rows = torch.where(keep, rows, 0.0)  # mask first: nothing of the padding goes further
        # a NaN or Inf must not get a code and poison the codebook statistics: no row of such a step counts
        finite = all_finite(rows)
        if not self.updating and not bool(finite):
            raise FloatingPointError(f"{type(self).__name__} input has NaN or Inf values at real (unmasked) positions")
        weight = keep[:, 0] & finite if exists(mask) else finite.expand(rows.shape[0])

        with torch.autocast(z.device.type, enabled=False):
            quantized, indices, losses, loss = self.quantize_rows(rows.float(), weight.float(), sample_ids)

        quantized = quantized.to(z.dtype)
        if exists(mask):
            quantized = torch.where(keep, quantized, 0.0)
            indices = torch.where(keep, indices, -1)
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=self._shape_indices(indices, lead),
            losses=losses,
            loss=loss,
        )

    def compile_bookkeeping(self) -> None:
        """`model.compile`: torch.compile each codebook's statistics update (EMA, usage,
        restarts), through which no gradient flows. Not the differentiable path: there
        Inductor (torch 2.11) may recompute, in the backward, values from buffers the forward
        has updated since, and give wrong gradients (docs/gpu.md, "Compiled bookkeeping")."""
        for module in self.modules():
            if isinstance(module, Quantizer):
                module.compiled_bookkeeping = True

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices as returned by `forward` -> float32 codes (B, ..., D); zeros where -1.

        In eval mode this is exactly `forward(z).quantized` for float32 `z`."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got {indices.dtype}")  # 2.7 or True would decode as a code
        columns = self.num_index_columns
        if columns > 1 and indices.shape[-1] != columns:
            raise ValueError(f"expected indices with a last dimension of {columns}, got {tuple(indices.shape)}")
        lead = indices.shape[:-1] if columns > 1 else indices.shape
        flat = indices.reshape(-1, columns).long()
        sizes = torch.tensor(self.codebook_sizes, device=flat.device)
        if bool(((flat < -1) | (flat >= sizes)).any()):
            raise IndexError(f"indices must lie in [-1, codebook size) per column, sizes {self.codebook_sizes}")
        valid = (flat >= 0).any(-1)
        codes = torch.zeros(flat.shape[0], self.dim, device=flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            codes[valid] = self.decode_rows(flat[valid])
        return codes.reshape(*lead, self.dim)

    def _shape_indices(self, indices: Tensor, lead) -> Tensor:
        if self.num_index_columns == 1:
            return indices.reshape(lead)
        return indices.reshape(*lead, self.num_index_columns)

    def weigh(self, losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
        """sum_name weights[name] * losses[name], over at least one term (no `0 +` kernel)."""
        terms = [weights[name] * losses[name] for name in weights]
        return sum(terms[1:], terms[0])
