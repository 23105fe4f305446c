"""Neural-network layers with hand-written backward passes.

Every layer is a ``Module``: ``forward(x)`` computes the output and keeps what the
backward pass needs, ``backward(grad_out)`` returns dL/dx and *adds* dL/dparam into
each parameter's ``.grad`` (so gradients from several uses sum up, and
``zero_grad()`` is the caller's job). Outputs and gradients match ``torch.nn`` layers of
the same name: conv is cross-correlation with torch's weight layout, output sizes are
floored, and max-pool sends a tied window's gradient to its first maximum in row-major
order. Max pooling and ReLU give torch's numbers bit for bit; convolutions and linear
layers are sums of products that torch's kernels and BLAS may add up in another order,
so they agree to a few ulps of the output's scale (``benchmarks/torch_parity.py`` allows 4;
its seeds 0 to 3 reach 3.5).

The dtype follows the input: float32 in, float32 out; float64 in, float64 out (the
parameters are float32 by default and are cast for the computation; ``astype(np.float64)``
makes them float64 for gradient checks).

On the GPU: ``model.to("cuda")`` moves every parameter to the device, and the layers
then take numba device arrays and run CUDA kernels (im2col/col2im, ``tinyfrcnn.matmul``,
ReLU, max pooling, bias add and bias-gradient reduction), returning device arrays.
There the input's dtype must equal the parameters' (no casts on the device), and
arrays are checked for shape and dtype only: their values are not scanned for NaN or
inf (that would copy each activation back to the host).
"""

import math

import numpy as np
from numba import cuda, njit, prange

from .checks import (as_array, as_float_array, check_array_fits, check_finite, check_positive_int, check_rng,
                     check_shape, padding_pair, pair)
from .device import check_device, empty_on_device, grid_1d, is_device_array, launch, on_device
from .im2col import _col2im, _contiguous, _im2col, _output_size, output_size
from .matmul import _device_matmul, matmul


@cuda.jit
def _fill_cuda(a, value):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = value


@cuda.jit
def _add_cuda(dst, src):
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] += src[i]


def _flat(a):
    """A 1-D view of a C-contiguous array (NumPy or device)."""
    return a.reshape(a.size)


def add_(dst, src):
    """``dst += src`` in place, for two NumPy arrays or two device arrays of one shape."""
    if is_device_array(dst):
        if src.size:
            launch(_add_cuda, *grid_1d(src.size), _flat(dst), _flat(src))
    else:
        dst += src
    return dst


def _zeros_on_device(shape, dtype):
    """A zeroed device array with memory of its own, outside ``device.POOL``: for
    long-lived buffers (a parameter's gradient, the ``DeviceStore``), which moving a
    model back to the host should free."""
    a = cuda.device_array(shape, dtype=dtype)
    if a.size:
        launch(_fill_cuda, *grid_1d(a.size), _flat(a), 0)
    return a


