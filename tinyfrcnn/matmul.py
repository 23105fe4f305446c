"""Matrix multiply: ``C = op(A) @ op(B)``, with ``op(X)`` either ``X`` or ``X^T``.

Every convolution and linear layer is a matrix product once im2col has laid the input
out as columns: forward ``Y = W X``, backward ``dW = dY X^T`` and ``dX = W^T dY``. The
transposes come for free here: the kernels read the stored array with swapped indices
instead of materialising ``X^T``, and ``accumulate=True`` adds into ``out`` because
parameter gradients accumulate over a batch.

CPU: ``np.matmul`` is the kernel. It calls BLAS, which is already cache-blocked and
vectorised; a Numba triple loop would be both slower and no clearer than the CUDA
kernels below, which are where the blocking is written out by hand. ``import tinyfrcnn``
keeps OpenBLAS to one thread: its worker threads would spin between products and take
the cores from Numba's kernels (see ``tinyfrcnn/__init__.py``). A large product
(``M N K >= 2^22``: every 3x3 convolution and the head's two hidden fc layers; the 1x1
and output layers stay whole) is cut instead into two halves along the longer side of
``C``, one per thread: the same two halves on any machine, so the numbers do not depend
on the core count.

CUDA, two kernels:

- ``_matmul_naive_kernel``: one thread per output element, reading a row of ``op(A)``
  and a column of ``op(B)`` straight from global memory: ``2K`` loads per ``2K`` flops.
- the tiled kernel: a block of threads computes a ``BM x BN`` tile of ``C``. It walks
  ``K`` in steps of ``BK``: the block copies a ``BM x BK`` tile of ``op(A)`` and a
  ``BK x BN`` tile of ``op(B)`` into shared memory (each element loaded from global
  memory once per block instead of once per output), waits (``syncthreads``), and
  each thread accumulates its own ``TM x TN`` outputs in registers. Each value read
  from shared memory is then used ``TN`` (or ``TM``) times.

Split K: when ``C`` is small and ``K`` long (the weight gradient ``dW = dY X^T`` of the
third backbone conv at batch 8 is 64 x 288 summed over 8192 positions), too few blocks
exist to fill the GPU. Then block ``z`` of the grid sums only its slice of ``K`` into
``partial[z]``, and a second kernel adds the slices in a fixed order:
``C = sum_z partial[z]``, same every run.
"""

import math
import os
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import cuda

from .checks import as_float_array
from .device import empty_on_device, launch, on_device

Tiling = namedtuple("Tiling", "bm bn bk tm tn")
Tiling.__doc__ = """Block tile ``bm x bn`` of C, ``bk`` of K per step, ``tm x tn`` outputs per thread."""

TILING = Tiling(bm=64, bn=64, bk=8, tm=4, tn=4)
MIN_SPLIT_K = 128
NAIVE_BLOCK = (16, 16)
# CUDA's limits: threads in a block, static shared memory per block, gridDim.y and .z
MAX_THREADS_PER_BLOCK = 1024
MAX_SHARED_BYTES = 48 * 1024
MAX_GRID_Y = 65535


