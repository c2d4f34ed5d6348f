"""Agreement with the reference implementation, vector-quantize-pytorch 1.32.0
(installed with the `bench` extra; these tests skip without it)."""
from __future__ import annotations

import pytest
import torch

from vqtrain.quantizers import FSQ, ResidualFSQ, VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


def randn(*shape, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("levels, num_codebooks", [([8, 5, 5, 5], 1), ([7, 5, 5, 5, 5], 1), ([8, 6, 5], 1), ([4, 3], 2)])
def test_fsq_matches_reference(levels, num_codebooks):
    dim = len(levels) * num_codebooks  # no projection on either side
    ours = FSQ(dim, levels=levels, num_codebooks=num_codebooks).eval()
    theirs = vqp.FSQ(levels=levels, num_codebooks=num_codebooks).eval()
    z = randn(3, 50, dim, scale=2.0)
    out = ours(z)
    quantized, indices = theirs(z)
    torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-6)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(ours.indices_to_codes(out.indices), theirs.indices_to_codes(indices), rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [4, 3, 2]])
def test_symmetric_fsq_matches_reference(levels):
    dim = len(levels)
    ours = FSQ(dim, levels=levels, symmetric=True).eval()
    theirs = vqp.FSQ(levels=levels, preserve_symmetry=True).eval()
    z = randn(3, 50, dim, scale=2.0)
    out = ours(z)
    quantized, indices = theirs(z)
    torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-6)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(ours.indices_to_codes(out.indices), theirs.indices_to_codes(indices), rtol=0, atol=1e-6)


def test_symmetric_residual_fsq_matches_reference():
    torch.manual_seed(0)
    ours = ResidualFSQ(16, levels=[8, 5, 5, 5], num_levels=4, symmetric=True).eval()
    theirs = vqp.ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=4).eval()
    theirs.project_in.load_state_dict(ours.project_in.state_dict())
    theirs.project_out.load_state_dict(ours.project_out.state_dict())
    z = randn(3, 50, 16, scale=2.0)
    out = ours(z)
    quantized, indices = theirs(z)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_vq_indices_match_reference(distance):
    dim, codes = 8, 32
    torch.manual_seed(0)
    ours = VectorQuantizer(dim, codes, distance=distance).eval()
    theirs = vqp.VectorQuantize(dim=dim, codebook_size=codes, use_cosine_sim=distance == "cosine").eval()
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook)  # (1, K, d), l2-normalised for cosine
    z = randn(4, 30, dim)
    out = ours(z)
    quantized, indices, _ = theirs(z)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(quantized, out.quantized, rtol=1e-5, atol=1e-6)
