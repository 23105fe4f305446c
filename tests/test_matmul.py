"""matmul: CPU path, the tiled and naive CUDA kernels (simulator), validation, PTX."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import cuda

from ptx import assert_compiles_to_ptx
from tinyfrcnn import matmul as mm
from tinyfrcnn.device import is_device_array
from tinyfrcnn.matmul import matmul

# Tiny tiles keep the simulator quick (16 threads a block) while a 17x33x5 product
# still spans several tiles in M and K and leaves ragged edges in every dimension.
SMALL = mm.Tiling(bm=8, bn=8, bk=4, tm=2, tn=2)
TOL = {np.float32: 2e-5, np.float64: 1e-12}
TRANSPOSES = [(False, False), (True, False), (False, True), (True, True)]


def operands(rng, m, k, n, trans_a, trans_b, dtype):
    """Stored arrays a, b whose op(a) is (m, k) and op(b) is (k, n)."""
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    return a, b


def assert_close(got, want, dtype):
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


# ------------------------------------------------------------------ CPU


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_cpu_matches_reference(dtype, trans_a, trans_b):
    rng = np.random.default_rng(0)
    a, b = operands(rng, 17, 33, 5, trans_a, trans_b, dtype)
    got = matmul(a, b, trans_a, trans_b)
    assert got.dtype == dtype and got.shape == (17, 5)
    assert_close(got, mm._matmul_reference(a, b, trans_a, trans_b), dtype)


def test_cpu_out_and_accumulate():
    rng = np.random.default_rng(1)
    a, b = operands(rng, 6, 4, 3, False, True, np.float64)
    want = mm._matmul_reference(a, b, False, True)
    out = np.full((6, 3), np.nan)
    assert matmul(a, b, trans_b=True, out=out) is out
    assert_close(out, want, np.float64)
    start = rng.standard_normal((6, 3))
    out = start.copy()
    matmul(a, b, trans_b=True, out=out, accumulate=True)
    assert_close(out, start + want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
@pytest.mark.parametrize("m,k,n", [(300, 160, 90), (90, 160, 300), (131, 256, 127), (1, 1 << 22, 1)])
def test_cpu_large_product_is_two_halves_along_the_longer_side(m, k, n, trans_a, trans_b, accumulate, dtype,
                                                               monkeypatch):
    import threading

    assert m * n * k >= mm.HALVES_FROM
    calls = []

    def recording(a, b, out, accumulate):
        calls.append((out.ctypes.data, a.shape, b.shape, out.shape, threading.get_ident()))
        blas_product(a, b, out, accumulate)

    blas_product = mm._blas_product
    monkeypatch.setattr(mm, "_blas_product", recording)
    rng = np.random.default_rng(2)
    a, b = operands(rng, m, k, n, trans_a, trans_b, dtype)
    start = rng.standard_normal((m, n)).astype(dtype)
    out = start.copy() if accumulate else np.full((m, n), np.nan, dtype)
    assert matmul(a, b, trans_a, trans_b, out=out, accumulate=accumulate) is out
    want = mm._matmul_reference(a, b, trans_a, trans_b)
    assert_close(out, want + start if accumulate else want, dtype)
    # two halves of C, cut where the docstring says: the first on this thread, the second
    # (starting that many rows or columns into out) on another
    if m >= n:
        halves = [(0, (m // 2, k), (k, n), (m // 2, n)),
                  (m // 2 * out.strides[0], (m - m // 2, k), (k, n), (m - m // 2, n))]
    else:
        halves = [(0, (m, k), (k, n // 2), (m, n // 2)),
                  (n // 2 * out.strides[1], (m, k), (k, n - n // 2), (m, n - n // 2))]
    calls.sort()
    assert [(c[0] - out.ctypes.data,) + c[1:4] for c in calls] == halves
    assert calls[0][4] == threading.get_ident() != calls[1][4]


def test_cpu_large_product_into_a_strided_out():
    rng = np.random.default_rng(3)
    a, b = operands(rng, 96, 300, 200, False, True, np.float32)
    big = np.zeros((96, 400), np.float32)
    out = big[:, ::2]  # (96, 200), every other column
    matmul(a, b, trans_b=True, out=out)
    assert_close(out, mm._matmul_reference(a, b, False, True), np.float32)
    assert not big[:, 1::2].any()


def test_cpu_out_overlapping_an_input_is_rejected():
    a = np.ones((256, 256), np.float32)
    b = np.ones((256, 256), np.float32)
    for out in (a, b, b.T):
        with pytest.raises(ValueError, match="overlap"):
            matmul(a, b, out=out)


def test_cpu_read_only_out_is_rejected():
    out = np.zeros((3, 3), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="matmul: out is read-only"):
        matmul(np.ones((3, 2), np.float32), np.ones((2, 3), np.float32), out=out)


def test_cpu_large_product_waits_for_its_second_half_even_when_the_first_fails(monkeypatch):
    import threading
    import time

    finished = []

    def failing_first_half(a, b, out, accumulate):
        if threading.current_thread() is threading.main_thread():
            raise MemoryError("first half")
        time.sleep(0.2)
        finished.append(True)

    monkeypatch.setattr(mm, "_blas_product", failing_first_half)
    a = np.ones((256, 256), np.float32)
    with pytest.raises(MemoryError):
        matmul(a, a)
    assert finished == [True]


def _large_product_in_child(queue):
    a = np.ones((256, 128), np.float32)
    queue.put(float(matmul(a, a, trans_b=True)[0, 0]))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
def test_cpu_large_product_in_a_forked_child():
    """The helper thread does not survive a fork; a child must start its own, not wait
    for the parent's."""
    import multiprocessing

    a = np.ones((256, 128), np.float32)
    assert matmul(a, a, trans_b=True)[0, 0] == 128  # the parent's helper thread runs
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_large_product_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung on a large product")
    assert child.exitcode == 0 and queue.get(timeout=5) == 128


