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
# the run config's sections that decide what the weights are: a checkpoint continues only with the same
NETS = ("quantizer", "model.encoder", "model.decoder", "model.discriminator")


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
    than a run started from scratch over an existing one; so resume=never refuses
    a run directory that holds checkpoints: the fresh run would save over them."""
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.ckpt_path:
        Required("ckpt_path", Path(cfg.ckpt_path), "a checkpoint to resume from", folder=False).check()
        check_same_nets(load_run_checkpoint(cfg.ckpt_path, mmap=True), run_config, cfg.ckpt_path)
        return str(cfg.ckpt_path)
    if cfg.resume not in ("auto", "never"):
        raise InvalidConfig(f"resume must be 'auto' or 'never', got {cfg.resume!r}")
    run_dir = Path(cfg.paths.output_dir)
    if cfg.resume == "never":
        if existing := resumable(run_dir):  # a fresh run would save over them
            raise InvalidConfig(
                f"resume=never: {run_dir} holds checkpoints ({', '.join(path.name for path in existing)}) "
                "that a fresh run would overwrite: start afresh in another run directory, or move them away"
            )
        return None
    skipped: list[UnreadableFile] = []
    for path in resumable(run_dir):
        try:
            checkpoint = load_run_checkpoint(path, mmap=True)
        except UnreadableFile as error:
            log.warning("resume=auto skipped an unreadable checkpoint: %s", error)
            skipped.append(error)
            continue
        check_same_nets(checkpoint, run_config, path)
        log.info("resuming from %s", path)
        return str(path)
    if skipped:
        raise UnreadableFile(
            f"resume=auto: no readable checkpoint in {run_dir} "
            f"({'; '.join(f'{error.path.name}: {error.problem}' for error in skipped)}): "
            "restore one from a copy, or start afresh in another run directory"
        )
    return None


def check_same_nets(checkpoint: dict[str, Any], run_config: dict, path: _PATH | None = None) -> None:
    """A checkpoint continues only with the NETS settings it was trained with
    (`run_config`: the current run's config, resolved); otherwise an
    InvalidConfig naming the differing keys. Checked at start-up, so that it is
    one line, not a traceback from inside `fit`. A section either config lacks
    is not compared (an image model has no discriminator: its encoder differs)."""
    saved_config = checkpoint.get(CONFIG_KEY) or {}
    diff = {}
    for name in NETS:
        saved, now = section(saved_config, name), section(run_config, name)
        if not (isinstance(saved, dict) and isinstance(now, dict)):
            continue
        for k in sorted(set(saved) | set(now)):
            if saved.get(k) != now.get(k) and not (k not in saved and added_at_default(now, k)):
                diff[f"{name}.{k}"] = (saved.get(k), now.get(k))
    if diff:
        raise InvalidConfig(
            f"{path or 'checkpoint'} was trained with another model or quantizer config; differing keys "
            f"(checkpoint, now): {diff}: set them as the checkpoint has them, or start afresh "
            "in another run directory"
        )


def section(config: dict, name: str) -> Any:
    """`config`'s value at the dotted key `name`, or None."""
    for key in name.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def added_at_default(config: dict, key: str) -> bool:
    """Whether `key` of a config with a `_target_` holds its class's default: a setting added
    since a checkpoint was written trained then as it does now, so resuming it is no change."""
    try:
        default = inspect.signature(get_class(config["_target_"])).parameters[key].default
    except (KeyError, ImportError, AttributeError, ValueError):
        return False
    return default is not inspect.Parameter.empty and config[key] == default


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
