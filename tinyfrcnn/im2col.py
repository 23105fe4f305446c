"""im2col and col2im: turning a convolution into one matrix product per image.

A 2-D cross-correlation of ``x`` (N, C, H, W) with ``w`` (O, C, kh, kw) reads, for every
output pixel (oh, ow), the C*kh*kw input values under the kernel. ``im2col`` copies
those values into a column, so that for image n

    cols[n] : (C*kh*kw, OH*OW),   out[n] = w.reshape(O, C*kh*kw) @ cols[n]

with row ``(c*kh + i)*kw + j`` of ``cols[n]`` holding ``x[n, c, oh*sh + i - ph,
ow*sw + j - pw]`` (zero where that falls in the padding). ``col2im`` is its adjoint: it
adds every column entry back onto the input pixel it was copied from, which is exactly
the gradient of ``im2col`` (pixels under several windows collect several terms).

The layout (N, C*kh*kw, OH*OW) lets ``np.matmul`` produce the output directly in
(N, O, OH*OW) order, so no transpose is ever copied.
"""

import numpy as np
from numba import njit, prange

from .device import is_device_array


def output_size(size, kernel, stride, padding):
    """Floor output size of a window sliding over a padded axis: (H + 2p - k) // s + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def _im2col_reference(x, kernel, stride, padding):
    """Plain NumPy im2col (slow, obvious; used by tests)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = np.zeros((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
    return cols.reshape(n, c * kh * kw, oh * ow)


def _col2im_reference(cols, x_shape, kernel, stride, padding):
    """Plain NumPy col2im, the adjoint of ``_im2col_reference``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = cols.reshape(n, c, kh, kw, oh, ow)
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += cols[:, :, i, j]
    return xp[:, :, ph:ph + h, pw:pw + w]


@njit(cache=True)
def _valid_range(j, pad, stride, size, out_size):
    """Output positions o in [lo, hi) whose input index o*stride + j - pad lies in [0, size)."""
    lo = 0
    if pad > j:
        lo = (pad - j + stride - 1) // stride
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
                            cols[b, row, base + xo] = 0
                        continue
                    iy = y * sh + i - ph
                    for xo in range(xlo):
                        cols[b, row, base + xo] = 0
                    for xo in range(xlo, xhi):
                        cols[b, row, base + xo] = x[b, ch, iy, xo * sw + j - pw]
                    for xo in range(xhi, ow):
                        cols[b, row, base + xo] = 0


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
                        dx[b, ch, iy, xo * sw + j - pw] += cols[b, row, base + xo]


def _cpu_only(name, *arrays):
    if any(is_device_array(a) for a in arrays):
        raise NotImplementedError(f"{name}: no CUDA kernel yet; pass NumPy arrays")


def im2col(x, kernel, stride, padding, out=None):
    """Columns (N, C*kh*kw, OH*OW) of the windows of ``x`` (N, C, H, W).

    ``kernel``, ``stride``, ``padding`` are (h, w) pairs; padding is zeros. The caller
    (``Conv2d``) has validated the shapes. ``out``, if given, is a C-contiguous array of
    the right shape and dtype to write into (saves allocating a large buffer per call).
    """
    _cpu_only("im2col", x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    shape = (n, c * kh * kw, oh * ow)
    if out is not None and out.shape == shape and out.dtype == x.dtype and out.flags.c_contiguous:
        cols = out
    else:
        cols = np.empty(shape, dtype=x.dtype)  # (N, C*kh*kw, OH*OW)
    if cols.size:
        _im2col_cpu(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, oh, ow, cols)
    return cols


def col2im(cols, x_shape, kernel, stride, padding):
    """Sum columns (N, C*kh*kw, OH*OW) back onto an image of shape ``x_shape``."""
    _cpu_only("col2im", cols)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    dx = np.empty((n, c, h, w), dtype=cols.dtype)  # (N, C, H, W)
    if dx.size:
        _col2im_cpu(np.ascontiguousarray(cols), kh, kw, sh, sw, ph, pw, oh, ow, dx)
    return dx