def test_hand_worked():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0, 6.0], [7.0, 8.0]])
    np.testing.assert_array_equal(matmul(a, b), [[19.0, 22.0], [43.0, 50.0]])
    np.testing.assert_array_equal(matmul(a, b, trans_a=True), [[26.0, 30.0], [38.0, 44.0]])
    out = cuda.device_array((2, 2), dtype=np.float64)
    matmul(cuda.to_device(a), cuda.to_device(b), trans_b=True, out=out)
    np.testing.assert_array_equal(out.copy_to_host(), [[17.0, 23.0], [39.0, 53.0]])


@pytest.mark.parametrize("gpu", [False, True])
def test_empty(gpu):
    put = cuda.to_device if gpu else np.asarray
    back = (lambda x: x.copy_to_host()) if gpu else np.asarray
    got = back(matmul(put(np.zeros((0, 3))), put(np.zeros((3, 4)))))
    assert got.shape == (0, 4)
    got = back(matmul(put(np.zeros((2, 0))), put(np.zeros((0, 4)))))
    np.testing.assert_array_equal(got, np.zeros((2, 4)))
    out = put(np.ones((2, 4)))
    got = back(matmul(put(np.zeros((2, 0))), put(np.zeros((0, 4))), out=out, accumulate=True))
    np.testing.assert_array_equal(got, np.ones((2, 4)))


