"""Benchmarks: quantizer speed and memory, training-loop overhead, audio data throughput, quality (`quality -h`).

    python scripts/bench.py quantizers --compare vector-quantize-pytorch
    python scripts/bench.py train
    python scripts/bench.py data
    python scripts/bench.py quantizers --device cuda        # on a GPU machine

Every subcommand prints a table and writes JSON (`--out`, default
reports/bench-<subcommand>.json) with the raw timings, the machine load
(1-minute load average before and after) and the settings used. Timings on a
shared machine are noisy: read them next to the load figures. On a CPU shared
with other busy processes, OpenMP's default spin-waiting can add milliseconds
to every parallel op; `--omp-wait-policy passive` runs with OMP_WAIT_POLICY=PASSIVE.

quantizers: forward + backward (training mode, an upstream gradient on the
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

train: steps/s of the Lightning Trainer with the DiscreteAutoencoder (default
config: shapes data, image model, VQ; logging as in a normal run, no
checkpointing, no validation) against a plain PyTorch loop over the same
encoder/quantizer/decoder modules, optimizer, scheduler, clipping and batches;
the overhead is the extra time per step. Rounds alternate; the best of each is
reported.

data: FSDD (or any folder tree of clips via --root): padding fraction of one
training epoch and clips/s of the loader alone and of loader + audio model
training steps, with and without length bucketing.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import logging
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

GIB = 2**30
MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
REFERENCE = "vector-quantize-pytorch"
OURS = "vqtrain"


# --- shared helpers ---------------------------------------------------------------

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


# --- quantizers: cases ----------------------------------------------------------

def quantizer_cases(quick: bool) -> list[dict]:
    """Each case: name, kind (for memory extrapolation), size (codes), and how to
    build ours and the reference (kwargs for `build_quantizer`)."""
    vq_sizes, simvq_sizes, rvq = ([16, 32, 64], [16, 32], (2, 16)) if quick else ([1024, 8192, 65536], [1024, 8192], (8, 1024))
    cases = []
    for k in vq_sizes:
        cases.append({"name": f"VQ (EMA) K={k}", "kind": "vq", "size": k, "vq_flops": True})
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

        module = {
            "vq": lambda: VectorQuantizer(dim, size),
            "simvq": lambda: SimVQ(dim, size),
            "rvq": lambda: ResidualQuantizer(dim, quantizer=partial(VectorQuantizer, codebook_size=size), num_levels=case["levels"]),
            "fsq": lambda: FSQ(dim, case["fsq_levels"]),
        }[kind]()

        def run(m, x):
            out = m(x)
            return out.quantized, out.loss
    else:
        import vector_quantize_pytorch as vqp

        module = {
            "vq": lambda: vqp.VectorQuantize(dim=dim, codebook_size=size),
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
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


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
    command = [sys.executable, str(Path(__file__).resolve()), "_case", json.dumps(spec)]
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
    smaller = [r for r in results if r["impl"] == impl and r["kind"] == case["kind"] and r["size"] < case["size"] and r.get("status") == "ok"]
    if not smaller:
        return None
    largest = max(smaller, key=lambda r: r["size"])
    return largest["peak_extra_bytes"] * case["size"] / largest["size"]


def cmd_quantizers(args: argparse.Namespace) -> dict:
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
    common = dict(device=device, tokens=tokens, dim=args.dim, repeats=repeats, warmup=warmup, threads=args.threads,
                  max_case_seconds=args.max_case_seconds, mem_cap_bytes=None if device == "cuda" else cap)
    load_start = load()
    print(f"quantizers: {tokens} tokens, dim {args.dim}, {device}, {repeats} repeats after {warmup} warm-up, "
          f"{'' if device == 'cuda' else f'memory cap {fmt_bytes(cap)}, '}load {load_start}", flush=True)

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
                record.update(status="skipped", note=f"would need ~{fmt_bytes(need)} (cap {fmt_bytes(cap)})", estimated_bytes=need)
            else:
                record.update(run_child({**common, "impl": impl, "case": case}, args.timeout))
            results.append(record)
            shown = fmt_s(record.get("median_s")) or f"{record['status']} {record.get('note', '')}"
            print(f"  {case['name']:<24} {impl:<24} {shown}  peak {fmt_bytes(record.get('peak_extra_bytes'))}  "
                  f"load {record.get('load_before')}->{record.get('load_after')}", flush=True)

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
        return fmt_s(r["median_s"]) if r.get("status") == "ok" else f"{r['status']}" + (f" ({r['note']})" if r.get("note") else "")

    def pct(r: dict | None) -> str | None:
        return f"{100 * r['fraction_of_matmul_ceiling']:.0f}%" if r and "fraction_of_matmul_ceiling" in r else None

    headers = ["case", "vqtrain", "peak extra"] + (["reference", "peak extra", "speed-up"] if REFERENCE in impls else []) + ["% matmul ceiling (ours/ref)"]
    rows = []
    for row in summary:
        ours, ref = row[OURS], row.get(REFERENCE)
        line = [row["case"], status(ours), fmt_bytes(ours.get("peak_extra_bytes"))]
        if REFERENCE in impls:
            line += [status(ref), fmt_bytes(ref.get("peak_extra_bytes")), f"{row['speedup']:.1f}x" if "speedup" in row else None]
        ceiling = "/".join(p or "-" for p in (pct(ours), pct(ref))) if pct(ours) or pct(ref) else None
        rows.append(line + [ceiling])
    print(f"\nforward+backward, {tokens} tokens x dim {args.dim}, median of {repeats} after {warmup} warm-up, {device} "
          f"({torch.get_num_threads()} threads); load {load_start} -> {load()}\n")
    print_table(headers, rows)
    print()
    print_table(["matmul (distance only)", "full", "16 MiB blocks", "ceiling"], [
        [m["shape"], fmt_s(m["full"].get("median_s")) or m["full"]["status"], fmt_s(m["blocked"].get("median_s")) or m["blocked"]["status"],
         f"{m['ceiling_gflops']:.1f} GFLOP/s" if m["ceiling_gflops"] else None] for m in matmul])
    targets = quantizer_targets(summary) if not args.quick and REFERENCE in impls else []
    if targets:
        print()
        print_table(["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in targets])
    return {"tokens": tokens, "dim": args.dim, "repeats": repeats, "warmup": warmup, "mem_cap_bytes": cap,
            "load_start": load_start, "load_end": load(), "matmul": matmul, "results": results,
            "summary": [{"case": r["case"], "speedup": r.get("speedup"),
                         **{f"{impl}_median_s": r[impl].get("median_s") for impl in impls},
                         **{f"{impl}_peak_extra_bytes": r[impl].get("peak_extra_bytes") for impl in impls},
                         **{f"{impl}_status": r[impl].get("status") for impl in impls},
                         **{f"{impl}_fraction_of_matmul_ceiling": r[impl].get("fraction_of_matmul_ceiling") for impl in impls}}
                        for r in summary],
            "targets": targets}


def quantizer_targets(summary: list[dict]) -> list[dict]:
    """The issue's targets, checked on this run."""
    by_name = {row["case"]: row for row in summary}
    targets = []

    def speedup(name: str, minimum: float) -> None:
        row = by_name.get(name)
        if row is not None:
            value = row.get("speedup")
            targets.append({"target": f"{name}: >= {minimum:g}x faster", "measured": f"{value:.1f}x" if value else "n/a",
                            "met": bool(value and value >= minimum)})

    speedup("VQ (EMA) K=1024", 5)
    speedup("VQ (EMA) K=8192", 5)
    row = by_name.get("VQ (EMA) K=8192")
    if row is not None:
        value = row[OURS].get("fraction_of_matmul_ceiling")
        targets.append({"target": "VQ (EMA) K=8192: >= 50% of the matmul ceiling", "measured": f"{100 * value:.0f}%" if value else "n/a",
                        "met": bool(value and value >= 0.5)})
    row = by_name.get("VQ (EMA) K=65536")
    if row is not None:
        value = row[OURS].get("peak_extra_bytes")
        targets.append({"target": "VQ (EMA) K=65536: peak extra memory < 1 GiB", "measured": fmt_bytes(value) or "n/a",
                        "met": bool(value is not None and value < GIB)})
    speedup("ResidualVQ 8x1024", 5)
    speedup("SimVQ K=1024", 2)
    speedup("SimVQ K=8192", 2)
    speedup("FSQ [8, 5, 5, 5]", 1)
    speedup("FSQ [8, 8, 8, 5, 5, 5]", 1)
    return targets


