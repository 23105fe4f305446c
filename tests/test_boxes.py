import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from ptx import SAME_ROUNDING_AS_CPU, assert_compiles_to_ptx
from tinyfrcnn import boxes as B
from tinyfrcnn.boxes import box_area, box_iou, clip_boxes, decode, encode, remove_small_boxes


def random_boxes(rng, n, dtype=np.float32, size=100.0, degenerate_every=0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(0, size / 2, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(dtype)
    if degenerate_every:
        boxes[::degenerate_every, 2] = boxes[::degenerate_every, 0]
    return boxes


def box_strategy(min_size=0.0):
    coord = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False)
    size = st.floats(min_size, 500, allow_nan=False, allow_infinity=False)
    return st.tuples(coord, coord, size, size).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))


def boxes_strategy(min_size=0.0, max_n=6):
    return st.lists(box_strategy(min_size), min_size=1, max_size=max_n).map(lambda b: np.array(b, np.float64))


# ---------------------------------------------------------------- IoU

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_matches_reference(dtype):
    rng = np.random.default_rng(0)
    a = random_boxes(rng, 70, dtype, degenerate_every=5)
    b = random_boxes(rng, 50, dtype, degenerate_every=7)
    out = box_iou(a, b)
    assert out.dtype == dtype and out.shape == (70, 50)
    np.testing.assert_array_equal(out, B._box_iou_reference(a, b))
    assert (out > 0).mean() > 0.1


def test_box_iou_hand_worked():
    a = np.array([[0, 0, 10, 10]], np.float64)
    cases = {
        (0, 0, 10, 10): 1.0,                 # identical
        (20, 20, 30, 30): 0.0,               # disjoint
        (2, 2, 4, 4): 4 / 100,               # nested
        (10, 0, 20, 10): 0.0,                # touching edges share no area
        (5, 0, 15, 10): 50 / 150,            # half overlap
        (5, 5, 15, 15): 25 / 175,            # corner overlap
    }
    b = np.array(list(cases), np.float64)
    np.testing.assert_allclose(box_iou(a, b)[0], list(cases.values()), rtol=1e-15)


def test_box_iou_degenerate_boxes_are_zero_not_nan():
    point = np.array([[3, 3, 3, 3]], np.float32)
    line = np.array([[0, 3, 10, 3]], np.float32)
    box = np.array([[0, 0, 10, 10]], np.float32)
    tiny = np.array([[0, 0, 1e-25, 1e-25]], np.float32)  # its area rounds to 0
    for a, b in [(point, point), (line, line), (point, box), (line, box), (tiny, tiny)]:
        assert box_iou(a, b)[0, 0] == 0
        assert box_iou(cuda.to_device(a), cuda.to_device(b)).copy_to_host()[0, 0] == 0
        assert B._box_iou_reference(a, b)[0, 0] == 0


def test_box_iou_promotes_mixed_dtypes():
    a = np.array([[0, 0, 2, 2]], np.float32)
    b = np.array([[1, 1, 3, 3]], np.float64)
    out = box_iou(a, b)
    assert out.dtype == np.float64 and out[0, 0] == pytest.approx(1 / 7)
    # torchvision's order: each area in its own box's dtype, then promoted
    a = np.array([[0.1, 0.2, 1.7, 2.9]], np.float32)
    b = np.array([[0.3, 0.1, 2.0, 3.1]], np.float64)
    area_a = np.float64((a[0, 2] - a[0, 0]) * (a[0, 3] - a[0, 1]))  # rounded to float32 first
    inter = (np.float64(a[0, 2]) - 0.3) * (np.float64(a[0, 3]) - np.float64(a[0, 1]))
    expected = inter / (area_a + (2.0 - 0.3) * (3.1 - 0.1) - inter)
    assert box_iou(a, b)[0, 0] == expected == B._box_iou_reference(a, b)[0, 0]
    assert box_iou(b, a)[0, 0] == expected


@settings(max_examples=60, deadline=None)
@given(boxes_strategy(), boxes_strategy())
def test_box_iou_properties(a, b):
    ab, ba = box_iou(a, b), box_iou(b, a)
    np.testing.assert_array_equal(ab, ba.T)
    assert ((ab >= 0) & (ab <= 1)).all()


@settings(max_examples=60, deadline=None)
@given(boxes_strategy(min_size=1e-3))
def test_box_iou_is_one_on_itself(a):
    np.testing.assert_allclose(np.diag(box_iou(a, a)), 1.0, rtol=1e-12)


def test_box_area():
    boxes = np.array([[0, 0, 2, 3], [1, 1, 1, 5]], np.float32)
    out = box_area(boxes)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [6, 0])


