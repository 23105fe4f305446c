"""The device pool: size classes, reuse only after every array of a buffer is dropped,
per-context lists, the cache limit, and the pooled helpers in the simulator."""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import config, cuda

from tinyfrcnn import device
from tinyfrcnn.device import empty_on_device, is_device_array, size_class, to_device, to_host, zeros_on_device


def test_size_class_hand_worked():
    assert [size_class(n) for n in (1, 512, 513, 640, 641, 1024, 1025, 3000)] == [
        512, 512, 640, 640, 768, 1024, 1280, 3072]


@given(st.integers(1, 1 << 40))
def test_size_class_covers_the_request_and_wastes_under_a_fifth(n):
    c = size_class(n)
    assert c >= n and size_class(c) == c
    assert c == 512 or (c - n) * 5 < c
    assert size_class(n + 1) >= c  # monotonic


def test_four_size_classes_per_power_of_two():
    classes = {size_class(n) for n in range((1 << 12) + 1, (1 << 13) + 1, 7)} | {size_class(1 << 13)}
    assert sorted(classes) == [4096 + 1024 * i for i in range(1, 5)]


_POOL_SCRIPT = r"""
import gc
from types import SimpleNamespace
import numpy as np
from numba.cuda.cudadrv.driver import binding
from tinyfrcnn import device

made = []
def fake(nbytes):
    ptr = binding.CUdeviceptr((len(made) + 1) << 32)
    made.append(SimpleNamespace(nbytes=nbytes, gpu_data=SimpleNamespace(context=None, device_pointer=ptr)))
    if hook:
        hook.pop()()  # a finalizer that runs inside an allocation, as gc may do
    return made[-1]

class Context:  # like numba-cuda's: == is defined, so it cannot be hashed
    def __eq__(self, other):
        return self is other

hook = []
A, B = Context(), Context()
ctx = [A]
pool = device.BufferPool(max_cached_bytes=2048, allocate=fake, context=lambda: ctx[0])
ptr = lambda a: a.device_ctypes_pointer.value

a = pool.empty((2, 3), np.float32)
assert a.shape == (2, 3) and a.strides == (12, 4) and a.dtype == np.float32 and device.is_device_array(a)
assert made[0].nbytes == 512 and ptr(a) == 1 << 32
view = a.gpu_data.view(12)  # what slicing a[1] holds: a pointer into the buffer
del a
gc.collect()
b = pool.empty(6, np.float32)
assert len(made) == 2, "a view still used the first buffer"
del view, b
gc.collect()
assert pool.cached_bytes == 1024 and not pool._live

c = pool.empty((10, 10), np.float32)  # 400 bytes: the same 512-byte class
assert len(made) == 2 and ptr(c) in (1 << 32, 2 << 32) and c.shape == (10, 10)
d = pool.empty(1000, np.float64)  # 8000 bytes: a new class
assert len(made) == 3 and made[2].nbytes == 8192
ctx[0] = B
e = pool.empty(6, np.float32)  # a cached 512-byte buffer exists, but in context A
assert len(made) == 4 and pool.cached_bytes == 512
del c, d, e
gc.collect()
# 8192 bytes are over the 2048-byte limit: that buffer went back to the driver.
assert pool.cached_bytes == 1536 and sorted(pool._free) == sorted([(id(A), 512), (id(B), 512)])
assert len(pool._free[(id(A), 512)]) == 2

f = pool.empty(3, np.int64)
hook.append(lambda: globals().pop("f"))
g = pool.empty(1 << 20, np.uint8)  # allocates; inside, f is dropped and released
assert pool.cached_bytes == 1536 and len(pool._free[(id(B), 512)]) == 1
del g
pool.clear()
assert pool.cached_bytes == 0 and not pool._free
pool.empty(6, np.float32)
assert len(made) == 6 and pool.allocations == 6
pool.enabled = False  # numba's own allocation, which needs a GPU here
try:
    pool.empty(6, np.float32)
except Exception as e:
    assert "CUDA" in type(e).__name__ or "driver" in str(e), e
assert len(made) == 6 and pool.allocations == 6
print("ok")
"""


