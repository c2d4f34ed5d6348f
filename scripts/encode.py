"""Encode every item of a split into token shards (shard-NNNNN.pt) and index.json;
rerunning resumes, keeping the shards already written.

    python scripts/encode.py ckpt_path=runs/<run>/last.ckpt out=tokens/ [split=train] [shard_size=1000] [data=fsdd] [device=cpu]
"""

from dataclasses import dataclass

from omegaconf import MISSING

from vqtrain.cli import default_device, parse_args, run_script
from vqtrain.config import run_config
from vqtrain.tokenizer import load_tokenizer
from vqtrain.tokens import encode_split


@dataclass
class Args:
    ckpt_path: str = MISSING
    out: str = MISSING
    split: str = "train"
    shard_size: int = 1000
    device: str | None = None


def main(argv: list[str]) -> None:
    args, overrides = parse_args(Args, argv)
    tokenizer = load_tokenizer(args.ckpt_path, args.device or default_device())
    index = encode_split(tokenizer, run_config(tokenizer.config, overrides), args.split, args.out, args.shard_size)
    print(
        f"{len(index['items'])} items in {len(index['shards'])} shards, {len(index['skipped'])} unreadable: {args.out}"
    )


if __name__ == "__main__":
    run_script(main)
