"""A trained checkpoint as a tokenizer: signals <-> indices.

    tokenizer = load_tokenizer("runs/<run>/last.ckpt")
    indices = tokenizer.encode(x, mask)               # int64, -1 at padding
    x_hat = tokenizer.decode(indices, lengths)        # == tokenizer.reconstruct(x, mask)

Whole splits: `vqtrain.evaluation` scores one, `vqtrain.tokens` encodes one into
token shards and decodes shards back to files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vqtrain.checkpoints import CONFIG_KEY, load_run_checkpoint
from vqtrain.config import InvalidConfig, register_resolvers
from vqtrain.data.common import DataModule
from vqtrain.files import archive_fingerprint
from vqtrain.model import DiscreteAutoencoder
from vqtrain.quantizers import ResidualQuantizer
from vqtrain.utils import ceil_div, exists


class Tokenizer:
    """Encode and decode in the training data's layout: images (B, C, H, W) in
    [-1, 1]; audio (B, 1, T) or (B, T) with an optional mask (B, T), True = real.
    Outputs are in the training layout (audio (B, 1, T)). Eval mode, no gradients."""

    def __init__(
        self, model: DiscreteAutoencoder, config: dict, checkpoint: str | None = None, fingerprint: str | None = None
    ):
        self.model = model.eval()
        self.config = config  # the training run's resolved config
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint  # of the checkpoint file's content (`archive_fingerprint`)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def modality(self) -> str:
        """ "image" or "audio": what the model's encoder takes."""
        return self.model.modality

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
        return {
            "modality": self.modality,
            "stride": self.stride,
            "codebook_sizes": self.codebook_sizes,
            "bits_per_token": self.bits_per_token,
            "sample_rate": self.sample_rate,
        }

    def data_module(self, cfg: DictConfig) -> DataModule:
        """`cfg.data`'s data module, refused unless it gives what the model was trained on:
        other data fails deep in the encoder, or (another sample rate) encodes without a word
        and decodes at the run's rate, slowed down or sped up."""
        datamodule = instantiate(cfg.data)
        if datamodule.modality != self.modality:
            raise InvalidConfig(
                f"data gives {datamodule.modality} but {self.checkpoint} encodes {self.modality}: "
                f"choose {self.modality} data"
            )
        key = "sample_rate" if self.modality == "audio" else "channels"
        trained, given = self.config["data"].get(key), getattr(datamodule, key, None)
        if exists(trained) and exists(given) and given != trained:
            raise InvalidConfig(
                f"data.{key}={given}, but {self.checkpoint} was trained with {trained}: set data.{key}={trained}"
            )
        return datamodule

    def inputs(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Audio without a mask is real throughout: the decoder then masks the tail
        it upsamples past the clip, as for the same clip in a padded batch."""
        x = x.to(self.device, torch.float32)
        if self.modality != "audio":
            channels = self.config["data"].get("channels")  # (a data config of one's own may not say)
            if x.ndim != 4 or (exists(channels) and x.shape[1] != channels):  # else a convolution's error
                raise ValueError(f"images must be (B, C, H, W) with C = {channels}, got {tuple(x.shape)}")
            return x, None
        if x.ndim == 2:
            x = x[:, None]
        if mask is None:
            mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool)
        elif mask.shape != (x.shape[0], x.shape[-1]):  # a shorter mask would mark the rest as padding
            raise ValueError(f"mask must be of shape (B, T) = {(x.shape[0], x.shape[-1])}, got {tuple(mask.shape)}")
        return x, mask.to(self.device, torch.bool)

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Signals -> int64 indices (B, H', W'[, Q]) or (B, T'[, Q]); -1 at padded positions."""
        z, latent_mask, _ = self.model.encode(*self.inputs(x, mask))
        return self.model.quantizer(z, latent_mask).indices

    @torch.no_grad()
    def decode(
        self, indices: Tensor, lengths: Tensor | Sequence[int] | None = None, num_levels: int | None = None
    ) -> Tensor:
        """Indices -> signals. Audio: `lengths` in samples (exact for clips whose
        length is not a multiple of the stride), else real positions x stride.
        `num_levels`: residual quantizers decode from the first k levels only."""
        indices = indices.to(self.device)
        quantizer = self.model.quantizer
        if exists(num_levels) and not isinstance(quantizer, ResidualQuantizer):
            raise ValueError(f"num_levels applies to residual quantizers only, not {type(quantizer).__name__}")
        codes = (
            quantizer.indices_to_codes(indices, num_levels=num_levels)
            if exists(num_levels)
            else quantizer.indices_to_codes(indices)
        )
        if self.modality != "audio":
            return self.model.decode(codes)
        real = (indices >= 0 if quantizer.num_index_columns == 1 else (indices >= 0).any(-1)).sum(-1)
        if not exists(lengths):
            lengths = real * self.stride
        lengths = torch.as_tensor(lengths, device=self.device)
        if lengths.shape != real.shape or not torch.equal(ceil_div(lengths, self.stride), real):
            # (other lengths were broadcast, or cut to the tokens' span, without a word)
            raise ValueError(
                f"lengths must be each item's length in samples, which its real positions span at "
                f"{self.stride} a position: ceil(length / {self.stride}) = {real.tolist()}, got {lengths.tolist()}"
            )
        return self.model.decode(codes, lengths, int(lengths.max()))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The model's own forward pass: what training scores."""
        return self.model(*self.inputs(x, mask)).x_hat


def load_tokenizer(ckpt_path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild the model from the run config stored in a training checkpoint."""
    checkpoint, fingerprint = load_run_checkpoint(ckpt_path), archive_fingerprint(ckpt_path)
    config = checkpoint[CONFIG_KEY]
    register_resolvers()
    model = instantiate(OmegaConf.create(config["model"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.use_inference_weights()  # the EMA weights where the model keeps them
    return Tokenizer(model.to(device), config, str(Path(ckpt_path).resolve()), fingerprint)
