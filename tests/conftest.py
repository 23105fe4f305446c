"""Test setup: CUDA kernels run in numba's simulator unless told otherwise.

On a machine with an NVIDIA GPU, run ``NUMBA_ENABLE_CUDASIM=0 python -m pytest`` to test
the kernels on the real device. The variable must be set before numba is imported,
which is why it is set here, at collection time.

The property tests draw the same examples on every run, so that the suite passes or
fails the same way on every machine, and none has a time limit;
``python -m pytest --hypothesis-profile=explore`` draws fresh random ones each time, to
hunt for new failing cases.
"""

import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("TINYFRCNN_QUICK", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as tinyfrcnn/__init__.py, before NumPy loads
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, deadline=None)  # no test is timed
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile("repeatable")
