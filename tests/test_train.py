"""The training spine: config composition, the CLI, real fits that log every metric."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from helpers import QUANTIZERS, check_logging_decisions, column, read_metrics, run_cli
from vqtrain.config import compose
from vqtrain.train import train

IMAGE_DATA = ["shapes", "mnist", "cifar10", "image_folder"]
AUDIO_DATA = ["fsdd", "audio_folder", "librispeech", "libritts", "ljspeech"]
METRICS = [
    "loss",
    "recon_loss",
    "codebook_loss",
    "commitment_loss",
    "utilization",
    "entropy_utilization",
    "perplexity",
    "dead_codes",
    "effective_rank",
]
QUICK = ["debug=tiny", "data.batch_size=16"]


@pytest.mark.parametrize("data", IMAGE_DATA + AUDIO_DATA)
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_quantizer_composes_with_every_dataset(quantizer: str, data: str, tmp_path: Path):
    cfg = compose([f"quantizer={quantizer}", f"data={data}"], tmp_path)
    model = instantiate(cfg.model)
    instantiate(cfg.data)  # constructing a data module touches no files
    expected = "ConvEncoder1d" if data in AUDIO_DATA else "ConvEncoder2d"
    assert type(model.encoder).__name__ == expected
    assert model.quantizer.dim == cfg.model.latent_dim


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_quantizer_runs_in_each_model(quantizer: str, modality: str, tmp_path: Path):
    audio = modality == "audio"
    cfg = compose([f"quantizer={quantizer}", "data=fsdd" if audio else "data=shapes"], tmp_path)
    model = instantiate(cfg.model).eval()
    x = torch.randn(2, 1, 400) if audio else torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    mask = torch.arange(400)[None] < torch.tensor([[400], [150]]) if audio else None
    with torch.no_grad():
        x_hat, out = model(x, mask)
    assert x_hat.shape == x.shape
    assert out.indices.dtype == torch.int64


@pytest.mark.parametrize(("quantizer", "prefix"), [("simvq", "quantizer."), ("rsimvq", "+quantizer.quantizer.")])
def test_simvq_map_trains_at_its_own_rate_and_decay(quantizer: str, prefix: str, tmp_path: Path):
    """SimVQ's W (`transform`) steps at lr x transform_lr_scale, also under the schedule, with
    its own decoupled weight decay; the rest of the quantizer at lr without decay.
    At the model's rate W outgrows FSDD's latents and utilization falls (docs/quantizers.md, SimVQ)."""
    overrides = [
        f"quantizer={quantizer}",
        f"{prefix}transform_lr_scale=0.25",
        f"{prefix}transform_weight_decay=0.5",
        "optimizer.lr=2e-3",
        "model.scheduler.total_steps=10",
    ]
    model = instantiate(compose(overrides, tmp_path).model)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    maps = {id(m.transform) for m in model.quantizer.modules() if hasattr(m, "transform")}
    quantizer_params = {id(p) for p in model.quantizer.parameters()}
    groups = {
        id(p): (group["lr"], base, group["weight_decay"], group.get("decoupled_weight_decay", False))
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs)
        for p in group["params"]
    }
    assert maps and groups.keys() == {id(p) for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        lr = 2e-3 * 0.25 if id(p) in maps else 2e-3
        assert groups[id(p)][:2] == pytest.approx((lr, lr))
        if id(p) in maps:
            assert groups[id(p)][2:] == (0.5, True)
        elif id(p) in quantizer_params:
            assert groups[id(p)][2] == 0  # a codebook decays only where its module asks


def test_simvq_audio_is_the_recipe_measured_on_fsdd(tmp_path: Path):
    """quantizer=simvq_audio: straight-through, W at 3x the rate with a decoupled decay of 1.0
    (docs/quantizers.md, "SimVQ for audio"); the rest as `simvq`."""
    overrides = ["quantizer=simvq_audio", "optimizer.lr=1e-3", "model.scheduler.total_steps=10"]
    model = instantiate(compose(overrides, tmp_path).model)
    assert model.quantizer.estimator == "ste"
    optimizer = model.configure_optimizers()["optimizer"]
    (group,) = [g for g in optimizer.param_groups if any(p is model.quantizer.transform for p in g["params"])]
    assert group["params"] == [model.quantizer.transform]
    assert (group["lr"], group["weight_decay"], group["decoupled_weight_decay"]) == pytest.approx((3e-3, 1.0, True))


def test_unknown_quantizer_lists_the_available_options(tmp_path: Path):
    result = run_cli("quantizer=nope", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'quantizer/nope'" in result.stderr
    for name in QUANTIZERS:
        assert f"\t{name}\n" in result.stderr


def test_cli_run_writes_config_checkpoint_and_metrics(tmp_path: Path):
    result = run_cli(
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "data.num_train=128",
        "trainer.log_every_n_steps=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "last.ckpt").is_file()
    assert column(read_metrics(run_dir), "train/loss")
    assert not (tmp_path / "outputs").exists()  # nothing escapes the run directory
    # a quiet start (vqtrain.quiet): the resolved choices first, and no warning before the first progress bar
    first_line = result.stdout.splitlines()[0]
    assert "model=image quantizer=vq_tricks data=shapes" in first_line
    assert f"run directory {run_dir}" in first_line
    before_progress = result.stderr.split("Sanity Checking")[0]
    assert not re.search(r"\.py:\d+: ", before_progress), before_progress  # a warning's "file.py:line: "
    assert "weights_only" not in result.stdout + result.stderr  # Lightning's note at every save that passes none


def test_run_ids_differ_between_processes_started_together():
    code = "from vqtrain.config import run_id; print(run_id())"
    env = {k: v for k, v in os.environ.items() if k not in ("VQTRAIN_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    ids = [p.communicate()[0].strip() for p in procs]
    assert ids[0] != ids[1]


def test_slurm_run_id_is_stable_across_requeues():
    code = "from vqtrain.config import run_id; print(run_id())"
    env = {**{k: v for k, v in os.environ.items() if k != "VQTRAIN_RUN_ID"}, "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    ids = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()
        for _ in range(2)
    }
    assert ids == {"slurm-4242"}


def test_a_run_without_wandb_installed_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only logger=wandb needs wandb (a GPU image may lack it): importing it fails here."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    metrics = train(compose(["debug=tiny_image", "trainer.max_steps=2"], tmp_path))
    assert "test/recon_loss" in metrics


def test_seed_zero_is_honoured(tmp_path: Path):
    def losses(seed: int, run_dir: Path) -> list[float]:
        overrides = [
            "trainer.max_steps=3",
            "trainer.limit_val_batches=0",
            "trainer.log_every_n_steps=1",
            "test=false",
            "data.num_train=64",
        ]
        train(compose([*overrides, f"seed={seed}"], run_dir))
        return column(read_metrics(run_dir), "train/loss")

    assert losses(0, tmp_path / "a") == losses(0, tmp_path / "b")
    assert losses(1, tmp_path / "c") != losses(0, tmp_path / "d")


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_short_mnist_run_logs_every_metric(quantizer: str, mnist_root: Path, tmp_path: Path):
    train(
        compose(
            [f"quantizer={quantizer}", "data=mnist", f"data.root={mnist_root}", "quantizer.codebook_size=256", *QUICK],
            tmp_path,
        )
    )
    rows = read_metrics(tmp_path)
    for stage in ("train", "val", "test"):
        for metric in METRICS:
            values = column(rows, f"{stage}/{metric}")
            assert values, f"{stage}/{metric} was never logged"
            assert all(v == v for v in values), f"{stage}/{metric} has NaN"
    assert (tmp_path / "last.ckpt").is_file()


def test_vq_on_mnist_beats_the_mean_image(mnist_root: Path, tmp_path: Path):
    """A few hundred steps of VQ reconstruct test digits far better than the mean image."""
    cfg = compose(
        [
            "data=mnist",
            f"data.root={mnist_root}",
            "quantizer=vq_tricks",
            "quantizer.codebook_size=256",
            "trainer.max_steps=300",
            "trainer.val_check_interval=300",
            "trainer.limit_val_batches=4",
            "trainer.enable_progress_bar=false",
            "optimizer.lr=2e-3",
            "callbacks.reconstructions=null",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    train_images = torch.stack([datamodule.train_set[i]["x"] for i in range(0, len(datamodule.train_set), 10)])
    test_images = torch.stack([datamodule.test_set[i]["x"] for i in range(len(datamodule.test_set))])
    baseline = (test_images - train_images.mean(0)).pow(2).mean().item()
    assert metrics["test/recon_loss"] < 0.25 * baseline, (metrics["test/recon_loss"], baseline)
    first, last = column(read_metrics(tmp_path), "train/recon_loss")[0], metrics["test/recon_loss"]
    assert last < first


def test_logging_steps_are_the_ones_lightning_writes(tmp_path: Path):
    """`VQModel.logging_step` asks Lightning's private decision (see there why): on every
    batch of a run, a skipped one among them, it matches what Lightning writes."""
    decisions = ["+callbacks.decisions._target_=helpers.LoggingDecisions", "+callbacks.decisions.nonfinite=3"]
    overrides = ["debug=tiny_image", "trainer.log_every_n_steps=2", "model.nonfinite=skip", "test=false"]
    train(compose([*overrides, *decisions], tmp_path))
    # automatic optimisation steps the optimiser on a skipped batch too (no gradient): it counts
    assert check_logging_decisions(tmp_path, every=2) == (6, 6)
