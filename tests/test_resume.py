"""Resuming continues as if never stopped: a checkpoint holds the quantizer's
statistics, the usage window, the last-use steps, the optimizer, the loops and
the global random streams (which also draw the next epoch's shuffle).

Stopped mid-epoch, a run resumes with a fresh shuffle for the rest of that epoch
(Lightning 2.6 does not restore a plain DataLoader's position), so only a stop at
an epoch boundary continues exactly."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from test_train import column, read_metrics, run_cli
from vqtrain.config import compose
from vqtrain.train import train

STEPS_PER_EPOCH = 4
# Residual VQ with everything that keeps state or draws random numbers: EMA statistics,
# k-means init, dead-code restarts (global RNG), quantizer dropout (the step counter).
RESUMABLE = [
    "quantizer=rvq", "quantizer.num_levels=2", "quantizer.codebook_size=16", "quantizer.dropout=0.5",
    "quantizer.quantizer.kmeans_init=true", "quantizer.quantizer.dead_code_threshold=0.5",
    "model.latent_dim=8", "model.encoder.hidden_channels=8", "model.decoder.hidden_channels=8",
    "model.usage_window=3", "model.dead_code_window=2",
    f"data.num_train={8 * STEPS_PER_EPOCH}", "data.batch_size=8", "data.num_val=8", "data.num_test=8",
    "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "trainer.deterministic=true", "callbacks.reconstructions=null", "test=false",
    # the learning-rate schedule spans max_steps: a run stopped by a smaller max_steps would differ anyway
    "model.scheduler=null",
]


@pytest.fixture(autouse=True)
def restore_determinism() -> Iterator[None]:
    """trainer.deterministic=true switches torch globally: leave other tests as they were."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def fit(run_dir: Path, steps: int, *overrides: str) -> None:
    train(compose([*RESUMABLE, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", *overrides], run_dir))


def train_rows(run_dir: Path, first_step: int) -> list[dict[str, str]]:
    rows = [r for r in read_metrics(run_dir) if r["train/loss"] and int(r["step"]) >= first_step]
    return [{k: v for k, v in r.items() if k.startswith("train/") or k == "step"} for r in rows]


def test_resume_at_an_epoch_boundary_equals_a_run_never_stopped(tmp_path: Path):
    """The stop falls inside a usage window (steps 3-5) and after k-means and restarts."""
    stop, end = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    fit(tmp_path / "whole", end, f"trainer.val_check_interval={stop}")
    fit(tmp_path / "first", stop)
    fit(tmp_path / "second", end, f"ckpt_path={tmp_path / 'first' / 'last.ckpt'}", f"trainer.val_check_interval={stop}")

    whole, resumed = (torch.load(tmp_path / run / "last.ckpt", weights_only=True) for run in ("whole", "second"))
    assert whole["global_step"] == resumed["global_step"] == end
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key in ("quantizer.step", "quantizer.levels.0.initted", "quantizer.levels.0.embed_sum", "train_usage.counts", "last_use.last_step"):
        assert key in whole["state_dict"], key  # all compared above
    assert whole["rng_states"]["torch"].equal(resumed["rng_states"]["torch"])
    for a, b in zip(whole["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = train_rows(tmp_path / "whole", stop)
    assert len(rows) == end - stop and column(rows, "train/utilization")  # the usage window was logged too
    assert train_rows(tmp_path / "second", stop) == rows


@pytest.mark.slow
def test_requeued_slurm_job_resumes_in_its_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two invocations with the same SLURM_JOB_ID (a requeue) share runs/slurm-<id>; the
    second resumes (resume=auto). Only SLURM_JOB_ID is set: without SLURM_NTASKS
    Lightning does not take the job for an srun-managed one."""
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    tiny = [o for o in RESUMABLE if not o.startswith("trainer.deterministic")]
    first = run_cli(*tiny, "trainer.max_steps=2", "trainer.val_check_interval=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*tiny, "trainer.max_steps=4", "trainer.val_check_interval=2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name == "slurm-4243"
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 4
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r["train/loss"]]
    assert steps[-2:] == [2, 3] and len(steps) == len(set(steps))  # the second run trained steps 2 and 3 only