def _matmul_reference(a, b, trans_a=False, trans_b=False):
    """``op(a) @ op(b)`` in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.matmul(a.T if trans_a else a, b.T if trans_b else b)


@cuda.jit
def _matmul_naive_kernel(a, b, out, trans_a, trans_b, accumulate):
    """One thread per ``out[i, j] = sum_k op(A)[i, k] op(B)[k, j]``; x runs along j so
    that neighbouring threads write neighbouring outputs."""
    j, i = cuda.grid(2)
    m, n = out.shape
    if i >= m or j >= n:
        return
    k_total = a.shape[0] if trans_a else a.shape[1]
    acc = cuda.local.array(1, dtype=out.dtype)
    acc[0] = 0
    for k in range(k_total):
        x = a[k, i] if trans_a else a[i, k]
        y = b[j, k] if trans_b else b[k, j]
        acc[0] += x * y
    if accumulate:
        out[i, j] += acc[0]
    else:
        out[i, j] = acc[0]


def _make_tiled_kernel(bm, bn, bk, tm, tn):
    """Compile-time tile sizes (numba freezes the closure values into the kernel)."""
    if bm % tm or bn % tn:
        raise ValueError(f"tile {bm}x{bn} must be a multiple of the per-thread block {tm}x{tn}")
    threads_m, threads_n = bm // tm, bn // tn
    threads = threads_m * threads_n
    if threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"a {bm}x{bn} tile at {tm}x{tn} per thread needs {threads} threads; "
                         f"a block holds at most {MAX_THREADS_PER_BLOCK}")
    if 8 * bk * (bm + bn) > MAX_SHARED_BYTES:
        raise ValueError(f"the {bk}x{bm} and {bk}x{bn} tiles need {8 * bk * (bm + bn)} bytes of shared memory "
                         f"in float64; a block has {MAX_SHARED_BYTES}")
    if (bm * bk) % threads or (bk * bn) % threads:
        raise ValueError(f"the {threads} threads must load the {bm}x{bk} and {bk}x{bn} tiles evenly")
    a_loads, b_loads = bm * bk // threads, bk * bn // threads

    @cuda.jit
    def matmul_tiled(a, b, out, trans_a, trans_b, accumulate, k_chunk):
        # out is (splits, M, N): block z sums k in [z*k_chunk, (z+1)*k_chunk) into out[z]
        _, m, n = out.shape
        z = cuda.blockIdx.z
        k_begin = z * k_chunk
        k_total = min(a.shape[0] if trans_a else a.shape[1], k_begin + k_chunk)
        row0 = cuda.blockIdx.y * bm
        col0 = cuda.blockIdx.x * bn
        tid = cuda.threadIdx.x
        ty = tid // threads_n
        tx = tid % threads_n
        # Thread (ty, tx) owns rows ty + i*threads_m and columns tx + j*threads_n of the
        # tile: a warp then reads consecutive words of b_tile and writes consecutive
        # columns of out.
        a_tile = cuda.shared.array((bk, bm), dtype=a.dtype)  # op(A)[row0:, k0:]^T
        b_tile = cuda.shared.array((bk, bn), dtype=b.dtype)  # op(B)[k0:, col0:]
        acc = cuda.local.array((tm, tn), dtype=out.dtype)
        a_reg = cuda.local.array(tm, dtype=a.dtype)
        b_reg = cuda.local.array(tn, dtype=b.dtype)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = 0

        for k0 in range(k_begin, k_total, bk):
            # Load: neighbouring threads take neighbouring addresses of the stored
            # array (coalesced), whichever way it is transposed; outside the matrix, 0.
            for r in range(a_loads):
                e = tid + r * threads
                if trans_a:
                    mm = e % bm
                    kk = e // bm
                else:
                    kk = e % bk
                    mm = e // bk
                gi = row0 + mm
                gk = k0 + kk
                a_tile[kk, mm] = 0
                if gi < m and gk < k_total:
                    a_tile[kk, mm] = a[gk, gi] if trans_a else a[gi, gk]
            for r in range(b_loads):
                e = tid + r * threads
                if trans_b:
                    kk = e % bk
                    nn = e // bk
                else:
                    nn = e % bn
                    kk = e // bn
                gj = col0 + nn
                gk = k0 + kk
                b_tile[kk, nn] = 0
                if gj < n and gk < k_total:
                    b_tile[kk, nn] = b[gj, gk] if trans_b else b[gk, gj]
            cuda.syncthreads()  # tiles complete before anyone reads them

            for kk in range(bk):
                for i in range(tm):
                    a_reg[i] = a_tile[kk, ty + i * threads_m]
                for j in range(tn):
                    b_reg[j] = b_tile[kk, tx + j * threads_n]
                for i in range(tm):
                    for j in range(tn):
                        acc[i, j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()  # everyone done reading before the next load overwrites

        for i in range(tm):
            gi = row0 + ty + i * threads_m
            if gi < m:
                for j in range(tn):
                    gj = col0 + tx + j * threads_n
                    if gj < n:
                        if accumulate:
                            out[z, gi, gj] += acc[i, j]
                        else:
                            out[z, gi, gj] = acc[i, j]

    matmul_tiled.tiling = Tiling(bm, bn, bk, tm, tn)
    return matmul_tiled


_matmul_tiled_kernel = _make_tiled_kernel(*TILING)
_TILED_KERNELS = {TILING: _matmul_tiled_kernel}


def tiled_kernel(tiling):
    """The tiled kernel for a ``Tiling`` (compiled once per tiling, kept)."""
    tiling = Tiling(*tiling)
    if tiling not in _TILED_KERNELS:
        _TILED_KERNELS[tiling] = _make_tiled_kernel(*tiling)
    return _TILED_KERNELS[tiling]


@cuda.jit
def _matmul_splitk_reduce_kernel(partial, out, accumulate):
    """``out[i, j] (+)= sum_z partial[z, i, j]``, z in order."""
    j, i = cuda.grid(2)
    splits, m, n = partial.shape
    if i >= m or j >= n:
        return
    acc = cuda.local.array(1, dtype=out.dtype)
    acc[0] = 0
    for z in range(splits):
        acc[0] += partial[z, i, j]
    if accumulate:
        out[i, j] += acc[0]
    else:
        out[i, j] = acc[0]


_SMS = []  # the GPU's multiprocessor count, asked of the driver once (each ask costs more than a launch)


def _multiprocessors():
    if not _SMS:
        _SMS.append(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1))  # the simulator has none
    return _SMS[0]


def choose_splits(m, n, k, tiling=TILING, multiprocessors=None):
    """How many slices of K: enough blocks for about two per multiprocessor, each
    slice at least ``MIN_SPLIT_K`` long."""
    sms = _multiprocessors() if multiprocessors is None else multiprocessors
    blocks = math.ceil(m / tiling.bm) * math.ceil(n / tiling.bn)
    if blocks >= sms:
        return 1
    return max(1, min(math.ceil(2 * sms / blocks), k // MIN_SPLIT_K))


def launch_tiled(a, b, out, trans_a, trans_b, accumulate, tiling=TILING, splits=None):
    """Launch the tiled kernel over ``out`` (device arrays, already validated; ``out``
    C-contiguous). ``splits`` slices of K (default: ``choose_splits``)."""
    kernel = tiled_kernel(tiling)
    t = kernel.tiling
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    splits = choose_splits(m, n, k, t) if splits is None else splits
    k_chunk = max(t.bk, math.ceil(math.ceil(k / max(splits, 1)) / t.bk) * t.bk)
    splits = max(1, math.ceil(k / k_chunk))
    threads = (t.bm // t.tm) * (t.bn // t.tn)
    grid = (math.ceil(n / t.bn), math.ceil(m / t.bm), splits)
    if max(grid[1:]) > MAX_GRID_Y:
        raise ValueError(f"launch_tiled: {m} rows and {splits} slices of K need a grid of {grid}; "
                         f"its y and z dimensions hold at most {MAX_GRID_Y} blocks")
    if splits == 1:
        launch(kernel, grid, threads, a, b, out.reshape(1, m, n), trans_a, trans_b, accumulate, k_chunk)
        return
    partial = empty_on_device((splits, m, n), dtype=out.dtype)  # (S, M, N)
    launch(kernel, grid, threads, a, b, partial, trans_a, trans_b, False, k_chunk)
    grid = (math.ceil(n / NAIVE_BLOCK[0]), math.ceil(m / NAIVE_BLOCK[1]))
    launch(_matmul_splitk_reduce_kernel, grid, NAIVE_BLOCK, partial, out, accumulate)


def launch_naive(a, b, out, trans_a, trans_b, accumulate):
    """Launch the one-thread-per-output kernel over ``out`` (device arrays, validated)."""
    m, n = out.shape
    grid = (math.ceil(n / NAIVE_BLOCK[0]), math.ceil(m / NAIVE_BLOCK[1]))
    launch(_matmul_naive_kernel, grid, NAIVE_BLOCK, a, b, out, trans_a, trans_b, accumulate)


def _validate(a, b, trans_a, trans_b, out, accumulate, where):
    a = as_float_array(a, "a", ndim=2, where=where)
    b = as_float_array(b, "b", ndim=2, where=where)
    for name, flag in (("trans_a", trans_a), ("trans_b", trans_b), ("accumulate", accumulate)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{where}: {name} must be True or False, got {flag!r}")
    if a.dtype != b.dtype:
        raise ValueError(f"{where}: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(
            f"{where}: inner dimensions differ: op(a) is {m}x{k} (a {tuple(a.shape)}, trans_a={bool(trans_a)}) "
            f"but op(b) is {k2}x{n} (b {tuple(b.shape)}, trans_b={bool(trans_b)})"
        )
    arrays = {"a": a, "b": b}
    if out is None:
        if accumulate:
            raise ValueError(f"{where}: accumulate=True needs out, the array to add into")
    else:
        out = as_float_array(out, "out", ndim=2, where=where)
        if tuple(out.shape) != (m, n):
            raise ValueError(f"{where}: out must have shape {(m, n)}, got {tuple(out.shape)}")
        if out.dtype != a.dtype:
            raise ValueError(f"{where}: out must have dtype {a.dtype}, got {out.dtype}")
        arrays["out"] = out
    gpu = on_device(arrays)
    if out is not None and not gpu and (np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        raise ValueError(f"{where}: out must not overlap a or b (it is written while they are read)")
    if out is not None and not gpu and not out.flags.writeable:
        raise ValueError(f"{where}: out is read-only")
    if gpu and out is not None and not out.is_c_contiguous():
        raise ValueError(f"{where}: out must be C-contiguous on the device")
    if gpu and math.ceil(m / NAIVE_BLOCK[1]) > MAX_GRID_Y:
        raise ValueError(f"{where}: op(a) has {m} rows; the CUDA kernels take at most "
                         f"{MAX_GRID_Y * NAIVE_BLOCK[1]} (the grid's y dimension holds {MAX_GRID_Y} blocks)")
    return a, b, out, (m, k, n), gpu


HALVES_FROM = 1 << 22  # M * N * K from which a host product runs as two halves
_helper = (None, None)  # (process id, executor): a forked child starts its own thread


def _blas_product(a, b, out, accumulate):
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``) by NumPy's BLAS."""
    if accumulate:
        out += np.matmul(a, b)
    else:
        np.matmul(a, b, out=out)


