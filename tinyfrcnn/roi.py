"""RoI max pooling (Fast R-CNN) and RoIAlign (Mask R-CNN), forward and backward.

Both turn a region of interest of any size into a fixed ``ph x pw`` grid of features, so
that one fully connected head can score every proposal.

RoI max pooling (Girshick, "Fast R-CNN", 2015, section 2.1): "RoI max pooling works by
dividing the h x w RoI window into an H x W grid of sub-windows of approximate size
h/H x w/W and then max-pooling the values in each sub-window into the corresponding
output grid cell." The RoI corners are rounded to feature cells, and so are the bin
edges: two quantisations. Its gradient (section 2.3) routes each output gradient to the
input that won the max:

    dL/dx_i = sum_r sum_j [i = i*(r, j)] dL/dy_rj

RoIAlign (He et al., "Mask R-CNN", 2017) drops the rounding: each bin is the average of
``sx x sy`` bilinear samples taken at regularly spaced points inside it. The output is
linear in the features and, with a fixed ``sampling_ratio`` and samples that stay inside
the map, a continuous (piecewise bilinear) function of the RoI; the adaptive sample
count (``ceil(roi_h / ph)``) and samples falling off the map's border jump.

RoI max pooling gives the same numbers as ``torchvision.ops.roi_pool`` on the same
input (argmax here is a flat index into the whole feature array rather than into one
channel plane). RoIAlign gives the same numbers as ``torchvision.ops.roi_align`` on the
CPU, forward and backward, in float32 and float64 (``benchmarks/torch_parity.py``
checks both): sample positions, bilinear weights and sums are rounded to the features'
dtype one step at a time, in torchvision's order.

RoI coordinates times ``spatial_scale`` must lie within +-2**24 feature cells
(``MAX_ROI_CELLS``), where float32 still holds every integer, and one RoI may take at
most ``MAX_ROI_SAMPLES`` (2**21) bilinear samples in RoIAlign.
"""

import math
import threading

import numpy as np
from numba import cuda, float32, float64, int64, njit, prange, uint64

from .checks import as_array, as_float_array, check_boxes, check_finite, check_number, check_shape, pair
from .device import empty_on_device, is_device_array, launch, on_device, rounded_ops, to_device, zeros_on_device
from .layers import Module, _flat

FLT_MAX = float(np.finfo(np.float32).max)
SAMPLE_TABLE_ROWS = 1 << 21  # RoIAlign CPU: most samples tabulated at once (64 MiB for float32)
MAX_ROI_SAMPLES = SAMPLE_TABLE_ROWS  # RoIAlign: most bilinear samples one RoI may take, on CPU and CUDA
MAX_ROI_CELLS = 1 << 24  # largest |RoI coordinate * spatial_scale|, in feature cells
MAX_SAMPLING_RATIO = 1 << 10  # largest |sampling_ratio|
MAX_DEFERRED_IMAGES = 1 << 24  # most images whose device RoIs the kernels check (float32 counts to here)


# --------------------------------------------------------------------------- validation


def _check_rois(rois, n_images, dtype, scale, where):
    """(R, 5) finite RoIs with integer batch indices in [0, n_images), x2 >= x1, y2 >= y1,
    and every coordinate within ``MAX_ROI_CELLS`` feature cells once cast to ``dtype`` and
    multiplied by ``scale`` as the kernels do, so their integer casts cannot overflow.

    Returns the RoIs on the host in ``dtype``: device RoIs are copied (they are small), NumPy
    RoIs already in ``dtype`` come back as they are, not copied.
    """
    rois = _check_roi_shape(rois, where)
    host = rois.copy_to_host() if is_device_array(rois) else np.asarray(rois)
    T = np.dtype(dtype).type
    with np.errstate(over="ignore", invalid="ignore"):
        cast = host.astype(dtype, copy=False)  # (R, 5)
    if _rois_valid(host, cast, n_images, T(scale), MAX_ROI_CELLS):
        return cast
    # One of the checks below fails: they say which RoI, and how.
    check_finite(host, "rois", where)
    check_boxes(host[:, 1:], "rois[:, 1:]", where)
    batch = host[:, 0]
    bad = (batch != np.round(batch)) | (batch < 0) | (batch >= n_images)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: rois[{i}, 0] = {float(batch[i])!r} is not an integer batch index "
                         f"in [0, {n_images})")
    with np.errstate(over="ignore", invalid="ignore"):
        host = cast
        cells = np.abs(host[:, 1:] * T(scale))  # (R, 4)
    bad = ~(cells <= MAX_ROI_CELLS).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: rois[{i}] = {host[i].tolist()} reaches {cells[i].max():g} feature cells at "
                         f"spatial_scale {scale!r}; coordinates times spatial_scale must lie within "
                         f"+-{MAX_ROI_CELLS} (2**24)")
    raise AssertionError(f"{where}: rois failed _rois_valid but passed every check")  # the two must agree


def _check_roi_shape(rois, where):
    """``rois`` as a float (R, 5) array (NumPy or device); its values are not read."""
    rois = as_float_array(rois, "rois", ndim=2, where=where)
    if rois.shape[1] != 5:
        raise ValueError(f"{where}: rois must have shape (R, 5) as (batch_index, x1, y1, x2, y2), "
                         f"got {tuple(rois.shape)}")
    return rois


@njit(cache=True, error_model="numpy")
def _rois_valid(rois, cast, n_images, scale, max_cells):
    """Whether every RoI passes ``_check_rois``, in one pass: finite, x2 >= x1 and y2 >=
    y1, an integer batch index in [0, n_images), and |coordinate * scale| <= max_cells
    in the kernels' dtype (``cast``, ``scale`` of that dtype; an overflow gives inf)."""
    for r in range(rois.shape[0]):
        for k in range(5):
            if not np.isfinite(rois[r, k]):
                return False
            if k and not abs(cast[r, k] * scale) <= max_cells:
                return False
        b = rois[r, 0]
        if not (rois[r, 3] >= rois[r, 1] and rois[r, 4] >= rois[r, 2] and b == np.floor(b) and 0 <= b < n_images):
            return False
    return True


def _make_roi_check_cuda(dtype):
    """``_rois_valid`` for RoI r, on the device, for features of ``dtype``: the kernels
    given device RoIs check them where they are (``_check_inputs``' ``defer``).
    ``n_images`` is cast to ``dtype`` for the comparison, so it must be at most
    ``MAX_DEFERRED_IMAGES``."""
    T = _cuda_scalar(dtype)
    mul, _ = rounded_ops(dtype)

    @cuda.jit(device=True, inline="always")
    def roi_ok(rois, r, n_images, scale):
        for k in range(5):
            v = rois[r, k]
            if not math.isfinite(v):
                return False
            if k and not abs(mul(T(v), scale)) <= T(MAX_ROI_CELLS):
                return False
        b = rois[r, 0]
        if not (rois[r, 3] >= rois[r, 1] and rois[r, 4] >= rois[r, 2] and b >= T(0) and b < T(n_images)):
            return False
        return T(int64(b)) == b  # a whole number: exact, as n_images <= MAX_DEFERRED_IMAGES

    return roi_ok


