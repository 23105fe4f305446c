"""im2col and col2im: turning a convolution over a whole batch into one matrix product.

A 2-D cross-correlation of ``x`` (N, C, H, W) with ``w`` (O, C, kh, kw) reads, for every
output pixel (oh, ow) of every image, the C*kh*kw input values under the kernel.
``im2col`` copies those values into a column, the columns of all N images side by side:

    cols : (C*kh*kw, N, OH*OW),   y = w.reshape(O, C*kh*kw) @ cols.reshape(C*kh*kw, N*OH*OW)

so ``y`` (O, N, OH*OW) holds every output of the batch after one product. Row
``(c*kh + i)*kw + j`` of ``cols[:, n]`` holds ``x[n, c, oh*sh + i - ph, ow*sw + j - pw]``
(zero where that falls in the padding). ``col2im`` is its adjoint: it adds every column
entry back onto the input pixel it was copied from, which is exactly the gradient of
``im2col`` (pixels under several windows collect several terms).

CUDA: ``im2col`` runs one thread per output position of each image and channel, which
copies the kh*kw values under its window (or padding zeros) into its column: the thread
finds its place with a few integer divisions, then walks the window without any (64-bit
integer division is slow on a GPU). ``col2im`` is written as a gather, one thread per
input pixel: the thread works out the range of outputs whose windows cover its pixel
and sums their (at most kh*kw) column entries in the same (i, j) order as the CPU
kernel, so the two agree bit for bit, and no two threads write the same address (no
atomics, and the same result every run).
"""

import numpy as np
from numba import cuda, njit, prange

from .checks import as_float_array, check_non_negative_int, check_positive_int, check_shape, padding_pair, pair
from .device import empty_on_device, grid_1d, is_device_array, launch


def output_size(size, kernel, stride, padding):
    """Floor output size of a window sliding over a padded axis: (H + 2p - k) // s + 1.

    ``size`` and ``padding`` are integers >= 0, ``kernel`` and ``stride`` > 0, and the
    kernel must fit in the padded axis (so at least one window)."""
    where = "output_size"
    size, padding = check_non_negative_int(size, "size", where), check_non_negative_int(padding, "padding", where)
    kernel, stride = check_positive_int(kernel, "kernel", where), check_positive_int(stride, "stride", where)
    if kernel > size + 2 * padding:
        raise ValueError(f"{where}: kernel {kernel} is larger than the padded size {size + 2 * padding}")
    return _output_size(size, kernel, stride, padding)


def _output_size(size, kernel, stride, padding):
    """``output_size`` of checked integers."""
    return (size + 2 * padding - kernel) // stride + 1


def _im2col_reference(x, kernel, stride, padding):
    """Plain NumPy im2col (slow, obvious; used by tests)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.zeros((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n, oh * ow)


def _col2im_reference(cols, x_shape, kernel, stride, padding):
    """Plain NumPy col2im, the adjoint of ``_im2col_reference``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = cols.reshape(c, kh, kw, n, oh, ow)
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return xp[:, :, ph:ph + h, pw:pw + w]


