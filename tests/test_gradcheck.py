"""The gradient checker passes correct backward passes and catches wrong ones."""

import numpy as np
import pytest

from tinyfrcnn.gradcheck import GradCheckResult, check_layer, check_loss, numerical_gradient, relative_error
from tinyfrcnn.layers import Conv2d, Linear, Module, ReLU


class Square(Module):
    """y = x**2, with a switchable bug in backward."""

    def __init__(self, factor=2.0):
        self.factor = factor

    def forward(self, x):
        self.x = x
        return x * x

    def backward(self, grad_out):
        return self.factor * self.x * grad_out


class LinearWrongBias(Linear):
    def backward(self, grad_out):
        dx = super().backward(grad_out)
        self.bias.grad *= 1.01
        return dx


class LinearNanBias(Linear):
    def backward(self, grad_out):
        dx = super().backward(grad_out)
        self.bias.grad[0] = np.nan
        return dx


def test_numerical_gradient_hand_worked_and_restores_x():
    x = np.array([1.0, -2.0, 3.0])
    g = numerical_gradient(lambda z: float(np.sum(z ** 3)), x)
    np.testing.assert_allclose(g, 3 * x ** 2, rtol=1e-8)
    np.testing.assert_array_equal(x, [1.0, -2.0, 3.0])


def test_numerical_gradient_subset_leaves_nan():
    g = numerical_gradient(lambda z: float(np.sum(z ** 2)), np.array([1.0, 2.0, 3.0]), indices=[1])
    assert np.isnan(g[0]) and np.isclose(g[1], 4.0) and np.isnan(g[2])


def test_numerical_gradient_checks_indices_and_f_and_restores_x_when_f_raises():
    f = lambda z: float(np.sum(z ** 2))  # noqa: E731
    x = np.arange(6.0)
    for bad in ([True], [6], [-1], [0.5], [[1]]):
        with pytest.raises(ValueError, match="numerical_gradient: indices must"):
            numerical_gradient(f, x, indices=bad)
    with pytest.raises(ValueError, match="numerical_gradient: f must return a real scalar, got ndarray \\(6,\\)"):
        numerical_gradient(lambda z: z ** 2, x)

    def fails(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        numerical_gradient(fails, x)
    np.testing.assert_array_equal(x, np.arange(6.0))  # the perturbed entry was put back
    assert numerical_gradient(f, np.zeros((0, 3))).shape == (0, 3)


def test_relative_error_values_and_floor():
    np.testing.assert_allclose(relative_error([1.0, 0.0, 1.0, -1.0], [1.0, 0.0, 0.0, 1.0]), [0, 0, 1, 1])
    assert relative_error(0.0, 1e-20) < 1e-11   # both below the floor: absolute, not 1
    assert relative_error(2.0, 2.02) == pytest.approx(0.02 / 4.02)
    with pytest.raises(ValueError, match="relative_error: analytic has shape"):
        relative_error(np.zeros(2), np.zeros(3))


def test_check_layer_passes_a_correct_layer():
    result = check_layer(Square(), np.random.default_rng(0).standard_normal((3, 4)))
    assert result.passed() and result.max_error < 1e-8
    assert "PASS" in str(result)


def test_check_layer_catches_a_wrong_input_gradient():
    result = check_layer(Square(factor=2.001), np.random.default_rng(0).standard_normal((3, 4)))
    assert not result.passed()
    assert result.worst["tensor"] == "input" and len(result.worst["index"]) == 2
    assert "FAIL" in str(result)


def test_check_layer_names_the_wrong_parameter():
    rng = np.random.default_rng(1)
    layer = LinearWrongBias(3, 2, rng=rng).astype(np.float64)
    result = check_layer(layer, rng.standard_normal((4, 3)), rng=rng)
    assert not result.passed()
    assert result.worst["tensor"] == "bias"
    assert result["input"]["error"] < 1e-6 and result["weight"]["error"] < 1e-6


def test_check_layer_fails_on_a_nan_gradient_after_finite_ones():
    rng = np.random.default_rng(1)
    layer = LinearNanBias(3, 2, rng=rng).astype(np.float64)
    result = check_layer(layer, rng.standard_normal((4, 3)), rng=rng)
    assert result["input"]["error"] < 1e-6 and np.isnan(result["bias"]["error"])
    assert result.worst["tensor"] == "bias" and np.isnan(result.max_error)
    assert not result.passed() and not result and "FAIL" in str(result)


def test_worst_prefers_nan_then_inf():
    entries = [{"tensor": t, "error": e} for t, e in [("a", 0.5), ("b", np.inf), ("c", np.nan), ("d", 0.1)]]
    assert GradCheckResult("x", entries).worst["tensor"] == "c"
    assert GradCheckResult("x", entries[:2] + entries[3:]).worst["tensor"] == "b"


def test_check_layer_requires_float64():
    with pytest.raises(ValueError, match="check_layer: parameter weight is float32"):
        check_layer(Conv2d(1, 1, 1), np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="check_layer: x must be float64"):
        check_layer(ReLU(), np.zeros((2, 2), np.float32))


def test_check_layer_samples_subset():
    rng = np.random.default_rng(2)
    conv = Conv2d(2, 3, 3, padding=1, rng=rng).astype(np.float64)
    result = check_layer(conv, rng.standard_normal((1, 2, 6, 6)), rng=rng, samples=5, eps=1e-5)
    assert result.passed(), str(result)


def test_check_loss():
    def good(x):
        return float(np.sum(np.sin(x))), np.cos(x)

    def bad(x):
        return float(np.sum(np.sin(x))), np.cos(x) * 1.001

    x = np.random.default_rng(3).standard_normal(10)
    assert check_loss(good, x).passed()
    result = check_loss(bad, x)
    assert not result.passed() and result.worst["tensor"] == "input"
    with pytest.raises(ValueError, match="check_loss: loss_fn returned a gradient of shape"):
        check_loss(lambda z: (0.0, np.zeros(3)), x)
