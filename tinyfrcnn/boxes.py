"""Boxes: area, intersection over union, clipping, and the paper's box parameterisation.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: width is ``x2 - x1``,
with no "+1" (py-faster-rcnn's convention is ``x2 - x1 + 1``; chapter 3 compares the two).

Faster R-CNN regresses a box ``(x, y, w, h)`` (centre, width, height) relative to an
anchor or proposal ``(x_a, y_a, w_a, h_a)`` (Ren et al. 2015, eq. 2):

    t_x = (x - x_a) / w_a,   t_y = (y - y_a) / h_a,
    t_w = log(w / w_a),      t_h = log(h / h_a).

``box_iou`` has a Numba CPU kernel and a CUDA kernel (it is the op that runs on
anchors x ground truth every step). ``box_area``, ``clip_boxes``, ``remove_small_boxes``,
``encode`` and ``decode`` are a few elementwise NumPy lines each: memory-bound, already
vectorised, so a kernel would buy nothing; they take NumPy arrays.
"""

import math

import numpy as np
from numba import cuda, njit, prange

from .checks import as_float_array, cast_finite, check_boxes, check_finite, check_number
from .device import empty_on_device, grid_1d, is_device_array, launch, on_device, rounded_ops

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _host_only(x, name, where):
    if is_device_array(x):
        raise ValueError(f"{where}: {name} must be a NumPy array (this op runs on the host), got a device array")


def box_area(boxes):
    """Area ``(x2 - x1) * (y2 - y1)`` of each (N, 4) box, as (N,)."""
    _host_only(boxes, "boxes", "box_area")
    boxes = check_boxes(boxes, "boxes", "box_area")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


# ---------------------------------------------------------------- IoU

