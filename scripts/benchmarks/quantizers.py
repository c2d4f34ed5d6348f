"""quantizers: forward + backward (training mode, an upstream gradient on the
quantized output plus the quantizer's own loss) of each case, beside
vector-quantize-pytorch's equivalent. Each case runs in a fresh process:
median and min over repeats after warm-up, then the peak extra memory of one
more step (CPU: peak resident set size above the resident size before it,
glibc set to hand freed memory back; CUDA: max_memory_allocated above the
memory allocated before it). A child's address space is capped
(`--mem-cap-gb`); a case whose need, extrapolated linearly in the codebook
size from a smaller case of the same kind, exceeds the cap is skipped, and
one that hits the cap reports OOM. The matmul ceiling is
the rate of the distance matmul alone (tokens x dim @ dim x K, 2*N*D*K flops),
the better of one full product and 16 MiB row blocks, both into preallocated
output; a VQ's fraction of it counts the same flops.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from scripts.benchmarks.common import (
    GIB,
    MIB,
    OURS,
    REFERENCE,
    REPO,
    count_launches,
    fmt_bytes,
    fmt_s,
    load,
    mem_available,
    print_table,
    sync,
)
from vqtrain.hostsync import SyncRecorder

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
BENCH = REPO / "scripts" / "bench.py"  # runs each case in a child process: `bench.py _case SPEC`


def quantizer_cases(quick: bool) -> list[dict]:
    """Each case: name, kind (for memory extrapolation), size (codes), and how to
    build ours and the reference (kwargs for `build_quantizer`)."""
    vq_sizes, simvq_sizes, rvq = (
        ([16, 32, 64], [16, 32], (2, 16)) if quick else ([1024, 8192, 65536], [1024, 8192], (8, 1024))
    )
    cases = []
    for k in vq_sizes:
        cases.append({"name": f"VQ (EMA) K={k}", "kind": "vq", "size": k, "vq_flops": True})
    # the default quantizer's bookkeeping (configs/quantizer/vq_tricks.yaml); the reference's
    # restarts follow its own rule (a code with an EMA cluster size under 2)
    k = vq_sizes[0]
    cases.append({"name": f"VQ (k-means, restarts) K={k}", "kind": "vq", "size": k, "vq_flops": True, "restarts": True})
    for k in simvq_sizes:
        cases.append({"name": f"SimVQ K={k}", "kind": "simvq", "size": k})
    cases.append({"name": f"ResidualVQ {rvq[0]}x{rvq[1]}", "kind": "rvq", "size": rvq[1], "levels": rvq[0]})
    for levels in ([8, 5, 5, 5], [8, 8, 8, 5, 5, 5]):
        cases.append({"name": f"FSQ {levels}", "kind": "fsq", "size": math.prod(levels), "fsq_levels": levels})
    return cases


def build_quantizer(case: dict, impl: str, dim: int):
    """(module, run) where run(module, x) -> (quantized, auxiliary loss or None)."""
    kind, size = case["kind"], case["size"]
    if impl == OURS:
        from vqtrain.quantizers import FSQ, ResidualQuantizer, SimVQ, VectorQuantizer

        restarts = {"kmeans_init": True, "dead_code_threshold": 0.1} if case.get("restarts") else {}
        module = {
            "vq": lambda: VectorQuantizer(dim, size, **restarts),
            "simvq": lambda: SimVQ(dim, size),
            "rvq": lambda: ResidualQuantizer(
                dim, quantizer=partial(VectorQuantizer, codebook_size=size), num_levels=case["levels"]
            ),
            "fsq": lambda: FSQ(dim, case["fsq_levels"]),
        }[kind]()

        def run(m, x):
            out = m(x)
            return out.quantized, out.loss
    else:
        import vector_quantize_pytorch as vqp

        restarts = {"kmeans_init": True, "threshold_ema_dead_code": 2} if case.get("restarts") else {}
        module = {
            "vq": lambda: vqp.VectorQuantize(dim=dim, codebook_size=size, **restarts),
            "simvq": lambda: vqp.SimVQ(dim=dim, codebook_size=size),
            "rvq": lambda: vqp.ResidualVQ(dim=dim, num_quantizers=case["levels"], codebook_size=size),
            "fsq": lambda: vqp.FSQ(levels=case["fsq_levels"], dim=dim),
        }[kind]()

        def run(m, x):
            out = m(x)
            aux = out[2].sum() if len(out) > 2 and torch.is_tensor(out[2]) else None
            return out[0], aux

    return module, run


# --- quantizers: one case in a child process -------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_worked: bool) -> int:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return (
        isinstance(error, MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
        or "cannot allocate memory" in text
        or "bad_alloc" in text  # C++ allocations inside an aten kernel (index_add_, say)
    )


def run_case(spec: dict) -> dict:
    """Time and measure one quantizer (or the matmul ceiling) in this process."""
    device, tokens, dim = spec["device"], spec["tokens"], spec["dim"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": load()}
    batch = 16 if tokens % 16 == 0 else 1
    if spec["impl"] == "matmul":
        step = matmul_step(tokens, dim, spec["size"], device, spec.get("matmul_mode", "blocked"))
    else:
        module, run = build_quantizer(spec["case"], spec["impl"], dim)
        module = module.to(device).train()
        if spec.get("compile") and spec["impl"] == OURS:
            import torch._inductor.config as inductor  # (only here: importing it loads Dynamo)

            inductor.cpp.enable_kernel_profile = True  # for count_launches on a CPU
            module.compile_bookkeeping()  # as model.compile=true: compiled in the warm-up
        x = torch.randn(batch, tokens // batch, dim, device=device)
        grad = torch.randn_like(x)

        def step():
            xs = x.detach().requires_grad_(True)
            quantized, aux = run(module, xs)
            outputs, grads = [quantized], [grad]
            if aux is not None and aux.requires_grad:
                outputs.append(aux)
                grads.append(torch.ones_like(aux))
            torch.autograd.backward(outputs, grads)

    if device != "cuda" and spec.get("mem_cap_bytes"):  # the address space may grow by the cap at most
        torch.ones(2**20).add_(1)  # start the thread pool first: threads that cannot start abort the process
        soft = vm_bytes() + spec["mem_cap_bytes"]
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    times, cpu_times = [], []
    try:
        started = time.perf_counter()
        for i in range(spec["warmup"] + spec["repeats"]):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= spec["warmup"]:
                times.append(t1 - t0)
                cpu_times.append(c1 - c0)
                # slow cases stop early, after at least 3 timed repeats
                if len(times) >= min(3, spec["repeats"]) and time.perf_counter() - started > spec["max_case_seconds"]:
                    break
        peak = None if spec["impl"] == "matmul" else measure_peak(step, device)
        if spec["impl"] != "matmul":
            result["launches"] = count_launches(step, device)
            if not (spec.get("compile") and spec["impl"] == OURS):  # a dispatch mode runs compiled code eagerly
                with SyncRecorder() as recorder:  # aten ops of one step, and the syncing ones
                    step()
                result.update(aten_ops=recorder.ops, syncs=sum(recorder.syncs.values()))
    except (RuntimeError, MemoryError) as error:
        if not is_oom(error):
            raise
        note = "CUDA out of memory" if device == "cuda" else f"over the {fmt_bytes(spec.get('mem_cap_bytes'))} cap"
        result.update(status="OOM", note=note, load_after=load())
        return result
    result.update(
        status="ok",
        median_s=statistics.median(times),
        min_s=min(times),
        times_s=times,
        cpu_median_s=statistics.median(cpu_times),
        peak_extra_bytes=peak,
        load_after=load(),
    )
    return result


def measure_peak(step: Callable[[], None], device: str) -> int:
    """Peak memory of one more step above what is held before it. Run after the
    timed steps, so lazily loaded code and one-off initialisation are not counted.
    On CPU, glibc is first told to map every allocation of 64 KiB or more by itself
    and to return what it caches, so the resident set follows the live tensors."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = rss_bytes()
    reset_worked = reset_peak_rss()
    step()
    return max(peak_rss_bytes(reset_worked) - base, 0)


