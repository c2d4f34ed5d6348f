"""Data at device speed: batches cut on the device (data.on_device, here with
the CPU standing in for the device) equal the DataLoader's bit for bit, in the
same order, over epochs and after a mid-epoch resume; when auto puts data on
the device; loader defaults by cores and device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import SHARED_DATA
from vqtrain.config import compose
from vqtrain.data.batch import Batch
from vqtrain.data.device import DeviceBatches, auto_workers, decide_on_device
from vqtrain.data.images import ImageDataModule, ImageFolderDataModule, MNISTDataModule, ShapesDataModule, TensorImages

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


class ColourThumbnails(ImageDataModule):
    """Random RGB 20 x 20 images: the conversion resizes them and takes their luminance."""

    def build_splits(self) -> tuple[TensorImages, ...]:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(256, (90, 3, 20, 20), dtype=torch.uint8, generator=generator)
        return TensorImages(images[:70], self.fit()), TensorImages(images[70:], self.fit()), None


def shapes(**options) -> ShapesDataModule:
    return ShapesDataModule(num_train=100, num_val=20, num_test=20, batch_size=16, **options)


def thumbnails(**options) -> ColourThumbnails:
    return ColourThumbnails(image_size=32, channels=1, batch_size=16, **options)


def mnist(**options) -> MNISTDataModule:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST absent: expected it in {SHARED_DATA / 'MNIST' / 'raw'}")
    return MNISTDataModule(str(SHARED_DATA), val_size=59_800, batch_size=64, **options)  # 200 training images


DATA = {
    "shapes": shapes,  # the conversion only rescales
    "shapes-rgb": lambda **options: shapes(channels=3, **options),  # repeats the gray channel
    "thumbnails": thumbnails,  # resizes, and the luminance of colour
    "mnist": mnist,  # pads 28 to 32
}


def epochs(make, on_device: bool, resume_at: dict | None = None, count: int = 2) -> list[list[Batch]]:
    """The training batches of epochs 0..count-1 as the fit loop draws them (set_epoch, then iterate),
    from a module resumed at `resume_at` if given, the epochs before it empty."""
    module = make(on_device=on_device)
    module.standalone_device = CPU
    module.setup("fit")
    if resume_at:
        module.load_state_dict(resume_at)
    loader = module.train_dataloader()
    assert isinstance(loader, DeviceBatches if on_device else DataLoader)
    batches = []
    for epoch in range(resume_at["epoch"] if resume_at else 0, count):
        loader.batch_sampler.sampler.set_epoch(epoch)
        batches.append(list(loader))
    return [[]] * (count - len(batches)) + batches


def assert_same(batches: list[Batch], expected: list[Batch]) -> None:
    assert len(batches) == len(expected) > 0
    for batch, reference in zip(batches, expected):
        for name in ("x", "index", "skipped"):
            value, wanted = getattr(batch, name), getattr(reference, name)
            assert value.dtype == wanted.dtype and torch.equal(value, wanted), name
        assert batch.mask is None and batch.lengths is None


@pytest.mark.parametrize("data", DATA)
def test_batches_cut_on_the_device_equal_the_dataloaders_also_after_a_resume(data: str):
    make = DATA[data]
    loaded = epochs(make, on_device=False)
    cut = epochs(make, on_device=True)
    assert [len(epoch) for epoch in cut] == [len(epoch) for epoch in loaded]
    for epoch, expected in zip(cut, loaded):
        assert_same(epoch, expected)
    assert not torch.equal(cut[0][0].index, cut[1][0].index), "each epoch has its own order"

    resumed = epochs(make, on_device=True, resume_at={"epoch": 1, "batches": 2})
    assert_same(resumed[1], loaded[1][2:])  # the rest of the stopped epoch, in its order
    resumed_at_epoch_start = epochs(make, on_device=True, resume_at={"epoch": 1, "batches": 0}, count=3)
    assert_same(resumed_at_epoch_start[1], loaded[1])


def test_each_rank_cuts_its_own_share_on_the_device(monkeypatch: pytest.MonkeyPatch):
    """Under DDP (two ranks here) every rank's batches are its DataLoader's, and the ranks' are disjoint."""
    monkeypatch.setattr("vqtrain.data.common.world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr("vqtrain.data.common.rank", lambda rank=rank: rank)
        (cut,) = epochs(shapes, on_device=True, count=1)
        assert_same(cut, epochs(shapes, on_device=False, count=1)[0])
        shares.append(set(torch.cat([batch.index for batch in cut]).tolist()))
    assert len(shares[0]) == len(shares[1]) == 48 and not shares[0] & shares[1]


@pytest.mark.parametrize("data", ["shapes", "thumbnails"])
def test_validation_batches_cut_on_the_device_equal_the_dataloaders(data: str):
    """Unshuffled, with a last short batch."""
    loaders = []
    for on_device in (False, True):
        module = DATA[data](on_device=on_device)
        module.standalone_device = CPU
        module.setup()
        loaders.append(list(module.val_dataloader()))
    assert len(loaders[1][-1]) < 16
    assert_same(loaders[1], loaders[0])


def test_the_converted_images_stay_on_the_device_for_later_loaders():
    module = shapes(on_device=True)
    module.standalone_device = CPU
    module.setup()
    first, again = module.train_dataloader(), module.train_dataloader()
    assert first.rows is again.rows and first.rows.shape == (100, 1, 32, 32)


# --- when data.on_device=auto puts the data on the device ----------------------------


@pytest.fixture
def free_device_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    """A CUDA device with 1 GiB free, whether or not this machine has one."""
    free = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 4 * free))
    return free


