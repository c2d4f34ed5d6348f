"""Image data: embedded procedural shapes, MNIST, CIFAR-10 and any folder of images.

Every item is {"x": float32 (C, H, W) in [-1, 1], "index": position in its split}.
`channels` and `image_size` are fixed at construction, because the model
configs interpolate `${data.channels}` before any data is read.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

from ..config import InvalidConfig, MissingPath, Required, check_paths
from .common import DataModule, UnreadableItem, hash_fraction
from .device import DeviceBatches, decide_on_device
from .shapes import draw_shapes

IMAGE_LAYOUT = "a folder tree of images"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
LUMINANCE = torch.tensor([0.299, 0.587, 0.114])


def to_signed(image: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.float() / 127.5 - 1


def fit_images(x: Tensor, image_size: int, channels: int, pad: bool = False) -> Tensor:
    """(B, C, h, w) in [-1, 1] -> (B, channels, image_size, image_size), padding with
    background (-1, keeps the native resolution) or resizing square images. Every
    image's result is independent of the others in its batch, bit for bit (the
    luminance is a fixed sum, not a reduction): per item or a whole split at once
    give the same pixels."""
    if x.shape[1] != channels:
        if channels == 3:
            x = x.repeat(1, 3, 1, 1)
        else:
            red, green, blue = LUMINANCE
            x = x[:, 0:1] * red + x[:, 1:2] * green + x[:, 2:3] * blue
    height, width = x.shape[-2:]
    if pad:
        top, left = (image_size - height) // 2, (image_size - width) // 2
        return F.pad(x, (left, image_size - width - left, top, image_size - height - top), value=-1.0)
    if (height, width) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x


class TensorImages(Dataset):
    """In-memory uint8 (N, C, h, w) images, converted by `fit` (batched, as
    `fit_images`) per item for a DataLoader, or all at once into rows on the
    device (`rows_on`) for batches cut there."""

    chunk = 4096  # images converted at a time for `rows_on`: bounds the host memory that takes

    def __init__(self, images: Tensor, fit: Callable[[Tensor], Tensor]):
        self.images = images
        self.fit = fit
        self.rows: Tensor | None = None
        self.rows_device: torch.device | None = None  # as asked for: "cuda" is not rows.device, "cuda:0"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.convert(self.images[index : index + 1])[0], "index": index}

    def convert(self, images: Tensor) -> Tensor:
        return self.fit(to_signed(images))

    def converted_bytes(self) -> int:
        """The size of `rows_on`'s tensor."""
        first = self.convert(self.images[:1])
        return len(self) * first.numel() * first.element_size()

    def rows_on(self, device: torch.device) -> Tensor:
        """Every image as `__getitem__` gives it, in one float32 tensor on `device`
        (converted on the host, so that both paths give the same pixels; kept for later loaders)."""
        if self.rows is None or self.rows_device != device:
            first = self.convert(self.images[:1])
            rows = torch.empty((len(self), *first.shape[1:]), dtype=first.dtype, device=device)
            for start in range(0, len(self), self.chunk):
                rows[start : start + self.chunk].copy_(self.convert(self.images[start : start + self.chunk]))
            self.rows, self.rows_device = rows, device
        return self.rows


def to_8_bits(image: Image.Image, path: Path) -> Image.Image:
    """16-bit grayscale (modes I;16*, I) scaled to 8 bits: PIL's conversion clips it at
    255, nearly all white. Float pixels (mode F) have no known range: unreadable."""
    if image.mode == "F":
        raise UnreadableItem(f"{path}: 32-bit float pixels, whose range is unknown (save it with 8 or 16 bits)")
    if image.mode == "I" or image.mode.startswith("I;16"):
        return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    return image


class ImageFiles(Dataset):
    """Image files, decoded on access: resized (shorter side) and center-cropped to a square."""

    def __init__(self, files: list[Path], image_size: int, channels: int):
        self.files = files
        self.image_size = image_size
        self.mode = "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = to_8_bits(image, path).convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableItem(f"{path}: {error}") from error
        image = TF.center_crop(TF.resize(image, [self.image_size]), [self.image_size])
        return {"x": to_signed(TF.pil_to_tensor(image)), "index": index}


