"""Codebook collapse report over finished (or failed) runs:

    python train.py -m experiment=collapse quantizer=vq,vq_tricks,simvq,fsq,rvq quantizer.codebook_size=1024,8192,65536
    python scripts/collapse_report.py multirun/<id> [more dirs] [--out OUTDIR]
    python scripts/collapse_report.py --wandb ENTITY/PROJECT --out OUTDIR

Writes utilization.png, tradeoff.png, summary.md and report.html (see vqtrain/report.py).
"""

import argparse
import os
from pathlib import Path

from vqtrain.cli import run_script
from vqtrain.report import find_run_dirs, load_run, load_wandb_runs, write_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "dirs", nargs="*", type=Path, help="folders searched for run directories (metrics.csv + .hydra/)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/report)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from wandb instead of folders")
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.wandb):
        parser.error("give run folders or --wandb ENTITY/PROJECT (one of the two)")
    if args.wandb and not args.out:
        parser.error("--wandb needs --out")

    dirs = [d.resolve() for d in args.dirs]
    runs = load_wandb_runs(args.wandb) if args.wandb else [load_run(d) for d in find_run_dirs(dirs)]
    if not runs:
        parser.error(f"no runs found in {args.wandb or ', '.join(map(str, args.dirs))}")
    page = write_report(runs, args.out or dirs[0] / "report", Path(os.path.commonpath(dirs)) if dirs else None)
    print(f"{len(runs)} runs -> {page}")


if __name__ == "__main__":
    run_script(main)
