"""data: audio, FSDD (or any folder tree of clips via --root): padding fraction
of one training epoch and clips/s of the loader alone and of loader + audio model
training steps, with and without length bucketing. Images, MNIST (or shapes):
training batches/s of one epoch from the ordinary DataLoader (data.num_workers=auto,
each batch moved to --device as Lightning moves it) against batches cut on the
device from the split held there (data.on_device=true), and whether both gave
the same batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchmarks.common import REPO, load, print_table, sync
from scripts.benchmarks.train import compose_train


def run(args: argparse.Namespace) -> dict:
    report = run_audio(args) if args.part in ("all", "audio") else {}
    if args.part in ("all", "images"):
        report["images"] = run_images(args)
    return report


def run_images(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import move_data_to_device

    data = "shapes" if args.quick else args.image_data
    root = Path(args.image_root or REPO.parent / "shared" / "data").resolve()
    if data == "mnist" and not (root / "MNIST" / "raw").is_dir():
        if args.part == "images":
            raise SystemExit(f"no MNIST at {root / 'MNIST' / 'raw'} (give --image-root)")
        print(f"\nimages: skipped, no MNIST at {root / 'MNIST' / 'raw'} (give --image-root)")
        return {"skipped": f"no MNIST at {root / 'MNIST' / 'raw'}"}
    device = torch.device(args.device)
    load_start = load()
    results, batches_seen = [], {}
    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        for on_device in (False, True):
            overrides = [f"data={data}", f"data.batch_size={args.image_batch_size}", f"data.on_device={on_device}"]
            overrides += [f"data.root={root}"] if data == "mnist" else []
            datamodule = instantiate(compose_train(overrides, Path(tmp) / "run").data)
            datamodule.standalone_device = device  # no trainer here: this is where batches go
            datamodule.setup("fit")
            start = time.perf_counter()
            loader = datamodule.train_dataloader()  # on the device: converts the split and copies it there
            setup_s = time.perf_counter() - start
            limit = args.image_batches or (5 if args.quick else len(loader))
            before, indices, first = load(), [], None
            start = time.perf_counter()
            for batch in loader:
                batch = move_data_to_device(batch, device)  # Lightning's transfer: a no-op on the device path
                indices.append(batch.index)
                first = batch.x if first is None else first
                if len(indices) >= limit:
                    break
            sync(args.device)
            seconds = time.perf_counter() - start
            batches_seen[on_device] = (torch.cat(indices), first)
            record = {
                "path": "on-device" if on_device else "loader",
                "num_workers": 0 if on_device else datamodule.num_workers,
                "pin_memory": False if on_device else datamodule.pin_memory,
                "setup_seconds": setup_s,
                "batches": len(indices),
                "seconds": seconds,
                "batches_per_s": len(indices) / seconds,
                "load_before": before,
                "load_after": load(),
            }
            results.append(record)
            print(
                f"  images {record['path']}: {record['batches_per_s']:.0f} batches/s  load {before}->{load()}",
                flush=True,
            )
    same = all(torch.equal(a, b) for a, b in zip(batches_seen[False], batches_seen[True]))
    print(f"\n{data} training batches of {args.image_batch_size}, {args.device}; load {load_start} -> {load()}\n")
    print_table(
        ["path", "workers", "batches", "batches/s", "ms/batch", "setup s"],
        [
            [
                r["path"],
                r["num_workers"],
                r["batches"],
                f"{r['batches_per_s']:.0f}",
                f"{1000 * r['seconds'] / r['batches']:.2f}",
                f"{r['setup_seconds']:.2f}",
            ]
            for r in results
        ],
    )
    print(f"speed-up {results[1]['batches_per_s'] / results[0]['batches_per_s']:.1f}x; same batches: {same}")
    return {
        "data": data,
        "root": str(root) if data == "mnist" else None,
        "batch_size": args.image_batch_size,
        "results": results,
        "speedup": results[1]["batches_per_s"] / results[0]["batches_per_s"],
        "same_batches": same,
        "load_start": load_start,
        "load_end": load(),
    }


def run_audio(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import move_data_to_device

    from vqtrain.data.sampler import measure_padding, padding_fraction

    root = Path(args.root or REPO.parent / "shared" / "data" / "fsdd" / "recordings").resolve()
    if not root.is_dir():
        raise SystemExit(f"no audio folder at {root} (give --root)")
    load_start = load()
    results = []
    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        for bucketing in (True, False):
            overrides = [
                "data=fsdd",
                f"data.root={root}",
                f"data.bucketing={bucketing}",
                f"data.cache_dir={tmp}",
                f"data.batch_size={args.batch_size}",
            ] + list(args.overrides or [])
            if args.quick:
                overrides += [
                    "model.encoder.hidden_channels=4",
                    "model.decoder.hidden_channels=4",
                    "quantizer.codebook_size=16",
                ]
            cfg = compose_train(overrides, Path(tmp) / "run")
            datamodule = instantiate(cfg.data)
            datamodule.setup("fit")
            lengths = datamodule.train_set.lengths
            expected = measure_padding(lengths, args.batch_size, bucketing=bucketing, seed=datamodule.order_seed)

            # the loader alone: one epoch of decoding, cropping and padding
            loader = datamodule.train_dataloader()
            before = load()
            start, clips, batch_lengths = time.perf_counter(), 0, []
            for batch in loader:
                clips += len(batch)
                batch_lengths.append(batch.lengths.tolist())
            loader_s = time.perf_counter() - start

            # loader + training steps of the audio model (plain loop: forward, backward, optimizer step)
            torch.manual_seed(0)
            model = instantiate(cfg.model).to(args.device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
            limit = args.train_batches if args.train_batches is not None else (2 if args.quick else 20)
            limit = limit or len(loader)
            step_clips, steps, samples, real = 0, 0, 0, 0
            train_start = time.perf_counter()
            for batch in datamodule.train_dataloader():
                batch = move_data_to_device(batch, args.device)
                loss, _ = model.objective(batch, model(batch.x, batch.mask, batch.lengths))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sync(args.device)
                step_clips += len(batch)
                samples += batch.mask.numel()
                real += int(batch.mask.sum())
                steps += 1
                if steps >= limit:
                    break
            train_s = time.perf_counter() - train_start
            record = {
                "bucketing": bucketing,
                "clips": clips,
                "batches": len(batch_lengths),
                "padding_fraction": padding_fraction(batch_lengths),
                "padding_fraction_measure_padding": expected,
                "loader_seconds": loader_s,
                "loader_clips_per_s": clips / loader_s,
                "train_batches": steps,
                "train_clips": step_clips,
                "train_seconds": train_s,
                "train_clips_per_s": step_clips / train_s,
                "train_padding_fraction": 1 - real / max(samples, 1),
                "load_before": before,
                "load_after": load(),
            }
            results.append(record)
            print(
                f"  bucketing={bucketing}: padding {100 * record['padding_fraction']:.1f}%, loader {record['loader_clips_per_s']:.0f} clips/s, "
                f"train {record['train_clips_per_s']:.1f} clips/s  load {before}->{load()}",
                flush=True,
            )
    print(
        f"\nFSDD training split ({results[0]['clips']} clips, batch {args.batch_size}), {args.device}; load {load_start} -> {load()}\n"
    )
    print_table(
        ["bucketing", "padding", "loader clips/s", "train clips/s", "train padding (batches timed)"],
        [
            [
                "on" if r["bucketing"] else "off",
                f"{100 * r['padding_fraction']:.1f}%",
                f"{r['loader_clips_per_s']:.0f}",
                f"{r['train_clips_per_s']:.1f}",
                f"{100 * r['train_padding_fraction']:.1f}% ({r['train_batches']})",
            ]
            for r in results
        ],
    )
    return {
        "root": str(root),
        "batch_size": args.batch_size,
        "results": results,
        "load_start": load_start,
        "load_end": load(),
    }


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser(
        "data",
        parents=[common],
        help="audio clips/s and padding with and without bucketing; image batches/s from a loader and on the device",
    )
    d.add_argument("--part", choices=["all", "audio", "images"], default="all")
    d.add_argument("--root", help="audio folder (default <repo>/../shared/data/fsdd/recordings)")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument(
        "--train-batches", type=int, help="batches through the model per setting (default 20; 0 = a whole epoch)"
    )
    d.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
    d.add_argument("--image-data", choices=["mnist", "shapes"], default="mnist", help="--quick takes shapes")
    d.add_argument("--image-root", help="folder holding MNIST/raw (default <repo>/../shared/data)")
    d.add_argument("--image-batch-size", type=int, default=128)
    d.add_argument("--image-batches", type=int, help="batches timed per path (default: one epoch)")
