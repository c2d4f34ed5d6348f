"""Loggers: a CSV log that survives a resume (wandb is Lightning's own)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from vqtrain.files import UnreadableFile, read_csv_log

log = logging.getLogger(__name__)


class AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one keeps it and
    its columns. A log cut short loses its partial last line, so that the rows
    appended start on a line of their own; one that is not the log's CSV (a
    damaged copy) is moved aside, named in a warning, and a new log started."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        try:
            self.metrics_keys = read_csv_log(path)[0]
        except UnreadableFile as error:
            aside = path.with_name(f"{path.stem}.damaged{path.suffix}")
            path.replace(aside)
            log.warning("%s: %s; moved to %s, logging to a new %s", path, error.problem, aside.name, path.name)
            return
        content = path.read_bytes()
        os.truncate(path, content.rfind(b"\n") + 1)  # a partial last line, if any, off


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
