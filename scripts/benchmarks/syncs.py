"""syncs: host-device synchronisations and aten ops per ordinary training step,
for every quantizer config in each model (train.py's own run, a few watched
iterations after k-means init, no logging step among them).

On any device it counts what `vqtrain.hostsync.SyncRecorder` sees: the aten ops
dispatched per iteration (a stand-in for kernel launches) and those that would
synchronise on CUDA, with their source lines. With `--device cuda` it also
counts the real ones, with `torch.cuda.set_sync_debug_mode("warn")`.

    python scripts/bench.py syncs --device cuda
    python scripts/bench.py syncs --models image audio --precision 32-true bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

from scripts.benchmarks.common import REPO, print_table

QUANTIZERS = sorted(path.stem for path in (REPO / "configs" / "quantizer").glob("*.yaml"))
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
# each model at its own preset's size (the default image model is the figure)
MODELS = {
    "image": [],
    "audio": ["data=fsdd", "data.root={fsdd}"],
    "vqgan": ["experiment=vqgan_tiny", "model.perceptual=null", "model.discriminator_start=0"],
    "codec": ["experiment=codec_tiny", "data.root={fsdd}", "model.discriminator_start=0"],
}


def watch(model: str, quantizer: str, precision: str, args: argparse.Namespace, out: Path) -> dict:
    from vqtrain.config import compose
    from vqtrain.train import train

    overrides = [o.format(fsdd=args.fsdd) for o in MODELS[model]] + [
        f"quantizer={quantizer}",
        f"trainer.precision={precision}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.max_steps={args.first + args.count + 1}",
        "trainer.log_every_n_steps=100000",
        "trainer.val_check_interval=100000",
        "trainer.enable_progress_bar=false",
        "model.usage_window=100000",
        "test=false",
        "logger=none",
        "callbacks.reconstructions=null",
        "+callbacks.syncs._target_=vqtrain.hostsync.SyncWatch",
        f"+callbacks.syncs.first={args.first}",
        f"+callbacks.syncs.count={args.count}",
        *args.overrides,
    ]
    if args.quick:
        overrides += ["data.batch_size=4"]
    cfg = compose(overrides, out)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(cfg)
    return json.loads((out / "syncs.json").read_text())


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        args.first, args.count = 2, 2
    results = []
    with tempfile.TemporaryDirectory(prefix="vqtrain-syncs-") as tmp:
        for model in args.models:
            if model in ("audio", "codec") and not Path(args.fsdd).is_dir():
                print(f"  {model}: skipped, no FSDD at {args.fsdd} (--fsdd)")
                continue
            for quantizer in args.quantizers or QUANTIZERS:
                for precision in args.precision:
                    out = Path(tmp) / f"{model}-{quantizer}-{precision}"
                    record = watch(model, quantizer, precision, args, out)
                    record.update(model=model, quantizer=quantizer, precision=precision)
                    results.append(record)
                    recorded = sum(s["count"] for s in record["syncs"]) / record["batches"]
                    cuda = record.get("cuda_syncs")
                    print(
                        f"  {model:<6} {quantizer:<10} {precision:<10} {record['ops_per_batch']:8.0f} ops/step  "
                        f"{recorded:.1f} syncs/step"
                        + ("" if cuda is None else f"  CUDA: {cuda / record['batches']:.1f}"),
                        flush=True,
                    )
                    for s in record["syncs"]:
                        print(f"      {s['count']} x {s['op']} at {s['where']}")
    print(f"\n{args.count} watched training iterations each, from iteration {args.first}, {args.device}\n")
    print_table(
        ["model", "quantizer", "precision", "aten ops/step", "syncs/step (dispatch)", "syncs/step (CUDA)"],
        [
            [
                r["model"],
                r["quantizer"],
                r["precision"],
                f"{r['ops_per_batch']:.0f}",
                f"{sum(s['count'] for s in r['syncs']) / r['batches']:.1f}",
                None if r.get("cuda_syncs") is None else f"{r['cuda_syncs'] / r['batches']:.1f}",
            ]
            for r in results
        ],
    )
    return {"first": args.first, "count": args.count, "results": results}


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("syncs", parents=[common], help="host-device syncs and aten ops per training step")
    s.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    s.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, help="default: every quantizer config")
    s.add_argument("--precision", nargs="+", default=["32-true"], help="e.g. 32-true bf16-mixed")
    s.add_argument("--first", type=int, default=5, help="iterations before the watched ones (k-means init)")
    s.add_argument("--count", type=int, default=10, help="iterations watched")
    s.add_argument("--fsdd", default=str(FSDD), help="FSDD recordings folder, for audio and codec")
    s.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
