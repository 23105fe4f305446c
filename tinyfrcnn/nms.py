"""Non-maximum suppression: keep the best-scoring box, drop every box that overlaps it
by more than a threshold, repeat with the best box left.

Faster R-CNN uses NMS twice: on the RPN's proposals (IoU 0.7, per image) and on the
final detections (per class). The greedy algorithm is sequential, but nearly all of its
work is the IoU of one box against all later ones, which the CPU kernel does with a
branch-free, vectorisable inner loop, and which the CUDA kernel does for all pairs at
once as bitmasks (64 boxes against 64 per block), leaving only a cheap sequential pass
over the masks, which also runs on the GPU, in one block.
"""

import threading

import numpy as np
from numba import cuda, float32, float64, int64, njit, prange, uint64

from .checks import as_array, as_float_array, check_boxes, check_finite, check_number, check_positive_int
from .device import empty_on_device, launch, on_device, rounded_ops, to_device, to_host, zeros_on_device

BLOCK = 64  # boxes per CUDA block: one bit each in a uint64 mask word
MAX_WORDS = 4096  # the single-block pass keeps its "removed" bitset in 32 KiB of shared memory


def _descending_order(scores, ties=None):
    """Indices that sort ``scores`` (..., N) from high to low along the last axis, equal
    scores by higher ``ties`` (an array of their shape) first, then by lower index.

    The same permutation as ``np.lexsort((-ties, -scores), axis=-1)``, or without ties
    ``np.argsort(-scores, axis=-1, kind="stable")``. For float32, each score becomes an
    integer with the same order (flip the magnitude bits of negatives), each tie value its
    rank among the distinct values, and both are packed above the index into one int64
    key: NumPy's unstable sort of int64 keys is several times faster than a stable sort
    of floats, and equal keys cannot occur because the index is part of the key.
    """
    n = scores.shape[-1]
    index_bits = max(n - 1, 1).bit_length()
    rank, top = _dense_rank(ties) if ties is not None and scores.dtype == np.float32 else (None, 0)
    if scores.dtype != np.float32 or 32 + top.bit_length() + index_bits > 63:
        if ties is None:
            return np.argsort(-scores, axis=-1, kind="stable")
        return np.lexsort((-ties, -scores), axis=-1)
    bits = (scores + np.float32(0)).view(np.int32).astype(np.int64)  # (..., N); + 0 turns -0.0 into 0.0
    keys = (2**31 - 1) - np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # in [0, 2**32), decreasing with the score
    if ties is not None:
        keys = (keys << top.bit_length()) | (top - rank)  # then decreasing with the tie value
    keys = (keys << index_bits) | np.arange(n, dtype=np.int64)  # (..., N)
    return np.sort(keys, axis=-1) & ((1 << index_bits) - 1)


def _dense_rank(values):
    """Each value's rank among the distinct values (0 for the smallest), as int64 of
    ``values``' shape, and the largest rank."""
    flat = values.ravel()  # (T,)
    order = np.argsort(flat)  # (T,)
    rank = np.empty(flat.size, np.int64)  # (T,)
    rank[order] = np.concatenate([[0], np.cumsum(flat[order][1:] != flat[order][:-1])])
    return rank.reshape(values.shape), int(rank.max(initial=0))


def _nms_reference(boxes, scores, iou_threshold, idxs=None, max_per_category=None):
    """Greedy NMS in plain NumPy: the best undecided box is kept and suppresses every box
    of its category with IoU > iou_threshold (compared in float64, as torchvision does);
    then the first ``max_per_category`` kept boxes of each category (None: all)."""
    n = boxes.shape[0]
    order = np.argsort(-scores, kind="stable")  # (N,)
    b = boxes[order]  # (N, 4)
    cls = np.zeros(n, np.int64) if idxs is None else idxs[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (N,)
    suppressed = np.zeros(n, bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(order[i])
        w = np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0])  # (N,)
        h = np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1])
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (inter / (area[i] + area - inter)).astype(np.float64)
        suppressed |= (w > 0) & (h > 0) & (iou > iou_threshold) & (cls == cls[i])
    keep = np.array(keep, dtype=np.int64)
    if max_per_category is not None:
        kept_cls = (np.zeros(n, np.int64) if idxs is None else idxs)[keep]  # (K,)
        rank = np.array([np.sum(kept_cls[:k] == c) for k, c in enumerate(kept_cls)], dtype=np.int64)
        keep = keep[rank < max_per_category]
    return keep


