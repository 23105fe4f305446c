"""Compile CUDA kernels to PTX for sm_90 in a fresh process without the simulator.

numba's simulator runs kernels as Python and misses type errors that the real compiler
catches; ``numba.cuda.compile_ptx`` needs no GPU, only the NVVM library that
``numba-cuda[cu13]`` installs, so every machine can run this check.
"""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import importlib, json, sys
from numba import cuda
jobs = json.loads(sys.argv[1])
for module_name, kernel_name, signature in jobs:
    module = importlib.import_module(module_name)
    kernel = getattr(module, kernel_name)
    fn = getattr(kernel, "py_func", kernel)
    ptx, _ = cuda.compile_ptx(fn, signature, cc=(9, 0))
    assert ".entry" in ptx or ".func" in ptx, (kernel_name, "no entry in PTX")
    print("ok", module_name, kernel_name)
"""


def assert_compiles_to_ptx(jobs):
    """``jobs``: list of (module, kernel attribute, signature string)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(jobs), proc.stdout