def test_box_area_of_boxes_away_from_the_origin():
    boxes = np.array([[1, 2, 4, 8], [-3, 5, 2, 6]], np.float64)  # 3 x 6 and 5 x 1
    np.testing.assert_array_equal(box_area(boxes), [18, 5])


# ---------------------------------------------------------------- clip / remove small

def test_clip_boxes():
    boxes = np.array([[-5, -5, 20, 30], [2, 3, 4, 5], [60, 70, 80, 90]], np.float32)
    out = clip_boxes(boxes, height=40, width=50)
    np.testing.assert_array_equal(out, [[0, 0, 20, 30], [2, 3, 4, 5], [50, 40, 50, 40]])
    assert out.dtype == np.float32
    assert boxes[0, 0] == -5  # input untouched


def test_clip_boxes_class_specific_layout():
    boxes = np.array([[-1, -1, 5, 5, 2, 2, 99, 99]], np.float64)
    np.testing.assert_array_equal(clip_boxes(boxes, 10, 20), [[0, 0, 5, 5, 2, 2, 20, 10]])


def test_clip_boxes_clamps_inf():
    boxes = np.array([[-np.inf, 2, np.inf, 3], [np.inf, -np.inf, np.inf, np.inf]], np.float32)
    np.testing.assert_array_equal(clip_boxes(boxes, 10, 20), [[0, 2, 20, 3], [20, 0, 20, 10]])
    with pytest.raises(ValueError, match=r"clip_boxes: boxes\[0\] = \[inf, 0.0, -inf, 1.0\] has x2 < x1"):
        clip_boxes(np.array([[np.inf, 0, -np.inf, 1]]), 10, 20)


def test_decoded_boxes_that_overflow_are_clipped():
    """torchvision decodes a huge t_x to inf and clamps it to the border; so do we."""
    reference = np.array([[0, 0, 256, 256]], np.float32)
    deltas = np.array([[1e37, -1e37, 0, 0]], np.float32)
    decoded = decode(reference, deltas)
    np.testing.assert_array_equal(decoded, [[np.inf, -np.inf, np.inf, -np.inf]])
    np.testing.assert_array_equal(clip_boxes(decoded, 100, 100), [[100, 0, 100, 0]])


def test_remove_small_boxes():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 1.99, 5], [0, 0, 5, 1.99], [0, 0, 3, 4], [1, 1, 1, 1]], np.float32)
    keep = remove_small_boxes(boxes, 2.0)
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, [0, 3])
    np.testing.assert_array_equal(remove_small_boxes(boxes, 0.0), np.arange(5))


def test_remove_small_boxes_away_from_the_origin():
    # each side measured between its own corners: 3 x 2, 2 x 3, 3 x 1.5
    boxes = np.array([[5, 0, 8, 2], [0, 5, 2, 8], [10, 20, 13, 21.5]], np.float32)
    np.testing.assert_array_equal(remove_small_boxes(boxes, 2.0), [0, 1])


# ---------------------------------------------------------------- encode / decode

def test_encode_hand_worked():
    anchor = np.array([[0, 0, 10, 10]], np.float64)  # centre (5, 5), 10 x 10
    target = np.array([[5, 5, 25, 15]], np.float64)  # centre (15, 10), 20 x 10
    np.testing.assert_allclose(encode(anchor, target), [[1.0, 0.5, math.log(2), 0.0]], rtol=1e-15)
    np.testing.assert_allclose(encode(anchor, target, weights=(10, 10, 5, 5)),
                               [[10.0, 5.0, 5 * math.log(2), 0.0]], rtol=1e-15)
    np.testing.assert_allclose(decode(anchor, np.array([[1.0, 0.5, math.log(2), 0.0]])), target, rtol=1e-15)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_decode_inverts_encode(data):
    n = data.draw(st.integers(1, 6))
    ref = data.draw(boxes_strategy(min_size=1.0, max_n=n))
    tgt = data.draw(boxes_strategy(min_size=1.0, max_n=n))
    n = min(len(ref), len(tgt))
    ref, tgt = ref[:n], tgt[:n]
    # targets more than 62.5x the reference's size are clamped by decode, by design
    ratio = (tgt[:, 2:] - tgt[:, :2]) / (ref[:, 2:] - ref[:, :2])
    if (ratio > 60).any():
        return
    weights = data.draw(st.sampled_from([(1, 1, 1, 1), (10, 10, 5, 5), (1, 2, 3, 4)]))
    deltas = encode(ref, tgt, weights)
    np.testing.assert_allclose(decode(ref, deltas, weights), tgt, rtol=1e-9, atol=1e-9)


