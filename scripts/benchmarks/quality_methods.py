"""quality's methods: each quantizer config of ours beside vector-quantize-pytorch's
counterpart, both behind one interface (`Side`), and a training forward of a
net with either."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scripts.benchmarks.quality_data import DIM, ConvAE


@dataclass(frozen=True)
class Method:
    config: str  # configs/quantizer/<config>.yaml
    codebook_size: int  # quantizer.codebook_size override (per level for residual)
    reference: str | None  # the reference's constructor, as text (None: no counterpart)
    build_reference: Callable[[Any], nn.Module] | None  # vector_quantize_pytorch -> module
    reference_sizes: tuple[int, ...] = ()  # the reference's K per index column
    reference_takes_mask: bool = False


METHODS: dict[str, Method] = {
    "vq": Method(
        "vq",
        1024,
        "VectorQuantize(dim=64, codebook_size=1024)",
        lambda vqp: vqp.VectorQuantize(dim=DIM, codebook_size=1024),
        (1024,),
        True,
    ),
    "vq_tricks": Method(
        "vq_tricks",
        1024,
        "VectorQuantize(dim=64, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2)",
        lambda vqp: vqp.VectorQuantize(dim=DIM, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2),
        (1024,),
        True,
    ),
    "simvq": Method(
        "simvq", 1024, "SimVQ(dim=64, codebook_size=1024)", lambda vqp: vqp.SimVQ(dim=DIM, codebook_size=1024), (1024,)
    ),
    "fsq": Method(
        "fsq", 1024, "FSQ(levels=[8, 5, 5, 5], dim=64)", lambda vqp: vqp.FSQ(levels=[8, 5, 5, 5], dim=DIM), (1000,)
    ),
    # the paper's levels for 4,096 codes (4,375 of them): where FSQ's utilization falls short (docs/quantizers.md, FSQ)
    "fsq4096": Method(
        "fsq",
        4096,
        "FSQ(levels=[7, 5, 5, 5, 5], dim=64)",
        lambda vqp: vqp.FSQ(levels=[7, 5, 5, 5, 5], dim=DIM),
        (4375,),
    ),
    "rvq": Method(
        "rvq",
        256,
        "ResidualVQ(dim=64, num_quantizers=4, codebook_size=256)",
        lambda vqp: vqp.ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=256),
        (256,) * 4,
        True,
    ),
    "rsimvq": Method(
        "rsimvq",
        256,
        "ResidualSimVQ(dim=64, num_quantizers=4, codebook_size=256)",
        lambda vqp: vqp.ResidualSimVQ(dim=DIM, num_quantizers=4, codebook_size=256),
        (256,) * 4,
    ),
    "rfsq": Method(
        "rfsq",
        1024,
        "ResidualFSQ(dim=64, levels=[8, 5, 5, 5], num_quantizers=4)",
        lambda vqp: vqp.ResidualFSQ(dim=DIM, levels=[8, 5, 5, 5], num_quantizers=4),
        (1000,) * 4,
    ),
    "lfq": Method(
        "lfq", 1024, "LFQ(dim=64, codebook_size=1024)", lambda vqp: vqp.LFQ(dim=DIM, codebook_size=1024), (1024,), True
    ),
    "bsq": Method(
        "bsq",
        1024,
        "LFQ(dim=64, codebook_size=1024, spherical=True)",
        lambda vqp: vqp.LFQ(dim=DIM, codebook_size=1024, spherical=True),
        (1024,),
        True,
    ),
    "ibq": Method("ibq", 1024, None, None),
    "rlfq": Method(
        "rlfq",
        1024,
        "ResidualLFQ(dim=64, num_quantizers=4, codebook_size=1024)",
        lambda vqp: vqp.ResidualLFQ(dim=DIM, num_quantizers=4, codebook_size=1024),
        (1024,) * 4,
        True,
    ),
}


class Side:
    """One quantizer behind one interface: channel-last latents (B, *S, D) and a
    latent mask (B, *S) or None -> quantized (zero at padding), indices (B, *S, Q), loss."""

    def __init__(
        self, module: nn.Module, sizes: list[int], call: Callable, description: str, config: dict | None = None
    ):
        self.module, self.sizes, self.call, self.description, self.config = (
            module,
            list(sizes),
            call,
            description,
            config,
        )

    def __call__(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.call(self.module, z, mask)


def build_ours(name: str, seed: int, overrides: list[str] = ()) -> Side:
    """Our quantizer as the Hydra config composes it, plus `overrides` (e.g. `quantizer.commitment_weight=0`)."""
    import hydra
    from omegaconf import OmegaConf

    from vqtrain.config import compose

    method = METHODS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(
            [
                f"quantizer={method.config}",
                f"quantizer.codebook_size={method.codebook_size}",
                f"model.latent_dim={DIM}",
                f"seed={seed}",
                *overrides,
            ],
            run_dir,
        )
    module = hydra.utils.instantiate(cfg.quantizer)

    def call(m, z, mask):
        out = m(z, mask)
        columns = len(m.codebook_sizes)
        indices = out.indices if columns > 1 else out.indices.unsqueeze(-1)
        return out.quantized, indices, out.loss

    return Side(
        module,
        module.codebook_sizes,
        call,
        " ".join([f"configs/quantizer/{method.config}.yaml, codebook_size={method.codebook_size}", *overrides]),
        OmegaConf.to_container(cfg.quantizer, resolve=True),
    )


def build_reference(name: str) -> Side:
    import vector_quantize_pytorch as vqp

    method = METHODS[name]
    module = method.build_reference(vqp)
    takes_mask = method.reference_takes_mask

    def call(m, z, mask):
        lead = z.shape[:-1]
        tokens = z.reshape(lead[0], -1, z.shape[-1])  # the reference wants (B, N, D) channel-last
        flat_mask = None if mask is None else mask.reshape(lead[0], -1)
        out = m(tokens, mask=flat_mask) if takes_mask and flat_mask is not None else m(tokens)
        quantized, indices = out[0], out[1].long()
        loss = out[2].sum() if len(out) > 2 and torch.is_tensor(out[2]) else tokens.new_zeros(())
        if (
            flat_mask is not None
        ):  # the unmasked ones quantized the padding too: the decoder gets zeros there, as from ours
            quantized = quantized * flat_mask.unsqueeze(-1)
        if indices.ndim == 2:
            indices = indices.unsqueeze(-1)
        return quantized.reshape(z.shape), indices.reshape(*lead, indices.shape[-1]), loss

    return Side(module, list(method.reference_sizes), call, method.reference)


def forward(net: ConvAE, side: Side, x: Tensor, mask: Tensor | None):
    z = net.encoder(x).movedim(1, -1)  # channel-last (B, *S, D)
    latent_mask = net.latent_mask(mask)
    quantized, indices, aux = side(z, latent_mask)
    x_hat = net.decoder(quantized.movedim(-1, 1))
    if mask is None:
        recon = F.mse_loss(x_hat, x)
    else:
        m = mask.unsqueeze(1).to(x.dtype)
        recon = ((x_hat - x).pow(2) * m).sum() / m.sum().clamp_min(1)
    return recon, aux, indices, latent_mask, x_hat
