"""LPIPS (Zhang et al. 2018, https://arxiv.org/abs/1801.03924), VGG16 version: the
perceptual loss of VQGAN-class tokenizers and an image metric.

    d(x, y) = sum_l mean_hw  w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2

with f_l the VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3,
unit-normalised over channels, and w_l the learned linear heads. As in
richzhang/PerceptualSimilarity (`lpips/pretrained_networks.py`, `lpips/lpips.py`),
which torchmetrics' `_LPIPS` reproduces. Weights come from local files only:

- the linear heads ship inside torchmetrics (`functional/image/lpips_models/vgg.pth`);
- VGG16 is torchvision's ImageNet checkpoint in torch's hub cache (`VGG16_FILE`).

The weights are fixed: they are kept as non-persistent buffers, so no optimizer,
gradient, EMA or checkpoint ever holds them, while gradients reach the input.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchmetrics
from einops import repeat
from torch import Tensor, nn

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
LPIPS_HEADS = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"

# the last layer of each tap in torchvision's vgg16().features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
# the input scaling layer of the original LPIPS: [-1, 1] -> ImageNet-normalised
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class MissingWeights(FileNotFoundError):
    """A pretrained weight file is not where the loader looks; the message says what to fetch and where."""


def missing_weights(path: Path, url: str, purpose: str) -> MissingWeights:
    return MissingWeights(
        f"{purpose} needs {path.name}, not found at {path}. Nothing is downloaded here: fetch it on a machine "
        f"with network (`wget {url}`) and put it in {path.parent}/ (torch's hub cache, `torch.hub.get_dir()` "
        f"+ /checkpoints; set TORCH_HOME to move it)."
    )


def hub_checkpoint(filename: str, url: str, purpose: str) -> Path:
    """The path of a weight file in torch's hub cache, where torch.hub / torchvision keep downloads."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise missing_weights(path, url, purpose)
    return path


def vgg16_features() -> nn.Sequential:
    """torchvision's ImageNet VGG16 up to relu5_3, from the hub cache (never downloaded)."""
    import torchvision

    path = hub_checkpoint(VGG16_FILE, VGG16_URL, "LPIPS (VGG16 features)")
    model = torchvision.models.vgg16(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.features


def lpips_heads(path: Path = LPIPS_HEADS) -> list[Tensor]:
    """The five linear heads (1, C, 1, 1) of LPIPS-VGG: keys `lin{i}.model.1.weight`
    in the PerceptualSimilarity / torchmetrics layout (`model.0` is a dropout)."""
    if not path.is_file():
        raise MissingWeights(f"LPIPS needs its linear heads {path}, shipped with torchmetrics: reinstall torchmetrics")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"] for i in range(len(VGG16_TAPS))]


def freeze(module: nn.Module) -> nn.Module:
    """Turn every parameter into a non-persistent buffer: the module computes as before
    (and moves with `.to`), but has no parameters to train, average or checkpoint."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach(), persistent=False)
    return module.eval()


class LPIPS(nn.Module):
    """forward(x_hat, x) -> (B,) LPIPS distance per image; inputs (B, 3 or 1, H, W) in
    [-1, 1] (one channel is repeated to three), H and W >= 16.

    `features`: a VGG16 `features` stack (torchvision layout, at least up to relu5_3);
    by default the pretrained one from the hub cache. Tests inject random weights."""

    def __init__(self, features: nn.Sequential | None = None, heads: list[Tensor] | None = None):
        super().__init__()
        features = features if features is not None else vgg16_features()
        self.features = freeze(features[: VGG16_TAPS[-1] + 1])
        for i, head in enumerate(heads if heads is not None else lpips_heads()):
            if head.shape != (1, VGG16_CHANNELS[i], 1, 1):
                raise ValueError(f"LPIPS head {i} must have shape (1, {VGG16_CHANNELS[i]}, 1, 1), got {head.shape}")
            self.register_buffer(f"head{i}", head.detach().clone(), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: a fixed network."""
        return super().train(False)

    def taps(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised (over channels) activations at the five taps."""
        if x.shape[1] == 1:
            x = repeat(x, "b 1 h w -> b c h w", c=3)
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS takes images with 1 or 3 channels, got {x.shape[1]}")
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                # eps inside the root (torchmetrics' `_normalize_tensor`): a finite gradient where h = 0
                out.append(h / torch.sqrt(h.pow(2).sum(1, keepdim=True) + 1e-8))
        return out

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        both = self.taps(torch.cat([x_hat, x]))
        distance = 0
        for i, features in enumerate(both):
            fake, real = features.chunk(2)
            weighted = ((fake - real).pow(2) * getattr(self, f"head{i}")).sum(1)  # the 1x1 conv of the linear head
            distance = distance + weighted.mean((-2, -1))
        return distance
