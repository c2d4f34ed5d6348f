"""Runs as the collapse report reads them: from run directories (a
`metrics.csv` from the CSV logger beside Hydra's `.hydra/`) or from wandb,
each with what it was (method, codebook size, data) and its metric rows."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from vqtrain.files import CSV_REMEDY, read_csv_log, unreadable

SIZE_KEYS = ("codebook_size", "levels")
# when runs log training windows and validations: named where a figure lacks them
SCHEDULE = ("model.usage_window", "trainer.val_check_interval")


@dataclass
class Run:
    """One training run: what it was (method, codebook size, data) and its metric rows."""

    name: str
    method: str
    codebook_size: int | None
    dataset: str
    rows: list[dict[str, float]] = field(default_factory=list)  # sparse, each with "step"
    settings: dict[str, Any] = field(default_factory=dict)  # SCHEDULE's keys

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(row["step"]), row[key]) for row in self.rows if key in row]
        return [step for step, _ in points], [value for _, value in points]

    def final(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None

    @property
    def steps(self) -> int | None:
        """Training steps up to the last logged one."""
        steps = [after(row) for row in self.rows if any(key.startswith(("train/", "val/", "test/")) for key in row)]
        return int(max(steps)) if steps else None

    def until(self, step: int) -> Run:
        """The run as it was after `step` training steps: what it logged up to then."""
        return replace(self, rows=[row for row in self.rows if after(row) <= step])


def after(row: dict[str, float]) -> float:
    """The training steps a row follows: training rows count from 0, validation
    and test rows carry the number of steps they followed."""
    return row["step"] + any(key.startswith("train/") for key in row)


def find_run_dirs(roots: Iterable[str | Path]) -> list[Path]:
    """Every folder below `roots` (or a root itself) holding metrics.csv and .hydra/config.yaml."""
    found = {
        metrics.parent
        for root in roots
        for metrics in Path(root).rglob("metrics.csv")
        if (metrics.parent / ".hydra" / "config.yaml").is_file()
    }
    return sorted(
        found, key=lambda path: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
    )


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Lightning's CSV log: a row per logging step, filled only where something
    was logged; a damaged one is an UnreadableFile naming it."""
    if not path.is_file():
        return []
    rows = read_csv_log(path)[1]
    try:
        return [{key: float(value) for key, value in row.items() if key and value} for row in rows if row.get("step")]
    except ValueError as error:
        raise unreadable(path, f"damaged: {error}", "a CSV log of numbers", CSV_REMEDY) from error


def describe(
    config: Mapping[str, Any], choices: Mapping[str, Any], overrides: Iterable[str]
) -> tuple[str, int | None, str]:
    """(method, codebook size, dataset) of a run. The method is the quantizer
    config's name plus any `quantizer.*` overrides besides the size, so that
    sweeps over a quantizer setting stay apart."""
    quantizer = config.get("quantizer") or {}
    overrides = list(overrides)
    method = (
        choices.get("quantizer")
        or next((o.split("=", 1)[1] for o in overrides if o.startswith("quantizer=")), None)
        or str(quantizer.get("_target_", "unknown")).rsplit(".", 1)[-1]
    )
    settings = [
        f"{match[1]}={match[2]}"
        for o in overrides
        if (match := re.fullmatch(r"[+~]*quantizer\.([^=]+)=(.*)", o)) and match[1] not in SIZE_KEYS
    ]
    if settings:
        method = f"{method} {' '.join(sorted(settings))}"
    size = quantizer.get("codebook_size")
    if size is None and quantizer.get("levels"):
        size = math.prod(quantizer["levels"])
    dataset = choices.get("data") or str((config.get("data") or {}).get("_target_", "unknown")).rsplit(".", 1)[-1]
    return method, None if size is None else int(size), dataset


def select(config: Any, key: str) -> Any:
    value = OmegaConf.select(config, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_run(folder: Path) -> Run:
    hydra_dir = folder / ".hydra"
    config = OmegaConf.load(hydra_dir / "config.yaml")
    # only these keys are resolved: others (paths) may need Hydra's own resolvers
    plain = {
        "quantizer": {key: select(config, f"quantizer.{key}") for key in ("_target_", *SIZE_KEYS)},
        "data": {"_target_": select(config, "data._target_")},
    }
    hydra = yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) if (hydra_dir / "hydra.yaml").is_file() else {}
    choices = ((hydra or {}).get("hydra", {}).get("runtime") or {}).get("choices") or {}
    overrides = (
        yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) if (hydra_dir / "overrides.yaml").is_file() else []
    )
    sweeper = (hydra or {}).get("hydra", {}).get("sweeper") or {}
    searched = set(sweeper.get("params") or {}) if "optuna" in str(sweeper.get("_target_")) else set()
    method, size, dataset = describe(plain, choices, [o for o in overrides or [] if o.split("=")[0] not in searched])
    if searched:  # a trial of a search: named by its number, its values in the search's figure
        method += f" trial {hydra['hydra']['job']['num']}"
    settings = {key: select(config, key) for key in SCHEDULE}
    return Run(str(folder), method, size, dataset, read_metrics(folder / "metrics.csv"), settings)


def load_wandb_runs(path: str) -> list[Run]:
    """Runs of a wandb ENTITY/PROJECT: the config is the resolved run config
    (WandbConfigLogger), whose `tags` start with the quantizer and data names."""
    import wandb

    runs = []
    for remote in wandb.Api().runs(path):
        config = dict(remote.config)
        tags = config.get("tags") or []
        choices = dict(zip(("quantizer", "data"), tags))
        rows = [
            {"step": row["trainer/global_step"]}
            | {
                key: value
                for key, value in row.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            for row in remote.scan_history()
            if row.get("trainer/global_step") is not None
        ]
        method, size, dataset = describe(config, choices, [])
        settings = {key: select(OmegaConf.create(config), key) for key in SCHEDULE}
        runs.append(Run(f"{path}/{remote.id}", method, size, dataset, rows, settings))
    return runs
