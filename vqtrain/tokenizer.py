"""A trained checkpoint as a tokenizer (signals <-> indices), and the offline
jobs built on it: evaluate a split, encode a split into token shards, decode
shards back to PNG / WAV. The scripts in `scripts/` only parse arguments.

    tokenizer = load_tokenizer("runs/<run>/last.ckpt")
    indices = tokenizer.encode(x, mask)               # int64, -1 at padding
    x_hat = tokenizer.decode(indices, lengths)        # == tokenizer.reconstruct(x, mask)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import soundfile
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.utils import save_image
from tqdm import tqdm

from vqtrain.config import CONFIG_DIR, register_resolvers
from vqtrain.data.common import DataModule, SkippingDataset
from vqtrain.model import DiscreteAutoencoder
from vqtrain.quantizers import ResidualQuantizer
from vqtrain.utils import exists

SPLITS = ("train", "val", "test")
HEADLINE = ("loss", "recon_loss", "mse", "psnr", "si_snr", "utilization", "perplexity", "dead_codes", "bits_per_token",
            "tokens_per_image", "bits_per_image", "tokens_per_second", "bits_per_second")  # first in reports


# --- the tokenizer ----------------------------------------------------------------

class Tokenizer:
    """Encode and decode in the training data's layout: images (B, C, H, W) in
    [-1, 1]; audio (B, 1, T) or (B, T) with an optional mask (B, T), True = real.
    Outputs are in the training layout (audio (B, 1, T)). Eval mode, no gradients."""

    def __init__(self, model: DiscreteAutoencoder, config: dict, checkpoint: str | None = None):
        self.model = model.eval()
        self.config = config  # the training run's resolved config
        self.checkpoint = checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def modality(self) -> str:
        """"image" or "audio", from the training data module."""
        return get_class(self.config["data"]["_target_"]).modality

    @property
    def sample_rate(self) -> int | None:
        return self.config["data"].get("sample_rate")

    @property
    def stride(self) -> int:
        """Signal samples per latent position (per side for images)."""
        return self.model.encoder.stride

    @property
    def codebook_sizes(self) -> list[int]:
        """One entry per index column (residual level, group, codebook)."""
        return list(self.model.quantizer.codebook_sizes)

    @property
    def bits_per_token(self) -> float:
        return sum(math.log2(size) for size in self.codebook_sizes)

    def describe(self) -> dict[str, Any]:
        return {"modality": self.modality, "stride": self.stride, "codebook_sizes": self.codebook_sizes,
                "bits_per_token": self.bits_per_token, "sample_rate": self.sample_rate}

    def inputs(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Audio without a mask is real throughout: the decoder then masks the tail
        it upsamples past the clip, as for the same clip in a padded batch."""
        x = x.to(self.device, torch.float32)
        if self.modality != "audio":
            return x, None
        if x.ndim == 2:
            x = x[:, None]
        mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool) if mask is None else mask
        return x, mask.to(self.device, torch.bool)

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Signals -> int64 indices (B, H', W'[, Q]) or (B, T'[, Q]); -1 at padded positions."""
        z, latent_mask, _ = self.model.encode(*self.inputs(x, mask))
        return self.model.quantizer(z, latent_mask).indices

    @torch.no_grad()
    def decode(self, indices: Tensor, lengths: Tensor | Sequence[int] | None = None,
               num_levels: int | None = None) -> Tensor:
        """Indices -> signals. Audio: `lengths` in samples (exact for clips whose
        length is not a multiple of the stride), else real positions x stride.
        `num_levels`: residual quantizers decode from the first k levels only."""
        indices = indices.to(self.device)
        quantizer = self.model.quantizer
        if exists(num_levels) and not isinstance(quantizer, ResidualQuantizer):
            raise ValueError(f"num_levels applies to residual quantizers only, not {type(quantizer).__name__}")
        codes = quantizer.indices_to_codes(indices, num_levels=num_levels) if exists(num_levels) else quantizer.indices_to_codes(indices)
        if self.modality != "audio":
            return self.model.decode(codes)
        if exists(lengths):
            lengths = torch.as_tensor(lengths, device=self.device)
        else:
            real = indices >= 0 if quantizer.num_index_columns == 1 else (indices >= 0).any(-1)
            lengths = real.sum(-1) * self.stride
        return self.model.decode(codes, lengths, int(lengths.max()))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The model's own forward pass: what training scores."""
        return self.model(*self.inputs(x, mask))[0]


def load_tokenizer(ckpt_path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild the model from the run config stored in a training checkpoint."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config = checkpoint.get("vqtrain_config")
    if not config:
        raise ValueError(f"{ckpt_path} holds no run config (`vqtrain_config`): not a vqtrain training checkpoint")
    register_resolvers()
    model = instantiate(OmegaConf.create(config["model"]))
    model.load_state_dict(checkpoint["state_dict"])
    return Tokenizer(model.to(device), config, str(Path(ckpt_path).resolve()))


# --- script arguments and configs --------------------------------------------------

Schema = TypeVar("Schema")


def parse_args(schema: type[Schema], argv: Sequence[str]) -> tuple[Schema, list[str]]:
    """Hydra-style `key=value` arguments -> (the script's own, typed by the
    dataclass `schema`; the rest, config overrides for `run_config`)."""
    if bad := [arg for arg in argv if "=" not in arg]:
        raise SystemExit(f"arguments are key=value, got {bad}")
    names = {field.name for field in dataclasses.fields(schema)}
    own = [arg for arg in argv if arg.partition("=")[0] in names]
    args = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(own))
    if missing := sorted(OmegaConf.missing_keys(args)):
        raise SystemExit(f"missing required arguments: {' '.join(f'{name}=...' for name in missing)}")
    return OmegaConf.to_object(args), [arg for arg in argv if arg not in own]


def run_config(config: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The training run's config with overrides: `data=NAME` swaps in that data
    config as train.py would compose it (its paths resolve against the run's),
    `key=value` sets an existing key. The checkpoint fixes every other group."""
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)  # a misspelt key is an error, not a silent no-op
    dotlist = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "data":
            cfg.data = composed_data_config(value)
        elif (CONFIG_DIR / key).is_dir():
            raise ValueError(f"{key}={value}: the checkpoint fixes `{key}`; only data=NAME can be switched")
        else:
            dotlist.append(override)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def composed_data_config(name: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"data={name}"]).data


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_atomic(path: Path, save) -> None:
    """`save(temporary path)`, then rename: a file that exists is complete."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save(temporary)
    os.replace(temporary, path)


def write_json(path: Path, content: dict, indent: int | None = 2) -> None:
    write_atomic(path, lambda temporary: temporary.write_text(json.dumps(content, indent=indent) + "\n"))


# --- data ---------------------------------------------------------------------------

def split_dataset(datamodule: DataModule, split: str) -> Dataset:
    """A split in a fixed order, as training's val/test see it: test falls back
    to val, and the training split's random crops are off."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    datamodule.setup()
    dataset = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}[split]
    dataset = datamodule.val_set if dataset is None else dataset
    if getattr(dataset, "random_crop", False):
        dataset.random_crop = False  # this data module is ours alone
    return dataset


def item_id(dataset: Dataset, position: int) -> str | int:
    """A file's path (relative to the data root for audio), else the position in the split."""
    files = getattr(dataset, "files", None)
    return str(files[position]) if exists(files) else position


# --- evaluation ---------------------------------------------------------------------

def si_snr(estimate: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Scale-invariant SNR (dB) of each item over its real samples (weight 1),
    with the zero-mean signals of Le Roux et al. (2019)."""
    weight = weight.flatten(1)
    estimate, target = estimate.flatten(1) * weight, target.flatten(1) * weight
    count = weight.sum(1, keepdim=True).clamp_min(1)
    estimate = estimate - estimate.sum(1, keepdim=True) / count * weight
    target = target - target.sum(1, keepdim=True) / count * weight
    eps = torch.finfo(estimate.dtype).eps
    projection = ((estimate * target).sum(1, keepdim=True) + eps) / (target.pow(2).sum(1, keepdim=True) + eps) * target
    noise = estimate - projection
    return 10 * torch.log10((projection.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps))


class SignalQuality(L.Callback):
    """MSE over all real samples, and per item PSNR (images in [-1, 1]: data
    range 2) or SI-SNR (audio), averaged. Read off the test step's own forward
    pass through a hook, so nothing is computed twice or differently."""

    def __init__(self, modality: str):
        self.modality = modality

    def on_test_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self.squared_error, self.samples, self.scores, self.shape = 0.0, 0.0, [], None
        self.hook = model.register_forward_hook(self.record)

    def on_test_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self.hook.remove()

    def record(self, model: L.LightningModule, inputs: tuple, output: tuple) -> None:
        x, mask = inputs[0].double(), inputs[1] if len(inputs) > 1 else None
        x_hat = output[0].double()  # SI-SNR of a poor model is ill-conditioned in float32
        weight = mask[:, None].expand_as(x).to(x.dtype) if exists(mask) else torch.ones_like(x)
        error = ((x_hat - x).pow(2) * weight).flatten(1).sum(1)
        samples = weight.flatten(1).sum(1)
        self.squared_error += float(error.sum())
        self.samples += float(samples.sum())
        self.shape = tuple(x.shape[2:])
        if self.modality == "audio":
            self.scores.append(si_snr(x_hat, x, weight).cpu())
        else:
            self.scores.append((10 * torch.log10(4 / (error / samples).clamp_min(1e-12))).cpu())

    def compute(self) -> dict[str, float]:
        score = float(torch.cat(self.scores).mean())
        return {"mse": self.squared_error / max(self.samples, 1), "si_snr" if self.modality == "audio" else "psnr": score}


def evaluate(tokenizer: Tokenizer, cfg: DictConfig, split: str = "test") -> dict[str, float]:
    """Run a split through Lightning's test loop with training's own metrics
    (`shared_step`, codebook usage), plus signal quality and bit rates. As in
    training's final test, `trainer.limit_test_batches` and `precision` apply."""
    datamodule = instantiate(cfg.data)
    loader = datamodule.loader(split_dataset(datamodule, split), shuffle=False)
    quality = SignalQuality(tokenizer.modality)
    device = tokenizer.device
    trainer = L.Trainer(
        accelerator="cpu" if device.type == "cpu" else "gpu", devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=cfg.trainer.precision, limit_test_batches=cfg.trainer.get("limit_test_batches", 1.0),
        logger=False, callbacks=[quality], enable_checkpointing=False, enable_model_summary=False,
    )
    [logged] = trainer.test(tokenizer.model, dataloaders=loader, verbose=False)
    figures = {name.removeprefix("test/"): float(value) for name, value in logged.items()}
    figures.update(quality.compute())
    figures["bits_per_token"] = tokenizer.bits_per_token
    if tokenizer.modality == "audio":
        figures["tokens_per_second"] = tokenizer.sample_rate / tokenizer.stride
        figures["bits_per_second"] = figures["tokens_per_second"] * tokenizer.bits_per_token
    else:
        figures["tokens_per_image"] = math.prod(side // tokenizer.stride for side in quality.shape)
        figures["bits_per_image"] = figures["tokens_per_image"] * tokenizer.bits_per_token
    headline = [name for name in HEADLINE if name in figures]
    return {name: figures[name] for name in headline + sorted(set(figures) - set(headline))}


def format_table(figures: dict[str, float]) -> str:
    width = max(map(len, figures))
    return "\n".join(f"{name:<{width}}  {value:>14.6g}" for name, value in figures.items())


# --- encoding a split into shards -------------------------------------------------------

def encode_split(tokenizer: Tokenizer, cfg: DictConfig, split: str, out_dir: str | Path,
                 shard_size: int = 1000) -> dict:
    """Tokens of every item of a split, in split order, as shards of `shard_size`
    items (`shard-00000.pt`: ids, positions, per-item tokens, audio lengths in
    samples) and `index.json`. Images give (H', W'[, Q]) grids, audio (ceil(len /
    stride)[, Q]) sequences without padding. Shards already written are kept
    (each is written whole, by rename), so an interrupted run resumes."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    dataset = split_dataset(datamodule, split)
    meta = {"checkpoint": tokenizer.checkpoint, "split": split, "shard_size": shard_size, "num_items": len(dataset)}
    items, skipped, shards = [], [], []
    with tqdm(total=len(dataset), unit="item", desc=f"encode {split}") as progress:
        for number, start in enumerate(range(0, len(dataset), shard_size)):
            path = out_dir / f"shard-{number:05d}.pt"
            if path.is_file():
                shard = torch.load(path, weights_only=True)
                if shard["meta"] != meta:
                    raise ValueError(f"{path} was written by another run ({shard['meta']}, now {meta}): use a fresh out directory")
            else:
                shard = encode_shard(tokenizer, datamodule, dataset, range(start, min(start + shard_size, len(dataset))))
                shard["meta"] = meta
                write_atomic(path, lambda temporary: torch.save(shard, temporary))
            progress.update(len(shard["ids"]) + len(shard["skipped"]))
            shards.append(path.name)
            skipped += shard["skipped"]
            for i, (identifier, position, tokens) in enumerate(zip(shard["ids"], shard["index"], shard["tokens"])):
                item = {"id": identifier, "index": position, "shard": path.name, "shape": list(tokens.shape)}
                if exists(shard["lengths"]):
                    item["length"] = shard["lengths"][i]
                items.append(item)
    index = {**meta, **tokenizer.describe(), "shards": shards, "items": items, "skipped": skipped}
    write_json(out_dir / "index.json", index, indent=None)  # compact: it lists every item
    return index


def encode_shard(tokenizer: Tokenizer, datamodule: DataModule, dataset: Dataset, positions: range) -> dict:
    lengths = getattr(dataset, "lengths", None)
    order = sorted(positions, key=lengths.__getitem__) if exists(lengths) else list(positions)  # little padding
    loader = DataLoader(Subset(SkippingDataset(dataset, datamodule.strict), order), batch_size=datamodule.batch_size,
                        collate_fn=datamodule.collate, num_workers=datamodule.num_workers)
    tokens, sample_lengths = {}, {}
    for batch in loader:
        if "x" not in batch:  # every item of the batch was unreadable
            continue
        indices = tokenizer.encode(batch["x"], batch.get("mask")).cpu()
        for i, position in enumerate(batch["index"].tolist()):
            if "lengths" in batch:  # audio: drop the padding
                sample_lengths[position] = int(batch["lengths"][i])
                tokens[position] = indices[i, : -(-sample_lengths[position] // tokenizer.stride)].clone()
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


# --- decoding shards ----------------------------------------------------------------------

def decode_shard(tokenizer: Tokenizer, shard_path: str | Path, out_dir: str | Path,
                 num_levels: int | None = None, batch_size: int = 32) -> list[Path]:
    """Tokens of a shard back to files under `out_dir` named after the item ids:
    PNG for images ([-1, 1] -> [0, 1]), WAV at the run's sample rate for audio."""
    shard = torch.load(shard_path, weights_only=True)
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
