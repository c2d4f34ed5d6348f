"""Callbacks that show what scalar curves cannot: reconstructions of fixed
validation items, how codes are used, and (in wandb) the config behind a run."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from matplotlib.figure import Figure
from torchvision.utils import save_image

MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit
SPECTROGRAM_FFT = 256
SPECTROGRAM_FLOOR_DB = -100.0


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def code_histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Uses per code index -> (counts, bin edges) over at most 512 bins of
    code indices: a collapsed codebook shows as a few spikes."""
    edges = np.linspace(0, len(counts), min(len(counts), MAX_HISTOGRAM_BINS) + 1)
    return np.histogram(np.arange(len(counts)), bins=edges, weights=counts)


def log_spectrogram(clip: np.ndarray) -> np.ndarray:
    """Magnitude in dB (frequency, frames); zero padding, so clips shorter than a window still work."""
    window = torch.hann_window(SPECTROGRAM_FFT)
    spec = torch.stft(torch.from_numpy(clip), SPECTROGRAM_FFT, SPECTROGRAM_FFT // 4, window=window,
                      pad_mode="constant", return_complex=True).abs()
    return (20 * spec.clamp_min(1e-5).log10()).numpy()


def save_spectrograms(clips: list[tuple[np.ndarray, np.ndarray]], sample_rate: int, path: Path) -> None:
    """One row per item: original | reconstruction, on one dB scale."""
    figure = Figure(figsize=(8, 1.6 * len(clips) + 0.4), layout="constrained")
    axes = figure.subplots(len(clips), 2, squeeze=False)
    top = max(float(log_spectrogram(original).max()) for original, _ in clips)
    for row, pair in zip(axes, clips):
        for ax, clip in zip(row, pair):
            extent = (0, len(clip) / sample_rate, 0, sample_rate / 2 / 1000)
            ax.imshow(log_spectrogram(clip), origin="lower", aspect="auto", extent=extent, cmap="magma",
                      vmin=max(SPECTROGRAM_FLOOR_DB, top - 80), vmax=top)
            ax.set_ylabel("kHz")
    axes[0, 0].set_title("original")
    axes[0, 1].set_title("reconstruction")
    axes[-1, 0].set_xlabel("s")
    axes[-1, 1].set_xlabel("s")
    figure.savefig(path, dpi=80)


class WandbConfigLogger(L.Callback):
    """The resolved run config as wandb's run config: runs can then be filtered
    and grouped by any setting, and `scripts/collapse_report.py --wandb` reads it."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = getattr(pl_module, "run_config", None)
        if trainer.is_global_zero and config is not None:
            for logger in wandb_loggers(trainer):
                logger.experiment.config.update(config, allow_val_change=True)


class ReconstructionLogger(L.Callback):
    """Reconstructions of the first `num_items` validation items after every
    `log_every_n_val_epochs`-th validation: always the same items, so steps and
    runs compare by eye.

    Files under <run dir>/reconstructions: step<N>.png, originals above their
    reconstructions (images) or spectrograms side by side (audio: batches with
    "lengths"), and for audio step<N>/item<i>_{original,reconstruction}.wav at
    the data module's `sample_rate`. With a WandbLogger also the same media and
    histograms of each codebook's validation usage (`latest_usage["val"]`).
    """

    def __init__(self, num_items: int = 8, log_every_n_val_epochs: int = 1):
        if num_items < 1 or log_every_n_val_epochs < 1:
            raise ValueError(f"num_items and log_every_n_val_epochs must be >= 1, got {num_items} and {log_every_n_val_epochs}")
        self.num_items = num_items
        self.log_every_n_val_epochs = log_every_n_val_epochs
        self.val_epochs = 0
        self.batch: dict | None = None

    def fixed_batch(self, trainer: L.Trainer) -> dict:
        """The first items of the validation set, collated as the validation loader does."""
        if self.batch is None:
            loader = trainer.val_dataloaders
            items = [loader.dataset[i] for i in range(min(self.num_items, len(loader.dataset)))]
            self.batch = loader.collate_fn(items)
        return self.batch

    # on_validation_end, not on_validation_epoch_end: callbacks run before the
    # module's hook, and only after it does latest_usage hold this validation.
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_epochs += 1
        if (self.val_epochs - 1) % self.log_every_n_val_epochs or not trainer.is_global_zero:
            return
        batch = self.fixed_batch(trainer)
        if "x" not in batch:  # every item unreadable
            return
        batch = trainer.precision_plugin.convert_input(move_data_to_device(batch, pl_module.device))
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            x_hat, _ = pl_module(batch["x"], batch.get("mask"))
        x, x_hat = batch["x"].float().cpu(), x_hat.float().cpu()

        folder = Path(trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        picture = folder / f"step{trainer.global_step:07d}.png"
        clips, sample_rate = [], None
        if "lengths" in batch:
            sample_rate = trainer.datamodule.sample_rate
            clips = [(x[i, 0, :n].numpy(), x_hat[i, 0, :n].clamp(-1, 1).numpy()) for i, n in enumerate(batch["lengths"].tolist())]
            self.save_audio(clips, sample_rate, picture.with_suffix(""))
            save_spectrograms(clips, sample_rate, picture)
        else:
            save_image(torch.cat([x, x_hat]).add(1).div(2).clamp(0, 1), picture, nrow=len(x), pad_value=1.0)
        if loggers := wandb_loggers(trainer):
            media = self.wandb_media(pl_module, picture, clips, sample_rate)
            for logger in loggers:
                logger.log_metrics(media, step=trainer.global_step)

    @staticmethod
    def save_audio(clips: list[tuple[np.ndarray, np.ndarray]], sample_rate: int, folder: Path) -> None:
        folder.mkdir(exist_ok=True)
        for i, pair in enumerate(clips):
            for kind, clip in zip(("original", "reconstruction"), pair):
                sf.write(folder / f"item{i}_{kind}.wav", clip, sample_rate)

    @staticmethod
    def wandb_media(pl_module: L.LightningModule, picture: Path, clips: list[tuple[np.ndarray, np.ndarray]],
                    sample_rate: int | None) -> dict:
        import wandb

        media = {"val/reconstructions": wandb.Image(str(picture))}
        if clips:
            media["val/audio"] = [wandb.Audio(clip, sample_rate=sample_rate, caption=f"item{i} {kind}")
                                  for i, pair in enumerate(clips) for kind, clip in zip(("original", "reconstruction"), pair)]
        usage = getattr(pl_module, "latest_usage", {}).get("val")
        if usage is not None:
            counts = usage["counts"].cpu().numpy()
            for q, size in enumerate(pl_module.quantizer.codebook_sizes):
                media[f"val/usage_histogram/codebook{q}"] = wandb.Histogram(np_histogram=code_histogram(counts[q, :size]))
        return media