def _check_inputs(features, rois, output_size, spatial_scale, where, upload=False, defer=False):
    """Validate the forward arguments; returns (on_gpu, (ph, pw), scale, host rois, rois).

    ``upload``: NumPy ``rois`` with device ``features`` are uploaded (the returned
    ``rois``, in the features' dtype) instead of refused. The layers do this: the RoIs
    are made on the host, and checking the host copy saves copying them back.
    ``defer``: device ``rois`` with device ``features`` (with channels, and at most
    ``MAX_DEFERRED_IMAGES`` images: ``_kernel_checks``) are checked for shape and dtype
    only (host rois None); the kernel checks their values and ``_raise_on_fault`` reads
    its verdict: no copy back to the host and no wait before the launch.
    """
    features = as_float_array(features, "features", ndim=4, where=where)
    N, C, H, W = features.shape
    if H == 0 or W == 0:
        raise ValueError(f"{where}: features must have non-zero height and width, got {tuple(features.shape)}")
    ph, pw = pair(output_size, "output_size", where)
    scale = check_number(spatial_scale, "spatial_scale", low=0, low_open=True, where=where)
    if defer and C and _kernel_checks(features, rois, N):
        return True, (ph, pw), scale, None, _check_roi_shape(rois, where)
    host = _check_rois(rois, N, features.dtype, scale, where)
    if upload and is_device_array(features) and not is_device_array(rois):
        rois = to_device(np.ascontiguousarray(host))  # (R, 5)
    gpu = on_device({"features": features, "rois": rois})
    if not gpu:
        check_finite(features, "features", where)
    return gpu, (ph, pw), scale, host, rois


def _kernel_checks(data, rois, n_images):
    """Whether a kernel can check ``rois`` itself (``defer``): they and the array it reads
    with them on the device, and few enough images for ``_make_roi_check_cuda``."""
    return n_images <= MAX_DEFERRED_IMAGES and is_device_array(data) and is_device_array(rois)


def _flat_features(features, where):
    """Device features (N, C, H, W) as one C-order run (N * C * H * W,), as the kernels
    read them: a view, so they must be C-contiguous."""
    if not features.is_c_contiguous():
        raise ValueError(f"{where}: features must be C-contiguous on the device")
    return _flat(features)


