"""Damaged files (a copy cut short, a changed byte, the wrong file): reading one
ends in one line naming it, what belongs there and what to do, in a named
fallback (resume takes an older checkpoint), or in a counted skip; never in a
traceback or in a different model or different tokens."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers import TINY_RUN, global_step, read_metrics
from vqtrain.config import compose, run_config
from vqtrain.data.audio import AudioFolder
from vqtrain.files import UnreadableFile, read_checked_json, write_checked_json
from vqtrain.tokenizer import load_tokenizer
from vqtrain.tokens import encode_split, load_index, load_shard, save_shard
from vqtrain.train import train

REPO = Path(__file__).resolve().parents[1]
SHARD = {"meta": {"split": "test"}, "ids": [0, 1], "index": [0, 1], "lengths": None, "skipped": []}


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def cut_short(path: Path) -> None:
    """As a partial copy leaves it: the first half, newer than before."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """One byte changed in the middle of where `tensor`'s bytes lie in the file (a weight, the tokens)."""
    content = bytearray(path.read_bytes())
    data = tensor.contiguous().numpy().tobytes()
    start = content.find(data)
    assert start >= 0 and content.find(data, start + 1) < 0, "want the tensor's bytes once in the file"
    content[start + len(data) // 2] ^= 0x10
    path.write_bytes(bytes(content))


def run_python(*args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def assert_one_line(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit status 1 and, as the last line of stderr, `error: ...` holding `parts`; no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.splitlines()[-1]
    assert line.startswith("error: ") and all(part in line for part in parts), line
    return line


# --- the cases of issue 27 ---------------------------------------------------------


def test_resume_auto_skips_a_truncated_last_checkpoint_naming_it(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    run_dir = copy_of(tiny_run, tmp_path)
    cut_short(run_dir / "last.ckpt")
    with caplog.at_level(logging.INFO):
        train(compose([*TINY_RUN, "trainer.max_steps=6"], run_dir))
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(skipped) == 1 and str(run_dir / "last.ckpt") in skipped[0], caplog.text
    assert f"resuming from {run_dir / 'step0000004.ckpt'}" in caplog.text
    assert global_step(run_dir / "last.ckpt") == 6
    steps = [int(row["step"]) for row in read_metrics(run_dir) if row["train/loss"]]
    assert steps == [0, 1, 2, 3, 4, 5]  # the first run's 4 steps, then 4 and 5: not from scratch


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 0.12\n")
    result = run_python(
        "train.py", f"hydra.run.dir={tmp_path / 'run'}", *TINY_RUN, "trainer.max_steps=2", f"ckpt_path={notes}"
    )
    assert_one_line(result, f"{notes}: ", "expected a vqtrain training checkpoint")
    assert not list((tmp_path / "run").glob("*.ckpt"))


@pytest.mark.parametrize("full_error", [False, True])
def test_eval_of_a_truncated_checkpoint_is_one_line(tiny_run: Path, tmp_path: Path, full_error: bool):
    """HYDRA_FULL_ERROR=1 shows the traceback, as for training's own start-up errors."""
    checkpoint = Path(shutil.copy(tiny_run / "last.ckpt", tmp_path / "last.ckpt"))
    cut_short(checkpoint)
    result = run_python("scripts/eval.py", f"ckpt_path={checkpoint}", "device=cpu", full_error=full_error)
    if full_error:
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"vqtrain.files.UnreadableFile: {checkpoint}: ")
    else:
        assert_one_line(result, f"{checkpoint}: ", "expected a vqtrain training checkpoint")


def test_decode_of_a_truncated_token_shard_is_one_line(tiny_run: Path, tmp_path: Path):
    shard = tmp_path / "shard-00000.pt"
    save_shard(shard, {**SHARD, "tokens": [torch.arange(64).reshape(8, 8)] * 2})
    cut_short(shard)
    result = run_python(
        "scripts/decode.py", f"ckpt_path={tiny_run / 'last.ckpt'}", f"tokens={shard}", f"out={tmp_path / 'png'}"
    )
    assert_one_line(result, f"{shard}: ", "expected a token shard", "scripts/encode.py")
    assert not (tmp_path / "png").exists()


def test_a_changed_byte_in_the_weights_is_damage_not_another_model(tiny_run: Path, tmp_path: Path):
    checkpoint = Path(shutil.copy(tiny_run / "last.ckpt", tmp_path / "last.ckpt"))
    original = torch.load(tiny_run / "last.ckpt", weights_only=True)["state_dict"]
    flip_inside(checkpoint, max(original.values(), key=torch.Tensor.numel))
    changed = torch.load(checkpoint, weights_only=True)["state_dict"]  # torch itself does not notice
    assert any(not torch.equal(original[key], changed[key]) for key in original)
    with pytest.raises(ValueError, match=rf"^{checkpoint}: damaged: its record .* fails its CRC check"):
        load_tokenizer(checkpoint)


def test_a_changed_byte_in_the_tokens_is_damage_not_other_tokens(tmp_path: Path):
    shard = tmp_path / "shard-00000.pt"
    tokens = torch.arange(4096).reshape(64, 64)
    save_shard(shard, {**SHARD, "tokens": [tokens, tokens + 1]})
    flip_inside(shard, tokens)
    with pytest.raises(ValueError, match=rf"^{shard}: damaged: its record .* fails its CRC check"):
        load_shard(shard)


# --- the other files: each damage named, with a fallback where there is one ----------------


def test_resume_auto_with_no_readable_checkpoint_stops_listing_them(tiny_run: Path, tmp_path: Path):
    run_dir = copy_of(tiny_run, tmp_path)
    for path in run_dir.glob("*.ckpt"):
        cut_short(path)
    before = {path: path.read_bytes() for path in run_dir.glob("*.ckpt")}
    with pytest.raises(UnreadableFile) as error:
        train(compose([*TINY_RUN, "trainer.max_steps=6"], run_dir))
    message = str(error.value)
    assert message.startswith(f"resume=auto: no readable checkpoint in {run_dir} (") and "\n" not in message
    for name in ("last.ckpt", "step0000002.ckpt", "step0000004.ckpt"):
        assert f"{name}: truncated" in message
    assert message.endswith("or start afresh in another run directory")
    assert {path: path.read_bytes() for path in run_dir.glob("*.ckpt")} == before  # nothing started over them


def change_a_digit(path: Path, after: str) -> None:
    """A digit changed where the JSON still parses: the damage only the checksum finds."""
    text = path.read_text()
    spot = text.index(after) + len(after)
    assert text[spot].isdigit()
    path.write_text(text[:spot] + str((int(text[spot]) + 1) % 10) + text[spot + 1 :])


def test_index_json_with_a_changed_digit_is_refused_and_an_old_one_read_unverified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    index = {"split": "test", "items": [{"id": 0, "shard": "shard-00000.pt", "shape": [8, 8]}]}
    write_checked_json(tmp_path / "index.json", index)
    assert load_index(tmp_path) == index
    change_a_digit(tmp_path / "index.json", '"shape": [')
    with pytest.raises(UnreadableFile, match=r"index.json: damaged: its content does not match its checksum"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))  # as vqtrain wrote it before checksums
    assert load_index(tmp_path) == index
    assert "index.json carries no checksum (written by an earlier vqtrain): read unverified" in caplog.text


def test_a_damaged_header_cache_is_named_and_the_headers_read_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root, cache = tmp_path / "audio", tmp_path / "cache"
    root.mkdir()
    for i, frames in enumerate([400, 1200]):
        sf.write(root / f"clip{i}.wav", np.zeros(frames, dtype=np.float32), 8000)
    assert AudioFolder(root, 8000, cache_dir=cache).lengths == [400, 1200]
    (cache_file,) = cache.iterdir()
    change_a_digit(cache_file, '"clip1.wav": [')  # the size: the file would look changed, or another file
    with caplog.at_level(logging.WARNING):
        assert AudioFolder(root, 8000, cache_dir=cache).lengths == [400, 1200]
    assert f"{cache_file}: damaged: its content does not match its checksum" in caplog.text
    assert read_checked_json(cache_file, "", "")[1]  # written anew, with its checksum


def test_encoding_again_replaces_a_damaged_shard_naming_it(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    tokenizer = load_tokenizer(tiny_run / "last.ckpt")
    cfg = run_config(tokenizer.config)
    index = encode_split(tokenizer, cfg, "test", tmp_path, shard_size=8)
    whole = (tmp_path / "shard-00001.pt").read_bytes()
    cut_short(tmp_path / "shard-00001.pt")
    with caplog.at_level(logging.WARNING):
        assert encode_split(tokenizer, cfg, "test", tmp_path, shard_size=8) == index
    assert f"{tmp_path / 'shard-00001.pt'}: truncated" in caplog.text and "encoding it again" in caplog.text
    assert (tmp_path / "shard-00001.pt").read_bytes() == whole


def test_a_resumed_run_mends_its_csv_log_or_starts_a_new_one(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Cut short: the partial last line goes, the resumed run's rows follow on lines of their
    own. Not CSV: moved aside to metrics.damaged.csv, named, and a new log started."""
    run_dir = copy_of(tiny_run, tmp_path)
    metrics = run_dir / "metrics.csv"
    rows = read_metrics(run_dir)
    metrics.write_bytes(metrics.read_bytes()[:-7])
    train(compose([*TINY_RUN, "trainer.max_steps=6"], run_dir))
    assert f"{metrics} ends in a partial line (a copy cut short?): left out" in caplog.text
    mended = read_metrics(run_dir)
    assert mended[: len(rows) - 1] == rows[:-1] and mended[len(rows) - 1]["step"] == "4"

    metrics.write_bytes(b"\x00\xff" * 100)
    damaged = metrics.read_bytes()
    train(compose([*TINY_RUN, "trainer.max_steps=8"], run_dir))
    assert (run_dir / "metrics.damaged.csv").read_bytes() == damaged
    assert f"{metrics}: not text" in caplog.text and "moved to metrics.damaged.csv" in caplog.text
    assert [int(row["step"]) for row in read_metrics(run_dir) if row["train/loss"]] == [6, 7]


def test_the_run_report_names_a_damaged_log(tmp_path: Path):
    from vqtrain.runs import read_metrics as report_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,0.5\n0,1,0.4,0.3\n")
    with pytest.raises(UnreadableFile, match=rf"^{path}: row 3 has 4 fields, the header 3 \(expected a CSV log"):
        report_metrics(path)
    path.write_text("epoch,step,train/loss\n0,0,0.5\n0,1,0.4e\n")
    with pytest.raises(UnreadableFile, match=rf"^{path}: damaged: could not convert string to float: '0.4e'"):
        report_metrics(path)
