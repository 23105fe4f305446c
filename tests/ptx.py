"""Compile CUDA kernels to PTX for sm_90 in a fresh process without the simulator.

numba's simulator runs kernels as Python and misses type errors that the real compiler
catches; ``numba.cuda.compile_ptx`` needs no GPU, only the NVVM library that
``numba-cuda[cu13]`` installs, so every machine can run this check. It also shows what
the simulator cannot: float64 arithmetic in a float32 kernel (a Python float or an int
mixed in), or a multiply and an add fused into one rounding.
"""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import importlib, json, re, sys
from numba import cuda
jobs = json.loads(sys.argv[1])
for module_name, kernel_name, signature, forbidden in jobs:
    module = importlib.import_module(module_name)
    kernel = getattr(module, kernel_name)
    fn = getattr(kernel, "py_func", kernel)
    ptx, _ = cuda.compile_ptx(fn, signature, cc=(9, 0))
    assert ".entry" in ptx or ".func" in ptx, (kernel_name, "no entry in PTX")
    found = [m.group(0) for pattern in forbidden for m in [re.search(pattern, ptx)] if m]
    assert not found, (kernel_name, signature, "PTX holds", found)
    print("ok", module_name, kernel_name)
"""

# Absent from the kernels that promise the CPU kernel's rounding step for step: fused
# multiply-adds, and in a float32 kernel any float64 arithmetic (conversions are allowed).
F64_ARITHMETIC = r"\b(?:add|sub|mul|div|fma|min|max|abs|neg|setp\.[a-z]+)(?:\.rn)?\.f64\b"
FUSED = r"\bfma\.rn\.f(?:32|64)\b"
SAME_ROUNDING_AS_CPU = {"float32": (F64_ARITHMETIC, FUSED), "float64": (FUSED,)}


def assert_compiles_to_ptx(jobs):
    """``jobs``: list of (module, kernel attribute, signature string), each optionally
    with a fourth item, regular expressions that must not match the PTX (such as
    ``SAME_ROUNDING_AS_CPU``)."""
    jobs = [list(job) + [[]] if len(job) == 3 else [*job[:3], list(job[3])] for job in jobs]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(jobs), proc.stdout
