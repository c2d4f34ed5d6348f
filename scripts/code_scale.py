"""Where a checkpoint's codes sit against its latents, on the validation split.

    python scripts/code_scale.py runs/<run>/last.ckpt

Prints the mean norm of the codes and of the (real) latents, their ratio, the
codes used, and each code-norm quintile's share of the assignments. With
euclidean search, codes longer than the latents are passed over for the
shortest ones (docs/quantizers.md, SimVQ): a rising ratio shows up as a rising
share of the shortest quintile and falling utilization.
"""

from __future__ import annotations

import argparse

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vqtrain.quantizers.search import count_by_code, nearest_codes
from vqtrain.tokenizer import load_tokenizer


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.checkpoint)
    model, quantizer = tokenizer.model.eval(), tokenizer.model.quantizer
    data = instantiate(OmegaConf.create(tokenizer.config["data"]))
    data.setup("fit")
    latents = []
    for batch in data.val_dataloader():
        z, mask, _ = model.encode(batch.x, batch.mask, batch.lengths)
        latents.append(z[mask] if mask is not None else z.flatten(0, -2))
    h = quantizer.to_code_space(torch.cat(latents))  # (G, N, d)
    codebook = quantizer.codebook.detach()  # (G, K, d)
    indices = nearest_codes(h, codebook, quantizer.distance == "cosine", None)
    all_counts = count_by_code(indices, codebook.shape[1]).double()  # (G, K)
    for g, counts in enumerate(all_counts):
        norms = codebook[g].norm(dim=-1)
        shares = [f"{counts[q].sum() / counts.sum():.2f}" for q in norms.argsort().chunk(5)]
        latent_norm, code_norm = h[g].norm(dim=-1).mean(), norms.mean()
        print(
            f"group {g}: code norm {code_norm:.4f}, latent norm {latent_norm:.4f}, ratio {code_norm / latent_norm:.2f}; "
            f"used {(counts > 0).double().mean():.3f}; shares by code-norm quintile, shortest first: {shares}"
        )


if __name__ == "__main__":
    main()
