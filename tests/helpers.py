"""What several test modules share: the quantizer configs, a CLI run, the metrics a run logged."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real MNIST and FSDD, never copied into the repository
QUANTIZERS = sorted(path.stem for path in (REPO / "configs" / "quantizer").glob("*.yaml"))  # every quantizer config


def run_cli(*overrides: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python train.py OVERRIDES` in `cwd` (the run directory's root), wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "VQTRAIN_ROOT": str(cwd)}
    env.pop("VQTRAIN_RUN_ID", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


class RandomPerceptual(torch.nn.Module):
    """A stand-in for LPIPS in tests (no weights to download): the mean squared
    distance of unit-normalised features of two random convs, per image (B,).
    Random weights, stated as such; fixed (buffers, not parameters)."""

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(channels, 3, 3, 3, generator=generator) / 3, persistent=False)
        self.register_buffer("w2", torch.randn(channels, channels, 3, 3, generator=generator) / 8, persistent=False)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([x_hat, x]).expand(-1, 3, -1, -1) if x.shape[1] == 1 else torch.cat([x_hat, x])
        h1 = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(both, self.w1, padding=1), 0.2)
        h2 = torch.nn.functional.leaky_relu(torch.nn.functional.conv2d(h1, self.w2, stride=2, padding=1), 0.2)
        distance = 0
        for h in (h1, h2):
            fake, real = torch.nn.functional.normalize(h, dim=1).chunk(2)
            distance = distance + (fake - real).pow(2).sum(1).mean((-2, -1))
        return distance
