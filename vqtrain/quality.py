"""Reconstruction quality: the figures image and audio tokenizers are compared by.

Each figure is a torchmetrics `Metric` (states summed across ranks) that takes
`update(x_hat, x, lengths)`: images (B, C, H, W) in [-1, 1], or audio (B, 1, T)
with `lengths` the real samples of each clip. Padding never counts: every clip
is scored on its own real samples. Per-item figures are means over items;
`mse` is over all real samples; `rfid` is over the whole set.

FID implementations disagree by up to 2x on the same images, so every figure's
implementation is named in `IMPLEMENTATIONS` (written beside the figures by
`scripts/eval.py` and tabled in the README). Weights of the feature networks
come from local files only (`vqtrain.perceptual.hub_checkpoint`); tests inject
small networks instead.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import torch
import torchaudio
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

from vqtrain.config import InvalidConfig
from vqtrain.perceptual import LPIPS, hub_checkpoint

log = logging.getLogger(__name__)

DATA_RANGE = 2.0  # signals live in [-1, 1]
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
MEL = dict(n_fft=1024, hop_length=256, n_mels=80)  # mel_distance's one scale
MEL_FLOOR = 1e-5

IMPLEMENTATIONS = {
    "mse": "vqtrain: squared error summed over real samples / real samples",
    "psnr": "torchmetrics peak_signal_noise_ratio per image (data range 2), mean over images",
    "ssim": "torchmetrics structural_similarity_index_measure per image (Gaussian 11x11, sigma 1.5, data range 2), "
    "mean over pixels 5 px or more inside the border (= scikit-image's gaussian_weights=True), mean over images",
    "lpips": "vqtrain.perceptual.LPIPS: torchvision VGG16 IMAGENET1K_V1 + LPIPS v0.1 linear heads "
    "(torchmetrics' lpips_models/vgg.pth; = torchmetrics' _LPIPS), mean over images",
    "rfid": "torchmetrics FrechetInceptionDistance on torch-fidelity's InceptionV3 (TF 2015-12-05 weights, "
    "2048-d pool, 8-bit input, TF1 bilinear resize to 299), reconstructions against the originals of the split",
    "si_snr": "vqtrain.quality.si_snr (Le Roux et al. 2019, zero-mean) per clip, mean over clips",
    "mel_distance": "vqtrain: L1 of log10 mel magnitudes (torchaudio MelSpectrogram, n_fft 1024, hop 256, "
    "80 mels, floor 1e-5) per clip, mean over clips",
    "stoi": "pystoi.stoi (Taal et al. 2011; resamples to 10 kHz) per clip, mean over clips",
    "pesq_nb": "pesq (ITU-T P.862 narrowband, 8 kHz; other rates resampled to 8 kHz) per clip, mean over clips",
    "pesq_wb": "pesq (ITU-T P.862.2 wideband, 16 kHz; other rates resampled to 16 kHz) per clip, mean over clips",
}


def si_snr(estimate: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Scale-invariant SNR (dB) of each item over its real samples (weight 1),
    with the zero-mean signals of Le Roux et al. (2019), https://arxiv.org/abs/1811.02508."""
    weight = weight.flatten(1)
    estimate, target = estimate.flatten(1) * weight, target.flatten(1) * weight
    count = weight.sum(1, keepdim=True).clamp_min(1)
    estimate = estimate - estimate.sum(1, keepdim=True) / count * weight
    target = target - target.sum(1, keepdim=True) / count * weight
    eps = torch.finfo(estimate.dtype).eps
    projection = ((estimate * target).sum(1, keepdim=True) + eps) / (target.pow(2).sum(1, keepdim=True) + eps) * target
    noise = estimate - projection
    return 10 * torch.log10((projection.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))


def sample_weight(x: Tensor, lengths: Tensor | None) -> Tensor:
    """1 at real samples, 0 at padding, shaped like x (B, C, ..., T)."""
    if lengths is None:
        return torch.ones_like(x)
    real = torch.arange(x.shape[-1], device=x.device) < lengths[:, None]
    return real[:, None].expand_as(x).to(x.dtype)


def clips(x_hat: Tensor, x: Tensor, lengths: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(reconstruction, original) of each clip, 1-D, its real samples only."""
    for i in range(x.shape[0]):
        n = x.shape[-1] if lengths is None else int(lengths[i])
        yield x_hat[i, 0, :n], x[i, 0, :n]


class Quality(Metric):
    """A figure named `name` for one `modality`."""

    full_state_update = False
    name: str
    modality: str | None  # None: both
    needs_sample_rate = False
    min_image_size = 1  # px: smaller images it cannot score

    def update(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None = None) -> None:
        raise NotImplementedError


class MeanOverItems(Quality):
    """The mean over items of `scores` (one per image or clip)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def scores(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None) -> Tensor:
        raise NotImplementedError

    def update(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None = None) -> None:
        scores = self.scores(x_hat, x, lengths).to(self.total.device, torch.float64)
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class MSE(Quality):
    name, modality = "mse", None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("squared_error", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None = None) -> None:
        weight = sample_weight(x, lengths)
        self.squared_error += ((x_hat.double() - x.double()).pow(2) * weight).sum()
        self.samples += weight.sum()

    def compute(self) -> Tensor:
        return self.squared_error / self.samples.clamp_min(1)


class PSNR(MeanOverItems):
    name, modality = "psnr", "image"

    def scores(self, x_hat, x, lengths):
        return peak_signal_noise_ratio(x_hat, x, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))