class DeviceStore:
    """Parameters packed into two flat device buffers, ``data`` and ``grad``.

    ``Module.to("cuda")`` puts all of a module's parameters in one store: each one's
    ``data`` and ``grad`` become views of its segment (segments start at multiples of
    ``ALIGN`` elements; the gaps hold zeros). An optimizer can then update every
    parameter, or zero every gradient, in one kernel launch over the flat buffers
    instead of one launch per parameter, which on a small network is a good part of
    the launches of a step. Some of the parameters (a stage of the alternating
    schedule trains the RPN alone, say) take one launch per run of neighbours.
    """

    ALIGN = 64

    def __init__(self, params):
        self.params = list(params)
        dtype = np.dtype(self.params[0].data.dtype)
        self.offsets = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += -(-p.data.size // self.ALIGN) * self.ALIGN
        self.data = _zeros_on_device(total, dtype)  # (total,)
        self.grad = _zeros_on_device(total, dtype)  # (total,)
        for p, off in zip(self.params, self.offsets):
            data, grad = (np.ascontiguousarray(a, dtype=dtype) for a in (p.data, p.grad))
            p.data, p.grad = self.view(self.data, off, data.shape), self.view(self.grad, off, grad.shape)
            if data.size:
                p.data.copy_to_device(data)
                p.grad.copy_to_device(grad)
            p.store = self
        self._views = [(p.data, p.grad) for p in self.params]
        self._ends = self.offsets[1:] + [total]  # segment j is [offsets[j], _ends[j])
        self._position = {id(p): j for j, p in enumerate(self.params)}

    @staticmethod
    def view(flat, offset, shape):
        """The ``shape`` view of ``flat`` (1-D) that starts at ``offset``."""
        return flat[offset:offset + math.prod(shape)].reshape(shape)

    def offset(self, p):
        """Where parameter ``p``'s segment starts in the flat buffers."""
        return self.offsets[self._position[id(p)]]

    def runs(self, params):
        """The ranges [start, stop) of the flat buffers that hold ``params``, merged where
        neighbours in the store are neighbours in ``params``; None unless ``params`` are
        some of this store's parameters, in its order, whose data and grad are still its
        views (``Parameter.to`` or an assignment breaks that)."""
        runs, last = [], -1
        for p in params:
            j = self._position.get(id(p), -1)
            if j <= last or self.params[j] is not p or p.data is not self._views[j][0] \
                    or p.grad is not self._views[j][1]:
                return None
            if runs and j == last + 1:
                runs[-1] = (runs[-1][0], self._ends[j])
            else:
                runs.append((self.offsets[j], self._ends[j]))
            last = j
        return runs

    def holds(self, params):
        """True when ``params`` are exactly this store's parameters (see ``runs``)."""
        return len(params) == len(self.params) and self.runs(params) is not None

    def zero_grad(self, runs=None):
        """Zero the gradients of the ``runs`` (all by default): one launch per run."""
        for start, stop in runs if runs is not None else [(0, self.grad.size)]:
            if stop > start:
                launch(_fill_cuda, *grid_1d(stop - start), self.grad[start:stop], 0)


def _pack_on_device(params):
    """Move host parameters of one dtype to the GPU in one ``DeviceStore``; False when
    they do not qualify (some already on the device, mixed dtypes, repeats, none)."""
    if (not params or any(p.device != "cpu" for p in params) or len({id(p) for p in params}) != len(params)
            or len({np.dtype(p.data.dtype) for p in params}) != 1):
        return False
    DeviceStore(params)
    return True


def packed_store(params):
    """The ``DeviceStore`` holding exactly ``params`` (in order), or None."""
    store = getattr(params[0], "store", None) if params else None
    return store if store is not None and store.holds(params) else None


def packed_runs(params):
    """``(store, runs)`` when ``params`` sit in one ``DeviceStore`` (see its ``runs``), else None."""
    store = getattr(params[0], "store", None) if params else None
    runs = store.runs(params) if store is not None else None
    return None if runs is None else (store, runs)


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape and dtype).

    Both live on the host (NumPy) or both on the GPU (numba device arrays); ``to``
    moves them. ``store`` is the ``DeviceStore`` whose buffers hold them, if any.
    """

    def __init__(self, data):
        self.store = None
        if is_device_array(data):
            if not data.is_c_contiguous():
                raise ValueError("Parameter: a device array must be C-contiguous")
            self.data = data
            self.grad = _zeros_on_device(data.shape, data.dtype)
        else:
            self.data = np.ascontiguousarray(data)
            self.grad = np.zeros_like(self.data)

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def device(self):
        return "cuda" if is_device_array(self.data) else "cpu"

    def to(self, device):
        """Move ``data`` and ``grad`` to ``"cpu"`` or ``"cuda"`` (a copy; no-op if there)."""
        check_device(device)
        if device == self.device:
            return self
        if device == "cuda":
            self.data, self.grad = cuda.to_device(self.data), cuda.to_device(self.grad)
        else:
            self.data, self.grad = self.data.copy_to_host(), self.grad.copy_to_host()
        self.store = None  # its own arrays now: a store it was in no longer holds it
        return self

    def zero_grad(self):
        if is_device_array(self.grad):
            if self.grad.size:
                launch(_fill_cuda, *grid_1d(self.grad.size), _flat(self.grad), 0)
        else:
            self.grad[...] = 0

    def accumulate(self, g):
        """``grad += g`` (cast to the parameter's dtype; on the device g must match it)."""
        if is_device_array(self.grad):
            if not is_device_array(g) or tuple(g.shape) != self.shape or g.dtype != self.grad.dtype:
                raise ValueError(f"Parameter.accumulate: g must be a device array of shape {self.shape} "
                                 f"and dtype {self.grad.dtype}")
            add_(self.grad, g)
            return
        self.grad += g.astype(self.grad.dtype, copy=False)

    def __repr__(self):
        extra = ", device=cuda" if self.device == "cuda" else ""
        return f"Parameter(shape={self.shape}, dtype={np.dtype(self.data.dtype).name}{extra})"


class Module:
    """Base class: ``forward``, ``backward``, ``parameters`` and ``__call__ = forward``.

    ``parameters()`` collects, in attribute order, every ``Parameter`` attribute and the
    parameters of every ``Module`` attribute (or list/tuple of them), so a model built
    from layers needs no bookkeeping of its own.

    ``backward`` differentiates the last ``forward``. A layer may keep its input by
    reference rather than copy it (``Linear`` does), so an input changed in place
    between the two gives a wrong gradient, and nothing detects it.
    """

    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    def __call__(self, *inputs):
        return self.forward(*inputs)

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs, e.g. ``("weight", p)`` or ``("layers.0.bias", p)``."""
        named = []
        for attr, value in vars(self).items():
            if isinstance(value, Parameter):
                named.append((prefix + attr, value))
            elif isinstance(value, Module):
                named.extend(value.named_parameters(f"{prefix}{attr}."))
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Parameter):
                        named.append((f"{prefix}{attr}.{i}", item))
                    elif isinstance(item, Module):
                        named.extend(item.named_parameters(f"{prefix}{attr}.{i}."))
        return named

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        params = self.parameters()
        packed = packed_runs(params)
        if packed is not None:
            store, runs = packed
            store.zero_grad(runs)
            return
        for p in params:
            p.zero_grad()

    def to(self, device):
        """Move every parameter (data and grad) to ``"cpu"`` or ``"cuda"``; returns self.

        To "cuda", parameters of one dtype that are all on the host are packed into one
        ``DeviceStore``. Call it between training steps, not between a forward and its
        backward.
        """
        check_device(device)
        params = self.parameters()
        if device == "cuda" and _pack_on_device(params):
            return self
        for p in params:
            p.to(device)
        return self

    def astype(self, dtype):
        """Convert every parameter (data and grad) to ``dtype`` in place; returns self."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"{type(self).__name__}.astype: dtype must be float32 or float64, got {dtype.name}")
        params = self.parameters()
        devices = [p.device for p in params]
        for p in params:
            p.to("cpu")
            p.data = p.data.astype(dtype)
            p.grad = p.grad.astype(dtype)
        if devices and all(d == "cuda" for d in devices):
            return self.to("cuda")
        for p, device in zip(params, devices):
            p.to(device)
        return self

    def __repr__(self):
        return f"{type(self).__name__}()"


def _check_input(x, layer, ndim, what, params=()):
    """Float array with ``ndim`` dims; raises ValueError naming ``layer``.

    NumPy: also no NaN/inf. Device array: must be C-contiguous, with ``params`` on the
    device too and of the same dtype (values are not scanned). Returns (x, on_gpu).
    """
    x = as_float_array(x, "x", where=layer)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{layer}: x must be {ndim}-D {what}, got shape {tuple(x.shape)}")
    arrays = {"x": x}
    arrays.update({name: p.data for name, p in params})
    try:
        gpu = on_device(arrays)
    except ValueError as err:
        raise ValueError(f"{layer}: {err} (move the layer with .to('cuda') or .to('cpu'))") from None
    if gpu:
        if not x.is_c_contiguous():
            raise ValueError(f"{layer}: x must be C-contiguous on the device")
        for name, p in params:
            if p.data.dtype != x.dtype:
                raise ValueError(f"{layer}: x is {np.dtype(x.dtype).name} but {name} is "
                                 f"{np.dtype(p.data.dtype).name}; on the device they must match (use .astype)")
    else:
        check_finite(x, "x", layer)
    return x, gpu


def _check_grad(grad_out, expected_shape, dtype, layer, gpu=False):
    """grad_out must be a float array of the forward output's shape, where the forward
    ran (cast to ``dtype`` on the host; of dtype ``dtype`` and C-contiguous on the device).

    Its values are not scanned: a NaN or inf in a gradient propagates to the gradients
    computed from it (a scan of every gradient array would cost as much as the ReLU
    backward it guards).
    """
    if expected_shape is None:
        raise ValueError(f"{layer}: backward called before forward")
    grad_out = as_float_array(grad_out, "grad_out", where=layer)
    if tuple(grad_out.shape) != tuple(expected_shape):
        raise ValueError(
            f"{layer}: grad_out must have the forward output's shape {tuple(expected_shape)}, "
            f"got {tuple(grad_out.shape)}"
        )
    if is_device_array(grad_out) != gpu:
        side = "a CUDA device array" if gpu else "a NumPy array"
        raise ValueError(f"{layer}: grad_out must be {side}, like the forward input")
    if gpu:
        if grad_out.dtype != dtype:
            raise ValueError(f"{layer}: grad_out must be {np.dtype(dtype).name} on the device, "
                             f"got {np.dtype(grad_out.dtype).name}")
        if not grad_out.is_c_contiguous():
            raise ValueError(f"{layer}: grad_out must be C-contiguous on the device")
        return grad_out
    return np.require(grad_out, dtype=dtype, requirements="C")  # keeps 0-d arrays 0-d


def _buffer(old, shape, dtype, gpu=False):
    """``old`` when it already has this shape, dtype and side, else a new empty array.

    Conv keeps its large column matrices between calls: allocating (and first touching)
    tens of megabytes per call costs as much as filling them.
    """
    if (old is not None and is_device_array(old) == gpu and tuple(old.shape) == tuple(shape)
            and old.dtype == dtype):
        return old
    return empty_on_device(shape, dtype=dtype) if gpu else np.empty(shape, dtype=dtype)


def _param(p, dtype, gpu):
    """A parameter's data in the computation's dtype (the device path has checked it)."""
    return p.data if gpu else p.data.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- bias (CUDA)

BIAS_THREADS = 256
BIAS_CHUNK = 4096  # gradients one block sums; a channel with more is split over several blocks


@cuda.jit
def _bias_add_cuda(out, bias):
    """out[n, o, p] += bias[o], one thread per element."""
    t = cuda.grid(1)
    n, o, p = out.shape
    if t < n * o * p:
        out[t // (o * p), (t // p) % o, t % p] += bias[(t // p) % o]


@cuda.jit
def _bias_grad_cuda(g, rows, chunk, part, db):
    """Block (o, s) sums chunk s of channel o's gradients, ``g[o, :]`` when ``rows``
    else ``g[:, o]``, in a fixed-order tree reduction; one chunk: ``db[o] +=`` the sum,
    several: ``part[o, s] =`` it, for ``_bias_grad_finish_cuda``."""
    o, s = cuda.blockIdx.x, cuda.blockIdx.y
    tid = cuda.threadIdx.x
    m = g.shape[1] if rows else g.shape[0]
    shared = cuda.shared.array(BIAS_THREADS, dtype=g.dtype)
    acc = cuda.local.array(1, dtype=g.dtype)
    acc[0] = 0
    for e in range(s * chunk + tid, min(s * chunk + chunk, m), BIAS_THREADS):
        acc[0] += g[o, e] if rows else g[e, o]
    shared[tid] = acc[0]
    cuda.syncthreads()
    step = BIAS_THREADS // 2
    while step > 0:
        if tid < step:
            shared[tid] += shared[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        if cuda.gridDim.y == 1:
            db[o] += shared[0]
        else:
            part[o, s] = shared[0]


@cuda.jit
def _bias_grad_finish_cuda(part, db):
    """db[o] += sum over s of part[o, s], in order of s: one thread per channel."""
    o = cuda.grid(1)
    if o < part.shape[0]:
        total = part[o, 0]
        for s in range(1, part.shape[1]):
            total += part[o, s]
        db[o] += total


def _add_bias(out3, bias, gpu):
    """out3 (N, O, P) += bias[o]."""
    if gpu:
        if out3.size:
            launch(_bias_add_cuda, *grid_1d(out3.size), out3, bias)
    else:
        out3 += bias[:, None]


def _accumulate_bias_grad(p, g2, rows):
    """p.grad += the sums of g2's rows (``rows``: g2 is (O, M)) or columns (g2 (M, O)).

    On the device: one block per ``BIAS_CHUNK`` gradients of a channel, then, when a
    channel took several blocks, one thread per channel adds their sums up in order.
    """
    if not is_device_array(g2):
        p.accumulate(g2.sum(axis=1 if rows else 0))
        return
    o, m = g2.shape if rows else g2.shape[::-1]
    if m == 0:
        return
    chunks = -(-m // BIAS_CHUNK)
    part = empty_on_device((o, chunks), g2.dtype) if chunks > 1 else p.grad.reshape(1, o)  # (O, S)
    launch(_bias_grad_cuda, (o, chunks), BIAS_THREADS, g2, rows, BIAS_CHUNK, part, p.grad)
    if chunks > 1:
        launch(_bias_grad_finish_cuda, *grid_1d(o), part, p.grad)


# ------------------------------------------------------------------ batch <-> channel major


@njit(cache=True, parallel=True)
def _batch_major_cpu(y, bias, out):
    o_, n_, p_ = y.shape
    for t in prange(n_ * o_):
        b = t // o_
        o = t % o_
        for q in range(p_):
            out[b, o, q] = y[o, b, q] + bias[o]


@njit(cache=True, parallel=True)
def _channel_major_cpu(g, out):
    n_, o_, p_ = g.shape
    for t in prange(o_ * n_):
        o = t // n_
        b = t % n_
        for q in range(p_):
            out[o, b, q] = g[b, o, q]


@cuda.jit
def _batch_major_cuda(y, bias, out):
    t = cuda.grid(1)
    n, o, p = out.shape
    if t < n * o * p:
        c = (t // p) % o
        out[t // (o * p), c, t % p] = y[c, t // (o * p), t % p] + bias[c]


@cuda.jit
def _channel_major_cuda(g, out):
    t = cuda.grid(1)
    o, n, p = out.shape
    if t < o * n * p:
        out[t // (n * p), (t // p) % n, t % p] = g[(t // p) % n, t // (n * p), t % p]


def _to_batch_major(y3, bias, gpu):
    """A new (N, O, P) array ``out[n, o, p] = y3[o, n, p] + bias[o]`` from y3 (O, N, P):
    a convolution's product over the batch, laid out as the next layer reads it."""
    o, n, p = y3.shape
    if gpu:
        out = empty_on_device((n, o, p), dtype=y3.dtype)  # (N, O, P)
        if out.size:
            launch(_batch_major_cuda, *grid_1d(out.size), y3, bias, out)
    else:
        out = np.empty((n, o, p), dtype=y3.dtype)  # (N, O, P)
        if out.size:
            _batch_major_cpu(y3, bias, out)
    return out


def _to_channel_major(g3, out, gpu):
    """``out[o, n, p] = g3[n, o, p]`` for g3 (N, O, P), into ``out`` (O, N, P)."""
    if out.size:
        if gpu:
            launch(_channel_major_cuda, *grid_1d(out.size), g3, out)
        else:
            _channel_major_cpu(g3, out)
    return out


def _he_normal(shape, fan_in, rng):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


# ----------------------------------------------------------------------------- Conv2d


def _conv2d_reference(x, w, b, stride, padding):
    """Naive loops: out[n,o,y,x] = b[o] + sum_{c,i,j} w[o,c,i,j] xpad[n,c,y*sh+i,x*sw+j]."""
    (sh, sw), (ph, pw) = pair(stride, "stride"), padding_pair(padding, "padding", "_conv2d_reference")
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(wd, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((n, o, oh, ow), dtype=x.dtype)
    for y in range(oh):
        for xo in range(ow):
            patch = xp[:, :, y * sh:y * sh + kh, xo * sw:xo * sw + kw]  # (N, C, kh, kw)
            out[:, :, y, xo] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


class Conv2d(Module):
    """2-D convolution (cross-correlation), the numbers of ``torch.nn.Conv2d`` up to the
    order of the sums (a few ulps of the output's scale).

        out[n, o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[n, c, y*sh + i, x*sw + j]

    with output size ``(H + 2p - k) // s + 1``. Computed for the whole batch as one
    product ``Y = W X`` with ``X = im2col(x)`` (C*kh*kw, N*OH*OW), every image's columns
    side by side; backward, with ``G`` = dL/dY laid out the same way (O, N*OH*OW):
    dL/dw = G X^T (the sum over images is part of the product), dL/db = the row sums
    of G, and dL/dx = col2im(W^T G).

    Init (He et al. 2015, "Kaiming" normal): ``w ~ N(0, 2 / fan_in)`` with
    ``fan_in = in_channels * kh * kw``, ``b = 0``, drawn from ``rng``
    (``np.random.default_rng(0)`` when None). Weight (out, in, kh, kw), bias (out,).

    ``needs_input_grad=False`` skips dL/dx (the ``w^T @ g`` product and col2im, about
    half of the backward pass): ``backward`` then only accumulates the parameter
    gradients and returns None. Use it for a first layer whose input is an image.

    On the device: the CUDA im2col, one ``tinyfrcnn.matmul`` per product for the whole
    batch (dL/dw added straight into ``weight.grad`` with ``accumulate=True``), kernels
    that move the image axis between (O, N, P) and (N, O, P) (the forward one also adds
    the bias), and a bias-gradient reduction (one block per ``BIAS_CHUNK`` gradients of a
    channel, then one thread per channel adds a split channel's sums in order).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None,
                 needs_input_grad=True):
        where = "Conv2d"
        self.in_channels = check_positive_int(in_channels, "in_channels", where)
        self.out_channels = check_positive_int(out_channels, "out_channels", where)
        self.kernel_size = pair(kernel_size, "kernel_size", where)
        self.stride = pair(stride, "stride", where)
        self.padding = padding_pair(padding, "padding", where)
        if not isinstance(needs_input_grad, (bool, np.bool_)):
            raise ValueError(f"{where}: needs_input_grad must be True or False, got {needs_input_grad!r}")
        self.needs_input_grad = bool(needs_input_grad)
        rng = np.random.default_rng(0) if rng is None else check_rng(rng, where)
        kh, kw = self.kernel_size
        check_array_fits((self.out_channels, self.in_channels, kh, kw), "weight (out_channels, in_channels, kh, kw)",
                         where)
        fan_in = self.in_channels * kh * kw
        self.weight = Parameter(_he_normal((self.out_channels, self.in_channels, kh, kw), fan_in, rng))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=np.float32))
        self._cache = None
        self._dcols = None  # (C*kh*kw, N, OH*OW) dL/dcols, kept between calls
        self._y = None  # (O, N*OH*OW) the product before the bias, kept between calls
        self._g = None  # (O, N, OH*OW) dL/dY in the product's layout, kept between calls

    def __repr__(self):
        extra = "" if self.needs_input_grad else ", needs_input_grad=False"
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{extra})")

    def forward(self, x):
        where = "Conv2d"
        x, gpu = _check_input(x, where, 4, "(N, C, H, W)", [("weight", self.weight), ("bias", self.bias)])
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"{where}: x has {c} channels (shape {tuple(x.shape)}) but in_channels={self.in_channels}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(
                f"{where}: kernel_size {self.kernel_size} is larger than the padded input "
                f"{(h + 2 * ph, w + 2 * pw)} (x shape {tuple(x.shape)}, padding {self.padding})"
            )
        o = self.out_channels
        oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
        wmat = _param(self.weight, x.dtype, gpu).reshape(o, c * kh * kw)  # (O, C*kh*kw)
        bias = _param(self.bias, x.dtype, gpu)
        k, p = c * kh * kw, oh * ow
        reuse = self._cache[0] if self._cache else None
        cols = _im2col(_contiguous(x, "x", where), self.kernel_size, self.stride, self.padding,  # checked above
                       out=reuse)  # (C*kh*kw, N, OH*OW)
        self._y = _buffer(self._y, (o, n * p), x.dtype, gpu)
        # on the device, the product without matmul's checks: the shapes agree by construction
        y = (_device_matmul if gpu else matmul)(wmat, cols.reshape(k, n * p), out=self._y)  # (O, N*OH*OW)
        out = _to_batch_major(y.reshape(o, n, p), bias, gpu)  # (N, O, OH*OW)
        self._cache = (cols, wmat, tuple(x.shape), (n, o, oh, ow), gpu)
        return out.reshape(n, o, oh, ow)  # (N, O, OH, OW)

    def backward(self, grad_out):
        cols, wmat, x_shape, out_shape, gpu = self._cache if self._cache else (None,) * 5
        g = _check_grad(grad_out, out_shape, None if wmat is None else wmat.dtype, "Conv2d", gpu)
        n, o, oh, ow = out_shape
        k, p = cols.shape[0], oh * ow
        self._g = _buffer(self._g, (o, n, p), g.dtype, gpu)
        g2 = _to_channel_major(g.reshape(n, o, p), self._g, gpu).reshape(o, n * p)  # (O, N*OH*OW)
        x2 = cols.reshape(k, n * p)  # (C*kh*kw, N*OH*OW)
        if n and gpu:
            dw = self.weight.grad.reshape(o, k)  # a view of .grad, (O, C*kh*kw)
            _device_matmul(g2, x2, trans_b=True, out=dw, accumulate=True)
        elif n:
            self.weight.accumulate(matmul(g2, x2, trans_b=True).reshape(self.weight.shape))
        if n:
            _accumulate_bias_grad(self.bias, g2, rows=True)
        if not self.needs_input_grad:
            return None
        self._dcols = _buffer(self._dcols, cols.shape, cols.dtype, gpu)  # (C*kh*kw, N, OH*OW)
        (_device_matmul if gpu else matmul)(wmat, g2, trans_a=True, out=self._dcols.reshape(k, n * p))
        return _col2im(self._dcols, x_shape, self.kernel_size, self.stride, self.padding)


# ----------------------------------------------------------------------------- ReLU


@njit(cache=True, parallel=True)
def _relu_forward_cpu(x, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = 0 if v < 0 else v


@njit(cache=True, parallel=True)
def _relu_backward_cpu(grad_out, out, dx):
    for i in prange(grad_out.size):
        dx[i] = 0 if out[i] <= 0 else grad_out[i]


@cuda.jit
def _relu_forward_cuda(x, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i] = 0 if v < 0 else v


@cuda.jit
def _relu_backward_cuda(grad_out, out, dx):
    i = cuda.grid(1)
    if i < grad_out.size:
        dx[i] = 0 if out[i] <= 0 else grad_out[i]


class ReLU(Module):
    """max(x, 0); the gradient passes where x > 0 (and is 0 at x = 0). As in torch,
    -0.0 stays -0.0.

    Backward reads the saved output (out > 0 exactly where x > 0), one fused pass.
    """

    def __init__(self):
        self._out = None
        self._gpu = False

    def forward(self, x):
        x, gpu = _check_input(x, "ReLU", None, "")
        if gpu:
            out = empty_on_device(x.shape, dtype=x.dtype)
            if out.size:
                launch(_relu_forward_cuda, *grid_1d(out.size), _flat(x), _flat(out))
        else:
            x = np.require(x, requirements="C")  # keeps 0-d arrays 0-d
            out = np.empty_like(x)
            _relu_forward_cpu(_flat(x), _flat(out))
        self._out, self._gpu = out, gpu
        return out

    def backward(self, grad_out):
        out = self._out
        shape, dtype = (None, None) if out is None else (out.shape, out.dtype)
        g = _check_grad(grad_out, shape, dtype, "ReLU", self._gpu)
        if self._gpu:
            dx = empty_on_device(g.shape, dtype=g.dtype)
            if dx.size:
                launch(_relu_backward_cuda, *grid_1d(dx.size), _flat(g), _flat(out), _flat(dx))
            return dx
        dx = np.empty_like(g)
        _relu_backward_cpu(_flat(g), _flat(out), _flat(dx))
        return dx


# ----------------------------------------------------------------------------- MaxPool2d


def _maxpool2d_reference(x, k, s):
    """Naive loops: out[n,c,y,x] = max over the k x k window at (y*s, x*s); no padding."""
    (kh, kw), (sh, sw) = pair(k, "k"), pair(s, "s")
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, 0), output_size(w, kw, sw, 0)
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    for y in range(oh):
        for xo in range(ow):
            out[:, :, y, xo] = x[:, :, y * sh:y * sh + kh, xo * sw:xo * sw + kw].max(axis=(2, 3))
    return out


@njit(cache=True, parallel=True)
def _maxpool2d_forward_cpu(x, kh, kw, sh, sw, out, argmax):
    """Per output row: start from each window's top-left element, then let every other
    window offset (i, j), in row-major order, update the whole row; a strict > keeps
    the first maximum. The inner loop runs along the row without branches, so it
    vectorises (a per-window loop mispredicts on almost every comparison)."""
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n * c):
        b = nc // c
        ch = nc % c
        for y in range(oh):
            y0 = y * sh
            for xo in range(ow):
                out[b, ch, y, xo] = x[b, ch, y0, xo * sw]
                argmax[b, ch, y, xo] = y0 * w + xo * sw
            for i in range(kh):
                for j in range(kw):
                    if i == 0 and j == 0:
                        continue
                    row = (y0 + i) * w
                    for xo in range(ow):
                        v = x[b, ch, y0 + i, xo * sw + j]
                        better = v > out[b, ch, y, xo]
                        out[b, ch, y, xo] = v if better else out[b, ch, y, xo]
                        argmax[b, ch, y, xo] = row + xo * sw + j if better else argmax[b, ch, y, xo]


@njit(cache=True, parallel=True)
def _maxpool2d_backward_cpu(grad_out, argmax, dx):
    """Planes flattened: grad_out, argmax (N*C, OH*OW); dx (N*C, H*W)."""
    for nc in prange(dx.shape[0]):
        for k in range(dx.shape[1]):
            dx[nc, k] = 0
        for k in range(grad_out.shape[1]):
            dx[nc, argmax[nc, k]] += grad_out[nc, k]


@cuda.jit
def _maxpool2d_forward_cuda(x, kh, kw, sh, sw, out, argmax):
    t = cuda.grid(1)
    n, c, oh, ow = out.shape
    if t >= n * c * oh * ow:
        return
    b = t // (c * oh * ow)
    ch = (t // (oh * ow)) % c
    y = (t // ow) % oh
    xo = t % ow
    y0 = y * sh
    x0 = xo * sw
    w = x.shape[3]
    best = x[b, ch, y0, x0]
    best_i = y0 * w + x0
    for i in range(kh):
        for j in range(kw):
            v = x[b, ch, y0 + i, x0 + j]
            if v > best:
                best = v
                best_i = (y0 + i) * w + x0 + j
    out[b, ch, y, xo] = best
    argmax[b, ch, y, xo] = best_i


@cuda.jit
def _maxpool2d_backward_cuda(grad_out, argmax, kh, kw, sh, sw, dx):
    """Gather: input pixel (y, x) sums the gradients of the windows that chose it,
    in the CPU kernel's (window row, window column) order."""
    t = cuda.grid(1)
    n, c, h, w = dx.shape
    if t >= n * c * h * w:
        return
    oh, ow = grad_out.shape[2], grad_out.shape[3]
    b = t // (c * h * w)
    ch = (t // (h * w)) % c
    iy = (t // w) % h
    ix = t % w
    ylo = 0 if iy < kh else (iy - kh) // sh + 1
    xlo = 0 if ix < kw else (ix - kw) // sw + 1
    yhi = min(oh - 1, iy // sh)
    xhi = min(ow - 1, ix // sw)
    acc = cuda.local.array(1, dtype=dx.dtype)
    acc[0] = 0
    for y in range(ylo, yhi + 1):
        for xo in range(xlo, xhi + 1):
            if argmax[b, ch, y, xo] == iy * w + ix:
                acc[0] += grad_out[b, ch, y, xo]
    dx[b, ch, iy, ix] = acc[0]


def maxpool2d_forward(x, kernel, stride):
    """(out, argmax): window maxima and the flat index (y*W + x) of each window's first max.

    ``kernel`` and ``stride`` are ints or (h, w) pairs. NumPy ``x``: Numba CPU kernel;
    device ``x`` (C-contiguous): CUDA kernel, one thread per output."""
    x, kernel, stride = _check_pool_forward(x, kernel, stride, "maxpool2d_forward")
    return _maxpool2d_forward(x, kernel, stride)


def _check_pool_forward(x, kernel, stride, where):
    """``maxpool2d_forward``'s arguments, checked: (x, kernel, stride) with (h, w) pairs."""
    x, _ = _check_input(x, where, 4, "(N, C, H, W)")
    kernel, stride = pair(kernel, "kernel_size", where), pair(stride, "stride", where)
    if kernel[0] > x.shape[2] or kernel[1] > x.shape[3]:
        raise ValueError(f"{where}: kernel_size {kernel} is larger than the input "
                         f"{tuple(x.shape[2:])} (x shape {tuple(x.shape)})")
    return x, kernel, stride


def _maxpool2d_forward(x, kernel, stride):
    """``maxpool2d_forward`` without the checks."""
    (kh, kw), (sh, sw) = kernel, stride
    n, c, h, w = x.shape
    oh, ow = _output_size(h, kh, sh, 0), _output_size(w, kw, sw, 0)
    if is_device_array(x):
        out = empty_on_device((n, c, oh, ow), dtype=x.dtype)  # (N, C, OH, OW)
        argmax = empty_on_device((n, c, oh, ow), dtype=np.int32)  # (N, C, OH, OW)
        if out.size:
            launch(_maxpool2d_forward_cuda, *grid_1d(out.size), x, kh, kw, sh, sw, out, argmax)
        return out, argmax
    out = np.empty((n, c, oh, ow), dtype=x.dtype)  # (N, C, OH, OW)
    argmax = np.empty((n, c, oh, ow), dtype=np.int32)  # (N, C, OH, OW)
    if out.size:
        _maxpool2d_forward_cpu(np.ascontiguousarray(x), kh, kw, sh, sw, out, argmax)
    return out, argmax


def maxpool2d_backward(grad_out, argmax, x_shape, kernel=None, stride=None):
    """Route each output gradient to its window's recorded argmax (summing overlaps).

    ``argmax`` (integers, the shape of ``grad_out``) holds flat indices y*W + x into each
    (H, W) plane of ``x_shape``, as ``maxpool2d_forward`` returns them; with ``kernel``
    and ``stride`` each must also lie in its own window. The CUDA path (device arrays)
    gathers per input pixel and needs ``kernel`` and ``stride`` to find the windows over
    it; no atomics, same sums as the CPU. A device ``argmax`` is checked on a host copy."""
    args = _check_pool_backward(grad_out, argmax, x_shape, kernel, stride, "maxpool2d_backward")
    return _maxpool2d_backward(*args)


def _maxpool2d_backward(grad_out, argmax, x_shape, kernel, stride):
    """``maxpool2d_backward`` without the checks, for ``MaxPool2d`` and its own argmax."""
    if is_device_array(grad_out):
        (kh, kw), (sh, sw) = kernel, stride
        dx = empty_on_device(x_shape, dtype=grad_out.dtype)  # (N, C, H, W)
        if dx.size:
            launch(_maxpool2d_backward_cuda, *grid_1d(dx.size), grad_out, argmax, kh, kw, sh, sw, dx)
        return dx
    n, c, h, w = x_shape
    dx = np.empty(x_shape, dtype=grad_out.dtype)  # (N, C, H, W)
    if dx.size:
        planes = n * c
        _maxpool2d_backward_cpu(np.ascontiguousarray(grad_out).reshape(planes, -1),
                                argmax.reshape(planes, -1), dx.reshape(planes, h * w))
    return dx


def _check_pool_backward(grad_out, argmax, x_shape, kernel, stride, where):
    """``maxpool2d_backward``'s arguments, checked: (grad_out, argmax, x_shape, kernel, stride)."""
    grad_out = as_float_array(grad_out, "grad_out", ndim=4, where=where)
    argmax = as_array(argmax, "argmax", where=where)
    try:
        gpu = on_device({"grad_out": grad_out, "argmax": argmax})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if np.dtype(argmax.dtype).kind not in "iu":
        raise ValueError(f"{where}: argmax must have an integer dtype, got {np.dtype(argmax.dtype).name}")
    if tuple(argmax.shape) != tuple(grad_out.shape):
        raise ValueError(f"{where}: argmax has shape {tuple(argmax.shape)} but grad_out has "
                         f"{tuple(grad_out.shape)}; they must match")
    n, c, h, w = check_shape(x_shape, "x_shape", 4, where)
    if (n, c) != tuple(grad_out.shape[:2]):
        raise ValueError(f"{where}: x_shape {tuple(x_shape)} and grad_out {tuple(grad_out.shape)} "
                         "must have the same N and C")
    if (kernel is None) != (stride is None) or (gpu and kernel is None):
        raise ValueError(f"{where}: give both kernel and stride or neither (device arrays need both)")
    if kernel is not None:
        (kh, kw), (sh, sw) = pair(kernel, "kernel", where), pair(stride, "stride", where)
        if kh > h or kw > w:
            raise ValueError(f"{where}: kernel {(kh, kw)} is larger than the input {(h, w)}")
        expected = (n, c, output_size(h, kh, sh, 0), output_size(w, kw, sw, 0))
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{where}: grad_out must have shape {expected} for x_shape {tuple(x_shape)}, "
                             f"kernel {(kh, kw)} and stride {(sh, sw)}, got {tuple(grad_out.shape)}")
        kernel, stride = (kh, kw), (sh, sw)
    values = argmax.copy_to_host() if gpu else argmax
    if values.size == 0:
        return grad_out, argmax, (n, c, h, w), kernel, stride
    if values.min() < 0 or values.max() >= h * w:
        raise ValueError(f"{where}: argmax holds indices outside [0, {h * w}), the flat y*W + x "
                         f"in a plane of shape ({h}, {w})")
    if kernel is not None:
        rows, cols = np.divmod(values, w)  # (N, C, OH, OW) each
        y0 = (np.arange(values.shape[2]) * sh)[:, None]  # (OH, 1)
        x0 = np.arange(values.shape[3]) * sw  # (OW,)
        outside = (rows < y0) | (rows >= y0 + kh) | (cols < x0) | (cols >= x0 + kw)
        if outside.any():
            i = tuple(int(k) for k in np.argwhere(outside)[0])
            raise ValueError(f"{where}: argmax{list(i)} = {int(values[i])} is not in its "
                             f"{kh}x{kw} window at row {i[2] * sh}, column {i[3] * sw}")
    return grad_out, argmax, (n, c, h, w), kernel, stride


class MaxPool2d(Module):
    """Max pooling, same numbers as ``torch.nn.MaxPool2d`` (no padding, floor mode).

        out[n, c, y, x] = max_{i<kh, j<kw} x[n, c, y*sh + i, x*sw + j]

    ``stride`` defaults to ``kernel_size``. The gradient of each output goes to the
    element that won its window; on a tie, to the first maximum in row-major window order.
    """

    def __init__(self, kernel_size, stride=None):
        self.kernel_size = pair(kernel_size, "kernel_size", "MaxPool2d")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", "MaxPool2d")
        self._cache = None

    def __repr__(self):
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride})"

    def forward(self, x):
        x, _, _ = _check_pool_forward(x, self.kernel_size, self.stride, "MaxPool2d")
        out, argmax = _maxpool2d_forward(x, self.kernel_size, self.stride)
        self._cache = (argmax, tuple(x.shape), x.dtype, is_device_array(x))
        return out

    def backward(self, grad_out):
        argmax, x_shape, dtype, gpu = self._cache if self._cache else (None, None, None, False)
        g = _check_grad(grad_out, None if argmax is None else argmax.shape, dtype, "MaxPool2d", gpu)
        return _maxpool2d_backward(g, argmax, x_shape, self.kernel_size, self.stride)


# ----------------------------------------------------------------------------- Linear


class Linear(Module):
    """Fully connected layer, ``torch.nn.Linear``'s numbers up to the order in which BLAS
    adds the products: y = x w^T + b.

    Backward: dL/dx = g w, dL/dw = g^T x, dL/db = sum_n g. Init: He normal,
    ``w ~ N(0, 2 / in_features)``, ``b = 0``, from ``rng`` (``np.random.default_rng(0)``
    when None). Weight (out, in), bias (out,). The three products run through
    ``tinyfrcnn.matmul`` (on the device, dL/dw accumulates straight into ``.grad``).
    """

    def __init__(self, in_features, out_features, rng=None):
        where = "Linear"
        self.in_features = check_positive_int(in_features, "in_features", where)
        self.out_features = check_positive_int(out_features, "out_features", where)
        check_array_fits((self.out_features, self.in_features), "weight (out_features, in_features)", where)
        rng = np.random.default_rng(0) if rng is None else check_rng(rng, where)
        self.weight = Parameter(_he_normal((self.out_features, self.in_features), self.in_features, rng))
        self.bias = Parameter(np.zeros(self.out_features, dtype=np.float32))
        self._cache = None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"

    def forward(self, x):
        where = "Linear"
        x, gpu = _check_input(x, where, 2, "(N, in_features)", [("weight", self.weight), ("bias", self.bias)])
        if x.shape[1] != self.in_features:
            raise ValueError(f"{where}: x has {x.shape[1]} features (shape {tuple(x.shape)}) "
                             f"but in_features={self.in_features}")
        w = _param(self.weight, x.dtype, gpu)
        b = _param(self.bias, x.dtype, gpu)
        self._cache = (x, w, gpu)
        out = (_device_matmul if gpu else matmul)(x, w, trans_b=True)  # (N, out_features)
        if gpu:
            _add_bias(out.reshape(x.shape[0], self.out_features, 1), b, gpu)
        else:
            out += b
        return out

    def backward(self, grad_out):
        x, w, gpu = self._cache if self._cache else (None, None, False)
        shape = None if x is None else (x.shape[0], self.out_features)
        g = _check_grad(grad_out, shape, None if x is None else x.dtype, "Linear", gpu)
        if gpu:
            if x.shape[0]:
                _device_matmul(g, x, trans_a=True, out=self.weight.grad, accumulate=True)
                _accumulate_bias_grad(self.bias, g, rows=False)
            return _device_matmul(g, w)  # (N, in_features)
        self.weight.accumulate(matmul(g, x, trans_a=True))  # (out_features, in_features)
        _accumulate_bias_grad(self.bias, g, rows=False)
        return matmul(g, w)  # (N, in_features)


# ----------------------------------------------------------------------------- Flatten


class Flatten(Module):
    """(N, ...) -> (N, -1); backward reshapes the gradient back (a view, also on the device)."""

    def __init__(self):
        self._shape = None
        self._gpu = False

    def forward(self, x):
        x = as_float_array(x, "x", where="Flatten")
        if x.ndim < 2:
            raise ValueError(f"Flatten: x must be (N, ...) with at least 2 dimensions (as torch.nn.Flatten), "
                             f"got shape {tuple(x.shape)}")
        self._gpu = is_device_array(x)
        if self._gpu and not x.is_c_contiguous():
            raise ValueError("Flatten: x must be C-contiguous on the device")
        self._shape, self._dtype = tuple(x.shape), x.dtype
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward(self, grad_out):
        shape = self._shape
        flat = None if shape is None else (shape[0], math.prod(shape[1:]))
        g = _check_grad(grad_out, flat, None if shape is None else self._dtype, "Flatten", self._gpu)
        return g.reshape(*shape)


# ----------------------------------------------------------------------------- Sequential


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    Each layer may appear once: a layer keeps what its last forward needs for its
    backward, so a second use would overwrite the first one's and the gradients would be
    silently wrong (use two layers, or share Parameters between them).
    """

    def __init__(self, *layers):
        seen = {}
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise ValueError(f"Sequential: layer {i} must be a Module, got {type(layer).__name__}")
            if id(layer) in seen:
                raise ValueError(f"Sequential: layers {seen[id(layer)]} and {i} are the same {type(layer).__name__} "
                                 "object; a layer keeps one forward's state for its backward, so each may appear once")
            seen[id(layer)] = i
        self.layers = list(layers)

    def named_parameters(self, prefix=""):
        named = []
        for i, layer in enumerate(self.layers):
            named.extend(layer.named_parameters(f"{prefix}{i}."))
        return named

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_out):
        """Gradients in reverse order. A layer that returns None (a ``Conv2d`` with
        ``needs_input_grad=False``) ends the pass; layers before it must have no parameters."""
        for i in reversed(range(len(self.layers))):
            grad_out = self.layers[i].backward(grad_out)
            if grad_out is None:
                if any(layer.parameters() for layer in self.layers[:i]):
                    raise ValueError(f"Sequential: layer {i} returned no input gradient "
                                     "(needs_input_grad=False) but layers before it have parameters")
                return None
        return grad_out
