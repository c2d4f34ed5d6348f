"""What several test modules share: the quantizer configs, a CLI run, the metrics a run logged, FSDD batches."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch

from vqtrain.utils import lengths_to_mask

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


def fsdd_batch(root: Path, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch (B, 1, T) of real clips of different lengths, and its mask."""
    files = sorted(root.glob("*.wav"))[:: 500 // count][:count]
    clips = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]
    lengths = torch.tensor([len(c) for c in clips])
    assert len(set(lengths.tolist())) == count, "want clips of different lengths"
    x = torch.zeros(count, 1, int(lengths.max()))
    for i, clip in enumerate(clips):
        x[i, 0, : len(clip)] = clip
    return x, lengths_to_mask(lengths, x.shape[-1])
