"""The run config: Hydra resolvers (registered before any config is composed),
composition outside the CLI, the start-up checks of settings no constructor
sees, and a trained run's config with overrides."""

from __future__ import annotations

import math
import netrc
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

RUN_ID_ENV = "VQTRAIN_RUN_ID"
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # where `pip install .` puts configs/
CONFIG_DIR = PACKAGED_CONFIGS if PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parents[1] / "configs"

# key -> (test, allowed values): settings that torch or Lightning accept, or refuse
# without naming them, though they would train nothing, train backwards or log nothing
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer.lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "model.discriminator_optimizer.lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "model.scheduler.warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "model.scheduler.min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "trainer.max_steps": (lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1"),
    "trainer.max_epochs": (
        lambda v: v is None or isinstance(v, int) and (v == -1 or v >= 1),
        "null, -1 (no limit) or an integer >= 1",
    ),
    "trainer.gradient_clip_val": (lambda v: v is None or 0 <= v < math.inf, "null or a finite number >= 0"),
    "trainer.log_every_n_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "trainer.val_check_interval": (
        lambda v: v >= 1 if isinstance(v, int) else 0 < v <= 1,
        "an integer >= 1 (training steps) or a fraction in (0, 1] of an epoch",
    ),
    "seed": (lambda v: v is None or isinstance(v, int) and 0 <= v < 2**32, "null or an integer in [0, 2^32)"),
}
ABSENT = object()


class StartupError(Exception):
    """An error the user fixes (a setting, a path, a damaged file), mostly found
    at start-up, before anything is built: the CLI and the scripts print its
    message as one line, without a traceback (HYDRA_FULL_ERROR=1 shows it)."""


class InvalidConfig(StartupError, ValueError):
    """Values that would fail late, or not fail and train the wrong thing."""


class MissingPath(StartupError, FileNotFoundError):
    """A folder or file that a setting names is absent."""


@dataclass(frozen=True)
class Required:
    """A folder or file a run reads, the config key that points to it and what
    belongs there: what a data module's `required_paths` lists."""

    key: str
    path: Path
    expected: str
    folder: bool = True

    def problem(self) -> str | None:
        """None when the path exists, else one line naming the key and the path."""
        kind, present = ("folder", self.path.is_dir()) if self.folder else ("file", self.path.is_file())
        return None if present else f"{self.key}: no {kind} {self.path} (expected {self.expected})"

    def check(self) -> None:
        if problem := self.problem():
            raise MissingPath(problem)


def check_paths(required: Iterable[Required]) -> None:
    """Refuse absent folders and files before anything is built: the first one
    of each key, every key at once (a missing folder hides the files in it)."""
    problems: dict[str, str] = {}
    for item in required:
        if item.key not in problems and (problem := item.problem()):
            problems[item.key] = problem
    if problems:
        raise MissingPath("; ".join(problems.values()))


def passes(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:  # e.g. a string where a number belongs
        return False


def check_config(cfg: DictConfig) -> None:
    """Refuse, before anything is built, settings that would not fail by themselves
    but train nothing or the wrong thing; the message names every offending key."""
    problems = []
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is not ABSENT and not passes(test, value):
            problems.append(f"{key}={value!r} (must be {allowed})")
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    if isinstance(interval, float) and OmegaConf.select(cfg, "trainer.check_val_every_n_epoch") is None:
        problems.append(
            f"trainer.val_check_interval={interval} (a fraction of an epoch needs "
            "trainer.check_val_every_n_epoch=1; the default validates every N training steps)"
        )
    image_size = OmegaConf.select(cfg, "data.image_size")
    downsamples = OmegaConf.select(cfg, "model.encoder.num_downsamples")
    ch_mult = OmegaConf.select(cfg, "model.encoder.ch_mult")
    if isinstance(downsamples, int):
        stride, key = 2**downsamples, "2^model.encoder.num_downsamples"
    elif ch_mult is not None:
        stride, key = 2 ** (len(ch_mult) - 1), "2^(len(model.encoder.ch_mult) - 1)"
    else:
        stride = None
    if isinstance(image_size, int) and stride and image_size % stride:
        problems.append(f"data.image_size={image_size} (must be divisible by {key} = {stride})")
    if isinstance(image_size, int) and OmegaConf.select(cfg, "callbacks.signal_quality") is not None:
        from vqtrain.quality import image_size_problem  # (it imports this module)

        if problem := image_size_problem(OmegaConf.select(cfg, "callbacks.signal_quality.metrics"), image_size):
            problems.append(problem)
    if problems:
        raise InvalidConfig("invalid config: " + "; ".join(problems))


def run_id() -> str:
    """A run directory name that cannot collide and survives requeues.

    Under SLURM it is the job (and array task) id, so a requeued job finds its
    own directory and resumes. Elsewhere: date, time and random hex, kept in
    the environment so processes started by this one (DDP ranks) agree."""
    if RUN_ID_ENV not in os.environ:
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if job:
            os.environ[RUN_ID_ENV] = f"slurm-{job}" + (f"_{task}" if task else "")
        else:
            os.environ[RUN_ID_ENV] = time.strftime("%Y-%m-%d_%H-%M-%S_") + secrets.token_hex(3)
    return os.environ[RUN_ID_ENV]


def wandb_offline() -> bool:
    """Offline unless the user is logged in (an API key in the environment or ~/.netrc)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
    # ${hydra:runtime.cwd} is unset while a sweep is launched: multirun paths need their own
    OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)


def compose(overrides: list[str] = (), output_dir: str | Path | None = None):
    """The training config as `python train.py OVERRIDES` would compose it, for
    notebooks and tests: `vqtrain.train.train(compose(["quantizer=fsq"], "/tmp/run"))`.

    The result is fully resolved (`${hydra:...}` as in a real run), so it stays
    valid after another compose; the output directory is `output_dir` (a fresh
    run directory name under runs/ when None)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(output_dir) if output_dir is not None else cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # as in a real run: the job's config holds no hydra node
    OmegaConf.resolve(cfg)
    return cfg


# --- a trained run's config ---------------------------------------------------------


def run_config(config: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The training run's config with overrides: `data=NAME` swaps in that data
    config as train.py would compose it (its paths resolve against the run's),
    `key=value` sets an existing key. The checkpoint fixes every other group."""
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)  # a misspelt key is an error, not a silent no-op
    dotlist = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "data":
            if not (CONFIG_DIR / "data" / f"{value}.yaml").is_file():
                options = sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))
                raise InvalidConfig(f"data={value}: no such data config; choose from {options}")
            cfg.data = composed_data_config(value)
        elif (CONFIG_DIR / key).is_dir():
            raise InvalidConfig(f"{key}={value}: the checkpoint fixes `{key}`; only data=NAME can be switched")
        else:
            dotlist.append(override)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except ConfigKeyError as error:
        raise InvalidConfig(f"{error.full_key}: the run's config has no such key") from error


def composed_data_config(name: str) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=[f"data={name}"]).data
