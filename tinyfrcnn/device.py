"""Where arrays live, and how ops choose between their CPU and CUDA kernels.

The rule every op follows: NumPy arrays in, the Numba CPU kernel runs and NumPy arrays
come out; numba device arrays in, the CUDA kernel runs and device arrays come out.
Mixing the two in one call is an error, and so is asking for CUDA where there is none:
nothing ever falls back silently.

Tests run the CUDA kernels without a GPU in numba's simulator: set
``NUMBA_ENABLE_CUDASIM=1`` before numba is first imported.

Device arrays that ops return come from ``empty_on_device``: a pool that hands out the
memory of dropped arrays again instead of asking the driver for more (see
``BufferPool``). Kernels are started with ``launch(kernel, grid, block, *args)``, which
does what ``kernel[grid, block](*args)`` does in a fraction of its host time (see
``Launcher``).
"""

import math
import threading

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
    return type(x) is not np.ndarray and getattr(x, "__cuda_ndarray__", False) is True


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


def size_class(nbytes):
    """The bytes the pool reserves for a request of ``nbytes``: at least 512, and above
    that the next of four sizes per power of two (2^k times 1, 1.25, 1.5, 1.75), so less
    than a fifth of a buffer goes unused and arrays of similar sizes share buffers."""
    if nbytes <= 512:
        return 512
    step = 1 << ((nbytes - 1).bit_length() - 3)
    return -(-nbytes // step) * step


def _dims(shape):
    """``shape`` (an int or a sequence of ints >= 0) as a tuple of Python ints."""
    if type(shape) is int:
        shape = (shape,)
    if type(shape) is tuple and all(type(s) is int and s >= 0 for s in shape):
        return shape
    dims = np.atleast_1d(shape)
    if dims.ndim != 1 or dims.dtype.kind not in "iu" or (dims.size and dims.min() < 0):
        raise ValueError(f"BufferPool.empty: shape must be non-negative integers, got {shape!r}")
    return tuple(int(s) for s in dims)


_CONTEXTS = {}  # the driver's handle of a CUDA context -> numba's Context for it


def _current_context():
    """numba's CUDA context of this thread, found by the driver's handle of the current
    context: one driver call, where numba's ``cuda.current_context()`` makes several and
    takes a lock (microseconds that every pooled array paid)."""
    from numba import cuda
    from numba.cuda.cudadrv.driver import binding

    err, handle = binding.cuCtxGetCurrent()
    context = _CONTEXTS.get(int(handle)) if int(err) == 0 else None
    if context is None:
        context = cuda.current_context()  # makes one current if there is none yet
        err, handle = binding.cuCtxGetCurrent()
        if int(err) == 0 and int(handle):
            _CONTEXTS[int(handle)] = context
    return context


class BufferPool:
    """Device buffers that come back for reuse once every array made from them is dropped.

    numba gives each device array its own ``cuMemAlloc`` and, a few dropped arrays
    later, a ``cuMemFree`` that waits for the GPU to go idle. A train step makes and
    drops a few dozen activations and gradients, so, like PyTorch's caching allocator,
    the pool keeps the memory of dropped arrays (by ``size_class`` and CUDA context)
    and hands it out again: once it holds one step's buffers, later steps are served
    from it.

    A buffer is never reused while any array or view of it is alive: numba counts the
    references to the memory and calls ``_release`` only after the last one is gone.
    All kernels run on the default stream, so work queued by an old owner finishes
    before a new owner's kernels write. Dropped buffers beyond ``max_cached_bytes`` go
    back to the driver; ``clear`` returns all of them. With ``enabled`` False, and under
    numba's simulator, the pool steps aside: plain ``cuda.device_array``.
    """

    def __init__(self, max_cached_bytes=1 << 30, allocate=None, context=None):
        from numba import cuda

        self.enabled = True
        self.max_cached_bytes = max_cached_bytes
        self._allocate = allocate or (lambda nbytes: cuda.device_array(nbytes, dtype=np.uint8))
        self._context = context or _current_context
        self._free = {}  # (id of the CUDA context, size class) -> [raw uint8 device arrays]
        self._live = {}  # ticket -> the AutoFreePointer behind a handed-out array
        self._tickets = 0
        self.cached_bytes = 0  # held in dropped buffers, ready for reuse
        self.allocations = 0  # buffers asked of the driver so far
        self._lock = threading.RLock()  # a release can run inside an allocation (gc)

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous device array of ``shape`` and ``dtype``."""
        from numba import config, cuda

        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf" or not dtype.isnative:
            raise ValueError(f"BufferPool.empty: dtype must be a native numeric dtype, got {dtype!r}")
        shape = _dims(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or config.ENABLE_CUDASIM or not self.enabled:
            return cuda.device_array(shape, dtype=dtype)
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.cudadrv.driver import AutoFreePointer

        key = (id(self._context()), size_class(nbytes))  # numba's Context defines == but no hash
        with self._lock:
            free = self._free.get(key)
            if free:
                raw = free.pop()
                self.cached_bytes -= key[1]
            else:
                raw = self._allocate(key[1])
                self.allocations += 1
            ticket, self._tickets = self._tickets, self._tickets + 1
            mem = AutoFreePointer(raw.gpu_data.context, raw.gpu_data.device_pointer, nbytes,
                                  finalizer=lambda: self._release(ticket, key, raw))
            self._live[ticket] = mem
        strides, step = [], dtype.itemsize
        for s in reversed(shape):  # C order
            strides.insert(0, step)
            step *= s
        return DeviceNDArray(shape, tuple(strides), dtype, gpu_data=mem.own())

    def _release(self, ticket, key, raw):
        with self._lock:
            self._live.pop(ticket, None)
            if self.cached_bytes + key[1] <= self.max_cached_bytes:
                self._free.setdefault(key, []).append(raw)
                self.cached_bytes += key[1]

    def clear(self):
        """Hand every cached buffer back to the driver (arrays in use are unaffected)."""
        with self._lock:
            self._free.clear()
            self.cached_bytes = 0


POOL = BufferPool()


def empty_on_device(shape, dtype):
    """An uninitialised device array from the pool: the ops' outputs and scratch."""
    return POOL.empty(shape, dtype)


def zeros_on_device(shape, dtype):
    """A zeroed device array from the pool: one driver memset, no kernel, no copy."""
    from numba.cuda.cudadrv.driver import device_memset

    out = POOL.empty(shape, dtype)
    if out.size:
        device_memset(out, 0, out.size * out.dtype.itemsize)
    return out


STAGING_MAX_BYTES = 1 << 24  # uploads up to 16 MiB go through a pinned staging buffer
STAGING_BUFFERS = 4  # used in turn, so an upload need not wait for the one before
_STAGING = {"buffers": [None] * STAGING_BUFFERS, "next": 0, "lock": threading.Lock()}


def to_device(x):
    """Copy a NumPy array to the GPU, into a pooled buffer (device arrays pass through).

    The copy goes through a page-locked ("pinned") host buffer: the GPU reads pinned
    memory directly, while from ordinary pageable memory the driver first copies into
    pinned memory of its own, in small pieces, at a fraction of the speed. The copy is
    queued on the default stream like a kernel, after the work queued before it, and
    this returns at once: the host goes on (say, queueing the next layers) while the GPU
    finishes earlier work. So the copy's source must stay untouched until it has run:
    ``STAGING_BUFFERS`` buffers are used in turn, each with an event recorded after its
    copy, and a buffer is refilled only once its event has passed. Arrays above
    ``STAGING_MAX_BYTES`` are copied directly (the host waits for that copy)."""
    if is_device_array(x):
        return x
    if type(x) is not np.ndarray or x.dtype.kind not in "biuf":
        raise ValueError(f"to_device: x must be a NumPy array of numbers, got {type(x).__name__}"
                         + (f" of {x.dtype}" if isinstance(x, np.ndarray) else ""))
    require_cuda("to_device")
    x = np.ascontiguousarray(x)
    out = empty_on_device(x.shape, x.dtype)
    if not x.size:
        return out
    if x.nbytes > STAGING_MAX_BYTES:
        out.copy_to_device(x)
        return out
    from numba import cuda

    with _STAGING["lock"]:
        k = _STAGING["next"]
        _STAGING["next"] = (k + 1) % STAGING_BUFFERS
        buffer, copied = _STAGING["buffers"][k] or (None, cuda.event())
        copied.synchronize()  # this buffer's last copy has run (at once if it never had one)
        if buffer is None or buffer.size < x.nbytes:
            buffer = cuda.pinned_array(max(x.nbytes, 1 << 20), dtype=np.uint8)
        staged = buffer[:x.nbytes].view(x.dtype).reshape(x.shape)
        np.copyto(staged, x)
        stream = cuda.default_stream()
        out.copy_to_device(staged, stream=stream)
        copied.record(stream)
        _STAGING["buffers"][k] = (buffer, copied)
    return out


def to_host(x):
    """Copy a device array back to a NumPy array (NumPy arrays pass through)."""
    if is_device_array(x):
        return x.copy_to_host()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"to_host: x must be a NumPy or CUDA device array, got {type(x).__name__}")
    return x