class ImageDataModule(DataModule):
    """Base of the image data modules: subclasses build the (train, val, test) sets."""

    modality = "image"
    pad = False  # fit in-memory images to image_size by padding with background instead of resizing
    in_memory = True  # the splits are TensorImages, which can live on the device

    def __init__(self, image_size: int, channels: int, on_device: bool | str = "auto", **loader_options: Any):
        """on_device: batches cut on the device from the whole split held there
        (`decide_on_device`: auto is on for a CUDA device with room for it).
        loader_options: batch_size, num_workers, strict, pin_memory (see DataModule)."""
        super().__init__(**loader_options)
        if on_device != "auto" and not isinstance(on_device, bool):
            raise ValueError(f"data.on_device must be true, false or auto, got {on_device!r}")
        if on_device is True and not self.in_memory:
            raise ValueError(
                f"data.on_device=true: {type(self).__name__} decodes image files one by one; "
                "only data held in memory (shapes, mnist, cifar10) can live on the device"
            )
        self.on_device = on_device
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.channels = channels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def loader(
        self, dataset: Dataset, shuffle: bool, drop_last: bool = False, resume: bool = False
    ) -> DataLoader | DeviceBatches:
        """Batches cut on the device when data.on_device says so, else a DataLoader."""
        if not (self.in_memory and decide_on_device(self.on_device, self.device, dataset.converted_bytes())):
            return super().loader(dataset, shuffle, drop_last, resume)
        batches = self.batches(dataset, shuffle, drop_last, resume)
        return DeviceBatches(dataset.rows_on(self.device), batches, dataset, self.collate)

    def fit(self) -> Callable[[Tensor], Tensor]:
        """The conversion of in-memory images (a batch of them) to `channels` x `image_size`^2."""
        return partial(fit_images, image_size=self.image_size, channels=self.channels, pad=self.pad)


# --- shapes: the embedded default, no files --------------------------------


