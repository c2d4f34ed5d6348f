"""scripts/bench.py runs end to end: every subcommand at tiny sizes (`--quick`), JSON
written with the expected fields. No timing is asserted: this machine is shared.
Each run starts Python processes (one per quantizer case): the longer ones are `slow`."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench.py"


def bench(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quantizers_quick(tmp_path):
    out = tmp_path / "q.json"
    stdout = bench("quantizers", "--quick", "--cases", r"VQ \(EMA\) K=16$", "--out", str(out))
    report = json.loads(out.read_text())
    (record,) = report["results"]
    assert record["status"] == "ok" and record["impl"] == "vqtrain" and record["median_s"] > 0
    assert record["peak_extra_bytes"] >= 0 and 0 < record["fraction_of_matmul_ceiling"]
    assert 0 < record["launches"] < record["aten_ops"]  # views and allocations launch nothing
    assert report["matmul"][0]["ceiling_gflops"] > 0 and "GFLOP/s" in stdout


@pytest.mark.slow
def test_quantizers_compiled_bookkeeping_launches_fewer_kernels(tmp_path):
    records = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"q{len(flags)}.json"
        bench("quantizers", "--quick", "--cases", r"VQ \(EMA\) K=16$", *flags, "--out", str(out))
        (records[bool(flags)],) = json.loads(out.read_text())["results"]
    assert records[True]["status"] == "ok" and "aten_ops" not in records[True]  # a dispatch mode would run it eagerly
    assert records[True]["launches"] < records[False]["launches"]


@pytest.mark.slow
def test_quantizers_with_reference(tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    out = tmp_path / "q.json"
    stdout = bench(
        "quantizers",
        "--compare",
        "vector-quantize-pytorch",
        "--quick",
        "--cases",
        r"VQ \(EMA\) K=16$|Residual|FSQ \[8, 5",
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    assert report["subcommand"] == "quantizers" and "load_avg_end" in report["machine"]
    cases = {(r["case"], r["impl"]): r for r in report["results"]}
    assert {case for case, _ in cases} == {"VQ (EMA) K=16", "ResidualVQ 2x16", "FSQ [8, 5, 5, 5]"}
    for record in cases.values():
        assert record["status"] == "ok", record
        assert record["median_s"] > 0 and record["peak_extra_bytes"] >= 0
    (matmul,) = report["matmul"]
    assert matmul["size"] == 16 and matmul["ceiling_gflops"] > 0
    assert 0 < cases[("VQ (EMA) K=16", "vqtrain")]["fraction_of_matmul_ceiling"]
    assert all(row["speedup"] > 0 for row in report["summary"])
    assert "speed-up" in stdout and "GFLOP/s" in stdout


def test_quantizers_memory_cap_reports_oom(tmp_path):
    """A cap far below what a case needs: reported as OOM, not a crash."""
    out = tmp_path / "q.json"
    bench(
        "quantizers",
        "--quick",
        "--cases",
        r"VQ \(EMA\) K=16$",
        "--tokens",
        "65536",
        "--mem-cap-gb",
        "0.05",
        "--out",
        str(out),
    )
    (record,) = json.loads(out.read_text())["results"]
    assert record["status"] == "OOM", record


def test_quantizers_skip_what_would_not_fit(monkeypatch: pytest.MonkeyPatch):
    """The need of a larger case is the largest smaller one of the same kind and implementation, scaled by K."""
    monkeypatch.syspath_prepend(str(REPO))  # as bench.py does: the benchmarks import each other as scripts.benchmarks
    module = importlib.import_module("scripts.benchmarks.quantizers")
    results = [
        {"impl": "ref", "kind": "vq", "size": 1024, "status": "ok", "peak_extra_bytes": 100},
        {"impl": "ref", "kind": "vq", "size": 8192, "status": "ok", "peak_extra_bytes": 1000},
        {"impl": "ours", "kind": "vq", "size": 8192, "status": "ok", "peak_extra_bytes": 10},
    ]
    assert module.estimate_need(results, {"kind": "vq", "size": 65536}, "ref") == 8000
    assert module.estimate_need(results, {"kind": "simvq", "size": 65536}, "ref") is None


@pytest.mark.slow
def test_train_overhead(tmp_path):
    out = tmp_path / "t.json"
    stdout = bench("train", "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    for kind in ("bare", "plain", "lightning"):
        (run,) = report["runs"][kind]
        assert run["steps_per_s"] > 0 and run["cpu_seconds_per_step"] >= 0
    assert math.isfinite(report["overhead_fraction"]) and report["same_batches"]
    # the plain loop runs the model's own step: its bookkeeping ops, and Lightning adds few of its own
    ops = report["ops_per_step"]
    assert ops["bare"] < ops["plain"] <= ops["lightning"] < ops["plain"] + 20, ops
    assert report["syncs_per_step"] == 0
    assert "Lightning's overhead" in stdout


@pytest.mark.slow
def test_data_bucketing(tmp_path):
    """A tiny FSDD-like folder ({digit}_{speaker}_{take}.wav with the val and test speakers)."""
    root = tmp_path / "recordings"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, speaker in enumerate(["jackson"] * 12 + ["theo", "george"]):
        frames = int(rng.integers(400, 4000))
        sf.write(root / f"{i % 10}_{speaker}_{i}.wav", rng.uniform(-0.5, 0.5, frames).astype(np.float32), 8000)
    out = tmp_path / "d.json"
    bench("data", "--quick", "--part", "audio", "--root", str(root), "--batch-size", "4", "--out", str(out))
    report = json.loads(out.read_text())
    by_setting = {r["bucketing"]: r for r in report["results"]}
    assert set(by_setting) == {True, False}
    for record in by_setting.values():
        assert record["clips"] == 12 and record["loader_clips_per_s"] > 0 and record["train_clips_per_s"] > 0
        assert 0 <= record["padding_fraction"] < 1
    assert by_setting[True]["padding_fraction"] <= by_setting[False]["padding_fraction"]


@pytest.mark.slow
def test_data_images_quick(tmp_path):
    """Both image paths run and see the same batches (shapes at --quick)."""
    out = tmp_path / "d.json"
    stdout = bench("data", "--quick", "--part", "images", "--out", str(out))
    report = json.loads(out.read_text())["images"]
    assert [r["path"] for r in report["results"]] == ["loader", "on-device"] and report["same_batches"]
    assert all(r["batches"] == 5 and r["batches_per_s"] > 0 for r in report["results"])
    assert "same batches: True" in stdout


SHARED_DATA = REPO.parent / "shared" / "data"


def quality_rows(tmp_path, data: str, *args: str) -> tuple[dict, str]:
    pytest.importorskip("vector_quantize_pytorch")
    folder = SHARED_DATA / ("MNIST/raw" if data == "mnist" else "fsdd/recordings")
    if not folder.is_dir() or not any(folder.iterdir()):
        pytest.skip(f"real {data} absent: expected it in {folder}")
    out = tmp_path / "quality.json"
    stdout = bench("quality", "--data", data, "--threads", "1", "--out", str(out), *args, timeout=120)
    return json.loads(out.read_text()), stdout


def test_quality_quick(tmp_path):
    """Ours beside the reference for two methods on real MNIST at a tiny budget: every row
    has its scores (per level for the residual one) and both sides of a pair trained the
    same initial net on the same batches."""
    report, stdout = quality_rows(
        tmp_path, "mnist", "--methods", "vq", "rvq", "--steps", "5", "--batch-size", "16", "--test-limit", "256"
    )
    rows = {(r["method"], r["impl"]): r for r in report["rows"]}
    assert set(rows) == {(m, i) for m in ("vq", "rvq") for i in ("vqtrain", "vector-quantize-pytorch")}
    for (method, _), r in rows.items():
        levels = 4 if method == "rvq" else 1
        assert r["status"] == "ok" and r["steps"] == 5 and r["batch_size"] == 16, r
        assert r["test_items"] == 256 and r["test_positions"] == 256 * 49
        assert math.isfinite(r["test_mse"]) and r["test_mse"] > 0 and r["steps_per_s"] > 0 and r["wall_seconds"] > 0
        assert r["codebook_sizes"] == [256 if method == "rvq" else 1024] * levels
        assert len(r["utilization"]) == len(r["perplexity"]) == len(r["dead_codes"]) == levels
        for size, util, ppl, dead in zip(r["codebook_sizes"], r["utilization"], r["perplexity"], r["dead_codes"]):
            assert 0 < util <= 1 and 1 <= ppl <= size and dead == size - round(util * size)
    for method in ("vq", "rvq"):
        ours, ref = rows[(method, "vqtrain")], rows[(method, "vector-quantize-pytorch")]
        assert ours["data_hash"] == ref["data_hash"] and ours["init_hash"] == ref["init_hash"]
    assert rows[("vq", "vqtrain")]["config"]["_target_"] == "vqtrain.quantizers.VectorQuantizer"
    assert all(pair["same_batches_and_init"] for pair in report["pairs"]) and len(report["pairs"]) == 2
    assert "| mnist | 5x16 | rvq | reference |" in stdout


def test_quality_fsdd_masks(tmp_path):
    """FSDD: padded batches; ours and the reference's VectorQuantize both get the mask,
    scores count real positions only, and both sides saw the same batches."""
    report, _ = quality_rows(
        tmp_path,
        "fsdd",
        "--methods",
        "vq",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--train-limit",
        "24",
        "--test-limit",
        "8",
    )
    ours, ref = report["rows"]
    assert ours["impl"] == "vqtrain" and ref["impl"] == "vector-quantize-pytorch" and ref["reference_masked"]
    assert ours["test_items"] == 8 and ours["test_positions"] == ref["test_positions"] > 0
    assert ours["data_hash"] == ref["data_hash"] and math.isfinite(ours["test_mse"]) and math.isfinite(ref["test_mse"])


def gpu_check(tmp_path: Path, **env: str) -> tuple[str, str]:
    """scripts/gpu_check.sh run as a CPU dry run (its stdout, its summary.txt)."""
    out = tmp_path / "gpu-check"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        env=os.environ | {"DEVICE": "cpu", "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, **env},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, (out / "summary.txt").read_text()


STEPS = ("environment", "quantizers", "train", "train-compiled", "quantizers-compiled", "tests", "syncs")


def test_gpu_check_skips_the_steps_its_budget_leaves_no_time_for(tmp_path):
    stdout, summary = gpu_check(tmp_path, BUDGET="0")
    assert [line.split(":")[0] for line in summary.splitlines() if line.startswith("== ")] == [f"== {s}" for s in STEPS]
    assert summary.count("SKIPPED: the run's budget of 0 s is spent") == len(STEPS) and stdout == summary


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """Every step of the GPU check runs on a CPU at tiny sizes, and its summary holds the tables."""
    _, summary = gpu_check(tmp_path)
    assert summary.count("   ok, ") == len(STEPS), summary
    for line in ("VQ (EMA) K=16", "lightning", "passed", "vq_tricks  bf16-mixed"):
        assert line in summary, line
