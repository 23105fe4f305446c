import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from ptx import assert_compiles_to_ptx
from tinyfrcnn.boxes import box_iou
from tinyfrcnn import nms as nms_module
from tinyfrcnn.nms import _descending_order, _nms_reference, batched_nms, nms


def random_boxes(rng, n, dtype=np.float32, size=100.0, max_side=40.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, max_side, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(dtype)


def clustered_boxes(rng, objects, copies, dtype=np.float32):
    centres = random_boxes(rng, objects, np.float64, size=200, max_side=60)
    boxes = np.repeat(centres, copies, axis=0) + rng.normal(0, 3, (objects * copies, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    return boxes.astype(dtype)


def tied_scores(rng, n, dtype=np.float32, levels=8):
    return (rng.integers(0, levels, n) / levels).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_reference_random_with_ties(dtype, threshold):
    rng = np.random.default_rng(int(threshold * 10))
    boxes = random_boxes(rng, 300, dtype)
    scores = tied_scores(rng, 300, dtype)
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, _nms_reference(boxes, scores, threshold))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nms_matches_reference_clustered(dtype):
    rng = np.random.default_rng(5)
    boxes = clustered_boxes(rng, 6, 50, dtype)
    scores = rng.random(300).astype(dtype)
    keep = nms(boxes, scores, 0.7)
    np.testing.assert_array_equal(keep, _nms_reference(boxes, scores, 0.7))
    assert 6 <= len(keep) < 150


def test_nms_hand_worked():
    boxes = np.array([
        [0, 0, 10, 10],    # 0: score 0.9, kept
        [1, 1, 11, 11],    # 1: IoU 81/119 = 0.68 with box 0, suppressed at 0.5
        [20, 20, 30, 30],  # 2: far away, kept
        [0, 0, 10, 10],    # 3: copy of 0 with a higher score: kept first, suppresses 0
    ], np.float64)
    scores = np.array([0.9, 0.8, 0.3, 0.95])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [3, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [3, 1, 2])


def test_nms_ties_keep_lower_index_first():
    boxes = np.array([[0, 0, 10, 10]] * 3 + [[50, 50, 60, 60]] * 2, np.float32)
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 1.0), [0, 1, 2, 3, 4])


def test_nms_suppresses_only_strictly_above_threshold():
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)  # IoU exactly 1/2
    scores = np.array([0.9, 0.8], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 1])
    np.testing.assert_array_equal(nms(boxes, scores, 0.49), [0])


def test_nms_degenerate_boxes_never_suppress():
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0]], np.float32)
    np.testing.assert_array_equal(nms(boxes, np.array([0.3, 0.2, 0.1], np.float32), 0.0), [0, 1, 2])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.floats(0, 1))
def test_nms_invariants(seed, n, threshold):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n, np.float64, size=50)
    scores = tied_scores(rng, n, np.float64, levels=4)
    keep = nms(boxes, scores, threshold)
    kept = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(kept, 0)
    assert (kept <= threshold).all()  # no two kept boxes overlap above the threshold
    assert (np.diff(scores[keep]) <= 0).all()  # decreasing score
    dropped = np.setdiff1d(np.arange(n), keep)
    if len(dropped):  # every dropped box was suppressed by a kept box
        assert (box_iou(boxes[dropped], boxes[keep]) > threshold).any(axis=1).all()


@settings(max_examples=200, deadline=None)
@given(x=st.floats(0, 1, width=32), t=st.floats(0, 1))
def test_threshold_in_float32_decides_as_float64(x, t):
    # the CPU kernel compares a float32 IoU with the threshold rounded down to float32
    x = np.float32(x)
    thr = nms_module._threshold_in(np.float32, t)
    assert thr.dtype == np.float32 and thr <= t
    assert (x > thr) == (np.float64(x) > t)


