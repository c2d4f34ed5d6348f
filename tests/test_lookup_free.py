"""LFQ, BSQ, residual LFQ and IBQ against brute force: the full softmax over every
code, built in one piece, is what the chunked computations must reproduce.

The shared contract (padding, round trips, dtypes, eval state) is covered by
registration in tests/test_quantizers.py, DDP equality in tests/test_distributed.py.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import vqtrain.quantizers.entropy as entropy_module
from vqtrain.quantizers import BSQ, IBQ, LFQ, ResidualLFQ
from vqtrain.quantizers.entropy import bit_entropy_terms, code_bits
from vqtrain.utils import lengths_to_mask


def randn(*shape, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def exact_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def corners(bits: int, value: float) -> torch.Tensor:
    """(2^B, B) every code of {-value, +value}^B in index order (first channel most significant)."""
    return (code_bits(0, 2**bits, bits, "cpu") * 2 - 1) * value


def brute_force_lfq_entropy(h: torch.Tensor, value: float, inv_temperature: float):
    """h (N, C, B) -> (per-sample, codebook) entropy from the full softmax over all 2^B codes."""
    logits = 2 * inv_temperature * h @ corners(h.shape[-1], value).T  # -tau ||h - c||^2 up to a per-row constant
    p = logits.softmax(-1)  # (N, C, K)
    return exact_entropy(p).mean(), exact_entropy(p.mean(0)).mean()


def pre_quantization(module: LFQ, z: torch.Tensor) -> torch.Tensor:
    """What `module` quantizes: (N, C, B)."""
    return module.prepare(module.project_in(z.reshape(-1, module.dim)).view(-1, module.num_codebooks, module.bits))


LFQS = {
    "lfq": partial(LFQ, 4, 16, inv_temperature=1.0),
    "lfq_projection_two_codebooks": partial(LFQ, 8, 8, num_codebooks=2, inv_temperature=0.7, scale=0.5),
    "bsq_exact": partial(BSQ, 5, 32, codebook_entropy="exact", inv_temperature=2.0),
    "bsq_exact_projection": partial(
        BSQ, 8, 16, num_codebooks=2, codebook_entropy="exact", inv_temperature=3.0, scale=2.0
    ),
}


# -- LFQ / BSQ quantization ------------------------------------------------------------
def test_lfq_indices_are_sign_bits_first_channel_most_significant():
    module = LFQ(4, 16).eval()
    z = randn(3, 7, 4)
    out = module(z)
    expected = ((z > 0).long() * torch.tensor([8, 4, 2, 1])).sum(-1)
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(module.indices_to_codes(torch.arange(16)), corners(4, 1.0))


def test_bsq_codes_are_cube_corners_on_the_sphere():
    module = BSQ(6, 64, scale=2.0).eval()
    z = randn(50, 6, scale=3.0)
    out = module(z)
    assert torch.equal(out.quantized, torch.where(z > 0, 2 / math.sqrt(6), -2 / math.sqrt(6)))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.full((50,), 2.0))
    # the commitment is to the latent on the sphere, not the raw latent
    torch.testing.assert_close(out.losses["commitment"], (F.normalize(z, dim=-1) * 2 - out.quantized).pow(2).mean())


def test_residual_lfq_halves_the_code_values_per_level():
    module = ResidualLFQ(8, num_levels=3, codebook_size=16).eval()
    assert [level.code_value for level in module.levels] == [1.0, 0.5, 0.25]
    assert module.codebook_sizes == [16, 16, 16] and module.code_dim == 4
    codes = module.indices_to_codes(torch.tensor([[15, 0, 15]]))  # + - + on every channel
    torch.testing.assert_close(codes, module.project_out(torch.full((1, 4), 1 - 0.5 + 0.25)))


# -- the entropy penalty -------------------------------------------------------------------
@pytest.mark.parametrize("chunk_elements", [1, 37, 2**22])
@pytest.mark.parametrize("name", LFQS)
def test_entropy_terms_and_their_gradient_equal_the_full_softmax(name, chunk_elements):
    torch.manual_seed(0)
    module = LFQS[name](chunk_elements=chunk_elements).train()
    z = randn(5, 9, module.dim, scale=0.3).requires_grad_(True)
    out = module(z)
    h = pre_quantization(module, z)
    per_sample, codebook = brute_force_lfq_entropy(h, module.code_value, module.inv_temperature)
    torch.testing.assert_close(out.losses["per_sample_entropy"], per_sample)
    torch.testing.assert_close(out.losses["codebook_entropy"], codebook)
    torch.testing.assert_close(out.losses["entropy"], per_sample - module.diversity_gamma * codebook)
    expected_loss = (
        module.weights["entropy"] * (per_sample - codebook) + module.weights["commitment"] * out.losses["commitment"]
    )
    torch.testing.assert_close(out.loss, expected_loss)
    # the chunked, checkpointed backward equals autograd through the full softmax
    (ours,) = torch.autograd.grad(out.losses["entropy"], z)
    (theirs,) = torch.autograd.grad(per_sample - codebook, z)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_factorized_codebook_entropy_is_bsqs_per_bit_sum_and_an_upper_bound():
    a = randn(40, 2, 5, scale=2.0)
    _, factorized = bit_entropy_terms(a, torch.ones(40), factorized=True)
    _, exact = bit_entropy_terms(a, torch.ones(40), factorized=False)
    p = torch.sigmoid(a).mean(0)  # (C, B) batch-mean probability of each bit being 1
    expected = (exact_entropy(torch.stack([p, 1 - p], -1)).sum(-1)).mean()
    torch.testing.assert_close(factorized, expected)
    assert factorized >= exact - 1e-6  # the sum of the marginals' entropies bounds the joint's
    # independent, uniform bits: the two agree
    _, factorized = bit_entropy_terms(torch.zeros(8, 1, 4), torch.ones(8), factorized=True)
    _, exact = bit_entropy_terms(torch.zeros(8, 1, 4), torch.ones(8), factorized=False)
    torch.testing.assert_close(factorized, exact)
    torch.testing.assert_close(exact, torch.tensor(4 * math.log(2)))


@pytest.mark.parametrize(
    "build", [LFQS["lfq"], partial(BSQ, 4, 16), partial(IBQ, 4, 16, entropy_weight=0.1, inv_temperature=1.0)]
)
def test_entropy_statistics_see_real_rows_only(build):
    """The batch-codebook entropy of a padded batch is that of its real rows alone."""
    torch.manual_seed(0)
    module = build().train()
    lengths = [6, 2, 5]
    z = randn(3, 6, 4)
    mask = lengths_to_mask(torch.tensor(lengths), 6)
    padded = module(torch.where(mask[..., None], z, 1e3 * randn(3, 6, 4, seed=9)), mask)
    alone = module(z[mask].unsqueeze(0))  # the 13 real rows as one sequence
    for key in ("per_sample_entropy", "codebook_entropy", "entropy"):
        torch.testing.assert_close(padded.losses[key], alone.losses[key], msg=key)
    assert padded.losses["codebook_entropy"] > 0


@pytest.mark.parametrize("build", [LFQS["lfq"], partial(BSQ, 4, 16), partial(IBQ, 4, 16, entropy_weight=0.1)])
def test_entropy_is_a_training_statistic(build):
    module = build().eval()
    out = module(randn(2, 5, 4))
    assert out.losses["entropy"] == 0 and out.losses["codebook_entropy"] == 0 and out.losses["per_sample_entropy"] == 0
    torch.testing.assert_close(
        out.loss,
        module.weights["commitment"] * out.losses["commitment"]
        + module.weights.get("codebook", 0) * out.losses["codebook"],
    )


def test_2_18_codes_stay_within_the_chunk_bound(monkeypatch):
    """Open-MAGVIT2's 2^18 codes: the exact codebook entropy never holds more than
    `chunk_elements` (rows x codes) probabilities at once, forward or backward."""
    seen = []
    original = entropy_module._bit_code_chunk

    def spy(a, base, weight, start, stop):
        seen.append(a.shape[0] * a.shape[1] * (stop - start))
        return original(a, base, weight, start, stop)

    monkeypatch.setattr(entropy_module, "_bit_code_chunk", spy)
    module = LFQ(18, 2**18, chunk_elements=2**18).train()
    z = randn(2, 16, 18, scale=0.1).requires_grad_(True)
    out = module(z)
    out.loss.backward()
    assert max(seen) <= 2**18 and len(seen) == 2 * (2**18 * 32 // 2**18)  # every chunk again in the backward
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # a mixture of 32 distributions: H(mean) <= mean H + log 32, and >= mean H
    per_sample, codebook = out.losses["per_sample_entropy"], out.losses["codebook_entropy"]
    assert per_sample - 1e-4 <= codebook <= per_sample + math.log(32) + 1e-4


# -- IBQ ---------------------------------------------------------------------------------
def naive_ibq(module: IBQ, z: torch.Tensor):
    """The paper's estimator, written out with the full (rows x codes) softmax."""
    h = module.project_in(z.reshape(-1, module.dim))
    logits = h @ module.embed.T
    soft = logits.softmax(-1)
    hard = F.one_hot(logits.argmax(-1), module.num_codes).float()
    q = (hard - soft.detach() + soft) @ module.embed
    codebook = (q - h.detach()).pow(2).mean()
    commitment = (h - (hard @ module.embed).detach()).pow(2).mean()
    tempered = (logits * module.inv_temperature).softmax(-1)
    per_sample, batch = exact_entropy(tempered).mean(), exact_entropy(tempered.mean(0))
    loss = (
        module.weights["codebook"] * codebook
        + module.weights["commitment"] * commitment
        + module.weights["entropy"] * (per_sample - batch)
    )
    return module.project_out(q), logits.argmax(-1), loss, per_sample, batch


