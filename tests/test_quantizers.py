"""The quantizers against their contract (see `vqtrain/quantizers/base.py`).

The parametrized tests run every configuration of `quantizer_cases.py` tagged
`contract`. Everything is small (dim 8, 16 codes), so the file runs in seconds
on CPU.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from quantizer_cases import CODES, CONTRACT, DIM, select, vq
from vqtrain.quantizers import FSQ, ResidualFSQ, ResidualQuantizer, SimVQ, VectorQuantizer
from vqtrain.quantizers.base import commitment_and_codebook, mse
from vqtrain.quantizers.fsq import fsq_levels
from vqtrain.quantizers.search import chunk_elements_for, kmeans, nearest_codes
from vqtrain.utils import lengths_to_mask

QUANTIZER_FACTORIES = select(CONTRACT)
RESIDUAL = [name for name in QUANTIZER_FACTORIES if name.startswith("r")]
FSQS = [name for name in QUANTIZER_FACTORIES if name.startswith("fsq")]
GRADIENT_LEARNED = [
    "vq_gradient",
    "vq_cosine_gradient",
    "vq_groups_codebook_dim_gradient",
    "vq_rotation",
    "simvq",
    "simvq_groups_cosine_ste",
]
EMA_LEARNED = ["vq_ema", "vq_cosine", "vq_codebook_dim", "vq_groups", "vq_kmeans", "vq_dead_code"]


# -- helpers -------------------------------------------------------------------
def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return QUANTIZER_FACTORIES[name]()


def randn(*shape, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def padded_batch(dim: int, lengths, seed: int = 1):
    """(B, T, dim) input and its (B, T) mask for sequences of the given lengths."""
    z = randn(len(lengths), max(lengths), dim, seed=seed)
    return z, lengths_to_mask(torch.tensor(lengths), max(lengths))


def with_garbage(z: torch.Tensor, mask: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Large finite values where the mask is False."""
    garbage = 1e4 + 1e5 * randn(*z.shape, seed=seed)
    return torch.where(mask[..., None], z, garbage)


def brute_force_nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(G, N, d), (G, K, d) -> (G, N): argmin over all codes of the euclidean distance."""
    return torch.cdist(x.double(), codebook.double()).argmin(-1)


def snapshot(module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied."""
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"buffer:{n}": b.clone() for n, b in module.named_buffers()})
    return state


def assert_states_equal(a: dict, b: dict, skip=()) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key not in skip:
            assert torch.equal(a[key], b[key]), f"{key} differs"


def training_step(module, z, mask, seed):
    """One training forward + backward of loss + a fixed linear probe of `quantized`."""
    z = z.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = module(z, mask)
    probe = randn(*z.shape, seed=99)
    (out.loss + (out.quantized * probe).sum()).backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, z.grad, grads, snapshot(module)


def trained(name: str, steps: int = 1):
    """A module after a few training steps (k-means done, EMA moved), in eval mode."""
    module = make(name).train()
    for step in range(steps):
        z, mask = padded_batch(module.dim, [6, 3, 5], seed=100 + step)
        training_step(module, z, mask, seed=step)
    return module.eval()


def codebook_parameters(module) -> list[torch.Tensor]:
    if isinstance(module, SimVQ):
        return [module.transform] + ([module.basis] if module.learn_basis else [])
    return [module.embed]


# -- 1. nearest-neighbour search ---------------------------------------------------
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 23, 2**24])
def test_nearest_codes_equals_brute_force(cosine, chunk_elements):
    x, codebook = randn(3, 50, 5, seed=1), randn(3, 11, 5, seed=2)
    if cosine:
        x, codebook = F.normalize(x, dim=-1), F.normalize(codebook, dim=-1)
    found = nearest_codes(x, codebook, cosine=cosine, chunk_elements=chunk_elements)
    assert found.dtype == torch.long
    assert torch.equal(found, brute_force_nearest(x, codebook))