def _box_iou_reference(a, b):
    """IoU = |A ∩ B| / (|A| + |B| - |A ∩ B|), plain NumPy broadcasting; 0 where the intersection is 0."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (N,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (M,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = np.clip(rb - lt, 0, None)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter  # (N, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return np.where(inter > 0, iou, 0).astype(inter.dtype)


@njit(error_model="numpy")
def _overlap(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b):
    """IoU of boxes a and b given their areas; 0 for pairs that share no area (or so
    little that it rounds to 0), whatever the division gave (0/0 included). Branch-free,
    so LLVM vectorises a loop over contiguous boxes b. (numba's cache of a kernel in
    another module that calls this does not notice edits here: delete its __pycache__.)"""
    w = min(ax2, bx2) - max(ax1, bx1)
    h = min(ay2, by2) - max(ay1, by1)
    inter = w * h
    iou = inter / (area_a + area_b - inter)
    return iou if (w > 0) & (h > 0) & (inter > 0) else 0


def _box_iou_rows(a, b, area_a, area_b, out):
    n, m = a.shape[0], b.shape[0]
    bx1, by1, bx2, by2 = b[:, 0].copy(), b[:, 1].copy(), b[:, 2].copy(), b[:, 3].copy()  # (M,) each
    for i in prange(n):
        ax1, ay1, ax2, ay2 = a[i, 0], a[i, 1], a[i, 2], a[i, 3]
        row = out[i]
        for j in range(m):
            row[j] = _overlap(ax1, ay1, ax2, ay2, area_a[i], bx1[j], by1[j], bx2[j], by2[j], area_b[j])


# Threads pay off only on large tables: the detector's per-image calls (a few thousand
# anchors against a few boxes) run faster on one thread than waking a thread pool.
_box_iou_cpu = njit(cache=True, parallel=True, error_model="numpy")(_box_iou_rows)
_box_iou_cpu_serial = njit(cache=True, error_model="numpy")(_box_iou_rows)
PARALLEL_MIN_PAIRS = 1 << 18


def _make_box_iou_cuda(dtype):
    mul, add = rounded_ops(dtype)

    @cuda.jit
    def box_iou_pairs(a, b, out):
        # One thread per pair, row-major: a warp's 32 threads write 32 neighbouring
        # entries of a row of out (one memory transaction, not 32).
        m = b.shape[0]
        k = cuda.grid(1)
        if k >= a.shape[0] * m:
            return
        i = k // m
        j = k - i * m
        ax1, ay1, ax2, ay2 = a[i, 0], a[i, 1], a[i, 2], a[i, 3]
        bx1, by1, bx2, by2 = b[j, 0], b[j, 1], b[j, 2], b[j, 3]
        w = min(ax2, bx2) - max(ax1, bx1)
        h = min(ay2, by2) - max(ay1, by1)
        if w <= 0 or h <= 0:
            out[i, j] = 0
            return
        inter = mul(w, h)
        if inter == 0:
            out[i, j] = 0
            return
        union = add(add(mul(ax2 - ax1, ay2 - ay1), mul(bx2 - bx1, by2 - by1)), -inter)
        out[i, j] = inter / union

    return box_iou_pairs


_box_iou_cuda_f32 = _make_box_iou_cuda(np.float32)
_box_iou_cuda_f64 = _make_box_iou_cuda(np.float64)
_BOX_IOU_CUDA = {np.dtype(np.float32): _box_iou_cuda_f32, np.dtype(np.float64): _box_iou_cuda_f64}


def box_iou(a, b):
    """Pairwise intersection over union of (N, 4) and (M, 4) boxes, as (N, M).

    IoU(A, B) = |A ∩ B| / (|A| + |B| - |A ∩ B|). Same numbers as
    ``torchvision.ops.box_iou`` (same operation order, in the input dtype), except
    where the intersection is 0 and so is the union (two zero-area boxes, or boxes so
    small that their areas round to 0): torchvision returns 0/0 = NaN there, this
    returns 0, as for every pair that shares no area. NumPy in, CPU kernel; device
    arrays in, CUDA kernel, device array out.
    """
    if on_device({"a": a, "b": b}):
        check_boxes(a.copy_to_host(), "a", "box_iou")  # one host copy each, for the value checks
        check_boxes(b.copy_to_host(), "b", "box_iou")
        if a.dtype != b.dtype:
            raise ValueError(f"box_iou: a and b must share a dtype on the device, got {a.dtype} and {b.dtype}")
        out = empty_on_device((a.shape[0], b.shape[0]), dtype=a.dtype)  # (N, M)
        if a.shape[0] and b.shape[0]:
            launch(_BOX_IOU_CUDA[np.dtype(a.dtype)], *grid_1d(a.shape[0] * b.shape[0]), a, b, out)
        return out
    return _box_iou_host(check_boxes(a, "a", "box_iou"), check_boxes(b, "b", "box_iou"))


def _box_iou_host(a, b):
    """``box_iou`` of two NumPy box arrays that have already been checked."""
    dtype = np.result_type(a.dtype, b.dtype)
    out = np.empty((a.shape[0], b.shape[0]), dtype=dtype)  # (N, M)
    if a.shape[0] and b.shape[0]:
        # each area in its own box's dtype, then promoted, as torchvision does for mixed inputs
        area_a, area_b = (((x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])).astype(dtype) for x in (a, b))  # (N,), (M,)
        a = np.ascontiguousarray(a, dtype=dtype)
        b = np.ascontiguousarray(b, dtype=dtype)
        kernel = _box_iou_cpu if a.shape[0] * b.shape[0] >= PARALLEL_MIN_PAIRS else _box_iou_cpu_serial
        kernel(a, b, area_a, area_b, out)
    return out


# ---------------------------------------------------------------- clip, filter

def _check_box_groups(boxes, name, where, allow_inf=False):
    """(N, 4*K) float boxes, each group of 4 a valid box."""
    _host_only(boxes, name, where)
    boxes = as_float_array(boxes, name, ndim=2, where=where)
    if boxes.shape[1] == 0 or boxes.shape[1] % 4:
        raise ValueError(f"{where}: {name} must have shape (N, 4) or (N, 4*K), got {boxes.shape}")
    if boxes.shape[1] == 4:
        return check_boxes(boxes, name, where, allow_inf=allow_inf)
    for k in range(0, boxes.shape[1], 4):  # one check per group, so errors name the right entry
        check_boxes(boxes[:, k:k + 4], f"{name}[:, {k}:{k + 4}]", where, allow_inf=allow_inf)
    return boxes


def clip_boxes(boxes, height, width):
    """Clamp x to [0, width] and y to [0, height] (torchvision's clip_boxes_to_image).

    ``boxes`` is (N, 4) or (N, 4*K) (one box per class); returns a new array of the
    same shape and dtype. Infinite coordinates are clamped like any other (a decoded
    box can overflow when its deltas are huge), NaN is refused.
    """
    boxes = _check_box_groups(boxes, "boxes", "clip_boxes", allow_inf=True)
    height = check_number(height, "height", low=0, where="clip_boxes")
    width = check_number(width, "width", low=0, where="clip_boxes")
    return _clip_boxes(boxes, height, width)


def _clip_boxes(boxes, height, width):
    """``clip_boxes`` of checked arguments."""
    out = boxes.copy()
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    return out


def remove_small_boxes(boxes, min_size):
    """int64 indices of boxes whose width and height are both >= ``min_size`` (as torchvision)."""
    _host_only(boxes, "boxes", "remove_small_boxes")
    boxes = check_boxes(boxes, "boxes", "remove_small_boxes")
    min_size = check_number(min_size, "min_size", low=0, where="remove_small_boxes")
    return np.flatnonzero(_large_boxes(boxes, min_size)).astype(np.int64)


def _large_boxes(boxes, min_size):
    """(N,) bool: width and height both >= ``min_size``, of checked arguments."""
    return (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)


# ---------------------------------------------------------------- encode / decode

def _check_weights(weights, where, dtype=np.dtype(np.float64)):
    """The four weights as scalars of ``dtype``, each positive and finite in it."""
    if not isinstance(weights, (tuple, list, np.ndarray)) or len(weights) != 4:
        raise ValueError(f"{where}: weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
    out = []
    for i, w in enumerate(weights):
        v = check_number(w, f"weights[{i}]", low=0, low_open=True, where=where)
        with np.errstate(over="ignore", under="ignore"):
            t = dtype.type(v)
        if not np.isfinite(t) or t == 0:
            raise ValueError(f"{where}: weights[{i}] = {w!r} is out of {dtype.name}'s range")
        out.append(t)
    return tuple(out)


def _centre_size(boxes):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode(reference, target, weights=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets (N, 4) that move each ``reference`` box (anchor) onto ``target``.

    t_x = wx (x - x_a) / w_a,  t_y = wy (y - y_a) / h_a,
    t_w = ww log(w / w_a),     t_h = wh log(h / h_a),
    with centres x = x1 + w/2, w = x2 - x1. Same numbers as torchvision's
    ``BoxCoder(weights).encode_single(target, reference)`` up to the last-bit differences
    between NumPy's log and torch's (which vary with the CPU). Both boxes need positive
    width and height (the logarithm). dtype: the common dtype of the inputs.
    """
    where = "encode"
    _host_only(reference, "reference", where)
    _host_only(target, "target", where)
    reference = check_boxes(reference, "reference", where)
    target = check_boxes(target, "target", where)
    if reference.shape[0] != target.shape[0]:
        raise ValueError(f"{where}: reference has {reference.shape[0]} boxes but target has {target.shape[0]}")
    for name, boxes in (("reference", reference), ("target", target)):
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])  # (N,)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"{where}: {name}[{i}] has zero width or height (log(w / w_a) is undefined)")
    weights = _check_weights(weights, where, np.result_type(reference.dtype, target.dtype))
    return _encode(reference, target, weights)


