"""Callbacks. Keeping a run: `last.ckpt` after every validation and on a
scheduler's stop signal. Showing what scalar curves cannot: reconstructions of
fixed validation items, how codes are used, the config behind a run (wandb),
files skipped when scanning the data. Scoring: reconstruction quality in
validation and test."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import soundfile as sf
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Checkpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.exceptions import SIGTERMException
from matplotlib.figure import Figure
from torchvision.utils import save_image

from vqtrain.data.batch import Batch
from vqtrain.model import ModelOutput
from vqtrain.quality import IMPLEMENTATIONS, Quality, build_metrics
from vqtrain.utils import exists, mask_to_lengths

log = logging.getLogger(__name__)

MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit
SPECTROGRAM_FFT = 256
SPECTROGRAM_FLOOR_DB = -100.0


# --- showing progress --------------------------------------------------------------


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, redrawn at most every `interval` seconds, with the
    training loss read on logging steps only. Lightning redraws at every batch and
    reads every progress-bar figure back each time (a host-device sync each on a
    GPU): a fraction of a millisecond a step that a fast step feels. So the model
    logs `train/loss` for the loggers alone and this bar takes it when it is new."""

    def __init__(self, interval: float = 0.25):
        super().__init__()
        self.interval, self.drawn = interval, 0.0
        self.loss: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer._logger_connector.should_update_logs:  # as model.logging_step
            logged = trainer.callback_metrics.get("train/loss")
            self.loss = {} if logged is None else {"train/loss": float(logged)}
        super().on_train_batch_end(trainer, pl_module, *args)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return super().get_metrics(trainer, pl_module) | self.loss

    def _should_update(self, current: int, total: int) -> bool:  # Lightning's: every refresh_rate batches
        now = time.monotonic()
        if self.is_enabled and (current == total or now - self.drawn >= self.interval):
            self.drawn = now
            return True
        return False


def progress_bar(trainer_config) -> list[L.Callback]:
    """The progress bar to add to a trainer built from `trainer_config` (none when it is off)."""
    return [ProgressBar()] if trainer_config.get("enable_progress_bar", True) else []


# --- keeping a run ---------------------------------------------------------------


class LastCheckpoint(Checkpoint):
    """`<dirpath>/last.ckpt` after every validation and when training ends: what
    `resume=auto` and the tokenizer read. Lightning 2.6's ModelCheckpoint
    refreshes its last.ckpt only in a step that also saved a top-k checkpoint,
    so a run whose validation loss stopped improving would resume (or be
    tokenized) from an old step.

    A `Checkpoint`, so that Lightning runs it after the other callbacks, and after
    the ModelCheckpoint listed before it (configs/callbacks/default.yaml): the
    record of a validation's best is then in the last.ckpt saved at it, and a run
    resumed from there keeps one best step<N>.ckpt, as one never stopped does.

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
            trainer.save_checkpoint(self.path, weights_only=False)
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
            trainer.save_checkpoint(self.path, weights_only=False)
            log.warning(
                "stopped by a signal: saved %s at step %d; rerun in this run directory with resume=auto to continue",
                self.path,
                trainer.global_step,
            )


def forward_sigusr1() -> None:
    """Treat SIGUSR1 as SIGTERM, unless something handles it already."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, lambda *_: signal.raise_signal(signal.SIGTERM))


# --- showing a run ---------------------------------------------------------------


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
    spec = torch.stft(
        torch.from_numpy(clip),
        SPECTROGRAM_FFT,
        SPECTROGRAM_FFT // 4,
        window=window,
        pad_mode="constant",
        return_complex=True,
    ).abs()
    return (20 * spec.clamp_min(1e-5).log10()).numpy()


def save_spectrograms(clips: list[tuple[np.ndarray, np.ndarray]], sample_rate: int, path: Path) -> None:
    """One row per item: original | reconstruction, on one dB scale."""
    figure = Figure(figsize=(8, 1.6 * len(clips) + 0.4), layout="constrained")
    axes = figure.subplots(len(clips), 2, squeeze=False)
    top = max(float(log_spectrogram(original).max()) for original, _ in clips)
    for row, pair in zip(axes, clips):
        for ax, clip in zip(row, pair):
            extent = (0, len(clip) / sample_rate, 0, sample_rate / 2 / 1000)
            ax.imshow(
                log_spectrogram(clip),
                origin="lower",
                aspect="auto",
                extent=extent,
                cmap="magma",
                vmin=max(SPECTROGRAM_FLOOR_DB, top - 80),
                vmax=top,
            )
            ax.set_ylabel("kHz")
    axes[0, 0].set_title("original")
    axes[0, 1].set_title("reconstruction")
    axes[-1, 0].set_xlabel("s")
    axes[-1, 1].set_xlabel("s")
    figure.savefig(path, dpi=80)