@pytest.mark.parametrize("chunk_elements", [1, 29, 2**22])
@pytest.mark.parametrize("codebook_dim, entropy_weight", [(None, 0.0), (3, 0.1)])
def test_ibq_equals_the_full_softmax_estimator(chunk_elements, codebook_dim, entropy_weight):
    torch.manual_seed(0)
    module = IBQ(
        6,
        24,
        codebook_dim=codebook_dim,
        entropy_weight=entropy_weight,
        inv_temperature=5.0,
        chunk_elements=chunk_elements,
    ).train()
    with torch.no_grad():
        module.embed.normal_()  # spread codes: a non-trivial softmax
    z = randn(4, 5, 6)
    probe = randn(4, 5, 6, seed=2)
    params = [module.embed, *module.project_in.parameters()]
    zs = [z.clone().requires_grad_(True) for _ in range(2)]
    out = module(zs[0])
    q, indices, loss, per_sample, batch = naive_ibq(module, zs[1])
    assert torch.equal(out.indices.reshape(-1), indices)
    assert torch.equal(out.quantized, module.indices_to_codes(out.indices))  # the value is exactly the code
    torch.testing.assert_close(out.quantized.reshape(-1, 6), q)
    torch.testing.assert_close(out.loss, loss)
    if entropy_weight:
        torch.testing.assert_close(out.losses["per_sample_entropy"], per_sample)
        torch.testing.assert_close(out.losses["codebook_entropy"], batch)
    ours = torch.autograd.grad(out.loss + (out.quantized * probe).sum(), [zs[0], *params])
    theirs = torch.autograd.grad(loss + (q.reshape(4, 5, 6) * probe).sum(), [zs[1], *params])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ibq_every_code_gets_a_gradient():
    torch.manual_seed(0)
    module = IBQ(4, 64).train()
    out = module(randn(2, 3, 4))  # 6 rows: at most 6 of the 64 codes chosen
    (out.quantized * randn(2, 3, 4, seed=3)).sum().backward()
    assert out.indices.unique().numel() <= 6
    assert (module.embed.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("chunk_elements", [1, 10, 2**22])
def test_ibq_picks_the_largest_logit_first_among_ties(chunk_elements):
    torch.manual_seed(0)
    module = IBQ(4, 12, chunk_elements=chunk_elements).eval()
    with torch.no_grad():
        module.embed.normal_()
        module.embed[9] = module.embed[2]  # an exact tie: code 2 wins
    z = randn(30, 4)
    expected = (z @ module.embed.detach().T).argmax(-1)
    assert torch.equal(module(z).indices, expected)
    assert not (module(z).indices == 9).any()


# -- configuration -------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: LFQ(4, 1000), "codebook_size"),
        (lambda: LFQ(4, 1), "codebook_size"),
        (lambda: LFQ(4, 16.0), "codebook_size"),
        (lambda: LFQ(4, 16, num_codebooks=0), "num_codebooks"),
        (lambda: LFQ(4, 16, scale=0.0), "scale"),
        (lambda: LFQ(4, 16, entropy_weight=-1.0), "entropy_weight"),
        (lambda: LFQ(4, 16, commitment_weight=float("nan")), "commitment_weight"),
        (lambda: LFQ(4, 16, diversity_gamma=-0.5), "diversity_gamma"),
        (lambda: LFQ(4, 16, inv_temperature=0.0), "inv_temperature"),
        (lambda: LFQ(4, 16, codebook_entropy="approximate"), "codebook_entropy"),
        (lambda: LFQ(4, 2**26), "codebook_entropy"),
        (lambda: LFQ(4, 16, chunk_elements=0), "chunk_elements"),
        (lambda: LFQ(0, 16), "dim"),
        (lambda: BSQ(4, 12), "codebook_size"),
        (lambda: BSQ(4, 16, scale=-1.0), "scale"),
        (lambda: ResidualLFQ(4, codebook_size=12), "codebook_size"),
        (lambda: ResidualLFQ(4, num_levels=0), "num_levels"),
        (lambda: ResidualLFQ(4, codebook_size=16, inv_temperature=-1.0), "inv_temperature"),
        (lambda: IBQ(4, 0), "codebook_size"),
        (lambda: IBQ(4, 16, codebook_dim=0), "codebook_dim"),
        (lambda: IBQ(4, 16, commitment_weight=-1.0), "commitment_weight"),
        (lambda: IBQ(4, 16, codebook_weight=-1.0), "codebook_weight"),
        (lambda: IBQ(4, 16, entropy_weight=-1.0), "entropy_weight"),
        (lambda: IBQ(4, 16, diversity_gamma=float("inf")), "diversity_gamma"),
        (lambda: IBQ(4, 16, inv_temperature=0.0), "inv_temperature"),
        (lambda: IBQ(4, 16, chunk_elements=0), "chunk_elements"),
    ],
)
def test_bad_config_raises_naming_the_key(build, key):
    with pytest.raises(ValueError, match=key):
        build()


def test_factorized_entropy_allows_large_codebooks():
    module = BSQ(4, 2**30, codebook_entropy="factorized").train()  # 2^30 codes: only the factorised entropy is feasible
    out = module(randn(2, 3, 4))
    assert out.indices.max() < 2**30 and torch.isfinite(out.loss)
