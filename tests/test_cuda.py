"""On a CUDA device, what the CPU tests can only infer (skipped without one):
ordinary training steps make no host-device sync that CUDA itself reports, and
each quantizer computes on the GPU what it computes on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_host_syncs import watched_syncs

from quantizer_cases import CONTRACT, select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("quantizer", ["vq_tricks", "rvq", "simvq", "fsq", "lfq", "ibq"])
@pytest.mark.parametrize("model", ["image", "audio"])
def test_training_steps_make_no_cuda_sync(model: str, quantizer: str, precision: str, tmp_path: Path):
    """torch.cuda.set_sync_debug_mode's own count, with the line of each sync."""
    record = watched_syncs(model, quantizer, tmp_path, "trainer.accelerator=gpu", f"trainer.precision={precision}")
    assert record["batches"] >= 2
    assert record["cuda_syncs"] == 0, "\n".join(record["cuda_sync_messages"])


@pytest.mark.parametrize("name", [name for name in select(CONTRACT) if "dead" not in name])
def test_a_quantizer_step_on_the_gpu_equals_the_cpus(name: str):
    """Same codes, outputs, losses and updated buffers in training forwards with
    padding (full float32 matmuls: TF32 off, as by default). K-means draws from a
    CPU generator seeded by the global one, so it is device-independent; dead-code
    restarts draw from the device's own generator and are left out."""
    factory = select(CONTRACT)[name]
    torch.manual_seed(0)
    cpu = factory().train()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(3, 40, cpu.dim)
    mask = torch.arange(40) < torch.tensor([[40], [25], [7]])
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        torch.manual_seed(1)
        for _ in range(2):  # a second step sees the first one's updates (EMA, usage, k-means init)
            out = module(x.to(device), mask.to(device))
        results.append((out, {k: v.cpu() for k, v in module.state_dict().items()}))
    (a, state_a), (b, state_b) = results
    assert torch.equal(a.indices, b.indices.cpu())
    torch.testing.assert_close(b.quantized.cpu(), a.quantized, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.loss.cpu(), a.loss, rtol=1e-4, atol=1e-6)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-4, atol=1e-5, msg=key)
