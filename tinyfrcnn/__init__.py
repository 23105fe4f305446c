"""tinyfrcnn: Faster R-CNN (Ren et al., 2015) from scratch in NumPy, Numba and numba-cuda."""

import os

# Numba's parallel kernels and OpenBLAS's worker threads (which spin between matrix
# products) compete for the same cores; on a small machine one BLAS thread makes a
# training step about twice as fast (tinyfrcnn.matmul runs a large product as two halves
# on two threads instead). Numba's OpenMP workers, idle during those products, sleep
# rather than spin; the policy holds for the process's one OpenMP runtime, torch's
# included. Both take effect only if NumPy and the OpenMP runtime have not started yet;
# set either variable yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"