class SSIM(MeanOverItems):
    """SSIM (Wang et al. 2004) with torchmetrics' Gaussian window (11 x 11, sigma 1.5),
    averaged over the pixels whose window lies inside the image, as scikit-image's
    `structural_similarity(gaussian_weights=True)` does: torchmetrics 1.9 averages
    over reflect-padded borders too (on noisy 32 px test images: 0.880 against 0.922)."""

    name, modality = "ssim", "image"
    border = 5  # (window - 1) // 2
    min_image_size = 2 * border + 1  # one pixel's window inside the image

    def scores(self, x_hat, x, lengths):
        if min(x.shape[-2:]) < self.min_image_size:
            raise ValueError(f"ssim needs images of at least {self.min_image_size} px, got {tuple(x.shape[-2:])}")
        _, full = structural_similarity_index_measure(x_hat, x, data_range=DATA_RANGE, return_full_image=True)
        b = self.border
        return full[..., b:-b, b:-b].mean((1, 2, 3))


class PerceptualDistance(MeanOverItems):
    """LPIPS of x_hat clamped to [-1, 1], the network's input range."""

    name, modality = "lpips", "image"

    def __init__(self, features: nn.Sequential | None = None, **kwargs):
        super().__init__(**kwargs)
        self.lpips = LPIPS(features)

    def scores(self, x_hat, x, lengths):
        return self.lpips(x_hat.float().clamp(-1, 1), x.float())


class ReconstructionFID(Quality):
    """rFID: the Frechet distance between features of the originals and of their
    reconstructions (Heusel et al. 2017, https://arxiv.org/abs/1706.08500), by
    torchmetrics' FID. Images go in as (B, 3, H, W) in [0, 1]: grey ones repeated
    to RGB, reconstructions clamped to the image range. The default network is
    torch-fidelity's InceptionV3 from the hub cache, fed 8-bit images and resized
    to 299 as torch-fidelity does (TF1-compatible bilinear, no antialiasing), so
    figures match torch-fidelity's own; an injected `features` gets the floats."""

    name, modality = "rfid", "image"

    def __init__(self, features: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        if features is None:
            path = hub_checkpoint(INCEPTION_FILE, INCEPTION_URL, "rFID (torch-fidelity's InceptionV3)")
            self.fid = FrechetInceptionDistance(
                feature=2048, normalize=True, feature_extractor_weights_path=str(path), antialias=False
            )
        else:
            self.fid = FrechetInceptionDistance(feature=features, normalize=True)

    @staticmethod
    def unit_rgb(images: Tensor) -> Tensor:
        images = images.float().clamp(-1, 1).add(1).div(2)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def update(self, x_hat: Tensor, x: Tensor, lengths: Tensor | None = None) -> None:
        self.fid.update(self.unit_rgb(x), real=True)
        self.fid.update(self.unit_rgb(x_hat), real=False)

    def compute(self) -> Tensor:
        return self.fid.compute()

    def reset(self) -> None:
        super().reset()
        self.fid.reset()


class SISNR(MeanOverItems):
    name, modality = "si_snr", "audio"

    def scores(self, x_hat, x, lengths):
        # float64: SI-SNR of a poor model is ill-conditioned in float32
        return si_snr(x_hat.double(), x.double(), sample_weight(x.double(), lengths))


class MelDistance(MeanOverItems):
    name, modality, needs_sample_rate = "mel_distance", "audio", True

    def __init__(self, sample_rate: int, **kwargs):
        super().__init__(**kwargs)
        # zero padding at the clip's ends: short clips work too, and nothing beyond the clip enters
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, power=1.0, pad_mode="constant", **MEL)

    def log_mel(self, clip: Tensor) -> Tensor:
        return self.mel(clip.float()).clamp_min(MEL_FLOOR).log10()

    def scores(self, x_hat, x, lengths):
        return torch.stack([(self.log_mel(a) - self.log_mel(b)).abs().mean() for a, b in clips(x_hat, x, lengths)])


