"""Image data modules: item/batch layout, determinism, skipping of unreadable files, clear errors, real MNIST."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import MNIST

from helpers import SHARED_DATA
from vqtrain.config import InvalidConfig, MissingPath
from vqtrain.data.common import UnreadableItem
from vqtrain.data.images import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    ShapesDataModule,
    fit_images,
    to_signed,
)


def first_batch(loader) -> dict:
    return next(iter(loader))


# --- shapes --------------------------------------------------------------------


def small_shapes(**options) -> ShapesDataModule:
    module = ShapesDataModule(num_train=256, num_val=64, num_test=32, batch_size=16, **options)
    module.setup()
    return module


def test_shapes_are_deterministic_and_splits_differ():
    first, again, other_seed = small_shapes(), small_shapes(), small_shapes(seed=1)
    assert torch.equal(first.train_set.images, again.train_set.images)
    assert torch.equal(first.val_set.images, again.val_set.images)
    assert not torch.equal(first.train_set.images, other_seed.train_set.images)
    assert not torch.equal(first.train_set.images[:64], first.val_set.images)
    assert [len(first.train_set), len(first.val_set), len(first.test_set)] == [256, 64, 32]


def test_shapes_split_does_not_depend_on_other_split_sizes():
    bigger_train = ShapesDataModule(num_train=512, num_val=64, num_test=32)
    bigger_train.setup()
    assert torch.equal(bigger_train.val_set.images, small_shapes().val_set.images)


def test_shapes_batches_through_the_dataloader():
    module = small_shapes()
    batch = first_batch(module.train_dataloader())
    assert batch.x.shape == (16, 1, 32, 32) and batch.x.dtype == torch.float32
    assert batch.index.shape == (16,) and batch.index.dtype == torch.int64
    assert batch.skipped.item() == 0
    images = torch.stack([module.train_set[i]["x"] for i in range(len(module.train_set))])
    assert images.min() == -1 and images.max() <= 1
    assert (images.amax(dim=(1, 2, 3)) > -0.5).all(), "every image shows at least one shape"
    assert ((images > -1).float().mean(dim=(1, 2, 3)) < 0.6).all(), "shapes do not fill the image"
    val = first_batch(module.val_dataloader())
    assert torch.equal(val.index, torch.arange(16)), "validation is not shuffled"


def test_shapes_in_rgb_repeat_the_gray_channel():
    x = small_shapes(channels=3).train_set[0]["x"]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_unsupported_channel_count_is_refused_at_construction():
    with pytest.raises(ValueError, match="data.channels"):
        ShapesDataModule(channels=2)


# --- image folder ----------------------------------------------------------------


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """train/ with two good images (different sizes, RGB and gray) and one corrupt file; val/ with one image."""
    rng = np.random.default_rng(0)
    write_image(tmp_path / "train" / "cats" / "a.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    write_image(tmp_path / "train" / "dogs" / "b.PNG", rng.integers(0, 256, (20, 20), dtype=np.uint8))
    (tmp_path / "train" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_image(tmp_path / "val" / "c.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return tmp_path


def test_image_folder_skips_and_counts_an_unreadable_file(image_tree: Path):
    module = ImageFolderDataModule(str(image_tree), image_size=16, batch_size=8)
    module.setup()
    assert [len(module.train_set), len(module.val_set), len(module.test_set)] == [3, 1, 1]
    batch = first_batch(module.train_dataloader())
    assert batch.x.shape == (2, 3, 16, 16)
    assert batch.skipped.item() == 1
    assert batch.x.min() >= -1 and batch.x.max() <= 1


def test_image_folder_strict_mode_names_the_unreadable_file(image_tree: Path):
    module = ImageFolderDataModule(str(image_tree), image_size=16, batch_size=8, strict=True)
    module.setup()
    with pytest.raises(RuntimeError, match="broken.png"):
        first_batch(module.train_dataloader())


def test_image_folder_resizes_the_shorter_side_and_crops_the_center(tmp_path: Path):
    wide = np.zeros((32, 96), dtype=np.uint8)
    wide[:, 32:64] = 255  # white center third, black sides
    write_image(tmp_path / "train" / "wide.png", wide)
    write_image(tmp_path / "val" / "black.png", np.zeros((8, 8), dtype=np.uint8))
    module = ImageFolderDataModule(str(tmp_path), image_size=8, channels=1)
    module.setup()
    x = module.train_set[0]["x"]
    assert x.shape == (1, 8, 8)
    assert (x[..., 1:-1] == 1).all(), "the white center of the wide image fills the crop"
    assert (x[..., [0, -1]] > 0).all(), "only antialiasing darkens the crop's edge columns"


def test_image_folder_scales_16_bit_images_and_skips_float_ones(tmp_path: Path):
    """16-bit PNGs and TIFFs once decoded clipped at 255: a gradient came out nearly all white."""
    gradient = np.arange(0, 65536, 257, dtype=np.uint16)[None].repeat(256, 0)  # 256 x 256, 0 to 65535
    write_image(tmp_path / "train" / "a.png", gradient)
    write_image(tmp_path / "train" / "b.tif", gradient)
    write_image(tmp_path / "train" / "c.tif", gradient.astype(np.float32) / 65535)
    write_image(tmp_path / "val" / "d.png", gradient[:8, :8])
    for channels in (1, 3):
        module = ImageFolderDataModule(str(tmp_path), image_size=256, channels=channels)
        module.setup()
        expected = to_signed(torch.arange(256, dtype=torch.uint8).expand(channels, 256, 256))
        for index in (0, 1):
            assert torch.equal(module.train_set[index]["x"], expected)
        with pytest.raises(UnreadableItem, match=r"c\.tif: 32-bit float pixels"):
            module.train_set[2]


def test_flat_image_folder_is_split_deterministically_by_path(tmp_path: Path):
    for i in range(40):
        write_image(tmp_path / f"{i:02d}.png", np.full((4, 4), i, dtype=np.uint8))
    splits = []
    for _ in range(2):
        module = ImageFolderDataModule(str(tmp_path), image_size=4, val_fraction=0.25)
        module.setup()
        splits.append((module.train_set.files, module.val_set.files))
    assert splits[0] == splits[1]
    train, val = splits[0]
    assert len(train) + len(val) == 40 and not set(train) & set(val)
    assert 3 <= len(val) <= 20
    assert module.test_set.files == val


def test_missing_image_folder_fails_at_setup_naming_the_path(tmp_path: Path):
    module = ImageFolderDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        module.setup()


def test_image_folder_without_images_fails_at_setup(tmp_path: Path):
    """StartupErrors, which the CLI prints in one line (they were tracebacks from inside fit's setup)."""
    (tmp_path / "notes.txt").write_text("no pictures here")
    module = ImageFolderDataModule(str(tmp_path))
    with pytest.raises(MissingPath, match=r"^data.root: no images with extensions .*\.png.* under " + str(tmp_path)):
        module.setup()
    write_image(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(InvalidConfig, match=r"data.val_fraction=0.05 splits the 1 images .* into 1 train / 0 val"):
        ImageFolderDataModule(str(tmp_path)).setup()


# --- torchvision data sets ---------------------------------------------------------


def test_mnist_splits_range_and_padding(mnist_root: Path):
    module = MNISTDataModule(str(mnist_root), batch_size=32)
    module.setup()
    assert [len(module.train_set), len(module.val_set), len(module.test_set)] == [55000, 5000, 10000]
    assert module.channels == 1 and module.image_size == 32
    batch = first_batch(module.train_dataloader())
    x = batch.x
    assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
    assert (border == -1).all(), "28x28 digits are padded to 32x32 with background"
    official_train = MNIST(str(mnist_root), train=True).data[:, None]
    assert torch.equal(module.val_set.images, official_train[-5000:]), "val is the held-out end of the train set"


def test_mnist_reads_the_gzipped_archives_as_torchvision_reads_the_gunzipped_files(mnist_root: Path):
    """The IDX files as distributed (`.gz`, as in ../shared/data) train without a gunzip step."""
    archives = SHARED_DATA / "MNIST" / "raw"
    for train in (True, False):
        from_archives = MNISTDataModule(str(archives.parents[1])).images(train)
        assert torch.equal(from_archives, MNIST(str(mnist_root), train=train).data[:, None])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:1000], "bytes of pixels where the header announces"),
        (lambda raw: b"\0\0\x08\x01" + raw[4:], "not an IDX file of uint8 images"),
        (lambda raw: b"", "not an IDX file of uint8 images (header empty)"),
    ],
)
def test_a_damaged_mnist_file_is_refused_naming_it(tmp_path: Path, damage, message: str):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    good = b"\0\0\x08\x03" + b"".join(int(n).to_bytes(4, "big") for n in images.shape) + images.tobytes()
    (raw_dir / "train-images-idx3-ubyte").write_bytes(good)
    with gzip.open(raw_dir / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(damage(good))
    module = MNISTDataModule(str(tmp_path))
    assert module.images(train=True).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        module.images(train=False)
    assert "t10k-images-idx3-ubyte.gz" in str(error.value)
    (raw_dir / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: unreadable gzip archive"):
        module.images(train=False)


def test_missing_mnist_names_the_expected_files_and_the_fix(tmp_path: Path):
    module = MNISTDataModule(str(tmp_path))
    expected = str(tmp_path / "MNIST" / "raw")
    with pytest.raises(FileNotFoundError, match="data.download=true") as error:
        module.setup()
    assert expected in str(error.value) and "data.root" in str(error.value)


def test_missing_cifar10_names_the_expected_folder(tmp_path: Path):
    module = CIFAR10DataModule(str(tmp_path))
    assert module.channels == 3
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        module.setup()


def test_fit_images_converts_channels_and_resizes():
    rgb = torch.ones(2, 3, 32, 32)
    rgb[:, 0] = -1  # cyan: no red, full green and blue
    gray = fit_images(rgb, image_size=64, channels=1)
    assert gray.shape == (2, 1, 64, 64)
    assert torch.allclose(gray, torch.full_like(gray, 1 - 2 * 0.299)), "luminance of cyan, resized unchanged"
