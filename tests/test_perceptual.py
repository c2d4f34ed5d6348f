"""LPIPS against torchmetrics' own `_LPIPS` (PerceptualSimilarity's layout) with the
real linear heads and one random-weight VGG16 shared by both: no pretrained VGG
here, and nothing downloaded. Random backbone weights, stated as such."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchmetrics.functional.image.lpips import _NoTrainLpips

from vqtrain.perceptual import LPIPS, VGG16_FILE, VGG16_URL, MissingWeights, vgg16_features


@pytest.fixture(scope="module")
def pair() -> tuple[LPIPS, nn.Module]:
    """(ours, torchmetrics') on the same random VGG16 (torchvision's init, seed 0) and the shipped heads."""
    torch.manual_seed(0)
    reference = _NoTrainLpips(pretrained=True, net="vgg", pnet_rand=True).double()
    slices = [
        reference.net.slice1,
        reference.net.slice2,
        reference.net.slice3,
        reference.net.slice4,
        reference.net.slice5,
    ]
    features = nn.Sequential(*[copy.deepcopy(layer) for block in slices for layer in block])
    return LPIPS(features).double(), reference


def images(seed: int, n: int = 3, channels: int = 3, size: int = 32) -> torch.Tensor:
    return (
        torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    )


def test_equals_torchmetrics_lpips_on_the_same_backbone(pair):
    ours, reference = pair
    x, x_hat = images(0), images(1)
    expected = reference(x_hat, x).flatten()
    got = ours(x_hat, x)
    assert got.shape == (3,) and (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    assert ours(x, x).abs().max() == 0


def test_one_channel_is_scored_as_grey_rgb(pair):
    ours, _ = pair
    x, x_hat = images(2, channels=1), images(3, channels=1)
    torch.testing.assert_close(ours(x_hat, x), ours(x_hat.expand(-1, 3, -1, -1), x.expand(-1, 3, -1, -1)))


def test_fixed_weights_gradients_reach_the_input_only(pair):
    ours, _ = pair
    ours.train()
    assert not ours.training and not ours.features.training
    assert list(ours.parameters()) == [] and ours.state_dict() == {}  # nothing to train, average or checkpoint
    x_hat = images(4).requires_grad_()
    ours(x_hat, images(5)).sum().backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0 and torch.isfinite(x_hat.grad).all()


def test_absent_vgg16_weights_name_the_file_its_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeights) as error:
        vgg16_features()
    message = str(error.value)
    assert VGG16_FILE in message and VGG16_URL in message and str(tmp_path / "checkpoints") in message
    assert not (tmp_path / "checkpoints").exists()  # nothing fetched
