"""The neural codec (model=codec) on real FSDD clips: its parts under padding (the
SEANet / DAC nets, the multi-scale mel loss, the multi-scale STFT discriminator), the
codec_tiny preset from the CLI, every quantizer in the recipe. The whole training
step's padding invariance is in test_audio_model.py.

A padded clip must compute what it computes alone (equal up to float rounding: oneDNN
picks its kernels by tensor shape, so a batch of one and a batch of four round
differently), and garbage in the padding must change nothing, bitwise, gradients
included."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import QUANTIZERS, column, fsdd_batch, read_metrics, run_cli
from vqtrain.config import compose
from vqtrain.discriminators import MultiScaleSTFTDiscriminator
from vqtrain.losses import MultiScaleMelLoss
from vqtrain.nets import CodecDecoder, CodecEncoder
from vqtrain.train import train

SAMPLE_RATE = 8000  # FSDD
STRIDES = [2, 4, 5]
N_FFTS = [512, 256, 128]


def codec_nets(activation: str = "snake") -> tuple[CodecEncoder, CodecDecoder]:
    torch.manual_seed(0)
    return CodecEncoder(1, 16, 8, STRIDES, activation=activation), CodecDecoder(
        16, 1, 8, STRIDES, activation=activation
    )


def discriminator() -> MultiScaleSTFTDiscriminator:
    torch.manual_seed(0)
    return MultiScaleSTFTDiscriminator(N_FFTS, filters=8)


def distorted(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A reconstruction stand-in: quieter, with noise, zero in the padding like a decoder's output."""
    torch.manual_seed(2)
    return torch.where(mask[:, None], 0.7 * x + 0.01 * torch.randn_like(x), 0.0)


