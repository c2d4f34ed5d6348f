"""train: steps/s of the Lightning Trainer with the DiscreteAutoencoder (default
config: shapes data, image model, vq_tricks; logging as in a normal run, no
checkpointing, no validation) against two plain PyTorch loops over the same
modules, optimizer, scheduler, clipping and batches:

- `bare`: forward, objective, backward, optimizer step; nothing else;
- `plain`: the model's own training step without a Trainer (`shared_step`: the
  non-finite check and the usage counts, and the masked update), so that
  Lightning's overhead is the Trainer's cost alone; bare against plain is the
  cost of that bookkeeping.

Rounds alternate; the best of each loop is reported. No loop waits for the
device between steps (only at the ends of the timed span). Short extra runs count
the aten ops of an ordinary step of each loop, and Lightning's host-device syncs
(`vqtrain.hostsync`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchmarks.common import load, print_table, sync
from vqtrain.hostsync import SyncRecorder, SyncWatch

LOOPS = ("bare", "plain", "lightning")


class StepTimes:
    """Wall-clock time at the end of every training step. The device is waited for at
    the end of the warm-up and of the last step only: waiting every step would stop the
    host from running ahead of the device, which is part of what is measured."""

    def __init__(self, device: str, warmup: int, total: int):
        self.device, self.synced = device, {max(warmup, 1), total}
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.indices: list = []

    def mark(self, batch: dict | None = None) -> None:
        if len(self.times) + 1 in self.synced:
            sync(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if batch is not None and len(self.indices) < 20:
            self.indices.append(batch.index.sum())  # read after the run: reading it now would wait

    def index_sums(self) -> list[int]:
        return [int(i) for i in self.indices]

    def seconds_per_step(self, warmup: int, cpu: bool = False) -> float:
        """Mean time per step after `warmup` steps (the first step's end is the first mark)."""
        marks = self.cpu_times if cpu else self.times
        measured = marks[max(warmup, 1) - 1 :]
        return (measured[-1] - measured[0]) / (len(measured) - 1)


def compose_train(overrides: list[str], output_dir: Path):
    from vqtrain.config import compose

    return compose(list(overrides), output_dir)


def lightning_run(
    cfg, steps: int, warmup: int, device: str, output_dir: Path, extra: tuple = ()
) -> tuple[StepTimes, list[str]]:
    import lightning as L
    from hydra.utils import instantiate

    from vqtrain.callbacks import progress_bar

    class Timer(L.Callback):
        def __init__(self):
            self.clock = StepTimes(device, warmup, steps)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.clock.mark(batch)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks, used = [], []
    for name, conf in (cfg.callbacks or {}).items():
        if conf is None or name in ("model_checkpoint", "last_checkpoint"):
            continue
        try:
            callbacks.append(instantiate(conf))
            used.append(name)
        except Exception as error:  # a callback that cannot be built here is left out, and said so
            used.append(f"{name} (left out: {type(error).__name__})")
    loggers = [instantiate(conf) for conf in (cfg.logger or {}).values() if conf is not None]
    timer = Timer()
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks + progress_bar(cfg.trainer) + [timer, *extra],
        logger=loggers or False,
        max_steps=steps,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="gpu" if device == "cuda" else "cpu",
        default_root_dir=str(output_dir),
    )
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:  # progress bar, model summary and info messages run as usual, out of sight
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(model, datamodule=datamodule)
    finally:
        lightning_log.setLevel(level)
    return timer.clock, used


def plain_run(
    cfg, steps: int, warmup: int, device: str, bare: bool, watch: tuple[SyncRecorder, range] | None = None
) -> StepTimes:
    """The model's training step in a loop of its own (`bare`: its forward and objective
    only). `watch`: a recorder to run over the steps in the range (0-based)."""
    from types import SimpleNamespace

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import move_data_to_device

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    datamodule.setup("fit")
    model.configure_model()  # as the Trainer does (model.compile=true compiles there)
    model = model.to(device).train()
    # the model's own optimizer and schedule (param groups, weight decay, warm-up), without a Trainer
    model.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    configured = model.configure_optimizers()
    model.trainer = None
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    clip = cfg.trainer.get("gradient_clip_val")
    clock = StepTimes(device, warmup, steps)
    step = 0
    while step < steps:
        for batch in datamodule.train_dataloader():
            if watch is not None and step == watch[1].start:
                watch[0].start()
            batch = move_data_to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            if bare:
                loss, _ = model.objective(batch, model(batch.x, batch.mask, batch.lengths))
                loss.backward()
            else:  # as DiscreteAutoencoder.training_step, which logs nothing without a Trainer
                result = model.shared_step(batch, "train")
                model.training_bookkeeping(result)
                if result is not None and model.mask_update(optimizer, result.finite):
                    result.loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            clock.mark(batch)
            step += 1
            if watch is not None and step == watch[1].stop:
                watch[0].stop()
            if step >= steps:
                break
    return clock


