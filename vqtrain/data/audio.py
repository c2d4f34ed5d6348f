"""Audio data: any folder tree of wav/flac/ogg/opus/mp3/aiff clips, read as float32 mono in
[-1, 1] at one sample rate, batched by length and zero-padded per batch.

Headers are scanned once and cached, so clip lengths (for bucketing) are known
without decoding audio. Unusable files (corrupt, empty, truncated) are skipped
and counted, or with `strict` an error naming the file. `max_length` is in
seconds: training takes a random crop of that length, validation and test
the first `max_length` seconds (None: whole clips). `normalize_db` evens out
loudness: recordings of one corpus can differ by 20 dB between speakers, and an
MSE loss would otherwise hardly see the quiet ones.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from einops import rearrange, reduce
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from ..config import InvalidConfig, MissingPath, Required
from ..files import read_checked_json, unreadable, write_checked_json
from ..utils import ceil_div, default, lengths_to_mask
from .batch import Batch
from .common import DataModule, UnreadableItem, collate_skipping, hash_fraction
from .sampler import BucketBatchSampler

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")  # what libsndfile >= 1.1 decodes
LAYOUT = f"a folder tree of {'/'.join(AUDIO_EXTENSIONS)} files, at any depth (other files are ignored)"
DECODE_ERRORS = (sf.SoundFileError, RuntimeError, OSError)
# 2: headers that claim more frames than the file can hold are unusable; 3: a checksum of the content
CACHE_VERSION = 3
# libsndfile's WAV header dump says "data : <declared> (should be <present>)" when the data chunk is cut short
TRUNCATED = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# torchaudio's resampling kernel has about (old / g) * (new / g) taps, g = gcd(old, new): at most 441 * 640
# between standard rates (11.025 to 16 kHz), but minutes and gigabytes per clip for a corrupt header's rate
MAX_RESAMPLING_TAPS = 2**20
# no codec packs more samples into a byte (FLAC's digital silence: a few hundred); a header that claims
# more is corrupt (a mutated MP3 header once declared 3e11 frames in 1.7 kB: reading it wanted 1 TiB)
MAX_SAMPLES_PER_BYTE = 10_000


@dataclass(frozen=True)
class AudioHeader:
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def resampling_problem(orig_rate: int, new_rate: int) -> str | None:
    """Why clips at `orig_rate` cannot be resampled to `new_rate`, or None."""
    divisor = math.gcd(orig_rate, new_rate)
    if (orig_rate // divisor) * (new_rate // divisor) > MAX_RESAMPLING_TAPS:
        return f"its sample rate {orig_rate} Hz takes too long to resample to {new_rate} Hz (a corrupt header?)"
    return None


def resampled_length(frames: int, orig_rate: int, new_rate: int) -> int:
    """Length after torchaudio.functional.resample: ceil(frames * new / orig)."""
    return ceil_div(frames * new_rate, orig_rate)


def list_audio(root: Path) -> list[str]:
    """Relative POSIX paths of every audio file under `root`, in a stable order."""
    Required("data.root", root, LAYOUT).check()
    files = sorted(
        (Path(folder) / name).relative_to(root).as_posix()
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(AUDIO_EXTENSIONS)
    )
    if not files:
        raise MissingPath(f"data.root: no audio files under {root} (expected {LAYOUT})")
    return files


def probe(path: Path, size: int) -> AudioHeader | str:
    """The header of an audio file of `size` bytes, or why it cannot be used."""
    try:
        info = sf.info(str(path))
    except DECODE_ERRORS as error:
        return str(error)
    if info.frames <= 0:
        return "no audio frames"
    if info.frames * info.channels > MAX_SAMPLES_PER_BYTE * size:
        return f"its header declares {info.frames} frames in a file of {size} bytes (corrupt)"
    if truncated := TRUNCATED.search(info.extra_info):
        declared, present = map(int, truncated.groups())
        if present < declared:
            return f"truncated: the header declares {declared} data bytes, the file holds {present}"
    return AudioHeader(info.frames, info.samplerate, info.channels)


def normalize_loudness(x: Tensor, rms_db: float) -> Tensor:
    """Scale a clip to an RMS of `rms_db` dBFS, with the gain limited so no sample
    exceeds 1 (a loud click keeps its level rather than clipping); silence stays silent."""
    rms = x.pow(2).mean().sqrt()
    peak = x.abs().max()
    if peak == 0:
        return x
    return x * torch.minimum(10 ** (rms_db / 20) / rms, 1 / peak)


# --- header cache: {relative path: [size, mtime_ns, frames, sample_rate, channels] or [size, mtime_ns, reason]}


def cache_locations(root: Path, cache_dir: str | Path | None) -> list[Path]:
    """Where the header cache of `root` lives: `cache_dir`, else the user cache.
    Never inside the data folder, which may be shared or read-only."""
    name = f"audio-headers-{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / name]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqtrain"
    return [user_cache / name]


CACHE = "vqtrain's audio header cache"
CACHE_REMEDY = "nothing to do: every header is read again, and the cache written anew"


def load_cache(locations: list[Path]) -> dict[str, list]:
    """The cached headers, or none (every header read again): when there is no
    cache, it is of another version, or it is damaged (said in a warning)."""
    for path in locations:
        try:
            cache, checked = read_checked_json(path, CACHE, CACHE_REMEDY)
        except FileNotFoundError:
            continue
        except ValueError as error:
            log.warning("%s", error)
            continue
        if cache.get("version") != CACHE_VERSION:
            continue
        if not checked or not isinstance(cache.get("files"), dict):
            log.warning("%s", unreadable(path, "damaged: no checksum or no files", CACHE, CACHE_REMEDY))
            continue
        return cache["files"]
    return {}


def save_cache(locations: list[Path], entries: dict[str, list]) -> None:
    """Atomic write to the first writable location (ranks may scan at once); failing only costs a rescan."""
    for path in locations:
        try:
            write_checked_json(path, {"version": CACHE_VERSION, "files": entries})
            return
        except OSError:
            continue
    log.warning(
        "cannot write the audio header cache to %s: headers will be read again next time",
        " or ".join(map(str, locations)),
    )


def read_headers(root: Path, files: Sequence[str], cache_dir: str | Path | None = None) -> dict[str, AudioHeader | str]:
    """Header (or the reason it is unusable) of every file; only files that are
    new or changed (size, mtime) since they were cached are opened."""
    locations = cache_locations(root, cache_dir)
    entries = load_cache(locations)
    headers: dict[str, AudioHeader | str] = {}
    changed = False
    for relative in files:
        try:
            stat = (root / relative).stat()
        except OSError as error:
            headers[relative] = str(error)
            continue
        key = [stat.st_size, stat.st_mtime_ns]
        entry = entries.get(relative)
        if entry is None or entry[:2] != key:
            header = probe(root / relative, stat.st_size)
            entry = entries[relative] = key + (list(astuple(header)) if isinstance(header, AudioHeader) else [header])
            changed = True
        headers[relative] = AudioHeader(*entry[2:]) if len(entry) == 5 else entry[2]
    if changed:
        save_cache(locations, entries)
    return headers


# --- dataset and batches ---------------------------------------------------------


class AudioFolder(Dataset):
    """Clips as {"x": float32 (1, T) mono in [-1, 1] at `sample_rate`, "index"}.

    `files`: paths relative to `root` (absolute ones must lie under it); default
    every audio file below `root`. `max_length` (seconds) crops at random with
    `random_crop` (training), else from the start. `normalize_db`: each clip (after
    cropping) scaled to that RMS in dBFS, see `normalize_loudness`; None keeps the
    recorded level. Clips outside [`min_duration`, `max_duration`] seconds are left out. `lengths`: each item's
    length in samples, from the headers alone; `skipped_files`: unusable files left out.
    """

    def __init__(
        self,
        root: str | Path,
        sample_rate: int,
        files: Sequence[str | Path] | None = None,
        *,
        max_length: float | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        random_crop: bool = False,
        normalize_db: float | None = None,
        strict: bool = False,
        cache_dir: str | Path | None = None,
    ):
        self.root = Path(root).expanduser()
        files = list_audio(self.root) if files is None else [self.relative(file) for file in files]
        headers = read_headers(self.root, files, cache_dir)
        for relative, header in headers.items():
            if isinstance(header, AudioHeader) and (problem := resampling_problem(header.sample_rate, sample_rate)):
                headers[relative] = problem
        unusable = {relative: reason for relative, reason in headers.items() if isinstance(reason, str)}
        if unusable:
            listing = "; ".join(f"{self.root / relative}: {reason}" for relative, reason in list(unusable.items())[:5])
            if strict:
                raise RuntimeError(f"data.strict=true and {len(unusable)} audio files are unusable: {listing}")
            log.warning(
                "skipping %d unusable audio files: %s%s", len(unusable), listing, "; ..." if len(unusable) > 5 else ""
            )
        self.skipped_files = len(unusable)

        low, high = default(min_duration, 0.0), default(max_duration, float("inf"))
        usable = [(relative, header) for relative, header in headers.items() if isinstance(header, AudioHeader)]
        kept = [(relative, header) for relative, header in usable if low <= header.duration <= high]
        if len(kept) < len(usable):
            log.info(
                "left out %d of %d clips under %s outside [%s, %s] s",
                len(usable) - len(kept),
                len(usable),
                self.root,
                low,
                high,
            )
        if not kept:
            raise InvalidConfig(
                f"no usable audio clips under {self.root}: {len(files)} files, {len(unusable)} unusable, "
                f"{len(usable)} usable of which none lasts [{low}, {high}] s (data.min_duration, data.max_duration)"
            )
        self.files = [relative for relative, _ in kept]
        self.headers = [header for _, header in kept]
        self.sample_rate = sample_rate
        self.max_samples = None if max_length is None else round(max_length * sample_rate)
        self.random_crop = random_crop
        self.normalize_db = normalize_db
        self.lengths = [self.item_length(header) for header in self.headers]

    def relative(self, file: str | Path) -> str:
        file = Path(file)
        return (file.relative_to(self.root) if file.is_absolute() else file).as_posix()

    def item_length(self, header: AudioHeader) -> int:
        length = resampled_length(header.frames, header.sample_rate, self.sample_rate)
        return length if self.max_samples is None else min(length, self.max_samples)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        header, path = self.headers[index], self.root / self.files[index]
        start, frames = 0, header.frames
        if self.max_samples is not None:  # read only the frames the crop needs
            frames = min(frames, resampled_length(self.max_samples, self.sample_rate, header.sample_rate))
            if self.random_crop:
                start = int(torch.randint(header.frames - frames + 1, ()))
        try:
            audio, sample_rate = sf.read(path, frames=frames, start=start, dtype="float32", always_2d=True)
        except DECODE_ERRORS as error:
            raise UnreadableItem(f"{path}: {error}") from error
        if len(audio) == 0:
            raise UnreadableItem(f"{path}: no audio frames")
        if not np.isfinite(audio).all():  # float WAVs can hold NaN or Inf: a file's fault, not the model's
            raise UnreadableItem(f"{path}: non-finite samples (NaN or Inf)")
        x = reduce(torch.from_numpy(audio), "t c -> 1 t", "mean")
        if sample_rate != self.sample_rate:
            x = AF.resample(x, sample_rate, self.sample_rate)
        x = x[:, : self.max_samples].clamp(-1, 1)
        if self.normalize_db is not None:
            x = normalize_loudness(x, self.normalize_db)
        return {"x": x, "index": index}


def pad_collate(items: list[dict]) -> Batch:
    """Zero-pad clips to the longest of the batch; `mask` and `lengths` mark the real samples."""
    lengths = torch.tensor([item["x"].shape[-1] for item in items])
    x = pad_sequence([item["x"][0] for item in items], batch_first=True)
    return Batch(
        x=rearrange(x, "b t -> b 1 t"),
        index=torch.tensor([item["index"] for item in items]),
        skipped=torch.tensor(0),
        mask=lengths_to_mask(lengths, x.shape[-1]),
        lengths=lengths,
    )


# --- splits: relative paths -> {"train": [...], "val": [...], "test": [...]} (empty test: test on val)

Split = Callable[[list[str]], dict[str, list[str]]]
FSDD_SPEAKER = r"^\d+_([^_/]+)_\d+\.\w+$"  # {digit}_{speaker}_{take}.wav


def split_by_speaker(
    files: list[str], val_speakers: Sequence[str], test_speakers: Sequence[str] = (), pattern: str = FSDD_SPEAKER
) -> dict[str, list[str]]:
    """Validation and test voices unseen in training; the speaker is group 1 of
    `pattern` searched in the relative path."""
    val, test = set(val_speakers), set(test_speakers)
    if val & test:
        raise ValueError(f"speakers {sorted(val & test)} are in both val_speakers and test_speakers")
    regex = re.compile(pattern)
    speakers = {}
    for relative in files:
        if (match := regex.search(relative)) is None:
            raise ValueError(f"no speaker in {relative!r}: it does not match pattern {pattern!r}")
        speakers[relative] = match.group(1)
    if missing := (val | test) - set(speakers.values()):
        raise ValueError(f"speakers {sorted(missing)} have no files; found {sorted(set(speakers.values()))}")
    return {
        "train": [relative for relative, speaker in speakers.items() if speaker not in val | test],
        "val": [relative for relative, speaker in speakers.items() if speaker in val],
        "test": [relative for relative, speaker in speakers.items() if speaker in test],
    }


def split_by_folder(
    files: list[str], train: Sequence[str], val: Sequence[str], test: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Official subsets as subfolders of the root (LibriSpeech, LibriTTS):
    e.g. train = [train-clean-100], val = [dev-clean], test = [test-clean]."""

    def under(folders: Sequence[str]) -> list[str]:
        chosen = []
        for folder in [folders] if isinstance(folders, str) else folders:
            prefix = folder.strip("/") + "/"
            if not (found := [relative for relative in files if relative.startswith(prefix)]):
                raise ValueError(f"no audio files in the subfolder {folder!r}")
            chosen += found
        return chosen

    return {"train": under(train), "val": under(val), "test": under(test)}