@njit(cache=True, error_model="numpy")
def _nms_cpu(boxes, iou_threshold, max_keep):
    """Greedy NMS over boxes of one category already sorted by decreasing score; returns
    kept positions, stopping once ``max_keep`` are kept (the first ``max_keep`` of the
    full result). ``iou_threshold`` has the boxes' dtype (see ``_threshold_in``)."""
    n = boxes.shape[0]
    x1 = boxes[:, 0].copy()
    y1 = boxes[:, 1].copy()
    x2 = boxes[:, 2].copy()
    y2 = boxes[:, 3].copy()
    area = (x2 - x1) * (y2 - y1)  # (N,)
    suppressed = np.zeros(n, np.uint8)
    keep = np.empty(n, np.int64)
    n_keep = 0
    for i in range(n):
        if n_keep == max_keep:
            break
        if suppressed[i]:
            continue
        keep[n_keep] = i
        n_keep += 1
        ix1, iy1, ix2, iy2, iarea = x1[i], y1[i], x2[i], y2[i], area[i]
        first, last = i + 1, n
        while last > first and suppressed[last - 1]:
            last -= 1
        # Slices and a branch-free body in one dtype let LLVM vectorise this loop; pairs
        # that do not overlap have w or h <= 0 and are masked out, whatever the division gives.
        jx1, jy1, jx2, jy2 = x1[first:last], y1[first:last], x2[first:last], y2[first:last]
        jarea, jsup = area[first:last], suppressed[first:last]
        for j in range(jx1.shape[0]):
            w = min(ix2, jx2[j]) - max(ix1, jx1[j])
            h = min(iy2, jy2[j]) - max(iy1, jy1[j])
            inter = w * h
            iou = inter / (iarea + jarea[j] - inter)
            jsup[j] |= (w > 0) & (h > 0) & (iou > iou_threshold)
    return keep[:n_keep]


@njit(cache=True, parallel=True)
def _nms_segments_cpu(boxes, starts, iou_threshold, max_keep):
    """Greedy NMS on each segment ``boxes[starts[s]:starts[s + 1]]`` (one category, sorted
    by decreasing score) in parallel, at most ``max_keep`` kept in each; returns a kept
    flag per box."""
    kept = np.zeros(boxes.shape[0], np.bool_)
    for s in prange(starts.shape[0] - 1):
        lo, hi = starts[s], starts[s + 1]
        for k in _nms_cpu(boxes[lo:hi], iou_threshold, max_keep):
            kept[lo + k] = True
    return kept


def _threshold_in(dtype, iou_threshold):
    """The largest ``dtype`` value t <= iou_threshold: for an IoU x of that dtype,
    ``x > t`` exactly when ``x > iou_threshold``, and the kernel compares in one dtype."""
    t = np.dtype(dtype).type(iou_threshold)
    above = np.float64(t) > np.float64(iou_threshold)  # in float64: NumPy would compare in dtype
    return np.nextafter(t, t.dtype.type(-np.inf)) if above else t


def _make_nms_mask_cuda(dtype):
    mul, add = rounded_ops(dtype)
    numba_dtype = float32 if np.dtype(dtype) == np.float32 else float64

    @cuda.jit
    def nms_mask(boxes, classes, iou_threshold, mask):
        """Block (col, row): bit k of mask[i, col] says box i suppresses box 64*col + k."""
        n = boxes.shape[0]
        row_block = cuda.blockIdx.y
        col_block = cuda.blockIdx.x
        if row_block > col_block:  # boxes only suppress later (lower-scored) boxes
            return
        t = cuda.threadIdx.x
        col_start = col_block * BLOCK
        col_size = min(n - col_start, BLOCK)
        row_size = min(n - row_block * BLOCK, BLOCK)
        col_boxes = cuda.shared.array((BLOCK, 4), numba_dtype)
        col_classes = cuda.shared.array(BLOCK, int64)
        if t < col_size:
            for c in range(4):
                col_boxes[t, c] = boxes[col_start + t, c]
            col_classes[t] = classes[col_start + t]
        cuda.syncthreads()
        if t >= row_size:
            return
        i = row_block * BLOCK + t
        ix1, iy1, ix2, iy2, ci = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3], classes[i]
        iarea = mul(ix2 - ix1, iy2 - iy1)
        bits = uint64(0)
        start = t + 1 if row_block == col_block else 0
        for k in range(start, col_size):
            if col_classes[k] != ci:
                continue
            w = min(ix2, col_boxes[k, 2]) - max(ix1, col_boxes[k, 0])
            h = min(iy2, col_boxes[k, 3]) - max(iy1, col_boxes[k, 1])
            if w <= 0 or h <= 0:
                continue
            inter = mul(w, h)
            karea = mul(col_boxes[k, 2] - col_boxes[k, 0], col_boxes[k, 3] - col_boxes[k, 1])
            if inter / add(add(iarea, karea), -inter) > iou_threshold:
                bits |= uint64(1) << uint64(k)
        mask[i, col_block] = bits

    return nms_mask


