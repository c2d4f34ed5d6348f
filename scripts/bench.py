"""Benchmarks, one module each under scripts/benchmarks/ (its docstring says what
it measures and how): quantizer speed and memory, training-loop overhead, audio
data throughput, quality against the reference, host-device syncs per training
step (`bench.py NAME -h`).

    python scripts/bench.py quantizers --compare vector-quantize-pytorch
    python scripts/bench.py train
    python scripts/bench.py data
    python scripts/bench.py quantizers --device cuda        # on a GPU machine
    python scripts/bench.py syncs --device cuda             # host-device syncs per training step

Every subcommand prints a table and writes JSON (`--out`, default
reports/bench-<subcommand>.json) with the raw timings, the machine load
(1-minute load average before and after) and the settings used. Timings on a
shared machine are noisy: read them next to the load figures. On a CPU shared
with other busy processes, OpenMP's default spin-waiting can add milliseconds
to every parallel op; `--omp-wait-policy passive` runs with OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

from scripts.benchmarks import data, quality, quantizers, syncs, train  # noqa: E402
from scripts.benchmarks.common import machine_info, write_json  # noqa: E402

BENCHMARKS = {"quantizers": quantizers, "train": train, "data": data, "quality": quality, "syncs": syncs}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_case":  # a child process: one quantizer case
        print(json.dumps(quantizers.run_case(json.loads(argv[1]))), flush=True)
        return
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common.add_argument("--out", type=Path, help="JSON output (default reports/bench-<subcommand>.json)")
    common.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that everything runs, measures nothing useful"
    )
    common.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    common.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active"],
        help="set OMP_WAIT_POLICY for the run (default: as in the environment). On a machine "
        "shared with other busy processes, 'passive' avoids OpenMP threads spinning while "
        "their peers wait for a core, which can slow every parallel op by milliseconds",
    )

    for benchmark in BENCHMARKS.values():
        benchmark.add_parser(sub, common)

    args = parser.parse_args(argv)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY", "").upper() != args.omp_wait_policy.upper():
        # OpenMP reads its settings when torch loads it: start again with the policy set (children inherit it)
        env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy.upper()}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {
        "subcommand": args.command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": argv,
        "machine": machine_info(args.device),
    }
    payload.update(BENCHMARKS[args.command].run(args))
    payload["machine"]["load_avg_end"] = os.getloadavg()
    write_json(args.out or REPO / "reports" / f"bench-{args.command}.json", payload)


if __name__ == "__main__":
    main()