def test_nms_threshold_at_a_float32_iou():
    # float32 IoU of these two is 70/100 -> 0.699999988 (the float32 nearest 0.7), below 0.7
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    iou = float(box_iou(boxes, boxes)[0, 1])
    assert iou < 0.7
    for thr, kept in ((0.7, [0, 1]), (iou, [0, 1]), (np.nextafter(iou, 0.0), [0])):
        np.testing.assert_array_equal(nms(boxes, scores, thr), kept)
        np.testing.assert_array_equal(nms(boxes, scores, thr), _nms_reference(boxes, scores, thr))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 80), pick=st.integers(0, 10**6),
       nudge=st.sampled_from([-1, 0, 1]))
def test_nms_thresholds_at_pairwise_ious_match_reference(seed, n, pick, nudge):
    # thresholds equal to (or one float64 step from) an IoU that occurs: the ties are exact
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, 3, (n + 2) // 3)[:n]
    scores = tied_scores(rng, n, levels=5)
    ious = box_iou(boxes, boxes)[np.triu_indices(n, 1)]
    ious = ious[(ious > 0) & (ious < 1)]
    if ious.size == 0:
        return
    thr = float(ious[pick % ious.size])
    thr = np.nextafter(thr, 2.0 * nudge) if nudge else thr
    np.testing.assert_array_equal(nms(boxes, scores, thr), _nms_reference(boxes, scores, thr))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 150), limit=st.integers(1, 40))
def test_max_keep_is_the_first_of_the_full_result(seed, n, limit):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    scores = tied_scores(rng, n, levels=6)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, max_keep=limit), nms(boxes, scores, 0.5)[:limit])


def test_limits_beyond_any_box_count_keep_everything():
    rng = np.random.default_rng(3)
    boxes, scores, idxs = random_boxes(rng, 50), rng.random(50).astype(np.float32), rng.integers(0, 3, 50)
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, max_keep=2**64), nms(boxes, scores, 0.5))
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5, max_per_category=10**30),
                                  batched_nms(boxes, scores, idxs, 0.5))


# ---------------------------------------------------------------- batched

def _per_class(boxes, scores, idxs, threshold):
    keep = np.concatenate([np.flatnonzero(idxs == c)[nms(boxes[idxs == c], scores[idxs == c], threshold)]
                           for c in np.unique(idxs)])
    return keep[np.lexsort((keep, -scores[keep]))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batched_nms_is_nms_per_class(dtype):
    rng = np.random.default_rng(7)
    boxes = clustered_boxes(rng, 5, 40, dtype)
    scores = tied_scores(rng, 200, dtype, levels=16)
    idxs = rng.integers(0, 4, 200)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, _per_class(boxes, scores, idxs, 0.5))
    np.testing.assert_array_equal(keep, _nms_reference(boxes, scores, 0.5, idxs))
    assert len(keep) > len(nms(boxes, scores, 0.5))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 150), classes=st.integers(1, 12),
       threshold=st.floats(0.0, 1.0))
def test_batched_nms_matches_reference(seed, n, classes, threshold):
    # categories run as separate segments in parallel on the CPU: any ids, any mix, ties
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    scores = tied_scores(rng, n, levels=6)
    idxs = rng.integers(-3, classes, n)
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, threshold),
                                  _nms_reference(boxes, scores, threshold, idxs))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 150), classes=st.integers(1, 6), limit=st.integers(1, 12))
