"""Generated bad inputs for the quantizers and the data pipeline (`make fuzz`).

Every case must end in a clear error (an expected exception type with a
message) or a counted skip, or give a well-formed output: never another
exception type, a hang, or a silently wrong result (NaN codes, out-of-range
indices, codes that do not decode back). Cases come from a seeded generator
(hypothesis is not a dependency), so a failure names a reproducible case.
VQTRAIN_FUZZ_CASES sets the number of cases per target (default 60).
"""

from __future__ import annotations

import io
import logging
import os
import signal
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from helpers import mutate, truncate, write_outcomes
from quantizer_cases import FUZZ, select
from vqtrain.data.audio import AudioFolder, pad_collate
from vqtrain.data.common import SkippingDataset, collate_skipping
from vqtrain.data.images import ImageFiles
from vqtrain.quantizers import (
    Quantizer,
    VectorQuantizer,
)

CASES = int(os.environ.get("VQTRAIN_FUZZ_CASES", 60))
SECONDS_PER_CASE = 20
CLEAR_ERRORS = (ValueError, TypeError, IndexError, FloatingPointError)
QUANTIZERS = select(FUZZ)  # every quantizer class; each entry seeds its cases with its index in sorted(QUANTIZERS)
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    write_outcomes(request, OUTCOMES, "cases")


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(case: str, action: Callable[[], Any]) -> Any:
    """What `action` returns, or the exception it raises; a hang fails the case."""
    try:
        with deadline(SECONDS_PER_CASE):
            return action()
    except Hang:
        pytest.fail(f"{case}: no result within {SECONDS_PER_CASE} s")
    except Exception as error:  # noqa: BLE001 - the caller judges it
        return error


def check_clear_error(error: BaseException, case: str) -> None:
    assert isinstance(error, CLEAR_ERRORS), f"{case}: unexpected {type(error).__name__}: {error}"
    assert str(error).strip(), f"{case}: {type(error).__name__} without a message"


# --- quantizers: forward -------------------------------------------------------------


