"""Fail fast when the installed torch, torchvision and torchaudio do not belong
together, or when any package drifted from constraints.txt.

    python scripts/check_pins.py [--constraints constraints.txt]

A mismatched trio installs without complaint and fails only at import
(`libtorchaudio.so: undefined symbol ...`), deep inside a test run. This check
reads package metadata only, so it runs (and names the versions) even when
importing torchaudio would crash. `make install` runs it after installing.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIO = ("torch", "torchvision", "torchaudio")


def release(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0): the local build tag does not change the ABI family."""
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


def trio_problems(versions: dict[str, str]) -> list[str]:
    """Why these torch / torchvision / torchaudio versions cannot be used together (empty: they can).

    torchaudio is built against one torch release (same version number); torchvision
    0.N is built for torch 2.(N - 15)."""
    missing = [name for name in TRIO if name not in versions]
    if missing:
        return [f"not installed: {', '.join(missing)}"]
    torch, vision, audio = (release(versions[name]) for name in TRIO)
    problems = []
    if audio[:3] != torch[:3]:
        problems.append(
            f"torchaudio {versions['torchaudio']} is built for torch {'.'.join(map(str, audio[:3]))}, not {versions['torch']}"
        )
    if vision[:2] != (0, torch[1] + 15) or torch[0] != 2:
        problems.append(
            f"torchvision {versions['torchvision']} does not belong to torch {versions['torch']} (expected 0.{torch[1] + 15}.x)"
        )
    return problems


def pinned(constraints: Path) -> dict[str, str]:
    """name -> version for every `name==version` line."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def drift(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Pinned packages installed at another version (absent ones are optional extras)."""
    return [
        f"{name} {installed[name]} installed, {version} pinned"
        for name, version in sorted(pins.items())
        if name in installed and release(installed[name]) != release(version)
    ]


def installed_versions() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    args = parser.parse_args(argv)
    installed = installed_versions()
    problems = trio_problems({name: installed[name] for name in TRIO if name in installed})
    problems += drift(pinned(args.constraints), installed)
    if problems:
        print("error: the installed packages are not the tested set: " + "; ".join(problems), file=sys.stderr)
        print(f"reinstall from {args.constraints.name} (make clean && make install)", file=sys.stderr)
        return 1
    print("packages match " + args.constraints.name + ": " + ", ".join(f"{n} {installed[n]}" for n in TRIO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
