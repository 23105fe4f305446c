#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the benchmark table (benchmarks/bench_gpu.py) and the
# CUDA tests on the real device instead of numba's simulator, in one go, logging both:
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: folder for the logs (default gpu_check)
#
# BENCH_TIMEOUT and TEST_TIMEOUT (seconds, default 330 and 240) bound the two halves;
# bench_gpu.py rewrites OUT/bench_gpu_results.json after every row, so a cut-short run
# keeps what it measured. The exit status is non-zero if either half failed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

timeout "${BENCH_TIMEOUT:-330}" "$python" benchmarks/bench_gpu.py --json "$out/bench_gpu_results.json" 2>&1 \
    | tee "$out/bench_gpu.log"
bench=$?

# Every test that touches a CUDA kernel, the device buffer pool or the packed SGD update;
# the chapters are left out (they need a notebook kernel and run in the simulator anyway).
NUMBA_ENABLE_CUDASIM=0 timeout "${TEST_TIMEOUT:-240}" "$python" -m pytest -v --durations=15 \
    -p no:cacheprovider -k "(cuda or packed or store) and not chapter" tests/ 2>&1 | tee "$out/pytest.log"
tests=$?

echo "bench_gpu.py exit status $bench, pytest exit status $tests (logs in $out/)"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
