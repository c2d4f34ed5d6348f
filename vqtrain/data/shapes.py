"""Procedurally drawn grayscale shapes: the embedded default data (ShapesDataModule)."""

from __future__ import annotations

import torch
from torch import Tensor


def draw_shapes(count: int, image_size: int, seed: int, max_shapes: int = 3, chunk: int = 1024) -> Tensor:
    """uint8 (count, 1, S, S): 1..max_shapes filled circles, squares and upward
    triangles on black, each with random position, size and brightness."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat(
        [_draw_shapes(min(chunk, count - start), image_size, max_shapes, generator) for start in range(0, count, chunk)]
    )


def _draw_shapes(count: int, size: int, max_shapes: int, generator: torch.Generator) -> Tensor:
    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(count, max_shapes, 1, 1, generator=generator)

    radius = uniform(0.1, 0.25) * size
    pixels = torch.arange(size) + 0.5
    dx = pixels - (radius + uniform(0, 1) * (size - 2 * radius))  # (N, K, 1, S): shapes lie fully inside
    dy = pixels[:, None] - (radius + uniform(0, 1) * (size - 2 * radius))  # (N, K, S, 1)
    kind = torch.randint(3, (count, max_shapes, 1, 1), generator=generator)
    brightness = uniform(0.35, 1.0)
    shapes_per_image = torch.randint(1, max_shapes + 1, (count, 1, 1, 1), generator=generator)
    present = torch.arange(max_shapes)[:, None, None] < shapes_per_image

    circle = dx**2 + dy**2 <= radius**2
    square = (dx.abs() <= 0.85 * radius) & (dy.abs() <= 0.85 * radius)
    triangle = (dy.abs() <= radius) & (2 * dx.abs() <= dy + radius)  # apex up, base as wide as the diameter
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle)) & present
    image = (mask * brightness).amax(dim=1, keepdim=True)
    return (image * 255).round().to(torch.uint8)