def _helper_thread():
    """The one worker thread that computes the second half of a large host product."""
    global _helper
    pid, executor = _helper
    if pid != os.getpid():
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyfrcnn-matmul")
        _helper = (os.getpid(), executor)
    return executor


def _device_matmul(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """``matmul`` of device arrays that the caller has checked (2-D, one float dtype,
    inner dimensions agreeing; ``out`` of the result's shape, C-contiguous): the layers'
    products on the GPU, without checking them again."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if out is None:
        out = empty_on_device((m, n), dtype=a.dtype)  # (M, N)
    if m and n:
        launch_tiled(a, b, out, trans_a, trans_b, accumulate)
    return out


def matmul(a, b, trans_a=False, trans_b=False, out=None, accumulate=False):
    """``op(a) @ op(b)`` for 2-D float32/float64 arrays, ``op(x) = x.T`` where asked.

    ``C[i, j] = sum_k op(A)[i, k] op(B)[k, j]``. With ``out``, the result is written
    there (``accumulate=True``: added to it, ``out += op(a) @ op(b)``) and ``out`` is
    returned; ``out`` must not overlap ``a`` or ``b``. NumPy in: ``np.matmul`` (BLAS; a
    large product as two halves on two threads). Numba device arrays in: the tiled
    shared-memory CUDA kernel, device array out.
    Same numbers as ``torch.matmul`` up to float rounding (summation order differs).
    """
    where = "matmul"
    a, b, out, (m, k, n), gpu = _validate(a, b, trans_a, trans_b, out, accumulate, where)
    if gpu:
        return _device_matmul(a, b, bool(trans_a), bool(trans_b), out, bool(accumulate))
    a = a.T if trans_a else a
    b = b.T if trans_b else b
    if out is None:
        out = np.empty((m, n), dtype=a.dtype)  # (M, N)
        accumulate = False
    if m * n * k < HALVES_FROM:
        _blas_product(a, b, out, accumulate)
        return out
    # (M, K) @ (K, N) as two independent halves of C: rows if M >= N, else columns
    if m >= n:
        halves = [(a[:m // 2], b, out[:m // 2]), (a[m // 2:], b, out[m // 2:])]
    else:
        halves = [(a, b[:, :n // 2], out[:, :n // 2]), (a, b[:, n // 2:], out[:, n // 2:])]
    second = _helper_thread().submit(_blas_product, *halves[1], accumulate)
    try:
        _blas_product(*halves[0], accumulate)
    finally:
        second.result()  # never return (or raise) while the helper still writes into out
    return out
