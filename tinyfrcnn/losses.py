"""Losses of Faster R-CNN: softmax cross-entropy and smooth L1, each with its gradient.

The paper's multi-task loss for one image is

    L({p_i}, {t_i}) = 1/N_cls sum_i L_cls(p_i, p*_i) + lambda 1/N_reg sum_i p*_i L_reg(t_i, t*_i)

with L_cls the log loss over classes (softmax cross-entropy) and L_reg the robust
smooth-L1 loss of Fast R-CNN. Both functions here return ``(loss, gradient)``; the
gradient is with respect to the first argument (the network's output), so training
code hands it straight to the layer's ``backward``.

Both ops run the Numba CPU kernel on NumPy arrays and the CUDA kernel on numba device
arrays (one thread per row or element); the per-row losses are summed on the host, in
float64, so the scalar loss is a Python float either way. On a GPU, ``exp`` and ``log``
are CUDA's libdevice functions, which may differ from the CPU's math library in the last
bit or two: the two paths agree to rounding, not bit for bit.
"""

import math

import numpy as np
from numba import cuda, njit

from .checks import as_array, as_float_array, check_finite, check_number
from .device import empty_on_device, grid_1d, launch, on_device, to_device, to_host


# ---------------------------------------------------------------- checks


def _as_labels(labels, where):
    """``labels`` as a 1-D array; an empty list or tuple (which has no dtype) is empty int64."""
    if isinstance(labels, (list, tuple)) and len(labels) == 0:
        return np.zeros(0, np.int64)  # (0,)
    return as_array(labels, "labels", ndim=1, where=where)


def _smooth_l1_beta(sigma, where):
    """The smooth-L1 ``beta = 1 / sigma**2`` of a loss's ``sigma``, checked to be finite and > 0."""
    value = check_number(sigma, "sigma", low=0.0, low_open=True, where=where)
    try:
        beta = 1.0 / value**2
    except (OverflowError, ZeroDivisionError):  # value**2 overflows or underflows to 0
        beta = math.nan
    if not 0.0 < beta < math.inf:
        raise ValueError(f"{where}: sigma must give a finite beta = 1/sigma**2 > 0, got {sigma!r}")
    return beta


# ---------------------------------------------------------------- cross-entropy


def _softmax_cross_entropy_reference(logits, labels, ignore_index=-1):
    """Plain NumPy: mean of -log softmax(z)_y over rows whose label is not ignored."""
    z = logits.astype(np.float64)
    keep = labels != ignore_index
    n = int(keep.sum())
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # (N, K)
    grad = np.zeros_like(z)
    if n == 0:
        return 0.0, grad.astype(logits.dtype)
    rows = np.flatnonzero(keep)
    loss = -log_p[rows, labels[rows]].sum() / n
    grad[rows] = np.exp(log_p[rows])
    grad[rows, labels[rows]] -= 1.0
    return float(loss), (grad / n).astype(logits.dtype)


def _softmax_cross_entropy_rows(logits, labels, ignore_index, scale, row_loss, grad, start, stop):
    """Rows start..stop-1: ``row_loss[i] = log sum_j exp z_ij - z_{i,y}`` and ``grad[i] =
    scale * (softmax(z_i) - onehot(y))``, both 0 when ``y`` is ignored. Written once,
    compiled for the CPU kernel (a whole slice of rows per call) and for one CUDA
    thread (one row)."""
    k = logits.shape[1]
    for i in range(start, stop):
        y = labels[i]
        if y == ignore_index:
            row_loss[i] = 0.0
            for j in range(k):
                grad[i, j] = 0.0
            continue
        m = logits[i, 0]
        for j in range(1, k):
            m = max(m, logits[i, j])
        total = 0.0
        for j in range(k):
            total += math.exp(logits[i, j] - m)
        log_total = math.log(total)
        row_loss[i] = log_total - (logits[i, y] - m)
        for j in range(k):
            g = math.exp(logits[i, j] - m - log_total)
            if j == y:
                g -= 1.0
            grad[i, j] = g * scale


