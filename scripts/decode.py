"""Decode a token shard back to PNG images or WAV clips, named after the items.

python scripts/decode.py ckpt_path=runs/<run>/last.ckpt tokens=tokens/shard-00000.pt out=recon/ [num_levels=2] [device=cpu]
"""

from dataclasses import dataclass

from omegaconf import MISSING

from vqtrain.cli import default_device, parse_args, run_script
from vqtrain.tokenizer import load_tokenizer
from vqtrain.tokens import decode_shard


@dataclass
class Args:
    ckpt_path: str = MISSING
    tokens: str = MISSING
    out: str = MISSING
    num_levels: int | None = None
    device: str | None = None


def main(argv: list[str]) -> None:
    args, overrides = parse_args(Args, argv)
    if overrides:
        raise SystemExit(f"unknown arguments {overrides}: decoding takes only {list(Args.__dataclass_fields__)}")
    tokenizer = load_tokenizer(args.ckpt_path, args.device or default_device())
    written = decode_shard(tokenizer, args.tokens, args.out, args.num_levels)
    print(f"{len(written)} files written to {args.out}")


if __name__ == "__main__":
    run_script(main)
