"""A training step never makes the host wait for the device (docs/gpu.md).

CI has no GPU, so `vqtrain.hostsync.SyncRecorder` watches the aten ops that
several ordinary training iterations dispatch (after k-means init, not on
logging steps) and fails on any that would synchronise on CUDA, naming the op
and the source line: every quantizer config in each of the four models, in
32-true and bf16-mixed.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers import QUANTIZERS, SHARED_DATA
from vqtrain.config import compose
from vqtrain.hostsync import SyncRecorder, cuda_syncs, synchronises
from vqtrain.train import train

FSDD = SHARED_DATA / "fsdd" / "recordings"
QUIET = [
    "trainer.log_every_n_steps=1000",  # no logging step among the iterations watched
    "trainer.val_check_interval=1000",
    "++trainer.num_sanity_val_steps=0",
    "model.usage_window=1000",
    "test=false",
    "logger=none",
    "callbacks.reconstructions=null",
    "+callbacks.syncs._target_=vqtrain.hostsync.SyncWatch",
    "+callbacks.syncs.first=2",
    "+callbacks.syncs.count=2",
    "trainer.max_steps=5",
]
MODELS = {
    "image": ["debug=tiny_image"],
    "audio": ["debug=tiny_audio", f"data.root={FSDD}"],
    "vqgan": [
        "experiment=vqgan_tiny",
        "model.perceptual._target_=helpers.RandomPerceptual",
        "model.latent_dim=8",
        "model.encoder.channels=8",
        "model.encoder.ch_mult=[1,2]",
        "model.encoder.norm_groups=4",
        "model.discriminator.channels=8",
        "model.discriminator_start=0",
        "data.num_train=32",
        "data.batch_size=8",
        "trainer.enable_progress_bar=false",
    ],
    "codec": [
        "experiment=codec_tiny",
        f"data.root={FSDD}",
        "data.batch_size=4",
        "data.max_length=0.25",
        "model.discriminator_start=0",
        "trainer.enable_progress_bar=false",
    ],
}


def watched_syncs(model: str, quantizer: str, tmp_path: Path, *overrides: str) -> dict:
    if model in ("audio", "codec") and not FSDD.is_dir():
        pytest.skip(f"FSDD not found at {FSDD} (../shared/data)")
    cfg = compose([*MODELS[model], f"quantizer={quantizer}", *QUIET, *overrides], tmp_path)
    if model == "codec":
        cfg.data.cache_dir = str(tmp_path / "cache")
    train(cfg)
    return json.loads((tmp_path / "syncs.json").read_text())


def assert_no_syncs(record: dict) -> None:
    assert record["batches"] >= 2
    found = "\n".join(f"{s['count']} x {s['op']} at {s['where']}" for s in record["syncs"])
    assert not record["syncs"], f"host-device syncs in ordinary training steps:\n{found}"


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_image_training_steps_never_sync(quantizer: str, tmp_path: Path):
    assert_no_syncs(watched_syncs("image", quantizer, tmp_path))


@pytest.mark.parametrize("quantizer", ["vq_tricks", "rvq", "ibq"])
def test_audio_training_steps_never_sync(quantizer: str, tmp_path: Path):
    """Padded, masked audio: rows weighted instead of dropped, so shapes never depend on the data."""
    assert_no_syncs(watched_syncs("audio", quantizer, tmp_path))


def test_lightning_bookkeeping_never_syncs_after_a_logging_step(tmp_path: Path):
    """The progress bar and the logger connector read logged figures back at every batch
    (a sync each); after the logging step at batch 3, batches 4-6 must not."""
    quiet_bar = ["trainer.enable_progress_bar=true", "logger=csv", "trainer.log_every_n_steps=4"]
    window = ["callbacks.syncs.first=4", "callbacks.syncs.count=3", "trainer.max_steps=8"]
    assert_no_syncs(watched_syncs("image", "fsq", tmp_path, *quiet_bar, *window))


def test_batches_cut_on_the_device_never_sync(tmp_path: Path):
    """data.on_device=true (the CPU standing in for the GPU): batching is part of the step."""
    assert_no_syncs(watched_syncs("image", "fsq", tmp_path, "data.on_device=true"))


@pytest.mark.parametrize("model", ["vqgan", "codec"])
def test_gan_training_steps_never_sync(model: str, tmp_path: Path):
    """Both optimisers, the adaptive weight and the EMA of the weights, in bf16-mixed."""
    assert_no_syncs(watched_syncs(model, "vq_tricks", tmp_path, "trainer.precision=bf16-mixed"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("model", list(MODELS))
def test_every_quantizer_in_every_model_never_syncs(model: str, quantizer: str, precision: str, tmp_path: Path):
    assert_no_syncs(watched_syncs(model, quantizer, tmp_path, f"trainer.precision={precision}"))


def test_the_recorder_names_each_syncing_op_and_its_line():
    """What the tests above rely on: the recorder sees syncs in forward and backward."""
    x, mask = torch.randn(5, 3, requires_grad=True), torch.tensor([True, False, True, True, False])
    with SyncRecorder() as recorder:
        x[mask].sum().backward()  # boolean-mask indexing, and its backward (index_put)
        bool(x.sum() > 0)
        torch.bincount(torch.tensor([1, 2]))
        x.detach().nonzero()
        x.detach().repeat_interleave(torch.tensor([1, 2, 1, 1, 1]), dim=0)
        x.detach().repeat_interleave(torch.tensor([1, 2, 1, 1, 1]), dim=0, output_size=6)  # sized: no sync
        torch.where(mask[:, None], x.detach(), 0.0).index_select(0, torch.tensor([0, 2]))  # fixed shapes
        x.detach().masked_fill(mask[:, None], torch.tensor(1.0))  # its CUDA kernel reads the value on the host
        x.detach().masked_fill(mask[:, None], 1.0)  # a Python number: no sync
    ops = sorted(op for op, _ in recorder.syncs)
    assert ops == [
        "_local_scalar_dense",
        "bincount",
        "index",
        "index_put",
        "masked_fill",
        "nonzero",
        "repeat_interleave",
    ]
    assert all(where.startswith("test_host_syncs.py:") for _, where in recorder.syncs)
    assert recorder.ops > len(ops)


def test_a_sync_in_the_step_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A `.item()` slipped into the training step fails the check, naming the line."""
    from vqtrain.model import DiscreteAutoencoder

    objective = DiscreteAutoencoder.objective

    def reading_objective(self, batch, output):
        loss, terms = objective(self, batch, output)
        self.last_loss = loss.item()
        return loss, terms

    monkeypatch.setattr(DiscreteAutoencoder, "objective", reading_objective)
    record = watched_syncs("image", "fsq", tmp_path)
    assert [(s["op"], s["where"].split(" in ")[1], s["count"]) for s in record["syncs"]] == [
        ("_local_scalar_dense", "reading_objective", 2)
    ]


def test_synchronises_judges_index_ops_by_their_index_dtype():
    aten = torch.ops.aten
    bool_index, long_index = torch.tensor([True]), torch.tensor([0])
    assert synchronises(aten.index.Tensor, (torch.zeros(1), [bool_index]), {})
    assert not synchronises(aten.index.Tensor, (torch.zeros(1), [long_index]), {})
    assert not synchronises(aten.index.Tensor, (torch.zeros(1), [None, long_index]), {})


def test_cuda_syncs_are_the_debug_modes_sync_warnings_with_their_lines():
    """What tests/test_cuda.py counts: the mode's prototype notice (first use) is no sync."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(
            "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations",
            stacklevel=1,
        )
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    _, sync = caught
    assert cuda_syncs(caught) == [f"test_host_syncs.py:{sync.lineno}: called a synchronizing CUDA operation"]