def run(args: argparse.Namespace) -> dict:
    steps = args.steps or (6 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    overrides = list(args.overrides or [])
    if args.quick:
        overrides += [
            "data.num_train=256",
            "data.num_val=16",
            "data.num_test=16",
            "data.batch_size=16",
            "model.encoder.hidden_channels=8",
            "model.decoder.hidden_channels=8",
            "quantizer.codebook_size=64",
        ]
    if args.device == "cuda":
        overrides.append("trainer.accelerator=gpu")
    load_start = load()
    runs: dict[str, list[dict]] = {kind: [] for kind in LOOPS}
    callbacks_used: list[str] = []
    # the steps whose aten ops (a stand-in for kernel launches) and syncs are counted: after k-means init
    watched = range(2, 4) if args.quick else range(21, 29)
    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        for r in range(rounds):
            for kind in LOOPS:
                out_dir = Path(tmp) / f"{kind}{r}"
                cfg = compose_train(overrides, out_dir)
                before = load()
                if kind == "lightning":
                    clock, callbacks_used = lightning_run(cfg, warmup + steps, warmup, args.device, out_dir)
                else:
                    clock = plain_run(cfg, warmup + steps, warmup, args.device, bare=kind == "bare")
                spp, cpu = clock.seconds_per_step(warmup), clock.seconds_per_step(warmup, cpu=True)
                runs[kind].append(
                    {
                        "seconds_per_step": spp,
                        "steps_per_s": 1 / spp,
                        "cpu_seconds_per_step": cpu,
                        "load_before": before,
                        "load_after": load(),
                        "batch_index_sums": clock.index_sums(),
                    }
                )
                print(
                    f"  round {r} {kind:<9} {1 / spp:7.2f} steps/s  ({1e3 * cpu:.0f} ms CPU/step)  load {before}->{load()}",
                    flush=True,
                )
        # one more short run of each loop counts its ops
        ops_per_step = {}
        for kind in ("bare", "plain"):
            recorder = SyncRecorder()
            cfg = compose_train(overrides, Path(tmp) / f"ops-{kind}")
            plain_run(cfg, watched.stop, 1, args.device, bare=kind == "bare", watch=(recorder, watched))
            ops_per_step[kind] = recorder.ops / len(watched)
        out_dir = Path(tmp) / "ops"
        watch = SyncWatch(watched.start, len(watched))
        quiet = compose_train([*overrides, "trainer.log_every_n_steps=1000"], out_dir)  # no logging step watched
        lightning_run(quiet, watched.stop + 1, 1, args.device, out_dir, (watch,))
        watched_lightning = json.loads((out_dir / "syncs.json").read_text())
        ops_per_step["lightning"] = watched_lightning["ops_per_batch"]
    best = {kind: min(runs[kind], key=lambda run: run["seconds_per_step"]) for kind in runs}
    cpu_best = {kind: min(run["cpu_seconds_per_step"] for run in runs[kind]) for kind in runs}
    overhead = best["lightning"]["seconds_per_step"] / best["plain"]["seconds_per_step"] - 1
    cpu_overhead = cpu_best["lightning"] / cpu_best["plain"] - 1
    bookkeeping = best["plain"]["seconds_per_step"] / best["bare"]["seconds_per_step"] - 1
    same_batches = len({tuple(best[kind]["batch_index_sums"]) for kind in LOOPS}) == 1
    print(
        f"\ntraining steps, {steps} timed after {warmup} warm-up, best of {rounds} rounds, {args.device}; "
        f"load {load_start} -> {load()}\n"
    )
    print_table(
        ["loop", "steps/s", "ms/step", "aten ops/step", "all rounds (steps/s)"],
        [
            [
                kind,
                f"{1 / best[kind]['seconds_per_step']:.2f}",
                f"{1e3 * best[kind]['seconds_per_step']:.1f}",
                f"{ops_per_step[kind]:.0f}",
                ", ".join(f"{run['steps_per_s']:.2f}" for run in runs[kind]),
            ]
            for kind in LOOPS
        ],
    )
    if "model.compile=true" in overrides:
        print("(aten ops counted in eager steps: a dispatch mode, which counts them, turns compilation off)")
    print(
        f"\nLightning's overhead over the same step in a plain loop: {100 * overhead:+.1f}% per step, wall clock "
        f"(target <= 5%); {100 * cpu_overhead:+.1f}% in process CPU time (less sensitive to load with --threads 1)"
        f"\nthe model's bookkeeping (non-finite check, usage counts) over the bare step: {100 * bookkeeping:+.1f}%"
        f"{'' if same_batches else '  [note: the loops saw different batch orders]'}"
    )
    syncs = watched_lightning["syncs"]
    syncs_per_step = sum(s["count"] for s in syncs) / watched_lightning["batches"]
    print(f"host-device syncs in an ordinary Lightning step: {syncs_per_step:.1f}")
    for s in syncs:
        print(f"    {s['count']} x {s['op']} at {s['where']}")
    return {
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "overrides": overrides,
        "callbacks": callbacks_used,
        "runs": runs,
        "overhead_fraction": overhead,
        "cpu_overhead_fraction": cpu_overhead,
        "bookkeeping_fraction": bookkeeping,
        "same_batches": same_batches,
        "ops_per_step": ops_per_step,
        "syncs_per_step": syncs_per_step,
        "syncs": syncs,
        "load_start": load_start,
        "load_end": load(),
    }


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser("train", parents=[common], help="Lightning training loop vs plain PyTorch loops")
    t.add_argument("--steps", type=int, help="timed steps per run (default 200)")
    t.add_argument("--warmup", type=int, help="untimed steps first (default 20)")
    t.add_argument("--rounds", type=int, help="alternating rounds of the three loops (default 2)")
    t.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
