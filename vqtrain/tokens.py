"""Token shards: a split's tokens on disk, and the jobs that write and read them.

A shard (`shard-00000.pt`, torch.save of a dict) holds `format_version`,
`meta` (checkpoint, its content's fingerprint, split, shard size, item count: what wrote it), and per
item in split order `ids` (file path or position), `index` (position in the
split), `tokens` (int64: images (H', W'[, Q]), audio (ceil(length / stride)[, Q])
without padding) and, for audio, `lengths` in samples (else None); `skipped`
lists unreadable items. `index.json` beside the shards lists every item, and
the SHA-256 of its content under "sha256" (`load_index` reads it).

Versions: 1 adds `format_version` to the layout of the unversioned shards of
earlier releases, which are read as version 0. A newer or unknown version is
refused with an error naming it. Shards are checked as they are read (see
`vqtrain.files.check_archive`): a damaged one is an error naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import soundfile
import torch
from omegaconf import DictConfig
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import save_image
from tqdm import tqdm

from vqtrain.config import InvalidConfig
from vqtrain.data.common import DataModule, SkippingDataset, item_id, split_dataset
from vqtrain.files import UnreadableFile, load_archive, read_checked_json, write_atomic, write_checked_json
from vqtrain.quantizers import ResidualQuantizer
from vqtrain.tokenizer import Tokenizer
from vqtrain.utils import ceil_div, exists

FORMAT_VERSION = 1
READABLE_VERSIONS = (0, 1)  # 0: the unversioned shards of earlier releases, same layout
SHARD = "a token shard written by scripts/encode.py"
REWRITE = "delete it and run scripts/encode.py again with the same out= (it keeps the other shards)"

log = logging.getLogger(__name__)


def save_shard(path: Path, shard: dict) -> None:
    """Written whole (by rename): a shard that exists is complete."""
    write_atomic(path, lambda file: torch.save({"format_version": FORMAT_VERSION, **shard}, file))


def load_shard(path: str | Path) -> dict:
    shard = load_archive(path, SHARD, REWRITE)
    version = shard.get("format_version", 0)
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: token shard format version {version!r} is not one this vqtrain reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}): written by a newer vqtrain?"
        )
    return shard


def load_index(out_dir: str | Path) -> dict:
    """`out_dir`/index.json, checked against its checksum; one written before
    index files carried a checksum is read with a warning that it is unverified."""
    path = Path(out_dir) / "index.json"
    index, checked = read_checked_json(path, "the index.json scripts/encode.py writes", REWRITE)
    if not checked:
        log.warning("%s carries no checksum (written by an earlier vqtrain): read unverified", path)
    return index


def encode_split(
    tokenizer: Tokenizer, cfg: DictConfig, split: str, out_dir: str | Path, shard_size: int = 1000
) -> dict:
    """Tokens of every item of a split, in split order, as shards of `shard_size`
    items and `index.json`. Shards already written are kept (each is written
    whole, by rename), so an interrupted run resumes; a damaged one is encoded
    again, named in a warning."""
    if shard_size < 1:
        raise InvalidConfig(f"shard_size must be >= 1, got {shard_size}")
    datamodule = tokenizer.data_module(cfg)
    dataset = split_dataset(datamodule, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "checkpoint": tokenizer.checkpoint,
        "fingerprint": tokenizer.fingerprint,  # a checkpoint trained further since keeps its path, not its tokens
        "split": split,
        "shard_size": shard_size,
        "num_items": len(dataset),
    }
    items, skipped, shards = [], [], []
    with tqdm(total=len(dataset), unit="item", desc=f"encode {split}") as progress:
        for number, start in enumerate(range(0, len(dataset), shard_size)):
            path = out_dir / f"shard-{number:05d}.pt"
            shard = read_written_shard(path)
            if shard is not None:
                if shard["meta"] != meta:
                    raise InvalidConfig(
                        f"out={out_dir}: {path.name} was written by another checkpoint or split ({shard['meta']}, "
                        f"now {meta}): use a fresh out directory"
                    )
            else:
                shard = encode_shard(
                    tokenizer, datamodule, dataset, range(start, min(start + shard_size, len(dataset)))
                )
                shard["meta"] = meta
                save_shard(path, shard)
            progress.update(len(shard["ids"]) + len(shard["skipped"]))
            shards.append(path.name)
            skipped += shard["skipped"]
            for i, (identifier, position, tokens) in enumerate(zip(shard["ids"], shard["index"], shard["tokens"])):
                item = {"id": identifier, "index": position, "shard": path.name, "shape": list(tokens.shape)}
                if exists(shard["lengths"]):
                    item["length"] = shard["lengths"][i]
                items.append(item)
    index = {**meta, **tokenizer.describe(), "shards": shards, "items": items, "skipped": skipped}
    write_checked_json(out_dir / "index.json", index)  # compact: it lists every item
    return index


def read_written_shard(path: Path) -> dict | None:
    """A shard an earlier run wrote, or None: not written yet, or damaged (said in a warning)."""
    if not path.is_file():
        return None
    try:
        return load_shard(path)
    except UnreadableFile as error:
        log.warning("%s: %s; encoding it again", path, error.problem)
        return None


def encode_shard(tokenizer: Tokenizer, datamodule: DataModule, dataset: Dataset, positions: range) -> dict:
    lengths = getattr(dataset, "lengths", None)
    order = sorted(positions, key=lengths.__getitem__) if exists(lengths) else list(positions)  # little padding
    loader = DataLoader(
        Subset(SkippingDataset(dataset, datamodule.strict), order),
        batch_size=datamodule.batch_size,
        collate_fn=datamodule.collate,
        num_workers=datamodule.num_workers,
    )
    tokens, sample_lengths = {}, {}
    for batch in loader:
        if batch.x is None:  # every item of the batch was unreadable
            continue
        indices = tokenizer.encode(batch.x, batch.mask).cpu()
        for i, position in enumerate(batch.index.tolist()):
            if tokenizer.modality == "audio":  # drop the padding
                sample_lengths[position] = int(batch.lengths[i])
                tokens[position] = indices[i, : ceil_div(sample_lengths[position], tokenizer.stride)].clone()
            else:
                tokens[position] = indices[i].clone()  # a view would save the whole batch
    kept = sorted(tokens)
    return {
        "ids": [item_id(dataset, position) for position in kept],
        "index": kept,
        "tokens": [tokens[position] for position in kept],
        "lengths": [sample_lengths[position] for position in kept] if sample_lengths else None,
        "skipped": [item_id(dataset, position) for position in positions if position not in tokens],
    }


def decode_shard(
    tokenizer: Tokenizer,
    shard_path: str | Path,
    out_dir: str | Path,
    num_levels: int | None = None,
    batch_size: int = 32,
) -> list[Path]:
    """Tokens of a shard back to files under `out_dir` named after the item ids:
    PNG for images ([-1, 1] -> [0, 1]), WAV at the run's sample rate for audio."""
    shard = load_shard(shard_path)
    check_tokens(tokenizer, shard, shard_path, num_levels)
    audio = tokenizer.modality == "audio"
    written = []
    for start in range(0, len(shard["ids"]), batch_size):
        tokens = pad_sequence(shard["tokens"][start : start + batch_size], batch_first=True, padding_value=-1)
        lengths = shard["lengths"][start : start + batch_size] if audio else None
        signals = tokenizer.decode(tokens, lengths, num_levels).cpu()
        for i, identifier in enumerate(shard["ids"][start : start + batch_size]):
            path = Path(str(identifier))
            path = Path(out_dir) / path.relative_to(path.anchor).with_suffix(".wav" if audio else ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            if audio:
                soundfile.write(path, signals[i, 0, : lengths[i]].clamp(-1, 1).numpy(), tokenizer.sample_rate)
            else:
                save_image((signals[i] + 1) / 2, path)
            written.append(path)
    return written


def check_tokens(tokenizer: Tokenizer, shard: dict, shard_path: str | Path, num_levels: int | None) -> None:
    """Tokens that another checkpoint wrote, whose layout or codes do not fit this one's
    quantizer, failed deep inside the decoder or decoded to noise (audio tokens as images):
    refused, naming the checkpoint that wrote them. So is a `num_levels` the quantizer lacks."""
    quantizer = tokenizer.model.quantizer
    levels = quantizer.num_levels if isinstance(quantizer, ResidualQuantizer) else None
    if exists(num_levels) and not (exists(levels) and 1 <= num_levels <= levels):
        has = f"levels 1 to {levels}" if exists(levels) else f"no levels ({type(quantizer).__name__})"
        raise InvalidConfig(f"num_levels={num_levels}: the quantizer of {tokenizer.checkpoint} has {has}")
    audio, columns = tokenizer.modality == "audio", quantizer.num_index_columns
    positions = ["T'"] if audio else ["H'", "W'"]
    layout = positions + [str(columns)] if columns > 1 else positions
    sizes = torch.tensor(tokenizer.codebook_sizes)
    for identifier, tokens in zip(shard["ids"], shard["tokens"]):
        shape_fits = tokens.ndim == len(layout) and (columns == 1 or tokens.shape[-1] == columns)
        if not (shape_fits and exists(shard["lengths"]) == audio and ((tokens >= 0) & (tokens < sizes)).all()):
            raise InvalidConfig(
                f"tokens={shard_path}: item {identifier} has {'audio' if exists(shard['lengths']) else 'image'} "
                f"tokens of shape {tuple(tokens.shape)}, codes {int(tokens.min())} to {int(tokens.max())}; "
                f"{tokenizer.checkpoint} decodes {tokenizer.modality} tokens ({', '.join(layout)}) with codes below "
                f"{tokenizer.codebook_sizes}: decode them with the checkpoint that wrote them, "
                f"{shard.get('meta', {}).get('checkpoint')}"
            )
