"""ReconstructionLogger and WandbConfigLogger after tiny real fits: image grids,
audio WAVs at the data's rate and length, and what reaches a wandb logger."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from vqtrain.callbacks import ReconstructionLogger, SignalQuality, WandbConfigLogger, code_histogram
from vqtrain.data.audio import AudioDataModule
from vqtrain.data.images import ShapesDataModule
from vqtrain.model import DiscreteAutoencoder
from vqtrain.nets import ConvDecoder1d, ConvDecoder2d, ConvEncoder1d, ConvEncoder2d
from vqtrain.quality import SSIM, PerceptualDistance, ReconstructionFID
from vqtrain.quantizers import Quantizer, ResidualQuantizer, VectorQuantizer

LATENT = 8
IMAGE_SIZE = 16  # two stride-2 stages: 4 x 4 latents per image


def tiny_model(audio: bool = False, quantizer: Quantizer | None = None) -> DiscreteAutoencoder:
    quantizer = quantizer or VectorQuantizer(LATENT, codebook_size=16)
    if audio:
        encoder, decoder = ConvEncoder1d(1, LATENT, 8, [2, 2]), ConvDecoder1d(LATENT, 1, 8, [2, 2])
    else:
        encoder, decoder = ConvEncoder2d(1, LATENT, 8), ConvDecoder2d(LATENT, 1, 8)
    return DiscreteAutoencoder(encoder, quantizer, decoder, partial(torch.optim.Adam, lr=1e-3), LATENT, usage_window=2)


def fit(
    model: DiscreteAutoencoder,
    data: L.LightningDataModule,
    root: Path,
    callbacks: list,
    loggers=False,
    max_steps: int = 4,
    sanity_steps: int = 1,
) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=sanity_steps,
    )
    trainer.fit(model, datamodule=data)
    return trainer


def shapes(**options) -> ShapesDataModule:
    return ShapesDataModule(image_size=IMAGE_SIZE, num_train=32, num_val=8, num_test=8, batch_size=8, **options)


@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "on-device"])
def test_image_grid_shows_fixed_originals_above_reconstructions(on_device: bool, tmp_path: Path):
    data = shapes(on_device=on_device)
    fit(tiny_model(), data, tmp_path, [ReconstructionLogger(num_items=4, log_every_n_val_epochs=2)], max_steps=6)
    files = sorted(p.name for p in (tmp_path / "reconstructions").iterdir())
    assert files == ["step0000002.png", "step0000006.png"], "every 2nd of 3 validations, none for the sanity check"
    grid = np.asarray(Image.open(tmp_path / "reconstructions" / "step0000006.png").convert("L"), dtype=np.float32)
    cell, pad = IMAGE_SIZE, 2  # torchvision's make_grid: 2 rows of 4, 2-pixel padding
    assert grid.shape == (2 * (cell + pad) + pad, 4 * (cell + pad) + pad)
    for i in range(4):
        left = pad + i * (cell + pad)
        original = (data.val_set[i]["x"][0].numpy() + 1) / 2 * 255
        assert np.abs(grid[pad : pad + cell, left : left + cell] - original).max() <= 1, f"top row, item {i}"
        assert np.abs(grid[2 * pad + cell : 2 * (pad + cell), left : left + cell] - original).max() > 1, (
            "bottom row: reconstructions"
        )


def test_audio_wavs_have_the_data_rate_and_item_lengths(tmp_path: Path):
    source_rate, rate = 16000, 8000  # files are resampled on reading: the WAVs must follow the data module
    clips = tmp_path / "clips"
    clips.mkdir()
    generator = np.random.default_rng(0)
    lengths = [900, 1300, 700, 1100, 1500, 800, 1000, 1200]
    for i, length in enumerate(lengths):
        t = np.arange(length) / source_rate
        sf.write(
            clips / f"clip{i}.wav",
            0.5 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * generator.standard_normal(length),
            source_rate,
        )
    data = AudioDataModule(
        str(clips),
        sample_rate=rate,
        split=lambda files: {"train": files[:5], "val": files[5:], "test": []},
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    fit(tiny_model(audio=True), data, tmp_path / "run", [ReconstructionLogger(num_items=2)])

    folder = tmp_path / "run" / "reconstructions"
    assert (folder / "step0000002.png").is_file() and (folder / "step0000004.png").is_file(), "spectrograms"
    assert sorted(p.name for p in (folder / "step0000004").iterdir()) == [
        "item0_original.wav",
        "item0_reconstruction.wav",
        "item1_original.wav",
        "item1_reconstruction.wav",
    ]
    for i in range(2):
        expected = data.val_set[i]["x"][0].numpy()
        assert data.val_set.files[i] == f"clip{5 + i}.wav" and len(expected) == lengths[5 + i] // 2
        for kind in ("original", "reconstruction"):
            info = sf.info(folder / "step0000004" / f"item{i}_{kind}.wav")
            assert (info.samplerate, info.frames) == (rate, len(expected)), kind
        original, _ = sf.read(folder / "step0000004" / f"item{i}_original.wav", dtype="float32")
        np.testing.assert_allclose(original, expected, atol=1 / 2**15 + 1e-6)


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that records what it is given instead of starting wandb."""

    def __init__(self):
        super().__init__(offline=True)
        self.logged: list[tuple[int | None, dict]] = []
        self.config: dict = {}

    @property
    def experiment(self):
        return SimpleNamespace(
            config=SimpleNamespace(update=lambda config, allow_val_change: self.config.update(config))
        )

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def test_wandb_gets_config_media_and_usage_histograms_per_codebook(tmp_path: Path):
    levels = partial(VectorQuantizer, codebook_size=16)
    model = tiny_model(quantizer=ResidualQuantizer(LATENT, levels, num_levels=2))
    model.run_config = {"quantizer": {"codebook_size": 16}, "seed": 0}
    logger = RecordingWandbLogger()
    # no sanity check: the first validation's histograms must be its own, not left over
    fit(
        model,
        shapes(),
        tmp_path,
        [ReconstructionLogger(num_items=4), WandbConfigLogger()],
        loggers=[logger],
        sanity_steps=0,
    )

    assert logger.config == model.run_config
    media = {step: metrics for step, metrics in logger.logged if "val/reconstructions" in metrics}
    assert sorted(media) == [2, 4]
    assert isinstance(media[4]["val/reconstructions"], wandb.Image)
    latents_per_epoch = 8 * (IMAGE_SIZE // 4) ** 2  # the whole validation set, once per level
    for step, q in [(2, 0), (2, 1), (4, 0), (4, 1)]:
        histogram = media[step][f"val/usage_histogram/codebook{q}"]
        assert isinstance(histogram, wandb.Histogram) and len(histogram.histogram) == 16
        assert sum(histogram.histogram) == latents_per_epoch
        if step == 4:
            assert histogram.histogram == model.latest_usage["val"]["counts"][q].tolist()


@pytest.mark.parametrize("size", [16, 1000, 65536])
def test_code_histogram_keeps_every_use_within_wandbs_bin_limit(size: int):
    counts = np.random.default_rng(size).integers(0, 5, size)
    values, edges = code_histogram(counts)
    assert len(values) == min(size, 512) and len(edges) == len(values) + 1
    assert values.sum() == counts.sum() and (edges[0], edges[-1]) == (0, size)
    if size <= 512:
        np.testing.assert_array_equal(values, counts)


def test_signal_quality_scores_every_validation_and_the_test_pass_from_their_own_forward(tmp_path: Path):
    """Random-weight VGG16 and a pooled projection stand in for the pretrained networks."""
    torch.manual_seed(0)
    vgg, pooled = make_layers(cfgs["D"]), nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
    quality = SignalQuality(["mse", "psnr", "ssim", "lpips", "rfid"], networks={"lpips": vgg, "rfid": pooled})
    model, data = tiny_model(), shapes()
    trainer = fit(model, data, tmp_path, [quality], max_steps=4)
    assert {f"val/{name}" for name in ("mse", "psnr", "ssim", "lpips", "rfid")} <= set(trainer.callback_metrics)
    [logged] = trainer.test(model, datamodule=data, verbose=False)

    references = [SSIM(), PerceptualDistance(vgg), ReconstructionFID(pooled)]
    model.eval()
    with torch.no_grad():
        for batch in data.test_dataloader():
            x_hat = model(batch.x).x_hat
            for reference in references:
                reference.update(x_hat, batch.x)
    for reference in references:
        assert logged[f"test/{reference.name}"] == pytest.approx(reference.compute().item(), rel=1e-5), reference.name
    assert logged["test/mse"] == pytest.approx(logged["test/recon_loss"], rel=1e-5)
    assert quality.implementations["rfid"].startswith("torchmetrics FrechetInceptionDistance")