class Launcher:
    """``launch(kernel, grid, block, *args)``: the same launch as ``kernel[grid, block](*args)``.

    A numba launch spends Python time on the host before the GPU sees it (about 40 us
    bare, 50 to 120 us more than this launcher's inside a train step on an H200's
    host, across runs): it types every argument (building a numba type for each new
    device array), looks the compiled kernel up by those types, wraps each array in a
    memory view and packs the arguments. A train step launches about 125 kernels, each a
    few microseconds of GPU work, so the host, not the GPU, sets the pace.

    The launcher keeps, per kernel and per *kind* of arguments (each array's dtype,
    dimensions and numba layout; each scalar's type), the compiled kernel and how to
    pack each argument, and then packs them itself: an array is passed as numba's
    array structure, ``(meminfo=0, parent=0, size, itemsize, data pointer, *shape,
    *strides)``, a scalar as the C value of its numba type. Only the first launch of
    each kind goes through numba's typing and compilation.

    Anything else takes numba's own path: the simulator, arguments that are not device
    arrays, bools, ints or floats, ints outside int64, kernels compiled with options
    the launcher does not reproduce (debug, extensions, cooperative). Like numba, the
    launcher does not check grid sizes. It launches on the default stream in the
    current context (the launches of this package all do); after ``cuda.close()``,
    which unloads every compiled kernel, call ``launch.clear()``.
    """

    def __init__(self):
        self._plans = {}  # (kernel, argument kinds) -> (CUDA function, packers) or None
        self._configs = {}  # (grid, block) -> cuda.core LaunchConfig
        self._core = None  # (launch, LaunchConfig, stream, DeviceNDArray), set on first use
        self.enabled = True
        self.fast_launches = 0  # launches packed here, for tests and benchmarks

    def __call__(self, kernel, grid, block, *args):
        if self._core is None:
            self._core = self._load_core()
        if not self.enabled or self._core is _SIMULATOR:
            kernel[grid, block](*args)
            return
        launch, launch_config, stream, device_array = self._core
        kinds = [kernel]
        for a in args:
            if type(a) is device_array:
                flags = a._dummy.flags
                layout = ("A" if 0 in a.strides and a.size else
                          "C" if flags["C_CONTIGUOUS"] else "F" if flags["F_CONTIGUOUS"] else "A")
                kinds.append((a.dtype, a.ndim, layout))
            elif type(a) is int and not -(1 << 63) <= a < (1 << 63):
                kinds.append(None)  # numba types it uint64 or refuses it
            else:
                kinds.append(type(a))
        key = tuple(kinds)
        plan = self._plans.get(key, False)
        if plan is False:
            plan = self._plans[key] = self._plan(kernel, args)
        if plan is None:
            kernel[grid, block](*args)
            return
        function, packers = plan
        packed = []
        for pack, a in zip(packers, args):
            if pack is None:  # a device array
                packed += (0, 0, a.size, a.dtype.itemsize, a.gpu_data.device_ctypes_pointer.value or 0)
                packed += a.shape
                packed += a.strides
            else:
                packed.append(pack(a))
        dims = (grid, block)
        cfg = self._configs.get(dims)
        if cfg is None:
            cfg = self._configs[dims] = launch_config(grid=grid, block=block)
        launch(stream, cfg, function, *packed)
        self.fast_launches += 1

    def clear(self):
        """Forget every kept kernel (their next launches go through numba again)."""
        self._plans.clear()

    @staticmethod
    def _load_core():
        from numba import config

        if config.ENABLE_CUDASIM:
            return _SIMULATOR
        from numba.cuda import dispatcher
        from numba.cuda.cudadrv import driver
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        return dispatcher.launch, dispatcher.LaunchConfig, driver._to_core_stream(0), DeviceNDArray

    @staticmethod
    def _plan(kernel, args):
        """(CUDA function, one packer per argument: None for an array) or None: numba's path."""
        import ctypes

        from numba.cuda import types
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        from numba.cuda.dispatcher import CUDADispatcher

        if not isinstance(kernel, CUDADispatcher):
            return None  # a stand-in (tests count launches with one): its own [grid, block]
        if any(type(a) not in (DeviceNDArray, bool, int, float, np.float32, np.float64, np.int64, np.int32)
               or (type(a) is int and not -(1 << 63) <= a < (1 << 63)) for a in args):
            return None
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        compiled = kernel.compile(argtypes)
        if compiled.debug or getattr(compiled, "cooperative", False) or getattr(compiled, "extensions", None):
            return None
        packers = []
        for ty in compiled.argument_types:
            if isinstance(ty, types.Array):
                packers.append(None)
            elif ty == types.boolean:
                packers.append(bool)
            elif isinstance(ty, types.Integer) and hasattr(ctypes, f"c_{ty}"):
                packers.append(getattr(ctypes, f"c_{ty}"))
            elif ty == types.float64:
                packers.append(ctypes.c_double)
            elif ty == types.float32:
                packers.append(ctypes.c_float)
            else:
                return None
        return compiled._codelibrary.get_cufunc().kernel, packers


_SIMULATOR = ()
launch = Launcher()


def rounded_ops(dtype):
    """(mul, add) for CUDA kernels that round each step on its own, like the CPU.

    The CUDA compiler fuses ``a * b + c`` into one fused multiply-add, which rounds
    once instead of twice and so can differ from the CPU kernel in the last bit; the
    libdevice ``_rn`` functions are never fused. The simulator runs kernels as Python,
    where plain operators already round each step.
    """
    from numba import config
    from numba.cuda import libdevice

    if config.ENABLE_CUDASIM:
        return (lambda x, y: x * y), (lambda x, y: x + y)
    if np.dtype(dtype) == np.float32:
        return libdevice.fmul_rn, libdevice.fadd_rn
    return libdevice.dmul_rn, libdevice.dadd_rn


def grid_1d(n, threads=256):
    """(blocks, threads) that cover ``n`` threads, at least one block."""
    return max(1, (int(n) + threads - 1) // threads), threads