def test_decode_inverts_encode_float32():
    rng = np.random.default_rng(1)
    ref = random_boxes(rng, 200, np.float32) + np.float32([0, 0, 1, 1])
    tgt = random_boxes(rng, 200, np.float32) + np.float32([0, 0, 1, 1])
    out = decode(ref, encode(ref, tgt))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, tgt, rtol=1e-5, atol=1e-4)


def test_decode_clamps_log_size_delta():
    ref = np.array([[0, 0, 16, 16]], np.float64)
    out = decode(ref, np.array([[0, 0, 50.0, -3.0]]))
    assert out[0, 2] - out[0, 0] == pytest.approx(1000.0)  # exp(log(1000/16)) * 16
    assert out[0, 3] - out[0, 1] == pytest.approx(16 * math.exp(-3.0))
    assert np.isfinite(decode(ref, np.array([[0, 0, 1e6, 1e6]]))).all()


def test_decode_class_specific_columns():
    rng = np.random.default_rng(2)
    ref = random_boxes(rng, 5, np.float64) + np.array([0, 0, 1, 1])
    deltas = rng.normal(0, 0.5, (5, 12))
    out = decode(ref, deltas, weights=(10, 10, 5, 5))
    assert out.shape == (5, 12)
    for k in range(3):
        np.testing.assert_array_equal(out[:, 4 * k:4 * k + 4],
                                      decode(ref, deltas[:, 4 * k:4 * k + 4], weights=(10, 10, 5, 5)))


def test_decode_dtype_follows_deltas():
    ref = np.array([[0, 0, 4, 4]], np.float64)
    assert decode(ref, np.zeros((1, 4), np.float32)).dtype == np.float32
    assert encode(ref.astype(np.float32), ref.astype(np.float32)).dtype == np.float32


# ---------------------------------------------------------------- empty and bad input

def test_empty_inputs_give_empty_outputs():
    empty = np.zeros((0, 4), np.float32)
    some = np.array([[0, 0, 1, 1]], np.float32)
    assert box_iou(empty, some).shape == (0, 1) and box_iou(some, empty).shape == (1, 0)
    assert box_iou(empty, empty).dtype == np.float32
    assert box_area(empty).shape == (0,)
    assert clip_boxes(empty, 5, 5).shape == (0, 4)
    keep = remove_small_boxes(empty, 1)
    assert keep.shape == (0,) and keep.dtype == np.int64
    assert encode(empty, empty).shape == (0, 4)
    assert decode(empty, np.zeros((0, 8), np.float32)).shape == (0, 8)


