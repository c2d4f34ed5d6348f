"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent), offline wandb."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from helpers import SHARED_DATA, TINY_RUN

os.environ["WANDB_MODE"] = "offline"
# Runs train on the CPU on every machine (configs/trainer/default.yaml): the bitwise checks
# (resume, seeds, ranks) rest on the CPU's reproducible sums, which CUDA's atomic adds and
# cuDNN's backward algorithms do not promise. tests/test_cuda.py asks for the GPU itself.
os.environ.setdefault("VQTRAIN_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_SILENT", "true")

FSDD = SHARED_DATA / "fsdd" / "recordings"


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding MNIST/raw/ with the shared gzipped files gunzipped, as torchvision reads them."""
    archives = sorted((SHARED_DATA / "MNIST" / "raw").glob("*.gz"))
    if len(archives) != 4:
        pytest.skip(f"real MNIST absent: expected 4 *.gz files in {SHARED_DATA / 'MNIST' / 'raw'}")
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in archives:
        with gzip.open(archive) as source, open(raw / archive.stem, "wb") as target:
            shutil.copyfileobj(source, target)
    return root


@pytest.fixture(scope="session")
def fsdd_root() -> Path:
    if not FSDD.is_dir() or not any(FSDD.glob("*.wav")):
        pytest.skip(f"real FSDD absent: expected WAV files in {FSDD}")
    return FSDD


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of 4 steps on the shapes data, validated at steps 2 and 4:
    step0000002.ckpt, step0000004.ckpt, last.ckpt (step 4), metrics.csv. Read only."""
    from vqtrain.config import compose
    from vqtrain.train import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train(compose([*TINY_RUN, "trainer.max_steps=4"], run_dir))
    return run_dir
