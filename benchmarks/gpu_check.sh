#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the benchmark table (benchmarks/bench_gpu.py) and the
# tests that run CUDA kernels, on the real device instead of numba's simulator, in one go,
# logging both:
#
#   bash benchmarks/gpu_check.sh [OUT]      # OUT: folder for the logs (default gpu_check)
#
# BENCH_TIMEOUT and TEST_TIMEOUT (seconds, default 240 and 200) bound the two halves;
# bench_gpu.py rewrites OUT/bench_gpu_results.json after every row, so a cut-short run
# keeps what it measured. The exit status is non-zero if either half failed.
set -o pipefail
out=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd) || exit 1
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0

# Versions first, and stop at once if numba cannot reach the GPU (numba-cuda 0.30 fails
# to import with NumPy 2.5 or later).
"$python" - <<'PY' 2>&1 | tee "$out/versions.log" || exit 2
import sys
from importlib.metadata import version
import numpy, numba
from numba import cuda
print("python", sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__,
      "numba-cuda", version("numba-cuda"))
if not cuda.is_available():
    sys.exit("numba finds no CUDA GPU")
print("gpu", getattr(cuda.get_current_device(), "name", "(numba's simulator)"))
PY

timeout "${BENCH_TIMEOUT:-240}" "$python" benchmarks/bench_gpu.py --json "$out/bench_gpu_results.json" 2>&1 \
    | tee "$out/bench_gpu.log"
bench=$?

# The tests that launch CUDA kernels (by name), without the chapters (they need a
# notebook kernel) and without the simulated benchmark run.
tests="cuda or packed or store or device or gpu or degenerate or hand_worked or test_empty"
tests="$tests or broken_packing or batch_and_channel or bias_gradient or upload_host_rois or does_not_wait"
timeout "${TEST_TIMEOUT:-200}" "$python" -m pytest -v --durations=15 -p no:cacheprovider \
    -k "($tests) and not chapter and not bench_gpu and not coco" tests/ 2>&1 | tee "$out/pytest.log"
status=$?

echo "bench_gpu.py exit status $bench, pytest exit status $status (logs in $out/)"
[ "$bench" -eq 0 ] && [ "$status" -eq 0 ]