def test_search_chunks_are_sized_for_the_device(monkeypatch: pytest.MonkeyPatch):
    """Cache-sized on a CPU; on a GPU a sixteenth of its free memory, within [16 MiB, 1 GiB]:
    16,384 rows x 65,536 codes in four launches on a large GPU, not hundreds."""
    chunk_elements_for.cache_clear()
    assert chunk_elements_for(torch.device("cpu")) == 2**22
    for free, expected in [(140 * 2**30, 2**28), (8 * 2**30, 2**27), (2**20, 2**22)]:
        chunk_elements_for.cache_clear()
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert chunk_elements_for(torch.device("cuda")) == expected
    assert -(-16384 // (2**28 // 65536)) == 4
    chunk_elements_for.cache_clear()


def test_nearest_codes_of_no_rows():
    assert nearest_codes(torch.zeros(2, 0, 3), randn(2, 4, 3)).shape == (2, 0)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("codebook_dim", [None, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_vq_picks_the_nearest_code(distance, codebook_dim, groups):
    torch.manual_seed(0)
    module = VectorQuantizer(
        DIM, CODES, codebook_dim=codebook_dim, groups=groups, distance=distance, chunk_elements=5
    ).eval()
    z = randn(4, 9, DIM)
    indices = module(z).indices
    with torch.no_grad():
        h = module.project_in(z.reshape(-1, DIM)).reshape(-1, groups, module.code_dim).transpose(0, 1)
        codebook = module.embed
        if distance == "cosine":
            h, codebook = F.normalize(h, dim=-1), F.normalize(codebook, dim=-1)
    expected = brute_force_nearest(h, codebook).T.reshape(4, 9, groups)
    assert torch.equal(indices, expected.squeeze(-1) if groups == 1 else expected)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_simvq_picks_the_nearest_transformed_code(distance):
    torch.manual_seed(0)
    module = SimVQ(DIM, CODES, groups=2, distance=distance, chunk_elements=3).eval()
    z = randn(3, 7, DIM)
    with torch.no_grad():
        h = z.reshape(-1, 2, DIM // 2).transpose(0, 1)
        codebook = module.basis @ module.transform.transpose(1, 2)
        if distance == "cosine":
            h, codebook = F.normalize(h, dim=-1), F.normalize(codebook, dim=-1)
    expected = brute_force_nearest(h, codebook).T.reshape(3, 7, 2)
    assert torch.equal(module(z).indices, expected)


# -- 2. gradient routing -----------------------------------------------------------
@pytest.mark.parametrize("name", GRADIENT_LEARNED)
def test_gradient_learning_routes_each_loss(name):
    module = make(name).train()
    z, mask = padded_batch(DIM, [5, 8, 2])
    z.requires_grad_(True)
    out = module(z, mask)
    codebook = codebook_parameters(module)

    grad_z, *grad_codebook = torch.autograd.grad(
        out.losses["commitment"], [z, *codebook], allow_unused=True, retain_graph=True
    )
    assert grad_z[mask].abs().sum() > 0 and not grad_z[~mask].any()
    assert all(g is None or not g.any() for g in grad_codebook), "commitment loss must not move the codebook"

    grad_z, *grad_codebook = torch.autograd.grad(
        out.losses["codebook"], [z, *codebook], allow_unused=True, retain_graph=True
    )
    assert grad_z is None or not grad_z.any(), "codebook loss must not reach the encoder"
    assert all(g is not None and g.abs().sum() > 0 for g in grad_codebook)

    probe = randn(*z.shape, seed=5)
    grad_z, *grad_codebook = torch.autograd.grad((out.quantized * probe).sum(), [z, *codebook], allow_unused=True)
    assert grad_z[mask].abs().sum() > 0
    assert all(g is None or not g.any() for g in grad_codebook), "quantized must pass gradient to z only"

    expected = (
        module.weights["commitment"] * out.losses["commitment"] + module.weights["codebook"] * out.losses["codebook"]
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("name", EMA_LEARNED)
def test_ema_codebook_gets_no_gradient(name):
    module = make(name).train()
    assert not isinstance(module.embed, torch.nn.Parameter) and not module.embed.requires_grad
    z = randn(4, 8, DIM).requires_grad_(True)  # more rows than codes: k-means cannot put a code on each
    out = module(z)
    assert out.losses["codebook"] == 0
    out.loss.backward()
    assert z.grad.abs().sum() > 0  # the commitment term reaches the encoder
    assert all(n.startswith("project_") for n, p in module.named_parameters())


@pytest.mark.parametrize(
    "build",
    [vq(), vq(learning="gradient"), vq(groups=2), partial(SimVQ, DIM, CODES, estimator="ste")],
    ids=["ema", "gradient", "groups", "simvq"],
)
def test_straight_through_gradient_is_identity(build):
    torch.manual_seed(0)
    module = build().train()
    z, mask = padded_batch(DIM, [5, 8, 2])
    z.requires_grad_(True)
    probe = randn(*z.shape, seed=5)
    (module(z, mask).quantized * probe).sum().backward()
    assert torch.equal(z.grad, probe * mask[..., None])


@pytest.mark.parametrize("groups", [1, 3])
def test_commitment_and_codebook_terms_are_the_two_autograd_mses_to_the_bit(groups):
    """Computed once, each term's value and gradient are exactly those of its own
    `mse` under autograd: commitment to h only, codebook to q only; padding weighs 0."""
    h, q = randn(groups, 7, 4, seed=1), randn(groups, 7, 4, seed=2)
    weight = torch.tensor([1.0, 1, 0, 1, 0, 1, 1])
    grads = (torch.tensor(0.3), torch.tensor(1.7))

    def run(terms):
        a, b = h.clone().requires_grad_(True), q.clone().requires_grad_(True)
        values = terms(a, b)
        torch.autograd.backward(values, grads)
        return [*values, a.grad, b.grad]

    fused = run(lambda a, b: commitment_and_codebook(a, b, weight))
    plain = run(
        lambda a, b: (
            mse(a.transpose(0, 1), b.detach().transpose(0, 1), weight),
            mse(a.detach().transpose(0, 1), b.transpose(0, 1), weight),
        )
    )
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)
    assert fused[2][:, weight == 0].eq(0).all() and fused[3][:, weight == 0].eq(0).all()


@pytest.mark.parametrize("name", ["vq_rotation", "simvq"])
def test_rotation_trick_gradient(name):
    """d quantized / d z = (|q| / |z|) R with R the rotation taking z/|z| onto q/|q|."""
    module = make(name).train()
    z = randn(2, 6, DIM, scale=2.0).requires_grad_(True)
    out = module(z)
    probe = randn(*z.shape, seed=5)
    (out.quantized * probe).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert not torch.allclose(z.grad, probe)

    x, q, g = (t.detach().double().reshape(-1, DIM) for t in (z, out.quantized, probe))
    u, v = F.normalize(x, dim=-1), F.normalize(q, dim=-1)
    w = F.normalize(u + v, dim=-1)
    eye = torch.eye(DIM, dtype=torch.float64)
    rotation = eye - 2 * w[:, :, None] * w[:, None, :] + 2 * v[:, :, None] * u[:, None, :]
    assert torch.allclose(rotation @ u[:, :, None], v[:, :, None], atol=1e-6)  # R maps z's direction onto q's
    expected = (q.norm(dim=-1) / x.norm(dim=-1))[:, None] * (rotation.transpose(1, 2) @ g[:, :, None])[..., 0]
    torch.testing.assert_close(z.grad.double().reshape(-1, DIM), expected, rtol=1e-5, atol=1e-5)


def test_fsq_gradient_is_finite_and_reaches_input():
    module = make("fsq_projection").train()
    z = randn(2, 5, DIM, scale=3.0).requires_grad_(True)
    (module(z).quantized * randn(2, 5, DIM, seed=5)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# -- 3. EMA and frozen codes --------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_ema_update_matches_hand_computed_formula(groups):
    decay, epsilon, usage_decay, codes, dim = 0.8, 1e-2, 0.7, 5, 4
    torch.manual_seed(0)
    module = VectorQuantizer(dim, codes, groups=groups, decay=decay, epsilon=epsilon, usage_decay=usage_decay).train()
    code_dim = dim // groups
    embed = module.embed.double().clone()
    assert torch.equal(module.cluster_size, torch.ones(groups, codes))
    assert torch.equal(module.embed_sum, module.embed)
    cluster_size, embed_sum = torch.ones(groups, codes, dtype=torch.float64), embed.clone()
    usage = torch.zeros(groups, codes, dtype=torch.float64)  # the EMA of shares starts at zero, bias-corrected
    for step in range(3):
        z = randn(2, 10, dim, seed=step)
        h = z.reshape(-1, groups, code_dim).transpose(0, 1).double()
        onehot = F.one_hot(brute_force_nearest(h, module.embed), codes).double()  # (G, N, K)
        counts, sums = onehot.sum(1), onehot.transpose(1, 2) @ h
        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_sum = decay * embed_sum + (1 - decay) * sums
        total = cluster_size.sum(-1, keepdim=True)
        smoothed = (cluster_size + epsilon) / (total + codes * epsilon) * total
        embed = embed_sum / smoothed[..., None]
        usage = usage_decay * usage + (1 - usage_decay) * counts / counts.sum(-1, keepdim=True)

        module(z)
        close = partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6, check_dtype=False)
        close(module.cluster_size, cluster_size)
        close(module.embed_sum, embed_sum)
        close(module.embed, embed)
        close(module.usage, usage)
        close(module.usage_share(), usage / (1 - usage_decay ** (step + 1)))


@pytest.mark.parametrize("learning", ["ema", "gradient"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("how", ["frozen_codes", "set_update_weight", "deepcopy"])
def test_frozen_codes_stay_bitwise_unchanged(learning, distance, how):
    frozen, codes, dim = [0, 3], 6, 4
    torch.manual_seed(0)
    module = VectorQuantizer(
        dim, codes, learning=learning, distance=distance, frozen_codes=None if how == "set_update_weight" else frozen
    )
    if how == "set_update_weight":
        weight = torch.ones(codes)
        weight[frozen] = 0
        module.set_update_weight(weight)
    if how == "deepcopy":  # a copy (EMA of weights, checkpoint averaging, ...) must keep its codes frozen
        module = copy.deepcopy(module)
    module.train()
    before = module.embed.detach().clone()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05) if learning == "gradient" else None
    used = torch.zeros(codes, dtype=torch.bool)
    for step in range(4):  # data around every code, so every code is chosen (and would move if it could)
        z = (before[0][torch.arange(codes).repeat(4)] + 0.05 * randn(4 * codes, dim, seed=step))[None]
        out = module(z)
        used[out.indices.unique()] = True
        if optimizer:
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    assert used.all()
    after = module.embed.detach()
    assert torch.equal(after[:, frozen], before[:, frozen])
    for code in set(range(codes)) - set(frozen):
        assert not torch.equal(after[:, code], before[:, code]), f"code {code} should have moved"


def test_set_update_weight_rejects_values_outside_unit_interval():
    module = VectorQuantizer(4, 6)
    with pytest.raises(ValueError, match="update weights"):
        module.set_update_weight(torch.full((6,), 1.5))


# -- 4. padding is invisible ------------------------------------------------------
@pytest.mark.parametrize("layout", ["sequence", "image"])
@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_padding_garbage_changes_nothing(name, layout):
    module = make(name).train()
    if layout == "sequence":
        z, mask = padded_batch(module.dim, [7, 4, 1, 6])
    else:  # (B, H, W, D) with holes anywhere
        z = randn(2, 4, 3, module.dim)
        mask = randn(2, 4, 3, seed=3) > 0
    clean_module, dirty_module = copy.deepcopy(module), copy.deepcopy(module)
    clean, dirty = z.masked_fill(~mask[..., None], 0.0), with_garbage(z, mask)
    for step in range(3):
        out_a, grad_a, params_a, state_a = training_step(clean_module, clean, mask, seed=step)
        out_b, grad_b, params_b, state_b = training_step(dirty_module, dirty, mask, seed=step)
        assert torch.equal(out_a.quantized, out_b.quantized)
        assert torch.equal(out_a.indices, out_b.indices)
        assert out_a.losses.keys() == out_b.losses.keys() and {"commitment", "codebook"} <= out_a.losses.keys()
        for key in out_a.losses:
            assert torch.equal(out_a.losses[key], out_b.losses[key]), key
        assert torch.equal(out_a.loss, out_b.loss)
        assert torch.equal(grad_a, grad_b)
        for key in params_a:
            assert (params_a[key] is None) == (params_b[key] is None), key
            assert params_a[key] is None or torch.equal(params_a[key], params_b[key]), key
        assert_states_equal(state_a, state_b)
        # and padding itself is inert
        assert not out_b.quantized[~mask].any()
        assert (out_b.indices[~mask] == -1).all()
        assert not grad_b[~mask].any()
        assert torch.isfinite(grad_b).all() and torch.isfinite(out_b.quantized).all()


# -- 5. masked losses equal unpadded ones ----------------------------------------
@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_masked_losses_equal_length_weighted_unpadded(name):
    module = trained(name)
    lengths = [5, 9, 2]
    z, mask = padded_batch(module.dim, lengths, seed=3)
    out = module(with_garbage(z, mask), mask)
    alone = [module(z[i : i + 1, :n]) for i, n in enumerate(lengths)]
    for key in out.losses:
        expected = sum(n * o.losses[key] for n, o in zip(lengths, alone)) / sum(lengths)
        torch.testing.assert_close(out.losses[key], expected, msg=key)
    torch.testing.assert_close(out.loss, sum(n * o.loss for n, o in zip(lengths, alone)) / sum(lengths))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out.quantized[i, :n], alone[i].quantized[0])
        assert torch.equal(out.indices[i, :n], alone[i].indices[0])
    if not name.startswith(("fsq", "rfsq")):
        assert out.loss > 0  # a vacuous zero would pass the comparison


# -- 6. indices <-> codes -----------------------------------------------------------
@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_indices_to_codes_reproduces_quantized(name, grad_enabled):
    module = trained(name)
    z, mask = padded_batch(module.dim, [6, 2, 4], seed=4)
    with torch.set_grad_enabled(grad_enabled):
        out = module(z, mask)
        codes = module.indices_to_codes(out.indices)
    assert codes.dtype == torch.float32
    assert torch.equal(codes, out.quantized)
    assert out.indices.dtype == torch.long
    expected_shape = mask.shape if module.num_index_columns == 1 else (*mask.shape, module.num_index_columns)
    assert out.indices.shape == expected_shape


@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_indices_to_codes_padding_and_range(name):
    module = make(name).eval()
    shape = (2, 3) if module.num_index_columns == 1 else (2, 3, module.num_index_columns)
    assert torch.equal(module.indices_to_codes(torch.full(shape, -1)), torch.zeros(2, 3, module.dim))
    too_big = torch.zeros(shape, dtype=torch.long)
    too_big[0, 1] = module.codebook_sizes[0]
    with pytest.raises(IndexError):
        module.indices_to_codes(too_big)
    with pytest.raises(IndexError):
        module.indices_to_codes(torch.full(shape, -2))


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_prefix_decoding_sums_the_first_levels(name):
    module = trained(name)
    z = randn(2, 5, DIM, seed=8)
    out = module(z)
    assert not (out.indices == -1).any()  # eval: no dropout
    contributions, rest = [], module.first_residual(z)
    for number, level in enumerate(module.levels):  # each level run alone on what the previous left over
        level_out = level(rest)
        assert torch.equal(level_out.indices, out.indices[..., number])
        contributions.append(level_out.quantized)
        rest = rest - level_out.quantized
    for k in range(1, module.num_levels + 1):
        expected = module.project_out(sum(contributions[:k]))
        torch.testing.assert_close(module.indices_to_codes(out.indices, num_levels=k), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(module.indices_to_codes(out.indices, num_levels=module.num_levels), out.quantized)
    if isinstance(module.project_in, torch.nn.Identity):
        assert torch.equal(
            module.indices_to_codes(out.indices, num_levels=1), module.levels[0](module.first_residual(z)).quantized
        )
    for bad in (0, module.num_levels + 1):
        with pytest.raises(ValueError, match="num_levels"):
            module.indices_to_codes(out.indices, num_levels=bad)


def test_single_level_residual_decodes_with_num_levels():
    torch.manual_seed(0)
    module = ResidualQuantizer(DIM, quantizer=partial(VectorQuantizer, codebook_size=CODES), num_levels=1).eval()
    out = module(randn(2, 5, DIM))
    assert out.indices.shape == (2, 5)
    assert torch.equal(module.indices_to_codes(out.indices, num_levels=1), out.quantized)


@pytest.mark.parametrize("levels", [[5, 4, 3, 3], [2, 3, 8], [7]])
def test_fsq_implicit_codebook_is_a_bijection(levels):
    fsq = FSQ(len(levels), levels=levels).eval()
    size = math.prod(levels)
    assert fsq.codebook_size == size
    every_index = torch.arange(size)
    codes = fsq.indices_to_codes(every_index)
    assert torch.unique(codes, dim=0).shape[0] == size
    assert codes.abs().max() <= 1
    # re-encode: invert the bound, so that each code's pre-image is quantized again
    lv = torch.tensor(levels, dtype=torch.float64)
    half_width = torch.div(lv, 2, rounding_mode="floor")
    half_l = (lv - 1) * (1 + fsq.eps) / 2
    offset = (lv % 2 == 0).double() * 0.5
    pre_image = torch.atanh((codes.double() * half_width + offset) / half_l) - torch.atanh(offset / half_l)
    out = fsq(pre_image.float()[None])
    assert torch.equal(out.indices[0], every_index)
    assert torch.equal(out.quantized[0], codes)


def test_fsq_rounds_to_exactly_levels_values_per_channel():
    levels = [5, 4, 3, 2]
    fsq = FSQ(4, levels=levels).eval()
    out = fsq(randn(1, 4000, 4, scale=4.0))
    for channel, level in enumerate(levels):
        assert out.quantized[0, :, channel].unique().numel() == level


@pytest.mark.parametrize(
    "level, symmetric, values",
    [
        # the FSQ paper's grid: -floor(L/2) .. ceil(L/2) - 1 over floor(L/2); even L is shifted, 0 included
        (4, False, [-1.0, -0.5, 0.0, 0.5]),
        (5, False, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        (2, False, [-1.0, 0.0]),
        # arXiv:2411.19842 Sec. 3.2: 2k / (L - 1) - 1, symmetric about 0 for every L
        (4, True, [-1.0, -1 / 3, 1 / 3, 1.0]),
        (5, True, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        (2, True, [-1.0, 1.0]),
        (8, True, [2 * k / 7 - 1 for k in range(8)]),
    ],
)
def test_fsq_grid_values(level, symmetric, values):
    fsq = FSQ(1, levels=[level], symmetric=symmetric).eval()
    codes = fsq.indices_to_codes(torch.arange(level))[:, 0]
    torch.testing.assert_close(codes, torch.tensor(values), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bound", ["tanh", "clamp"])
def test_symmetric_fsq_is_the_papers_formula(bound):
    """Q_L(x) = 2 / (L - 1) * floor((L - 1) (b(x) + 1) / 2 + 1/2) - 1, b = tanh or a clamp to [-1, 1]
    (arXiv:2411.19842 Sec. 3.2), index digit the floor, worked out here in float64."""
    levels = [8, 5, 4, 2]
    fsq = FSQ(4, levels=levels, symmetric=True, bound=bound).eval()
    z = randn(500, 4, scale=1.5)
    out = fsq(z)
    lv = torch.tensor(levels, dtype=torch.float64)
    b = torch.tanh(z.double()) if bound == "tanh" else z.double().clamp(-1, 1)
    digits = torch.floor((lv - 1) * (b + 1) / 2 + 0.5)
    torch.testing.assert_close(out.quantized.double(), 2 / (lv - 1) * digits - 1, rtol=0, atol=1e-6)
    basis = torch.tensor([1, 8, 40, 160])
    assert torch.equal(out.indices, (digits.long() * basis).sum(-1))


@pytest.mark.parametrize(
    "symmetric, rule", [(False, lambda size, level: (size - 1) ** -level), (True, lambda size, level: size**-level)]
)
def test_residual_fsq_level_scales(symmetric, rule):
    levels = [8, 5, 4]
    module = ResidualFSQ(DIM, levels=levels, num_levels=4, symmetric=symmetric)
    for level, fsq in enumerate(module.levels):
        expected = torch.tensor([rule(size, level) for size in levels], dtype=torch.float32)
        assert torch.equal(fsq._scale, expected)
        assert fsq.symmetric == symmetric and fsq.bound_mode == ("clamp" if symmetric else "tanh")


def test_symmetric_residual_fsq_levels_tile_each_others_cells():
    """On the symmetric grid the input is bounded to [-c, c], c = L / (L - 1), and level l's cells
    tile exactly the cell level l - 1 leaves: after k levels the error is at most half a cell of
    level k - 1, (1 / (L - 1)) L^-(k - 1), per channel. A coarser or finer scale breaks the bound."""
    levels = [8, 5, 4]
    module = ResidualFSQ(len(levels), levels=levels, num_levels=4, symmetric=True).eval()  # no projection
    lv = torch.tensor(levels, dtype=torch.float32)
    c = lv / (lv - 1)
    x = randn(20000, 3, scale=3.0)
    bounded = torch.tanh(x / c) * c
    torch.testing.assert_close(module.first_residual(x), bounded, rtol=0, atol=0)
    indices = module(x).indices
    for k in range(1, 5):
        error = (bounded - module.indices_to_codes(indices, num_levels=k)).abs()
        half_cell = lv.pow(-(k - 1)) / (lv - 1)
        assert bool((error <= half_cell * (1 + 1e-4) + 1e-6).all()), k
        assert bool((error.amax(0) > 0.9 * half_cell).all()), (
            k
        )  # and the bound is tight: every cell is used to its edge


# -- 7. k-means init and dead codes -----------------------------------------------
@pytest.mark.parametrize("name", ["vq_kmeans", "vq_kmeans_gradient_groups"])
def test_kmeans_init_only_in_a_training_forward(name, monkeypatch):
    import vqtrain.quantizers.vq as vq_module

    calls = []
    monkeypatch.setattr(vq_module, "kmeans", lambda *args, **kwargs: calls.append(1) or kmeans(*args, **kwargs))
    module = make(name)
    z, mask = padded_batch(DIM, [9, 4, 6])
    before = snapshot(module)
    module.eval()
    module(z, mask)
    module.train()
    with torch.no_grad():
        module(z, mask)
    module(z, torch.zeros_like(mask))  # nothing real to initialise from: wait for the next batch
    assert not module.initted and not calls
    assert_states_equal(before, snapshot(module))

    random_init = module.embed.detach().clone()
    for _ in range(3):
        module(z, mask)
    assert module.initted and len(calls) == 1, "k-means runs once, on the first training forward with real rows"
    assert not torch.equal(module.embed, random_init) and torch.isfinite(module.embed).all()
    # the codebook now fits the data better than the random one it replaced
    fresh = make(name).eval()
    fresh.initted.fill_(True)
    assert torch.equal(fresh.embed, random_init)
    assert module.eval()(z, mask).losses["commitment"] < fresh(z, mask).losses["commitment"]


def test_kmeans_init_with_fewer_vectors_than_codes():
    torch.manual_seed(0)
    module = VectorQuantizer(DIM, CODES, kmeans_init=True).train()
    z, mask = padded_batch(DIM, [3, 2])  # 5 real vectors, 16 codes
    module(z, mask)
    assert module.initted and torch.isfinite(module.embed).all()
    assert torch.isfinite(module.cluster_size).all() and (module.cluster_size > 0).all()
    # every code comes from the data: each is a mean of real vectors (or one of them)
    data = z[mask]
    distance_to_data = torch.cdist(module.embed[0], data).min(-1).values
    spread = torch.cdist(data, data).max()
    assert (distance_to_data < spread).all()
    module.eval()
    assert module(z, mask).losses["commitment"] < 1e-3  # so few points: each sits on a code


def test_kmeans_returns_a_fixed_point_of_lloyds_algorithm():
    centers = randn(1, 4, 3, scale=10.0)
    x = centers[:, torch.arange(4).repeat(25)] + 0.1 * randn(1, 100, 3, seed=2)
    centroids, counts = kmeans(
        x, randn(1, 4, 3, seed=3), iters=20, cosine=False, generator=torch.Generator().manual_seed(0)
    )
    assert counts.sum() == 100
    assign = brute_force_nearest(x, centroids)[0]
    for k in range(4):
        if counts[0, k] > 0:
            torch.testing.assert_close(centroids[0, k], x[0, assign == k].mean(0))


def assert_no_twin_codes(codebook: torch.Tensor) -> None:
    for group in codebook:
        assert group.unique(dim=0).shape[0] == group.shape[0], "two codes are identical"


@pytest.mark.parametrize("distinct", [3, 16, 40])
def test_kmeans_never_leaves_identical_codes(distinct):
    """Many copies of few latents (an image's flat background): every distinct latent
    becomes one code, surplus codes keep their (distinct) fallback values."""
    codes = 16
    latents = randn(1, distinct, 4, seed=1)
    x = latents[:, torch.arange(200) % distinct]
    fallback = randn(1, codes, 4, seed=2, scale=0.01)
    centroids, _ = kmeans(x, fallback, iters=5, cosine=False, generator=torch.Generator().manual_seed(0))
    assert_no_twin_codes(centroids)
    if distinct < codes:
        on_latent = (centroids[0, :, None] - latents[0][None]).norm(
            dim=-1
        ) < 1e-5  # a mean of copies is the copy, up to rounding
        assert torch.equal(on_latent.sum(0), torch.ones(distinct, dtype=torch.long)), (
            "every distinct latent has its own code"
        )
        assert torch.equal(centroids[0, ~on_latent.any(1)], fallback[0, distinct:]), (
            "the surplus codes are the fallback"
        )


def test_kmeans_init_from_a_batch_with_fewer_rows_than_codes_is_deterministic():
    """The same real rows give the same codebook whatever the batch layout (padding, order)."""
    rows = randn(1, 10, DIM, seed=4)
    a = make("vq_kmeans").train()
    a(rows)
    b = make("vq_kmeans").train()
    padded = torch.cat([rows.flip(1), torch.zeros(1, 5, DIM)], 1)
    b(padded, torch.arange(15)[None] < 10)
    assert torch.equal(a.embed, b.embed)
    assert_no_twin_codes(a.embed)


@pytest.mark.parametrize("rows", [1, 3, 17, 64])
@pytest.mark.parametrize("chunk_elements", [1, 50, 2**22])
def test_exact_ties_go_to_the_lowest_index_for_every_batch_shape(rows, chunk_elements):
    codebook = randn(1, 300, 8, seed=5)
    codebook[0, 250] = codebook[0, 7]
    codebook[0, 299] = codebook[0, 7]  # in another argmin block too
    x = codebook[:, [7] * rows] + 1e-3 * randn(1, rows, 8, seed=6)
    assert (nearest_codes(x, codebook, chunk_elements=chunk_elements) == 7).all()


def test_a_code_never_chosen_is_restarted_at_the_first_step():
    module = VectorQuantizer(4, 32, dead_code_threshold=0.1).train()
    data = randn(1, 64, 4, seed=1)
    used = module.eval()(data).indices.unique()
    module.train()(data)
    assert used.numel() < 32
    assert_no_twin_codes(module.embed)
    on_data = (module.embed[0, :, None] == data[0][None]).all(-1).any(-1)
    assert on_data.sum() == 32 - used.numel(), "every code unused at step 1 is restarted onto a latent of that step"


@pytest.mark.parametrize("usage_decay, threshold", [(0.8, 0.1), (0.5, 0.3), (0.9, 0.05)])
def test_a_code_unused_from_step_s_is_restarted_at_step_s_plus_n(usage_decay, threshold):
    """n = the first n with decay^n < threshold / (share K) for a code whose share was `share`
    (11 for the defaults and a code at the uniform share 1/K), whatever the batch size."""
    codes, dim = 4, 2
    # a codebook learned by gradient and no optimizer: a code moves only when it is restarted
    module = VectorQuantizer(
        dim, codes, learning="gradient", dead_code_threshold=threshold, usage_decay=usage_decay
    ).train()
    with torch.no_grad():
        module.embed.copy_(torch.tensor([[[10.0, 0], [0, 10], [-10, 0], [0, -10]]]))
    around = module.embed[0].detach().clone()
    for step in range(30):  # every code gets a quarter of the assignments: the uniform share
        module(around[torch.arange(8) % 4][None] + 0.1 * randn(1, 8, dim, seed=step))
    assert torch.equal(module.embed[0], around)
    expected = math.floor(math.log(threshold) / math.log(usage_decay)) + 1
    for step in range(1, expected + 1):  # from now on code 3 is never chosen
        batch = 4 * step  # the batch size changes nothing
        module(around[torch.arange(batch) % 3][None] + 0.1 * randn(1, batch, dim, seed=100 + step))
        restarted = not torch.equal(module.embed[0, 3], around[3])
        assert restarted == (step == expected), f"step {step}: restarted={restarted}, expected at step {expected}"
    assert_no_twin_codes(module.embed)


def test_restarts_never_make_twin_codes_from_repeated_latents():
    """A batch of few distinct latents, many copies each, and many dead codes: each
    restarted code sits on a different latent, and none on a latent a code already serves."""
    module = VectorQuantizer(4, 64, dead_code_threshold=0.5).train()
    latents = randn(1, 5, 4, seed=8, scale=5.0)
    for _ in range(3):
        module(latents[:, torch.arange(500) % 5])
        assert_no_twin_codes(module.embed)


def test_simvq_basis_is_the_papers_gaussian():
    """C ~ N(0, 1/d) entry-wise (SimVQ, arXiv:2411.02038, Sec. 3): checked by its moments,
    the kurtosis telling a Gaussian (3) from the uniform VQ init (1.8)."""
    dim = 64
    basis = SimVQ(dim, 4096).basis.double().flatten()
    assert abs(basis.mean()) < 3 * dim**-0.5 / basis.numel() ** 0.5
    assert basis.std().item() == pytest.approx(dim**-0.5, rel=0.01)
    kurtosis = ((basis - basis.mean()) ** 4).mean() / basis.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_fresh_simvq_assigns_quiet_and_loud_latents_by_direction(scale):
    """Fresh codes lie near the origin (W uniform in +-1/K: code entries of VQ's init scale),
    so the nearest code is the best-aligned one at any latent scale: 2,048 latents of norm
    ~0.08 (FSDD's quiet ones) or ~8 land on more than 1,000 distinct codes, and do not all
    pick the few shortest codes (nn.Linear's init, codes of norm ~0.6: 3 codes for the quiet ones)."""
    torch.manual_seed(0)
    module = SimVQ(64, 4096).eval()
    codes = (module.basis @ module.transform.transpose(1, 2))[0]
    assert codes.std().item() == pytest.approx(1 / (4096 * 3**0.5), rel=0.05)
    latents = randn(1, 2048, 64, seed=3, scale=scale)
    used = module(latents).indices.unique().numel()
    assert used > 1000, used


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_dead_codes_are_restarted_onto_data(learning):
    codes, dim = 8, 4
    torch.manual_seed(0)
    module = VectorQuantizer(
        dim, codes, learning=learning, dead_code_threshold=0.5, usage_decay=0.5, frozen_codes=[7]
    ).train()
    start = module.embed.detach().clone()
    # data concentrated on two clusters (near codes 0 and 1): the rest go unused
    near = start[0, torch.tensor([0, 1]).repeat(16)]

    def skewed(step):
        return (near + 0.01 * randn(32, dim, seed=step))[None]

    module.eval()
    assert module(skewed(0)).indices.unique().numel() <= 2
    module.train()
    restarted = torch.zeros(codes, dtype=torch.bool)
    for step in range(4):
        data = skewed(step)
        module(data)
        # a restarted code lands exactly on one of this step's vectors, with a fresh usage estimate
        on_data = (module.embed.detach()[0, :, None] == data[0][None]).all(-1).any(-1)
        assert torch.isclose(module.usage_share()[0, on_data], torch.tensor(1 / codes), rtol=1e-6, atol=0).all()
        restarted |= on_data
    assert restarted[2:7].all(), "every dead code gets restarted"
    assert torch.equal(module.embed.detach()[0, 7], start[0, 7]), "frozen codes are never restarted"
    module.eval()
    assert module(skewed(10)).indices.unique().numel() > 2


@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0])
def test_fresh_codebook_spreads_small_latents(scale):
    """Initial codes lie within 1/K of the origin, so latents larger than that pick
    codes by direction (a unit-Gaussian codebook sends latents of scale 0.01 to
    0.1 to a few codes of smallest norm)."""
    module = VectorQuantizer(DIM, 64).eval()
    latents = scale * randn(1, 4096, DIM)
    assert module(latents).indices.unique().numel() > 48


# -- 8. empty batches and residual dropout ---------------------------------------
@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_all_padding_batch(name):
    module = make(name).train()
    z = with_garbage(randn(2, 5, module.dim), torch.zeros(2, 5, dtype=torch.bool)).requires_grad_(True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    before = snapshot(module)
    out = module(z, mask)
    assert all(value == 0 for value in out.losses.values()) and out.loss == 0
    assert not out.quantized.any() and (out.indices == -1).all()
    (out.loss + out.quantized.sum()).backward()
    assert not z.grad.any()
    for n, p in module.named_parameters():
        assert p.grad is None or not p.grad.any(), n
    after = snapshot(module)
    # the dropout step counter still advances: ranks must agree on it whatever their data
    assert_states_equal(before, after, skip={"buffer:step"})
    if "buffer:step" in before:
        assert after["buffer:step"] == before["buffer:step"] + 1


def depths(indices: torch.Tensor) -> torch.Tensor:
    """Levels used per position (indices of dropped levels are -1)."""
    return (indices >= 0).sum(-1)


@pytest.mark.parametrize("name", ["rvq_dropout", "rsimvq_dropout", "rfsq_dropout", "rfsq_symmetric_dropout"])
def test_residual_dropout_per_sample(name):
    module = make(name).train()
    z = randn(32, 4, DIM)
    with torch.no_grad():  # dropout without updates, so decoding sees the same codebooks
        out = module(z)
    depth = depths(out.indices)
    assert (depth == depth[:, :1]).all(), "one depth per sample"
    assert depth[:, 0].unique().numel() > 1, "samples get different depths"
    assert (depth >= 1).all() and (depth < module.num_levels).any()
    assert torch.equal(out.indices >= 0, torch.arange(module.num_levels) < depth[..., None]), (
        "dropped levels are a suffix"
    )
    # dropped levels contribute nothing: the output is the decode of the kept ones
    assert torch.equal(out.quantized, module.indices_to_codes(out.indices))
    module.eval()
    assert (module(z).indices >= 0).all(), "no dropout in eval"


def test_residual_dropout_is_deterministic_given_seed_and_step():
    def indices_at(step, seed=0, global_seed=123):
        torch.manual_seed(0)
        module = ResidualFSQ(DIM, levels=[5, 5, 3], num_levels=4, dropout=0.5, seed=seed).train()
        module.step.fill_(step)
        torch.manual_seed(global_seed)  # the depth draw must not depend on the global RNG
        with torch.no_grad():
            return module(randn(16, 3, DIM)).indices

    assert torch.equal(indices_at(3), indices_at(3, global_seed=456))
    assert not torch.equal(depths(indices_at(3)), depths(indices_at(4)))
    assert not torch.equal(depths(indices_at(3)), depths(indices_at(3, seed=1)))


def test_residual_dropout_step_advances_only_when_updating():
    module = make("rfsq_dropout").train()
    z = randn(16, 3, DIM)
    first = module(z).indices
    assert module.step == 1
    second = module(z).indices
    assert module.step == 2 and not torch.equal(first, second)
    with torch.no_grad():
        module(z)
    module.eval()
    module(z)
    assert module.step == 2


def test_residual_dropout_batch_mode_uses_one_depth():
    module = make("rvq_dropout_batch_kmeans_dead").train()
    seen = set()
    for step in range(6):
        with torch.no_grad():
            module.step.fill_(step)
            depth = depths(module(randn(8, 3, DIM, seed=step)).indices)
        assert depth.unique().numel() == 1
        seen.add(int(depth[0, 0]))
    assert len(seen) > 1


# -- 10. mixed precision -----------------------------------------------------------
@pytest.mark.parametrize("name", QUANTIZER_FACTORIES)
def test_autocast_bf16(name):
    module = trained(name)
    z = randn(2, 5, module.dim, scale=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = module(z.bfloat16())
        out_fp32 = module(z)
    assert out_bf16.quantized.dtype == torch.bfloat16 and out_fp32.quantized.dtype == torch.float32
    for out in (out_bf16, out_fp32):
        assert torch.isfinite(out.quantized.float()).all() and torch.isfinite(out.loss)
        assert all(torch.isfinite(value) for value in out.losses.values())
    reference = module(z.bfloat16().float())  # the same input, float32 all the way
    assert torch.equal(out_bf16.indices, reference.indices)
    assert torch.equal(out_bf16.quantized, reference.quantized.bfloat16())


@pytest.mark.parametrize("name", FSQS)
def test_fsq_bf16_training_forward_matches_float32_indices(name):
    module = make(name).train()
    z = randn(3, 7, module.dim, scale=3.0).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(z)
    assert torch.equal(out.indices, module(z.float()).indices)


# -- 11. configuration and input validation ---------------------------------------
@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: FSQ(4, levels=[]), "levels"),
        (lambda: FSQ(4, levels=[5, 1]), "levels"),
        (lambda: FSQ(4, levels=[5, 2.5]), "levels"),
        (lambda: FSQ(4, levels=[5, 5], codebook_size=2**8), "levels"),
        (lambda: FSQ(4), "levels"),
        (lambda: FSQ(4, codebook_size=1000), "codebook_size"),
        (lambda: FSQ(4, levels=[5, 5], scale=0.0), "scale"),
        (lambda: FSQ(4, levels=[5, 5], num_codebooks=0), "num_codebooks"),
        (lambda: FSQ(4, levels=[5, 5], bound="sigmoid"), "bound"),
        (lambda: FSQ(4, levels=[5, 5], bound="clamp"), "bound"),
        (lambda: VectorQuantizer(DIM, 0), "codebook_size"),
        (lambda: VectorQuantizer(0, 4), "dim"),
        (lambda: VectorQuantizer(DIM, 4, decay=1.0), "decay"),
        (lambda: VectorQuantizer(DIM, 4, decay=0.0), "decay"),
        (lambda: VectorQuantizer(DIM, 4, usage_decay=1.5), "usage_decay"),
        (lambda: VectorQuantizer(DIM, 4, commitment_weight=-0.1), "commitment_weight"),
        (lambda: VectorQuantizer(DIM, 4, codebook_weight=float("nan")), "codebook_weight"),
        (lambda: VectorQuantizer(DIM, 4, groups=3), "groups"),
        (lambda: VectorQuantizer(DIM, 4, distance="manhattan"), "distance"),
        (lambda: VectorQuantizer(DIM, 4, learning="sgd"), "learning"),
        (lambda: VectorQuantizer(DIM, 4, estimator="gumbel"), "estimator"),
        (lambda: VectorQuantizer(DIM, 4, dead_code_threshold=1.0), "dead_code_threshold"),
        (lambda: VectorQuantizer(DIM, 4, frozen_codes=[4]), "frozen_codes"),
        (lambda: VectorQuantizer(DIM, 4, epsilon=0.0), "epsilon"),
        (lambda: SimVQ(DIM, 0), "codebook_size"),
        (lambda: SimVQ(DIM, 4, groups=3), r"divisible by groups \(3\)$"),  # no codebook_dim hint: SimVQ has none
        (lambda: ResidualFSQ(DIM, levels=[5, 5], dropout=1.5), "dropout"),
        (lambda: ResidualFSQ(DIM, levels=[5, 5], dropout=-0.1), "dropout"),
        (lambda: ResidualFSQ(DIM, levels=[5, 5], num_levels=2, dropout_min_levels=3), "dropout_min_levels"),
        (lambda: ResidualFSQ(DIM, levels=[5, 5], dropout_mode="level"), "dropout_mode"),
        (lambda: ResidualFSQ(DIM, levels=[5, 5], num_levels=0), "num_levels"),
        (lambda: ResidualQuantizer(DIM), "quantizer"),
        (lambda: ResidualQuantizer(DIM, quantizer=partial(VectorQuantizer, codebook_size=4, groups=2)), "groups"),
    ],
)
def test_bad_config_raises_naming_the_key(build, key):
    with pytest.raises(ValueError, match=key):
        build()


def test_simvq_refuses_to_freeze_single_codes():
    with pytest.raises(NotImplementedError, match="SimVQ"):
        SimVQ(DIM, 4).set_update_weight(torch.zeros(4))


def test_fsq_codebook_size_uses_recommended_levels():
    assert fsq_levels(None, 2**10) == [8, 5, 5, 5]
    assert FSQ(4, codebook_size=2**10).levels == [8, 5, 5, 5]  # 1000 codes: the paper's choice for ~2^10


@pytest.mark.parametrize("name", ["vq_groups", "fsq_two_codebooks", "rvq"])
def test_bad_inputs_raise_clear_errors(name):
    module = make(name)
    z = randn(2, 5, module.dim)
    with pytest.raises(ValueError, match="channel-last"):
        module(randn(2, 5, module.dim + 1))
    with pytest.raises(ValueError, match="channel-last"):
        module(randn(module.dim))
    with pytest.raises(ValueError, match="mask must be bool of shape"):
        module(z, torch.ones(2, 5))  # float, not bool
    with pytest.raises(ValueError, match="mask must be bool of shape"):
        module(z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating point"):
        module(z.long())
    if module.num_index_columns > 1:
        with pytest.raises(ValueError, match="last dimension"):
            module.indices_to_codes(torch.zeros(2, 5, module.num_index_columns + 1, dtype=torch.long))