def test_batched_nms_max_per_category_matches_reference(seed, n, classes, limit):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    scores = tied_scores(rng, n, levels=6)
    idxs = rng.integers(0, classes, n)
    keep = batched_nms(boxes, scores, idxs, 0.5, max_per_category=limit)
    np.testing.assert_array_equal(keep, _nms_reference(boxes, scores, 0.5, idxs, max_per_category=limit))
    full = batched_nms(boxes, scores, idxs, 0.5)
    np.testing.assert_array_equal(keep, [k for j, k in enumerate(full) if np.sum(idxs[full[:j]] == idxs[k]) < limit])


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(1, 30))
def test_presorted_segments_match_batched_nms(seed, segments, limit):
    # The proposal layer lays its candidates out as batched_nms would: category by
    # category, each by decreasing score (ties: lower index first), with ties in scores.
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, segments)
    boxes = random_boxes(rng, int(sizes.sum()))
    scores = rng.integers(0, 6, len(boxes)).astype(np.float32)
    idxs = np.repeat(np.arange(segments), sizes)
    order = np.lexsort((np.arange(len(boxes)), -scores, idxs))
    boxes, scores = boxes[order], scores[order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    kept = nms_module._nms_sorted_segments(boxes, starts, 0.5, limit)
    ref = batched_nms(boxes, scores, idxs, 0.5, max_per_category=limit)
    np.testing.assert_array_equal(kept, np.sort(ref))


def test_batched_nms_is_per_class_nms_not_the_coordinate_trick():
    # torchvision.ops.batched_nms, on small inputs, shifts each box by idx * (largest
    # coordinate + 1) and runs one nms. The shifted float32 corners round (3.2 + 14.2 is
    # 17.4 only approximately), which here lifts the IoU one ulp above the threshold.
    boxes = np.array([[0, 0, 10, 10], [3.2, 0, 13.2, 10]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    idxs = np.array([1, 1])
    threshold = float(box_iou(boxes[:1], boxes[1:])[0, 0])  # the pair's own IoU: not above it
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, threshold), [0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, threshold), nms(boxes, scores, threshold))
    shifted = boxes + idxs[:, None].astype(np.float32) * (boxes.max() + np.float32(1))  # (2, 4)
    np.testing.assert_array_equal(nms(shifted, scores, threshold), [0])


def test_batched_nms_category_ids_of_any_range():
    # ids spanning less than 2**16 are sorted as 16-bit keys, others as they are
    rng = np.random.default_rng(3)
    boxes = clustered_boxes(rng, 4, 30)
    scores = tied_scores(rng, 120, levels=6)
    small = rng.integers(0, 3, 120)
    expected = _nms_reference(boxes, scores, 0.5, small)
    for idxs in (small + 60000, small * 40000 - 10**9, small.astype(np.int8)):
        np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5), expected)


def test_batched_nms_different_classes_never_suppress():
    boxes = np.array([[0, 0, 10, 10]] * 3, np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([1, 2, 1]), 0.5), [0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 2], np.int32), 0.5), [0, 1, 2])


def test_batched_nms_ids_that_agree_in_their_low_16_bits():
    # ids 0 and 65536 span 2**16, one more than 16-bit keys hold: box 2 is still box 0's category
    boxes = np.array([[0, 0, 10, 10]] * 3, np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 65536, 0]), 0.5), [0, 1])


# ---------------------------------------------------------------- empty and bad input

def test_empty_input_gives_empty_output():
    for keep in (nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5),
                 batched_nms(np.zeros((0, 4), np.float64), np.zeros(0), np.zeros(0, np.int64), 0.5)):
        assert keep.shape == (0,) and keep.dtype == np.int64


BOXES = np.array([[0, 0, 1, 1], [0, 0, 2, 2]], np.float32)
SCORES = np.array([0.5, 0.4], np.float32)