_softmax_cross_entropy_rows_cpu = njit(cache=True)(_softmax_cross_entropy_rows)
_softmax_cross_entropy_rows_cuda = cuda.jit(device=True, inline="always")(_softmax_cross_entropy_rows)


@njit(cache=True)
def _softmax_cross_entropy_cpu(logits, labels, ignore_index, scales, row_loss, grad):
    """Rows in ``len(scales)`` equal slices, slice s scaled by ``scales[s]``: one call per
    slice (a call per row would cost more than its arithmetic: numba counts references
    to each array it passes)."""
    rows = logits.shape[0] // scales.shape[0]
    for s in range(scales.shape[0]):
        _softmax_cross_entropy_rows_cpu(logits, labels, ignore_index, scales[s], row_loss, grad, s * rows,
                                        s * rows + rows)


@cuda.jit
def _softmax_cross_entropy_cuda(logits, labels, ignore_index, scale, row_loss, grad):
    i = cuda.grid(1)
    if i < logits.shape[0]:
        _softmax_cross_entropy_rows_cuda(logits, labels, ignore_index, scale, row_loss, grad, i, i + 1)


def softmax_cross_entropy(logits, labels, ignore_index=-1):
    """Mean softmax cross-entropy over the rows that are not ignored, and its gradient.

    ``L = 1/n sum_{i: y_i != ignore} (log sum_j exp z_ij - z_{i,y_i})`` with ``n`` the
    number of kept rows; ``dL/dz_ij = (softmax(z_i)_j - [j == y_i]) / n`` on kept rows
    and 0 on ignored ones. Computed with the log-sum-exp shift, so large logits do not
    overflow. The same numbers as
    ``torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)`` up
    to the last bit (the same operations in another order: the loss and the gradient
    agree to about one ulp, the float32 loss being summed in float64 here), except
    when every row is ignored: torch returns NaN (0/0), this returns loss 0 and a zero
    gradient, so an image with no sampled rows adds nothing to training.

    logits: (N, K) float32/float64; labels: (N,) integers in [0, K) or ``ignore_index``.
    Returns ``(loss: float, grad (N, K) of logits' dtype)``.
    """
    where = "softmax_cross_entropy"
    logits = as_float_array(logits, "logits", ndim=2, where=where)
    labels = _as_labels(labels, where)
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"{where}: labels must have an integer dtype, got {np.dtype(labels.dtype).name}")
    n, k = logits.shape
    if labels.shape[0] != n:
        raise ValueError(f"{where}: labels has {labels.shape[0]} rows but logits has {n}")
    if k == 0:
        raise ValueError(f"{where}: logits must have at least one class column, got shape {(n, k)}")
    if (isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
            or not -2**63 <= ignore_index < 2**63):
        raise ValueError(f"{where}: ignore_index must be an integer that fits int64, got {ignore_index!r}")
    gpu = on_device({"logits": logits, "labels": labels})
    check_finite(logits, "logits", where)
    host_labels = to_host(labels)
    keep = host_labels != ignore_index
    bad = keep & ((host_labels < 0) | (host_labels >= k))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: labels[{i}] = {int(host_labels[i])} is outside [0, {k}) "
            f"and is not ignore_index ({ignore_index})"
        )
    if not gpu:
        return _softmax_cross_entropy_host(logits, labels, ignore_index)
    count = int(keep.sum())
    scale = 1.0 / count if count else 0.0
    if n == 0:
        return 0.0, to_device(np.zeros((0, k), logits.dtype))
    row_loss = empty_on_device(n, np.float64)
    grad = empty_on_device((n, k), logits.dtype)
    blocks, threads = grid_1d(n)
    launch(_softmax_cross_entropy_cuda, blocks, threads, logits, labels, ignore_index, scale, row_loss, grad)
    return float(row_loss.copy_to_host().sum() * scale), grad