GOOD = np.array([[0, 0, 1, 1]], np.float32)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3), np.float32), "shape"),
    (np.zeros(4, np.float32), "2-D"),
    (np.array([[2, 0, 1, 1]], np.float32), "x2 < x1"),
    (np.array([[0, 2, 1, 1]], np.float32), "y2 < y1"),
    (np.array([[0, 0, np.nan, 1]], np.float32), "NaN"),
    (np.array([[0, 0, np.inf, 1]], np.float32), "inf"),
    (np.array([[0, 0, 1, 1]], np.int64), "float"),
])
def test_bad_boxes_raise(bad, message):
    calls = [lambda: box_iou(bad, GOOD), lambda: box_iou(GOOD, bad), lambda: box_area(bad),
             lambda: remove_small_boxes(bad, 1), lambda: encode(bad, GOOD), lambda: decode(bad, GOOD)]
    if message != "inf":  # clip_boxes clamps inf (test_clip_boxes_clamps_inf)
        calls.append(lambda: clip_boxes(bad, 4, 4))
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_bad_arguments_raise():
    two = np.array([[0, 0, 1, 1], [0, 0, 2, 2]], np.float32)
    with pytest.raises(ValueError, match="reference has 1 boxes but target has 2"):
        encode(GOOD, two)
    with pytest.raises(ValueError, match="deltas"):
        decode(GOOD, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="deltas"):
        decode(GOOD, np.zeros((1, 6), np.float32))
    with pytest.raises(ValueError, match="deltas holds NaN"):
        decode(GOOD, np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="zero width or height"):
        encode(np.array([[0, 0, 0, 1]], np.float32), GOOD)
    with pytest.raises(ValueError, match="zero width or height"):
        encode(GOOD, np.array([[0, 0, 1, 0]], np.float32))
    with pytest.raises(ValueError, match="weights"):
        encode(GOOD, GOOD, weights=(1, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        decode(GOOD, np.zeros((1, 4), np.float32), weights=(1, 0, 1, 1))
    with pytest.raises(ValueError, match=r"encode: weights\[0\] = 1e\+39 is out of float32's range"):
        encode(GOOD, GOOD, weights=(1e39, 1, 1, 1))
    with pytest.raises(ValueError, match=r"decode: weights\[1\] = 1e-46 is out of float32's range"):
        decode(GOOD, np.zeros((1, 4), np.float32), weights=(1, 1e-46, 1, 1))
    with pytest.raises(ValueError, match=r"decode: reference in float32 \(the dtype of deltas\) holds NaN or inf"):
        decode(np.array([[0, 0, 1e39, 1]]), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"encode: weights\[2\] must be finite"):
        encode(GOOD, GOOD, weights=(1, 1, 10**400, 1))
    with pytest.raises(ValueError, match="height"):
        clip_boxes(GOOD, -1, 4)
    with pytest.raises(ValueError, match="height must be finite"):
        clip_boxes(GOOD, 10**400, 4)
    per_class = np.tile(GOOD, (3, 2))  # (3, 8)
    per_class[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"clip_boxes: boxes\[:, 4:8\] holds NaN \(first at index \(1, 0\)\)"):
        clip_boxes(per_class, 4, 4)
    with pytest.raises(ValueError, match="box_iou: a must be a plain NumPy array, got a masked array"):
        box_iou(np.ma.masked_invalid(np.array([[0, 0, np.nan, 10.0]])), GOOD)
    with pytest.raises(ValueError, match="min_size"):
        remove_small_boxes(GOOD, float("nan"))


TWO = np.array([[0, 0, 1, 1], [0, 0, 2, 2]], np.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: clip_boxes(GOOD, 4, -1), "clip_boxes: width must be >= 0, got -1"),
    (lambda: clip_boxes(np.zeros((2, 0), np.float32), 4, 4), r"clip_boxes: boxes must have shape \(N, 4\) or \(N, 4\*K\)"),
    (lambda: remove_small_boxes(GOOD, -1.0), "remove_small_boxes: min_size must be >= 0, got -1.0"),
    (lambda: encode(GOOD, GOOD, weights=(1, 1, 1, 1, 1)), r"encode: weights must be 4 numbers \(wx, wy, ww, wh\)"),
    (lambda: decode(GOOD, np.zeros((1, 4), np.float32), weights=(1, 1, -5, 1)), r"decode: weights\[2\] must be > 0"),
    (lambda: encode(TWO, GOOD), "encode: reference has 2 boxes but target has 1"),
    (lambda: decode(TWO, np.zeros((1, 4), np.float32)), "decode: reference has 2 boxes but deltas has 1 rows"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- CUDA (simulator) and PTX

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_cuda_matches_cpu(dtype):
    rng = np.random.default_rng(3)
    a = random_boxes(rng, 20, dtype, degenerate_every=6)
    b = random_boxes(rng, 18, dtype)
    out = box_iou(cuda.to_device(a), cuda.to_device(b))
    assert not isinstance(out, np.ndarray)
    host = out.copy_to_host()
    assert host.dtype == dtype
    np.testing.assert_array_equal(host, box_iou(a, b))


def test_box_iou_cuda_bad_input():
    with pytest.raises(ValueError, match="device arrays"):
        box_iou(cuda.to_device(GOOD), GOOD)
    with pytest.raises(ValueError, match="dtype"):
        box_iou(cuda.to_device(GOOD), cuda.to_device(GOOD.astype(np.float64)))
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou(cuda.to_device(np.array([[2, 0, 1, 1]], np.float32)), cuda.to_device(GOOD))
    with pytest.raises(ValueError, match="NumPy array"):
        encode(cuda.to_device(GOOD), GOOD)
    empty = box_iou(cuda.to_device(np.zeros((0, 4), np.float32)), cuda.to_device(GOOD))
    assert empty.shape == (0, 1)


def test_box_iou_cuda_checks_both_arguments():
    with pytest.raises(ValueError, match=r"box_iou: b\[0\] = \[2.0, 0.0, 1.0, 1.0\] has x2 < x1"):
        box_iou(cuda.to_device(GOOD), cuda.to_device(np.array([[2, 0, 1, 1]], np.float32)))
    with pytest.raises(ValueError, match=r"box_iou: b holds NaN or inf"):
        box_iou(cuda.to_device(GOOD), cuda.to_device(np.array([[0, 0, np.nan, 1]], np.float32)))


def test_kernels_compile_to_ptx():
    assert_compiles_to_ptx([
        ("tinyfrcnn.boxes", "_box_iou_cuda_f32", "void(float32[:, :], float32[:, :], float32[:, :])",
         SAME_ROUNDING_AS_CPU["float32"]),
        ("tinyfrcnn.boxes", "_box_iou_cuda_f64", "void(float64[:, :], float64[:, :], float64[:, :])",
         SAME_ROUNDING_AS_CPU["float64"]),
    ])
