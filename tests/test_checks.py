"""The argument checks every public function shares."""

import re

import numpy as np
import pytest
from numba import cuda

from tinyfrcnn.checks import (NonFiniteValues, as_array, check_finite, check_non_negative_int, check_number, check_positive_int,
                              check_shape, padding_pair)
from tinyfrcnn.im2col import col2im
from tinyfrcnn.roi import roi_align_backward, roi_pool_backward
from tinyfrcnn.rpn import from_anchor_rows


@pytest.mark.parametrize("values", [np.array([1.0, 2.0]), [1.0, 2.0], (3, 4), 5.0, np.zeros((0, 3)), [True]])
def test_check_finite_returns_finite_input_unchanged(values):
    assert check_finite(values, "x", "f") is values


@pytest.mark.parametrize("values, index", [
    (np.array([[1.0, 2.0], [np.inf, 0.0]]), "(1, 0)"),
    ([1.0, float("nan")], "(1,)"),  # a list is checked as the array it makes
    (float("-inf"), "()"),
    (np.array([[0.0, np.nan], [np.inf, -np.inf]]), "(0, 1)"),  # the first in C order, of three
])
def test_check_finite_names_the_first_bad_value(values, index):
    with pytest.raises(NonFiniteValues, match=re.escape(f"f: x holds NaN or inf (first at index {index})")):
        check_finite(values, "x", "f")


def test_check_finite_of_device_arrays_and_bad_arguments():
    bad = np.array([0.0, 1.0, np.nan], np.float32)
    with pytest.raises(NonFiniteValues, match=r"x holds NaN or inf \(first at index \(2,\)\)"):
        check_finite(cuda.to_device(bad), "x")
    with pytest.raises(ValueError, match="f: x must hold numbers, got dtype <U1"):
        check_finite(["a"], "x", "f")
    with pytest.raises(ValueError, match="f: x is not an array"):
        check_finite([[1.0, 2.0], [3.0]], "x", "f")  # ragged


BIG = 10**30


@pytest.mark.parametrize("call, words", [
    (lambda: check_shape((1, 1, BIG, 1), "x_shape", 4, "f"), r"f: x_shape \(1, 1, 10+, 1\) describes an array beyond"),
    # An empty array too: NumPy refuses a shape whose non-zero dimensions overflow.
    (lambda: check_shape((0, 1, 2**62, 4), "x_shape", 4), r"^x_shape \(0, 1, 4611686018427387904, 4\) describes"),
    (lambda: roi_pool_backward(np.zeros((0, 1, 2, 2), np.float32), np.zeros((0, 1, 2, 2), np.int64), (1, 1, BIG, 1)),
     "roi_pool_backward: features_shape"),
    (lambda: roi_align_backward(np.zeros((0, 1, 2, 2), np.float32), np.zeros((0, 5), np.float32), (0, 1, BIG, 1), 1.0),
     "roi_align_backward: features_shape"),
    (lambda: col2im(np.zeros((9, 0, 0), np.float32), (0, 1, BIG, 3), 3, 1, 1), "col2im: x_shape"),
    (lambda: from_anchor_rows(np.zeros((0, 0, 2), np.float32), 3, 0, BIG),
     r"from_anchor_rows: \(N, num_anchors\*D, height, width\) \(0, 6, 0, 10+\)"),
])
def test_shapes_beyond_numpys_limit_are_refused_by_name(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_shapes_within_numpys_limit_pass():
    limit = np.iinfo(np.intp).max // 8
    assert check_shape((0, 1, limit, 1), "x_shape", 4) == (0, 1, limit, 1)
    with pytest.raises(ValueError, match="beyond NumPy's size limit"):
        check_shape((0, 1, limit + 1, 1), "x_shape", 4)
    assert from_anchor_rows(np.zeros((1, 0, 2), np.float32), 3, 0, 2**40).shape == (1, 6, 0, 2**40)
    np.zeros((0, 1, limit, 1), np.float64)  # what the limit promises


def test_check_number_closed_and_open_ends():
    assert check_number(1, "p", low=0, high=1, where="f") == 1.0  # closed ends hold their bound
    assert check_number(0.0, "p", low=0, high=1, where="f") == 0.0
    with pytest.raises(ValueError, match=r"^f: p must be < 1, got 1$"):
        check_number(1, "p", low=0, high=1, high_open=True, where="f")
    with pytest.raises(ValueError, match=r"^f: p must be > 0, got 0.0$"):
        check_number(0.0, "p", low=0, low_open=True, where="f")
    with pytest.raises(ValueError, match=r"^f: p must be finite, got 1000+$"):
        check_number(10**400, "p", where="f")  # beyond float64: not a finite float
    for bad in (np.array(True), np.array("1"), np.array([1.0])):
        with pytest.raises(ValueError, match="f: p must be a number"):
            check_number(bad, "p", where="f")
    assert check_number(np.array(3, np.int8), "p") == 3.0


@pytest.mark.parametrize("call, words", [
    (lambda: check_positive_int(True, "n", "f"), "f: n must be a positive integer, got True"),
    (lambda: check_non_negative_int(False, "n", "f"), "f: n must be a non-negative integer, got False"),
    (lambda: padding_pair(True, "padding", "f"), r"f: padding must be a non-negative integer or pair, got True"),
    (lambda: padding_pair((1, False), "padding", "f"), r"f: padding must be a non-negative integer or pair"),
    (lambda: padding_pair((1, 2, 3), "padding", "f"), r"f: padding must be an int or an \(h, w\) pair, got \(1, 2, 3\)"),
    (lambda: check_shape((1, True, 2, 2), "x_shape", 4, "f"), r"f: x_shape must be a tuple of 4 non-negative ints"),
])
def test_bools_and_wrong_lengths_are_not_integers_or_pairs(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_integers_and_pairs_that_pass():
    assert check_non_negative_int(np.int64(0), "n") == 0 and check_positive_int(1, "n") == 1
    assert padding_pair(0, "padding") == (0, 0) and padding_pair([2, np.int32(1)], "padding") == (2, 1)


def test_arrays_in_the_other_byte_order_are_refused():
    other = np.dtype(np.float64).newbyteorder("S")  # big-endian on this machine, or little on a big-endian one
    with pytest.raises(ValueError, match=re.escape(f"f: x must be in this machine's byte order, got dtype {other.str!r}")):
        as_array(np.arange(3, dtype=other), "x", where="f")
    assert as_array(np.arange(3.0), "x", where="f").dtype.isnative
