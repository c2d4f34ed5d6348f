"""Sweeps through submitit: hydra/launcher=local runs real jobs here; hydra/launcher=slurm
is checked up to the sbatch script it would submit (no cluster on a test machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict
from submitit.slurm.slurm import SlurmExecutor

from helpers import column, read_metrics, run_cli
from vqtrain.config import CONFIG_DIR, register_resolvers

TINY = ["debug=tiny_image", "trainer.max_steps=3"]


@pytest.mark.slow
def test_local_launcher_runs_each_sweep_point_in_its_own_run_directory(tmp_path: Path):
    result = run_cli("-m", "hydra/launcher=local", "quantizer=vq,fsq", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for job, quantizer in zip(jobs, ["vq", "fsq"]):
        assert (job / "last.ckpt").is_file()
        assert len(column(read_metrics(job), "train/loss")) == 3
        assert f"quantizer={quantizer}" in (job / ".hydra" / "overrides.yaml").read_text()
    assert (sweep / ".submitit").is_dir()  # it really went through submitit


@pytest.mark.slow  # ~30 s: each of the 2 worker processes imports torch and Lightning
def test_a_parallel_sweep_capped_at_2_jobs_logs_the_serial_sweeps_metrics_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """At one thread per job in both: joblib's workers get cores / n_jobs threads, and CPU
    kernels sum in another order at another thread count."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher (make install)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep = ["-m", "quantizer=vq,fsq", "seed=0,1", *TINY, "test=false"]
    serial = run_cli(*sweep, f"hydra.sweep.dir={tmp_path / 'serial'}", cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr[-3000:]
    parallel = run_cli(*sweep, "hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path / 'parallel'}", cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2," in parallel.stdout + parallel.stderr
    for job in ["0", "1", "2", "3"]:
        metrics = (tmp_path / "serial" / job / "metrics.csv").read_bytes()
        assert metrics.count(b"\n") == 1 + 3 + 1  # header, 3 training steps, a validation
        assert (tmp_path / "parallel" / job / "metrics.csv").read_bytes() == metrics


class Submitted(Exception):
    """Raised instead of calling sbatch: carries the script."""


def sbatch_script(overrides: list[str], sweep_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sbatch script hydra/launcher=slurm submits for a two-point sweep."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}", *overrides],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)

    def submit(self: SlurmExecutor, command: str):
        raise Submitted(self._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun exists"
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["quantizer=vq"], ["quantizer=fsq"]], initial_job_idx=0)
    return str(submitted.value)


def test_slurm_launcher_asks_for_one_task_per_gpu_and_a_requeue_signal_lightning_handles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    script = sbatch_script(
        ["trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"],
        tmp_path,
        monkeypatch,
    )
    lines = set(script.splitlines())
    for flag in [
        "--partition=gpu",
        "--nodes=2",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=8",
        "--time=1440",
        "--signal=USR1@120",
        "--requeue",
        "--array=0-1%2",
    ]:
        assert f"#SBATCH {flag}" in lines, f"{flag} missing from\n{script}"
    assert "USR2" not in script  # submitit's signal would requeue without a checkpoint
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)
