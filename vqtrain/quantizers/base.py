"""The contract every quantizer keeps, and the pieces they share.

A quantizer sees only real rows: `Quantizer.forward` flattens `(B, ..., D)` to
rows, drops the masked ones, runs the method in float32 with autocast off, and
scatters the result back with zeros (and index -1) at padding. Padding can
therefore never reach a loss, a gradient, a codebook update or a usage count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vqtrain.utils import exists, l2norm


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, ..., D), dtype of the input, exactly zero where masked
    indices: Tensor  # int64 (B, ...) or (B, ..., Q), -1 where masked
    losses: dict[str, Tensor]  # raw terms for logging: always "codebook" and "commitment"
    loss: Tensor  # weighted sum of the terms: what the model adds to its objective


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error that is 0, not NaN, over zero rows."""
    return (x - y).pow(2).sum() / max(x.numel(), 1)


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
        u = x / x_norm
        v = l2norm(q)
        w = l2norm(u + v)
        ctx.save_for_backward(u, v, w, q.norm(dim=-1, keepdim=True) / x_norm)
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

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_positive_int("dim", dim)

    # -- what subclasses provide ------------------------------------------
    def quantize_rows(self, x: Tensor, sample_ids: Tensor, num_samples: int):
        """float32 (N, D) real rows -> (quantized (N, D), indices (N, Q), losses, loss).

        `sample_ids` (N,) says which batch item each row came from."""
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
            keep = mask.reshape(-1)
            rows, sample_ids = rows[keep], sample_ids[keep]
        # a NaN or Inf would get some code silently and could poison codebook statistics for good
        # one cheap reduction first: the sum is finite whenever every value is (unless it overflows)
        if not bool(rows.sum().isfinite()) and not bool(torch.isfinite(rows).all()):
            raise FloatingPointError(f"{type(self).__name__} input has NaN or Inf values at real (unmasked) positions")

        with torch.autocast(z.device.type, enabled=False):
            quantized, indices, losses, loss = self.quantize_rows(rows.float(), sample_ids, lead[0])

        quantized = quantized.to(z.dtype)
        if exists(mask):
            full = z.new_zeros(keep.shape[0], self.dim)
            full[keep] = quantized
            quantized = full
            full_indices = indices.new_full((keep.shape[0], indices.shape[1]), -1)
            full_indices[keep] = indices
            indices = full_indices
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=self._shape_indices(indices, lead),
            losses=losses,
            loss=loss,
        )

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
        return sum(weights[name] * losses[name] for name in weights)