class ShapesDataModule(ImageDataModule):
    """Procedurally drawn grayscale shapes, generated in memory: the default
    data, no download. Each split has its own generator seed (3 * seed + 0, 1, 2),
    so a split does not change with the sizes of the others or overlap another seed's."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        num_train: int = 8192,
        num_val: int = 1024,
        num_test: int = 1024,
        seed: int = 0,
        **loader_options: Any,
    ):
        super().__init__(image_size, channels, **loader_options)
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(f"data.num_train/num_val/num_test must be >= 1, got {num_train}/{num_val}/{num_test}")
        self.sizes = (num_train, num_val, num_test)
        self.seed = seed

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val, test = (
            TensorImages(draw_shapes(count, self.image_size, 3 * self.seed + offset), self.fit())
            for offset, count in enumerate(self.sizes)
        )
        return train, val, test


# --- torchvision data sets ---------------------------------------------------


class TorchvisionDataModule(ImageDataModule):
    """A torchvision data set read from `root`: train = its official training
    images but the last `val_size`, val = those last `val_size` (so the official
    test set stays untouched for final numbers), test = the official test set."""

    dataset_class: type
    native_size: int
    file_names: tuple[str, ...]  # what torchvision reads in `folder()`

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        download: bool = False,
        val_size: int = 5000,
        **loader_options: Any,
    ):
        super().__init__(image_size, channels, **loader_options)
        if self.pad and image_size < self.native_size:
            raise ValueError(
                f"data.image_size must be >= {self.native_size} (images are padded, not shrunk), got {image_size}"
            )
        if val_size < 1:
            raise ValueError(f"data.val_size must be >= 1, got {val_size}")
        self.root = root
        self.download = download
        self.val_size = val_size

    def expected_files(self) -> str:
        raise NotImplementedError

    def folder(self) -> Path:
        """Where under `root` torchvision reads the files."""
        raise NotImplementedError

    def required_paths(self) -> list[Required]:
        if self.download:
            return []  # torchvision fetches what is missing
        expected = f"{self.expected_files()}; data.download=true fetches them"
        return [
            Required("data.root", self.folder(), expected),
            *(Required("data.root", self.file_path(name), expected, folder=False) for name in self.file_names),
        ]

    def file_path(self, name: str) -> Path:
        """Where one of `file_names` is read from."""
        return self.folder() / name

    def images(self, train: bool) -> Tensor:
        """uint8 (N, C, h, w) images of the official training or test set."""
        raise NotImplementedError

    def load(self, train: bool):
        """The torchvision data set, or an error naming the files to put where."""
        try:
            return self.dataset_class(self.root, train=train, download=self.download)
        except RuntimeError as error:
            if self.download:
                raise
            raise MissingPath(
                f"{self.dataset_class.__name__} not found: expected {self.expected_files()}. "
                f"Set data.download=true to fetch it, or set data.root to the folder holding it."
            ) from error

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train, test = self.images(train=True), self.images(train=False)
        if self.val_size >= len(train):
            raise InvalidConfig(f"data.val_size={self.val_size} leaves no training images (of {len(train)})")
        cut = len(train) - self.val_size
        fit = self.fit()
        return TensorImages(train[:cut], fit), TensorImages(train[cut:], fit), TensorImages(test, fit)


IDX_UINT8 = 0x08  # the IDX format's type byte for unsigned bytes (yann.lecun.com/exdb/mnist)


def read_idx_images(path: Path) -> Tensor:
    """uint8 (N, 1, h, w) images from an IDX file, gzipped (`.gz`) or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # a truncated or corrupt archive
        raise ValueError(f"{path}: unreadable gzip archive ({error})") from error
    if len(raw) < 16 or raw[:2] != b"\0\0" or raw[2] != IDX_UINT8 or raw[3] != 3:
        raise ValueError(f"{path}: not an IDX file of uint8 images (header {raw[:4].hex() or 'empty'})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    if len(raw) != 16 + shape[0] * shape[1] * shape[2]:
        raise ValueError(f"{path}: {len(raw) - 16} bytes of pixels where the header announces {shape}")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(shape[0], 1, shape[1], shape[2])


class MNISTDataModule(TorchvisionDataModule):
    """MNIST digits, padded with background from 28 to `image_size` (default 32,
    so that encoders halving the resolution per stage divide it evenly). Reads
    the IDX files as distributed (`*.gz`) or gunzipped, as torchvision leaves them."""

    dataset_class = datasets.MNIST
    native_size = 28
    file_names = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
    pad = True

    def __init__(self, root: str, image_size: int = 32, channels: int = 1, **options: Any):
        super().__init__(root, image_size, channels, **options)

    def folder(self) -> Path:
        return Path(self.root) / "MNIST" / "raw"

    def expected_files(self) -> str:
        return f"the IDX image files {self.folder()}/{{train,t10k}}-images-idx3-ubyte, gzipped (.gz) or not"

    def file_path(self, name: str) -> Path:
        """The gunzipped file if present, else the archive (else the gunzipped name, to report)."""
        plain, archive = self.folder() / name, self.folder() / f"{name}.gz"
        return archive if not plain.is_file() and archive.is_file() else plain

    def images(self, train: bool) -> Tensor:
        if self.download:
            self.load(train)  # torchvision fetches and gunzips what is missing
        check_paths(self.required_paths())
        return read_idx_images(self.file_path(self.file_names[0 if train else 1]))


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10, resized when `image_size` is not 32."""

    dataset_class = datasets.CIFAR10
    native_size = 32
    file_names = (
        *(name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list),
        datasets.CIFAR10.meta["filename"],
    )

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, **options: Any):
        super().__init__(root, image_size, channels, **options)

    def folder(self) -> Path:
        return Path(self.root) / datasets.CIFAR10.base_folder

    def expected_files(self) -> str:
        return f"the extracted python batches {self.folder()}/{{data_batch_1..5,test_batch,batches.meta}}"

    def images(self, train: bool) -> Tensor:
        return torch.from_numpy(self.load(train).data).permute(0, 3, 1, 2)


# --- any folder of images ------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order."""
    Required("data.root", folder, IMAGE_LAYOUT).check()
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
    if not files:
        raise MissingPath(f"data.root: no images with extensions {', '.join(IMAGE_EXTENSIONS)} under {folder}")
    return files


class ImageFolderDataModule(ImageDataModule):
    """Any folder tree of images (ImageNet layout or flat), resized and center-cropped
    to `image_size`. With `train/` and `val/` subfolders those are the splits (and
    `test/` if present, else val); otherwise a deterministic `val_fraction` of the
    files, chosen by a hash of the relative path, is val (and test)."""

    in_memory = False

    def __init__(
        self, root: str, image_size: int = 64, channels: int = 3, val_fraction: float = 0.05, **loader_options: Any
    ):
        super().__init__(image_size, channels, **loader_options)
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root)
        self.val_fraction = val_fraction

    def required_paths(self) -> list[Required]:
        return [Required("data.root", self.root, IMAGE_LAYOUT)]

    def split_files(self) -> tuple[list[Path], list[Path], list[Path]]:
        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            train, val = list_images(self.root / "train"), list_images(self.root / "val")
            return train, val, list_images(self.root / "test") if (self.root / "test").is_dir() else val
        files = list_images(self.root)
        val = [path for path in files if hash_fraction(path.relative_to(self.root)) < self.val_fraction]
        train = [path for path in files if hash_fraction(path.relative_to(self.root)) >= self.val_fraction]
        if not val or not train:
            raise InvalidConfig(
                f"data.val_fraction={self.val_fraction} splits the {len(files)} images under "
                f"{self.root} into {len(train)} train / {len(val)} val: change it or add images"
            )
        return train, val, val

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val, test = (ImageFiles(files, self.image_size, self.channels) for files in self.split_files())
        return train, val, test
