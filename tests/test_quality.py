"""Reconstruction quality figures against references: PSNR by hand, SSIM against
scikit-image's algorithm (transcribed with scipy, since scikit-image is not a
dependency), rFID against torchmetrics' own FID and a hand Frechet distance on the
same injected features (no Inception here), SI-SNR against torchmetrics, STOI and
PESQ against pystoi and pesq on real FSDD clips. Padding never counts."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy import linalg
from scipy.ndimage import gaussian_filter
from torch import nn
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance

from vqtrain.config import InvalidConfig
from vqtrain.perceptual import MissingWeights
from vqtrain.quality import (
    INCEPTION_FILE,
    INCEPTION_URL,
    PESQ,
    PSNR,
    SISNR,
    SSIM,
    STOI,
    MelDistance,
    ReconstructionFID,
    build_metrics,
)


def image_pair(seed: int, n: int = 4, channels: int = 3, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth images in [-1, 1] and a noisy reconstruction of them (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.interpolate(torch.rand(n, channels, 6, 6, generator=g, dtype=torch.float64), size=size)
    x = x * 2 - 1
    return x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64), x


def ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range) of one channel, transcribed."""
    blur = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # 11 taps
    ua, ub = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ua * ua, blur(b * b) - ub * ub, blur(a * b) - ua * ub
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ua * ub + c1) * (2 * cov + c2) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
    return float(s[5:-5, 5:-5].mean())  # skimage crops (win_size - 1) // 2


def test_psnr_and_ssim_accumulate_the_per_image_references():
    psnr, ssim, expected_psnr, expected_ssim = PSNR(), SSIM(), [], []
    for seed in (0, 1):  # two batches
        x_hat, x = image_pair(seed)
        psnr.update(x_hat, x)
        ssim.update(x_hat, x)
        expected_psnr += (10 * torch.log10(4 / (x_hat - x).pow(2).flatten(1).mean(1))).tolist()
        expected_ssim += [
            np.mean([ssim_reference(a[c].numpy(), b[c].numpy(), 2.0) for c in range(3)]) for a, b in zip(x_hat, x)
        ]
    assert psnr.compute().item() == pytest.approx(np.mean(expected_psnr), rel=1e-7)  # torchmetrics: float32 log(range)
    assert ssim.compute().item() == pytest.approx(np.mean(expected_ssim), rel=1e-6)  # torchmetrics' float32 kernel
    assert 0 < np.mean(expected_ssim) < 1


