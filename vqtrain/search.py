"""Hyperparameter searches (hparams_search=..., hydra-optuna-sweeper) in the
collapse report: every trial's objective values, the best trial (one
objective) or the Pareto front (two), and each best trial as a command line.

The sweeper writes optimization_results.yaml into the sweep folder
(best_params and best_value, or solutions: params and values); the objectives'
names and directions are those of the trials' configs (`optimized_metric`,
hydra.sweeper.direction).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

RESULTS = "optimization_results.yaml"


@dataclass
class Trial:
    """One trial of a search: its number (the job number), task overrides and objective values (None: failed)."""

    number: int
    overrides: list[str]
    values: list[float] | None


@dataclass
class Search:
    folder: Path
    metrics: list[str]
    directions: list[str]
    trials: list[Trial]
    best: list[dict]  # the sweeper's best trial or Pareto solutions: {"params": {...}, "values": [...]}

    def is_best(self, trial: Trial) -> bool:
        return any(same_params(solution["params"], trial.overrides) for solution in self.best)

    def command(self, trial: Trial) -> str:
        """The trial as one training run: its overrides, the preset kept (hydra.mode=RUN: not a sweep again)."""
        return "python train.py " + " ".join(shlex.quote(o) for o in [*trial.overrides, "hydra.mode=RUN"])


def same_params(params: dict, overrides: list[str]) -> bool:
    """Whether `overrides` (key=value) set every one of the sweeper's `params` to its value."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    return all(key in given and parse(given[key]) == parse(value) for key, value in params.items())


def parse(value: object) -> object:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def find_searches(roots: list[Path]) -> list[Path]:
    return sorted({results.parent for root in roots for results in Path(root).rglob(RESULTS)})


def objective(rows: list[dict[str, float]], metrics: list[str]) -> list[float] | None:
    """The last logged value of each metric (what train() returned), None when one is missing or not finite."""
    values = [next((row[key] for row in reversed(rows) if key in row), math.nan) for key in metrics]
    return values if all(math.isfinite(v) for v in values) else None


def load_search(folder: Path, runs_rows: dict[Path, list[dict[str, float]]]) -> Search:
    """A search from its sweep folder; `runs_rows`: the metric rows of its trials' run directories."""
    results = yaml.safe_load((folder / RESULTS).read_text())
    best = results.get("solutions") or [{"params": results["best_params"], "values": [results["best_value"]]}]
    trials, metrics, directions = [], [], []
    for job in sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        hydra = yaml.safe_load((job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        metric = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()).get("optimized_metric")
        metrics = [metric] if isinstance(metric, str) else list(metric or [])
        direction = hydra["sweeper"]["direction"]
        directions = [direction] if isinstance(direction, str) else list(direction)
        rows = runs_rows.get(job.resolve(), [])
        trials.append(Trial(int(job.name), list(hydra["overrides"]["task"]), objective(rows, metrics)))
    return Search(folder, metrics, directions, trials, best)


def label(metric: str, direction: str) -> str:
    return f"{metric} ({'lower' if direction == 'minimize' else 'higher'} is better)"


def plot_search(search: Search, path: Path) -> None:
    """Two objectives: every trial, the Pareto front joined; one: the value by trial, the best marked."""
    done = [trial for trial in search.trials if trial.values]
    best = [trial for trial in done if search.is_best(trial)]
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    if len(search.metrics) == 2:
        ax.scatter(*zip(*(t.values for t in done)), color="tab:gray", label="trial")
        ax.plot(*zip(*sorted(t.values for t in best)), marker="o", color="tab:red", label="Pareto front")
        for trial in done:
            ax.annotate(str(trial.number), trial.values, textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label(search.metrics[0], search.directions[0]))
        ax.set_ylabel(label(search.metrics[1], search.directions[1]))
    else:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o", color="tab:gray", label="trial")
        ax.plot([t.number for t in best], [t.values[0] for t in best], "o", color="tab:red", label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(label(search.metrics[0], search.directions[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def summary(search: Search, root: Path | None) -> tuple[str, str, list[str]]:
    """(figure title, caption, command lines of the best trials) of one search."""
    inside = root and search.folder.is_relative_to(root) and search.folder != root
    name = str(search.folder.relative_to(root)) if inside else search.folder.name
    failed = [t.number for t in search.trials if t.values is None]
    pareto = len(search.metrics) > 1
    title = f"{'Pareto front' if pareto else 'Best trial'} of the search in {name}"
    caption = (
        f"{len(search.trials)} trials, "
        + (f"{len(failed)} failed (no finite {' or '.join(search.metrics)}: trials {failed}); " if failed else "")
        + (f"{len(search.best)} on the Pareto front (red), " if pareto else "the best in red, ")
        + "numbered by trial; each best trial as a training command below."
    )
    best = [t for t in search.trials if t.values and search.is_best(t)]
    commands = [
        f"trial {t.number}: " + ", ".join(f"{m} {v:.4g}" for m, v in zip(search.metrics, t.values)) for t in best
    ]
    return title, caption, [line for t, head in zip(best, commands) for line in (head, search.command(t))]
