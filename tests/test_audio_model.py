"""Padded audio end to end: the whole model under masks, on real FSDD clips."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate

from helpers import QUANTIZERS, fsdd_batch
from vqtrain.config import compose
from vqtrain.data.batch import Batch
from vqtrain.losses import masked_mse
from vqtrain.metrics import CodebookUsage, count_codes
from vqtrain.train import train


def audio_model(quantizer: str, tmp_path: Path, *overrides: str):
    torch.manual_seed(0)
    cfg = compose(["data=fsdd", f"quantizer={quantizer}", "quantizer.codebook_size=256", *overrides], tmp_path)
    return instantiate(cfg.model)


def training_step(model, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """One training forward/backward; what it produced and what it changed."""
    torch.manual_seed(1)
    model.train()
    x = x.clone().requires_grad_(True)
    x_hat, out = model(x, mask)
    recon = model.reconstruction(x_hat, x, mask)
    (recon + out.loss).backward()
    return {
        "losses": {
            "recon": recon.detach(),
            "total": out.loss.detach(),
            **{k: v.detach() for k, v in out.losses.items()},
        },
        "x_hat": x_hat.detach()[mask[:, None].expand_as(x_hat)],
        "indices": out.indices,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "input_grad": x.grad[mask[:, None].expand_as(x)],
        "buffers": {n: b.clone() for n, b in model.quantizer.named_buffers()},
    }


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_padding_garbage_changes_nothing_in_a_training_step(quantizer: str, fsdd_root: Path, tmp_path: Path):
    x, mask = fsdd_batch(fsdd_root)
    garbage = torch.where(mask[:, None], x, torch.full_like(x, 1e4))
    model = audio_model(quantizer, tmp_path)
    clean, dirty = training_step(copy.deepcopy(model), x, mask), training_step(copy.deepcopy(model), garbage, mask)
    for key in ("losses", "grads", "buffers"):
        assert clean[key].keys() == dirty[key].keys()
        for name in clean[key]:
            assert torch.equal(clean[key][name], dirty[key][name]), f"{key}: {name} changed"
    for key in ("x_hat", "indices", "input_grad"):
        assert torch.equal(clean[key], dirty[key]), key


def fit_on_one_batch(model, x: torch.Tensor, mask: torch.Tensor, steps: int) -> L.Trainer:
    """`steps` whole training steps of `model` on the batch (x, mask), every step logged."""
    batch = Batch(
        x=x, index=torch.arange(len(x)), skipped=torch.zeros((), dtype=torch.long), mask=mask, lengths=mask.sum(-1)
    )
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)
    trainer.fit(model, train_dataloaders=loader)
    return trainer


CODEC_QUANTIZERS = [
    q if q in ("vq_tricks", "fsq", "rvq") else pytest.param(q, marks=pytest.mark.slow) for q in QUANTIZERS
]


@pytest.mark.parametrize("quantizer", CODEC_QUANTIZERS)
def test_padding_garbage_changes_nothing_in_a_codec_training_step(quantizer: str, fsdd_root: Path, tmp_path: Path):
    """model=codec, two whole steps through Lightning: the generator (mel, waveform,
    adversarial and feature-matching terms from step 1), the discriminator's step, both
    optimisers and the EMA. Every weight, statistic, optimizer state and logged figure
    is bitwise the same whatever the padding holds."""
    x, mask = fsdd_batch(fsdd_root)
    garbage = torch.where(mask[:, None], x, torch.full_like(x, 1e4))
    model = audio_model(quantizer, tmp_path, "experiment=codec_tiny", "model.discriminator_start=1")
    clean, dirty = copy.deepcopy(model), copy.deepcopy(model)
    trainers = fit_on_one_batch(clean, x, mask, 2), fit_on_one_batch(dirty, garbage, mask, 2)
    logged = [t.logged_metrics for t in trainers]
    for term in ("mel_loss", "recon_loss", "adversarial_loss", "feature_matching_loss", "discriminator_loss"):
        assert f"train/{term}" in logged[0], term
    assert logged[0].keys() == logged[1].keys()
    for name in logged[0]:
        assert torch.equal(logged[0][name], logged[1][name]), name
    states = clean.state_dict(), dirty.state_dict()
    assert any(
        not torch.equal(v, model.state_dict()[k]) for k, v in states[0].items() if k.startswith("discriminator.")
    )
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    for a, b in zip(*(t.strategy.optimizers for t in trainers), strict=True):
        for state_a, state_b in zip(a.state.values(), b.state.values(), strict=True):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "rvq"])
def test_masked_loss_equals_the_length_weighted_loss_of_clips_alone(quantizer: str, fsdd_root: Path, tmp_path: Path):
    """Each layer re-zeroes positions past ceil(length / stride), so a padded clip sees
    the same zeros as a clip alone: the padded batch computes the same function."""
    x, mask = fsdd_batch(fsdd_root)
    model = audio_model(quantizer, tmp_path).eval()
    lengths = mask.sum(-1)
    with torch.no_grad():
        x_hat, out = model(x, mask)
        batch_recon = masked_mse(x_hat, x, mask)
        alone = [model(x[i : i + 1, :, :n], mask[i : i + 1, :n]) for i, n in enumerate(lengths.tolist())]
    weights = lengths.float() / lengths.sum()
    recon_alone = sum(
        w * masked_mse(y, x[i : i + 1, :, : y.shape[-1]]) for i, ((y, _), w) in enumerate(zip(alone, weights))
    )
    torch.testing.assert_close(batch_recon, recon_alone, rtol=1e-4, atol=1e-7)
    stride = model.encoder.stride
    latent_lengths = torch.tensor([math.ceil(n / stride) for n in lengths.tolist()])
    latent_weights = latent_lengths.float() / latent_lengths.sum()
    commitment_alone = sum(w * o.losses["commitment"] for (_, o), w in zip(alone, latent_weights))
    torch.testing.assert_close(out.losses["commitment"], commitment_alone, rtol=1e-4, atol=1e-7)
    for i, (y, o) in enumerate(alone):  # same codes and the same samples, clip by clip
        n = int(latent_lengths[i])
        assert torch.equal(out.indices[i, :n], o.indices[0])
        assert bool((out.indices[i, n:] == -1).all())
        torch.testing.assert_close(x_hat[i, :, : lengths[i]], y[0], rtol=1e-4, atol=1e-5)


def test_usage_counts_only_real_latent_positions(fsdd_root: Path, tmp_path: Path):
    x, mask = fsdd_batch(fsdd_root)
    model = audio_model("rvq", tmp_path).eval()
    with torch.no_grad():
        _, out = model(x, mask)
    usage = CodebookUsage(model.quantizer.codebook_sizes)
    usage.update(count_codes(out.indices, usage.codebook_sizes))
    real_latents = sum(math.ceil(n / model.encoder.stride) for n in mask.sum(-1).tolist())
    assert usage.counts.sum(-1).tolist() == [real_latents] * model.quantizer.num_levels


@pytest.mark.parametrize("quantizer", ["vq", "rvq"])
def test_fresh_model_spreads_a_quiet_speaker_over_codes(quantizer: str, fsdd_root: Path, tmp_path: Path):
    """FSDD clips at their recorded level (RMS ~0.01-0.1): the untrained model's latents
    follow the signal (no bias swamping it) and land on many codes, not one."""
    files = sorted(fsdd_root.glob("*_theo_*.wav"))[:4]
    x = torch.stack([torch.from_numpy(sf.read(f, dtype="float32", frames=2000)[0]) for f in files])[:, None]
    assert x.pow(2).mean().sqrt() < 0.05
    model = audio_model(quantizer, tmp_path).eval()
    with torch.no_grad():
        _, out = model(x, torch.ones(4, x.shape[-1], dtype=torch.bool))
    first_level = out.indices if out.indices.dim() == 2 else out.indices[..., 0]  # (B, T) or (B, T, levels)
    assert first_level.unique().numel() > 16


def read_column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_short_fsdd_run_beats_silence(quantizer: str, fsdd_root: Path, tmp_path: Path):
    """150 steps on the four training speakers; the masked MSE on the unseen validation
    speaker (clips at -20 dBFS, the fsdd default) must fall below predicting zeros."""
    cfg = compose(
        [
            "data=fsdd",
            f"data.root={fsdd_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"quantizer={quantizer}",
            "quantizer.codebook_size=256",
            "trainer.max_steps=150",
            "trainer.val_check_interval=150",
            "trainer.limit_val_batches=4",
            "data.batch_size=16",
            "data.max_length=1.0",
            "test=false",
            "trainer.enable_progress_bar=false",
            "optimizer.lr=2e-3",
            "model.scheduler=null",
            "callbacks.reconstructions=null",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    silence, real = 0.0, 0
    for i, batch in enumerate(datamodule.val_dataloader()):
        if i == 4:
            break
        silence += batch.x[batch.mask[:, None]].pow(2).sum().item()
        real += int(batch.mask.sum())
    print(f"{quantizer}: masked val MSE {metrics['val/recon_loss']:.3g}, silence {silence / real:.3g}")  # pytest -s
    assert metrics["val/recon_loss"] < silence / real, (metrics["val/recon_loss"], silence / real)