def random_input(rng: np.random.Generator, dim: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """A tensor of random shape, dtype and values (mostly `dim` wide), and a mask that may not fit it."""
    ndim = int(rng.integers(1, 5))
    shape = [int(rng.choice([0, 1, 2, 3, 5])) for _ in range(ndim - 1)]
    shape.append(dim if rng.random() < 0.85 else int(rng.choice([0, 1, 3, 5])))
    dtype = rng.choice(["float32"] * 5 + ["float16", "bfloat16", "float64", "int64", "bool"])
    scale = float(rng.choice([1e-6, 1.0, 10.0, 1e3]))
    values = torch.from_numpy(rng.standard_normal(shape) * scale)
    special = rng.choice(["none"] * 6 + ["nan", "inf", "huge"])
    if special != "none" and values.numel():
        spots = torch.from_numpy(rng.random(shape) < 0.2)
        fill = {"nan": float("nan"), "inf": float(rng.choice([np.inf, -np.inf])), "huge": 1e30}[special]
        values[spots] = fill
    z = values.to(getattr(torch, dtype))
    lead = shape[:-1]
    kind = rng.choice(["none"] * 3 + ["random"] * 4 + ["all_false", "wrong_shape", "wrong_dtype"])
    mask = {
        "none": lambda: None,
        "random": lambda: torch.as_tensor(rng.random(lead) < 0.7),
        "all_false": lambda: torch.zeros(lead, dtype=torch.bool),
        "wrong_shape": lambda: torch.ones([*lead, 2], dtype=torch.bool),
        "wrong_dtype": lambda: torch.ones(lead, dtype=getattr(torch, rng.choice(["uint8", "float32", "int64"]))),
    }[kind]()
    return z, mask, f"shape {shape} {dtype} scale {scale:g} {special} mask {kind}"


def real_rows(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return z.reshape(-1, z.shape[-1]) if mask is None else z[mask]


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantizer_forward_on_generated_input(name: str):
    module = QUANTIZERS[name]()
    for case in range(CASES):
        rng = np.random.default_rng([0, case, sorted(QUANTIZERS).index(name)])
        z, mask, description = random_input(rng, module.dim)
        training, grad = bool(rng.random() < 0.7), bool(rng.random() < 0.7)
        description = f"{name} case {case}: {description}, {'train' if training else 'eval'}, grad {grad}"
        module.train(training)
        if grad and z.is_floating_point():
            z.requires_grad_(True)
        before = {k: t.clone() for k, t in module.state_dict().items()}
        out = attempt(description, partial(forward, module, z, mask, grad))
        if isinstance(out, Exception):
            check_clear_error(out, description)
            OUTCOMES["quantizer forward", "clear error"] += 1
        elif not bool(torch.isfinite(real_rows(z.detach().float(), mask)).all()):
            check_nonfinite_training_forward(module, before, description)
            OUTCOMES["quantizer forward", "non-finite training step, nothing learnt"] += 1
        else:
            check_forward(module, z, mask, out, description)
            OUTCOMES["quantizer forward", "output"] += 1


def forward(module: Quantizer, z: torch.Tensor, mask: torch.Tensor | None, grad: bool):
    with torch.set_grad_enabled(grad):
        out = module(z, mask)
        if z.requires_grad:
            (out.quantized.float().sum() + out.loss).backward()
    return out


def check_nonfinite_training_forward(module: Quantizer, before: dict, case: str) -> None:
    """A training forward does not wait to look at its input: a non-finite one must leave
    every statistic as it was (the model then sees the NaN in the loss and skips or raises)."""
    assert module.updating, f"{case}: non-finite input accepted outside a training forward"
    for key, tensor in module.state_dict().items():
        if key not in ("step",):  # a residual quantizer's step counts forwards, learnt from or not
            assert torch.equal(tensor, before[key]), f"{case}: {key} changed on non-finite input"


def check_forward(module: Quantizer, z: torch.Tensor, mask: torch.Tensor | None, out, case: str) -> None:
    """A forward that did not refuse its input must give a well-formed, finite, decodable result."""
    real = real_rows(z.detach().float(), mask)
    assert bool(torch.isfinite(real).all()), f"{case}: non-finite input accepted"
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype, case
    columns = module.num_index_columns
    lead = z.shape[:-1]
    assert out.indices.dtype == torch.long and out.indices.shape == (lead if columns == 1 else (*lead, columns)), case
    indices = out.indices.reshape(*lead, columns)
    sizes = torch.tensor(module.codebook_sizes)
    assert bool(((indices >= -1) & (indices < sizes)).all()), f"{case}: index out of range"
    assert bool(torch.isfinite(out.quantized.float()).all()), f"{case}: non-finite codes"
    if mask is not None:
        assert not out.quantized[~mask].any() and bool((indices[~mask] == -1).all()), f"{case}: padding leaked"
    assert bool((real_rows(indices, mask)[:, 0] >= 0).all()), f"{case}: a real position without a code"
    if bool((real.abs() <= 1e3).all()):
        assert bool(torch.isfinite(out.loss)), f"{case}: non-finite loss from moderate input"
    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            assert bool(torch.isfinite(tensor).all()), f"{case}: non-finite {key} after the forward"
    if z.grad is not None and z.dtype != torch.float16:  # float16 overflows are for a GradScaler to catch
        assert bool(torch.isfinite(z.grad).all()), f"{case}: non-finite gradient"
    if not module.training and z.dtype == torch.float32:
        torch.testing.assert_close(
            module.indices_to_codes(out.indices), out.quantized, msg=f"{case}: codes do not decode back"
        )


# --- quantizers: indices_to_codes ---------------------------------------------------


def refusal_reason(module: Quantizer, indices: torch.Tensor) -> str | None:
    """Why `indices` must be refused, or None when they must decode."""
    columns = module.num_index_columns
    if indices.is_floating_point() or indices.dtype == torch.bool:
        return "type"
    if columns > 1 and (indices.ndim == 0 or indices.shape[-1] != columns):
        return "shape"
    flat = indices.reshape(-1, columns).long()
    if bool(((flat < -1) | (flat >= torch.tensor(module.codebook_sizes))).any()):
        return "range"
    grouped = isinstance(module, VectorQuantizer) and module.groups > 1
    if grouped and bool(((flat < 0).any(-1) & (flat >= 0).any(-1)).any()):
        return "partial"
    return None


@pytest.mark.parametrize("name", QUANTIZERS)
def test_indices_to_codes_on_generated_indices(name: str):
    module = QUANTIZERS[name]().eval()
    columns, top = module.num_index_columns, max(module.codebook_sizes)
    for case in range(CASES):
        rng = np.random.default_rng([1, case, sorted(QUANTIZERS).index(name)])
        shape = [int(rng.choice([0, 1, 2, 3])) for _ in range(int(rng.integers(0, 3)))]
        if columns > 1 and rng.random() < 0.8:
            shape.append(columns)
        dtype = rng.choice(["int64"] * 5 + ["int32", "int16", "uint8", "float32", "bool"])
        high = int(rng.choice([top, top + 3, 2**40]))
        values = torch.from_numpy(rng.integers(-1 if rng.random() < 0.9 else -(2**40), high, shape))
        indices = values.to(getattr(torch, dtype)) if dtype != "uint8" else values.clamp(0, 255).to(torch.uint8)
        description = f"{name} case {case}: shape {shape} {dtype} values up to {high}"
        refuse = refusal_reason(module, indices)
        codes = attempt(description, partial(module.indices_to_codes, indices))
        if isinstance(codes, Exception):
            check_clear_error(codes, description)
            assert refuse, f"{description}: valid indices refused: {codes}"
            OUTCOMES["indices_to_codes", "clear error"] += 1
            continue
        assert refuse is None, f"{description}: invalid indices ({refuse}) decoded silently"
        lead = indices.shape[:-1] if columns > 1 else indices.shape
        assert (
            codes.shape == (*lead, module.dim) and codes.dtype == torch.float32 and bool(torch.isfinite(codes).all())
        ), description
        unused = (indices.reshape(-1, columns).long() < 0).all(-1)
        assert not codes.reshape(-1, module.dim)[unused].any(), f"{description}: -1 did not decode to zeros"
        OUTCOMES["indices_to_codes", "output"] += 1


# --- data: audio files ---------------------------------------------------------------

AUDIO_EXTENSIONS = [".wav", ".WAV", ".flac", ".ogg", ".opus", ".mp3", ".aiff"]
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".aiff": ("AIFF", "PCM_16"),
}


def valid_audio(rng: np.random.Generator, extension: str, frames: int | None = None) -> bytes:
    frames = int(rng.integers(0, 3000)) if frames is None else frames
    channels = int(rng.integers(1, 3))
    rate = int(rng.choice([8000, 16000, 48000 if extension.lower() == ".opus" else 44100]))  # Opus has no 44.1 kHz
    buffer = io.BytesIO()
    audio = (0.5 * rng.standard_normal((frames, channels))).clip(-1, 1).astype(np.float32)
    sf.write(buffer, audio, rate, format=FORMATS[extension.lower()][0], subtype=FORMATS[extension.lower()][1])
    return buffer.getvalue()


def lying_wav_header(rng: np.random.Generator) -> bytes:
    """A RIFF/WAVE header whose sizes, channels, rate or sample width are absurd, and a little data."""
    channels = int(rng.choice([0, 1, 2, 255, 65535]))
    rate = int(rng.choice([0, 1, 8000, 2**31 - 1]))
    bits = int(rng.choice([0, 7, 8, 16, 24, 32, 64]))
    data_size = int(rng.choice([0, 16, 2**31, 2**32 - 1]))
    riff_size = int(rng.choice([4, 36 + data_size % 2**32, 2**32 - 1])) % 2**32
    fmt = struct.pack(
        "<HHIIHH",
        int(rng.choice([1, 3, 0xFFFE, 0x1234])),
        channels,
        rate,
        rate * channels * bits // 8 % 2**32,
        channels * bits // 8 % 2**16,
        bits,
    )
    header = b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    return header + b"data" + struct.pack("<I", data_size) + rng.bytes(int(rng.integers(0, 200)))


def bad_audio(rng: np.random.Generator) -> tuple[str, bytes, str]:
    """(extension, content, description) of a file that may or may not be usable audio."""
    extension = str(rng.choice(AUDIO_EXTENSIONS))
    kind = rng.choice(["empty", "random", "truncated", "mutated", "lying_header", "other_format", "text", "valid"])
    if kind == "empty":
        content = b""
    elif kind == "random":
        content = rng.bytes(int(rng.integers(1, 5000)))
    elif kind == "truncated":
        content = truncate(rng, valid_audio(rng, extension))
    elif kind == "mutated":  # mostly in the header
        content = mutate(
            rng, valid_audio(rng, extension, frames=int(rng.integers(1, 3000))), 64 if rng.random() < 0.7 else None
        )
    elif kind == "lying_header":
        extension, content = ".wav", lying_wav_header(rng)
    elif kind == "other_format":  # e.g. FLAC bytes named .wav
        content = valid_audio(
            rng, str(rng.choice([e for e in FORMATS if e != extension.lower()])), frames=int(rng.integers(1, 3000))
        )
    elif kind == "text":
        content = b"this is not audio\n" * int(rng.integers(1, 50))
    else:
        content = valid_audio(rng, extension, frames=int(rng.integers(1, 3000)))
    return extension, content, f"{kind} {extension} ({len(content)} bytes)"


def load_audio(root: Path, rate: int, options: dict) -> tuple[AudioFolder, list, dict]:
    """Scan, read every item as the loaders do, and collate."""
    data = AudioFolder(root, rate, **options)
    items = [SkippingDataset(data, options["strict"])[i] for i in range(len(data))]
    return data, items, collate_skipping(items, collate=pad_collate)


def test_header_claiming_a_terabyte_is_skipped_at_the_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Found by the fuzzer: a mutated MP3 header declares 3e11 frames in 1.7 kB, and
    reading it would allocate 1 TiB. The scan leaves it out, naming the reason."""
    extension, content, description = bad_audio(np.random.default_rng([2, 210]))
    (tmp_path / f"lying{extension}").write_bytes(content)
    (tmp_path / "good.wav").write_bytes(valid_audio(np.random.default_rng(0), ".wav", frames=800))
    assert sf.info(str(tmp_path / f"lying{extension}")).frames > 10**11, description
    with caplog.at_level(logging.WARNING):
        data = AudioFolder(tmp_path, 8000, cache_dir=tmp_path / "cache")
    assert data.files == ["good.wav"] and data.skipped_files == 1
    assert "declares" in caplog.text and f"lying{extension}" in caplog.text


def test_audio_pipeline_on_generated_files(tmp_path: Path):
    for case in range(CASES):
        rng = np.random.default_rng([2, case])
        extension, content, description = bad_audio(rng)
        description = f"audio case {case}: {description}"
        root = tmp_path / f"case{case}"
        root.mkdir()
        (root / f"file{extension}").write_bytes(content)
        (root / "good.wav").write_bytes(valid_audio(rng, ".wav", frames=800))
        rate = int(rng.choice([8000, 16000]))
        max_length = rng.choice([None, 0.05])
        strict = bool(rng.random() < 0.3)
        options = dict(
            max_length=max_length, random_crop=bool(rng.random() < 0.5), strict=strict, cache_dir=tmp_path / "cache"
        )
        result = attempt(description, partial(load_audio, root, rate, options))
        if isinstance(result, Exception):
            assert (
                strict
                and isinstance(result, RuntimeError)
                and "data.strict=true" in str(result)
                and f"file{extension}" in str(result)
            ), f"{description}: {type(result).__name__}: {result}"
            OUTCOMES["audio file", "strict error"] += 1
            continue
        data, items, batch = result
        assert data.skipped_files + len(data) == 2, description
        for index, item in enumerate(items):
            if item is None:
                continue
            x = item["x"]
            assert x.dtype == torch.float32 and x.shape[0] == 1 and x.shape[1] >= 1, description
            assert x.shape[1] <= data.lengths[index], f"{description}: longer than its header said"
            assert bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1, f"{description}: bad samples"
        skipped = data.skipped_files + int(batch.skipped)
        assert int(batch.skipped) == sum(item is None for item in items), description
        OUTCOMES["audio file", "skipped" if skipped else "output"] += 1


# --- data: image files ---------------------------------------------------------------


def image_bytes(rng: np.random.Generator, extension: str) -> bytes:
    size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    mode = str(rng.choice(["L", "RGB", "RGBA", "P", "1"]))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    kind = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tiff": "TIFF"}[extension]
    if kind == "JPEG" and mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def huge_png_header(rng: np.random.Generator) -> bytes:
    """A PNG whose header claims a gigantic image, followed by almost no data."""
    side = int(rng.choice([20_000, 70_000, 2**31 - 1]))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", 0)
    return b"\x89PNG\r\n\x1a\n" + chunk + rng.bytes(int(rng.integers(0, 100)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the corrupt metadata it reads past
def test_image_files_on_generated_bytes(tmp_path: Path):
    for case in range(CASES):
        rng = np.random.default_rng([3, case])
        extension = str(rng.choice([".png", ".jpg", ".bmp", ".gif", ".tiff"]))
        kind = rng.choice(["empty", "random", "truncated", "mutated", "huge_header", "text", "valid"])
        if kind == "empty":
            content = b""
        elif kind == "random":
            content = rng.bytes(int(rng.integers(1, 3000)))
        elif kind == "truncated":
            content = truncate(rng, image_bytes(rng, extension))
        elif kind == "mutated":
            content = mutate(rng, image_bytes(rng, extension))
        elif kind == "huge_header":
            content = huge_png_header(rng)
        elif kind == "text":
            content = b"not an image\n" * 10
        else:
            content = image_bytes(rng, extension)
        description = f"image case {case}: {kind} {extension} ({len(content)} bytes)"
        path = tmp_path / f"case{case}{extension}"
        path.write_bytes(content)
        channels = int(rng.choice([1, 3]))
        item = attempt(
            description,
            lambda path=path, channels=channels: SkippingDataset(ImageFiles([path], image_size=8, channels=channels))[
                0
            ],
        )
        assert not isinstance(item, Exception), f"{description}: {type(item).__name__}: {item}"
        if item is None:
            OUTCOMES["image file", "skipped"] += 1
            continue
        x = item["x"]
        assert x.shape == (channels, 8, 8) and x.dtype == torch.float32, description
        assert bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1, description
        OUTCOMES["image file", "output"] += 1