# --- train: Lightning vs a plain loop ------------------------------------------------

class StepTimes:
    """Wall-clock time at the end of every training step."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.indices: list[int] = []

    def mark(self, batch: dict | None = None) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if batch is not None and "index" in batch and len(self.indices) < 20:
            self.indices.append(int(batch["index"].sum()))

    def seconds_per_step(self, warmup: int, cpu: bool = False) -> float:
        """Mean time per step after `warmup` steps (the first step's end is the first mark)."""
        marks = self.cpu_times if cpu else self.times
        measured = marks[max(warmup, 1) - 1 :]
        return (measured[-1] - measured[0]) / (len(measured) - 1)


def compose_train(overrides: list[str], output_dir: Path):
    from vqtrain.config import compose

    return compose(list(overrides), output_dir)


def lightning_run(cfg, steps: int, device: str, output_dir: Path) -> tuple[StepTimes, list[str]]:
    import lightning as L
    from hydra.utils import instantiate

    class Timer(L.Callback):
        def __init__(self):
            self.clock = StepTimes(device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.clock.mark(batch)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks, used = [], []
    for name, conf in (cfg.callbacks or {}).items():
        if conf is None or name in ("model_checkpoint", "last_checkpoint"):
            continue
        try:
            callbacks.append(instantiate(conf))
            used.append(name)
        except Exception as error:  # a callback that cannot be built here is left out, and said so
            used.append(f"{name} (left out: {type(error).__name__})")
    loggers = [instantiate(conf) for conf in (cfg.logger or {}).values() if conf is not None]
    timer = Timer()
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks + [timer], logger=loggers or False, max_steps=steps,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        accelerator="gpu" if device == "cuda" else "cpu", default_root_dir=str(output_dir),
    )
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:  # progress bar, model summary and info messages run as usual, out of sight
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(model, datamodule=datamodule)
    finally:
        lightning_log.setLevel(level)
    return timer.clock, used


def plain_run(cfg, steps: int, device: str) -> StepTimes:
    from types import SimpleNamespace

    import lightning as L
    from einops import rearrange
    from hydra.utils import instantiate

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    datamodule.setup("fit")
    model = model.to(device).train()
    # the model's own optimizer and schedule (param groups, weight decay, warm-up), without a Trainer
    model.trainer = SimpleNamespace(estimated_stepping_batches=steps)
    configured = model.configure_optimizers()
    model.trainer = None
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    clip = cfg.trainer.get("gradient_clip_val")
    encoder, quantizer, decoder, reconstruction = model.encoder, model.quantizer, model.decoder, model.reconstruction
    clock = StepTimes(device)
    step = 0
    while step < steps:
        for batch in datamodule.train_dataloader():
            x = batch["x"].to(device)
            z = rearrange(encoder(x), "b d ... -> b ... d")
            out = quantizer(z)
            x_hat = decoder(rearrange(out.quantized, "b ... d -> b d ..."))
            loss = reconstruction(x_hat, x) + out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            clock.mark(batch)
            step += 1
            if step >= steps:
                break
    return clock


def cmd_train(args: argparse.Namespace) -> dict:
    steps = args.steps or (6 if args.quick else 200)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    overrides = list(args.overrides or [])
    if args.quick:
        overrides += ["data.num_train=256", "data.num_val=16", "data.num_test=16", "data.batch_size=16",
                      "model.encoder.hidden_channels=8", "model.decoder.hidden_channels=8", "quantizer.codebook_size=64"]
    if args.device == "cuda":
        overrides.append("trainer.accelerator=gpu")
    load_start = load()
    runs: dict[str, list[dict]] = {"lightning": [], "plain": []}
    callbacks_used: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        for r in range(rounds):
            for kind in ("plain", "lightning"):
                out_dir = Path(tmp) / f"{kind}{r}"
                cfg = compose_train(overrides, out_dir)
                before = load()
                if kind == "lightning":
                    clock, callbacks_used = lightning_run(cfg, warmup + steps, args.device, out_dir)
                else:
                    clock = plain_run(cfg, warmup + steps, args.device)
                spp, cpu = clock.seconds_per_step(warmup), clock.seconds_per_step(warmup, cpu=True)
                runs[kind].append({"seconds_per_step": spp, "steps_per_s": 1 / spp, "cpu_seconds_per_step": cpu,
                                   "load_before": before, "load_after": load(), "batch_index_sums": clock.indices})
                print(f"  round {r} {kind:<9} {1 / spp:7.2f} steps/s  ({1e3 * cpu:.0f} ms CPU/step)  load {before}->{load()}", flush=True)
    best = {kind: min(runs[kind], key=lambda run: run["seconds_per_step"]) for kind in runs}
    overhead = best["lightning"]["seconds_per_step"] / best["plain"]["seconds_per_step"] - 1
    cpu_best = {kind: min(run["cpu_seconds_per_step"] for run in runs[kind]) for kind in runs}
    cpu_overhead = cpu_best["lightning"] / cpu_best["plain"] - 1
    same_batches = best["lightning"]["batch_index_sums"] == best["plain"]["batch_index_sums"]
    print(f"\ntraining steps, {steps} timed after {warmup} warm-up, best of {rounds} rounds, {args.device}; "
          f"load {load_start} -> {load()}\n")
    print_table(["loop", "steps/s", "ms/step", "all rounds (steps/s)"], [
        [kind, f"{1 / best[kind]['seconds_per_step']:.2f}", f"{1e3 * best[kind]['seconds_per_step']:.1f}",
         ", ".join(f"{run['steps_per_s']:.2f}" for run in runs[kind])] for kind in ("plain", "lightning")])
    print(f"\nframework overhead: {100 * overhead:+.1f}% per step, wall clock (target <= 10%); "
          f"{100 * cpu_overhead:+.1f}% in process CPU time (less sensitive to load with --threads 1)"
          f"{'' if same_batches else '  [note: the two loops saw different batch orders]'}")
    return {"steps": steps, "warmup": warmup, "rounds": rounds, "overrides": overrides, "callbacks": callbacks_used,
            "runs": runs, "overhead_fraction": overhead, "cpu_overhead_fraction": cpu_overhead, "same_batches": same_batches,
            "load_start": load_start, "load_end": load()}


# --- data: audio clips/s and padding, with and without bucketing -----------------------

def cmd_data(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate

    from vqtrain.data.sampler import measure_padding, padding_fraction

    root = Path(args.root or REPO.parent / "shared" / "data" / "fsdd" / "recordings").resolve()
    if not root.is_dir():
        raise SystemExit(f"no audio folder at {root} (give --root)")
    load_start = load()
    results = []
    with tempfile.TemporaryDirectory(prefix="vqtrain-bench-") as tmp:
        for bucketing in (True, False):
            overrides = ["data=fsdd", f"data.root={root}", f"data.bucketing={bucketing}", f"data.cache_dir={tmp}",
                         f"data.batch_size={args.batch_size}"] + list(args.overrides or [])
            if args.quick:
                overrides += ["model.encoder.hidden_channels=4", "model.decoder.hidden_channels=4", "quantizer.codebook_size=16"]
            cfg = compose_train(overrides, Path(tmp) / "run")
            datamodule = instantiate(cfg.data)
            datamodule.setup("fit")
            lengths = datamodule.train_set.lengths
            expected = measure_padding(lengths, args.batch_size, bucketing=bucketing, seed=datamodule.order_seed)

            # the loader alone: one epoch of decoding, cropping and padding
            loader = datamodule.train_dataloader()
            before = load()
            start, clips, batch_lengths = time.perf_counter(), 0, []
            for batch in loader:
                clips += batch["x"].shape[0]
                batch_lengths.append(batch["lengths"].tolist())
            loader_s = time.perf_counter() - start

            # loader + training steps of the audio model (plain loop: forward, backward, optimizer step)
            torch.manual_seed(0)
            model = instantiate(cfg.model).to(args.device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
            limit = args.train_batches if args.train_batches is not None else (2 if args.quick else 20)
            limit = limit or len(loader)
            step_clips, steps, samples, real = 0, 0, 0, 0
            train_start = time.perf_counter()
            for batch in datamodule.train_dataloader():
                x, mask = batch["x"].to(args.device), batch["mask"].to(args.device)
                x_hat, out = model(x, mask)
                loss = model.reconstruction(x_hat, x, mask) + out.loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sync(args.device)
                step_clips += x.shape[0]
                samples += mask.numel()
                real += int(mask.sum())
                steps += 1
                if steps >= limit:
                    break
            train_s = time.perf_counter() - train_start
            record = {
                "bucketing": bucketing, "clips": clips, "batches": len(batch_lengths),
                "padding_fraction": padding_fraction(batch_lengths), "padding_fraction_measure_padding": expected,
                "loader_seconds": loader_s, "loader_clips_per_s": clips / loader_s,
                "train_batches": steps, "train_clips": step_clips, "train_seconds": train_s,
                "train_clips_per_s": step_clips / train_s, "train_padding_fraction": 1 - real / max(samples, 1),
                "load_before": before, "load_after": load(),
            }
            results.append(record)
            print(f"  bucketing={bucketing}: padding {100 * record['padding_fraction']:.1f}%, loader {record['loader_clips_per_s']:.0f} clips/s, "
                  f"train {record['train_clips_per_s']:.1f} clips/s  load {before}->{load()}", flush=True)
    print(f"\nFSDD training split ({results[0]['clips']} clips, batch {args.batch_size}), {args.device}; load {load_start} -> {load()}\n")
    print_table(["bucketing", "padding", "loader clips/s", "train clips/s", "train padding (batches timed)"], [
        ["on" if r["bucketing"] else "off", f"{100 * r['padding_fraction']:.1f}%", f"{r['loader_clips_per_s']:.0f}",
         f"{r['train_clips_per_s']:.1f}", f"{100 * r['train_padding_fraction']:.1f}% ({r['train_batches']})"] for r in results])
    return {"root": str(root), "batch_size": args.batch_size, "results": results, "load_start": load_start, "load_end": load()}


# --- entry point -----------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_case":  # a child process: one quantizer case
        print(json.dumps(run_case(json.loads(argv[1]))), flush=True)
        return
    from scripts.benchmarks import quality  # one module per benchmark
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common.add_argument("--out", type=Path, help="JSON output (default reports/bench-<subcommand>.json)")
    common.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs, measures nothing useful")
    common.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    common.add_argument("--omp-wait-policy", choices=["passive", "active"],
                        help="set OMP_WAIT_POLICY for the run (default: as in the environment). On a machine "
                             "shared with other busy processes, 'passive' avoids OpenMP threads spinning while "
                             "their peers wait for a core, which can slow every parallel op by milliseconds")

    q = sub.add_parser("quantizers", parents=[common], help="forward+backward time and peak memory per quantizer")
    q.add_argument("--compare", nargs="?", const=REFERENCE, help=f"also run {REFERENCE}'s equivalents")
    q.add_argument("--tokens", type=int, help="tokens per step (default 16384)")
    q.add_argument("--dim", type=int, default=64)
    q.add_argument("--repeats", type=int, help="timed repeats (default 5; cuda 20)")
    q.add_argument("--warmup", type=int, help="untimed steps first (default 2; cuda 5)")
    q.add_argument("--cases", help="regular expression: run the cases whose names it matches (default all)")
    q.add_argument("--mem-cap-gb", type=float, help="address-space growth allowed per case (default min(8, half the available memory))")
    q.add_argument("--max-case-seconds", type=float, default=120.0, help="stop timing a case after this long (>= 3 repeats)")
    q.add_argument("--timeout", type=float, default=1800.0, help="seconds before a case's process is killed")

    t = sub.add_parser("train", parents=[common], help="Lightning training loop vs a plain PyTorch loop")
    t.add_argument("--steps", type=int, help="timed steps per run (default 200)")
    t.add_argument("--warmup", type=int, help="untimed steps first (default 20)")
    t.add_argument("--rounds", type=int, help="alternating rounds of both loops (default 2)")
    t.add_argument("overrides", nargs="*", help="config overrides, as for train.py")

    d = sub.add_parser("data", parents=[common], help="audio clips/s and padding with and without bucketing")
    d.add_argument("--root", help="audio folder (default <repo>/../shared/data/fsdd/recordings)")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--train-batches", type=int, help="batches through the model per setting (default 20; 0 = a whole epoch)")
    d.add_argument("overrides", nargs="*", help="config overrides, as for train.py")
    quality.add_parser(sub, common)

    args = parser.parse_args(argv)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY", "").upper() != args.omp_wait_policy.upper():
        # OpenMP reads its settings when torch loads it: start again with the policy set (children inherit it)
        env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy.upper()}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {"subcommand": args.command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv, "machine": machine_info(args.device)}
    payload.update({"quantizers": cmd_quantizers, "train": cmd_train, "data": cmd_data, "quality": quality.run}[args.command](args))
    payload["machine"]["load_avg_end"] = os.getloadavg()
    write_json(args.out or REPO / "reports" / f"bench-{args.command}.json", payload)


if __name__ == "__main__":
    main()