def test_auto_is_on_for_a_cuda_device_with_room_and_off_when_the_data_does_not_fit(free_device_memory: int):
    assert decide_on_device("auto", CUDA, free_device_memory // 8)
    assert not decide_on_device("auto", CUDA, free_device_memory // 2)  # the model needs the rest
    module = shapes()
    module.standalone_device = CUDA
    module.setup()
    assert module.train_set.converted_bytes() == 100 * 32 * 32 * 4 and module.on_device == "auto"
    assert decide_on_device(module.on_device, module.device, module.train_set.converted_bytes())


def test_auto_is_off_on_the_cpu_unless_forced():
    assert not decide_on_device("auto", CPU, 1)
    assert decide_on_device(True, CPU, 2**60) and not decide_on_device(False, CUDA, 1)
    module = shapes()
    module.standalone_device = CPU
    module.setup()
    assert isinstance(module.train_dataloader(), DataLoader)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_on_device_value_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"data\.on_device must be true, false or auto, got"):
        shapes(on_device=value)


def test_on_device_from_the_config_and_refused_for_image_files(tmp_path: Path):
    config = compose(["data=mnist", "data.on_device=sometimes"], tmp_path)
    with pytest.raises(Exception, match=r"data\.on_device must be true, false or auto, got 'sometimes'"):
        hydra.utils.instantiate(config.data)
    assert compose(["data=shapes"], tmp_path).data.on_device == "auto"
    with pytest.raises(ValueError, match=r"data\.on_device=true: ImageFolderDataModule decodes image files"):
        ImageFolderDataModule(str(tmp_path), on_device=True)


# --- loader defaults by cores and device ---------------------------------------------


@pytest.mark.parametrize(
    ("device", "cpus", "workers"),
    [(CPU, 64, 0), (CUDA, 1, 0), (CUDA, 2, 0), (CUDA, 3, 2), (CUDA, 16, 8), (CUDA, 128, 8)],
)
def test_auto_workers_by_device_and_cores(device: torch.device, cpus: int, workers: int):
    assert auto_workers(device, cpus) == workers


def test_loader_defaults_follow_the_trainers_device_and_share_the_cores(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("vqtrain.data.common.available_cpus", lambda: 16)
    module = shapes()
    module.standalone_device = CPU
    assert (module.num_workers, module.pin_memory) == (0, False)
    module.standalone_device = CUDA
    assert (module.num_workers, module.pin_memory) == (8, True)
    module.trainer = SimpleNamespace(num_devices=4, strategy=SimpleNamespace(root_device=CUDA))  # 4 processes
    assert module.device == CUDA and module.num_workers == 3
    explicit = shapes(num_workers=2, pin_memory=False)
    explicit.standalone_device = CUDA
    assert (explicit.num_workers, explicit.pin_memory) == (2, False)


@pytest.mark.parametrize(("key", "value"), [("num_workers", -1), ("num_workers", "many"), ("pin_memory", "auto?")])
def test_bad_loader_settings_are_refused_naming_the_key(key: str, value):
    with pytest.raises(ValueError, match=rf"data\.{key} must be"):
        shapes(**{key: value})