def _encode(reference, target, weights):
    """``encode`` of checked boxes with positive sizes; ``weights`` as ``_check_weights``
    returns them for the boxes' common dtype."""
    dtype = np.result_type(reference.dtype, target.dtype)
    reference, target = reference.astype(dtype, copy=False), target.astype(dtype, copy=False)
    wx, wy, ww, wh = (dtype.type(w) for w in weights)
    xa, ya, wa, ha = _centre_size(reference)
    x, y, w, h = _centre_size(target)
    out = np.empty((reference.shape[0], 4), dtype)  # (N, 4): t_x, t_y, t_w, t_h
    out[:, 0] = wx * (x - xa) / wa
    out[:, 1] = wy * (y - ya) / ha
    out[:, 2] = ww * np.log(w / wa)
    out[:, 3] = wh * np.log(h / ha)
    return out


def decode(reference, deltas, weights=(1.0, 1.0, 1.0, 1.0)):
    """Apply (N, 4) or (N, 4*K) ``deltas`` to (N, 4) ``reference`` boxes; the inverse of encode.

    x = t_x / wx * w_a + x_a,  w = exp(min(t_w / ww, log(1000/16))) * w_a  (same for y, h),
    then (x - w/2, y - h/2, x + w/2, y + h/2). The clamp keeps exp finite, as torchvision
    does. Same numbers as torchvision's ``BoxCoder(weights).decode_single`` up to the
    last-bit differences between NumPy's exp and torch's (which vary with the CPU), also
    where huge ``t_x``, ``t_y`` overflow to inf (``clip_boxes`` clamps those). Output has
    the shape and dtype of ``deltas``.
    """
    where = "decode"
    _host_only(reference, "reference", where)
    _host_only(deltas, "deltas", where)
    reference = check_boxes(reference, "reference", where)
    deltas = as_float_array(deltas, "deltas", ndim=2, where=where)
    if deltas.shape[1] == 0 or deltas.shape[1] % 4:
        raise ValueError(f"{where}: deltas must have shape (N, 4) or (N, 4*K), got {deltas.shape}")
    if deltas.shape[0] != reference.shape[0]:
        raise ValueError(f"{where}: reference has {reference.shape[0]} boxes but deltas has {deltas.shape[0]} rows")
    check_finite(deltas, "deltas", where)
    weights = _check_weights(weights, where, deltas.dtype)
    return _decode(cast_finite(reference, deltas.dtype, "reference", "deltas", where), deltas, weights)


def _decode(reference, deltas, weights):
    """``decode`` of checked, finite arguments: ``reference`` already in the dtype of
    ``deltas``, ``weights`` as ``_check_weights`` returns them for it."""
    dtype = deltas.dtype
    wx, wy, ww, wh = weights
    xa, ya, wa, ha = (v[:, None] for v in _centre_size(reference))  # (N, 1)
    out = np.empty_like(deltas)  # (N, 4*K)
    with np.errstate(over="ignore"):
        dx = deltas[:, 0::4] / wx  # (N, K)
        dy = deltas[:, 1::4] / wy
        dw = np.minimum(deltas[:, 2::4] / ww, dtype.type(BBOX_XFORM_CLIP))
        dh = np.minimum(deltas[:, 3::4] / wh, dtype.type(BBOX_XFORM_CLIP))
        x = dx * wa + xa
        y = dy * ha + ya
        half_w = dtype.type(0.5) * (np.exp(dw) * wa)
        half_h = dtype.type(0.5) * (np.exp(dh) * ha)
        out[:, 0::4] = x - half_w
        out[:, 1::4] = y - half_h
        out[:, 2::4] = x + half_w
        out[:, 3::4] = y + half_h
    return out