_nms_mask_cuda_f32 = _make_nms_mask_cuda(np.float32)
_nms_mask_cuda_f64 = _make_nms_mask_cuda(np.float64)
_NMS_MASK_CUDA = {np.dtype(np.float32): _nms_mask_cuda_f32, np.dtype(np.float64): _nms_mask_cuda_f64}


@njit(cache=True)
def _nms_gather_masks(mask):
    """The sequential pass: walk boxes in score order, OR in the mask of each kept one."""
    n, col_blocks = mask.shape
    removed = np.zeros(col_blocks, np.uint64)
    keep = np.empty(n, np.int64)
    n_keep = 0
    for i in range(n):
        block = i // BLOCK
        if (removed[block] >> np.uint64(i % BLOCK)) & np.uint64(1):
            continue
        keep[n_keep] = i
        n_keep += 1
        for c in range(block, col_blocks):
            removed[c] |= mask[i, c]
    return keep[:n_keep]


@cuda.jit
def _nms_gather_cuda(mask, order, keep):
    """``_nms_gather_masks`` in one block, on the device: the mask never leaves the GPU.

    Every thread walks the boxes in score order and reads the same shared "removed"
    word, so all agree on which boxes are kept. A step goes straight to the next box
    still standing (the lowest clear bit of the word, at or after the last decision):
    a suppressed box costs nothing, a word of them one step. For a kept box the threads
    OR its mask row into the bitset, one word each, and synchronise before the next
    decision. (A row only sets bits of later boxes, so a thread still deciding an
    earlier box, or the same one, is never misled by one already OR-ing.) The kept
    sorted positions are mapped to ``order`` after the walk, all threads at once, so
    the walk waits on one read per kept box, its mask row. Writes keep[k] = order[k-th
    kept position] and keep[n] = the number kept.
    """
    n, col_blocks = mask.shape
    removed = cuda.shared.array(MAX_WORDS, uint64)
    t = cuda.threadIdx.x
    step = cuda.blockDim.x
    for c in range(t, col_blocks, step):
        removed[c] = 0
    cuda.syncthreads()
    n_keep = 0
    i = 0
    while i < n:
        block = i // BLOCK
        standing = ~removed[block] & (~uint64(0) << uint64(i % BLOCK))  # clear bits from i on
        if standing == 0:
            i = (block + 1) * BLOCK
            continue
        i = block * BLOCK + cuda.popc((standing & (~standing + uint64(1))) - uint64(1))  # its lowest set bit
        if i >= n:
            break
        if t == 0:
            keep[n_keep] = i
        n_keep += 1
        c = block + t
        while c < col_blocks:  # not range(): its trip count would cost a 64-bit division
            removed[c] |= mask[i, c]
            c += step
        cuda.syncthreads()
        i += 1
    cuda.syncthreads()
    for k in range(t, n_keep, step):
        keep[k] = order[keep[k]]
    if t == 0:
        keep[n] = n_keep


_SCRATCH = {}  # "mask": a flat uint64 device buffer, grown to the largest mask so far
_SCRATCH_LOCK = threading.Lock()