def _round_half_away(v):
    """C's round(): halves go away from zero (np.round goes to even)."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _empty(gpu, shape, dtype):
    return empty_on_device(shape, dtype) if gpu else np.zeros(shape, dtype=dtype)


_FAULT_FLAGS = threading.local()  # .flag: the thread's mapped (host-visible) int32, made on first use


def _fault_flag(reset=True):
    """A pinned host int32 that kernels set when they meet bad input (a RoI or an argmax
    entry): no allocation or copy per call; set to 0 when ``reset`` (a call that does
    not read it back leaves it alone). One per host thread: a call reads the verdict
    of its own kernel, not of one that another thread launched meanwhile."""
    flag = getattr(_FAULT_FLAGS, "flag", None)
    if flag is None:
        flag = _FAULT_FLAGS.flag = cuda.mapped_array(1, dtype=np.int32)
    if reset:
        flag[0] = 0
    return flag


def _raise_on_fault(flag, rois, n_images, dtype, scale, where):
    """Wait for a kernel that checked device ``rois`` itself (skipping the bad ones); if
    it set ``flag``, the host checks find the RoI and word the error."""
    cuda.synchronize()
    if flag[0]:
        _check_rois(rois, n_images, dtype, scale, where)
        raise AssertionError(f"{where}: a kernel flagged RoIs that the host checks accept")  # the two must agree


# --------------------------------------------------------------------------- RoI max pooling


def _roi_pool_reference(features, rois, output_size, spatial_scale):
    """Plain loops: returns (output (R, C, ph, pw), argmax (R, C, ph, pw) flat indices, -1 if empty)."""
    ph, pw = pair(output_size, "output_size")
    N, C, H, W = features.shape
    T = features.dtype.type
    out = np.zeros((len(rois), C, ph, pw), dtype=features.dtype)
    argmax = np.full(out.shape, -1, dtype=np.int64)
    flat_index = np.arange(features.size).reshape(features.shape)  # (N, C, H, W)
    for r, roi in enumerate(rois.astype(features.dtype)):
        b = int(roi[0])
        x1, y1, x2, y2 = (int(_round_half_away(v * T(spatial_scale))) for v in roi[1:])
        bin_h = T(max(y2 - y1 + 1, 1)) / T(ph)
        bin_w = T(max(x2 - x1 + 1, 1)) / T(pw)
        for i in range(ph):
            h0 = min(max(int(np.floor(T(i) * bin_h)) + y1, 0), H)
            h1 = min(max(int(np.ceil(T(i + 1) * bin_h)) + y1, 0), H)
            for j in range(pw):
                w0 = min(max(int(np.floor(T(j) * bin_w)) + x1, 0), W)
                w1 = min(max(int(np.ceil(T(j + 1) * bin_w)) + x1, 0), W)
                if h1 <= h0 or w1 <= w0:
                    continue
                window = features[b, :, h0:h1, w0:w1].reshape(C, -1)  # (C, bin area)
                k = window.argmax(axis=1)
                out[r, :, i, j] = window[np.arange(C), k]
                argmax[r, :, i, j] = flat_index[b, :, h0:h1, w0:w1].reshape(C, -1)[np.arange(C), k]
    return out, argmax


def _pool_bins(rois, spatial_scale, pooled_h, pooled_w, height, width):
    """Quantised sub-window edges of every RoI, computed in the RoIs' dtype as torchvision does.

    Corners: round(x * scale); size: max(end - start + 1, 1); bin k covers
    [floor(k * size / P), ceil((k + 1) * size / P)) offset by the start, clipped to the map.
    Returns hstart, hend (R, ph) and wstart, wend (R, pw), int64.
    """
    T = rois.dtype.type
    x1, y1, x2, y2 = (_round_half_away(rois[:, k] * T(spatial_scale)).astype(np.int64) for k in range(1, 5))

    def edges(start, end, pooled, limit):
        size = np.maximum(end - start + 1, 1).astype(rois.dtype)
        bin_size = (size / T(pooled))[:, None]  # (R, 1)
        k = np.arange(pooled + 1, dtype=rois.dtype)[None, :]  # (1, P + 1)
        lo = np.floor(k[:, :-1] * bin_size).astype(np.int64) + start[:, None]  # (R, P)
        hi = np.ceil(k[:, 1:] * bin_size).astype(np.int64) + start[:, None]  # (R, P)
        return np.clip(lo, 0, limit), np.clip(hi, 0, limit)

    hstart, hend = edges(y1, y2, pooled_h, height)
    wstart, wend = edges(x1, x2, pooled_w, width)
    return hstart, hend, wstart, wend


@njit(cache=True, parallel=True)
def _roi_pool_forward_cpu(planes, batch, hstart, hend, wstart, wend, out, argmax):
    # planes: the features as (N * C, H, W).
    R, C, PH, PW = out.shape
    H, W = planes.shape[1], planes.shape[2]
    for rc in prange(R * C):
        r = rc // C
        c = rc - r * C
        p = batch[r] * C + c
        plane = planes[p]
        for i in range(PH):
            for j in range(PW):
                best = -FLT_MAX if hend[r, i] > hstart[r, i] and wend[r, j] > wstart[r, j] else 0.0
                best_at = -1
                for y in range(hstart[r, i], hend[r, i]):
                    row = plane[y]
                    for x in range(wstart[r, j], wend[r, j]):
                        if row[x] > best:
                            best = row[x]
                            best_at = y * W + x
                out[r, c, i, j] = best
                argmax[r, c, i, j] = p * H * W + best_at if best_at >= 0 else -1


@njit(cache=True, parallel=True)
def _roi_pool_backward_cpu(grad_out, argmax, grad_in, plane_size, bad):
    # grad_in is flat; the channels run in parallel, which is race-free only while every
    # argmax of channel c lies in a channel-c plane: entries that do not are skipped and
    # flagged in bad[c] (1: outside grad_in, 2: in another channel's plane).
    R, C, PH, PW = grad_out.shape
    for c in prange(C):
        for r in range(R):
            for i in range(PH):
                for j in range(PW):
                    a = argmax[r, c, i, j]
                    if a < -1 or a >= grad_in.size:
                        bad[c] = 1
                    elif a >= 0:
                        if (a // plane_size) % C != c:
                            bad[c] = 2
                        else:
                            grad_in[a] += grad_out[r, c, i, j]


ROI_THREADS = 256  # threads per block of the RoI kernels, at most
CHANNELS_PER_THREAD = 4  # the forward kernels: a bin's edges or samples serve this many channels
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y


def _roi_blocks(R, C, PH, PW, channels_per_thread=1):
    """(grid, block) of the RoI kernels: one thread per output bin (r, c, i, j), or per
    bin (r, i, j) in ``channels_per_thread`` channels.

    A block holds the PH x PW bins of a few channels of one RoI: threadIdx (x, y, z) =
    (bin column j, bin row i, channel), blockIdx (x, y) = (RoI, channel group). A thread
    reads its indices off the launch instead of dividing a flat index (64-bit integer
    division is slow on a GPU), and the block's threads write neighbouring outputs.
    Outputs wider than a block and channel groups beyond the grid are taken in strides.
    A block holds at most ``ROI_THREADS`` threads, whatever the output size: a kernel
    that needs many registers (RoIAlign's forward, 91 a thread) cannot start with 1024.
    """
    bx = min(PW, ROI_THREADS)
    by = min(PH, ROI_THREADS // bx)
    bz = max(1, min(C, 64, ROI_THREADS // (bx * by)))
    return (R, min(math.ceil(C / (bz * channels_per_thread)), MAX_GRID_Y)), (bx, by, bz)


@cuda.jit(device=True, inline="always")
def _block_channels(C):
    """(first, stop, step) of the channels this thread takes, in the ``_roi_blocks`` layout."""
    return cuda.blockIdx.y * cuda.blockDim.z + cuda.threadIdx.z, C, cuda.gridDim.y * cuda.blockDim.z


def _cuda_scalar(dtype):
    return float32 if np.dtype(dtype) == np.float32 else float64


def _make_roi_pool_forward_cuda(dtype):
    """The forward kernel for features of ``dtype``: each thread computes its own bin.

    Bin edges are worked out from the RoI inside the kernel, in ``dtype`` and with the
    same roundings as ``_pool_bins``, so the bins (and so the results) match the CPU.
    """
    T = _cuda_scalar(dtype)
    mul, _ = rounded_ops(dtype)
    roi_ok = _make_roi_check_cuda(dtype)

    @cuda.jit(device=True, inline="always")
    def corner(v, scale):
        """round(v * scale), halves away from zero."""
        s = mul(T(v), scale)
        a = abs(s)
        k = int(math.floor(a))
        if a - T(k) >= T(0.5):
            k += 1
        return k if s >= 0 else -k

    @cuda.jit(device=True, inline="always")
    def bin_edges(start, end, p, pooled, limit):
        """[floor(p * size / P), ceil((p + 1) * size / P)) + start, clipped to [0, limit]."""
        bin_size = T(max(end - start + 1, 1)) / T(pooled)
        lo = int(math.floor(T(p) * bin_size)) + start
        hi = int(math.ceil(T(p + 1) * bin_size)) + start
        return min(max(lo, 0), limit), min(max(hi, 0), limit)

    @cuda.jit
    def roi_pool_forward(features, height, width, rois, scale, n_images, out, argmax, flag):
        """``features``: the (N, C, H, W) map as one C-order run (N * C * H * W,). A bad
        RoI's block sets flag[0] and writes nothing."""
        R, C, PH, PW = out.shape
        r = cuda.blockIdx.x
        if not roi_ok(rois, r, n_images, scale):
            flag[0] = 1
            return
        n = int(rois[r, 0])
        x_start, x_end = corner(rois[r, 1], scale), corner(rois[r, 3], scale)
        y_start, y_end = corner(rois[r, 2], scale), corner(rois[r, 4], scale)
        c_first, _, c_step = _block_channels(C)
        # The bin's edges once, then its channels (launched with several per thread).
        # while, not range(): a range with a step pays a 64-bit division for its length.
        i = cuda.threadIdx.y
        while i < PH:
            h0, h1 = bin_edges(y_start, y_end, i, PH, height)
            j = cuda.threadIdx.x
            while j < PW:
                w0, w1 = bin_edges(x_start, x_end, j, PW, width)
                empty = h1 <= h0 or w1 <= w0  # an empty bin gives 0
                c = c_first
                while c < C:
                    base = (n * C + c) * height * width
                    best = T(0) if empty else T(-FLT_MAX)
                    best_at = int64(-1)
                    # Flat offsets, unsigned and stepped by hand: a read costs an add, not
                    # a 4-D index's multiplies and its test for negative indices.
                    row, last = uint64(base + h0 * width), uint64(base + h1 * width)
                    while row < last:
                        at, stop = row + uint64(w0), row + uint64(w1)
                        while at < stop:
                            v = features[at]
                            if v > best:
                                best = v
                                best_at = int64(at)
                            at += uint64(1)
                        row += uint64(width)
                    out[r, c, i, j] = best
                    argmax[r, c, i, j] = best_at
                    c += c_step
                j += cuda.blockDim.x
            i += cuda.blockDim.y

    return roi_pool_forward


_roi_pool_forward_cuda_f32 = _make_roi_pool_forward_cuda(np.float32)
_roi_pool_forward_cuda_f64 = _make_roi_pool_forward_cuda(np.float64)
_ROI_POOL_FORWARD_CUDA = {np.dtype(np.float32): _roi_pool_forward_cuda_f32,
                          np.dtype(np.float64): _roi_pool_forward_cuda_f64}


@cuda.jit
def _roi_pool_backward_cuda(grad_out, argmax, grad_in, flag):
    # The argmax is range-checked here, where it lives: copying it to the host would
    # cost more than the backward pass. A bad index is skipped and raises flag[0].
    R, C, PH, PW = grad_out.shape
    r = cuda.blockIdx.x
    for c in range(*_block_channels(C)):
        for i in range(cuda.threadIdx.y, PH, cuda.blockDim.y):
            for j in range(cuda.threadIdx.x, PW, cuda.blockDim.x):
                a = argmax[r, c, i, j]
                if a < -1 or a >= grad_in.size:
                    flag[0] = 1
                elif a >= 0:
                    cuda.atomic.add(grad_in, a, grad_out[r, c, i, j])


def roi_pool(features, rois, output_size, spatial_scale):
    """RoI max pooling (Fast R-CNN): ``y[r, c, i, j] = max over bin (i, j) of RoI r``.

    features (N, C, H, W) float32/float64, finite (checked on the host; device features
    are not read back to check); rois (R, 5) as (batch_index, x1, y1, x2, y2) in image
    coordinates; the feature map is the image scaled by ``spatial_scale``, and
    |coordinate * spatial_scale| may be at most ``MAX_ROI_CELLS`` (2**24).
    Returns ``(output (R, C, ph, pw), argmax (R, C, ph, pw) int64)``: argmax is the flat
    index into ``features`` of each maximum, -1 for an empty bin (whose output is 0).
    Same numbers as ``torchvision.ops.roi_pool``. Device RoIs are checked by the kernel
    that reads them (a bad one raises here once it has run: the call waits for it).
    """
    return _roi_pool(features, *_check_inputs(features, rois, output_size, spatial_scale, "roi_pool", defer=True))


def _roi_pool(features, gpu, output_size, scale, host, rois):
    """``roi_pool`` of arguments checked by ``_check_inputs`` (whose results follow ``features``);
    ``host`` None: the kernel checks the device RoIs, and the call waits for its verdict."""
    ph, pw = output_size
    N, C, H, W = features.shape
    R = rois.shape[0]
    out = _empty(gpu, (R, C, ph, pw), features.dtype)
    argmax = _empty(gpu, (R, C, ph, pw), np.int64)
    if out.size == 0:
        return out, argmax
    if gpu:
        kernel = _ROI_POOL_FORWARD_CUDA[np.dtype(features.dtype)]
        flag = _fault_flag(reset=host is None)
        launch(kernel, *_roi_blocks(R, C, ph, pw, CHANNELS_PER_THREAD), _flat_features(features, "roi_pool"),
               H, W, rois, features.dtype.type(scale), N, out, argmax, flag)
        if host is None:
            _raise_on_fault(flag, rois, N, features.dtype, scale, "roi_pool")
    else:
        batch = host[:, 0].astype(np.int64)
        bins = _pool_bins(host, scale, ph, pw, H, W)
        planes = np.ascontiguousarray(features).reshape(N * C, H, W)  # (N * C, H, W)
        _roi_pool_forward_cpu(planes, batch, *bins, out, argmax)
    return out, argmax


def roi_pool_backward(grad_out, argmax, features_shape):
    """Gradient of RoI max pooling: each output gradient goes to its argmax input.

    ``dL/dx[a] = sum of dL/dy[r, c, i, j] over all (r, c, i, j) with argmax = a``;
    empty bins (argmax -1) send nothing. ``argmax`` is the one ``roi_pool`` returned: an
    index outside ``features_shape`` is a ``ValueError``, and so, on the CPU (whose
    threads split the channels), is an entry of channel c outside the channel-c planes.
    Returns ``features_shape``.
    On the GPU the sums are atomic adds: where bins share an input, their order, and so
    the last bits of the sum, can change from run to run.
    """
    where = "roi_pool_backward"
    grad_out = as_float_array(grad_out, "grad_out", ndim=4, where=where)
    argmax, features_shape = _check_argmax(argmax, grad_out, features_shape, where)
    gpu = on_device({"grad_out": grad_out, "argmax": argmax})
    return _roi_pool_backward(grad_out, argmax, features_shape, gpu, where)


def _roi_pool_backward(grad_out, argmax, features_shape, gpu, where, verify=True):
    """``roi_pool_backward`` of checked arguments. On the GPU the kernel flags argmax
    entries outside the features; ``verify`` waits for it and raises on a flag. The
    RoIPool layer, whose argmax its own forward made, skips that wait."""
    size = math.prod(features_shape)
    if gpu:
        grad_in = zeros_on_device(size, grad_out.dtype)
        if grad_out.size:
            flag = _fault_flag(reset=verify)
            launch(_roi_pool_backward_cuda, *_roi_blocks(*grad_out.shape), grad_out, argmax, grad_in, flag)
            if verify:
                cuda.synchronize()
                if flag[0]:
                    _raise_argmax_outside(features_shape, where)
    else:
        grad_in = np.zeros(size, dtype=grad_out.dtype)
        if grad_out.size:
            bad = np.zeros(grad_out.shape[1], np.int8)  # (C,)
            plane_size = features_shape[2] * features_shape[3]
            _roi_pool_backward_cpu(np.ascontiguousarray(grad_out), np.ascontiguousarray(argmax), grad_in,
                                   plane_size, bad)
            if bad.any():
                c = int(np.flatnonzero(bad)[0])
                if bad[c] == 1:
                    _raise_argmax_outside(features_shape, where)
                raise ValueError(f"{where}: argmax[:, {c}] holds indices outside the channel-{c} planes of "
                                 f"features_shape {tuple(features_shape)}; roi_pool's argmax never does")
    return grad_in.reshape(tuple(features_shape))


def _raise_argmax_outside(features_shape, where):
    raise ValueError(f"{where}: argmax holds indices outside [-1, {math.prod(features_shape)}) "
                     f"for features_shape {tuple(features_shape)}")


def _check_argmax(argmax, grad_out, features_shape, where):
    shape = check_shape(features_shape, "features_shape", 4, where)
    argmax = as_array(argmax, "argmax", where=where)
    if tuple(argmax.shape) != tuple(grad_out.shape):
        raise ValueError(f"{where}: argmax has shape {tuple(argmax.shape)} but grad_out has "
                         f"{tuple(grad_out.shape)}; they must match")
    if np.dtype(argmax.dtype) != np.int64:
        raise ValueError(f"{where}: argmax must be int64, got {np.dtype(argmax.dtype).name}")
    if grad_out.shape[1] != shape[1]:
        raise ValueError(f"{where}: grad_out has {grad_out.shape[1]} channels but features_shape "
                         f"{shape} has {shape[1]}")
    return argmax, shape  # the values are checked by the kernels


class RoIPool(Module):
    """RoI max pooling layer: ``forward(features, rois)``, ``backward(grad_out)`` -> d features.

    The RoIs are constants (Fast R-CNN does not back-propagate into box coordinates).
    """

    def __init__(self, output_size, spatial_scale):
        self.output_size = pair(output_size, "output_size", "RoIPool")
        self.spatial_scale = check_number(spatial_scale, "spatial_scale", low=0, low_open=True, where="RoIPool")
        self._argmax = None
        self._shape = None

    def forward(self, features, rois):
        """rois (R, 5) may be a NumPy array with device features: the layer uploads them."""
        checked = _check_inputs(features, rois, self.output_size, self.spatial_scale, "RoIPool", upload=True)
        out, self._argmax = _roi_pool(features, *checked)
        self._shape = tuple(features.shape)
        return out

    def backward(self, grad_out):
        where = "RoIPool.backward"
        if self._argmax is None:
            raise ValueError(f"{where}: call forward first")
        grad_out = as_float_array(grad_out, "grad_out", ndim=4, where=where)
        if tuple(grad_out.shape) != tuple(self._argmax.shape):
            raise ValueError(f"{where}: grad_out must have the forward output's shape {tuple(self._argmax.shape)}, "
                             f"got {tuple(grad_out.shape)}")
        gpu = is_device_array(self._argmax)
        if is_device_array(grad_out) != gpu:
            raise ValueError(f"{where}: grad_out must be {'a CUDA device' if gpu else 'a NumPy'} array, "
                             "like the forward's features")
        # The argmax is the forward's own: on the GPU, no wait to check it.
        return _roi_pool_backward(grad_out, self._argmax, self._shape, gpu, where, verify=not gpu)

    def __repr__(self):
        return f"RoIPool(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


# --------------------------------------------------------------------------- RoIAlign


def _align_bins(rois, spatial_scale, ph, pw, sampling_ratio, aligned, H, W, T):
    """Yield (r, b, i, j, count, samples) for every bin of every RoI; samples lists, for
    each sample on the map, its four neighbours as (y, x, weight). Every step is rounded
    to the scalar type ``T``, in torchvision's order."""
    offset = T(0.5) if aligned else T(0)
    for r, (b, *box) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = (T(v) * T(spatial_scale) - offset for v in box)
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, T(1)), max(rh, T(1))
        bh, bw = rh / T(ph), rw / T(pw)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / T(ph))
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / T(pw))
        for i in range(ph):
            for j in range(pw):
                samples = []
                for iy in range(gh):
                    for ix in range(gw):
                        y = y1 + T(i) * bh + T(iy + 0.5) * bh / T(gh)
                        x = x1 + T(j) * bw + T(ix + 0.5) * bw / T(gw)
                        if -1 <= y <= H and -1 <= x <= W:  # samples further out count as 0
                            (ya, yb, ly), (xa, xb, lx) = _neighbours(y, H, T), _neighbours(x, W, T)
                            hy, hx = T(1) - ly, T(1) - lx
                            samples.append([(ya, xa, hy * hx), (ya, xb, hy * lx),
                                            (yb, xa, ly * hx), (yb, xb, ly * lx)])
                yield r, int(b), i, j, max(gh * gw, 1), samples


