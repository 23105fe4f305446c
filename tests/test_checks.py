"""The argument checks every public function shares."""

import re

import numpy as np
import pytest
from numba import cuda

from tinyfrcnn.checks import NonFiniteValues, check_finite


@pytest.mark.parametrize("values", [np.array([1.0, 2.0]), [1.0, 2.0], (3, 4), 5.0, np.zeros((0, 3)), [True]])
def test_check_finite_returns_finite_input_unchanged(values):
    assert check_finite(values, "x", "f") is values


@pytest.mark.parametrize("values, index", [
    (np.array([[1.0, 2.0], [np.inf, 0.0]]), "(1, 0)"),
    ([1.0, float("nan")], "(1,)"),  # a list is checked as the array it makes
    (float("-inf"), "()"),
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
