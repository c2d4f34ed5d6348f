"""Score a trained model on a split: training's own test step and codebook
usage, plus reconstruction quality (`vqtrain.quality`) and bit rates."""

from __future__ import annotations

import math

import lightning as L
from omegaconf import DictConfig, OmegaConf

from vqtrain.callbacks import SignalQuality
from vqtrain.config import InvalidConfig
from vqtrain.data.common import split_dataset
from vqtrain.quality import image_size_problem
from vqtrain.tokenizer import Tokenizer

HEADLINE = (
    "loss",
    "recon_loss",
    "mse",
    "psnr",
    "ssim",
    "lpips",
    "rfid",
    "si_snr",
    "mel_distance",
    "stoi",
    "pesq_wb",
    "pesq_nb",
    "utilization",
    "perplexity",
    "dead_codes",
    "bits_per_token",
    "tokens_per_image",
    "bits_per_image",
    "tokens_per_second",
    "bits_per_second",
)  # first in reports


def evaluate(
    tokenizer: Tokenizer, cfg: DictConfig, split: str = "test", metrics: list[str] | None = None
) -> dict[str, float]:
    """Run a split through Lightning's test loop with training's own metrics
    (`shared_step`, codebook usage), plus reconstruction quality and bit rates.
    `metrics`: quality figures by config name (`vqtrain.quality.METRICS`), by
    default the run's `callbacks.signal_quality.metrics` (or the modality's cheap
    ones). As in training's final test, `trainer.limit_test_batches` and `precision` apply."""
    datamodule = tokenizer.data_module(cfg)
    datamodule.standalone_device = tokenizer.device  # data.on_device: batches cut where the model is
    loader = datamodule.loader(split_dataset(datamodule, split), shuffle=False)
    if metrics is None:
        metrics = OmegaConf.select(cfg, "callbacks.signal_quality.metrics")
    image_size = OmegaConf.select(cfg, "data.image_size")
    if tokenizer.modality == "image" and isinstance(image_size, int):
        if problem := image_size_problem(metrics, image_size):
            raise InvalidConfig(problem)
    quality = SignalQuality(metrics, sample_rate=getattr(datamodule, "sample_rate", None))
    device = tokenizer.device
    trainer = L.Trainer(
        accelerator="cpu" if device.type == "cpu" else "gpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=cfg.trainer.precision,
        limit_test_batches=cfg.trainer.get("limit_test_batches", 1.0),
        logger=False,
        callbacks=[quality],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    [logged] = trainer.test(tokenizer.model, dataloaders=loader, verbose=False)
    figures = {name.removeprefix("test/"): float(value) for name, value in logged.items()}
    figures["bits_per_token"] = tokenizer.bits_per_token
    if tokenizer.modality == "audio":
        figures["tokens_per_second"] = tokenizer.sample_rate / tokenizer.stride
        figures["bits_per_second"] = figures["tokens_per_second"] * tokenizer.bits_per_token
    else:
        figures["tokens_per_image"] = math.prod(side // tokenizer.stride for side in quality.shape)
        figures["bits_per_image"] = figures["tokens_per_image"] * tokenizer.bits_per_token
    headline = [name for name in HEADLINE if name in figures]
    return {name: figures[name] for name in headline + sorted(set(figures) - set(headline))}
