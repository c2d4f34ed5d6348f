"""Evaluate a checkpoint on a split with training's own metrics, plus reconstruction
quality and bit rates; prints a table and writes <checkpoint dir>/eval_<split>.json,
with what computed each quality figure under "implementations".

    python scripts/eval.py ckpt_path=runs/<run>/last.ckpt [split=test] [data=mnist] [data.batch_size=256] [device=cpu]
        [metrics=[psnr,ssim,lpips,rfid]]   # quality figures (vqtrain.quality.METRICS); default: the run's
"""

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from vqtrain.cli import default_device, format_table, parse_args, run_script, write_json
from vqtrain.config import run_config
from vqtrain.evaluation import evaluate
from vqtrain.quality import IMPLEMENTATIONS
from vqtrain.tokenizer import load_tokenizer


@dataclass
class Args:
    ckpt_path: str = MISSING
    split: str = "test"
    device: str | None = None
    metrics: list[str] | None = None


def main(argv: list[str]) -> None:
    args, overrides = parse_args(Args, argv)
    tokenizer = load_tokenizer(args.ckpt_path, args.device or default_device())
    cfg = run_config(tokenizer.config, overrides)
    figures = evaluate(tokenizer, cfg, args.split, args.metrics)
    implementations = {name: IMPLEMENTATIONS[name] for name in figures if name in IMPLEMENTATIONS}
    path = Path(args.ckpt_path).parent / f"eval_{args.split}.json"
    report = {"checkpoint": tokenizer.checkpoint, "split": args.split, "data": cfg.data._target_}
    write_json(path, report | {"metrics": figures, "implementations": implementations})
    print(format_table(figures))
    print("\n".join(f"{name}: {implementation}" for name, implementation in implementations.items()))
    print(f"written to {path}")


if __name__ == "__main__":
    run_script(main)