def _mask_buffer(n, col_blocks):
    """The (n, col_blocks) suppression mask, in a device buffer kept between calls.

    The mask is only read inside one call, which ends by waiting for the GPU, so one
    buffer serves every call (the lock keeps two threads from sharing it at once).
    """
    size = n * col_blocks
    if "mask" not in _SCRATCH or _SCRATCH["mask"].size < size:
        _SCRATCH["mask"] = cuda.device_array(size, dtype=np.uint64)
    return _SCRATCH["mask"][:size].reshape(n, col_blocks)


def _nms_cuda(boxes, classes, order, iou_threshold):
    """NMS on the GPU; boxes, classes and order are sorted host arrays, order the sort.

    Two launches (the mask, then the single-block pass); uploads the sorted boxes, their
    categories (if any) and the order, and copies back one int64 (how many were kept).
    Returns a device array of the kept original indices.
    """
    n = boxes.shape[0]
    col_blocks = (n + BLOCK - 1) // BLOCK
    if col_blocks > MAX_WORDS:
        raise ValueError(f"nms: {n} boxes are more than the CUDA kernel's {MAX_WORDS * BLOCK}")
    d_boxes, d_order = to_device(boxes), to_device(order)
    if classes is None:
        d_classes = zeros_on_device(n, np.int64)
    else:
        d_classes = to_device(classes)
    keep = empty_on_device(n + 1, dtype=np.int64)  # (N + 1,): kept indices, then their count
    threads = min(256, 32 * ((col_blocks + 31) // 32))
    with _SCRATCH_LOCK:
        mask = _mask_buffer(n, col_blocks)  # (N, ceil(N / 64))
        kernel = _NMS_MASK_CUDA[np.dtype(boxes.dtype)]
        launch(kernel, (col_blocks, col_blocks), BLOCK, d_boxes, d_classes, float(iou_threshold), mask)
        launch(_nms_gather_cuda, 1, threads, mask, d_order, keep)
        count = int(keep[n:].copy_to_host()[0])
    return keep[:count]


def _validate(boxes, scores, iou_threshold, where, idxs=None):
    """Check the arguments on one host copy each; return (host arrays, threshold, on device)."""
    given = {"boxes": boxes, "scores": scores}
    if idxs is not None:
        given["idxs"] = idxs
    device = on_device(given)
    host = {k: v.copy_to_host() if device else as_array(v, k, where=where) for k, v in given.items()}
    host["boxes"] = check_boxes(host["boxes"], "boxes", where)
    host["scores"] = as_float_array(host["scores"], "scores", ndim=1, where=where)
    if idxs is not None:
        host["idxs"] = as_array(host["idxs"], "idxs", ndim=1, where=where)
        if not np.issubdtype(host["idxs"].dtype, np.integer):
            raise ValueError(f"{where}: idxs must hold integers, got dtype {host['idxs'].dtype.name}")
    n = host["boxes"].shape[0]
    for name, arr in host.items():
        if arr.shape[0] != n:
            raise ValueError(f"{where}: boxes has {n} rows but {name} has {arr.shape[0]}")
    check_finite(host["scores"], "scores", where)
    iou_threshold = check_number(iou_threshold, "iou_threshold", low=0, high=1, where=where)
    return {k: np.ascontiguousarray(v) for k, v in host.items()}, iou_threshold, device


def _run(host, iou_threshold, device, max_per_category=None):
    boxes, scores = host["boxes"], host["scores"]
    if boxes.shape[0] == 0:
        keep = np.zeros(0, np.int64)
        return to_device(keep) if device else keep
    order = _descending_order(scores)  # (N,) ties: lower index first
    sorted_boxes = np.take(boxes, order, axis=0)  # (N, 4); take: several times faster than boxes[order]
    classes = host["idxs"].astype(np.int64)[order] if "idxs" in host else None  # (N,)
    if device:
        keep = _nms_cuda(sorted_boxes, classes, order, iou_threshold)
        return keep if max_per_category is None else _first_per_category(keep, host.get("idxs"), max_per_category)
    max_keep = len(boxes) if max_per_category is None else min(max_per_category, len(boxes))
    if classes is None:
        return order[_nms_cpu(sorted_boxes, _threshold_in(boxes.dtype, iou_threshold), max_keep)].astype(np.int64)
    # One category after another, each still in score order: boxes of different
    # categories are never compared, and the categories run in parallel.
    by_class, starts = _group_by_category(classes)
    kept = _nms_sorted_segments(sorted_boxes[by_class], starts, iou_threshold, max_keep)
    return order[np.sort(by_class[kept])].astype(np.int64)  # back to score order


def _nms_sorted_segments(boxes, starts, iou_threshold, max_keep):
    """Greedy NMS on host ``boxes`` (N, 4), valid and finite, that the caller has already
    laid out as segments ``[starts[s], starts[s + 1])`` (one category each, by decreasing
    score, ties lower index first): what ``batched_nms`` would sort them into. Returns the
    kept positions (K,) in order, at most ``max_keep`` per segment; no validation."""
    kept = _nms_segments_cpu(np.ascontiguousarray(boxes), np.asarray(starts, np.int64),
                             _threshold_in(boxes.dtype, iou_threshold), max_keep)
    return np.flatnonzero(kept)


def _group_by_category(classes):
    """A stable order of ``classes`` (N,) int64 that groups equal values, and where each
    group starts in it, with N at the end: (N,), (S + 1,)."""
    low = int(classes.min())
    compact = int(classes.max()) - low < 2**16  # NumPy's stable sort of 16-bit ints is a radix sort
    by_class = np.argsort((classes - low).astype(np.uint16) if compact else classes, kind="stable")  # (N,)
    sorted_classes = classes[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1], True])  # (S + 1,)
    return by_class, starts


