"""Codebook collapse report over finished (or failed) runs:

    python train.py -m experiment=collapse quantizer=vq,vq_tricks,simvq,fsq,rvq quantizer.codebook_size=1024,8192,65536
    python scripts/collapse_report.py multirun/<id> [more dirs] [--out OUTDIR]
    python scripts/collapse_report.py --wandb ENTITY/PROJECT --out OUTDIR
    python scripts/collapse_report.py multirun/<id> --at-step 500   # every run as it was after 500 steps

Writes utilization.png, tradeoff.png, summary.md and report.html (see vqtrain/report.py); for a
hyperparameter search (hparams_search=...), its trials and best ones too (vqtrain/search.py).
"""

import argparse
import os
from pathlib import Path

from vqtrain.cli import run_script
from vqtrain.report import write_report
from vqtrain.runs import find_run_dirs, load_run, load_wandb_runs
from vqtrain.search import find_searches, load_search


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "dirs", nargs="*", type=Path, help="folders searched for run directories (metrics.csv + .hydra/)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <first dir>/report)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from wandb instead of folders")
    parser.add_argument(
        "--at-step",
        type=int,
        metavar="N",
        help="draw every run as it was after N steps (runs that ended earlier: left out)",
    )
    args = parser.parse_args(argv)
    if bool(args.dirs) == bool(args.wandb):
        parser.error("give run folders or --wandb ENTITY/PROJECT (one of the two)")
    if args.wandb and not args.out:
        parser.error("--wandb needs --out")
    if args.at_step is not None and args.at_step < 1:
        parser.error(f"--at-step must be a positive number of steps, got {args.at_step}")

    dirs = [d.resolve() for d in args.dirs]
    runs = load_wandb_runs(args.wandb) if args.wandb else [load_run(d) for d in find_run_dirs(dirs)]
    if not runs:
        parser.error(f"no runs found in {args.wandb or ', '.join(map(str, args.dirs))}")
    rows = {Path(run.name): run.rows for run in runs}
    searches = [load_search(folder, rows) for folder in find_searches(dirs)]
    root = Path(os.path.commonpath(dirs)) if dirs else None
    page = write_report(runs, args.out or dirs[0] / "report", root, args.at_step, searches)
    print(f"{len(runs)} runs -> {page}")


if __name__ == "__main__":
    run_script(main)
