"""What several test modules share: the quantizer configs, a CLI run, the metrics a run logged, FSDD batches,
the check of the model's logging steps against Lightning's, the fuzzers' damage and summary line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch import Callback

from vqtrain.utils import lengths_to_mask

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real MNIST and FSDD, never copied into the repository
# the shapes data, validated every 2 steps, every validation's step<N>.ckpt kept (conftest's tiny_run)
TINY_RUN = [
    *("debug=tiny", "trainer.val_check_interval=2", "test=false", "quantizer.codebook_size=64"),
    *("data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=16"),
    "callbacks.model_checkpoint.save_top_k=-1",
]
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


class LoggingDecisions(Callback):
    """Per training batch, the model's answers to `logging_step("train")`, beside a probe
    logged on every batch, which Lightning writes only on the batches it decides to log
    (see `check_logging_decisions`). Batch number `nonfinite` is made NaN, so that a run
    with model.nonfinite=skip trains a batch that steps no optimiser."""

    def __init__(self, nonfinite: int | None = None):
        self.nonfinite, self.answers = nonfinite, []

    def on_fit_start(self, trainer, pl_module) -> None:
        ask = pl_module.logging_step

        def recorded(stage: str) -> bool:
            answer = ask(stage)
            if stage == "train":
                self.answers[-1].append(answer)
            return answer

        pl_module.logging_step = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.answers.append([])
        if len(self.answers) - 1 == self.nonfinite:
            batch.x.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        pl_module.log("probe", float(len(self.answers) - 1), on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"answers": self.answers, "global_step": trainer.global_step}
        (Path(trainer.default_root_dir) / "logging_decisions.json").write_text(json.dumps(record))


def check_logging_decisions(run_dir: Path, every: int) -> tuple[int, int]:
    """The model logged on exactly the batches Lightning wrote (the probe's rows): every
    `every`-th batch, the skipped one counted. Returns the number of batches and the final global_step."""
    record = json.loads((run_dir / "logging_decisions.json").read_text())
    assert all(answers and len(set(answers)) == 1 for answers in record["answers"]), record["answers"]
    decided = [answers[0] for answers in record["answers"]]
    written = sorted(int(row["step"]) for row in read_metrics(run_dir) if row.get("probe"))
    assert [batch for batch, answer in enumerate(decided) if answer] == written
    assert decided == [(batch + 1) % every == 0 for batch in range(len(decided))]
    return len(decided), record["global_step"]


# --- fuzzing ------------------------------------------------------------------------------


def truncate(rng: np.random.Generator, whole: bytes) -> bytes:
    return whole[: int(rng.integers(0, len(whole)))]


def mutate(rng: np.random.Generator, whole: bytes, span: int | None = None) -> bytes:
    """`whole` with 1-7 bytes overwritten at random, among its first `span` (default: anywhere)."""
    content = bytearray(whole)
    for spot in rng.integers(0, min(len(content), span or len(content)), int(rng.integers(1, 8))):
        content[spot] = int(rng.integers(0, 256))
    return bytes(content)


def write_outcomes(request: pytest.FixtureRequest, outcomes: Counter, what: str) -> None:
    """One line in the terminal summary with the number of fuzz cases and how they ended."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and outcomes:
        ends = ", ".join(f"{target} {end}: {count}" for (target, end), count in sorted(outcomes.items()))
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz: {sum(outcomes.values())} {what} ({ends})")