class _RefusesArray:
    """Like a torch tensor that requires grad: converting it raises."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("no conversion")


@pytest.mark.parametrize("call, message", [
    (lambda: nms(np.zeros((2, 5), np.float32), SCORES, 0.5), "shape"),
    (lambda: nms(np.array([[1, 0, 0, 1], [0, 0, 1, 1]], np.float32), SCORES, 0.5), "x2 < x1"),
    (lambda: nms(np.array([[0, 0, np.nan, 1], [0, 0, 1, 1]], np.float32), SCORES, 0.5), "NaN"),
    (lambda: nms(BOXES, SCORES[:1], 0.5), "scores has 1"),
    (lambda: nms(BOXES, SCORES[:, None], 0.5), "1-D"),
    (lambda: nms(BOXES, np.array([0.5, np.inf], np.float32), 0.5), "scores holds NaN or inf"),
    (lambda: nms(BOXES, SCORES, -0.1), "iou_threshold"),
    (lambda: nms(BOXES, SCORES, 1.5), "iou_threshold"),
    (lambda: nms(BOXES, SCORES, float("nan")), "iou_threshold"),
    (lambda: nms(BOXES, SCORES, 10**400), "nms: iou_threshold must be finite"),
    (lambda: nms([[0, 0, 1, 1], [0, 0, 2]], SCORES, 0.5), "nms: boxes is not an array"),
    (lambda: nms(BOXES, np.ma.masked_array(SCORES), 0.5), "nms: scores must be a plain NumPy array"),
    (lambda: nms(BOXES, _RefusesArray(), 0.5), "nms: scores must be a NumPy or CUDA device array, got _RefusesArray"),
    (lambda: batched_nms(BOXES, SCORES, np.array([0, 1, 2]), 0.5), "idxs has 3"),
    (lambda: batched_nms(BOXES, SCORES, np.array([0.0, 1.0]), 0.5), "integers"),
    (lambda: nms(BOXES, SCORES, 0.5, max_keep=0), "max_keep"),
    (lambda: nms(BOXES, SCORES, 0.5, max_keep=True), "max_keep"),
    (lambda: batched_nms(BOXES, SCORES, np.array([0, 1]), 0.5, max_per_category=2.0), "max_per_category"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- CUDA (simulator) and PTX

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nms_cuda_matches_cpu(dtype):
    rng = np.random.default_rng(11)
    boxes = clustered_boxes(rng, 10, 10, dtype)  # 100 boxes: two 64-box blocks
    scores = tied_scores(rng, 100, dtype)
    idxs = rng.integers(0, 3, 100)
    keep = nms(cuda.to_device(boxes), cuda.to_device(scores), 0.5)
    assert not isinstance(keep, np.ndarray)
    np.testing.assert_array_equal(keep.copy_to_host(), nms(boxes, scores, 0.5))
    keep = batched_nms(cuda.to_device(boxes), cuda.to_device(scores), cuda.to_device(idxs), 0.5)
    np.testing.assert_array_equal(keep.copy_to_host(), batched_nms(boxes, scores, idxs, 0.5))
    keep = nms(cuda.to_device(boxes), cuda.to_device(scores), 0.5, max_keep=7)
    np.testing.assert_array_equal(keep.copy_to_host(), nms(boxes, scores, 0.5, max_keep=7))
    keep = batched_nms(cuda.to_device(boxes), cuda.to_device(scores), cuda.to_device(idxs), 0.5, max_per_category=4)
    np.testing.assert_array_equal(keep.copy_to_host(), batched_nms(boxes, scores, idxs, 0.5, max_per_category=4))
    assert len(keep.copy_to_host()) == 12  # three categories, each with more than 4 kept


def test_nms_cuda_edge_cases():
    with pytest.raises(ValueError, match="device arrays"):
        nms(cuda.to_device(BOXES), SCORES, 0.5)
    empty = nms(cuda.to_device(np.zeros((0, 4), np.float32)), cuda.to_device(np.zeros(0, np.float32)), 0.5)
    assert empty.copy_to_host().shape == (0,)


def test_nms_cuda_hand_worked():
    boxes = np.array([
        [0, 0, 2, 1],  # 0: kept
        [0, 0, 1, 1],  # 1: IoU exactly 1/2 with box 0
        [3, 3, 5, 5],  # 2: apart from both on x and on y, so it shares no area with either
    ], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    for threshold, kept in ((0.5, [0, 1, 2]), (0.0, [0, 2])):
        keep = nms(cuda.to_device(boxes), cuda.to_device(scores), threshold).copy_to_host()
        np.testing.assert_array_equal(keep, kept)
        np.testing.assert_array_equal(keep, nms(boxes, scores, threshold))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.sampled_from([np.float32, np.float64]))
def test_descending_order_is_stable_argsort(seed, n, dtype):
    rng = np.random.default_rng(seed)
    pool = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 1e-40, -1e-40, 3e38, -3e38, np.float32(0.1)], dtype)
    scores = np.where(rng.random(n) < 0.5, rng.choice(pool, n), rng.standard_normal(n)).astype(dtype)
    np.testing.assert_array_equal(_descending_order(scores), np.argsort(-scores, kind="stable"))
    rows = np.concatenate([scores, scores[::-1], [-np.inf] * (n % 3)]).astype(dtype).reshape(-1, 1)
    rows = np.tile(rows, (1, 3)).T.copy()  # (3, M): sorted along the last axis, row by row
    rows[1] = rows[1][::-1]
    np.testing.assert_array_equal(_descending_order(rows), np.argsort(-rows, axis=-1, kind="stable"))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(0, 200), st.sampled_from([np.float32, np.float64]))
def test_descending_order_with_ties_is_lexsort(seed, rows, n, dtype):
    """Equal scores by the higher tie value, then the lower index: the proposal layer's
    order (scores from a few values, so most are tied; tie values tied among themselves,
    signed zeros and -inf scores included)."""
    rng = np.random.default_rng(seed)
    scores = rng.choice(np.array([0.5, 1.0, -0.0, 0.0, -np.inf, np.float32(0.1)], dtype), (rows, n))
    ties = rng.choice(np.array([0.0, -0.0, 1e-8, 2e-8, -3.0, 40.0, 1e300]), (rows, n))
    ties[rng.random((rows, n)) < 0.3] = rng.standard_normal()
    np.testing.assert_array_equal(_descending_order(scores, ties=ties), np.lexsort((-ties, -scores), axis=-1))


def test_descending_order_with_ties_beyond_a_64_bit_key():
    # 32 score bits + 16 bits of tie rank + 16 bits of index do not fit an int64 key
    rng = np.random.default_rng(0)
    n = 2**15 + 1
    scores = rng.choice(np.array([-1.5, -0.25, 0.5], np.float32), n)
    ties = rng.permutation(n).astype(np.float64)  # n distinct tie values: ranks up to 2**15
    np.testing.assert_array_equal(_descending_order(scores, ties=ties), np.lexsort((-ties, -scores)))


@pytest.mark.parametrize("n, density, threads", [(150, 0.02, 32), (150, 0.3, 32), (200, 0.9, 2), (64, 0.1, 32),
                                                 (1, 0.0, 32), (130, 0.0, 1)])
def test_cuda_gather_pass_matches_host_pass(n, density, threads):
    # A random upper-triangular suppression mask (box i suppresses boxes j > i): the
    # single-block kernel keeps exactly the boxes the host pass keeps. Dense masks knock
    # out whole 64-bit words, which the kernel steps over; fewer threads than words make
    # each thread OR several words of a row.
    rng = np.random.default_rng(3)
    words = (n + 63) // 64
    bits = np.triu(rng.random((n, 64 * words)) < density, k=1)  # (N, 64 * words)
    bits[:, n:] = False
    if density > 0.5:
        bits[:, 64:128] |= np.arange(n)[:, None] < 10  # the second word all gone after box 10
    mask = np.packbits(bits.reshape(n, words, 64)[:, :, ::-1], axis=2).view(">u8")[:, :, 0].astype(np.uint64)
    order = rng.permutation(n).astype(np.int64)
    expected = order[nms_module._nms_gather_masks(mask)]
    keep = cuda.device_array(n + 1, np.int64)
    nms_module._nms_gather_cuda[1, threads](cuda.to_device(mask), cuda.to_device(order), keep)
    keep = keep.copy_to_host()
    assert keep[n] == len(expected)
    assert density == 0 and len(expected) == n or 0 < len(expected) < n
    np.testing.assert_array_equal(keep[:len(expected)], expected)


def test_kernels_compile_to_ptx():
    assert_compiles_to_ptx([
        ("tinyfrcnn.nms", "_nms_gather_cuda", "void(uint64[:, ::1], int64[::1], int64[::1])"),
        ("tinyfrcnn.nms", "_nms_mask_cuda_f32", "void(float32[:, :], int64[:], float64, uint64[:, :])"),
        ("tinyfrcnn.nms", "_nms_mask_cuda_f64", "void(float64[:, :], int64[:], float64, uint64[:, :])"),
    ])
