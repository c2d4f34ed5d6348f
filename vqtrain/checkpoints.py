"""The checkpoints of a run: how they are written, which one a run continues
from, what they carry."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from vqtrain.config import InvalidConfig, Required
from vqtrain.files import UnreadableFile, load_archive, unreadable, write_atomic

log = logging.getLogger(__name__)

CONFIG_KEY = "vqtrain_config"  # the resolved run config, in every training checkpoint
MODALITY_KEY = "vqtrain_modality"  # "image" or "audio": what the model was trained on
CHECKPOINT = "a vqtrain training checkpoint"
CHECKPOINT_REMEDY = "restore it from a copy, or use another checkpoint of the run"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with `write_atomic`. Lightning's own save moves a
    temporary file from the system temp folder, which is a copy (not atomic)
    when that folder lies on another file system, and nothing is fsynced."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(path, lambda file: torch.save(checkpoint, file))


def load_run_checkpoint(path: _PATH, mmap: bool = False) -> dict[str, Any]:
    """A training checkpoint, checked: one that is truncated, damaged (a record
    fails its CRC) or not a training checkpoint (no run config) is an
    UnreadableFile naming it. `mmap`: a look at it, its tensors left on disk."""
    checkpoint = load_archive(path, CHECKPOINT, CHECKPOINT_REMEDY, mmap=mmap)
    if not isinstance(checkpoint, dict) or not checkpoint.get(CONFIG_KEY) or "state_dict" not in checkpoint:
        problem = f"holds no run config (`{CONFIG_KEY}`) or no weights"
        raise unreadable(path, problem, CHECKPOINT, "give a checkpoint that vqtrain's training wrote")
    return checkpoint


def resume_path(cfg: DictConfig) -> str | None:
    """An explicit `ckpt_path`, else with resume=auto the newest readable
    checkpoint of the run directory (see `resumable`), each one skipped named in
    a warning. Checked before anything is built: a damaged `ckpt_path`, or a run
    directory whose checkpoints are all unreadable, is an UnreadableFile rather
    than a run started from scratch over an existing one."""
    quantizer = OmegaConf.to_container(cfg.quantizer, resolve=True) if "quantizer" in cfg else None
    if cfg.ckpt_path:
        Required("ckpt_path", Path(cfg.ckpt_path), "a checkpoint to resume from", folder=False).check()
        check_same_quantizer(load_run_checkpoint(cfg.ckpt_path, mmap=True), quantizer, cfg.ckpt_path)
        return str(cfg.ckpt_path)
    if cfg.resume not in ("auto", "never"):
        raise InvalidConfig(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    if cfg.resume == "never":
        return None
    run_dir = Path(cfg.paths.output_dir)
    skipped: list[UnreadableFile] = []
    for path in resumable(run_dir):
        try:
            checkpoint = load_run_checkpoint(path, mmap=True)
        except UnreadableFile as error:
            log.warning("resume=auto skipped an unreadable checkpoint: %s", error)
            skipped.append(error)
            continue
        check_same_quantizer(checkpoint, quantizer, path)
        log.info("resuming from %s", path)
        return str(path)
    if skipped:
        raise UnreadableFile(
            f"resume=auto: no readable checkpoint in {run_dir} "
            f"({'; '.join(f'{error.path.name}: {error.problem}' for error in skipped)}): "
            "restore one from a copy, or start afresh in another run directory or with resume=never"
        )
    return None


def check_same_quantizer(checkpoint: dict[str, Any], quantizer: dict | None, path: _PATH | None = None) -> None:
    """A checkpoint continues only with the quantizer config it was trained with
    (`quantizer`: the current one, resolved); otherwise an InvalidConfig listing
    the differing keys. Checked at start-up, so that it is one line, not a
    traceback from inside `fit`."""
    saved = (checkpoint.get(CONFIG_KEY) or {}).get("quantizer")
    if saved is None or quantizer is None:
        return
    diff = {
        k: (saved.get(k), quantizer.get(k))
        for k in sorted(set(saved) | set(quantizer))
        if saved.get(k) != quantizer.get(k) and not (k not in saved and added_at_default(quantizer, k))
    }
    if diff:
        raise InvalidConfig(
            f"{path or 'checkpoint'} was trained with another quantizer config; differing keys (checkpoint, now): "
            f"{diff}: set them as the checkpoint has them, or start afresh (resume=never or another run directory)"
        )


def added_at_default(quantizer_config: dict, key: str) -> bool:
    """Whether `key` of a quantizer config holds its class's default: a setting added since
    a checkpoint was written trained then as it does now, so resuming it is no change."""
    try:
        default = inspect.signature(get_class(quantizer_config["_target_"])).parameters[key].default
    except (KeyError, ImportError, AttributeError, ValueError):
        return False
    return default is not inspect.Parameter.empty and quantizer_config[key] == default


def resumable(run_dir: Path) -> list[Path]:
    """The order resume=auto tries a run directory's checkpoints in: newest first
    (by mtime, as Lightning orders them) those written to continue from: last.ckpt,
    a last-v<n>.ckpt (ModelCheckpoint's, in run directories of earlier versions),
    an hpc_ckpt_<n>.ckpt (Lightning's save on SLURM's requeue signal); then,
    should none of them be readable, the others (the best validation's
    step<N>.ckpt), newest first. Kept apart, since a copy of the folder (cp -r)
    gives its files new mtimes in the order they were copied."""

    def newest_first(paths: set[Path]) -> list[Path]:
        return sorted(paths, key=lambda path: path.stat().st_mtime_ns, reverse=True)

    latest = {path for pattern in ("last*.ckpt", "hpc_ckpt_*.ckpt") for path in run_dir.glob(pattern) if path.is_file()}
    others = {path for path in run_dir.glob("*.ckpt") if path.is_file()} - latest
    return newest_first(latest) + newest_first(others)
