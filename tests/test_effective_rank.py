"""The effective rank and per-level usage against hand-built codebooks of known answer."""

from __future__ import annotations

import math

import pytest
import torch

from vqtrain.metrics import (
    code_vectors,
    digit_counts,
    digit_usage,
    effective_rank,
    used_codes_effective_rank,
)
from vqtrain.quantizers import BSQ, FSQ, IBQ, LFQ, ResidualFSQ, SimVQ, VectorQuantizer


def random_orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_k_equal_singular_values_give_exactly_k(k):
    # codes = U diag(3, ..., 3) V^T with orthonormal U (40 x k), V (16 x k): k equal singular values
    codes = 3.0 * random_orthonormal(40, k, seed=1) @ random_orthonormal(16, k, seed=2).T
    torch.testing.assert_close(effective_rank(codes), torch.tensor(float(k), dtype=torch.float64))


def test_identity_and_rank_one():
    torch.testing.assert_close(effective_rank(torch.eye(7)), torch.tensor(7.0, dtype=torch.float64))
    # every code a multiple of one direction: 100 % usage of a 1-dimensional codebook
    direction = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    codes = torch.arange(1, 65, dtype=torch.float64)[:, None] * direction
    torch.testing.assert_close(effective_rank(codes), torch.tensor(1.0, dtype=torch.float64))


def test_unequal_singular_values_follow_the_definition():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    codes = random_orthonormal(10, 4, seed=4) @ torch.diag(s) @ random_orthonormal(6, 4, seed=5).T
    p = s / s.sum()
    torch.testing.assert_close(effective_rank(codes), torch.exp(-(p * p.log()).sum()))
    assert 1 < effective_rank(codes) < 4


def test_degenerate_matrices():
    assert effective_rank(torch.zeros(5, 3)) == 0
    assert effective_rank(torch.zeros(0, 3)) == 0
    with pytest.raises(ValueError, match="2-d"):
        effective_rank(torch.zeros(3))


def test_only_used_codes_count():
    # codebook 0: 4 codes along two axes, but only the two on axis 0 are used -> rank 1
    # codebook 1: the identity's 3 rows, all used -> rank 3
    book0 = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 5.0, 0], [0, 0, 7.0]])
    book1 = torch.cat([torch.eye(3), torch.zeros(1, 3)])
    counts = torch.tensor([[3, 1, 0, 0], [1, 1, 1, 0]])
    ranks = used_codes_effective_rank(torch.stack([book0, book1]), counts)
    torch.testing.assert_close(ranks, torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_full_lfq_and_bsq_codebooks_have_rank_b():
    # the 2^B corners of the cube: orthogonal columns of equal norm, B equal singular values
    for module in (LFQ(6, 64), BSQ(6, 64), LFQ(4, 16, num_codebooks=2)):
        codes = code_vectors(module)
        assert codes.shape == (module.num_codebooks, module.num_codes, module.bits)
        ranks = used_codes_effective_rank(codes, torch.ones(module.num_codebooks, module.num_codes))
        torch.testing.assert_close(ranks, torch.full((module.num_codebooks,), float(module.bits), dtype=torch.float64))


def test_code_vectors_decode_like_the_quantizers():
    fsq = FSQ(3, levels=[5, 4, 3])
    grid = code_vectors(fsq)[0]
    torch.testing.assert_close(fsq.decode_rows(torch.arange(60)[:, None]), grid)  # no projection: dim = 3 channels
    lfq = LFQ(5, 32, scale=0.5)
    torch.testing.assert_close(lfq.decode_rows(torch.arange(32)[:, None]), code_vectors(lfq)[0])
    ibq = IBQ(4, 10)
    assert torch.equal(code_vectors(ibq)[0], ibq.embed.detach())
    vq = VectorQuantizer(4, 10, groups=2)
    assert code_vectors(vq).shape == (2, 10, 2)
    assert code_vectors(SimVQ(4, 10)).shape == (1, 10, 4)
    assert code_vectors(ResidualFSQ(4, levels=[3, 3], num_levels=3)).shape == (3, 9, 2)


def test_digit_counts_of_fsq_levels_and_lfq_bits():
    # FSQ levels [3, 2]: code = d0 + 3 d1 (first channel least significant)
    counts = torch.tensor([5, 0, 1, 0, 0, 2])  # (0,0) x5, (2,0) x1, (2,1) x2
    d0, d1 = digit_counts(counts, [3, 2])
    assert d0.tolist() == [5, 0, 3] and d1.tolist() == [6, 2]
    # LFQ 3 bits, first channel most significant: code 6 = 110, code 1 = 001
    counts = torch.zeros(8, dtype=torch.long)
    counts[6], counts[1] = 3, 1
    bits = digit_counts(counts, [2, 2, 2], most_significant_first=True)
    assert [b.tolist() for b in bits] == [[1, 3], [1, 3], [3, 1]]
    # mixed radix, first channel most significant: code = 3 d0 + d1
    counts = torch.zeros(6, dtype=torch.long)
    counts[5], counts[1] = 2, 1  # (1, 2) twice, (0, 1) once
    d0, d1 = digit_counts(counts, [2, 3], most_significant_first=True)
    assert d0.tolist() == [1, 2] and d1.tolist() == [0, 1, 2]


def test_digit_usage_finds_a_stuck_bit():
    # 3 bits; the last bit is always 0: every code used is even
    counts = torch.zeros(8, dtype=torch.long)
    counts[[0, 2, 4, 6]] = 10
    usage = digit_usage(counts, [2, 2, 2], most_significant_first=True)
    torch.testing.assert_close(usage["entropy_utilization"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(usage["min_share"], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert usage["stuck_channels"] == 1
    torch.testing.assert_close(usage["mean_entropy_utilization"], torch.tensor(2 / 3, dtype=torch.float64))


def test_digit_usage_of_fsq_levels():
    counts = torch.ones(5 * 3, dtype=torch.long)  # levels [5, 3], every code once
    usage = digit_usage(counts, [5, 3])
    torch.testing.assert_close(usage["entropy_utilization"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(usage["min_share"], torch.tensor([1 / 5, 1 / 3], dtype=torch.float64))
    counts = torch.tensor([4, 0, 0, 0, 0] * 3)  # channel 0 stuck at its lowest level
    usage = digit_usage(counts, [5, 3])
    assert usage["stuck_channels"] == 1
    torch.testing.assert_close(usage["entropy_utilization"][1], torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(float(usage["entropy_utilization"][0]), 0.0, abs_tol=1e-12)


def test_digit_counts_validate():
    with pytest.raises(ValueError, match="radices"):
        digit_counts(torch.ones(4), [2, 1])
    with pytest.raises(ValueError, match="counts"):
        digit_counts(torch.ones(3), [2, 2])