def test_pool_reuses_buffers_only_once_dropped():
    # numba's real device-array classes on fake allocations (no simulator, no GPU): a
    # buffer comes back only when the array and every view of it are gone.
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_pooled_helpers_on_cuda(dtype):
    x = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    d = to_device(x)
    assert is_device_array(d) and d.shape == x.shape and d.dtype == x.dtype
    assert np.array_equal(to_host(d), x)
    z = zeros_on_device((3, 5), dtype)
    assert z.dtype == dtype and np.array_equal(z.copy_to_host(), np.zeros((3, 5), dtype))
    e = empty_on_device(7, dtype)
    assert e.shape == (7,) and e.dtype == dtype
    assert to_device(np.zeros((0, 3), dtype)).shape == (0, 3)


@pytest.mark.skipif(config.ENABLE_CUDASIM or not cuda.is_available(), reason="needs a real GPU")
def test_pool_reuses_real_cuda_memory():
    gc.collect()  # no other buffer of this size class may be dropped between del a and zeros_on_device
    a = to_device(np.arange(1000, dtype=np.float32))
    first = a.device_ctypes_pointer.value
    del a
    b = zeros_on_device(900, np.float32)  # same 4096-byte class
    assert b.device_ctypes_pointer.value == first
    assert not b.copy_to_host().any()
    b[:] = 3.0
    c = to_device(np.ones(1000, np.float32))
    assert c.device_ctypes_pointer.value != first and (b.copy_to_host() == 3).all()


def test_bad_arrays_and_shapes_are_refused():
    for bad, match in [(None, "got NoneType"), ([1.0, 2.0], "got list"), (np.array(["a"]), "got ndarray of <U1"),
                       (np.ma.masked_array([1.0]), "got MaskedArray")]:
        with pytest.raises(ValueError, match=f"to_device: x must be a NumPy array of numbers, {match}"):
            to_device(bad)
    with pytest.raises(ValueError, match="to_host: x must be a NumPy or CUDA device array, got NoneType"):
        to_host(None)
    pool = device.BufferPool()
    for shape in [(-1,), (2, -3), (2.5,)]:
        with pytest.raises(ValueError, match="BufferPool.empty: shape must be non-negative integers"):
            pool.empty(shape, np.float32)
    for dtype in [object, "U5", ">f4"]:
        with pytest.raises(ValueError, match="BufferPool.empty: dtype must be a native numeric dtype"):
            pool.empty((3,), dtype)


