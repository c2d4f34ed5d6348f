"""Generated damage to the files vqtrain writes and reads back (`make fuzz`): a
checkpoint, a token shard, index.json and the audio header cache, cut short at
a random offset or with 1-7 bytes overwritten at random. Every case must end in
one line naming the file (UnreadableFile), in a named fallback (resume=auto
takes the older checkpoint, the audio headers are read again) or in content
equal to what was written (a byte that changed nothing a reader uses): never
in another exception, nor in different weights, tokens or lengths.
VQTRAIN_FUZZ_CASES sets the number of cases per file (default 60)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from helpers import mutate, truncate, write_outcomes
from vqtrain.checkpoints import resume_path
from vqtrain.data.audio import AudioFolder
from vqtrain.files import UnreadableFile, write_checked_json
from vqtrain.tokens import load_index, load_shard, save_shard

CASES = int(os.environ.get("VQTRAIN_FUZZ_CASES", 60))
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    write_outcomes(request, OUTCOMES, "damaged-file cases")


def same(a: Any, b: Any) -> bool:
    """Equal content, tensors by dtype, shape and value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def damage(rng: np.random.Generator, whole: bytes) -> tuple[bytes, str]:
    if rng.random() < 0.4:
        content = truncate(rng, whole)
        return content, f"cut to {len(content)} of {len(whole)} bytes"
    return mutate(rng, whole), f"bytes overwritten in {len(whole)}"


def read(path: Path, action: Callable[[], Any], case: str) -> Any:
    """What `action` returns, or the UnreadableFile it raises: one line naming `path`. Anything else fails the case."""
    try:
        return action()
    except UnreadableFile as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message and "(expected " in message, f"{case}: {message}"
        return error
    except Exception as error:  # noqa: BLE001 - the case fails, naming it
        pytest.fail(f"{case}: {type(error).__name__}: {error}")


def test_damaged_checkpoint_is_refused_or_resume_takes_the_older_one(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A run directory holding a damaged last.ckpt and an intact step0000004.ckpt."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny_run / "step0000004.ckpt", run_dir)
    whole = (tiny_run / "last.ckpt").read_bytes()
    original = torch.load(tiny_run / "last.ckpt", weights_only=True)
    cfg = OmegaConf.create({"ckpt_path": None, "resume": "auto", "paths": {"output_dir": str(run_dir)}})
    last = run_dir / "last.ckpt"
    for case in range(CASES):
        content, description = damage(np.random.default_rng([10, case]), whole)
        case = f"checkpoint case {case}: {description}"
        last.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            path = read(last, lambda: resume_path(cfg), case)
        if path == str(last):
            assert same(torch.load(last, weights_only=True), original), f"{case}: loads as another checkpoint"
            OUTCOMES["checkpoint", "read whole"] += 1
        else:
            assert path == str(run_dir / "step0000004.ckpt"), f"{case}: resumes from {path}"
            assert f"skipped an unreadable checkpoint: {last}: " in caplog.text, case
            OUTCOMES["checkpoint", "skipped, named"] += 1


def test_damaged_token_shard_is_refused(tmp_path: Path):
    rng = np.random.default_rng(0)
    shard = {
        "meta": {"checkpoint": "last.ckpt", "split": "test", "shard_size": 8, "num_items": 8},
        "ids": [f"clip{i}.wav" for i in range(8)],
        "index": list(range(8)),
        "tokens": [torch.from_numpy(rng.integers(0, 1024, (int(rng.integers(1, 200)), 2))) for _ in range(8)],
        "lengths": [int(rng.integers(1, 64_000)) for _ in range(8)],
        "skipped": [],
    }
    path = tmp_path / "shard-00000.pt"
    save_shard(path, shard)
    whole, original = path.read_bytes(), load_shard(path)
    for case in range(CASES):
        content, description = damage(np.random.default_rng([11, case]), whole)
        case = f"shard case {case}: {description}"
        path.write_bytes(content)
        result = read(path, lambda: load_shard(path), case)
        if not isinstance(result, UnreadableFile):
            assert same(result, original), f"{case}: read as other tokens"
        OUTCOMES["token shard", "refused" if isinstance(result, UnreadableFile) else "read whole"] += 1


def test_damaged_index_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Read without its checksum only when its key was hit: then with a warning that it is unverified."""
    rng = np.random.default_rng(1)
    items = [
        {"id": f"clip{i}.wav", "index": i, "shard": "shard-00000.pt", "shape": [int(rng.integers(1, 99)), 2]}
        for i in range(12)
    ]
    index = {"split": "test", "num_items": 12, "codebook_sizes": [1024, 1024], "items": items}
    path = tmp_path / "index.json"
    write_checked_json(path, index)
    whole = path.read_bytes()
    for case in range(CASES):
        content, description = damage(np.random.default_rng([12, case]), whole)
        case = f"index case {case}: {description}"
        path.write_bytes(content)
        caplog.clear()
        result = read(path, lambda: load_index(tmp_path), case)
        if isinstance(result, UnreadableFile):
            OUTCOMES["index.json", "refused"] += 1
        elif "read unverified" in caplog.text:
            OUTCOMES["index.json", "read unverified, warned"] += 1
        else:
            assert result == index, f"{case}: read as another index"
            OUTCOMES["index.json", "read whole"] += 1


def test_damaged_header_cache_is_named_and_read_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    rng = np.random.default_rng(2)
    root, cache = tmp_path / "audio", tmp_path / "cache"
    root.mkdir()
    for i in range(6):
        sf.write(root / f"clip{i}.wav", np.zeros(int(rng.integers(100, 5000)), dtype=np.float32), 8000)
    (root / "broken.wav").write_bytes(b"RIFF")
    truth = AudioFolder(root, 8000, cache_dir=cache)
    (path,) = cache.iterdir()
    whole = path.read_bytes()
    for case in range(CASES):
        content, description = damage(np.random.default_rng([13, case]), whole)
        case = f"header cache case {case}: {description}"
        path.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = read(path, lambda: AudioFolder(root, 8000, cache_dir=cache), case)
        assert (data.files, data.lengths, data.skipped_files) == (truth.files, truth.lengths, truth.skipped_files), case
        warned = f"{path}: " in caplog.text
        OUTCOMES["header cache", "named, read again" if warned else "read whole"] += 1