def _softmax_cross_entropy_host(logits, labels, ignore_index):
    """``softmax_cross_entropy`` of checked NumPy arrays: finite float logits (N, K),
    integer labels (N,) in [0, K) or ``ignore_index``. For callers that validated them."""
    losses, grad = _softmax_cross_entropy_slices(logits, labels, ignore_index, 1)
    return losses[0], grad


def _softmax_cross_entropy_slices(logits, labels, ignore_index, slices):
    """``_softmax_cross_entropy_host`` of each of ``slices`` equal slices of the rows (one
    per image) in one pass: returns (a list of ``slices`` losses, the (N, K) gradient),
    each slice's numbers those of a call on it alone."""
    n, k = logits.shape
    if n == 0:
        return [0.0] * slices, np.zeros((0, k), logits.dtype)
    counts = (labels != ignore_index).reshape(slices, n // slices).sum(axis=1)  # (S,)
    scales = [1.0 / int(c) if c else 0.0 for c in counts]
    row_loss = np.empty(n, np.float64)
    grad = np.empty((n, k), logits.dtype)
    _softmax_cross_entropy_cpu(np.ascontiguousarray(logits), np.ascontiguousarray(labels, dtype=np.int64),
                               ignore_index, np.array(scales), row_loss, grad)
    per_slice = row_loss.reshape(slices, n // slices)  # (S, N / S)
    return [float(per_slice[s].sum() * scales[s]) for s in range(slices)], grad


# ---------------------------------------------------------------- smooth L1


def _smooth_l1_reference(pred, target, beta=1.0, weights=None):
    """Plain NumPy: sum of w * (0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta)."""
    x = pred.astype(np.float64) - target.astype(np.float64)
    w = np.ones_like(x) if weights is None else weights.astype(np.float64)
    ax = np.abs(x)
    small = ax < beta
    safe_beta = beta if beta > 0 else 1.0
    loss = np.where(small, 0.5 * x * x / safe_beta, ax - 0.5 * beta)
    grad = np.where(small, x / safe_beta, np.sign(x))
    return float((w * loss).sum()), (w * grad).astype(pred.dtype)


def _smooth_l1_elements(pred, target, weights, use_weights, beta, elem_loss, grad, start, stop):
    """Elements start..stop-1: ``f(x)`` and ``f'(x)`` of ``x = pred[i] - target[i]``,
    times ``weights[i]`` when ``use_weights``. Written once, compiled for the CPU kernel
    (all elements in one call) and for one CUDA thread (one element)."""
    for i in range(start, stop):
        x = pred[i] - target[i]
        ax = abs(x)
        if ax < beta:
            loss = 0.5 * x * x / beta
            g = x / beta
        else:
            loss = ax - 0.5 * beta
            g = 1.0 if x > 0 else (-1.0 if x < 0 else 0.0)
        if use_weights:
            loss *= weights[i]
            g *= weights[i]
        elem_loss[i] = loss
        grad[i] = g


_smooth_l1_elements_cpu = njit(cache=True)(_smooth_l1_elements)
_smooth_l1_elements_cuda = cuda.jit(device=True, inline="always")(_smooth_l1_elements)


@njit(cache=True)
def _smooth_l1_cpu(pred, target, weights, use_weights, beta, elem_loss, grad):
    _smooth_l1_elements_cpu(pred, target, weights, use_weights, beta, elem_loss, grad, 0, pred.size)


@cuda.jit
def _smooth_l1_cuda(pred, target, weights, use_weights, beta, elem_loss, grad):
    i = cuda.grid(1)
    if i < pred.size:
        _smooth_l1_elements_cuda(pred, target, weights, use_weights, beta, elem_loss, grad, i, i + 1)


def smooth_l1(pred, target, beta=1.0, weights=None):
    """Summed smooth-L1 loss of ``pred - target`` and its gradient w.r.t. ``pred``.

    Per element, with ``x = pred - target``::

        f(x) = 0.5 x^2 / beta   if |x| < beta        f'(x) = x / beta
               |x| - 0.5 beta   otherwise                    sign(x)

    Both pieces and their slopes meet at ``|x| = beta``, so the loss is C^1. The result
    is ``sum w * f(x)`` with optional per-element ``weights`` (e.g. the paper's p*_i,
    zero for negative anchors); the same numbers as
    ``(weights * torch.nn.functional.smooth_l1_loss(pred, target, reduction="none",
    beta=beta)).sum()`` up to the order of the sum (the loss agrees to about one ulp,
    and is summed in float64 here for float32 input; the gradient is identical in
    float64, while in float32 up to about a fifth of its entries differ by one ulp).
    ``beta = 0`` is the L1 loss, as in torch. The paper and py-faster-rcnn write the loss with sigma:
    ``beta = 1 / sigma**2`` (sigma = 3 for the RPN, 1 for the Fast R-CNN head).

    pred, target, weights: float arrays of one shape and dtype.
    Returns ``(loss: float, grad of pred's shape and dtype)``.
    """
    where = "smooth_l1"
    pred = as_float_array(pred, "pred", where=where)
    target = as_float_array(target, "target", where=where)
    beta = check_number(beta, "beta", low=0.0, where=where)
    named = {"pred": pred, "target": target}
    if weights is not None:
        named["weights"] = as_float_array(weights, "weights", where=where)
    for name, a in named.items():
        if tuple(a.shape) != tuple(pred.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(a.shape)} but pred has {tuple(pred.shape)}")
        if np.dtype(a.dtype) != np.dtype(pred.dtype):
            raise ValueError(f"{where}: {name} has dtype {np.dtype(a.dtype).name} but pred has {np.dtype(pred.dtype).name}")
        check_finite(a, name, where)
    if not on_device(named):
        return _smooth_l1_host(pred, target, beta, named.get("weights"))
    shape, dtype, size = tuple(pred.shape), pred.dtype, int(pred.size)
    if size == 0:
        return 0.0, to_device(np.zeros(shape, dtype))
    flat = [a.reshape(size) for a in (pred, target)]
    w = weights.reshape(size) if weights is not None else empty_on_device(1, dtype)
    elem_loss = empty_on_device(size, np.float64)
    grad = empty_on_device(size, dtype)
    blocks, threads = grid_1d(size)
    launch(_smooth_l1_cuda, blocks, threads, flat[0], flat[1], w, weights is not None, beta, elem_loss, grad)
    return float(elem_loss.copy_to_host().sum()), grad.reshape(shape)


def _smooth_l1_host(pred, target, beta, weights=None):
    """``smooth_l1`` of checked NumPy arrays: finite, one shape and float dtype (weights
    may be None), ``beta >= 0``. For callers that validated them."""
    losses, grad = _smooth_l1_slices(pred, target, beta, weights, 1)
    return losses[0], grad


def _smooth_l1_slices(pred, target, beta, weights, slices):
    """``_smooth_l1_host`` of each of ``slices`` equal slices of the flattened arrays (one
    per image) in one pass: returns (a list of ``slices`` losses, the gradient of pred's
    shape), each slice's numbers those of a call on it alone."""
    shape, dtype, size = tuple(pred.shape), pred.dtype, int(pred.size)
    if size == 0:
        return [0.0] * slices, np.zeros(shape, dtype)
    flat = [np.ascontiguousarray(a).reshape(size) for a in (pred, target)]
    w = np.ascontiguousarray(weights).reshape(size) if weights is not None else np.ones(1, dtype)
    elem_loss = np.empty(size, np.float64)
    grad = np.empty(size, dtype)
    _smooth_l1_cpu(flat[0], flat[1], w, weights is not None, beta, elem_loss, grad)
    per_slice = elem_loss.reshape(slices, size // slices)  # (S, size / S)
    return [float(per_slice[s].sum()) for s in range(slices)], grad.reshape(shape)