def test_an_empty_product_on_the_device_launches_nothing(monkeypatch):
    # a grid with no blocks along a dimension is an invalid launch on a GPU
    grids = []
    monkeypatch.setattr(mm, "launch", lambda kernel, grid, block, *args: grids.append(grid))
    for m, k, n in [(0, 3, 4), (3, 4, 0), (0, 2, 0)]:
        assert matmul(cuda.to_device(np.zeros((m, k))), cuda.to_device(np.zeros((k, n)))).shape == (m, n)
    assert grids == []


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(a=np.ones(3), b=np.ones((3, 2))), "a must be 2-D"),
        (dict(a=np.ones((2, 3), dtype=np.int64), b=np.ones((3, 2))), "a must be float32 or float64"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2), dtype=np.float32)), "share a dtype"),
        (dict(a=np.ones((2, 3)), b=np.ones((2, 2))), "inner dimensions differ"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2)), trans_a=True), "inner dimensions differ"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2)), out=np.ones((3, 2))), r"out must have shape \(2, 2\)"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2)), out=np.ones((2, 2), np.float32)), "out must have dtype"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2)), accumulate=True), "accumulate=True needs out"),
        (dict(a=np.ones((2, 3)), b=np.ones((3, 2)), trans_a=1), "trans_a must be True or False"),
        (dict(a=[[1, 2]], b=np.ones((2, 2))), "a must be float32 or float64"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        matmul(**kwargs)


def test_mixing_host_and_device_is_an_error():
    a, b = np.ones((2, 3)), np.ones((3, 2))
    with pytest.raises(ValueError, match="device arrays"):
        matmul(cuda.to_device(a), b)
    with pytest.raises(ValueError, match="out"):
        matmul(cuda.to_device(a), cuda.to_device(b), out=np.ones((2, 2)))


def test_bad_tiling_is_rejected():
    with pytest.raises(ValueError, match="multiple"):
        mm.tiled_kernel((8, 8, 4, 3, 2))
    with pytest.raises(ValueError, match="evenly"):
        mm.tiled_kernel((8, 8, 1, 2, 2))
    with pytest.raises(ValueError, match="needs 4096 threads; a block holds at most 1024"):
        mm.tiled_kernel((128, 128, 8, 2, 2))
    assert mm.tiled_kernel((128, 128, 8, 4, 4)).tiling == (128, 128, 8, 4, 4)  # 1024 threads: a full block
    with pytest.raises(ValueError, match=r"the 32 threads must load the 8x4 and 4x4 tiles evenly"):
        mm.tiled_kernel((8, 4, 4, 1, 1))  # op(A)'s tile takes one load each, op(B)'s half a load
    with pytest.raises(ValueError, match="need 65536 bytes of shared memory in float64; a block has 49152"):
        mm.tiled_kernel((256, 256, 16, 16, 16))


def test_too_many_rows_for_the_cuda_grid_are_rejected():
    a = cuda.to_device(np.zeros((16 * 65535 + 1, 1), np.float32))  # (M, K)
    with pytest.raises(ValueError, match=r"op\(a\) has 1048561 rows; the CUDA kernels take at most 1048560"):
        matmul(a, cuda.to_device(np.zeros((1, 1), np.float32)))


def test_the_cuda_grid_holds_exactly_its_limit_of_blocks(monkeypatch):
    grids = []
    monkeypatch.setattr(mm, "launch", lambda kernel, grid, block, *args: grids.append(grid))
    rows = 16 * 65535  # the most the naive kernel's 16-row blocks can cover
    a = cuda.to_device(np.zeros((rows, 1), np.float32))
    assert matmul(a, cuda.to_device(np.zeros((1, 1), np.float32))).shape == (rows, 1)
    assert grids == [(1, 16384, 1)]  # 64-row tiles
    for m, ok in [(8 * 65535, True), (8 * 65535 + 1, False)]:  # SMALL's 8-row tiles: 65535 blocks, then 65536
        a, b, out = (cuda.to_device(np.zeros(shape, np.float32)) for shape in [(m, 1), (1, 1), (m, 1)])
        if ok:
            mm.launch_tiled(a, b, out, False, False, False, tiling=SMALL, splits=1)
            assert grids[-1] == (1, 65535, 1)
        else:
            with pytest.raises(ValueError, match=r"launch_tiled: 524281 rows and 1 slices of K need a grid of "
                                                 r"\(1, 65536, 1\)"):
                mm.launch_tiled(a, b, out, False, False, False, tiling=SMALL, splits=1)


# ------------------------------------------------------------------ CUDA (simulator)


def run_kernel(launch, a, b, trans_a, trans_b, accumulate, start, **kw):
    out = cuda.to_device(start)
    launch(cuda.to_device(a), cuda.to_device(b), out, trans_a, trans_b, accumulate, **kw)
    return out.copy_to_host()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
@pytest.mark.parametrize("kernel", ["tiled", "naive"])
def test_cuda_kernels_match_reference(kernel, trans_a, trans_b, dtype):
    rng = np.random.default_rng(2)
    a, b = operands(rng, 17, 33, 5, trans_a, trans_b, dtype)
    want = mm._matmul_reference(a, b, trans_a, trans_b)
    launch, kw = (mm.launch_tiled, dict(tiling=SMALL)) if kernel == "tiled" else (mm.launch_naive, {})
    accumulate = trans_a != trans_b  # half the cases add into a nonzero start
    start = rng.standard_normal((17, 5)).astype(dtype) if accumulate else np.full((17, 5), np.nan, dtype)
    got = run_kernel(launch, a, b, trans_a, trans_b, accumulate, start, **kw)
    assert_close(got, want + (start if accumulate else 0), dtype)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (16, 8, 16), (8, 4, 8), (3, 9, 17)])
def test_tiled_kernel_tile_multiples_and_ragged(m, k, n):
    rng = np.random.default_rng(3)
    a, b = operands(rng, m, k, n, False, False, np.float64)
    got = run_kernel(mm.launch_tiled, a, b, False, False, False, np.full((m, n), np.nan), tiling=SMALL)
    assert_close(got, mm._matmul_reference(a, b), np.float64)


def test_public_matmul_on_device_uses_the_default_tiling():
    rng = np.random.default_rng(4)
    a, b = operands(rng, 17, 33, 5, True, True, np.float32)
    start = rng.standard_normal((17, 5)).astype(np.float32)
    out = cuda.to_device(start)
    got = matmul(cuda.to_device(a), cuda.to_device(b), trans_a=True, trans_b=True, out=out, accumulate=True)
    assert got is out
    assert_close(got.copy_to_host(), start + mm._matmul_reference(a, b, True, True), np.float32)
    fresh = matmul(cuda.to_device(a), cuda.to_device(b), trans_a=True, trans_b=True)
    assert is_device_array(fresh) and fresh.dtype == np.float32
    np.testing.assert_array_equal(fresh.copy_to_host() + start, got.copy_to_host())


