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


def test_every_config_folder_ships_as_a_listed_package():
    """`pip install .` puts configs/ inside the package; setuptools expects each folder
    with package data to be a listed package (else it warns once per folder, and a
    folder left out would not ship)."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"vqtrain.configs": "configs"}
    folders = [p for p in (REPO / "configs").rglob("*") if p.is_dir() and any(p.glob("*.yaml"))]
    expected = {"vqtrain.configs"} | {
        "vqtrain.configs." + ".".join(p.relative_to(REPO / "configs").parts) for p in folders
    }
    assert expected == {name for name in setuptools["packages"] if name.startswith("vqtrain.configs")}
