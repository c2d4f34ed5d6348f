"""Scaling out: data parallelism, mixed precision, compilation.

Real 2-process gloo runs on CPU: ranks see different data, yet every codebook
statistic must stay bitwise equal across ranks (counts and sums are all-reduced,
k-means and restarts are decided on rank 0 and broadcast), and the 2-rank run
must match one process that sees both ranks' batches concatenated: proof that
the reductions are the right sums. Then the CLI's DDP, bf16 and compile paths.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook

from helpers import QUANTIZERS, column, read_metrics, run_cli
from quantizer_cases import DDP, select
from vqtrain.config import InvalidConfig, compose
from vqtrain.data.images import ShapesDataModule
from vqtrain.metrics import CodebookUsage, count_codes
from vqtrain.quantizers import Quantizer, SimVQ, VectorQuantizer
from vqtrain.train import check_trainer, train

IN, STEPS, BATCH = 6, 8, 24
FACTORIES = select(DDP)  # settings under which the codebooks move and dead codes restart within STEPS


class Autoencoder(nn.Module):
    """The smallest model with a gradient path through the quantizer."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = (
            nn.Linear(IN, quantizer.dim),
            quantizer,
            nn.Linear(quantizer.dim, IN),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.quantizer(self.encoder(x))
        return (self.decoder(out.quantized) - x).pow(2).mean() + out.loss, out.indices