@pytest.mark.parametrize("trans_a,trans_b", TRANSPOSES)
def test_layers_unchecked_device_product_is_matmuls(trans_a, trans_b):
    # The layers' device products skip matmul's checks (their shapes agree by construction)
    # and give its numbers: the same kernel, tiling and splits.
    rng = np.random.default_rng(6)
    a, b = operands(rng, 9, 20, 6, trans_a, trans_b, np.float32)
    da, db = cuda.to_device(a), cuda.to_device(b)
    fresh = mm._device_matmul(da, db, trans_a, trans_b)
    assert is_device_array(fresh) and fresh.shape == (9, 6) and fresh.dtype == np.float32
    np.testing.assert_array_equal(fresh.copy_to_host(), matmul(da, db, trans_a, trans_b).copy_to_host())
    start = rng.standard_normal((9, 6)).astype(np.float32)
    out = cuda.to_device(start)
    assert mm._device_matmul(da, db, trans_a, trans_b, out=out, accumulate=True) is out
    np.testing.assert_array_equal(out.copy_to_host(), matmul(da, db, trans_a, trans_b, out=cuda.to_device(start),
                                                             accumulate=True).copy_to_host())
    assert mm._device_matmul(da[:0] if not trans_a else da[:, :0], db, trans_a, trans_b).shape == (0, 6)


@pytest.mark.parametrize("accumulate", [False, True])
def test_split_k_matches_reference(accumulate):
    rng = np.random.default_rng(5)
    a, b = operands(rng, 17, 33, 5, False, True, np.float64)
    start = rng.standard_normal((17, 5)) if accumulate else np.full((17, 5), np.nan)
    # 3 slices of K = 12, 12, 9: a full slice, and a ragged last one
    got = run_kernel(mm.launch_tiled, a, b, False, True, accumulate, start, tiling=SMALL, splits=3)
    assert_close(got, mm._matmul_reference(a, b, False, True) + (start if accumulate else 0), np.float64)


def test_choose_splits():
    # a weight-gradient shape: 9 blocks of 64x64 for 132 multiprocessors, K long
    assert mm.choose_splits(64, 576, 8192, mm.Tiling(64, 64, 8, 4, 4), multiprocessors=132) == 30
    assert mm.choose_splits(4096, 4096, 4096, mm.Tiling(64, 64, 8, 4, 4), multiprocessors=132) == 1
    assert mm.choose_splits(64, 64, 100, mm.Tiling(64, 64, 8, 4, 4), multiprocessors=132) == 1
    assert mm.choose_splits(64, 576, 8192, mm.Tiling(64, 64, 8, 4, 4), multiprocessors=9) == 1  # one block each
    assert mm.choose_splits(64, 576, 8192, mm.Tiling(64, 64, 8, 4, 4), multiprocessors=10) == 3


def test_device_out_must_be_contiguous():
    out = cuda.to_device(np.zeros((4, 4)))[:, :2]
    with pytest.raises(ValueError, match="C-contiguous"):
        matmul(cuda.to_device(np.ones((4, 3))), cuda.to_device(np.ones((3, 2))), out=out)


@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 9), k=st.integers(0, 9), n=st.integers(1, 9),
    trans_a=st.booleans(), trans_b=st.booleans(), seed=st.integers(0, 2**16),
)
def test_tiled_kernel_any_shape(m, k, n, trans_a, trans_b, seed):
    rng = np.random.default_rng(seed)
    a, b = operands(rng, m, k, n, trans_a, trans_b, np.float64)
    tiling = mm.Tiling(bm=4, bn=4, bk=2, tm=2, tn=2)
    got = run_kernel(mm.launch_tiled, a, b, trans_a, trans_b, False, np.full((m, n), np.nan), tiling=tiling)
    assert_close(got, mm._matmul_reference(a, b, trans_a, trans_b), np.float64)


def test_kernels_compile_to_ptx():
    jobs = []
    for t in ("float32", "float64"):
        tiled = f"void({t}[:, :], {t}[:, :], {t}[:, :, ::1], boolean, boolean, boolean, int64)"
        naive = f"void({t}[:, :], {t}[:, :], {t}[:, :], boolean, boolean, boolean)"
        reduce = f"void({t}[:, :, ::1], {t}[:, :], boolean)"
        jobs += [("tinyfrcnn.matmul", "_matmul_tiled_kernel", tiled), ("tinyfrcnn.matmul", "_matmul_naive_kernel", naive),
                 ("tinyfrcnn.matmul", "_matmul_splitk_reduce_kernel", reduce)]
    assert_compiles_to_ptx(jobs)
