"""The files vqtrain writes and reads back (checkpoints, token shards, index.json,
the audio header cache, a run's CSV log): written whole, by rename; read back
checked. Files are damaged on the way as well (a partial copy, a full disk, a
bad block): a file that cannot be read, or whose content fails its checksum,
is an `UnreadableFile` error, one line naming the file, what belongs there and
what to do, which the CLI and the scripts print without a traceback."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vqtrain.config import MissingPath, StartupError

log = logging.getLogger(__name__)

_PATH = str | os.PathLike
CHECKSUM_KEY = "sha256"  # in JSON files: the SHA-256 of the rest of the content


class UnreadableFile(StartupError, ValueError):
    """A file vqtrain wrote that is truncated, damaged or not the kind expected:
    `path`, and `problem`, what is wrong with it (the message adds what belongs
    there and what to do)."""

    path: Path | None = None
    problem = ""


def unreadable(path: _PATH, problem: str, expected: str, remedy: str) -> UnreadableFile:
    error = UnreadableFile(f"{path}: {problem} (expected {expected}): {remedy}")
    error.path, error.problem = Path(path), problem
    return error


def first_line(error: BaseException) -> str:
    """The gist of a library's error, whose messages can run to many lines."""
    return next(iter(str(error).strip().splitlines()), "") or type(error).__name__


def write_atomic(path: _PATH, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a hidden temporary file next to `path`, fsync, rename
    over `path`: a file that exists is complete, and a kill mid-write leaves the
    previous one. The temporary file is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


# --- torch.save archives: checkpoints, token shards ------------------------------------


def check_archive(path: _PATH, expected: str, remedy: str) -> None:
    """The CRC-32 of every record of a torch.save zip archive, which torch.load
    does not check: a changed byte would otherwise load as different weights or
    tokens. It holds for files written before this check as well. Costs one
    read of the file (zlib's CRC runs at GB/s)."""
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except FileNotFoundError:
        raise MissingPath(f"{path}: no such file (expected {expected})") from None
    except zipfile.BadZipFile as error:  # no zip archive's directory at its end
        raise unreadable(path, "truncated, or not a file torch.save wrote", expected, remedy) from error
    except Exception as error:  # whatever else a damaged archive raises (EOFError, OSError, NotImplementedError, ...)
        raise unreadable(path, f"damaged: {first_line(error)}", expected, remedy) from error
    if failed is not None:
        raise unreadable(path, f"damaged: its record {failed} fails its CRC check", expected, remedy)


def archive_fingerprint(path: _PATH) -> str:
    """A digest of a torch.save archive's record names and CRC-32s, read from its
    zip directory alone: it changes with the content of any record (a checkpoint
    trained further and saved over the same path)."""
    with zipfile.ZipFile(path) as archive:
        records = [(record.filename, record.CRC) for record in archive.infolist()]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def load_archive(path: _PATH, expected: str, remedy: str, mmap: bool = False) -> Any:
    """torch.load (weights only, to the CPU) of a checked archive. `mmap`: tensors
    stay on disk until used, for a look at what a large file holds."""
    import torch  # here: reading a CSV log or JSON file needs no torch

    check_archive(path, expected, remedy)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # an archive torch.load cannot read, whatever it raises
        raise unreadable(path, f"not readable by torch.load: {first_line(error)}", expected, remedy) from error


# --- JSON with a checksum: index.json, the audio header cache -----------------------


def digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def write_checked_json(path: _PATH, content: dict) -> None:
    """`content` and, under "sha256", the SHA-256 of its JSON: a changed digit,
    which still parses, is found when the file is read back."""
    text = json.dumps({**content, CHECKSUM_KEY: digest(content)}) + "\n"
    write_atomic(path, lambda file: file.write(text.encode()))


def read_checked_json(path: _PATH, expected: str, remedy: str) -> tuple[dict, bool]:
    """(content, whether it carried a checksum) of a `write_checked_json` file;
    one whose content fails its checksum is an UnreadableFile. Files written
    before checksums were added carry none: the caller says what that means."""
    try:
        content = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise MissingPath(f"{path}: no such file (expected {expected})") from None
    except (OSError, ValueError) as error:
        raise unreadable(path, f"truncated or damaged: {first_line(error)}", expected, remedy) from error
    if not isinstance(content, dict):
        raise unreadable(path, f"holds a JSON {type(content).__name__}, not an object", expected, remedy)
    claimed = content.pop(CHECKSUM_KEY, None)
    if claimed is not None and claimed != digest(content):
        raise unreadable(path, "damaged: its content does not match its checksum", expected, remedy)
    return content, claimed is not None


# --- CSV logs -------------------------------------------------------------------------

CSV_REMEDY = "restore it from a copy, or move it away (a resumed run starts a new log)"


def read_csv_log(path: _PATH) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV log such as Lightning's metrics.csv, which is
    appended to and carries no checksum. A last line without its newline (a
    copy cut short) is left out with a warning; text that is not the log's CSV
    is an UnreadableFile."""
    expected = "a CSV log, a header line then rows of as many fields"
    try:
        with open(path, encoding="utf-8", newline="") as file:
            text = file.read()
    except FileNotFoundError:
        raise MissingPath(f"{path}: no such file (expected {expected})") from None
    except (OSError, ValueError) as error:
        raise unreadable(path, f"not text: {first_line(error)}", expected, CSV_REMEDY) from error
    if text and not text.endswith("\n"):
        log.warning("%s ends in a partial line (a copy cut short?): left out", path)
        text = text[: text.rfind("\n") + 1]
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise unreadable(path, f"not CSV: {error}", expected, CSV_REMEDY) from error
    header, rows = (lines[0], lines[1:]) if lines else ([], [])
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            problem = f"row {number} has {len(row)} fields, the header {len(header)}"
            raise unreadable(path, problem, expected, CSV_REMEDY)
    return header, [dict(zip(header, row)) for row in rows]