def batch(step: int, rank: int) -> Tensor:
    """(BATCH, 2, IN) rows, different per rank and drifting over steps so that codes die and restart."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(BATCH, 2, IN, generator=generator) + 0.5 * step * (1 + rank)


def run_steps(name: str, batches: Callable[[int], Tensor], distributed: bool) -> dict[str, Tensor]:
    """STEPS SGD steps; returns the final state and how often codes were (re)placed.
    `name`: a DDP case, `+compiled` after it for its codebook bookkeeping compiled."""
    torch.manual_seed(0)
    case, _, compiled = name.partition("+")
    model = Autoencoder(FACTORIES[case]())
    if compiled:
        model.quantizer.compile_bookkeeping()
    replaced = count_code_replacements(model.quantizer)
    # broadcast_buffers=False: the quantizer must keep its own buffers in sync, not DDP
    wrapped = DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    usage = CodebookUsage(model.quantizer.codebook_sizes)
    for step in range(STEPS):
        loss, indices = wrapped(batches(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        usage.update(count_codes(indices, usage.codebook_sizes))
    summary = usage.compute()  # counts summed over ranks
    return {
        **model.state_dict(),
        "replaced": torch.tensor(replaced()),
        "perplexity": summary["perplexity"],
        "utilization": summary["utilization"],
    }


def count_code_replacements(quantizer: Quantizer) -> Callable[[], int]:
    """A counter of k-means inits and dead-code restarts (both replace codes)."""
    levels = [m for m in quantizer.modules() if isinstance(m, VectorQuantizer) and not isinstance(m, SimVQ)]
    calls = [0]
    for level in levels:

        def counted(*args, original=level._replace_codes):
            calls[0] += 1
            return original(*args)

        level._replace_codes = counted
    return lambda: calls[0]


def worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(run_steps(name, lambda step: batch(step, rank), distributed=True), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[dict[str, Tensor]]]:
    """Final states of both ranks of a 2-process run, one run per quantizer."""
    runs: dict[str, list[dict[str, Tensor]]] = {}

    def run(name: str) -> list[dict[str, Tensor]]:
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            # fork: children reuse the imported torch (spawn would re-import for seconds); but
            # not where they compile: a fork inherits the compiler's worker threads and pools
            # as earlier tests left them, and once hung there (2026-12-05, the whole slow suite)
            method = "spawn" if "+compiled" in name else "fork"
            mp.start_processes(worker, args=(2, free_port(), name, str(out)), nprocs=2, start_method=method)
            runs[name] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
        return runs[name]

    return run


@pytest.mark.parametrize(
    "name",
    ["ddp_vq", "simvq", "ddp_rvq", "ddp_lfq", "ddp_ibq", pytest.param("ddp_rvq+compiled", marks=pytest.mark.slow)],
)
def test_ranks_with_different_data_keep_identical_codebooks(name: str, two_ranks):
    rank0, rank1 = two_ranks(name)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{name}: {key} differs between ranks"
    case = name.partition("+")[0]
    if case in ("ddp_vq", "ddp_rvq"):  # k-means init once per codebook, then dead-code restarts
        assert int(rank0["replaced"]) > len(FACTORIES[case]().codebook_sizes), "no dead code was restarted"


@pytest.mark.parametrize(
    "name",
    [
        "ddp_vq_ema",
        "ddp_vq",
        "simvq",
        "ddp_rvq_batch_dropout",
        "ddp_lfq",
        "ddp_bsq",
        "ddp_bsq_exact",
        "ddp_rlfq",
        "ddp_ibq",
    ],
)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(name: str, two_ranks):
    """DDP averages equal-sized ranks' mean losses = the mean over the joint batch;
    EMA sums are all-reduced; k-means and restarts pool rows in rank order = concat order."""
    rank0, _ = two_ranks(name)
    single = run_steps(name, lambda step: torch.cat([batch(step, 0), batch(step, 1)]), distributed=False)
    for key, value in single.items():
        torch.testing.assert_close(
            rank0[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{name}: {key}: {m}"
        )


def loader_worker(rank: int, world: int, port: int, out: str) -> None:
    """This rank's training and validation indices (two epochs) from the shapes data."""
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # as seed_everything does on every rank
        data = ShapesDataModule(num_train=40, num_val=10, num_test=10, batch_size=4)
        data.setup()
        seen = {}
        for epoch in (0, 1):
            loader = data.train_dataloader()
            loader.batch_sampler.sampler.set_epoch(epoch)
            seen[f"train{epoch}"] = torch.cat([batch.index for batch in loader])
        seen["val"] = torch.cat([batch.index for batch in data.val_dataloader()])
        torch.save(seen, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_image_ranks_split_every_epoch_between_them(tmp_path: Path):
    """Image samplers shard by rank themselves (Lightning's replacement is off):
    disjoint training shares that cover the data, reshuffled per epoch."""
    mp.start_processes(loader_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for epoch in ("train0", "train1"):
        assert len(rank0[epoch]) == len(rank1[epoch]) == 20
        assert sorted(torch.cat([rank0[epoch], rank1[epoch]]).tolist()) == list(range(40))
    assert not torch.equal(rank0["train0"], rank0["train1"])
    assert sorted(torch.cat([rank0["val"], rank1["val"]]).tolist()) == list(range(10))


# --- the CLI and the trainer's precision and compilation switches -------------

TINY = ["debug=tiny_image", "data.num_train=32"]


def test_cli_ddp_run_keeps_one_run_directory(tmp_path: Path):
    """Lightning's DDP launcher re-runs train.py for rank 1 with hydra.run.dir set to
    rank 0's directory (and VQTRAIN_RUN_ID inherited): both ranks write one run.
    In the default suite (15 s): the only whole DDP run through the CLI, validation included."""
    result = run_cli(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        *TINY,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "last.ckpt").is_file()
    assert column(read_metrics(run_dir), "train/loss")
    assert column(read_metrics(run_dir), "val/psnr")  # the signal-quality hook under DDP's forward redirection
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran in this directory


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_bf16_mixed_trains_every_quantizer_without_nan(quantizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen: list[torch.dtype] = []
    forward = Quantizer.forward

    def recording(self: Quantizer, z: Tensor, mask: Tensor | None = None):
        seen.append(z.dtype)
        return forward(self, z, mask)

    monkeypatch.setattr(Quantizer, "forward", recording)
    train(
        compose(
            [
                f"quantizer={quantizer}",
                "trainer.precision=bf16-mixed",
                "trainer.max_steps=3",
                "trainer.limit_val_batches=0",
                "test=false",
                *TINY,
            ],
            tmp_path,
        )
    )
    assert torch.bfloat16 in seen  # autocast really ran the encoder in bf16
    rows = read_metrics(tmp_path)
    for name in ("loss", "recon_loss", "commitment_loss", "codebook_loss"):
        values = column(rows, f"train/{name}")
        assert len(values) == 3 and all(math.isfinite(v) for v in values), (name, values)


def test_bf16_mixed_clips_the_fused_optimizers_gradients(tmp_path: Path):
    """Lightning refuses to clip a fused optimizer under any mixed precision, so trainer=gpu
    (bf16-mixed) with trainer.gradient_clip_val failed at step 0; bf16-mixed has no scaler."""
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, *_) -> None:  # after the step: its gradients, as clipped
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_post_hook(record)
    try:
        overrides = ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1e-4", "trainer.max_steps=3"]
        train(compose([*overrides, "trainer.limit_val_batches=0", "test=false", *TINY], tmp_path))
    finally:
        handle.remove()
    assert len(norms) == 3 and all(0 < norm <= 1e-4 * (1 + 1e-5) for norm in norms), norms


def test_clipping_a_fused_optimizer_under_16_mixed_is_refused_before_fit(tmp_path: Path):
    """Its gradient scaler's gradients are unscaled by the fused step itself, too late to clip:
    Lightning refused it from inside fit, as a traceback. (On a CPU, Lightning runs 16-mixed as bf16.)"""
    cfg = compose(["trainer.gradient_clip_val=1.0", *TINY], tmp_path)
    model = instantiate(cfg.model)
    trainer = L.Trainer(
        accelerator="cpu", gradient_clip_val=1.0, plugins=[MixedPrecision("16-mixed", "cpu")], logger=False
    )
    with pytest.raises(
        InvalidConfig, match=r"trainer.gradient_clip_val=1.0 with trainer.precision=16-mixed: .*optimizer.fused=false"
    ):
        check_trainer(cfg, model, trainer)
    check_trainer(OmegaConf.merge(cfg, {"optimizer": {"fused": False}}), model, trainer)


@pytest.mark.slow
def test_compiled_model_trains(tmp_path: Path):
    """The nets and the codebook bookkeeping compiled (k-means init and dead-code restarts
    included: the default quantizer), through training, validation and checkpointing."""
    metrics = train(
        compose(
            [
                "model.compile=true",
                "trainer.max_steps=3",
                "trainer.val_check_interval=3",
                "trainer.limit_val_batches=1",
                "test=false",
                *TINY,
            ],
            tmp_path,
        )
    )
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