@cuda.jit
def _mixed_arguments_kernel(c_order, f_order, strided, scale32, scale64, offset, positive, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        rows = f_order.shape[0]
        v = c_order[i] * scale32 + f_order[i % rows, i // rows] * scale64 + strided[i] + offset
        out[i] = v if positive else -v


def test_launch_packs_arrays_of_every_layout_and_scalars_as_numba_does():
    # On a GPU the launcher packs the arguments itself (fast_launches counts it); numba's
    # own launch (enabled=False) and NumPy give the expected values. In the simulator
    # both are numba's launch.
    rng = np.random.default_rng(0)
    c_order = rng.standard_normal(12)
    f_order = np.asfortranarray(rng.standard_normal((3, 4)))
    wide = rng.standard_normal(24)
    gpu = not config.ENABLE_CUDASIM
    args = [to_device(c_order), cuda.to_device(f_order), to_device(wide)[::2]]
    for positive, offset in [(True, 7), (False, -(1 << 40))]:
        expected = c_order * np.float32(0.5) + f_order.ravel(order="F") * 2.0 + wide[::2] + offset
        expected = expected if positive else -expected
        for fast in (True, False):
            out = empty_on_device(12, np.float64)
            before = device.launch.fast_launches
            device.launch.enabled = fast
            try:
                device.launch(_mixed_arguments_kernel, 1, 32, *args, np.float32(0.5), 2.0, offset, positive, out)
            finally:
                device.launch.enabled = True
            assert device.launch.fast_launches - before == int(fast and gpu)
            np.testing.assert_allclose(out.copy_to_host(), expected, rtol=1e-6)
    kept = [key for key in device.launch._plans if key[0] is _mixed_arguments_kernel]
    assert len(kept) == (1 if gpu else 0)  # one kind: other values of the same types reuse it
    device.launch.clear()
    assert not device.launch._plans


def test_to_device_stages_through_pinned_buffers_in_turn(monkeypatch):
    rng = np.random.default_rng(3)
    monkeypatch.setitem(device._STAGING, "buffers", [None] * device.STAGING_BUFFERS)
    monkeypatch.setitem(device._STAGING, "next", 0)
    arrays = [rng.standard_normal((5, 7)).astype(np.float32), np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],
              rng.standard_normal(300_000), np.array([True, False]), rng.integers(0, 255, (2, 3, 4), np.uint8)]
    for x in arrays:
        d = to_device(x)
        assert d.shape == x.shape and d.dtype == x.dtype
        assert np.array_equal(d.copy_to_host(), x)
    buffers = [b for b, _ in device._STAGING["buffers"]]
    assert buffers[2].nbytes == 300_000 * 8  # grown for the largest; 1 MiB sufficed for the others
    assert all(b.nbytes == 1 << 20 for i, b in enumerate(buffers) if i != 2)
    to_device(arrays[0])  # the 6th upload: the second buffer again, reused as it is
    assert device._STAGING["buffers"][1][0] is buffers[1]
    monkeypatch.setattr(device, "STAGING_MAX_BYTES", 100)
    big = rng.standard_normal(50)  # 400 bytes: copied directly
    assert np.array_equal(to_device(big).copy_to_host(), big) and device._STAGING["next"] == 2


def test_to_device_refills_a_buffer_only_after_its_last_copy(monkeypatch):
    # The copies are queued, not waited for: a buffer's event is recorded after its copy,
    # and the upload that takes the buffer next waits on that event before refilling it.
    log = []

    class Event:
        def __init__(self):
            self.id = len([e for e in log if e[0] == "new"])
            log.append(("new", self.id))

        def record(self, stream):
            log.append(("record", self.id))

        def synchronize(self):
            log.append(("wait", self.id))

    from numba import cuda

    monkeypatch.setattr(cuda, "event", Event)
    monkeypatch.setattr(device, "STAGING_BUFFERS", 2)
    monkeypatch.setitem(device._STAGING, "buffers", [None, None])
    monkeypatch.setitem(device._STAGING, "next", 0)
    copy = type(cuda.device_array(1)).copy_to_device

    def logged_copy(a, ary, stream=0):
        log.append(("copy", int(ary.ravel()[0])))
        assert stream, "a staged copy is queued on a stream, not waited for"
        return copy(a, ary, stream=stream)

    monkeypatch.setattr(type(cuda.device_array(1)), "copy_to_device", logged_copy)
    uploads = [to_device(np.full(3, v)) for v in range(5)]
    assert [a.copy_to_host()[0] for a in uploads] == [0, 1, 2, 3, 4]
    assert log == [("new", 0), ("wait", 0), ("copy", 0), ("record", 0),
                   ("new", 1), ("wait", 1), ("copy", 1), ("record", 1),
                   ("wait", 0), ("copy", 2), ("record", 0),  # buffer 0 again: after copy 0 has run
                   ("wait", 1), ("copy", 3), ("record", 1),
                   ("wait", 0), ("copy", 4), ("record", 0)]


def test_empty_takes_int_and_numpy_shapes():
    pool = device.BufferPool()
    for shape, expected in [(3, (3,)), ((2, 4), (2, 4)), (np.int64(5), (5,)), ((np.int32(2), 3), (2, 3)),
                            ([1, 2], (1, 2)), ((), ())]:
        a = pool.empty(shape, np.float32)
        assert a.shape == expected and all(type(s) is int for s in a.shape)
    for bad in [(2, -1), -3, (2.5,)]:
        with pytest.raises(ValueError, match="BufferPool.empty: shape must be non-negative integers"):
            pool.empty(bad, np.float32)
