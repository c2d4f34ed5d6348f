"""Resuming continues as if never stopped: a checkpoint holds the quantizer's
statistics, the usage window, the last-use steps, the optimizer, the schedule,
the loops, the global random streams and how far into its epoch training was
(the batch order is drawn from the seed and the epoch, so the rest of the epoch
is known)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate

from helpers import column, read_metrics, run_cli
from vqtrain.config import compose
from vqtrain.model import WarmupCosine
from vqtrain.train import train

STEPS_PER_EPOCH = 4  # shapes
USAGE_FIGURES = (
    "train/utilization",
    "train/entropy_utilization",
    "train/perplexity",
    "train/dead_codes",
    "train/effective_rank",
)
# debug=tiny (data-agnostic: shapes or audio below) and a residual VQ with everything that keeps
# state or draws random numbers: EMA statistics, k-means init, dead-code restarts (global RNG),
# quantizer dropout (the step counter); a learning rate that warms up and decays, so that a
# resumed schedule is checked; deterministic kernels, so that runs compare bitwise.
RESUMABLE = [
    "debug=tiny",
    "quantizer=rvq",
    "quantizer.num_levels=2",
    "quantizer.codebook_size=16",
    "quantizer.dropout=0.5",
    "quantizer.quantizer.kmeans_init=true",
    "quantizer.quantizer.dead_code_threshold=0.5",
    "model.usage_window=3",  # the first runs stop (steps 4, 6) inside a usage window
    "model.dead_code_window=2",
    "model.scheduler.warmup_steps=2",
    "model.scheduler.min_lr_ratio=0.1",
    "trainer.deterministic=true",
    "test=false",
]
SHAPES = [f"data.num_train={8 * STEPS_PER_EPOCH}", "data.batch_size=8", "data.num_val=8", "data.num_test=8"]


@pytest.fixture(autouse=True)
def restore_determinism() -> Iterator[None]:
    """trainer.deterministic=true switches torch globally: leave other tests as they were."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def fit(run_dir: Path, steps: int, *overrides: str) -> None:
    train(compose([*RESUMABLE, f"trainer.max_steps={steps}", *overrides], run_dir))


def audio_data(root: Path) -> list[str]:
    """Noise clips of 30-120 ms, cropped at random to 50 ms in training (the global random stream)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(40):
        sf.write(root / f"clip{i}.wav", 0.1 * rng.standard_normal(int(rng.integers(240, 960))).astype(np.float32), 8000)
    return [
        "data=audio_folder",
        f"data.root={root}",
        f"data.cache_dir={root.parent / 'cache'}",
        "data.sample_rate=8000",
        "data.max_length=0.05",
        "data.batch_size=8",
        "data.split.val_fraction=0.2",
    ]


def train_rows(run_dir: Path, first_step: int) -> list[dict[str, str]]:
    rows = [r for r in read_metrics(run_dir) if r["train/loss"] and int(r["step"]) >= first_step]
    return [{k: v for k, v in r.items() if k.startswith("train/") or k in ("step", "epoch")} for r in rows]


def validations(run_dir: Path, first_step: int) -> list[tuple[str, str]]:
    return [
        (r["step"], r["val/loss"]) for r in read_metrics(run_dir) if r.get("val/loss") and int(r["step"]) >= first_step
    ]


@pytest.mark.parametrize("data", ["shapes", "audio"])
@pytest.mark.parametrize("where", ["epoch-boundary", "mid-epoch"])
@pytest.mark.parametrize("validated", [False, True], ids=["unvalidated-stop", "validated-stop"])
def test_resume_equals_a_run_never_stopped(validated: bool, where: str, data: str, tmp_path: Path):
    """`max_steps` stops the first run inside a usage window and after k-means and
    restarts; a second run continues it with a larger `max_steps`. Unvalidated,
    the stop comes before any validation (as with the default val_check_interval):
    last.ckpt is the one written when training ends. Mid-epoch, the continued run
    must train on the rest of that epoch's batches, in their order. The cosine
    ends at the long run's end in all three runs (model.scheduler.total_steps)."""
    data_overrides = audio_data(tmp_path / "audio") if data == "audio" else SHAPES
    datamodule = instantiate(compose([*RESUMABLE, *data_overrides], tmp_path / "probe").data)
    datamodule.setup("fit")
    steps_per_epoch = len(datamodule.train_dataloader())
    assert steps_per_epoch >= 3
    stop = steps_per_epoch + (2 if where == "mid-epoch" else 0)
    end = 3 * steps_per_epoch
    overrides = [
        *data_overrides,
        f"model.scheduler.total_steps={end}",
        f"trainer.val_check_interval={stop if validated else stop + 1}",
    ]
    fit(tmp_path / "whole", end, *overrides)
    fit(tmp_path / "first", stop, *overrides)
    fit(tmp_path / "second", end, *overrides, f"ckpt_path={tmp_path / 'first' / 'last.ckpt'}")
    assert_same_run(tmp_path / "whole", tmp_path / "second", stop, end)