def matmul_step(tokens: int, dim: int, size: int, device: str, mode: str) -> Callable[[], None]:
    """The distance matmul alone: (tokens x dim) @ (dim x size), into preallocated output."""
    a = torch.randn(tokens, dim, device=device)
    b = torch.randn(size, dim, device=device).t()
    if mode == "full":
        out = torch.empty(tokens, size, device=device)
        return lambda: torch.mm(a, b, out=out)
    rows = max(1, min(tokens, (16 * MIB // 4) // size))  # 16 MiB blocks
    out = torch.empty(rows, size, device=device)

    def blocked():
        for start in range(0, tokens, rows):
            part = a[start : start + rows]
            torch.mm(part, b, out=out[: part.shape[0]])

    return blocked


def run_child(spec: dict, timeout: float) -> dict:
    """Run `spec` in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, str(BENCH), "_case", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"over {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "note": "killed (SIGKILL, likely the kernel's OOM killer)"}
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"status": "failed", "note": f"exit {proc.returncode}: {tail[:300]}"}


def estimate_need(results: list[dict], case: dict, impl: str) -> float | None:
    """Peak extra bytes of the largest smaller case of the same kind, scaled linearly in K."""
    smaller = [
        r
        for r in results
        if r["impl"] == impl and r["kind"] == case["kind"] and r["size"] < case["size"] and r.get("status") == "ok"
    ]
    if not smaller:
        return None
    largest = max(smaller, key=lambda r: r["size"])
    return largest["peak_extra_bytes"] * case["size"] / largest["size"]


def run(args: argparse.Namespace) -> dict:
    device = args.device
    tokens = args.tokens or (256 if args.quick else 16384)
    cases = quantizer_cases(args.quick)
    if args.cases:
        cases = [c for c in cases if re.search(args.cases, c["name"], re.IGNORECASE)]
    impls = [OURS]
    if args.compare:
        if args.compare != REFERENCE:
            raise SystemExit(f"--compare knows only {REFERENCE}")
        impls.append(REFERENCE)
    cap = int(args.mem_cap_gb * GIB) if args.mem_cap_gb else int(min(8 * GIB, mem_available() / 2))
    repeats = args.repeats or (1 if args.quick else 20 if device == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if device == "cuda" else 2)
    if args.compile:
        warmup = max(warmup, 2)  # the first steps compile
    common = dict(
        device=device,
        tokens=tokens,
        dim=args.dim,
        repeats=repeats,
        warmup=warmup,
        threads=args.threads,
        max_case_seconds=args.max_case_seconds,
        mem_cap_bytes=None if device == "cuda" else cap,
        compile=args.compile,
    )
    load_start = load()
    print(
        f"quantizers: {tokens} tokens, dim {args.dim}, {device}, {repeats} repeats after {warmup} warm-up, "
        f"{'' if device == 'cuda' else f'memory cap {fmt_bytes(cap)}, '}load {load_start}",
        flush=True,
    )

    matmul = []
    for size in sorted({c["size"] for c in cases if c.get("vq_flops")}):
        flops = 2 * tokens * args.dim * size
        entry = {"size": size, "flops": flops, "shape": f"{tokens}x{args.dim} @ {args.dim}x{size}"}
        for mode in ("full", "blocked"):
            if mode == "full" and tokens * size * 4 > GIB:
                entry[mode] = {"status": "skipped", "note": "output over 1 GiB"}
                continue
            res = run_case({**common, "impl": "matmul", "size": size, "matmul_mode": mode, "mem_cap_bytes": None})
            if res.get("status") == "ok":
                res["gflops"] = flops / res["median_s"] / 1e9
            entry[mode] = res
        rates = [entry[m]["gflops"] for m in ("full", "blocked") if entry[m].get("status") == "ok"]
        entry["ceiling_gflops"] = max(rates) if rates else None
        entry["ceiling_s"] = flops / entry["ceiling_gflops"] / 1e9 if rates else None
        matmul.append(entry)
        print(f"  matmul {entry['shape']}: {entry['ceiling_gflops'] or float('nan'):.1f} GFLOP/s", flush=True)

    results = []
    for case in cases:
        for impl in impls:
            need = estimate_need(results, case, impl) if device != "cuda" else None
            record = {"case": case["name"], "kind": case["kind"], "size": case["size"], "impl": impl}
            if need is not None and need > cap:
                record.update(
                    status="skipped", note=f"would need ~{fmt_bytes(need)} (cap {fmt_bytes(cap)})", estimated_bytes=need
                )
            else:
                record.update(run_child({**common, "impl": impl, "case": case}, args.timeout))
            results.append(record)
            shown = fmt_s(record.get("median_s")) or f"{record['status']} {record.get('note', '')}"
            print(
                f"  {case['name']:<24} {impl:<24} {shown}  peak {fmt_bytes(record.get('peak_extra_bytes'))}  "
                f"load {record.get('load_before')}->{record.get('load_after')}",
                flush=True,
            )

    ceilings = {m["size"]: m for m in matmul}
    summary = []
    for case in cases:
        row: dict[str, Any] = {"case": case["name"]}
        for impl in impls:
            r = next(r for r in results if r["case"] == case["name"] and r["impl"] == impl)
            row[impl] = r
            ceiling = ceilings.get(case["size"]) if case.get("vq_flops") else None
            if r.get("status") == "ok" and ceiling and ceiling["ceiling_s"]:
                r["fraction_of_matmul_ceiling"] = ceiling["ceiling_s"] / r["median_s"]
        ours, ref = row[OURS], row.get(REFERENCE)
        if ref and ours.get("status") == "ok" and ref.get("status") == "ok":
            row["speedup"] = ref["median_s"] / ours["median_s"]
        summary.append(row)

    def status(r: dict | None) -> str | None:
        if r is None:
            return None
        return (
            fmt_s(r["median_s"])
            if r.get("status") == "ok"
            else f"{r['status']}" + (f" ({r['note']})" if r.get("note") else "")
        )

    def ops(r: dict | None) -> str | None:
        if r is None or "launches" not in r:
            return None
        counts = [r.get("aten_ops"), r.get("syncs"), r["launches"]]
        return "/".join("-" if count is None else str(count) for count in counts)

    def pct(r: dict | None) -> str | None:
        return f"{100 * r['fraction_of_matmul_ceiling']:.0f}%" if r and "fraction_of_matmul_ceiling" in r else None

    headers = (
        ["case", "vqtrain", "peak extra", "ops/syncs/launches"]
        + (["reference", "peak extra", "ops/syncs/launches", "speed-up"] if REFERENCE in impls else [])
        + ["% matmul ceiling (ours/ref)"]
    )
    rows = []
    for row in summary:
        ours, ref = row[OURS], row.get(REFERENCE)
        line = [row["case"], status(ours), fmt_bytes(ours.get("peak_extra_bytes")), ops(ours)]
        if REFERENCE in impls:
            line += [
                status(ref),
                fmt_bytes(ref.get("peak_extra_bytes")),
                ops(ref),
                f"{row['speedup']:.1f}x" if "speedup" in row else None,
            ]
        ceiling = "/".join(p or "-" for p in (pct(ours), pct(ref))) if pct(ours) or pct(ref) else None
        rows.append(line + [ceiling])
    print(
        f"\nforward+backward{', ours with compiled bookkeeping' if args.compile else ''}, {tokens} tokens x dim "
        f"{args.dim}, median of {repeats} after {warmup} warm-up, {device} "
        f"({torch.get_num_threads()} threads); load {load_start} -> {load()}\n"
    )
    print_table(headers, rows)
    print()
    print_table(
        ["matmul (distance only)", "full", "16 MiB blocks", "ceiling"],
        [
            [
                m["shape"],
                fmt_s(m["full"].get("median_s")) or m["full"]["status"],
                fmt_s(m["blocked"].get("median_s")) or m["blocked"]["status"],
                f"{m['ceiling_gflops']:.1f} GFLOP/s" if m["ceiling_gflops"] else None,
            ]
            for m in matmul
        ],
    )
    targets = quantizer_targets(summary) if not args.quick and REFERENCE in impls else []
    if targets:
        print()
        print_table(
            ["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in targets]
        )
    return {
        "tokens": tokens,
        "compile": args.compile,
        "dim": args.dim,
        "repeats": repeats,
        "warmup": warmup,
        "mem_cap_bytes": cap,
        "load_start": load_start,
        "load_end": load(),
        "matmul": matmul,
        "results": results,
        "summary": [
            {
                "case": r["case"],
                "speedup": r.get("speedup"),
                **{f"{impl}_median_s": r[impl].get("median_s") for impl in impls},
                **{f"{impl}_peak_extra_bytes": r[impl].get("peak_extra_bytes") for impl in impls},
                **{f"{impl}_status": r[impl].get("status") for impl in impls},
                **{f"{impl}_fraction_of_matmul_ceiling": r[impl].get("fraction_of_matmul_ceiling") for impl in impls},
            }
            for r in summary
        ],
        "targets": targets,
    }


def quantizer_targets(summary: list[dict]) -> list[dict]:
    """The issue's targets, checked on this run."""
    by_name = {row["case"]: row for row in summary}
    targets = []

    def speedup(name: str, minimum: float) -> None:
        row = by_name.get(name)
        if row is not None:
            value = row.get("speedup")
            targets.append(
                {
                    "target": f"{name}: >= {minimum:g}x faster",
                    "measured": f"{value:.1f}x" if value else "n/a",
                    "met": bool(value and value >= minimum),
                }
            )

    speedup("VQ (EMA) K=1024", 5)
    speedup("VQ (EMA) K=8192", 5)
    row = by_name.get("VQ (EMA) K=8192")
    if row is not None:
        value = row[OURS].get("fraction_of_matmul_ceiling")
        targets.append(
            {
                "target": "VQ (EMA) K=8192: >= 50% of the matmul ceiling",
                "measured": f"{100 * value:.0f}%" if value else "n/a",
                "met": bool(value and value >= 0.5),
            }
        )
    row = by_name.get("VQ (EMA) K=65536")
    if row is not None:
        value = row[OURS].get("peak_extra_bytes")
        targets.append(
            {
                "target": "VQ (EMA) K=65536: peak extra memory < 1 GiB",
                "measured": fmt_bytes(value) or "n/a",
                "met": bool(value is not None and value < GIB),
            }
        )
    speedup("ResidualVQ 8x1024", 5)
    speedup("SimVQ K=1024", 2)
    speedup("SimVQ K=8192", 2)
    speedup("FSQ [8, 5, 5, 5]", 1)
    speedup("FSQ [8, 8, 8, 5, 5, 5]", 1)
    return targets


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser("quantizers", parents=[common], help="forward+backward time and peak memory per quantizer")
    q.add_argument("--compare", nargs="?", const=REFERENCE, help=f"also run {REFERENCE}'s equivalents")
    q.add_argument("--tokens", type=int, help="tokens per step (default 16384)")
    q.add_argument("--dim", type=int, default=64)
    q.add_argument("--repeats", type=int, help="timed repeats (default 5; cuda 20)")
    q.add_argument("--warmup", type=int, help="untimed steps first (default 2; cuda 5)")
    q.add_argument("--cases", help="regular expression: run the cases whose names it matches (default all)")
    q.add_argument(
        "--compile",
        action="store_true",
        help="ours with its codebook bookkeeping compiled, as model.compile=true (aten ops then not counted)",
    )
    q.add_argument(
        "--mem-cap-gb",
        type=float,
        help="address-space growth allowed per case (default min(8, half the available memory))",
    )
    q.add_argument(
        "--max-case-seconds", type=float, default=120.0, help="stop timing a case after this long (>= 3 repeats)"
    )
    q.add_argument("--timeout", type=float, default=1800.0, help="seconds before a case's process is killed")
