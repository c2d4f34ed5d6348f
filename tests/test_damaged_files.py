"""Damaged files (a copy cut short, a changed byte, the wrong file): reading one
ends in one line naming it, what belongs there and what to do, in a named
fallback (resume takes an older checkpoint), or in a counted skip; never in a
traceback or in a different model or different tokens."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import global_step, read_metrics
from vqtrain.config import compose
from vqtrain.tokens import save_shard
from vqtrain.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["debug=tiny", "trainer.val_check_interval=2", "test=false", "quantizer.codebook_size=64"]
SHAPES = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=16"]
KEEP_ALL = "callbacks.model_checkpoint.save_top_k=-1"  # step0000002.ckpt and step0000004.ckpt
SHARD = {"meta": {"split": "test"}, "ids": [0, 1], "index": [0, 1], "lengths": None, "skipped": []}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of 4 steps validated at 2 and 4: step0000002.ckpt, step0000004.ckpt, last.ckpt."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose([*FAST, *SHAPES, KEEP_ALL, "trainer.max_steps=4"], run_dir))
    return run_dir


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


def run_script(*args: str, full_error: bool = False) -> subprocess.CompletedProcess:
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
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    run_dir = copy_of(trained, tmp_path)
    cut_short(run_dir / "last.ckpt")
    with caplog.at_level(logging.INFO):
        train(compose([*FAST, *SHAPES, KEEP_ALL, "trainer.max_steps=6"], run_dir))
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]
    assert len(skipped) == 1 and str(run_dir / "last.ckpt") in skipped[0], caplog.text
    assert f"resuming from {run_dir / 'step0000004.ckpt'}" in caplog.text
    assert global_step(run_dir / "last.ckpt") == 6
    trained_steps = [int(row["step"]) for row in read_metrics(run_dir) if row["train/loss"]]
    assert trained_steps == [0, 1, 2, 3, 4, 5]  # the first run's 4 steps, then 4 and 5: not from scratch


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 0.12\n")
    result = run_script(
        "train.py", f"hydra.run.dir={tmp_path / 'run'}", *FAST, *SHAPES, "trainer.max_steps=2", f"ckpt_path={notes}"
    )
    assert_one_line(result, f"{notes}: ", "expected a vqtrain training checkpoint")
    assert not list((tmp_path / "run").glob("*.ckpt"))


@pytest.mark.parametrize("full_error", [False, True])
def test_eval_of_a_truncated_checkpoint_is_one_line(trained: Path, tmp_path: Path, full_error: bool):
    """HYDRA_FULL_ERROR=1 shows the traceback, as for training's own start-up errors."""
    checkpoint = Path(shutil.copy(trained / "last.ckpt", tmp_path / "last.ckpt"))
    cut_short(checkpoint)
    result = run_script("scripts/eval.py", f"ckpt_path={checkpoint}", "device=cpu", full_error=full_error)
    if full_error:
        assert result.returncode == 1 and "Traceback" in result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"vqtrain.files.UnreadableFile: {checkpoint}: ")
    else:
        assert_one_line(result, f"{checkpoint}: ", "expected a vqtrain training checkpoint")


def test_decode_of_a_truncated_token_shard_is_one_line(trained: Path, tmp_path: Path):
    shard = tmp_path / "shard-00000.pt"
    save_shard(shard, {**SHARD, "tokens": [torch.arange(64).reshape(8, 8)] * 2})
    cut_short(shard)
    result = run_script(
        "scripts/decode.py", f"ckpt_path={trained / 'last.ckpt'}", f"tokens={shard}", f"out={tmp_path / 'png'}"
    )
    assert_one_line(result, f"{shard}: ", "expected a token shard", "scripts/encode.py")
    assert not (tmp_path / "png").exists()


def test_a_changed_byte_in_the_weights_is_damage_not_another_model(trained: Path, tmp_path: Path):
    from vqtrain.tokenizer import load_tokenizer

    checkpoint = Path(shutil.copy(trained / "last.ckpt", tmp_path / "last.ckpt"))
    original = torch.load(trained / "last.ckpt", weights_only=True)["state_dict"]
    flip_inside(checkpoint, max(original.values(), key=torch.Tensor.numel))
    changed = torch.load(checkpoint, weights_only=True)["state_dict"]  # torch itself does not notice
    assert any(not torch.equal(original[key], changed[key]) for key in original)
    with pytest.raises(ValueError, match=rf"^{checkpoint}: damaged: its record .* fails its CRC check"):
        load_tokenizer(checkpoint)


def test_a_changed_byte_in_the_tokens_is_damage_not_other_tokens(tmp_path: Path):
    from vqtrain.tokens import load_shard

    shard = tmp_path / "shard-00000.pt"
    tokens = torch.arange(4096).reshape(64, 64)
    save_shard(shard, {**SHARD, "tokens": [tokens, tokens + 1]})
    flip_inside(shard, tokens)
    with pytest.raises(ValueError, match=rf"^{shard}: damaged: its record .* fails its CRC check"):
        load_shard(shard)