def test_resume_auto_past_a_truncated_last_checkpoint_equals_a_run_never_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A copy of a run directory whose last.ckpt was cut short (a partial copy):
    resume=auto skips it, named, and continues from the validation's
    step<stop>.ckpt, as the run that was never stopped went on from there."""
    stop, end = STEPS_PER_EPOCH + 2, 3 * STEPS_PER_EPOCH
    overrides = [*SHAPES, f"model.scheduler.total_steps={end}", f"trainer.val_check_interval={stop}"]
    fit(tmp_path / "whole", end, *overrides)
    fit(tmp_path / "first", stop, *overrides)
    resumed = Path(shutil.copytree(tmp_path / "first", tmp_path / "resumed"))
    last = resumed / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with caplog.at_level(logging.INFO):
        fit(resumed, end, *overrides)
    assert f"skipped an unreadable checkpoint: {last}: truncated" in caplog.text
    assert f"resuming from {resumed / f'step{stop:07d}.ckpt'}" in caplog.text
    trained = [int(row["step"]) for row in read_metrics(resumed) if row["train/loss"]]
    assert trained == list(range(end))  # steps 0 to stop - 1 by the first run, the rest once: not from scratch
    assert_same_run(tmp_path / "whole", resumed, stop, end)


def assert_same_run(whole_dir: Path, resumed_dir: Path, stop: int, end: int) -> None:
    """The resumed run's last checkpoint and its rows from `stop` on are those of the run never stopped."""
    whole, resumed = (torch.load(run / "last.ckpt", weights_only=True) for run in (whole_dir, resumed_dir))
    assert whole["global_step"] == resumed["global_step"] == end
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key in (
        "quantizer.step",
        "quantizer.levels.0.initted",
        "quantizer.levels.0.embed_sum",
        "train_usage.counts",
        "last_use.last_step",
    ):
        assert key in whole["state_dict"], key  # all compared above
    assert whole["rng_states"]["torch"].equal(resumed["rng_states"]["torch"])
    assert whole["lr_schedulers"] == resumed["lr_schedulers"]
    assert whole["optimizer_states"][0]["param_groups"] == resumed["optimizer_states"][0]["param_groups"]
    for a, b in zip(whole["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows, resumed_rows = train_rows(whole_dir, stop), train_rows(resumed_dir, stop)
    assert len(rows) == end - stop and [row["step"] for row in resumed_rows] == [row["step"] for row in rows]
    assert column(resumed_rows, "train/utilization")  # the usage window was logged too
    for resumed, whole_row in zip(resumed_rows, rows):
        logged = {key for key, value in resumed.items() if value}
        assert {key: resumed[key] for key in logged} == {key: whole_row[key] for key in logged}
        # Lightning repeats a window's usage figures in the later rows of its epoch; a resumed run starts without them
        assert all(key.startswith(USAGE_FIGURES) for key, value in whole_row.items() if value and key not in logged)
    assert validations(resumed_dir, stop) == validations(whole_dir, stop) != []


def test_a_run_on_the_device_resumed_mid_epoch_trains_as_a_dataloader_run(tmp_path: Path):
    """Batches cut on the device (data.on_device=true, the CPU standing in for it) give
    Lightning the same batches as the DataLoader, in training and validation, and a run
    stopped mid-epoch continues with the rest of that epoch."""
    stop, end = STEPS_PER_EPOCH + 2, 3 * STEPS_PER_EPOCH
    overrides = [*SHAPES, f"model.scheduler.total_steps={end}", f"trainer.val_check_interval={stop}"]
    fit(tmp_path / "loader", end, *overrides, "data.on_device=false")
    fit(tmp_path / "first", stop, *overrides, "data.on_device=true")
    fit(tmp_path / "second", end, *overrides, "data.on_device=true", f"ckpt_path={tmp_path / 'first' / 'last.ckpt'}")
    loader, resumed = (torch.load(tmp_path / run / "last.ckpt", weights_only=True) for run in ("loader", "second"))
    assert loader["global_step"] == resumed["global_step"] == end
    for key, value in loader["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    on_device = validations(tmp_path / "first", 0) + validations(tmp_path / "second", 0)
    assert on_device == validations(tmp_path / "loader", 0) and len(on_device) == 2


def rates(total_steps: int, steps: int, checkpoint: dict | None = None) -> tuple[list[float], dict]:
    """The rates of `steps` training steps under WarmupCosine (warmup 4, floor 0.1), continued
    from `checkpoint` (optimizer and scheduler states) as Lightning restores them; and the states after."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4, total_steps=total_steps, min_lr_ratio=0.1)
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
    taken = []
    for _ in range(steps):
        taken.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return taken, {
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "lr": optimizer.param_groups[0]["lr"],
    }


@pytest.mark.parametrize("stop", [2, 12, 20], ids=["in-warmup", "in-decay", "decay-done"])
def test_a_larger_max_steps_stretches_the_decay_ahead_without_a_jump(stop: int):
    """The default cosine ends at trainer.max_steps. Continued from step `stop` of 20 with
    max_steps=40, the rate goes on from where it was and reaches the floor at 40; stopped
    in the warmup, the run is the one of 40 steps from the start."""
    before, checkpoint = rates(20, stop)
    after, end = rates(40, 40 - stop, checkpoint)
    assert after[0] == rates(20, stop + 1)[0][-1]  # the rate the stopped run would have taken next
    assert end["lr"] == pytest.approx(0.1)
    if stop == 2:
        assert before + after == rates(40, 40)[0]
    elif stop == 20:
        assert after == [pytest.approx(0.1)] * 20  # the decay was over
    else:
        assert all(a > b for a, b in zip(after, after[1:]))
        assert after[1] > rates(20, stop + 2)[0][-1]  # decaying more slowly, to end later


def test_last_checkpoint_follows_the_run_when_validation_stops_improving(tmp_path: Path):
    """Only the first validation sets a record (mode=max on a falling loss); last.ckpt
    must still hold the latest validation step and, after it, the end of training."""
    fit(tmp_path, 7, *SHAPES, "trainer.val_check_interval=2", "callbacks.model_checkpoint.mode=max")
    assert [path.name for path in tmp_path.glob("step*.ckpt")] == ["step0000002.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 7


def test_a_run_resumed_in_its_directory_keeps_one_best_checkpoint(tmp_path: Path):
    """last.ckpt holds the record of the best validation so far (ModelCheckpoint's state
    as of the validation it was saved at), so that a run resumed in its directory
    (resume=auto) keeps the best checkpoint a run never stopped keeps, and no other.
    Only the first validation sets a record (mode=max on a falling loss); the first
    run stops at it, where last.ckpt is saved again after the validation."""
    overrides = [*SHAPES, "trainer.val_check_interval=2", "callbacks.model_checkpoint.mode=max"]
    fit(tmp_path / "whole", 7, *overrides)
    fit(tmp_path / "resumed", 2, *overrides)
    assert best_record(tmp_path / "resumed") == best_record(tmp_path / "whole")
    fit(tmp_path / "resumed", 7, *overrides)
    for run in ("whole", "resumed"):
        assert [path.name for path in (tmp_path / run).glob("step*.ckpt")] == ["step0000002.ckpt"], run
    assert best_record(tmp_path / "resumed") == best_record(tmp_path / "whole")


def best_record(run_dir: Path) -> tuple[float, str]:
    """ModelCheckpoint's record in a run's last.ckpt: the best score and its file's name."""
    callbacks = torch.load(run_dir / "last.ckpt", weights_only=True)["callbacks"]
    (state,) = (value for key, value in callbacks.items() if key.startswith("ModelCheckpoint"))
    return float(state["best_model_score"]), Path(state["best_model_path"]).name


@pytest.mark.slow
def test_requeued_slurm_job_resumes_in_its_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two invocations with the same SLURM_JOB_ID (a requeue) share runs/slurm-<id>; the
    second resumes (resume=auto). Only SLURM_JOB_ID is set: without SLURM_NTASKS
    Lightning does not take the job for an srun-managed one."""
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    tiny = [o for o in [*RESUMABLE, *SHAPES] if not o.startswith("trainer.deterministic")]
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
