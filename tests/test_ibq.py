"""IBQ's shipped defaults: what its codebook use on real data relies on (docs/quantizers.md, IBQ).

The estimator itself (one-hot straight-through over the full softmax, chunking,
entropy terms) is pinned against brute force in tests/test_lookup_free.py.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from vqtrain.config import CONFIG_DIR
from vqtrain.quantizers import IBQ


def shipped_ibq(dim: int, codebook_size: int, **overrides) -> IBQ:
    """IBQ as configs/quantizer/ibq.yaml builds it, at a small size."""
    options = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "quantizer" / "ibq.yaml"))
    options = {k: v for k, v in options.items() if k not in ("_target_", "dim")}
    return IBQ(dim, **(options | {"codebook_size": codebook_size} | overrides))


def codes_used_after_training(**overrides) -> int:
    """A linear autoencoder on latents spanning 2 of 8 dimensions (so the argmax of
    <h, e> alone reaches few codes), 120 Adam steps; distinct codes used after."""
    torch.manual_seed(0)
    quantizer = shipped_ibq(8, 128, **overrides).train()
    encoder, decoder = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    x = torch.randn(512, 2) @ torch.randn(2, 8)
    optimizer = torch.optim.Adam([*quantizer.parameters(), *encoder.parameters(), *decoder.parameters()], lr=1e-2)
    for _ in range(120):
        out = quantizer(encoder(x).unsqueeze(0))
        loss = (decoder(out.quantized[0]) - x).pow(2).mean() + out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return quantizer.eval()(encoder(x).unsqueeze(0)).indices.unique().numel()


def test_the_default_entropy_term_spreads_the_codes():
    """The published configs' entropy term (weight 0.05, temperature 0.01) is on by
    default: without it the same run uses far fewer codes (on MNIST at 600 x 128:
    test utilization 68.8% of 1,024 against 97.5%; docs/quantizers.md, IBQ)."""
    shipped = shipped_ibq(8, 128)
    assert shipped.weights["entropy"] == 0.05 and shipped.inv_temperature == 100.0
    with_entropy, without = codes_used_after_training(), codes_used_after_training(entropy_weight=0.0)
    assert with_entropy >= 1.3 * without, (with_entropy, without)