def _first_per_category(keep, idxs, limit):
    """The first ``limit`` entries of each category in the device array ``keep`` (kept
    indices in score order), as a device array; ``idxs`` None: one category."""
    keep = to_host(keep)  # (K,)
    if idxs is None or len(keep) == 0:
        return to_device(np.ascontiguousarray(keep[:limit]))
    by_class, starts = _group_by_category(idxs.astype(np.int64)[keep])
    rank = np.arange(len(keep)) - np.repeat(starts[:-1], np.diff(starts))  # (K,) rank within its category
    return to_device(np.ascontiguousarray(keep[np.sort(by_class[rank < limit])]))


def _limit(value, name, where):
    return None if value is None else check_positive_int(value, name, where)


def nms(boxes, scores, iou_threshold, max_keep=None):
    """Greedy non-maximum suppression; int64 indices of kept boxes, highest score first.

    Visit boxes in decreasing score (equal scores: lower index first); keep a box unless
    its IoU with an already kept box is > ``iou_threshold``. Same result as
    ``torchvision.ops.nms``. NumPy in: Numba CPU kernel; device arrays in: the CUDA
    bitmask kernel and a single-block pass over the masks, both on the GPU (the inputs
    are checked, and the scores sorted, on one host copy), device array out. Both give
    the same indices. ``max_keep`` returns only the first ``max_keep`` of them; the CPU
    kernel stops as soon as it has kept that many (the RPN keeps 500 or 300 proposals of
    a few thousand boxes).
    """
    host, thr, device = _validate(boxes, scores, iou_threshold, "nms")
    return _run(host, thr, device, _limit(max_keep, "max_keep", "nms"))


def batched_nms(boxes, scores, idxs, iou_threshold, max_per_category=None):
    """NMS within each category: boxes with different ``idxs`` never suppress each other.

    Returns int64 indices of kept boxes in decreasing score order (equal scores: lower
    index first). The kept set is that of ``torchvision.ops.nms`` run once per category
    (torchvision's ``_batched_nms_vanilla``): no coordinate offsets perturb the IoUs here,
    as the CPU kernel runs each category as a segment of its own, the categories in
    parallel, and the CUDA kernel skips pairs of different categories.
    ``torchvision.ops.batched_nms`` itself takes that path only for large inputs (in
    torchvision 0.29, more than 1000 boxes on the CPU and 25000 on CUDA:
    ``boxes.numel()`` above 4000 or 100000).
    For smaller ones it shifts each category's boxes by a multiple of the largest
    coordinate and runs one NMS; rounding the shifted coordinates moves its IoUs slightly
    (in float32 by a few ulps), so in rare cases it keeps a different set.
    ``max_per_category`` keeps only the first that many of each category (the CPU
    kernel stops each segment there).
    """
    host, thr, device = _validate(boxes, scores, iou_threshold, "batched_nms", idxs=idxs)
    return _run(host, thr, device, _limit(max_per_category, "max_per_category", "batched_nms"))
