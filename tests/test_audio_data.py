"""Padded variable-length audio: scanning, header cache, bad files, splits, padding and bucketing."""

from __future__ import annotations

import logging
import math
import os
import re
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, SequentialSampler

from vqtrain.config import InvalidConfig, compose
from vqtrain.data.audio import (
    AudioDataModule,
    AudioFolder,
    pad_collate,
    split_by_folder,
    split_by_hash,
    split_by_speaker,
)
from vqtrain.data.common import SkippingDataset, collate_skipping
from vqtrain.data.sampler import BucketBatchSampler, measure_padding, padding_fraction

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
SPEAKERS = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}
RATE = 8000


def speaker(relative: str) -> str:
    return relative.split("_")[1]


@pytest.fixture(scope="session")
def fsdd_cache(tmp_path_factory) -> Path:
    """Header cache for FSDD outside the shared data folder."""
    return tmp_path_factory.mktemp("fsdd-cache")


@pytest.fixture(scope="module")
def fsdd(fsdd_cache) -> AudioDataModule:
    if not FSDD.is_dir():
        pytest.skip(f"Free Spoken Digit Dataset not found at {FSDD}")
    data = AudioDataModule(
        str(FSDD),
        sample_rate=RATE,
        batch_size=32,
        cache_dir=str(fsdd_cache),
        split=partial(split_by_speaker, val_speakers=["theo"], test_speakers=["george"]),
    )
    data.setup()
    return data


