"""What the benchmarks share: machine facts, load, tables, JSON output, kernel launches."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
MIB = 2**20
REFERENCE = "vector-quantize-pytorch"
OURS = "vqtrain"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "mem_available_gib": round(mem_available() / GIB, 2),
        "load_avg_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from importlib.metadata import version

        import vector_quantize_pytorch  # noqa: F401

        info["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    except Exception:  # not installed: the comparison is skipped
        info["vector_quantize_pytorch"] = None
    return info


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (total physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt_s(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(count: float | None) -> str | None:
    if count is None:
        return None
    if count >= GIB:
        return f"{count / GIB:.2f} GiB"
    return f"{count / MIB:.0f} MiB" if count >= 10 * MIB else f"{count / MIB:.1f} MiB"


# aten ops that launch no kernel of their own: views, allocations, metadata, no-op conversions
NO_KERNEL = {
    *("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided"),
    *("aten::resize_", "aten::view", "aten::view_as", "aten::as_strided", "aten::as_strided_", "aten::reshape"),
    *("aten::_reshape_alias", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::t"),
    *("aten::transpose", "aten::numpy_T", "aten::mT", "aten::expand", "aten::expand_as", "aten::broadcast_tensors"),
    *("aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::narrow", "aten::permute"),
    *("aten::split", "aten::chunk", "aten::unbind", "aten::contiguous", "aten::to", "aten::resolve_conj"),
    *("aten::resolve_neg", "aten::result_type", "aten::set_"),
}


def count_launches(step: Callable[[], None], device: str) -> int | None:
    """Kernels one call of `step` launches, compiled code included (a dispatch mode, which counts
    aten ops, turns compilation off). CUDA: the kernels, copies and fills the profiler sees on
    the device (None if it sees none: no CUPTI). CPU, a stand-in: the aten ops that compute and
    call no other that does, plus Inductor's kernels (seen if compiled with
    `torch._inductor.config.cpp.enable_kernel_profile`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    if device == "cuda":
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events) or None
    inductor = sum(e.name.startswith("graph_") and "cpp_fused" in e.name for e in events)
    return inductor + sum(launches_itself(e) for e in events)


def launches_itself(event) -> bool:
    """An aten op that computes, none of whose callees does (they launch the kernels then)."""
    return (
        event.name.startswith("aten::") and event.name not in NO_KERNEL and not any(map(computes, event.cpu_children))
    )


def computes(event) -> bool:
    """An aten op that computes, itself or through its callees."""
    return event.name.startswith("aten::") and (event.name not in NO_KERNEL or any(map(computes, event.cpu_children)))
