"""tinyfrcnn: Faster R-CNN (Ren et al., 2015) from scratch in NumPy, Numba and numba-cuda."""

__version__ = "0.1.0"
