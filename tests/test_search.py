"""Hyperparameter search (hparams_search=..., hydra-optuna-sweeper): seeded trials, failed trials
that do not stop the sweep, the Pareto front and best-trial commands in the report."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate

from helpers import column, read_metrics, run_cli
from vqtrain.config import CONFIG_DIR, InvalidConfig, register_resolvers
from vqtrain.train import objective

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the `sweep` extra: pip install -e '.[sweep]'")

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ["val/recon_loss", "val/utilization"]


class Launcher:
    """Stands in for Hydra's launcher: records each trial's overrides and returns a value made from them."""

    def __init__(self, objectives: int):
        self.objectives, self.launched = objectives, []

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for overrides in job_overrides:
            self.launched.append(list(overrides))
            value = sum(float(o.split("=")[1]) for o in overrides)
            result = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
            result.return_value = value if self.objectives == 1 else [value, -value]
            returns.append(result)
        return returns


def searched_trials(preset: str, seed: int, sweep_dir: Path) -> list[list[str]]:
    """The overrides of 6 trials the preset's sweeper asks for with this seed (no training)."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(
            "train",
            overrides=[
                f"hparams_search={preset}",
                f"seed={seed}",
                "hydra.sweeper.n_trials=6",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            return_hydra_config=True,
        )
    impl = instantiate(cfg.hydra.sweeper).sweeper
    impl.config, impl.hydra_context, impl.job_idx = cfg, "unused by the stand-in launcher", 0
    impl.launcher = Launcher(len(cfg.hydra.sweeper.direction) if preset.endswith("pareto") else 1)
    sweep_dir.mkdir()  # as a launcher does
    impl.sweep([])
    assert (sweep_dir / "optimization_results.yaml").is_file()
    return impl.launcher.launched


@pytest.mark.parametrize("preset", ["vq_tricks_optuna", "vq_tricks_pareto"])
def test_the_same_seed_searches_the_same_trials(preset: str, tmp_path: Path):
    first = searched_trials(preset, 0, tmp_path / "a")
    assert len(first) == 6 and all(o.startswith(("optimizer.lr=", "quantizer.")) for trial in first for o in trial)
    assert searched_trials(preset, 0, tmp_path / "b") == first
    assert searched_trials(preset, 1, tmp_path / "c") != first


def test_objective_is_the_named_metrics_and_an_error_where_not_finite():
    metrics = {"val/recon_loss": 0.5, "val/utilization": 0.25, "test/recon_loss": math.nan}
    assert objective(metrics, "val/recon_loss") == 0.5
    assert objective(metrics, OBJECTIVES) == [0.5, 0.25]
    # an error, which the sweeper counts as a failed trial (a NaN value would stop the sweep)
    with pytest.raises(FloatingPointError, match="optimized_metric: test/recon_loss = nan: a failed trial"):
        objective(metrics, ["val/recon_loss", "test/recon_loss"])
    with pytest.raises(InvalidConfig, match=r"optimized_metric: val/psnr not among the run's metrics \(test/recon"):
        objective(metrics, "val/psnr")


@pytest.fixture(scope="module")
def pareto_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5-trial two-objective search of 3-step runs in which some trials fail (codebook_size=-1)."""
    root = tmp_path_factory.mktemp("search")
    result = run_cli(
        "hparams_search=vq_tricks_pareto",
        "hydra.sweeper.n_trials=5",
        "quantizer.codebook_size=choice(64,-1)",  # searched too: -1 fails at start-up
        *("debug=tiny_image", "trainer.max_steps=3", "test=false"),
        f"hydra.sweep.dir={root / 'search'}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "search"


def test_a_search_goes_on_past_failed_trials_and_the_report_draws_its_front(pareto_search: Path):
    trials = {int(p.name): p for p in pareto_search.iterdir() if p.name.isdigit()}
    assert sorted(trials) == [0, 1, 2, 3, 4]
    failed = [n for n, p in trials.items() if "quantizer.codebook_size=-1" in (p / ".hydra/overrides.yaml").read_text()]
    assert 0 < len(failed) < 4, "the seed should draw both a failing and at least two working trials"
    solutions = yaml.safe_load((pareto_search / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(s["params"]["quantizer.codebook_size"] == 64 for s in solutions)

    report = [sys.executable, str(REPO / "scripts" / "collapse_report.py"), str(pareto_search)]
    result = subprocess.run(report, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (pareto_search / "report" / "summary.md").read_text()
    assert (pareto_search / "report" / "search0.png").stat().st_size > 0
    assert f"5 trials, {len(failed)} failed" in summary
    assert f"{len(solutions)} on the Pareto front" in summary
    commands = [line.strip() for line in summary.splitlines() if line.strip().startswith("python train.py")]
    assert len(commands) == len(solutions)


def test_the_printed_command_of_a_best_trial_reruns_it_exactly(pareto_search: Path, tmp_path: Path):
    summary = (pareto_search / "report" / "summary.md").read_text()
    header, command = [line.strip() for line in summary.splitlines() if line.strip().startswith(("trial ", "python "))][
        :2
    ]
    trial = pareto_search / header.split()[1].rstrip(":")
    result = run_cli(*shlex.split(command)[2:], f"hydra.run.dir={tmp_path / 'rerun'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in OBJECTIVES:
        assert column(read_metrics(tmp_path / "rerun"), key) == column(read_metrics(trial), key)
