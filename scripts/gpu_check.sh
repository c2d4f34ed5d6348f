#!/usr/bin/env bash
# The GPU checks in one run, for a new machine or a change to the training step:
# the CUDA tests (the GPU computes what the CPU does, and makes no host-device sync
# in a training step), the benchmarks' figures that docs/gpu.md reports (quantizers
# beside vector-quantize-pytorch, eager and compiled; the training loop with and
# without model.compile; syncs per step), each step in its own time limit, a failed
# step not stopping the rest. Logs and JSON go to $OUT; a summary is printed last.
#
#   scripts/gpu_check.sh                          # on a GPU machine: about 10 minutes on an H200
#   DEVICE=cpu QUICK=1 scripts/gpu_check.sh       # a dry run of every step on a CPU, tiny sizes
#
# Environment: OUT (default reports/gpu-check), DATA (the folder holding MNIST/raw and
# fsdd/recordings; default ../shared/data, where the tests look too), PYTHON (default
# .venv/bin/python if there is one, else python3), DEVICE (cuda), QUICK (unset).
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-reports/gpu-check}
DATA=${DATA:-../shared/data}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
QUICK=${QUICK:+--quick}
SCALE=$([ "$DEVICE" = cuda ] && echo 1 || echo 4)  # the time limits below, times this on a CPU
BUDGET=${BUDGET:-$((570 * SCALE))}  # seconds for the whole run: a GPU's lease may be short, so the order below is the priority
# the compiled cases: those of the issue's targets (each compiles in a process of its own)
COMPILED_CASES=$([ -n "$QUICK" ] && echo 'VQ \(EMA\) K=16$|SimVQ K=16$' || echo 'VQ \(EMA\) K=(1024|8192)$|restarts|SimVQ K=8192')
export WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"

# step NAME SECONDS COMMAND...: run it into $OUT/NAME.log, for SECONDS at most and never past
# the whole run's BUDGET; note how it ended
step() {
    local name=$1 limit=$(($2 * SCALE)) started=$SECONDS status
    shift 2
    [ $((BUDGET - SECONDS)) -lt "$limit" ] && limit=$((BUDGET - SECONDS))
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    if [ "$limit" -lt 20 ]; then
        echo "   SKIPPED: the run's budget of $BUDGET s is spent" | tee -a "$OUT/summary.txt"
        return
    fi
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    case $status in
        0) echo "   ok, $((SECONDS - started)) s" ;;
        124 | 137) echo "   STOPPED at its limit of $limit s (exit $status)" ;;
        *) echo "   FAILED (exit $status), $((SECONDS - started)) s: see $OUT/$name.log" ;;
    esac | tee -a "$OUT/summary.txt"
}
# bench NAME SECONDS SUBCOMMAND ARGS...: a `scripts/bench.py` step, its JSON in $OUT/NAME.json
bench() { step "$1" "$2" "$PYTHON" scripts/bench.py "$3" --device "$DEVICE" --out "$OUT/$1.json" $QUICK "${@:4}"; }

step environment 60 "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
bench quantizers 150 quantizers --compare vector-quantize-pytorch
bench train 90 train
bench train-compiled 120 train model.compile=true
bench quantizers-compiled 120 quantizers --compile --cases "$COMPILED_CASES"
step tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compile.py -k "cuda or traced"
bench syncs 90 syncs --models image --precision bf16-mixed --fsdd "$DATA/fsdd/recordings"

# the lines that matter from each log: tables, overheads, the tests' verdict
for name in environment quantizers train train-compiled quantizers-compiled tests syncs; do
    log="$OUT/$name.log"
    [ -f "$log" ] || continue
    echo "--- $name"
    case $name in
        environment) tail -n 1 "$log" ;;
        quantizers*) sed -n '/^case /,/^$/p; /target/p' "$log" ;;
        train*) sed -n '/^loop /,/^host-device/p' "$log" ;;
        tests) grep -E "passed|failed|error" "$log" | tail -n 5 ;;
        syncs) sed -n '/^model /,/^$/p' "$log" ;;
    esac
done | tee -a "$OUT/summary.txt"
