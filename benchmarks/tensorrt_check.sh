#!/usr/bin/env bash
# The whole TensorRT path on a machine that has TensorRT, cuda-python and an NVIDIA GPU, in one command.
#
#   bash benchmarks/tensorrt_check.sh [WORK_DIR]      (from the repository root, ../shared beside it)
#
# Steps, each logged to WORK_DIR/NN-name.log; the script stops at the first failure and says which:
#   1 doctor             TensorRT, cuda-python and the GPU are usable (the "backends:" line says tensorrt ready)
#   2 export             the CD 16x bundle, offline from ../shared/models/cd-wct-16x
#   3 build --check      the static check (no GPU needed) passes at fp32 and fp16
#   4 build fp32, fp16   real engines; a second build finds them all up to date
#   5 tests              every test marked tensorrt (TensorRT runner conformance at TF32's tolerance, fp32/fp16
#                        accuracy, the 40 MP run under 2 GB) and the GPU device-memory tests; none may be skipped
#   6 throughput         benchmarks/tensorrt_throughput.py (per-network MP/s, the tiled cascade, peak memory)
# Exit status: 0 when every step passed; else the failing step's number.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
US=("$PY" -m ultrastyle.cli.main)
WORK=${1:-$(mktemp -d /tmp/ultrastyle-trt-check.XXXXXX)}
mkdir -p "$WORK"
BUNDLE="$WORK/cd16x"
export ULTRASTYLE_HOME="$WORK/home"
echo "logs in $WORK"

step() {  # step NUMBER NAME COMMAND...: run, log, stop with NUMBER on failure
    local n=$1 name=$2
    shift 2
    local log="$WORK/$(printf '%02d' "$n")-$name.log"
    local t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        echo "ok   $n $name ($((SECONDS - t0)) s)"
    else
        echo "FAIL $n $name ($((SECONDS - t0)) s): last lines of $log:"
        tail -n 25 "$log"
        exit "$n"
    fi
}

step 1 doctor bash -c "${US[*]} doctor && ${US[*]} doctor | grep -q 'tensorrt ready'"
step 2 export "${US[@]}" export ../shared/models/cd-wct-16x -o "$BUNDLE"
step 3 check bash -c "${US[*]} build '$BUNDLE' --check --precision fp32 && ${US[*]} build '$BUNDLE' --check --precision fp16"
step 4 build bash -c "${US[*]} build '$BUNDLE' --precision fp32 && ${US[*]} build '$BUNDLE' --precision fp16 \
    && ${US[*]} build '$BUNDLE' --precision fp32 | grep -q '^0 engine(s) built'"
# -rs lists skips: a skipped TensorRT test means the stack is incomplete, so it fails the step (pycuda is optional)
tests() {
    "$PY" -m pytest -q -rs -m 'tensorrt or gpu' tests/test_trt_runner.py tests/test_gpu.py >"$WORK/pytest.out" 2>&1
    local rc=$?
    cat "$WORK/pytest.out"
    [ "$rc" -eq 0 ] || return "$rc"
    ! grep -E '^SKIPPED' "$WORK/pytest.out" | grep -v pycuda
}
step 5 tests tests
step 6 throughput "$PY" benchmarks/tensorrt_throughput.py --bundle "$WORK/bench-cd16x" --megapixels 16 --max-memory 2GB
echo "all TensorRT checks passed; logs in $WORK"
