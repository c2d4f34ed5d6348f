"""scripts/check_pins.py: a torch / torchvision / torchaudio trio that cannot load
together is refused by name before any test imports it (simulated, never installed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_pins", REPO / "scripts" / "check_pins.py")
check_pins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_pins)


def test_the_pinned_trio_belongs_together():
    pins = check_pins.pinned(REPO / "constraints.txt")
    assert check_pins.trio_problems({name: pins[name] for name in check_pins.TRIO}) == []


def test_matching_cuda_builds_pass():
    assert (
        check_pins.trio_problems({"torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130", "torchaudio": "2.11.0+cu130"})
        == []
    )
    assert check_pins.trio_problems({"torch": "2.9.1", "torchvision": "0.24.1", "torchaudio": "2.9.1"}) == []


def test_torchaudio_patch_release_of_another_torch_is_named():
    problems = check_pins.trio_problems({"torch": "2.11.0", "torchvision": "0.26.0", "torchaudio": "2.11.1"})
    assert problems == ["torchaudio 2.11.1 is built for torch 2.11.1, not 2.11.0"]


def test_torchvision_of_another_torch_is_named():
    problems = check_pins.trio_problems({"torch": "2.11.0", "torchvision": "0.29.1", "torchaudio": "2.11.0"})
    assert problems == ["torchvision 0.29.1 does not belong to torch 2.11.0 (expected 0.26.x)"]


def test_missing_member_is_named():
    assert check_pins.trio_problems({"torch": "2.11.0", "torchvision": "0.26.0"}) == ["not installed: torchaudio"]


def test_drift_from_the_lock_is_named():
    pins = {"torch": "2.11.0", "numpy": "2.4.6", "absent": "1.0"}
    installed = {"torch": "2.11.0+cu130", "numpy": "2.5.0"}
    assert check_pins.drift(pins, installed) == ["numpy 2.5.0 installed, 2.4.6 pinned"]


def test_cli_fails_with_one_clear_line_on_a_mismatched_lock(tmp_path: Path):
    """The installed torch against a lock that pins another torchaudio: exit 1, naming both."""
    lock = tmp_path / "constraints.txt"
    lock.write_text("torchaudio==2.11.1\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_pins.py"), "--constraints", str(lock)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "torchaudio" in proc.stderr and "2.11.1 pinned" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        subprocess.run([sys.executable, str(REPO / "scripts" / "check_pins.py")], capture_output=True).returncode == 0
    )
