"""`model.compile=true` compiles the nets and each codebook's statistics update (EMA, usage,
dead-code restarts: docs/gpu.md), which on a GPU is then a few fused kernels instead of
dozens of launches. It traces to one graph for every codebook of a quantizer (no graph
break, no recompilation from step to step); traced, it computes exactly what eager code
does; and Inductor's kernels (C++ here, Triton where a GPU is) compute it up to float
rounding. The masked audio nets compile once for clips of every length."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import vqtrain.quantizers.vq as vq
from quantizer_cases import CONTRACT, select
from vqtrain.nets import ConvDecoder1d, ConvEncoder1d
from vqtrain.quantizers import Quantizer, VectorQuantizer


def has_codebooks(name: str) -> bool:
    return any(isinstance(m, VectorQuantizer) for m in select(CONTRACT)[name]().modules())


WITH_CODEBOOKS = [name for name in select(CONTRACT) if has_codebooks(name)]
# each kind of bookkeeping: EMA, gradient, groups, cosine, restarts, k-means, SimVQ, levels with dropout
INDUCTOR_CASES = [
    "vq_ema",
    "vq_groups_codebook_dim_gradient",
    "vq_cosine_rotation",
    "vq_codebook_dim_kmeans_dead",
    "vq_dead_code_gradient_cosine",
    "simvq_groups_cosine_ste",
    "rvq_dropout_batch_kmeans_dead",
    "rsimvq_dropout",
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every case compiles anew (Dynamo's cache would otherwise carry graphs between cases)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def traced(monkeypatch: pytest.MonkeyPatch) -> CompileCounterWithBackend:
    """The statistics update traced whole (fullgraph: a graph break fails), then run by eager
    kernels: the same bits as eager code, if the trace is right."""
    counter = CompileCounterWithBackend("aot_eager")
    update = torch.compile(VectorQuantizer._update_statistics, backend=counter, fullgraph=True)
    monkeypatch.setattr(vq, "compiled_update_statistics", lambda: update)
    return counter


def eager_and_compiled(name: str, device: str = "cpu") -> tuple[Quantizer, Quantizer]:
    torch.manual_seed(0)
    eager = select(CONTRACT)[name]().train().to(device)
    compiled = copy.deepcopy(eager)
    compiled.compile_bookkeeping()
    return eager, compiled


def training_steps(quantizer: Quantizer, steps: int, device: str = "cpu") -> list:
    """Forward and backward with padding, each step seeing the updates of the one before
    (k-means init, EMA, restarts); the generators seeded alike for every quantizer."""
    torch.manual_seed(1)
    x = torch.randn(3, 40, quantizer.dim).to(device)
    mask = (torch.arange(40) < torch.tensor([[40], [25], [7]])).to(device)
    results = []
    for step in range(steps):
        torch.manual_seed(10 + step)  # every device's generator
        inputs = (x + 0.1 * step).requires_grad_(True)
        out = quantizer(inputs, mask)
        (out.quantized.square().sum() + out.loss).backward()
        results.append((out.indices, out.quantized, out.loss, inputs.grad))
    return results


def test_compile_bookkeeping_marks_every_level():
    quantizer = select(CONTRACT)["rvq"]()
    quantizer.compile_bookkeeping()
    assert all(level.compiled_bookkeeping for level in quantizer.levels)


@pytest.mark.parametrize("name", WITH_CODEBOOKS)
def test_traced_bookkeeping_is_one_graph_and_exactly_the_eager_one(name: str, monkeypatch: pytest.MonkeyPatch):
    counter = traced(monkeypatch)
    eager, compiled = eager_and_compiled(name)
    for a, b in zip(training_steps(eager, 3), training_steps(compiled, 3), strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    for key, value in eager.state_dict().items():
        assert torch.equal(compiled.state_dict()[key], value), key
    assert counter.frame_count == 1  # one graph: every codebook (levels too) and every step


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow),
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
@pytest.mark.parametrize("name", INDUCTOR_CASES)
def test_inductor_bookkeeping_equals_the_eager_one(name: str, device: str):
    """As model.compile=true compiles it (C++ kernels on a CPU, Triton on a GPU): fused
    kernels reorder float sums, so the same codes and the rest up to rounding; restarts
    take the same random draws."""
    eager, compiled = eager_and_compiled(name, device)
    steps = zip(training_steps(eager, 3, device), training_steps(compiled, 3, device), strict=True)
    for (indices_a, *floats_a), (indices_b, *floats_b) in steps:
        assert torch.equal(indices_b, indices_a)
        torch.testing.assert_close(floats_b, floats_a, rtol=1e-4, atol=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert counters["stats"]["unique_graphs"] == 1  # it ran compiled, one graph for all


def test_audio_nets_compile_once_for_clips_of_every_length():
    """A new clip length recompiles a net once, into a graph for any length (Dynamo's
    automatic dynamic shapes), not once per length: after Dynamo's limit of 8 the nets
    would run eagerly. Traced, they compute what eager code does."""
    torch.manual_seed(0)
    encoder, decoder = ConvEncoder1d(1, 16, hidden_channels=4), ConvDecoder1d(16, 1, hidden_channels=4)
    counter = CompileCounterWithBackend("eager")
    compiled_encoder, compiled_decoder = (torch.compile(net, backend=counter) for net in (encoder, decoder))
    for length in (403, 517, 290, 1000, 64, 777, 96):
        x, lengths = torch.randn(2, 1, length), torch.tensor([length, length // 3])
        z = encoder(x, lengths)
        assert torch.equal(compiled_encoder(x, lengths), z)
        assert torch.equal(compiled_decoder(z, lengths, length), decoder(z, lengths, length))
    # each net: a graph for its first length, one for every other; the decoder a third for
    # lengths its strides (32) divide, where cutting the output to `size` cuts nothing
    assert counter.frame_count == 5
