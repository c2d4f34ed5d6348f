"""Checkpoints as tokenizers: exact round trips for every quantizer, token shards
of real FSDD clips, resumable encoding, decoding to files, and eval figures
that agree with the metrics logged at the end of training."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import MISSING, OmegaConf
from PIL import Image

import vqtrain
from helpers import QUANTIZERS
from vqtrain import tokens as tokens_module
from vqtrain.cli import parse_args
from vqtrain.config import InvalidConfig, MissingPath, compose, run_config
from vqtrain.data.audio import normalize_loudness
from vqtrain.data.common import split_dataset
from vqtrain.evaluation import evaluate
from vqtrain.tokenizer import Tokenizer, load_tokenizer
from vqtrain.tokens import decode_shard, encode_split, load_index
from vqtrain.train import train

REPO = Path(__file__).resolve().parents[1]
RESIDUAL = {"rvq": 4, "rsimvq": 4, "rfsq": 4, "rlfq": 4}  # levels in their configs
# debug=tiny_image / tiny_audio, evaluated on the whole test split: the eval tests check
# their figures against every test item, which training's final test must have seen too
WHOLE_TEST = "trainer.limit_test_batches=1.0"


def codebook(quantizer: str) -> str:
    return f"quantizer.codebook_size={256 if 'fsq' in quantizer else 64}"  # FSQ sizes come from the paper's table


def logged_test_metrics(run_dir: Path) -> dict[str, float]:
    """The `test/...` metrics logged at the end of training."""
    with open(run_dir / "metrics.csv") as f:
        (row,) = [row for row in csv.DictReader(f) if row.get("test/loss")]
    return {
        name.removeprefix("test/"): float(value) for name, value in row.items() if name.startswith("test/") and value
    }


def script(name: str, **args) -> None:
    """Run scripts/<name>.py in this process, as `python scripts/<name>.py key=value ...`."""
    runpy.run_path(str(REPO / "scripts" / f"{name}.py"))["main"]([f"{key}={value}" for key, value in args.items()])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory):
    """quantizer -> the run directory of a few training steps on shapes (trained once per module)."""
    runs: dict[str, Path] = {}

    def run(quantizer: str) -> Path:
        if quantizer not in runs:
            run_dir = tmp_path_factory.mktemp(f"shapes_{quantizer}")
            # 24 test images: three shards of 10 in the encode test
            overrides = [
                "debug=tiny_image",
                "data.num_test=24",
                WHOLE_TEST,
                f"quantizer={quantizer}",
                codebook(quantizer),
            ]
            train(compose(overrides, run_dir))
            runs[quantizer] = run_dir
        return runs[quantizer]

    return run


@pytest.fixture(scope="module")
def fsdd_subset(fsdd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Take 0 of every digit and speaker (60 clips): FSDD's speaker split leaves 10 test clips (george)."""
    root = tmp_path_factory.mktemp("fsdd")
    for file in sorted(fsdd_root.glob("*_0.wav")):
        (root / file.name).symlink_to(file)
    return root


