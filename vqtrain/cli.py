"""What the scripts share: typed `key=value` arguments, one-line errors, the
default device, tables and JSON files. The scripts in `scripts/` only parse
arguments and call the package."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from vqtrain.config import StartupError
from vqtrain.files import write_atomic

Schema = TypeVar("Schema")


def parse_args(schema: type[Schema], argv: Sequence[str]) -> tuple[Schema, list[str]]:
    """Hydra-style `key=value` arguments -> (the script's own, typed by the
    dataclass `schema`; the rest, config overrides for `run_config`)."""
    if bad := [arg for arg in argv if "=" not in arg]:
        raise SystemExit(f"arguments are key=value, got {bad}")
    names = {field.name for field in dataclasses.fields(schema)}
    own = [arg for arg in argv if arg.partition("=")[0] in names]
    args = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(own))
    if missing := sorted(OmegaConf.missing_keys(args)):
        raise SystemExit(f"missing required arguments: {' '.join(f'{name}=...' for name in missing)}")
    return OmegaConf.to_object(args), [arg for arg in argv if arg not in own]


def default_device() -> str:
    import torch  # here: the report script needs no torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(figures: dict[str, float]) -> str:
    width = max(map(len, figures))
    return "\n".join(f"{name:<{width}}  {value:>14.6g}" for name, value in figures.items())


def write_json(path: Path, content: dict) -> None:
    write_atomic(path, lambda file: file.write((json.dumps(content, indent=2) + "\n").encode()))


def run_script(main: Callable[[list[str]], None]) -> None:
    """`main(sys.argv[1:])`; an error the user fixes (a setting, a path, a
    damaged file: StartupError) ends in one line `error: ...` and exit status 1,
    without a traceback unless HYDRA_FULL_ERROR=1, as in training."""
    with one_line_errors():
        main(sys.argv[1:])


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A StartupError, or a value a constructor refused (its message names the key),
    as `error: <its message>` on stderr and exit status 1."""
    try:
        yield
    except StartupError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {error}")
    except InstantiationException as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(error.__cause__, (ValueError, TypeError)):
            raise
        _, _, where = str(error).partition("full_key: ")  # where in the config the object lives
        sys.exit(f"error: {error.__cause__}" + (f" (full_key: {where})" if where else ""))