def _neighbours(t, size, T):
    """(low, high, frac) of a coordinate t in [-1, size]: clamped into [0, size - 1]."""
    if t <= 0:
        t = T(0)
    low = int(t)
    if low >= size - 1:
        return size - 1, size - 1, T(0)
    return low, low + 1, t - T(low)


def _roi_align_reference(features, rois, output_size, spatial_scale, sampling_ratio=-1, aligned=True):
    """Plain loops over RoIs, bins and sample points in the features' dtype; returns (R, C, ph, pw)."""
    ph, pw = pair(output_size, "output_size")
    N, C, H, W = features.shape
    T = features.dtype.type
    out = np.zeros((len(rois), C, ph, pw), dtype=features.dtype)
    for r, b, i, j, count, samples in _align_bins(rois, spatial_scale, ph, pw, sampling_ratio, aligned, H, W, T):
        f = features[b]  # (C, H, W)
        total = np.zeros(C, features.dtype)  # (C,)
        for (y0, x0, w0), (y1, x1, w1), (y2, x2, w2), (y3, x3, w3) in samples:
            total = total + (w0 * f[:, y0, x0] + w1 * f[:, y1, x1] + w2 * f[:, y2, x2] + w3 * f[:, y3, x3])
        out[r, :, i, j] = total / T(count)
    return out


