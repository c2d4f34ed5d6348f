"""Evaluate a checkpoint on a split with training's own metrics, plus PSNR or
SI-SNR and bit rates; prints a table and writes <checkpoint dir>/eval_<split>.json.

    python scripts/eval.py ckpt_path=runs/<run>/last.ckpt [split=test] [data=mnist] [data.batch_size=256] [device=cpu]
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from vqtrain.cli import default_device, format_table, parse_args, write_json
from vqtrain.config import run_config
from vqtrain.evaluation import evaluate
from vqtrain.tokenizer import load_tokenizer


@dataclass
class Args:
    ckpt_path: str = MISSING
    split: str = "test"
    device: str | None = None


def main(argv: list[str]) -> None:
    args, overrides = parse_args(Args, argv)
    tokenizer = load_tokenizer(args.ckpt_path, args.device or default_device())
    cfg = run_config(tokenizer.config, overrides)
    figures = evaluate(tokenizer, cfg, args.split)
    path = Path(args.ckpt_path).parent / f"eval_{args.split}.json"
    write_json(
        path, {"checkpoint": tokenizer.checkpoint, "split": args.split, "data": cfg.data._target_, "metrics": figures}
    )
    print(format_table(figures))
    print(f"written to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