@pytest.fixture(scope="module")
def audio_run(fsdd_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdd_rfsq")
    overrides = ["debug=tiny_audio", f"data.root={fsdd_subset}", WHOLE_TEST, "quantizer=rfsq", codebook("rfsq")]
    train(compose(overrides, run_dir))
    return run_dir


def shapes_test_images(tokenizer: Tokenizer) -> torch.Tensor:
    dataset = split_dataset(instantiate(OmegaConf.create(tokenizer.config["data"])), "test")
    return torch.stack([dataset[i]["x"] for i in range(len(dataset))])


# --- the tokenizer API -----------------------------------------------------------------


def test_import_vqtrain_is_light():
    code = "import sys, vqtrain; assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert vqtrain.load_tokenizer is load_tokenizer


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_image_round_trip_is_exact(quantizer: str, image_run):
    tokenizer = load_tokenizer(image_run(quantizer) / "last.ckpt")
    x = shapes_test_images(tokenizer)[:8]
    indices = tokenizer.encode(x)
    columns = RESIDUAL.get(quantizer)
    assert indices.dtype == torch.int64
    assert indices.shape == (8, 8, 8) + ((columns,) if columns else ())  # 32 / stride 4, one index per level
    assert (indices >= 0).all()
    assert len(tokenizer.codebook_sizes) == (columns or 1)
    assert (indices < torch.tensor(tokenizer.codebook_sizes)).all()
    assert torch.equal(tokenizer.decode(indices), tokenizer.reconstruct(x))
    for wrong in (x[:, 0], x.expand(8, 3, 32, 32)):  # was a convolution's error about its weight
        with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\) with C = 1, got \(8, "):
            tokenizer.encode(wrong)
    if columns:
        assert torch.equal(tokenizer.decode(indices, num_levels=columns), tokenizer.decode(indices))
        assert not torch.equal(tokenizer.decode(indices, num_levels=1), tokenizer.decode(indices))
    else:
        with pytest.raises(ValueError, match="residual"):
            tokenizer.decode(indices, num_levels=1)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_padded_audio_round_trip_is_exact_at_real_positions(quantizer: str, tmp_path: Path):
    cfg = compose(["debug=tiny_audio", f"quantizer={quantizer}", codebook(quantizer)], tmp_path)
    tokenizer = Tokenizer(instantiate(cfg.model), OmegaConf.to_container(cfg))
    assert (tokenizer.modality, tokenizer.sample_rate, tokenizer.stride) == ("audio", 8000, 32)
    lengths = torch.tensor([1000, 613, 97])
    mask = torch.arange(1000) < lengths[:, None]
    x = torch.where(mask, torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 0.3, 0.0)[:, None]

    indices = tokenizer.encode(x, mask)
    real = -(-lengths // tokenizer.stride)
    for i in range(3):
        assert (indices[i, : real[i]] >= 0).all() and (indices[i, real[i] :] == -1).all()
    assert torch.equal(tokenizer.encode(x[:, 0], mask), indices)  # (B, T) works as (B, 1, T)
    for wrong in (mask[:, :999], mask[:2]):  # a shorter mask encoded the rest as padding, without a word
        with pytest.raises(ValueError, match=r"mask must be of shape \(B, T\) = \(3, 1000\)"):
            tokenizer.encode(x, wrong)
    decoded = tokenizer.decode(indices, lengths)
    assert decoded.shape == x.shape
    assert torch.equal(decoded, tokenizer.reconstruct(x, mask))
    assert (decoded[~mask[:, None]] == 0).all()
    assert tokenizer.decode(indices).shape == (3, 1, 32 * 32)  # no lengths: real positions x stride
    for wrong in ([1000], [1000, 613, 5000], [1000, 613, -1]):  # were broadcast, or cut to the tokens, silently
        with pytest.raises(ValueError, match=r"lengths must be .* ceil\(length / 32\) = \[32, 20, 4\]"):
            tokenizer.decode(indices, wrong)


# --- eval ----------------------------------------------------------------------------------


def test_eval_script_matches_the_test_metrics_logged_in_training(image_run):
    run_dir = image_run("rvq")
    script("eval", ckpt_path=run_dir / "last.ckpt", split="test", device="cpu")
    report = json.loads((run_dir / "eval_test.json").read_text())
    figures, logged = report["metrics"], logged_test_metrics(run_dir)
    assert report["split"] == "test" and len(logged) > 7  # losses, usage, per level
    for name, value in logged.items():
        assert figures[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert figures["mse"] == pytest.approx(logged["recon_loss"], rel=1e-5)  # no STFT term for images

    tokenizer = load_tokenizer(run_dir / "last.ckpt")
    x = shapes_test_images(tokenizer)
    mse = (tokenizer.reconstruct(x) - x).pow(2).flatten(1).mean(1)
    assert figures["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-5)
    assert figures["bits_per_token"] == 4 * math.log2(64)
    assert figures["tokens_per_image"] == 64 and figures["bits_per_image"] == 64 * 24


def test_eval_of_audio_matches_training_and_si_snr_of_each_clip(audio_run: Path):
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    figures = evaluate(tokenizer, run_config(tokenizer.config), "test")
    for name, value in logged_test_metrics(audio_run).items():
        assert figures[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name

    scores = []
    datamodule = instantiate(OmegaConf.create(tokenizer.config["data"]))
    for batch in datamodule.loader(split_dataset(datamodule, "test"), shuffle=False):
        reconstructed = tokenizer.reconstruct(batch.x, batch.mask).double()
        for i, length in enumerate(batch.lengths.tolist()):
            estimate, target = reconstructed[i, 0, :length], batch.x[i, 0, :length].double()
            estimate, target = estimate - estimate.mean(), target - target.mean()
            projection = (estimate @ target) / (target @ target) * target
            scores.append(10 * torch.log10(projection.pow(2).sum() / (estimate - projection).pow(2).sum()))
    assert len(scores) == 10
    assert figures["si_snr"] == pytest.approx(float(torch.stack(scores).mean()), rel=1e-6)
    assert figures["tokens_per_second"] == 8000 / 32
    assert figures["bits_per_second"] == pytest.approx(250 * 4 * math.log2(8 * 6 * 5))  # FSQ levels for "256"


def test_tokens_of_a_clip_do_not_depend_on_its_batch(audio_run: Path):
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    datamodule = instantiate(OmegaConf.create(tokenizer.config["data"]))
    dataset = split_dataset(datamodule, "test")
    batch = next(iter(datamodule.loader(dataset, shuffle=False)))
    assert batch.lengths.unique().numel() > 1  # really padded
    indices = tokenizer.encode(batch.x, batch.mask)
    for i, position in enumerate(batch.index.tolist()):
        alone = tokenizer.encode(dataset[position]["x"])[0]
        assert torch.equal(alone, indices[i, : len(alone)])


def test_eval_with_batches_cut_on_the_device_gives_the_same_figures(image_run):
    """data.on_device=true, the CPU standing in for the device: Lightning's test loop over them."""
    tokenizer = load_tokenizer(image_run("rvq") / "last.ckpt")
    loaded, cut = (
        evaluate(tokenizer, run_config(tokenizer.config, [f"data.on_device={on}"]), "test") for on in (False, True)
    )
    assert cut == loaded and math.isfinite(cut["psnr"])


def test_eval_on_another_data_set(image_run, mnist_root: Path):
    tokenizer = load_tokenizer(image_run("rvq") / "last.ckpt")
    cfg = run_config(tokenizer.config, ["data=mnist", f"data.root={mnist_root}", "trainer.limit_test_batches=2"])
    assert cfg.data._target_.endswith("MNISTDataModule") and cfg.model == OmegaConf.create(tokenizer.config["model"])
    figures = evaluate(tokenizer, cfg, "test")
    assert all(math.isfinite(value) for value in figures.values())
    assert 0 < figures["utilization"] <= 1 and figures["psnr"] > 0


@dataclass
class Args:
    ckpt_path: str = MISSING
    split: str = "train"
    shard_size: int = 1000


def test_arguments_and_overrides_are_checked(image_run):
    config = load_tokenizer(image_run("rvq") / "last.ckpt").config
    args, overrides = parse_args(Args, ["ckpt_path=a.ckpt", "shard_size=7", "data.batch_size=2"])
    assert (args.ckpt_path, args.shard_size, args.split, overrides) == ("a.ckpt", 7, "train", ["data.batch_size=2"])
    with pytest.raises(SystemExit, match="ckpt_path"):
        parse_args(Args, ["shard_size=7"])
    with pytest.raises(SystemExit, match="key=value"):
        parse_args(Args, ["ckpt_path=a.ckpt", "train"])
    with pytest.raises(Exception, match="shard_size"):
        parse_args(Args, ["ckpt_path=a.ckpt", "shard_size=many"])
    assert run_config(config, ["data.batch_size=2"]).data.batch_size == 2
    with pytest.raises(Exception, match="batch_sise"):
        run_config(config, ["data.batch_sise=2"])
    with pytest.raises(ValueError, match="only data=NAME"):
        run_config(config, ["quantizer=fsq"])


def test_eval_and_encode_refuse_data_the_checkpoint_was_not_trained_on(image_run, audio_run: Path, tmp_path: Path):
    """Each in one line (a StartupError): audio data for an image model, or RGB for a gray one, failed
    deep in the encoder; another sample rate encoded without a word, and decoded at the run's rate."""
    image, audio = load_tokenizer(image_run("rvq") / "last.ckpt"), load_tokenizer(audio_run / "last.ckpt")
    cases = [
        (image, ["data=fsdd"], InvalidConfig, "data gives audio but .* encodes image: choose image data"),
        (image, ["data.channels=3"], InvalidConfig, "data.channels=3, but .* trained with 1: set data.channels=1"),
        (audio, ["data.sample_rate=16000"], InvalidConfig, ", but .* trained with 8000: set data.sample_rate=8000"),
        (image, ["data=bogus"], InvalidConfig, r"data=bogus: no such data config; choose from \['audio_folder'"),
        (image, ["data.batch_sise=2"], InvalidConfig, "data.batch_sise: the run's config has no such key"),
        (image, ["data=cifar10", f"data.root={tmp_path}", "data.channels=1"], MissingPath, "data.root: no folder"),
    ]
    for tokenizer, overrides, error, message in cases:
        with pytest.raises(error, match=message):
            encode_split(tokenizer, run_config(tokenizer.config, overrides), "test", tmp_path / "tokens")
    with pytest.raises(InvalidConfig, match="split must be one of"):
        evaluate(image, run_config(image.config), "bogus")
    assert not (tmp_path / "tokens").exists()


# --- encode and decode -------------------------------------------------------------------


def test_encode_real_fsdd_gives_one_unpadded_sequence_per_clip(audio_run: Path, fsdd_subset: Path, tmp_path: Path):
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    index = encode_split(tokenizer, run_config(tokenizer.config), "test", tmp_path, shard_size=4)
    george = sorted(file.name for file in fsdd_subset.glob("*_george_*.wav"))
    assert [item["id"] for item in index["items"]] == george and index["skipped"] == []
    assert index["shards"] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    items = {item["id"]: item for item in index["items"]}
    for shard_name in index["shards"]:
        shard = torch.load(tmp_path / shard_name, weights_only=True)
        for identifier, tokens, length in zip(shard["ids"], shard["tokens"], shard["lengths"]):
            frames = sf.info(str(fsdd_subset / identifier)).frames  # 8 kHz files: no resampling
            assert length == frames == items[identifier]["length"]
            assert tokens.shape == (math.ceil(frames / 32), 4) and items[identifier]["shape"] == list(tokens.shape)
            assert tokens.dtype == torch.int64 and (tokens >= 0).all()


def test_encode_takes_no_random_crops(audio_run: Path, tmp_path: Path):
    """The training split is cropped at random in training; encoding takes the start, every time."""
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    cfg = run_config(tokenizer.config, ["data.max_length=0.25"])
    first, again = (encode_split(tokenizer, cfg, "train", tmp_path / name, shard_size=100) for name in ("a", "b"))
    root = Path(cfg.data.root)
    assert len(first["items"]) == 40 and first["items"] == again["items"]
    assert all(item["length"] == min(sf.info(str(root / item["id"])).frames, 2000) for item in first["items"])
    shards = [torch.load(tmp_path / name / "shard-00000.pt", weights_only=True) for name in ("a", "b")]
    assert all(torch.equal(a, b) for a, b in zip(shards[0]["tokens"], shards[1]["tokens"]))
    clip = torch.from_numpy(sf.read(str(root / first["items"][0]["id"]), dtype="float32")[0][:2000])
    assert torch.equal(
        split_dataset(instantiate(cfg.data), "train")[0]["x"][0], normalize_loudness(clip, cfg.data.normalize_db)
    )


def test_encode_resumes_from_the_shards_already_written(audio_run: Path, tmp_path: Path, monkeypatch):
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    cfg = run_config(tokenizer.config)
    index = encode_split(tokenizer, cfg, "test", tmp_path, shard_size=4)
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in tmp_path.glob("shard-*.pt")}
    (tmp_path / "shard-00001.pt").unlink()  # as if interrupted while writing it:
    (tmp_path / ".shard-00001.pt.999.tmp").write_bytes(b"half a shard")
    (tmp_path / "index.json").unlink()

    encoded = []
    original = tokens_module.encode_shard
    monkeypatch.setattr(tokens_module, "encode_shard", lambda *args: encoded.append(args[-1]) or original(*args))
    assert encode_split(tokenizer, cfg, "test", tmp_path, shard_size=4) == index
    assert encoded == [range(4, 8)]
    for name in ("shard-00000.pt", "shard-00002.pt"):
        assert (tmp_path / name).stat().st_mtime_ns == before[name][0]
    shard = torch.load(tmp_path / "shard-00001.pt", weights_only=True)
    old = torch.load(io.BytesIO(before["shard-00001.pt"][1]), weights_only=True)
    assert shard["ids"] == old["ids"] and all(torch.equal(a, b) for a, b in zip(shard["tokens"], old["tokens"]))
    assert load_index(tmp_path) == index
    with pytest.raises(ValueError, match="fresh out directory"):
        encode_split(tokenizer, cfg, "test", tmp_path, shard_size=5)


def test_encode_does_not_resume_over_shards_of_the_checkpoint_before_it_trained_on(image_run, tmp_path: Path):
    """A checkpoint saved again at the same path (trained further) once resumed from the old model's shards."""
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(image_run("rvq") / "last.ckpt", checkpoint)
    before = load_tokenizer(checkpoint)
    encode_split(before, run_config(before.config), "test", tmp_path / "tokens", shard_size=30)
    content = torch.load(checkpoint, weights_only=True)
    content["state_dict"]["decoder.net.0.bias"] += 1  # any change of the weights
    torch.save(content, checkpoint)
    after = load_tokenizer(checkpoint)
    assert after.checkpoint == before.checkpoint and after.fingerprint != before.fingerprint
    with pytest.raises(InvalidConfig, match=r"shard-00000.pt was written by another checkpoint .*fresh out directory"):
        encode_split(after, run_config(after.config), "test", tmp_path / "tokens", shard_size=30)


def test_decode_writes_clips_at_the_run_sample_rate(audio_run: Path, tmp_path: Path):
    tokenizer = load_tokenizer(audio_run / "last.ckpt")
    encode_split(tokenizer, run_config(tokenizer.config), "test", tmp_path / "tokens", shard_size=4)
    shard = torch.load(tmp_path / "tokens" / "shard-00000.pt", weights_only=True)
    written = decode_shard(tokenizer, tmp_path / "tokens" / "shard-00000.pt", tmp_path / "wav")
    assert [path.name for path in written] == shard["ids"]
    for path, tokens, length in zip(written, shard["tokens"], shard["lengths"]):
        audio, rate = sf.read(str(path), dtype="float32")
        expected = tokenizer.decode(tokens[None], [length])[0, 0].clamp(-1, 1).numpy()
        assert rate == 8000 and audio.shape == (length,)
        np.testing.assert_allclose(audio, expected, atol=2**-14)  # 16-bit PCM
    coarse = decode_shard(tokenizer, tmp_path / "tokens" / "shard-00000.pt", tmp_path / "coarse", num_levels=1)
    assert not np.array_equal(sf.read(str(coarse[0]))[0], sf.read(str(written[0]))[0])


def test_encode_and_decode_scripts_on_images(image_run, tmp_path: Path):
    checkpoint = image_run("rvq") / "last.ckpt"
    script("encode", ckpt_path=checkpoint, out=tmp_path / "tokens", split="test", shard_size=10, device="cpu")
    index = load_index(tmp_path / "tokens")
    assert [item["id"] for item in index["items"]] == list(range(24))
    assert [item["shape"] for item in index["items"]] == [[8, 8, 4]] * 24
    assert index["shards"] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]

    script(
        "decode",
        ckpt_path=checkpoint,
        tokens=tmp_path / "tokens" / "shard-00001.pt",
        out=tmp_path / "png",
        num_levels=2,
    )
    tokenizer = load_tokenizer(checkpoint)
    shard = torch.load(tmp_path / "tokens" / "shard-00001.pt", weights_only=True)
    expected = tokenizer.decode(torch.stack(shard["tokens"]), num_levels=2)
    for i, identifier in enumerate(range(10, 20)):
        image = torch.from_numpy(np.array(Image.open(tmp_path / "png" / f"{identifier}.png").convert("L"))).float()
        assert image.shape == (32, 32)
        assert (image - ((expected[i, 0] + 1) / 2 * 255).clamp(0, 255)).abs().max() <= 0.5 + 1e-3


def test_decode_refuses_tokens_of_another_checkpoint_and_levels_it_lacks(image_run, audio_run: Path, tmp_path: Path):
    """They failed deep inside the decoder, or (audio tokens, an image checkpoint) were written as noise images."""
    rvq, rfsq = load_tokenizer(image_run("rvq") / "last.ckpt"), load_tokenizer(audio_run / "last.ckpt")
    encode_split(rfsq, run_config(rfsq.config), "test", tmp_path / "audio", shard_size=4)
    encode_split(rvq, run_config(rvq.config), "test", tmp_path / "image", shard_size=30)
    audio, image = tmp_path / "audio" / "shard-00000.pt", tmp_path / "image" / "shard-00000.pt"
    wrote_it = "decode them with the checkpoint that wrote them, "
    with pytest.raises(InvalidConfig, match=f"has audio tokens .*{wrote_it}{re.escape(rfsq.checkpoint)}$"):
        decode_shard(rvq, audio, tmp_path / "out")
    with pytest.raises(
        InvalidConfig, match=rf"has image tokens of shape \(8, 8, 4\).*{wrote_it}{re.escape(rvq.checkpoint)}$"
    ):
        decode_shard(rfsq, image, tmp_path / "out")
    with pytest.raises(InvalidConfig, match=r"^num_levels=5: the quantizer of .* has levels 1 to 4$"):
        decode_shard(rvq, image, tmp_path / "out", num_levels=5)
    assert not (tmp_path / "out").exists()
    assert len(decode_shard(rvq, image, tmp_path / "out", num_levels=4)) == 24
