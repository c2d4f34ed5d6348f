"""experiment=collapse_gpu, the collapse study at a GPU budget: its grid composes, and a run of it,
cut to a few steps, trains on a CPU on MNIST and FSDD."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from helpers import column, read_metrics
from vqtrain.config import CONFIG_DIR, compose, register_resolvers
from vqtrain.train import train

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher (make install)")

METHODS = "vq,vq_tricks,simvq,fsq,rvq,lfq,bsq,ibq".split(",")
# the preset's budget cut to 4 steps of 8 items, a validation batch at step 2 and 4, on the CPU
FEW_STEPS = [
    *("trainer=cpu", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"),
    *("model.usage_window=2", "trainer.log_every_n_steps=2", "data.batch_size=8", "test=false"),
]


def composed(*overrides: str) -> DictConfig:
    """The config with Hydra's own part (launcher, sweeper, choices), as a sweep sees it."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return hydra_compose("train", overrides=["experiment=collapse_gpu", *overrides], return_hydra_config=True)


def test_the_grid_is_every_method_at_three_sizes_on_mnist_and_fsdd():
    cfg = composed()
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.data.batch_size) == (3000, 500, 128)
    assert cfg.trainer.accelerator == "gpu" and cfg.hydra.launcher.n_jobs == 8
    grid = {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}
    assert grid == {
        "data": ["mnist", "fsdd"],
        "quantizer": METHODS,
        "quantizer.codebook_size": ["1024", "4096", "16384"],
    }
    assert len(list(itertools.product(*grid.values()))) == 48
    # a sweep point's data override replaces the preset's MNIST, the model with it
    audio = composed("data=fsdd", "quantizer=lfq", "quantizer.codebook_size=16384")
    assert (audio.hydra.runtime.choices.data, audio.hydra.runtime.choices.model) == ("fsdd", "audio")
    assert audio.data.batch_size == 128 and audio.trainer.max_steps == 3000


@pytest.mark.parametrize("data", ["mnist", "fsdd"])
def test_a_run_cut_to_a_few_steps_trains_on_a_cpu(data: str, request: pytest.FixtureRequest, tmp_path: Path):
    root = request.getfixturevalue(f"{data}_root")  # skipped where that data set is absent
    overrides = ["experiment=collapse_gpu", f"data={data}", "quantizer=vq_tricks", f"data.root={root}", *FEW_STEPS]
    if data == "fsdd":
        overrides += [f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=0.5"]
    metrics = train(compose(overrides, tmp_path / "run"))
    assert len(column(read_metrics(tmp_path / "run"), "val/utilization")) == 2
    assert 0 < metrics["val/utilization"] <= 1