def split_by_hash(files: list[str], val_fraction: float = 0.05, test_fraction: float = 0.0) -> dict[str, list[str]]:
    """A fixed share of the files, chosen by a hash of the relative path: adding files moves no other file."""
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction > 0, test_fraction >= 0 and their sum < 1 needed, got {val_fraction} and {test_fraction}"
        )
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for relative in files:
        share = hash_fraction(Path(relative))
        parts["val" if share < val_fraction else "test" if share < val_fraction + test_fraction else "train"].append(
            relative
        )
    return parts


class AudioDataModule(DataModule):
    """Audio clips under `root`, split by `split` (a function of the relative
    paths: by speaker, subfolder or hash; default `split_by_hash`), batched by
    length when `bucketing` and zero-padded. `skipped_files` (after setup):
    unusable files left out at scan time, over all splits.
    """

    modality = "audio"
    channels = 1

    def __init__(
        self,
        root: str,
        sample_rate: int = 16000,
        split: Split | None = None,
        max_length: float | None = None,
        min_duration: float | None = None,
        max_duration: float | None = None,
        normalize_db: float | None = None,
        bucketing: bool = True,
        cache_dir: str | None = None,
        seed: int | None = 0,
        **loader_options: Any,
    ):
        """loader_options: batch_size, num_workers, strict, pin_memory (see DataModule).
        seed: batch order (ranks must agree, so None means 0)."""
        super().__init__(**loader_options)
        if sample_rate < 1:
            raise ValueError(f"data.sample_rate must be >= 1, got {sample_rate}")
        if max_length is not None and round(max_length * sample_rate) < 1:
            raise ValueError(f"data.max_length (seconds) must be at least one sample, got {max_length}")
        if normalize_db is not None and not -100 <= normalize_db <= 0:
            raise ValueError(
                f"data.normalize_db is an RMS level in dBFS, between -100 and 0 (e.g. -20), got {normalize_db}"
            )
        self.root = Path(root).expanduser()
        self.sample_rate = sample_rate
        self.split = default(split, split_by_hash)
        self.clip_options = dict(
            max_length=max_length,
            min_duration=min_duration,
            max_duration=max_duration,
            normalize_db=normalize_db,
            strict=self.strict,
            cache_dir=cache_dir,
        )
        self.bucketing = bucketing
        self.order_seed = default(seed, 0)
        self.skipped_files = 0

    def required_paths(self) -> list[Required]:
        return [Required("data.root", self.root, LAYOUT)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = list_audio(self.root)
        try:
            parts = self.split(files)
        except ValueError as error:
            raise InvalidConfig(f"data.split of {self.root}: {error}") from error
        for name in ("train", "val"):
            if not parts[name]:
                raise InvalidConfig(f"data.split leaves no {name} files among the {len(files)} under {self.root}")
        self.train_set, self.val_set, self.test_set = (
            AudioFolder(self.root, self.sample_rate, parts[name], random_crop=name == "train", **self.clip_options)
            if parts.get(name)
            else None
            for name in ("train", "val", "test")
        )
        self.skipped_files = sum(
            s.skipped_files for s in (self.train_set, self.val_set, self.test_set) if s is not None
        )

    def collate(self, items: list) -> Batch:
        return collate_skipping(items, collate=pad_collate)

    def batch_sampler(self, dataset: AudioFolder, shuffle: bool, drop_last: bool) -> BucketBatchSampler:
        return BucketBatchSampler(
            dataset.lengths,
            self.batch_size,
            bucketing=self.bucketing,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=self.order_seed,
        )
