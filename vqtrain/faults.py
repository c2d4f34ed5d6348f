"""What keeps a long run from silently going wrong or getting lost: start-up
checks of settings no constructor sees, atomic checkpoint writes, a saved
`last.ckpt` on a scheduler's stop signal, metrics that survive a resume, and
scan-time data skips in the metrics.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# key -> (test, allowed values): settings that torch or Lightning accept, or refuse
# without naming them, though they would train nothing, train backwards or log nothing
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer.lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "model.scheduler.warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "model.scheduler.min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "trainer.max_steps": (lambda v: v == -1 or v >= 1, "-1 (no limit) or an integer >= 1"),
    "trainer.max_epochs": (lambda v: v is None or v == -1 or v >= 1, "null, -1 (no limit) or an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or 0 <= v < math.inf, "null or a finite number >= 0"),
    "trainer.log_every_n_steps": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.val_check_interval": (
        lambda v: v >= 1 if isinstance(v, int) else 0 < v <= 1,
        "an integer >= 1 (training steps) or a fraction in (0, 1] of an epoch",
    ),
    "seed": (lambda v: v is None or isinstance(v, int) and 0 <= v < 2**32, "null or an integer in [0, 2^32)"),
}
ABSENT = object()


class StartupError(Exception):
    """A setting refused at start-up, before anything is built: the CLI prints
    its message as one line, without a traceback (HYDRA_FULL_ERROR=1 shows it)."""


class InvalidConfig(StartupError, ValueError):
    """Values that would fail late, or not fail and train the wrong thing."""


class MissingPath(StartupError, FileNotFoundError):
    """A folder or file that a setting names is absent."""


@dataclass(frozen=True)
class Required:
    """A folder or file a run reads, the config key that points to it and what
    belongs there: what a data module's `required_paths` lists."""

    key: str
    path: Path
    expected: str
    folder: bool = True

    def problem(self) -> str | None:
        """None when the path exists, else one line naming the key and the path."""
        kind, present = ("folder", self.path.is_dir()) if self.folder else ("file", self.path.is_file())
        return None if present else f"{self.key}: no {kind} {self.path} (expected {self.expected})"

    def check(self) -> None:
        if problem := self.problem():
            raise MissingPath(problem)


def check_paths(required: Iterable[Required]) -> None:
    """Refuse absent folders and files before anything is built: the first one
    of each key, every key at once (a missing folder hides the files in it)."""
    problems: dict[str, str] = {}
    for item in required:
        if item.key not in problems and (problem := item.problem()):
            problems[item.key] = problem
    if problems:
        raise MissingPath("; ".join(problems.values()))


def passes(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # e.g. a string where a number belongs
        return False


def check_config(cfg: DictConfig) -> None:
    """Refuse, before anything is built, settings that would not fail by themselves
    but train nothing or the wrong thing; the message names every offending key."""
    problems = []
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and not passes(test, value):
            problems.append(f"{key}={value!r} (must be {allowed})")
    image_size = OmegaConf.select(cfg, "data.image_size")
    downsamples = OmegaConf.select(cfg, "model.encoder.num_downsamples")
    if isinstance(image_size, int) and isinstance(downsamples, int) and image_size % 2**downsamples:
        problems.append(f"data.image_size={image_size} (must be divisible by 2^model.encoder.num_downsamples = {2**downsamples})")
    if problems:
        raise InvalidConfig("invalid config: " + "; ".join(problems))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear whole or not at all, so a kill during a save leaves the
    previous `last.ckpt` loadable. Lightning's own save moves a temporary file from
    the system temp folder, which is a copy (not atomic) when that folder lies on
    another file system, and nothing is fsynced. Here the temporary file lies next
    to the target, is fsynced, then renamed over it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


class LastCheckpoint(L.Callback):
    """`<dirpath>/last.ckpt` after every validation and when training ends: what
    `resume=auto` and the tokenizer read. Lightning 2.6's ModelCheckpoint
    refreshes its last.ckpt only in a step that also saved a top-k checkpoint,
    so a run whose validation loss stopped improving would resume (or be
    tokenized) from an old step.

    A run that reaches `max_steps` is saved after its last batch, inside the
    epoch: by `on_train_end` Lightning has closed the epoch as if it were
    complete, and a run continued from there (with a larger `max_steps`) would
    skip the rest of that epoch or count one epoch too many. A validation in
    that last step saves again, over it, so that the checkpoint includes it."""

    def __init__(self, dirpath: _PATH):
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None
        self.in_batch_end = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            self.in_batch_end = True
            try:
                self.save(trainer)
            finally:
                self.in_batch_end = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Saved in the last batch's end, the loops must read as saved after it (as
        GracefulStop's checkpoints are), which is what Lightning resumes correctly."""
        if self.in_batch_end:
            loop = checkpoint["loops"]["fit_loop"]
            for counts in ("total", "current"):
                loop["epoch_loop.batch_progress"][counts]["completed"] += 1
            loop["epoch_loop.state_dict"]["_batches_that_stepped"] += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, unless_saved=True)  # ended otherwise (max_epochs, early stopping)

    def save(self, trainer: L.Trainer, unless_saved: bool = False) -> None:
        if not (unless_saved and trainer.global_step == self.saved_step):
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step


class GracefulStop(L.Callback):
    """A scheduler's stop signal costs no training. On SIGTERM Lightning ends
    `fit` at the next safe point (after a training batch, or within validation)
    with SIGTERMException, an exit with status 0; this saves `<dirpath>/last.ckpt`
    there, so that a rerun in the same run directory with `resume=auto` continues.
    SIGUSR1 does the same, except where Lightning handles it already (SLURM's
    auto-requeue: an hpc checkpoint, then `scontrol requeue`)."""

    def __init__(self, dirpath: _PATH):
        self.path = Path(dirpath) / "last.ckpt"

    # after Lightning has registered its signal handlers, which it restores when fit ends
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        forward_sigusr1()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        forward_sigusr1()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            log.warning("stopped by a signal: saved %s at step %d; rerun in this run directory with resume=auto "
                        "to continue", self.path, trainer.global_step)


def forward_sigusr1() -> None:
    """Treat SIGUSR1 as SIGTERM, unless something handles it already."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, lambda *_: signal.raise_signal(signal.SIGTERM))


class SkippedFilesLogger(L.Callback):
    """Files the data module left out when scanning (`skipped_files`: unusable
    audio) are logged as `data/skipped_files`, next to the model's running count
    of items skipped at load time (`data/skipped_items`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped_files", None)
        if skipped is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped_files": float(skipped)}, step=trainer.global_step)


class AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one keeps it and its columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv survives a resume in the same run directory:
    the resumed run appends its rows. Steps logged after the last checkpoint of a
    killed run appear twice; the later row is the one training continued from."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
