"""Hydra resolvers and run-level checks: imported before any config is composed."""
from __future__ import annotations

import netrc
import os
import secrets
import time
from pathlib import Path

from omegaconf import OmegaConf

RUN_ID_ENV = "VQTRAIN_RUN_ID"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
