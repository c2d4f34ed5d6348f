"""Agreement with the reference implementation, vector-quantize-pytorch 1.32.0
(installed with the `bench` extra; these tests skip without it)."""

from __future__ import annotations

import pytest
import torch

from vqtrain.quantizers import FSQ, ResidualFSQ, VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


def randn(*shape, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(
    "levels, num_codebooks, symmetric",
    [
        ([8, 5, 5, 5], 1, False),
        ([7, 5, 5, 5, 5], 1, False),
        ([8, 6, 5], 1, False),
        ([4, 3], 2, False),
        ([8, 5, 5, 5], 1, True),
        ([4, 3, 2], 1, True),
    ],
)
def test_fsq_matches_reference(levels, num_codebooks, symmetric):
    """The standard grid, and the symmetric one against the reference's preserve_symmetry."""
    dim = len(levels) * num_codebooks  # no projection on either side
    ours = FSQ(dim, levels=levels, num_codebooks=num_codebooks, symmetric=symmetric).eval()
    theirs = vqp.FSQ(levels=levels, num_codebooks=num_codebooks, preserve_symmetry=symmetric).eval()
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


# -- LFQ and BSQ against vector-quantize-pytorch's LFQ (spherical=True for BSQ) ------------
def reference_lfq(ours, spherical: bool):
    """vector-quantize-pytorch's LFQ with our projection weights copied across."""
    theirs = vqp.LFQ(
        dim=ours.dim,
        codebook_size=ours.num_codes,
        num_codebooks=ours.num_codebooks,
        entropy_loss_weight=ours.weights["entropy"],
        commitment_loss_weight=ours.weights["commitment"],
        diversity_gamma=ours.diversity_gamma,
        codebook_scale=ours.scale,
        spherical=spherical,
    )
    assert isinstance(theirs.project_in, torch.nn.Identity) == isinstance(ours.project_in, torch.nn.Identity)
    if not isinstance(ours.project_in, torch.nn.Identity):
        theirs.project_in.load_state_dict(ours.project_in.state_dict())
        theirs.project_out.load_state_dict(ours.project_out.state_dict())
    return theirs


LFQ_CASES = {
    "lfq_1024": {"dim": 10, "codebook_size": 1024},
    "lfq_projection": {"dim": 64, "codebook_size": 1024},
    "lfq_two_codebooks_projection": {
        "dim": 12,
        "codebook_size": 32,
        "num_codebooks": 2,
        "diversity_gamma": 0.5,
        "scale": 0.5,
    },
    "bsq_1024": {"dim": 10, "codebook_size": 1024, "spherical": True},
    "bsq_projection_two_codebooks": {"dim": 12, "codebook_size": 64, "num_codebooks": 2, "spherical": True},
}


@pytest.mark.parametrize("name", LFQ_CASES)
@pytest.mark.parametrize("inv_temperature", [0.3, 1.0])
def test_lfq_and_bsq_match_reference(name, inv_temperature):
    """Values, indices and codes; in training, the entropy terms, commitment and total loss.

    The definitions match where no probability falls below 1e-5: the reference clamps
    probabilities at 1e-5 inside the log, we take 0 log 0 = 0 (see the next test)."""
    from vqtrain.quantizers import BSQ, LFQ

    case = dict(LFQ_CASES[name])
    spherical = case.pop("spherical", False)
    torch.manual_seed(0)
    build = BSQ if spherical else LFQ
    ours = build(
        **case,
        inv_temperature=inv_temperature,
        commitment_weight=0.25,
        **({"codebook_entropy": "exact"} if spherical else {}),
    )
    theirs = reference_lfq(ours, spherical)
    z = randn(3, 40, case["dim"], scale=0.2)
    for training in (False, True):
        ours.train(training), theirs.train(training)
        out = ours(z)
        (quantized, indices, aux), breakdown = theirs(z, inv_temperature=inv_temperature, return_loss_breakdown=True)
        assert torch.equal(out.indices, indices.long())
        torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            ours.indices_to_codes(out.indices), theirs.indices_to_codes(indices), rtol=0, atol=1e-6
        )
        if training:
            torch.testing.assert_close(
                out.losses["per_sample_entropy"], breakdown.per_sample_entropy, rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(out.losses["codebook_entropy"], breakdown.batch_entropy, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.losses["commitment"], breakdown.commitment, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(
                out.loss, aux, rtol=1e-5, atol=1e-5
            )  # a difference of two entropies: absolute error


def test_lfq_entropy_differs_from_reference_only_by_its_log_clamp():
    """At the reference's default inv_temperature=100 most probabilities are < 1e-5:
    its entropy then uses log(max(p, 1e-5)). Our exact entropy, with that same clamp
    put back in a brute-force computation, gives the reference's numbers."""
    from vqtrain.quantizers import LFQ

    ours = LFQ(10, 1024, inv_temperature=100.0).train()
    theirs = reference_lfq(ours, spherical=False).train()
    z = randn(2, 30, 10, scale=0.05)
    out = ours(z)
    _, breakdown = theirs(z, inv_temperature=100.0, return_loss_breakdown=True)
    codes = theirs.codebook  # (1024, 10) in the reference's index order
    p = (2 * 100.0 * z.reshape(-1, 10) @ codes.T).softmax(-1)

    def clamped(q):
        return -(q * q.clamp(min=1e-5).log()).sum(-1)

    def exact(q):
        return -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(-1)

    torch.testing.assert_close(breakdown.per_sample_entropy, clamped(p).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(breakdown.batch_entropy, clamped(p.mean(0)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["per_sample_entropy"], exact(p).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.losses["codebook_entropy"], exact(p.mean(0)), rtol=1e-5, atol=1e-5)
    assert out.losses["per_sample_entropy"] > breakdown.per_sample_entropy  # -p log p > -p log 1e-5 for p < 1e-5


@pytest.mark.parametrize("spherical", [False, True])
def test_lfq_gradients_match_reference(spherical):
    """The gradient of the whole loss (entropy terms + commitment) plus a probe of the
    output, to the input and the projections, at a temperature where the definitions match."""
    from vqtrain.quantizers import BSQ, LFQ

    torch.manual_seed(0)
    build = BSQ if spherical else LFQ
    ours = build(12, 64, inv_temperature=0.5, **({"codebook_entropy": "exact"} if spherical else {})).train()
    theirs = reference_lfq(ours, spherical).train()
    z = randn(2, 25, 12, scale=0.3)
    probe = randn(2, 25, 12, seed=4)
    grads = []
    for module in (ours, theirs):
        x = z.clone().requires_grad_(True)
        if module is ours:
            out = ours(x)
            quantized, loss = out.quantized, out.loss
        else:
            quantized, _, loss = theirs(x, inv_temperature=0.5)
        grads.append(
            torch.autograd.grad(
                loss + (quantized * probe).sum(), [x, *module.project_in.parameters(), *module.project_out.parameters()]
            )
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