@njit(cache=True)
def _valid_range(j, pad, stride, size, out_size):
    """Output positions o in [lo, hi) whose input index o*stride + j - pad lies in [0, size),
    with 0 <= lo <= hi <= out_size (also where kernel offset j sees only padding)."""
    lo = 0
    if pad > j:
        lo = min((pad - j + stride - 1) // stride, out_size)
    hi = 0
    if size - 1 - j + pad >= 0:
        hi = (size - 1 - j + pad) // stride + 1
    hi = min(hi, out_size)
    return lo, max(hi, lo)


@njit(cache=True, parallel=True)
def _im2col_cpu(x, kh, kw, sh, sw, ph, pw, oh, ow, cols):
    n, c, h, w = x.shape
    for nc in prange(n * c):
        b = nc // c
        ch = nc % c
        for i in range(kh):
            ylo, yhi = _valid_range(i, ph, sh, h, oh)
            for j in range(kw):
                row = (ch * kh + i) * kw + j
                xlo, xhi = _valid_range(j, pw, sw, w, ow)
                for y in range(oh):
                    base = y * ow
                    if y < ylo or y >= yhi:
                        for xo in range(ow):
                            cols[row, b, base + xo] = 0
                        continue
                    iy = y * sh + i - ph
                    for xo in range(xlo):
                        cols[row, b, base + xo] = 0
                    for xo in range(xlo, xhi):
                        cols[row, b, base + xo] = x[b, ch, iy, xo * sw + j - pw]
                    for xo in range(xhi, ow):
                        cols[row, b, base + xo] = 0


@njit(cache=True, parallel=True)
def _col2im_cpu(cols, kh, kw, sh, sw, ph, pw, oh, ow, dx):
    n, c, h, w = dx.shape
    for nc in prange(n * c):
        b = nc // c
        ch = nc % c
        for y in range(h):
            for xx in range(w):
                dx[b, ch, y, xx] = 0
        for i in range(kh):
            ylo, yhi = _valid_range(i, ph, sh, h, oh)
            for j in range(kw):
                row = (ch * kh + i) * kw + j
                xlo, xhi = _valid_range(j, pw, sw, w, ow)
                for y in range(ylo, yhi):
                    iy = y * sh + i - ph
                    base = y * ow
                    for xo in range(xlo, xhi):
                        dx[b, ch, iy, xo * sw + j - pw] += cols[row, b, base + xo]


@cuda.jit
def _im2col_cuda(x, kh, kw, sh, sw, ph, pw, oh, ow, cols):
    t = cuda.grid(1)
    n, c, h, w = x.shape
    p = oh * ow
    if t >= n * c * p:
        return
    pos = t % p
    b = t // (c * p)
    ch = (t // p) % c
    y0 = (pos // ow) * sh - ph
    x0 = (pos % ow) * sw - pw
    row = ch * kh * kw
    for i in range(kh):
        iy = y0 + i
        for j in range(kw):
            ix = x0 + j
            if 0 <= iy < h and 0 <= ix < w:
                cols[row, b, pos] = x[b, ch, iy, ix]
            else:
                cols[row, b, pos] = 0
            row += 1


@cuda.jit
def _col2im_cuda(cols, kh, kw, sh, sw, ph, pw, oh, ow, dx):
    t = cuda.grid(1)
    n, c, h, w = dx.shape
    if t >= n * c * h * w:
        return
    b = t // (c * h * w)
    ch = (t // (h * w)) % c
    yp = (t // w) % h + ph  # the pixel in padded coordinates
    xp = t % w + pw
    # The outputs whose windows cover the pixel: oy in [oy_lo, oy_hi], at kernel row
    # i = yp - oy*sh (likewise x). Walking oy and ox down walks i and j up: the CPU's order.
    oy_hi = min(yp // sh, oh - 1)
    oy_lo = max(0, (yp - kh + sh) // sh)
    ox_hi = min(xp // sw, ow - 1)
    ox_lo = max(0, (xp - kw + sw) // sw)
    acc = cuda.local.array(1, dtype=dx.dtype)
    acc[0] = 0
    for oy in range(oy_hi, oy_lo - 1, -1):
        i = yp - oy * sh
        for ox in range(ox_hi, ox_lo - 1, -1):
            acc[0] += cols[(ch * kh + i) * kw + xp - ox * sw, b, oy * ow + ox]
    dx[b, ch, yp - ph, xp - pw] = acc[0]


def _contiguous(a, name, where):
    """NumPy: a C-contiguous copy if needed. Device: must already be C-contiguous."""
    if is_device_array(a):
        if not a.is_c_contiguous():
            raise ValueError(f"{where}: {name} must be C-contiguous on the device")
        return a
    return np.ascontiguousarray(a)


def _check_window(kernel, stride, padding, x_shape, where):
    """(kernel, stride, padding) as (h, w) pairs, the kernel within the padded input."""
    kh, kw = pair(kernel, "kernel", where)
    stride = pair(stride, "stride", where)
    ph, pw = padding_pair(padding, "padding", where)
    h, w = x_shape[2:]
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(f"{where}: kernel {(kh, kw)} is larger than the padded input "
                         f"{(h + 2 * ph, w + 2 * pw)} (x shape {tuple(x_shape)}, padding {(ph, pw)})")
    return (kh, kw), stride, (ph, pw)


def _writable_apart(out, x):
    return out.flags.c_contiguous and out.flags.writeable and not np.may_share_memory(out, x)


def im2col(x, kernel, stride, padding, out=None):
    """Columns (C*kh*kw, N, OH*OW) of the windows of ``x`` (N, C, H, W), float32 or float64.

    ``kernel`` and ``stride`` are positive ints or (h, w) pairs, ``padding`` non-negative
    ones; padding is zeros, and the kernel must fit in the padded input. ``out`` is a
    buffer to reuse (it saves allocating a large one per call): written into and
    returned when it is a C-contiguous array of the right shape and dtype, on the same
    side as ``x`` (and, on the host, writable and apart from ``x``); otherwise a new
    array is returned and ``out`` is left alone. NumPy
    ``x``: Numba CPU kernel; device ``x``: CUDA kernel, device array out.
    """
    x = as_float_array(x, "x", ndim=4, where="im2col")
    window = _check_window(kernel, stride, padding, x.shape, "im2col")
    return _im2col(_contiguous(x, "x", "im2col"), *window, out=out)


def _im2col(x, kernel, stride, padding, out=None):
    """``im2col`` of checked arguments: ``x`` C-contiguous, ``kernel``, ``stride`` and
    ``padding`` (h, w) pairs, the kernel within the padded input."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    shape = (c * kh * kw, n, oh * ow)
    gpu = is_device_array(x)
    if (out is not None and is_device_array(out) == gpu and tuple(out.shape) == shape and out.dtype == x.dtype
            and (out.is_c_contiguous() if gpu else _writable_apart(out, x))):
        cols = out
    elif gpu:
        cols = empty_on_device(shape, dtype=x.dtype)  # (C*kh*kw, N, OH*OW)
    else:
        cols = np.empty(shape, dtype=x.dtype)  # (C*kh*kw, N, OH*OW)
    if cols.size == 0:
        return cols
    if gpu:
        launch(_im2col_cuda, *grid_1d(n * c * oh * ow), x, kh, kw, sh, sw, ph, pw, oh, ow, cols)
    else:
        _im2col_cpu(x, kh, kw, sh, sw, ph, pw, oh, ow, cols)
    return cols


def col2im(cols, x_shape, kernel, stride, padding):
    """Sum columns (C*kh*kw, N, OH*OW) back onto images of shape ``x_shape`` (N, C, H, W).

    The arguments are as for ``im2col``, and ``cols`` must have the shape it returns."""
    where = "col2im"
    cols = as_float_array(cols, "cols", ndim=3, where=where)
    n, c, h, w = check_shape(x_shape, "x_shape", 4, where)
    (kh, kw), (sh, sw), (ph, pw) = _check_window(kernel, stride, padding, (n, c, h, w), where)
    expected = (c * kh * kw, n, _output_size(h, kh, sh, ph) * _output_size(w, kw, sw, pw))
    if tuple(cols.shape) != expected:
        raise ValueError(f"{where}: cols must have shape {expected} (C*kh*kw, N, OH*OW) for x_shape "
                         f"{(n, c, h, w)}, got {tuple(cols.shape)}")
    return _col2im(_contiguous(cols, "cols", where), (n, c, h, w), (kh, kw), (sh, sw), (ph, pw))


def _col2im(cols, x_shape, kernel, stride, padding):
    """``col2im`` of checked arguments: ``cols`` C-contiguous of the shape ``im2col``
    gives for ``x_shape``, the window as (h, w) pairs."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    gpu = is_device_array(cols)
    if gpu:
        dx = empty_on_device((n, c, h, w), dtype=cols.dtype)  # (N, C, H, W)
        if dx.size:
            launch(_col2im_cuda, *grid_1d(dx.size), cols, kh, kw, sh, sw, ph, pw, oh, ow, dx)
        return dx
    dx = np.empty((n, c, h, w), dtype=cols.dtype)  # (N, C, H, W)
    if dx.size:
        _col2im_cpu(cols, kh, kw, sh, sw, ph, pw, oh, ow, dx)
    return dx
