"""tinyfrcnn: Faster R-CNN (Ren et al., 2015) from scratch in NumPy, Numba and numba-cuda."""

import os

# Numba's parallel kernels and OpenBLAS's worker threads (which spin between matrix
# products) compete for the same cores; on a small machine one BLAS thread makes a
# training step about twice as fast. Takes effect only if NumPy is not imported yet;
# set OPENBLAS_NUM_THREADS yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
