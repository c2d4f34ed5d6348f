"""Files that appear whole or not at all, and the checkpoints of a run: how
they are written, which one a run continues from, what they carry."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig

from vqtrain.config import InvalidConfig, Required

log = logging.getLogger(__name__)

CONFIG_KEY = "vqtrain_config"  # the resolved run config, in every training checkpoint
MODALITY_KEY = "vqtrain_modality"  # "image" or "audio": what the model was trained on


def write_atomic(path: _PATH, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a hidden temporary file next to `path`, fsync, rename
    over `path`: a file that exists is complete, and a kill mid-write leaves the
    previous one. The temporary file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with `write_atomic`. Lightning's own save moves a
    temporary file from the system temp folder, which is a copy (not atomic)
    when that folder lies on another file system, and nothing is fsynced."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(path, lambda file: torch.save(checkpoint, file))


def resume_path(cfg: DictConfig) -> str | None:
    """An explicit `ckpt_path`, else with resume=auto the run directory's newest
    checkpoint to continue from: last.ckpt, a last-v<n>.ckpt (what ModelCheckpoint
    wrote in run directories of earlier versions), or an hpc_ckpt_<n>.ckpt that
    Lightning saved on SLURM's requeue signal."""
    if cfg.ckpt_path:
        Required("ckpt_path", Path(cfg.ckpt_path), "a checkpoint to resume from", folder=False).check()
        return str(cfg.ckpt_path)
    if cfg.resume not in ("auto", "never"):
        raise InvalidConfig(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    run_dir = Path(cfg.paths.output_dir)
    saved = [path for pattern in ("last*.ckpt", "hpc_ckpt_*.ckpt") for path in run_dir.glob(pattern) if path.is_file()]
    if cfg.resume == "auto" and saved:
        newest = max(saved, key=lambda path: path.stat().st_mtime_ns)
        log.info("resuming from %s", newest)
        return str(newest)
    return None


def load_run_checkpoint(path: _PATH) -> dict[str, Any]:
    """A training checkpoint, refused with a clear error when it carries no run config."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not checkpoint.get(CONFIG_KEY):
        raise ValueError(f"{path} holds no run config (`{CONFIG_KEY}`): not a vqtrain training checkpoint")
    return checkpoint