@pytest.mark.parametrize("activation", ["snake", "elu"])
def test_codec_nets_compute_each_clip_as_alone(activation: str, fsdd_root: Path):
    x, mask = fsdd_batch(fsdd_root)
    lengths = mask.sum(-1)
    encoder, decoder = codec_nets(activation)
    assert encoder.stride == math.prod(STRIDES)
    with torch.no_grad():
        z = encoder(x, lengths)
        y = decoder(z, lengths, x.shape[-1])
        for i, n in enumerate(lengths.tolist()):
            alone = lengths[i : i + 1]  # a clip alone is still cut at its end at every resolution, as the model does
            z_alone = encoder(x[i : i + 1, :, :n], alone)
            y_alone = decoder(z_alone, alone, n)
            frames = math.ceil(n / encoder.stride)
            assert z_alone.shape[-1] == frames
            torch.testing.assert_close(z[i, :, :frames], z_alone[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(y[i, :, :n], y_alone[0], rtol=1e-5, atol=1e-7)
            assert bool((z[i, :, frames:] == 0).all()) and bool((y[i, :, n:] == 0).all())
    assert y.abs().max() < 1  # tanh output


def test_codec_parts_ignore_garbage_in_the_padding(fsdd_root: Path):
    """Nets, mel loss and discriminator together, forward and backward: bitwise equal."""
    x, mask = fsdd_batch(fsdd_root)
    lengths = mask.sum(-1)
    garbage = torch.where(mask[:, None], x, torch.full_like(x, 1e4))

    def step(signal: torch.Tensor) -> dict[str, torch.Tensor]:
        (encoder, decoder), critic, mel = codec_nets(), discriminator(), MultiScaleMelLoss(SAMPLE_RATE)
        signal = signal.clone().requires_grad_(True)
        y = decoder(encoder(signal, lengths), lengths, signal.shape[-1])
        loss = mel(y, signal, lengths)
        for judgement in critic(y, lengths) + critic(signal, lengths):
            loss = loss + judgement.logits.mean() + sum(f.mean() for f in judgement.features)
        loss.backward()
        modules = {"encoder": encoder, "decoder": decoder, "critic": critic}
        grads = {f"{m}.{n}": p.grad for m, module in modules.items() for n, p in module.named_parameters()}
        return {"loss": loss.detach(), "y": y.detach(), "input_grad": signal.grad} | grads

    clean, dirty = step(x), step(garbage)
    assert clean.keys() == dirty.keys() and len(clean) > 50
    for name in clean:
        assert torch.equal(clean[name], dirty[name]), name
    assert bool((clean["input_grad"][~mask[:, None]] == 0).all())


@pytest.mark.parametrize("window", [32, 256, 2048])
def test_mel_loss_of_a_padded_batch_weights_clips_by_their_real_frames(window: int, fsdd_root: Path):
    """Frames centred in the padding are left out, so the batch loss is the mean over
    clips alone weighted by ceil(length / hop) frames each."""
    x, mask = fsdd_batch(fsdd_root)
    lengths, y = mask.sum(-1), distorted(x, mask)
    mel = MultiScaleMelLoss(SAMPLE_RATE, window_lengths=[window], n_mels=[{32: 5, 256: 40, 2048: 320}[window]])
    frames = torch.tensor([math.ceil(n / (window // 4)) for n in lengths.tolist()])
    alone = torch.stack(
        [mel(y[i : i + 1, :, :n], x[i : i + 1, :, :n], lengths[i : i + 1]) for i, n in enumerate(lengths.tolist())]
    )
    torch.testing.assert_close(mel(y, x, lengths), (alone * frames).sum() / frames.sum(), rtol=1e-5, atol=1e-6)


def test_mel_loss_sums_log10_distances_over_scales(fsdd_root: Path):
    """A 20 dB gain is 1 in log10 magnitude at every unclamped mel bin: DAC's sum over 7 scales gives 7."""
    x, mask = fsdd_batch(fsdd_root)
    lengths, mel = mask.sum(-1), MultiScaleMelLoss(SAMPLE_RATE)
    assert mel(x, x, lengths) == 0
    torch.testing.assert_close(mel(10 * x, x, lengths), torch.tensor(7.0), rtol=0.02, atol=0)
    assert mel(10 * x, x, lengths) <= 7


def test_ms_stft_discriminator_judges_each_clip_as_alone(fsdd_root: Path):
    x, mask = fsdd_batch(fsdd_root)
    lengths, critic = mask.sum(-1), discriminator()
    with torch.no_grad():
        batch = critic(x, lengths)
        assert len(batch) == len(N_FFTS)
        for i, n in enumerate(lengths.tolist()):
            for n_fft, judged, alone in zip(N_FFTS, batch, critic(x[i : i + 1, :, :n], lengths[i : i + 1])):
                frames = math.ceil(n / (n_fft // 4))
                assert judged.mask[i].sum() == frames and bool(judged.mask[i, :frames].all())
                for batch_map, alone_map in zip([judged.logits, *judged.features], [alone.logits, *alone.features]):
                    assert batch_map.shape[-1] == judged.mask.shape[-1]  # one time resolution throughout
                    torch.testing.assert_close(
                        batch_map[i, ..., :frames], alone_map[0, ..., :frames], rtol=1e-4, atol=1e-6
                    )
                    assert bool((batch_map[i, ..., frames:] == 0).all())


# --- the recipe: experiment=codec_tiny --------------------------------------------------

TERMS = ["loss", "recon_loss", "mel_loss", "adversarial_loss", "feature_matching_loss", "discriminator_loss"]


def tiny(fsdd_root: Path, cache: Path) -> list[str]:
    """codec_tiny cut to seconds: short crops, one validation and test batch, every step logged."""
    return [
        "experiment=codec_tiny",
        f"data.root={fsdd_root}",
        f"data.cache_dir={cache}",
        "data.batch_size=4",
        "data.max_length=0.25",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.reconstructions=null",
    ]


def test_codec_tiny_trains_from_the_cli_logging_every_term(fsdd_root: Path, tmp_path: Path):
    overrides = [
        "model.discriminator_start=2",
        "model.usage_window=3",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    ]
    result = run_cli(*tiny(fsdd_root, tmp_path / "cache"), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run_dir)
    for stage in ("train", "val", "test"):
        for term in [*TERMS, "commitment_loss", "utilization"]:
            assert column(rows, f"{stage}/{term}"), f"{stage}/{term}"
    assert len(column(rows, "train/discriminator_loss")) == len(column(rows, "train/feature_matching_loss")) == 4
    assert column(rows, "train/adaptive_weight") == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # fixed weights, as DAC
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert [int(s["state"][0]["step"]) for s in checkpoint["optimizer_states"]] == [6, 4]
    assert any(key.startswith("ema.shadow") for key in checkpoint["state_dict"])


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_quantizer_trains_in_the_codec_recipe(quantizer: str, fsdd_root: Path, tmp_path: Path):
    overrides = [f"quantizer={quantizer}", "model.discriminator_start=1", "trainer.max_steps=2"]
    train(
        compose(
            [*tiny(fsdd_root, tmp_path / "cache"), *overrides, "trainer.limit_val_batches=0", "test=false"], tmp_path
        )
    )
    rows = read_metrics(tmp_path)
    assert len(column(rows, "train/discriminator_loss")) == 1
    for term in TERMS:
        assert all(map(math.isfinite, column(rows, f"train/{term}"))), term
    assert len(column(rows, "train/loss")) == 2