def _roi_align_backward_reference(grad_out, rois, features_shape, spatial_scale, sampling_ratio=-1, aligned=True):
    """Plain loops: each sample adds ``g * w / count`` to each of its four neighbours."""
    ph, pw = grad_out.shape[2:]
    H, W = features_shape[2:]
    T = grad_out.dtype.type
    grad = np.zeros(features_shape, dtype=grad_out.dtype)
    for r, b, i, j, count, samples in _align_bins(rois, spatial_scale, ph, pw, sampling_ratio, aligned, H, W, T):
        for corners in samples:
            for y, x, w in corners:
                grad[b, :, y, x] += grad_out[r, :, i, j] * w / T(count)
    return grad


def _align_geometry(rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    """Per-RoI start, bin size and sampling grid, in the RoIs' dtype as torchvision computes them.

    start = x * scale - 0.5 (aligned); bin = (end - start) / P (at least 1 / P when not
    aligned); grid = sampling_ratio, or ceil(roi size / P) when sampling_ratio <= 0.
    Returns y0, x0, bin_h, bin_w (R,) floats and grid_h, grid_w (R,) int64.
    """
    T = rois.dtype.type
    offset = T(0.5) if aligned else T(0.0)
    x1, y1, x2, y2 = (rois[:, k] * T(spatial_scale) - offset for k in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = np.maximum(roi_w, T(1)), np.maximum(roi_h, T(1))
    bin_h, bin_w = roi_h / T(pooled_h), roi_w / T(pooled_w)
    if sampling_ratio > 0:
        grid_h = np.full(len(rois), sampling_ratio, dtype=np.int64)
        grid_w = grid_h.copy()
    else:
        grid_h = np.ceil(roi_h / T(pooled_h)).astype(np.int64)
        grid_w = np.ceil(roi_w / T(pooled_w)).astype(np.int64)
    return y1, x1, bin_h, bin_w, grid_h, grid_w


@njit(cache=True)
def _axis_table(start, bin_size, pooled, grid, size, frac):
    """Sample neighbours along one axis for every (bin, sample) of one RoI, in torchvision's
    order and in the dtype of ``frac`` (pooled * grid,), which receives the fractions:
    ``t = start + p * bin + (g + 1/2) * bin / grid``. Samples beyond [-1, size] are not
    inside; others are clamped into [0, size - 1]. Returns low, high (int64) and inside."""
    T = frac.dtype.type
    n = pooled * grid
    low = np.zeros(n, np.int64)
    high = np.zeros(n, np.int64)
    inside = np.zeros(n, np.bool_)
    frac[:] = 0
    for p in range(pooled):
        for g in range(grid):
            k = p * grid + g
            t = start + T(p) * bin_size + T(g + 0.5) * bin_size / T(grid)
            if t < -1.0 or t > size:
                continue
            inside[k] = True
            if t <= 0:
                t = T(0)
            lo = int(t)
            if lo >= size - 1:
                low[k], high[k] = size - 1, size - 1
            else:
                low[k], high[k], frac[k] = lo, lo + 1, t - T(lo)
    return low, high, inside


@njit(cache=True, parallel=True)
def _align_tables(y0, x0, bin_h, bin_w, grid_h, grid_w, offsets, PH, PW, H, W):
    """Every sample of every bin of every RoI, as four flat plane positions and bilinear weights.

    Samples of RoI r, bin (i, j) are rows offsets[r] + (i * PW + j) * gh * gw onwards.
    Samples off the map get weight 0. Returns pos (S, 4) uint32 (unsigned, so indexing
    skips numba's negative-index check; 4 bytes, as the table is read once per block of
    four channels) and weight (S, 4) in the RoIs' dtype.
    """
    pos = np.zeros((offsets[-1], 4), np.uint32)
    weight = np.zeros((offsets[-1], 4), y0.dtype)
    one = y0.dtype.type(1)
    for r in prange(len(y0)):
        gh, gw = grid_h[r], grid_w[r]
        ly = np.empty(PH * gh, weight.dtype)  # (PH * gh,)
        lx = np.empty(PW * gw, weight.dtype)  # (PW * gw,)
        yl, yh, yin = _axis_table(y0[r], bin_h[r], PH, gh, H, ly)
        xl, xh, xin = _axis_table(x0[r], bin_w[r], PW, gw, W, lx)
        k = np.int64(offsets[r])
        for i in range(PH):
            for j in range(PW):
                for a in range(i * gh, (i + 1) * gh):
                    for b in range(j * gw, (j + 1) * gw):
                        if yin[a] and xin[b]:
                            hy, hx = one - ly[a], one - lx[b]
                            pos[k, 0], weight[k, 0] = yl[a] * W + xl[b], hy * hx
                            pos[k, 1], weight[k, 1] = yl[a] * W + xh[b], hy * lx[b]
                            pos[k, 2], weight[k, 2] = yh[a] * W + xl[b], ly[a] * hx
                            pos[k, 3], weight[k, 3] = yh[a] * W + xh[b], ly[a] * lx[b]
                        k += 1
    return pos, weight


@njit(cache=True)
def _channel_block(c0, C):
    """The four channels of the block starting at c0, which share each read of the
    sample table; past the last channel, the last one again (the backward pass gives
    those lanes a zero gradient)."""
    return c0, min(c0 + 1, C - 1), min(c0 + 2, C - 1), min(c0 + 3, C - 1)


@njit(cache=True, parallel=True)
def _roi_align_forward_cpu(planes, batch, offsets, pos, weight, out):
    # planes: the features as (N * C, H * W); offsets unsigned like pos. One task is one
    # RoI and a block of four channels, which read each sample's positions and weights
    # once. Sums run in the features' dtype, as torchvision's do; a repeated channel
    # computes the same sum again and stores the same value.
    R, C, PH, PW = out.shape
    zero = weight.dtype.type(0)
    one = offsets.dtype.type(1)
    blocks = (C + 3) // 4
    for task in prange(R * blocks):
        r = task // blocks
        c0, c1, c2, c3 = _channel_block((task - r * blocks) * 4, C)
        base = batch[r] * C
        p0, p1, p2, p3 = planes[base + c0], planes[base + c1], planes[base + c2], planes[base + c3]
        samples = np.int64(offsets[r + 1] - offsets[r]) // (PH * PW)
        k = offsets[r]
        for i in range(PH):
            for j in range(PW):
                t0 = t1 = t2 = t3 = zero
                for _ in range(samples):
                    a0, a1, a2, a3 = pos[k, 0], pos[k, 1], pos[k, 2], pos[k, 3]
                    w0, w1, w2, w3 = weight[k, 0], weight[k, 1], weight[k, 2], weight[k, 3]
                    t0 += w0 * p0[a0] + w1 * p0[a1] + w2 * p0[a2] + w3 * p0[a3]
                    t1 += w0 * p1[a0] + w1 * p1[a1] + w2 * p1[a2] + w3 * p1[a3]
                    t2 += w0 * p2[a0] + w1 * p2[a1] + w2 * p2[a2] + w3 * p2[a3]
                    t3 += w0 * p3[a0] + w1 * p3[a1] + w2 * p3[a2] + w3 * p3[a3]
                    k += one
                n = weight.dtype.type(max(samples, 1))
                out[r, c0, i, j], out[r, c1, i, j] = t0 / n, t1 / n
                out[r, c2, i, j], out[r, c3, i, j] = t2 / n, t3 / n


@njit(cache=True, inline="always")
def _share(g, w, n, inv):
    """``g * w / n``; ``inv`` is ``1 / n`` when n is a power of two (else 0), and then
    multiplying by it rounds exactly as dividing does, at a fraction of the cost."""
    return g * w * inv if inv else g * w / n


@njit(cache=True, parallel=True)
def _roi_align_backward_cpu(grad_out, batch, offsets, pos, weight, grad_planes):
    # Parallel over blocks of four channels: a channel's gradients only land in that
    # channel's planes. The four updates of one sample are independent, so they overlap
    # instead of each waiting for the last one's store. A repeated channel's lane adds
    # +0.0, which leaves every value as it was (gradients start at +0.0, never -0.0).
    R, C, PH, PW = grad_out.shape
    T = grad_out.dtype.type
    one = offsets.dtype.type(1)
    blocks = (C + 3) // 4
    for block in prange(blocks):
        first = block * 4
        c0, c1, c2, c3 = _channel_block(first, C)
        for r in range(R):
            base = batch[r] * C
            p0, p1 = grad_planes[base + c0], grad_planes[base + c1]
            p2, p3 = grad_planes[base + c2], grad_planes[base + c3]
            samples = np.int64(offsets[r + 1] - offsets[r]) // (PH * PW)
            n = T(max(samples, 1))
            # x / n, as torchvision divides; for a power of two x * (1 / n) is the same number
            inv = T(1) / n if samples & (samples - 1) == 0 else T(0)
            k = offsets[r]
            for i in range(PH):
                for j in range(PW):
                    g0 = grad_out[r, c0, i, j]
                    g1 = grad_out[r, c1, i, j] if first + 1 < C else T(0)
                    g2 = grad_out[r, c2, i, j] if first + 2 < C else T(0)
                    g3 = grad_out[r, c3, i, j] if first + 3 < C else T(0)
                    for _ in range(samples):
                        # A sample off the map has four zero weights and adds nothing (not even
                        # inf * 0); one on it has hy * hx > 0.
                        if weight[k, 0] != 0:
                            for q in range(4):
                                a, w = pos[k, q], weight[k, q]
                                p0[a] += _share(g0, w, n, inv)
                                p1[a] += _share(g1, w, n, inv)
                                p2[a] += _share(g2, w, n, inv)
                                p3[a] += _share(g3, w, n, inv)
                        k += one


def _checked_geometry(host, scale, pooled_h, pooled_w, sampling_ratio, aligned, gpu, where):
    """``_align_geometry`` of the host RoIs, after ``_check_samples``. None on the GPU with
    a fixed sampling grid: its kernels work the geometry out for themselves, and every
    RoI takes the same number of samples (there ``host`` may be the device RoIs: only
    their number is read)."""
    if gpu and sampling_ratio > 0:
        grid = np.full(host.shape[0], sampling_ratio, dtype=np.int64)  # (R,)
        _check_samples(grid, grid, pooled_h, pooled_w, where)
        return None
    geometry = _align_geometry(host, scale, pooled_h, pooled_w, sampling_ratio, aligned)
    _check_samples(geometry[4], geometry[5], pooled_h, pooled_w, where)
    return geometry


def _check_samples(grid_h, grid_w, pooled_h, pooled_w, where):
    """Raise if one RoI needs more than ``MAX_ROI_SAMPLES`` bilinear samples, which
    bounds both the CPU's sample tables and the CUDA threads' loops; ``grid_h``,
    ``grid_w`` (R,) each RoI's sampling grid."""
    samples = grid_h.astype(np.float64) * grid_w * (pooled_h * pooled_w)  # (R,), exact below 2**53
    bad = samples > MAX_ROI_SAMPLES
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: rois[{i}] needs {samples[i]:.0f} bilinear samples ({pooled_h} x {pooled_w} bins "
                         f"of {grid_h[i]} x {grid_w[i]}), more than the {MAX_ROI_SAMPLES} one RoI may take; "
                         "clip the RoIs to the feature map or pass a smaller sampling_ratio")


def _sample_tables(geometry, batch, pooled_h, pooled_w, height, width):
    """Yield (lo, hi, (batch, offsets, pos, weight)) for runs of RoIs whose tables hold at
    most ``SAMPLE_TABLE_ROWS`` samples (or one RoI), so memory stays bounded for huge RoIs."""
    limit = SAMPLE_TABLE_ROWS
    if height * width >= 2**32:
        raise ValueError(f"roi_align: feature planes of {height} x {width} cells are too large for the CPU "
                         "kernel's 32-bit sample positions")
    counts = geometry[4] * geometry[5] * (pooled_h * pooled_w)  # (R,)
    bounds, start, total = [], 0, 0
    for r, n in enumerate(counts.tolist()):
        if total + n > limit and r > start:
            bounds.append((start, r))
            start, total = r, 0
        total += n
    bounds.append((start, len(counts)))
    for lo, hi in bounds:
        offsets = np.concatenate([[0], np.cumsum(counts[lo:hi])]).astype(np.uint64)  # (hi - lo + 1,)
        pos, weight = _align_tables(*(g[lo:hi] for g in geometry), offsets, pooled_h, pooled_w, height, width)
        yield lo, hi, (batch[lo:hi], offsets, pos, weight)


def _make_roi_align_cuda(dtype):
    """Forward and backward kernels for features of ``dtype``; each thread does one bin.

    The geometry (start, bin size, sampling grid), the sample points and the bilinear
    weights are worked out from the RoI inside the kernel in ``dtype``, step by step as on
    the CPU: the ``rounded_ops`` keep the compiler from fusing a multiply and an add, so
    they are the CPU's to the bit. The forward sums in ``dtype`` like the CPU.
    """
    T = _cuda_scalar(dtype)
    K = CHANNELS_PER_THREAD
    mul, add = rounded_ops(dtype)
    roi_ok = _make_roi_check_cuda(dtype)

    @cuda.jit(device=True, inline="always")
    def geometry(rois, r, scale, sampling_ratio, aligned, PH, PW):
        """(batch, y0, x0, bin_h, bin_w, grid_h, grid_w) of RoI r, as ``_align_geometry``."""
        offset = T(0.5) if aligned else T(0.0)
        x1 = add(mul(T(rois[r, 1]), scale), -offset)
        y1 = add(mul(T(rois[r, 2]), scale), -offset)
        x2 = add(mul(T(rois[r, 3]), scale), -offset)
        y2 = add(mul(T(rois[r, 4]), scale), -offset)
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, T(1.0)), max(roi_h, T(1.0))
        bin_h, bin_w = roi_h / T(PH), roi_w / T(PW)
        if sampling_ratio > 0:
            gh, gw = sampling_ratio, sampling_ratio
        else:
            gh, gw = int(math.ceil(bin_h)), int(math.ceil(bin_w))
        return int(rois[r, 0]), y1, x1, bin_h, bin_w, gh, gw

    @cuda.jit(device=True, inline="always")
    def axis_sample(start, p, bin_size, g, grid, size):
        """Sample g of bin p along an axis: (low, high, frac, inside), as ``_axis_table``."""
        t = add(add(start, mul(T(p), bin_size)), mul(T(g) + T(0.5), bin_size) / T(grid))
        if t < T(-1.0) or t > T(size):
            return 0, 0, T(0.0), False
        if t <= T(0.0):
            t = T(0.0)
        low = int(t)
        if low >= size - 1:
            return size - 1, size - 1, T(0.0), True
        return low, low + 1, t - T(low), True

    @cuda.jit
    def forward(features, height, width, rois, scale, n_images, sampling_ratio, aligned, out, flag):
        """``features``: the (N, C, H, W) map as one C-order run, read at unsigned offsets.
        A thread takes its bin in ``K`` channels at once, c, c + step, ...: each sample's
        position and weights serve them all. A bad RoI's block sets flag[0] and writes
        nothing."""
        R, C, PH, PW = out.shape
        r = cuda.blockIdx.x
        if not roi_ok(rois, r, n_images, scale):
            flag[0] = 1
            return
        n, y0, x0, bin_h, bin_w, gh, gw = geometry(rois, r, scale, sampling_ratio, aligned, PH, PW)
        plane_size = uint64(height * width)
        image = uint64(n * C) * plane_size
        total = cuda.local.array(K, T)  # (K,): one sum per channel, in registers
        c_first, _, c_step = _block_channels(C)
        while c_first < C:  # while, not range(): a range with a step pays a 64-bit division for its length
            i = cuda.threadIdx.y
            while i < PH:
                j = cuda.threadIdx.x
                while j < PW:
                    for k in range(K):
                        total[k] = T(0.0)
                    for iy in range(gh):
                        yl, yh, ly, yin = axis_sample(y0, i, bin_h, iy, gh, height)
                        low, high = uint64(yl * width), uint64(yh * width)  # the two rows, in a plane
                        for ix in range(gw):
                            xl, xh, lx, xin = axis_sample(x0, j, bin_w, ix, gw, width)
                            if yin and xin:
                                hy, hx = T(1.0) - ly, T(1.0) - lx
                                w_ll, w_lh, w_hl, w_hh = mul(hy, hx), mul(hy, lx), mul(ly, hx), mul(ly, lx)
                                for k in range(K):
                                    c = c_first + k * c_step
                                    if c < C:
                                        plane = image + uint64(c) * plane_size
                                        s = add(add(mul(w_ll, features[plane + low + uint64(xl)]),
                                                    mul(w_lh, features[plane + low + uint64(xh)])),
                                                mul(w_hl, features[plane + high + uint64(xl)]))
                                        total[k] = add(total[k], add(s, mul(w_hh, features[plane + high + uint64(xh)])))
                    for k in range(K):
                        c = c_first + k * c_step
                        if c < C:
                            out[r, c, i, j] = total[k] / T(max(gh * gw, 1))
                    j += cuda.blockDim.x
                i += cuda.blockDim.y
            c_first += K * c_step

    @cuda.jit
    def backward(grad_out, rois, scale, n_images, sampling_ratio, aligned, height, width, grad_in, flag):
        """``grad_in``: the (N, C, H, W) gradient as one C-order run, added to atomically.
        A bad RoI's block sets flag[0] and adds nothing."""
        R, C, PH, PW = grad_out.shape
        r = cuda.blockIdx.x
        if not roi_ok(rois, r, n_images, scale):
            flag[0] = 1
            return
        n, y0, x0, bin_h, bin_w, gh, gw = geometry(rois, r, scale, sampling_ratio, aligned, PH, PW)
        count = T(max(gh * gw, 1))
        c, _, c_step = _block_channels(C)
        while c < C:  # as in the forward
            plane = uint64((n * C + c) * height * width)
            i = cuda.threadIdx.y
            while i < PH:
                j = cuda.threadIdx.x
                while j < PW:
                    g = grad_out[r, c, i, j]
                    for iy in range(gh):
                        yl, yh, ly, yin = axis_sample(y0, i, bin_h, iy, gh, height)
                        low, high = plane + uint64(yl * width), plane + uint64(yh * width)
                        for ix in range(gw):
                            xl, xh, lx, xin = axis_sample(x0, j, bin_w, ix, gw, width)
                            if yin and xin:
                                hy, hx = T(1.0) - ly, T(1.0) - lx
                                cuda.atomic.add(grad_in, low + uint64(xl), mul(g, mul(hy, hx)) / count)
                                cuda.atomic.add(grad_in, low + uint64(xh), mul(g, mul(hy, lx)) / count)
                                cuda.atomic.add(grad_in, high + uint64(xl), mul(g, mul(ly, hx)) / count)
                                cuda.atomic.add(grad_in, high + uint64(xh), mul(g, mul(ly, lx)) / count)
                    j += cuda.blockDim.x
                i += cuda.blockDim.y
            c += c_step

    return forward, backward


_roi_align_forward_cuda_f32, _roi_align_backward_cuda_f32 = _make_roi_align_cuda(np.float32)
_roi_align_forward_cuda_f64, _roi_align_backward_cuda_f64 = _make_roi_align_cuda(np.float64)
_ROI_ALIGN_CUDA = {np.dtype(np.float32): (_roi_align_forward_cuda_f32, _roi_align_backward_cuda_f32),
                   np.dtype(np.float64): (_roi_align_forward_cuda_f64, _roi_align_backward_cuda_f64)}


def _check_sampling(sampling_ratio, aligned, where):
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise ValueError(f"{where}: sampling_ratio must be an integer (<= 0 for adaptive), got {sampling_ratio!r}")
    if abs(int(sampling_ratio)) > MAX_SAMPLING_RATIO:
        raise ValueError(f"{where}: sampling_ratio must lie in [-{MAX_SAMPLING_RATIO}, {MAX_SAMPLING_RATIO}] "
                         f"(<= 0 for adaptive), got {sampling_ratio!r}")
    if not isinstance(aligned, (bool, np.bool_)):
        raise ValueError(f"{where}: aligned must be True or False, got {aligned!r}")
    return int(sampling_ratio), bool(aligned)


def roi_align(features, rois, output_size, spatial_scale, sampling_ratio=-1, aligned=True):
    """RoIAlign (Mask R-CNN): each bin is the mean of bilinear samples on a regular grid.

    ``y[r, c, i, j] = 1/(sy sx) sum_{iy, ix} bilinear(x[b_r, c], p_y, p_x)`` with sample
    points ``p_y = y1 + i*bin_h + (iy + 1/2) * bin_h / sy`` (likewise x), where
    ``y1 = y1_image * spatial_scale - 1/2`` when ``aligned`` (pixel centres), and
    ``sy = sampling_ratio`` or ``ceil(roi_h / ph)`` when ``sampling_ratio <= 0``.
    Samples beyond [-1, H] x [-1, W] count as 0; nearer ones are clamped onto the map.
    One RoI may take at most ``MAX_ROI_SAMPLES`` (2**21) samples, ``ph * pw * sy * sx``;
    |sampling_ratio| is at most ``MAX_SAMPLING_RATIO`` (1024) and |coordinate *
    spatial_scale| at most ``MAX_ROI_CELLS`` (2**24). Returns (R, C, ph, pw).

    Same numbers as ``torchvision.ops.roi_align`` (on the CPU) in float32 and float64:
    every step runs in the features' dtype, in torchvision's order. With a fixed
    ``sampling_ratio``, device RoIs are checked by the kernel, as in ``roi_pool``; the
    adaptive grid's sample counts are checked on a host copy.
    """
    where = "roi_align"
    sampling_ratio, aligned = _check_sampling(sampling_ratio, aligned, where)
    gpu, output_size, scale, host, rois = _check_inputs(features, rois, output_size, spatial_scale, where,
                                                        defer=sampling_ratio > 0)
    geometry = _checked_geometry(rois if host is None else host, scale, *output_size, sampling_ratio, aligned, gpu,
                                 where)
    return _roi_align(features, rois, host, geometry, gpu, output_size, scale, sampling_ratio, aligned)


def _roi_align(features, rois, host, geometry, gpu, output_size, scale, sampling_ratio, aligned):
    """``roi_align`` of checked arguments: ``host`` the RoIs' host copy (None: the kernel
    checks the device RoIs, and the call waits for its verdict), ``rois`` the kernel's
    (device) RoIs, ``geometry`` from ``_checked_geometry`` (None: on the GPU)."""
    ph, pw = output_size
    R, C = rois.shape[0], features.shape[1]
    out = _empty(gpu, (R, C, ph, pw), features.dtype)
    if out.size == 0:
        return out
    if gpu:
        kernel = _ROI_ALIGN_CUDA[np.dtype(features.dtype)][0]
        N, _, H, W = features.shape
        flag = _fault_flag(reset=host is None)
        launch(kernel, *_roi_blocks(R, C, ph, pw, CHANNELS_PER_THREAD), _flat_features(features, "roi_align"),
               H, W, rois, features.dtype.type(scale), N, sampling_ratio, aligned, out, flag)
        if host is None:
            _raise_on_fault(flag, rois, N, features.dtype, scale, "roi_align")
    else:
        batch = host[:, 0].astype(np.int64)
        N, C, H, W = features.shape
        planes = np.ascontiguousarray(features).reshape(N * C, H * W)  # (N * C, H * W)
        for lo, hi, tables in _sample_tables(geometry, batch, ph, pw, H, W):
            _roi_align_forward_cpu(planes, *tables, out[lo:hi])
    return out


def roi_align_backward(grad_out, rois, features_shape, spatial_scale, sampling_ratio=-1, aligned=True):
    """Gradient of RoIAlign w.r.t. the features: each sample hands ``g * w / (sy sx)`` to
    each of its four neighbours, ``w`` being that neighbour's bilinear weight (computed in
    this order, as torchvision does). The RoIs and sampling obey ``roi_align``'s limits.
    Returns ``features_shape``. On the GPU the sums are atomic adds, in an order (and so
    with last bits) that can change from run to run."""
    where = "roi_align_backward"
    sampling_ratio, aligned = _check_sampling(sampling_ratio, aligned, where)
    grad_out = as_float_array(grad_out, "grad_out", ndim=4, where=where)
    shape = check_shape(features_shape, "features_shape", 4, where)
    R, C, ph, pw = grad_out.shape
    if 0 in shape[2:]:
        raise ValueError(f"{where}: features_shape must have non-zero height and width, got {shape}")
    scale = check_number(spatial_scale, "spatial_scale", low=0, low_open=True, where=where)
    if sampling_ratio > 0 and grad_out.size and _kernel_checks(grad_out, rois, shape[0]):
        host, rois = None, _check_roi_shape(rois, where)  # the kernel checks the values, as in roi_align
    else:
        host = _check_rois(rois, shape[0], grad_out.dtype, scale, where)
    gpu = on_device({"grad_out": grad_out, "rois": rois})
    if rois.shape[0] != R or C != shape[1]:
        raise ValueError(f"{where}: grad_out has shape {tuple(grad_out.shape)} but there are {rois.shape[0]} "
                         f"rois and features_shape {shape} has {shape[1]} channels")
    geometry = _checked_geometry(rois if host is None else host, scale, ph, pw, sampling_ratio, aligned, gpu, where)
    return _roi_align_backward(grad_out, rois, host, geometry, gpu, shape, scale, sampling_ratio, aligned)


def _roi_align_backward(grad_out, rois, host, geometry, gpu, shape, scale, sampling_ratio, aligned):
    """``roi_align_backward`` of checked arguments, as ``_roi_align``; ``shape`` the features'."""
    R, C, ph, pw = grad_out.shape
    grad_in = zeros_on_device(shape, grad_out.dtype) if gpu else np.zeros(shape, dtype=grad_out.dtype)
    if grad_out.size == 0:
        return grad_in
    if gpu:
        kernel = _ROI_ALIGN_CUDA[np.dtype(grad_out.dtype)][1]
        flag = _fault_flag(reset=host is None)
        launch(kernel, *_roi_blocks(R, C, ph, pw), grad_out, rois, grad_out.dtype.type(scale), shape[0],
               sampling_ratio, aligned, *shape[2:], _flat(grad_in), flag)
        if host is None:
            _raise_on_fault(flag, rois, shape[0], grad_out.dtype, scale, "roi_align_backward")
    else:
        batch = host[:, 0].astype(np.int64)
        N, C, H, W = shape
        grad_planes = grad_in.reshape(N * C, H * W)  # (N * C, H * W), a view
        grad_out = np.ascontiguousarray(grad_out)
        for lo, hi, tables in _sample_tables(geometry, batch, ph, pw, H, W):
            _roi_align_backward_cpu(grad_out[lo:hi], *tables, grad_planes)
    return grad_in


class RoIAlign(Module):
    """RoIAlign layer: ``forward(features, rois)``, ``backward(grad_out)`` -> d features."""

    def __init__(self, output_size, spatial_scale, sampling_ratio=-1, aligned=True):
        self.output_size = pair(output_size, "output_size", "RoIAlign")
        self.spatial_scale = check_number(spatial_scale, "spatial_scale", low=0, low_open=True, where="RoIAlign")
        self.sampling_ratio, self.aligned = _check_sampling(sampling_ratio, aligned, "RoIAlign")
        self._rois = None
        self._shape = None

    def forward(self, features, rois):
        """rois (R, 5) may be a NumPy array with device features: the layer uploads them,
        and keeps their checked host copy, so neither pass copies them back."""
        where = "RoIAlign"
        gpu, output_size, scale, host, rois = _check_inputs(features, rois, self.output_size, self.spatial_scale,
                                                            where, upload=True)
        geometry = _checked_geometry(host, scale, *output_size, self.sampling_ratio, self.aligned, gpu, where)
        out = _roi_align(features, rois, host, geometry, gpu, output_size, scale, self.sampling_ratio, self.aligned)
        host = np.array(host)  # a copy: backward needs forward's boxes
        self._rois = (rois if gpu else host, host, geometry)
        self._shape = tuple(features.shape)
        return out

    def backward(self, grad_out):
        where = "RoIAlign.backward"
        if self._rois is None:
            raise ValueError(f"{where}: call forward first")
        rois, host, geometry = self._rois
        grad_out = as_float_array(grad_out, "grad_out", ndim=4, where=where)
        expected = (host.shape[0], self._shape[1], *self.output_size)
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{where}: grad_out must have the forward output's shape {expected}, "
                             f"got {tuple(grad_out.shape)}")
        if np.dtype(grad_out.dtype) != host.dtype or is_device_array(grad_out) != is_device_array(rois):
            # not the forward's dtype or side: the function checks and casts the RoIs again
            return roi_align_backward(grad_out, rois, self._shape, self.spatial_scale, self.sampling_ratio,
                                      self.aligned)
        return _roi_align_backward(grad_out, rois, host, geometry, is_device_array(rois), self._shape,
                                   self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self):
        return (f"RoIAlign(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")