def sine(seconds: float, rate: int = RATE, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture
def tree(tmp_path) -> Path:
    """flac, ogg and a stereo WAV (upper-case extension) next to a text file and three bad WAVs."""
    root = tmp_path / "audio"
    for folder in ("a", "b", "bad"):
        (root / folder).mkdir(parents=True)
    sf.write(root / "a" / "clip.flac", sine(1.0), RATE)
    sf.write(root / "b" / "clip.ogg", sine(0.5), RATE)
    sf.write(root / "Stereo.WAV", np.stack([sine(0.25), 0.5 * sine(0.25)], axis=1), RATE, format="WAV")
    (root / "notes.txt").write_text("not audio")
    (root / "bad" / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    sf.write(root / "bad" / "empty.wav", np.zeros(0, np.float32), RATE)
    sf.write(root / "bad" / "whole.wav", sine(0.5), RATE)
    whole = (root / "bad" / "whole.wav").read_bytes()
    (root / "bad" / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (root / "bad" / "whole.wav").unlink()
    return root


GOOD = ["Stereo.WAV", "a/clip.flac", "b/clip.ogg"]
BAD = ["bad/corrupt.wav", "bad/empty.wav", "bad/truncated.wav"]


# --- real data: FSDD -------------------------------------------------------------


def test_speaker_split_keeps_val_and_test_voices_unseen(fsdd):
    speakers = {name: {speaker(f) for f in getattr(fsdd, f"{name}_set").files} for name in ("train", "val", "test")}
    assert speakers == {"train": SPEAKERS - {"theo", "george"}, "val": {"theo"}, "test": {"george"}}
    assert len(fsdd.train_set) + len(fsdd.val_set) + len(fsdd.test_set) == 3000
    assert fsdd.skipped_files == 0 and fsdd.sample_rate == RATE and fsdd.modality == "audio"
    assert fsdd.channels == 1 and fsdd.use_distributed_sampler is False


def test_collate_pads_to_the_longest_clip_and_masks_the_rest(fsdd):
    data = fsdd.val_set
    picked = [int(i) for i in torch.tensor(data.lengths).argsort()[torch.tensor([0, 100, 250, 499])]]
    items = [data[i] for i in picked]
    batch = fsdd.collate(items + [None])  # None: an unreadable item, dropped and counted
    expected = torch.tensor([data.headers[i].frames for i in picked])  # 8 kHz files at 8 kHz: lengths = frames
    assert batch.skipped == 1
    assert torch.equal(batch.lengths, expected) and expected.unique().numel() == 4
    assert batch.x.shape == (4, 1, expected.max()) and batch.x.dtype == torch.float32
    assert torch.equal(batch.mask.sum(-1), expected)
    assert torch.equal(batch.index, torch.tensor(picked))
    for row, item, length in zip(batch.x, items, expected):
        assert torch.equal(row[:, :length], item["x"]) and not row[:, length:].any()
        assert item["x"].abs().max() <= 1


def test_loader_batches_are_padded_and_bucketed(fsdd):
    batch = next(iter(fsdd.train_dataloader()))
    assert batch.x.shape[0] == 32 and batch.skipped == 0
    assert torch.equal(batch.mask.sum(-1), batch.lengths)
    assert batch.x.shape[-1] == batch.lengths.max()
    assert padding_fraction([batch.lengths.tolist()]) < 0.1


def test_sampler_covers_every_item_once_per_epoch(fsdd):
    lengths = fsdd.train_set.lengths
    for drop_last in (False, True):
        sampler = BucketBatchSampler(lengths, 32, drop_last=drop_last, num_replicas=1, rank=0)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen = sorted(i for batch in batches for i in batch)
        if drop_last:
            assert all(len(batch) == 32 for batch in batches) and len(seen) == len(lengths) // 32 * 32
            assert len(set(seen)) == len(seen)
        else:
            assert seen == list(range(len(lengths)))


def test_ranks_get_disjoint_batches_and_equally_many(fsdd):
    lengths = fsdd.train_set.lengths  # 2000 clips: 62.5 batches of 32, an odd count
    for drop_last in (True, False):
        ranks = [
            list(BucketBatchSampler(lengths, 32, drop_last=drop_last, num_replicas=2, rank=rank, seed=3))
            for rank in (0, 1)
        ]
        assert (
            len(ranks[0])
            == len(ranks[1])
            == len(BucketBatchSampler(lengths, 32, drop_last=drop_last, num_replicas=2, rank=0))
        )
        items = [{i for batch in batches for i in batch} for batches in ranks]
        if drop_last:
            assert not items[0] & items[1] and len(ranks[0]) == 31
        else:  # one batch repeated so both ranks have 32; every item is seen
            assert items[0] | items[1] == set(range(len(lengths))) and len(ranks[0]) == 32


def test_sampler_is_deterministic_per_seed_and_epoch(fsdd):
    lengths = fsdd.train_set.lengths

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(lengths, 32, seed=seed, num_replicas=1, rank=0)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2) and batches(0, 1) != batches(5, 1)
    loader = fsdd.train_dataloader()
    _set_sampler_epoch(loader, 7)  # what Lightning calls at every epoch start
    assert loader.batch_sampler.epoch == 7


def test_validation_batches_are_fixed_sorted_and_in_mixed_order(fsdd):
    lengths = fsdd.val_set.lengths
    sampler = BucketBatchSampler(lengths, 32, shuffle=False, num_replicas=1, rank=0)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first and sorted(i for batch in first for i in batch) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in batch) for batch in first]
    assert longest != sorted(longest, reverse=True)  # a partial pass does not see only the longest clips
    sorted_padding = padding_fraction([lengths[i] for i in batch] for batch in first)
    assert (
        sorted_padding <= measure_padding(lengths, 32, bucketing=True) < measure_padding(lengths, 32, bucketing=False)
    )


def test_sampler_refuses_lightnings_distributed_sampler_injection():
    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        BucketBatchSampler(SequentialSampler(range(8)), batch_size=2, drop_last=False)  # how Lightning rebuilds it


def test_bucketing_keeps_padding_low(fsdd):
    lengths = fsdd.train_set.lengths
    bucketed, plain = (measure_padding(lengths, 32, bucketing=flag) for flag in (True, False))
    print(f"FSDD train, batches of 32: padding {bucketed:.1%} with bucketing, {plain:.1%} without")
    assert bucketed <= 0.10 and bucketed < plain


