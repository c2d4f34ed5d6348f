"""Training entry point: compose the config, build everything, fit, test.

python train.py quantizer=fsq data=mnist trainer.max_steps=200
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import DictConfig, OmegaConf

from vqtrain.callbacks import progress_bar
from vqtrain.checkpoints import resume_path
from vqtrain.cli import one_line_errors
from vqtrain.config import CONFIG_DIR, InvalidConfig, check_config, check_paths, register_resolvers
from vqtrain.quiet import quiet_start

log = logging.getLogger(__name__)

register_resolvers()


def train(cfg: DictConfig) -> dict[str, float]:
    quiet_start()
    check_config(cfg)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    check_paths(datamodule.required_paths())
    ckpt_path = resume_path(cfg)
    model = instantiate(cfg.model)
    if model.modality != datamodule.modality:
        raise InvalidConfig(
            f"data gives {datamodule.modality} batches but model.encoder "
            f"({type(model.encoder).__name__}) takes {model.modality}: choose the matching model"
        )
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None] + progress_bar(cfg.trainer)
    loggers = [instantiate(logger) for logger in (cfg.logger or {}).values() if logger is not None]
    # data modules that shard batches across ranks themselves (audio bucketing) opt out of Lightning's sampler
    distributed_sampler = getattr(datamodule, "use_distributed_sampler", True)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, use_distributed_sampler=distributed_sampler
    )
    check_trainer(cfg, model, trainer)
    if trainer.is_global_zero:
        log.info(start_line(cfg, model, trainer))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.test and not trainer.interrupted:
            trainer.test(model, datamodule=datamodule)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        finish_wandb()
    return metrics  # the last training and validation figures, and the test's


def check_trainer(cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer) -> None:
    """Refuse, before `fit`, what Lightning refuses only inside it, as a traceback: clipping or
    accumulating gradients of a model that steps its optimizers itself (the GAN models), and
    clipping a fused optimizer's gradients under 16-mixed: it unscales them in its step, too late."""
    clip, accumulate = trainer.gradient_clip_val, trainer.accumulate_grad_batches
    if not model.automatic_optimization and (clip or accumulate != 1):
        keys = [f"trainer.gradient_clip_val={clip!r}"] if clip else []
        keys += [f"trainer.accumulate_grad_batches={accumulate!r}"] if accumulate != 1 else []
        raise InvalidConfig(
            f"{', '.join(keys)}: {type(model).__name__} steps its optimizers itself (manual optimization), "
            "which Lightning neither clips nor accumulates: leave them unset"
        )
    plugin = trainer.precision_plugin
    if clip and isinstance(plugin, MixedPrecision) and plugin.scaler is not None and cfg.optimizer.get("fused"):
        raise InvalidConfig(
            f"trainer.gradient_clip_val={clip!r} with trainer.precision={plugin.precision}: the fused optimizer "
            "unscales the gradients in its step, too late to clip them: set optimizer.fused=false, "
            "or trainer.precision=bf16-mixed"
        )


def start_line(cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer) -> str:
    """A run's first line: the configs chosen, its size, seed, device and run directory."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    groups = ["model", "quantizer", "data", "experiment", "debug"]
    chosen = [f"{group}={choices[group]}" for group in groups if choices.get(group) not in (None, "null")]
    params = sum(p.numel() for p in model.parameters())
    codes = getattr(model.quantizer, "effective_codebook_size", None)
    devices = f"{trainer.num_nodes * trainer.num_devices} x " if trainer.num_nodes * trainer.num_devices > 1 else ""
    return (
        " ".join(chosen)
        + f" | {params / 1e6:.2f} M parameters"
        + (f", {codes:,} codes" if codes else "")
        + f" | seed {cfg.seed} | {devices}{trainer.strategy.root_device}"
        + f" | run directory {trainer.default_root_dir}"
    )


def finish_wandb() -> None:
    """One wandb run per job, also in multirun sweeps. Only the wandb logger imports
    wandb: a run without it has nothing to finish (and may not have wandb installed)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def objective(metrics: dict[str, float], optimized_metric: str | Sequence[str]) -> float | list[float]:
    """The value(s) a sweeper optimises: `optimized_metric`'s names looked up in
    the run's final metrics. A non-finite one is an error, so that the sweeper
    counts a failed trial (a diverged run must not win a minimisation; and
    hydra-optuna-sweeper 1.3 with optuna 2.x stops the whole sweep on a NaN
    value, while it counts an error as a failed trial)."""
    names = [optimized_metric] if isinstance(optimized_metric, str) else list(optimized_metric)
    if missing := [name for name in names if name not in metrics]:
        raise InvalidConfig(
            f"optimized_metric: {', '.join(missing)} not among the run's metrics ({', '.join(sorted(metrics))})"
        )
    if bad := [f"{name} = {metrics[name]}" for name in names if not math.isfinite(metrics[name])]:
        raise FloatingPointError(f"optimized_metric: {', '.join(bad)}: a failed trial")
    values = [metrics[name] for name in names]
    return values[0] if isinstance(optimized_metric, str) else values


def searching(cfg: DictConfig) -> bool:
    """A job of a sweep that optimises a metric (hparams_search=...)."""
    return (
        cfg.get("optimized_metric") is not None
        and HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    """A start-up error (a setting, a path, a damaged file) is one line, not a
    traceback, unless HYDRA_FULL_ERROR=1 (as for Hydra's own errors). In a
    sweep with `optimized_metric` (a search), the run returns its value(s) to
    the sweeper, and a trial's error goes to the sweeper as it is, which counts
    a failed trial and goes on (the hparams_search presets' max_failure_rate)."""
    if not searching(cfg):
        with one_line_errors():
            train(cfg)
        return None
    return objective(train(cfg), cfg.optimized_metric)


if __name__ == "__main__":
    main()