class SkippedFilesLogger(L.Callback):
    """Files the data module left out when scanning (`skipped_files`: unusable
    audio) are logged as `data/skipped_files`, next to the model's running count
    of items skipped at load time (`data/skipped_items`)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped_files", None)
        if skipped is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"data/skipped_files": float(skipped)}, step=trainer.global_step)


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
    reconstructions (images) or spectrograms side by side (audio), and for audio step<N>/item<i>_{original,reconstruction}.wav at
    the data module's `sample_rate`. With a WandbLogger also the same media and
    histograms of each codebook's validation usage (`latest_usage["val"]`).
    """

    def __init__(self, num_items: int = 8, log_every_n_val_epochs: int = 1):
        if num_items < 1 or log_every_n_val_epochs < 1:
            raise ValueError(
                f"num_items and log_every_n_val_epochs must be >= 1, got {num_items} and {log_every_n_val_epochs}"
            )
        self.num_items = num_items
        self.log_every_n_val_epochs = log_every_n_val_epochs
        self.val_epochs = 0
        self.batch: Batch | None = None

    def fixed_batch(self, trainer: L.Trainer) -> Batch:
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
        if batch.x is None:  # every item unreadable
            return
        batch = trainer.precision_plugin.convert_input(move_data_to_device(batch, pl_module.device))
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            x_hat = pl_module(batch.x, batch.mask, batch.lengths).x_hat
        x, x_hat = batch.x.float().cpu(), x_hat.float().cpu()

        folder = Path(trainer.default_root_dir) / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        picture = folder / f"step{trainer.global_step:07d}.png"
        clips, sample_rate = [], None
        if pl_module.modality == "audio":
            sample_rate = trainer.datamodule.sample_rate
            clips = [
                (x[i, 0, :n].numpy(), x_hat[i, 0, :n].clamp(-1, 1).numpy())
                for i, n in enumerate(batch.lengths.tolist())
            ]
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
    def wandb_media(
        pl_module: L.LightningModule, picture: Path, clips: list[tuple[np.ndarray, np.ndarray]], sample_rate: int | None
    ) -> dict:
        import wandb

        media = {"val/reconstructions": wandb.Image(str(picture))}
        if clips:
            media["val/audio"] = [
                wandb.Audio(clip, sample_rate=sample_rate, caption=f"item{i} {kind}")
                for i, pair in enumerate(clips)
                for kind, clip in zip(("original", "reconstruction"), pair)
            ]
        usage = getattr(pl_module, "latest_usage", {}).get("val")
        if usage is not None:
            counts = usage["counts"].cpu().numpy()
            for q, size in enumerate(pl_module.quantizer.codebook_sizes):
                media[f"val/usage_histogram/codebook{q}"] = wandb.Histogram(
                    np_histogram=code_histogram(counts[q, :size])
                )
        return media


# --- scoring a run -------------------------------------------------------------------


class SignalQuality(L.Callback):
    """Reconstruction quality of every validation and of the test pass, logged as
    `val/<name>` and `test/<name>` (`vqtrain.quality`; `IMPLEMENTATIONS` says what
    computed each). `metrics`: config names, by default the modality's cheap ones
    (images: mse, psnr, ssim; audio: mse, si_snr, mel_distance); lpips, rfid, stoi
    and pesq are opt-in (pretrained networks, or per-clip work on the CPU).

    Read off the step's own forward pass through a hook, so nothing is computed
    twice or differently; in float32 with autocast off. Not in the sanity check.
    `networks` replaces the pretrained network of `lpips` or `rfid` (tests)."""

    def __init__(
        self, metrics: list[str] | None = None, sample_rate: int | None = None, networks: dict | None = None
    ) -> None:
        self.names = None if metrics is None else list(metrics)
        self.sample_rate = sample_rate
        self.networks = networks
        self.metrics: list[Quality] | None = None
        self.hook = None
        self.shape: tuple[int, ...] | None = None  # of the last input, per item

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Built once, at the start: a missing weight file or package stops the run before training."""
        if self.metrics is None:
            rate = self.sample_rate or getattr(trainer.datamodule, "sample_rate", None)
            self.metrics = build_metrics(self.names, pl_module.modality, rate, self.networks)

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            for metric in self.metrics:
                metric.to(pl_module.device).reset()
            self.hook = pl_module.register_forward_hook(self.record)

    def end(self, pl_module: L.LightningModule, stage: str) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
            for metric in self.metrics:  # compute() sums the states across ranks
                pl_module.log(f"{stage}/{metric.name}", metric.compute().float())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end(pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end(pl_module, "test")

    def record(self, model: L.LightningModule, inputs: tuple, output: ModelOutput | None) -> None:
        if not isinstance(output, ModelOutput):
            return  # under DDP the wrapper's call runs validation_step / test_step through forward: not a pass
        x, mask, lengths = (*inputs, None, None)[:3]
        if lengths is None and exists(mask):
            lengths = mask_to_lengths(mask)
        with torch.autocast(x.device.type, enabled=False):
            x, x_hat = x.float(), output.x_hat.detach().float()
            for metric in self.metrics:
                metric.update(x_hat, x, lengths)
        self.shape = tuple(x.shape[2:])

    @property
    def implementations(self) -> dict[str, str]:
        """What computed each figure, by logged name."""
        return {metric.name: IMPLEMENTATIONS[metric.name] for metric in self.metrics}
