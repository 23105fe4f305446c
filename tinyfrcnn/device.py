"""Where arrays live, and how ops choose between their CPU and CUDA kernels.

The rule every op follows: NumPy arrays in, the Numba CPU kernel runs and NumPy arrays
come out; numba device arrays in, the CUDA kernel runs and device arrays come out.
Mixing the two in one call is an error, and so is asking for CUDA where there is none:
nothing ever falls back silently.

Tests run the CUDA kernels without a GPU in numba's simulator: set
``NUMBA_ENABLE_CUDASIM=1`` before numba is first imported.
"""

import numpy as np

DEVICES = ("cpu", "cuda")


def cuda_available():
    """True when numba can launch CUDA kernels (a GPU, or the simulator)."""
    from numba import cuda

    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver counts as no GPU
        return False


def require_cuda(what="this operation"):
    """Raise a clear error unless CUDA kernels can run."""
    if not cuda_available():
        raise RuntimeError(
            f"{what} asked for CUDA, but numba finds no usable GPU "
            "(use device='cpu', or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels "
            "in numba's simulator)"
        )


def check_device(device):
    """Validate a ``device`` argument ('cpu' or 'cuda')."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        require_cuda(f"device={device!r}")
    return device


def is_device_array(x):
    """True for a numba CUDA device array (real or simulated)."""
    if isinstance(x, np.ndarray) or np.isscalar(x) or x is None:
        return False
    from numba.cuda.cudadrv import devicearray

    return bool(devicearray.is_cuda_ndarray(x))


def on_device(name_to_array):
    """Decide where a call runs from its array arguments.

    ``name_to_array`` maps argument names to arrays. Returns True when every array is a
    device array, False when none is; mixing the two raises ValueError naming them.
    """
    where = {name: is_device_array(a) for name, a in name_to_array.items()}
    if all(where.values()):
        if where:
            require_cuda("a call with device arrays")
        return bool(where)
    if any(where.values()):
        dev = [n for n, d in where.items() if d]
        host = [n for n, d in where.items() if not d]
        raise ValueError(
            f"arguments {dev} are CUDA device arrays but {host} are not; "
            "pass all NumPy arrays (CPU) or all device arrays (CUDA)"
        )
    return False


def to_device(x):
    """Copy a NumPy array to the GPU (device arrays pass through)."""
    from numba import cuda

    if is_device_array(x):
        return x
    require_cuda("to_device")
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    """Copy a device array back to a NumPy array (NumPy arrays pass through)."""
    if is_device_array(x):
        return x.copy_to_host()
    return np.asarray(x)


def grid_1d(n, threads=256):
    """(blocks, threads) that cover ``n`` threads, at least one block."""
    return max(1, (int(n) + threads - 1) // threads), threads