class PerClipPackage(MeanOverItems):
    """A package's score of each clip (`score(degraded, clean)` on 1-D float64 CPU
    tensors), NaN where it cannot score the clip: such clips are left out of the
    mean and counted in a warning."""

    modality, needs_sample_rate = "audio", True
    undefined = ""  # when the package cannot score a clip, for the warning

    def __init__(self, sample_rate: int, **kwargs):
        super().__init__(**kwargs)
        self.sample_rate = sample_rate
        self.add_state("unscored", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def score(self, degraded: Tensor, clean: Tensor) -> float:
        raise NotImplementedError

    def scores(self, x_hat, x, lengths):
        pairs = clips(x_hat.double().cpu(), x.double().cpu(), lengths)
        scores = torch.tensor([self.score(a, b) for a, b in pairs], dtype=torch.float64)
        self.unscored += scores.isnan().sum().to(self.unscored.device)
        return scores[~scores.isnan()]

    def compute(self) -> Tensor:
        if self.unscored > 0:
            log.warning("%s: %d clips left out (%s)", self.name, int(self.unscored), self.undefined)
        return super().compute()


class STOI(PerClipPackage):
    """pystoi's STOI. It needs 30 frames (0.38 s at its 10 kHz) of non-silent speech
    and otherwise returns 1e-5 with a warning: such clips are left out (many FSDD
    clips are that short)."""

    name, undefined = "stoi", "under 30 non-silent STOI frames"

    def score(self, degraded, clean):
        from pystoi import stoi

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = stoi(clean.numpy(), degraded.numpy(), self.sample_rate)
        return float("nan") if any("Not enough STFT frames" in str(w.message) for w in caught) else value


class PESQ(PerClipPackage):
    """Wideband (P.862.2, 16 kHz) from 16 kHz up, narrowband (P.862, 8 kHz) below: clips
    are resampled to that rate. Clips PESQ cannot score (no speech found, or shorter
    than its 0.25 s buffer) are left out."""

    name, undefined = "pesq", "no speech found, or shorter than 0.25 s"  # logged as pesq_wb or pesq_nb

    def __init__(self, sample_rate: int, **kwargs):
        super().__init__(sample_rate, **kwargs)
        try:
            import pesq
        except ImportError as error:
            raise ImportError(
                "callbacks.signal_quality.metrics has pesq, which needs the `pesq` package: "
                "pip install -c constraints.txt -e '.[pesq]' (it builds from source: a C compiler and Python headers)"
            ) from error
        self.pesq = pesq
        self.rate, self.mode = (16000, "wb") if sample_rate >= 16000 else (8000, "nb")
        self.name = f"pesq_{self.mode}"

    def score(self, degraded, clean):
        degraded, clean = (
            torchaudio.functional.resample(s, self.sample_rate, self.rate).numpy() for s in (degraded, clean)
        )
        try:
            return self.pesq.pesq(self.rate, clean, degraded, self.mode)
        except (self.pesq.NoUtterancesError, self.pesq.BufferTooShortError):
            return float("nan")


METRICS = {
    cls.name: cls for cls in (MSE, PSNR, SSIM, PerceptualDistance, ReconstructionFID, SISNR, MelDistance, STOI, PESQ)
}  # by config name
DEFAULTS = {"image": ["mse", "psnr", "ssim"], "audio": ["mse", "si_snr", "mel_distance"]}  # cheap: on unless configured
NETWORKS = ("lpips", "rfid")  # the metrics whose feature network can be injected


def image_size_problem(names: list[str] | None, image_size: int) -> str | None:
    """What stops the metrics `names` (None: the defaults) from scoring images of
    `image_size` px, said before a run rather than at its first validation."""
    for name in DEFAULTS["image"] if names is None else names:
        need = getattr(METRICS.get(name), "min_image_size", 1)
        if image_size < need:
            return (
                f"data.image_size={image_size} (callbacks.signal_quality.metrics: {name} needs images of at "
                f"least {need} px; leave it out of the metrics or make the images larger)"
            )
    return None


def build_metrics(
    names: list[str] | None,
    modality: str,
    sample_rate: int | None = None,
    networks: dict[str, nn.Module] | None = None,
) -> list[Quality]:
    """The metrics `names` (config names, `METRICS`; None: the modality's `DEFAULTS`).
    `networks` replaces the pretrained feature network of `lpips` or `rfid` (tests)."""
    names = DEFAULTS[modality] if names is None else list(names)
    networks = networks or {}
    metrics = []
    for name in names:
        if name not in METRICS:
            raise InvalidConfig(
                f"callbacks.signal_quality.metrics: unknown metric {name!r}, choose from {sorted(METRICS)}"
            )
        cls = METRICS[name]
        if cls.modality not in (None, modality):
            raise InvalidConfig(
                f"callbacks.signal_quality.metrics: {name} scores {cls.modality}, the model takes {modality}"
            )
        kwargs = {}
        if cls.needs_sample_rate:
            if sample_rate is None:
                raise InvalidConfig(f"callbacks.signal_quality.sample_rate: {name} needs the audio's sample rate")
            kwargs["sample_rate"] = sample_rate
        if name in NETWORKS:
            kwargs["features"] = networks.get(name)
        metrics.append(cls(**kwargs))
    return metrics