class PooledProjection(nn.Module):
    """A small fixed feature network (random projection of 4x4 average pools): not Inception."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, self.num_features))
        torch.manual_seed(0)
        nn.init.normal_(self.net[2].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_rfid_equals_torchmetrics_fid_and_a_hand_frechet_distance_on_the_same_features():
    features = PooledProjection()
    ours = ReconstructionFID(features)
    reference = FrechetInceptionDistance(feature=features, normalize=True)
    real, fake = [], []
    for seed in range(4):
        x_hat, x = image_pair(seed, n=16, channels=1)
        x_hat, x = (0.6 * x_hat).float(), x.float()  # washed out: another distribution
        ours.update(x_hat, x)  # grey images in [-1, 1], reconstructions beyond it
        unit = [t.clamp(-1, 1).add(1).div(2).expand(-1, 3, -1, -1) for t in (x_hat, x)]
        reference.update(unit[1], real=True)
        reference.update(unit[0], real=False)
        with torch.no_grad():
            fake.append(features(unit[0]).double().numpy())
            real.append(features(unit[1]).double().numpy())
    fid = ours.compute().item()
    assert fid == pytest.approx(reference.compute().item(), rel=1e-6)
    assert fid == pytest.approx(frechet_distance(np.concatenate(real), np.concatenate(fake)), rel=1e-4)
    assert fid > 0.1
    ours.reset()
    x_hat, x = image_pair(9, n=16, channels=1)
    ours.update(x.float(), x.float())
    assert abs(ours.compute().item()) < 1e-3  # perfect reconstructions


def test_absent_inception_weights_name_the_file_its_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeights) as error:
        ReconstructionFID()
    assert all(part in str(error.value) for part in (INCEPTION_FILE, INCEPTION_URL, str(tmp_path / "checkpoints")))


def test_metric_names_and_modalities_are_checked():
    """As an InvalidConfig, which the CLI prints as one line (a ValueError was a traceback from setup)."""
    assert [m.name for m in build_metrics(None, "image")] == ["mse", "psnr", "ssim"]
    assert [m.name for m in build_metrics(None, "audio", 8000)] == ["mse", "si_snr", "mel_distance"]
    with pytest.raises(InvalidConfig, match=r"callbacks.signal_quality.metrics: unknown metric 'fid'"):
        build_metrics(["psnr", "fid"], "image")
    with pytest.raises(
        InvalidConfig, match="callbacks.signal_quality.metrics: stoi scores audio, the model takes image"
    ):
        build_metrics(["stoi"], "image")
    with pytest.raises(InvalidConfig, match="callbacks.signal_quality.sample_rate: mel_distance needs"):
        build_metrics(None, "audio")


# --- audio, on real FSDD clips ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdd_batch(fsdd_root):
    """Three clips of different lengths, zero-padded into (3, 1, T), plus lightly (20 dB) and
    heavily (0 dB SNR) noisy versions whose padding holds loud noise that must not count."""
    clips = [torch.from_numpy(sf.read(fsdd_root / f"{d}_jackson_0.wav", dtype="float64")[0]) for d in (0, 3, 7)]
    lengths = torch.tensor([len(c) for c in clips])
    assert lengths.unique().numel() == 3
    x = torch.zeros(3, 1, int(lengths.max()), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    noisy = {}
    for snr in (20, 0):
        noisy[snr] = torch.randn(x.shape, generator=g, dtype=torch.float64)  # loud in the padding
        for i, clip in enumerate(clips):
            noise = noisy[snr][i, 0, : len(clip)]
            noise *= clip.norm() / noise.norm() / 10 ** (snr / 20)
            noisy[snr][i, 0, : len(clip)] = clip + noise
    for i, clip in enumerate(clips):
        x[i, 0, : len(clip)] = clip
    return x, noisy, lengths, clips


def per_clip_mean(metric, x_hat, x, lengths) -> float:
    metric.update(x_hat, x, lengths)
    return metric.compute().item()


def test_stoi_equals_pystoi_per_clip_and_ranks_clean_above_noisy(fsdd_batch):
    from pystoi import stoi

    x, noisy, lengths, clips = fsdd_batch
    scores = {}
    for snr, x_hat in noisy.items():
        scores[snr] = per_clip_mean(STOI(8000), x_hat, x, lengths)
        expected = [stoi(c.numpy(), x_hat[i, 0, : len(c)].numpy(), 8000) for i, c in enumerate(clips)]
        assert scores[snr] == pytest.approx(np.mean(expected), rel=1e-12)
    assert scores[20] > scores[0] + 0.1 and per_clip_mean(STOI(8000), x, x, lengths) == pytest.approx(1.0)


def test_clips_too_short_for_stoi_are_left_out_and_counted(fsdd_batch):
    x, noisy, lengths, clips = fsdd_batch
    short = torch.tensor([int(lengths[0]), 2000])  # 0.25 s: under STOI's 30 frames of speech
    both, alone = STOI(8000), STOI(8000)
    both.update(noisy[20][:2], x[:2], short)
    alone.update(noisy[20][:1], x[:1], short[:1])
    assert both.compute() == alone.compute() and both.unscored == 1 and alone.unscored == 0


def test_pesq_narrowband_at_8khz_equals_pesq_per_clip_and_ranks_clean_above_noisy(fsdd_batch):
    pesq = pytest.importorskip("pesq", reason="optional: pip install -c constraints.txt -e '.[pesq]'").pesq
    x, noisy, lengths, clips = fsdd_batch
    scores = {}
    for snr, x_hat in noisy.items():
        metric = PESQ(8000)
        assert metric.name == "pesq_nb"
        scores[snr] = per_clip_mean(metric, x_hat, x, lengths)
        expected = [pesq(8000, c.numpy(), x_hat[i, 0, : len(c)].numpy(), "nb") for i, c in enumerate(clips)]
        assert scores[snr] == pytest.approx(np.mean(expected), rel=1e-12)
    assert scores[20] > scores[0] + 0.5
    assert PESQ(16000).name == "pesq_wb" and PESQ(24000).name == "pesq_wb"


def test_si_snr_and_mel_distance_score_each_clip_on_its_real_samples(fsdd_batch):
    x, noisy, lengths, clips = fsdd_batch
    x_hat = noisy[20]
    expected = [scale_invariant_signal_noise_ratio(x_hat[i, 0, : len(c)], c).item() for i, c in enumerate(clips)]
    assert per_clip_mean(SISNR(), x_hat, x, lengths) == pytest.approx(np.mean(expected), rel=1e-9)
    assert np.mean(expected) == pytest.approx(20, abs=0.1)

    alone = [
        per_clip_mean(MelDistance(8000), x_hat[i : i + 1, :, : len(c)], c.view(1, 1, -1), None)
        for i, c in enumerate(clips)
    ]
    batched = per_clip_mean(MelDistance(8000), x_hat, x, lengths)
    assert batched == pytest.approx(np.mean(alone), rel=1e-6)
    assert (
        per_clip_mean(MelDistance(8000), noisy[0], x, lengths)
        > batched
        > per_clip_mean(MelDistance(8000), x, x, lengths)
        == 0
    )