def test_header_cache_avoids_rereading(fsdd, fsdd_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(sf, "info", lambda *args, **kwargs: calls.append(args))
    again = AudioFolder(FSDD, RATE, fsdd.val_set.files, cache_dir=fsdd_cache)
    assert calls == [] and again.headers == fsdd.val_set.headers


def test_resampling_scales_lengths_by_the_rate_ratio(fsdd, fsdd_cache):
    files = fsdd.val_set.files[:3]
    for rate in (16000, 22050):
        data = AudioFolder(FSDD, rate, files, cache_dir=fsdd_cache)
        for index, header in enumerate(data.headers):
            expected = math.ceil(header.frames * rate / RATE)
            assert data[index]["x"].shape == (1, expected) and data.lengths[index] == expected


def test_crops_random_in_training_and_from_the_start_otherwise(fsdd, fsdd_cache):
    files = fsdd.val_set.files[:20]
    whole = AudioFolder(FSDD, RATE, files, cache_dir=fsdd_cache)
    first = AudioFolder(FSDD, RATE, files, max_length=0.1, cache_dir=fsdd_cache)
    crops = AudioFolder(FSDD, RATE, files, max_length=0.1, random_crop=True, cache_dir=fsdd_cache)
    assert first.lengths == crops.lengths == [min(800, n) for n in whole.lengths]
    longest = max(range(len(files)), key=whole.lengths.__getitem__)
    assert torch.equal(first[longest]["x"], whole[longest]["x"][:, :800])
    torch.manual_seed(0)
    draws = [crops[longest]["x"] for _ in range(3)]
    assert all(x.shape == (1, 800) for x in draws) and not torch.equal(draws[0], draws[1])


def test_loudness_normalisation_evens_out_speakers(fsdd, fsdd_cache):
    """FSDD's validation speaker is about 20 dB quieter than the others; at -20 dBFS
    every clip has an RMS of 0.1 (unless its peak would pass 1) and keeps its waveform."""
    files = fsdd.train_set.files[:10] + fsdd.val_set.files[:10]
    recorded = AudioFolder(FSDD, RATE, files, cache_dir=fsdd_cache)
    even = AudioFolder(FSDD, RATE, files, normalize_db=-20, cache_dir=fsdd_cache)
    for index in range(len(files)):
        x, y = recorded[index]["x"], even[index]["x"]
        gain = y.abs().max() / x.abs().max()
        assert torch.allclose(y, x * gain, rtol=1e-5, atol=1e-7)
        rms = y.pow(2).mean().sqrt()
        assert torch.isclose(rms, torch.tensor(0.1), rtol=1e-4) or torch.isclose(y.abs().max(), torch.tensor(1.0))
    rms_by_speaker = {}
    for index, file in enumerate(files):
        rms_by_speaker.setdefault(speaker(file), []).append(recorded[index]["x"].pow(2).mean().sqrt().item())
    assert max(map(np.mean, rms_by_speaker.values())) > 5 * min(map(np.mean, rms_by_speaker.values()))


def test_loudness_normalisation_limits_the_peak_and_keeps_silence(tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    click = np.zeros(RATE, np.float32)
    click[100] = 0.5
    sf.write(root / "click.wav", click, RATE, subtype="FLOAT")
    sf.write(root / "silence.wav", np.zeros(RATE, np.float32), RATE, subtype="FLOAT")
    data = AudioFolder(root, RATE, normalize_db=-20, cache_dir=tmp_path / "cache")
    click_out, silence_out = data[0]["x"], data[1]["x"]
    assert click_out.abs().max() == 1.0 and click_out[0, 100] == 1.0  # gain 2, not the 20x an RMS of 0.1 asks
    assert torch.count_nonzero(silence_out) == 0
    with pytest.raises(ValueError, match="normalize_db"):
        AudioDataModule(str(root), sample_rate=RATE, normalize_db=20)


# --- files written by the test ---------------------------------------------------


def test_reads_flac_ogg_and_mixes_stereo_down(tree, tmp_path):
    data = AudioFolder(tree, RATE, cache_dir=tmp_path / "cache")
    assert data.files == GOOD and data.skipped_files == len(BAD)
    stereo, flac, ogg = (data[i]["x"] for i in range(3))
    assert stereo.shape == (1, 2000) and torch.allclose(stereo[0], 0.75 * torch.from_numpy(sine(0.25)), atol=1e-4)
    assert torch.allclose(flac[0], torch.from_numpy(sine(1.0)), atol=1e-4)
    assert ogg.shape == (1, 4000) and torch.corrcoef(torch.stack([ogg[0], torch.from_numpy(sine(0.5))]))[0, 1] > 0.99


def test_reads_opus_mp3_and_aiff(tmp_path):
    """Compressed corpora (Common Voice ships mp3) and Apple's AIFF, through libsndfile."""
    root = tmp_path / "audio"
    (root / "deep" / "er").mkdir(parents=True)
    sf.write(root / "a.opus", sine(0.5), RATE, format="OGG", subtype="OPUS")
    sf.write(root / "deep" / "b.MP3", sine(0.5), RATE, format="MP3")
    sf.write(root / "deep" / "er" / "c.aiff", sine(0.5), RATE)
    data = AudioFolder(root, RATE, cache_dir=tmp_path / "cache")
    assert data.files == ["a.opus", "deep/b.MP3", "deep/er/c.aiff"] and data.skipped_files == 0
    for index in range(3):
        x = data[index]["x"][0]
        assert len(x) == data.lengths[index] == 4000
        assert torch.corrcoef(torch.stack([x, torch.from_numpy(sine(0.5))]))[0, 1] > 0.99


def test_bad_files_are_skipped_with_a_warning_or_strict_errors(tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        AudioFolder(tree, RATE, cache_dir=tmp_path / "cache")
    assert all(name in caplog.text for name in BAD)
    assert AudioFolder(tree, RATE, cache_dir=tmp_path / "cache").skipped_files == len(BAD)  # cached verdicts
    for bad in BAD:
        with pytest.raises(RuntimeError, match=bad):
            AudioFolder(tree, RATE, [bad, "a/clip.flac"], strict=True, cache_dir=tmp_path / "cache")


def test_file_broken_after_the_scan_is_skipped_and_counted(tree, tmp_path):
    data = AudioFolder(tree, RATE, GOOD, cache_dir=tmp_path / "cache")
    (tree / "a" / "clip.flac").write_bytes(b"garbage")
    loader = DataLoader(SkippingDataset(data), batch_size=3, collate_fn=partial(collate_skipping, collate=pad_collate))
    batch = next(iter(loader))
    assert batch.skipped == 1 and batch.index.tolist() == [0, 2]
    with pytest.raises(RuntimeError, match="clip.flac"):
        SkippingDataset(data, strict=True)[1]


def test_float_file_with_nan_or_inf_is_skipped_naming_it(tmp_path):
    """A NaN in a float WAV once stopped the run as a non-finite batch, naming no file."""
    root = tmp_path / "audio"
    root.mkdir()
    for name, bad in (("inf.wav", np.inf), ("nan.wav", np.nan), ("ok.wav", 0.0)):
        clip = sine(0.25)
        clip[10] = bad
        sf.write(root / name, clip, RATE, subtype="FLOAT")
    data = AudioFolder(root, RATE, cache_dir=tmp_path / "cache")
    loader = DataLoader(SkippingDataset(data), batch_size=3, collate_fn=partial(collate_skipping, collate=pad_collate))
    batch = next(iter(loader))
    assert batch.skipped == 2 and batch.index.tolist() == [2] and batch.x.isfinite().all()
    with pytest.raises(RuntimeError, match=r"nan\.wav: non-finite samples"):
        SkippingDataset(data, strict=True)[1]


def test_changed_files_are_read_again(tree, tmp_path, monkeypatch):
    AudioFolder(tree, RATE, cache_dir=tmp_path / "cache")
    sf.write(tree / "a" / "clip.flac", sine(2.0), RATE)
    os.utime(tree / "a" / "clip.flac", ns=(1, 1))  # a new mtime even on coarse-clock filesystems
    info, calls = sf.info, []
    monkeypatch.setattr(sf, "info", lambda path: calls.append(path) or info(path))
    data = AudioFolder(tree, RATE, cache_dir=tmp_path / "cache")
    assert calls == [str(tree / "a" / "clip.flac")] and data.lengths[1] == 2 * RATE


def test_cache_lives_in_the_user_cache_never_in_the_data(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    before = sorted(p for p in tree.rglob("*"))
    AudioFolder(tree, RATE)
    assert sorted(p for p in tree.rglob("*")) == before
    assert len(list((tmp_path / "user" / "vqtrain").glob("audio-headers-*.json"))) == 1


def test_missing_or_empty_root_names_the_path(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here")
    for root in (missing, empty):
        with pytest.raises(FileNotFoundError, match=f"{re.escape(str(root))}.*wav"):
            AudioDataModule(str(root), cache_dir=str(tmp_path / "cache")).setup()


def test_data_left_empty_by_the_settings_is_a_startup_error_naming_them(tree, tmp_path):
    """A StartupError, printed in one line by the CLI (these were tracebacks from inside fit's setup)."""
    with pytest.raises(InvalidConfig, match=r"none lasts \[100, inf\] s \(data.min_duration, data.max_duration\)"):
        AudioFolder(tree, RATE, min_duration=100, cache_dir=tmp_path / "cache")
    no_val = partial(split_by_hash, val_fraction=1e-9)
    with pytest.raises(InvalidConfig, match="data.split leaves no val files among the 6"):
        AudioDataModule(str(tree), split=no_val, cache_dir=str(tmp_path / "cache")).setup()
    with pytest.raises(InvalidConfig, match=r"data.split of .*: speakers \['nobody'\] have no files"):
        AudioDataModule(str(tree), split=partial(split_by_speaker, val_speakers=["nobody"], pattern="(.*)")).setup()


# --- split functions and configs ---------------------------------------------------

LIBRI = [
    f"{subset}/{spk}/{chapter}/{spk}-{chapter}-000{utt}.flac"
    for subset in ("train-clean-100", "dev-clean", "test-clean")
    for spk, chapter in ((19, 198), (26, 495))
    for utt in range(3)
]


def test_folder_split_takes_whole_subsets():
    parts = split_by_folder(LIBRI, train=["train-clean-100"], val=["dev-clean"], test="test-clean")
    assert {name: {f.split("/")[0] for f in files} for name, files in parts.items()} == {
        "train": {"train-clean-100"},
        "val": {"dev-clean"},
        "test": {"test-clean"},
    }
    with pytest.raises(ValueError, match="train-clean-360"):
        split_by_folder(LIBRI, train=["train-clean-360"], val=["dev-clean"])


def test_hash_split_is_stable_and_close_to_the_fraction():
    files = [f"wavs/LJ{i:06d}.wav" for i in range(4000)]
    parts = split_by_hash(files, val_fraction=0.1, test_fraction=0.05)
    assert abs(len(parts["val"]) / 4000 - 0.1) < 0.02 and abs(len(parts["test"]) / 4000 - 0.05) < 0.02
    assert sorted(sum(parts.values(), [])) == files
    kept = set(files[1000:])  # removing files moves no other file
    assert split_by_hash(files[1000:], 0.1, 0.05)["val"] == [f for f in parts["val"] if f in kept]


def test_speaker_split_names_unknown_speakers():
    with pytest.raises(ValueError, match="bob.*found.*george"):
        split_by_speaker(["0_george_0.wav", "1_theo_3.wav"], val_speakers=["bob"])


CONFIGS = ["fsdd", "audio_folder", "librispeech", "libritts", "ljspeech"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_switches_the_model_and_builds_the_data(name, fsdd_cache, tmp_path):
    config = compose([f"data={name}", f"paths.data_dir={REPO.parent / 'shared' / 'data'}"], tmp_path)
    assert config.model.encoder._target_ == "vqtrain.nets.ConvEncoder1d"  # the audio model, switched by the data
    config.data.cache_dir = str(fsdd_cache)
    data = hydra.utils.instantiate(config.data)
    assert isinstance(data, AudioDataModule) and data.batch_size == 32 and data.workers_setting == "auto"
    if name == "fsdd" and FSDD.is_dir():
        data.setup()
        assert {speaker(f) for f in data.val_set.files} == {"theo"} and data.sample_rate == RATE
    if name in ("librispeech", "libritts"):
        assert {f.split("/")[0] for f in data.split(LIBRI)["val"]} == {"dev-clean"}
