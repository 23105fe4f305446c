"""Layers: forward vs naive references, float64 gradient checks, dtypes, bad input."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfrcnn.gradcheck import check_layer
from tinyfrcnn.im2col import _col2im_reference, _im2col_reference, _valid_range, col2im, im2col, output_size
from tinyfrcnn.layers import (
    Conv2d, Flatten, Linear, MaxPool2d, Module, Parameter, ReLU, Sequential,
    _conv2d_reference, _maxpool2d_reference, maxpool2d_backward, maxpool2d_forward,
)

# The layers are piecewise linear, so central differences have no truncation error and
# a larger step only shrinks round-off; 1e-5 keeps small gradients well inside 1e-6.
EPS = 1e-5
TOL = 1e-6


def _float64(layer, rng):
    layer.astype(np.float64)
    for p in layer.parameters():
        p.data += 0.1 * rng.standard_normal(p.shape)
    return layer


# ----------------------------------------------------------------------------- im2col


@pytest.mark.parametrize("kernel,stride,padding,hw", [
    ((3, 3), (1, 1), (1, 1), (6, 7)),
    ((3, 2), (2, 3), (0, 2), (7, 8)),
    ((5, 5), (3, 2), (2, 1), (5, 9)),
    ((1, 1), (2, 2), (0, 0), (5, 5)),
])
def test_im2col_and_col2im_match_references(kernel, stride, padding, hw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3) + hw)
    cols = im2col(x, kernel, stride, padding)
    np.testing.assert_array_equal(cols, _im2col_reference(x, kernel, stride, padding))
    back = col2im(cols, x.shape, kernel, stride, padding)
    np.testing.assert_allclose(back, _col2im_reference(cols, x.shape, kernel, stride, padding), atol=1e-12)


def test_im2col_layout_images_side_by_side():
    # column (n, pos) is the window of image n at output position pos, rows in (c, i, j) order
    x = np.arange(2 * 2 * 4 * 5, dtype=np.float64).reshape(2, 2, 4, 5)
    cols = im2col(x, (3, 3), (1, 1), (0, 0))
    assert cols.shape == (2 * 9, 2, 2 * 3)
    for n in range(2):
        for y in range(2):
            for xo in range(3):
                np.testing.assert_array_equal(cols[:, n, y * 3 + xo], x[n, :, y:y + 3, xo:xo + 3].ravel())


def test_col2im_is_the_adjoint_of_im2col():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 7, 6))
    args = ((3, 3), (2, 1), (1, 2))
    c = rng.standard_normal(im2col(x, *args).shape)
    assert np.isclose(np.sum(im2col(x, *args) * c), np.sum(x * col2im(c, x.shape, *args)))


def test_valid_range_stays_within_the_output():
    # a kernel offset whose windows all lie in the padding must give an empty range inside
    # [0, out_size]: the CPU im2col zeroes positions [0, lo) of each row
    for size in range(4):
        for k in range(1, 8):
            for s in range(1, 5):
                for p in range(6):
                    if k > size + 2 * p:
                        continue
                    out = output_size(size, k, s, p)
                    for j in range(k):
                        lo, hi = _valid_range(j, p, s, size, out)
                        assert 0 <= lo <= hi <= out, (size, k, s, p, j)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 3, 1, 1), (5, 5), (1, 1), (2, 2)),
    ((2, 1, 1, 2), (3, 3), (1, 2), (3, 3)),
    ((1, 2, 0, 3), (2, 3), (1, 1), (1, 0)),
])
def test_im2col_where_whole_windows_lie_in_the_padding(shape, kernel, stride, padding):
    x = np.random.default_rng(2).standard_normal(shape)
    cols = im2col(x, kernel, stride, padding)
    np.testing.assert_array_equal(cols, _im2col_reference(x, kernel, stride, padding))
    np.testing.assert_array_equal(col2im(cols, shape, kernel, stride, padding),
                                  _col2im_reference(cols, shape, kernel, stride, padding))


def test_im2col_reuses_out_only_when_it_can_write_there_safely():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    expected = _im2col_reference(x, (1, 1), (1, 1), (0, 0))  # (1, 1, 16)
    out = np.empty((1, 1, 16))
    assert im2col(x, 1, 1, 0, out=out) is out
    np.testing.assert_array_equal(out, expected)
    read_only = np.zeros((1, 1, 16))
    read_only.flags.writeable = False
    buf = np.arange(40.0)
    overlapping, x_in_buf = buf[1:17].reshape(1, 1, 16), buf[:16].reshape(1, 1, 4, 4)
    for bad, src in [(read_only, x), (overlapping, x_in_buf), (np.zeros((1, 16, 1)), x), (np.zeros((16,)), x),
                     (np.zeros((1, 1, 16), np.float32), x)]:
        before = bad.copy()
        cols = im2col(src, 1, 1, 0, out=bad)
        assert cols is not bad
        np.testing.assert_array_equal(cols, expected)
        np.testing.assert_array_equal(bad, before)


def test_output_size_checks_its_arguments():
    assert output_size(5, 3, 2, 1) == 3
    assert output_size(0, 3, 1, 2) == 2
    for args, match in [((5, 3, 0, 0), "stride must be a positive integer"),
                        ((2, 5, 1, 0), r"kernel 5 is larger than the padded size 2"),
                        ((5.0, 3, 1, 0), "size must be a non-negative integer"),
                        ((5, 3, 1, -1), "padding must be a non-negative integer")]:
        with pytest.raises(ValueError, match=f"output_size: {match}"):
            output_size(*args)


def test_im2col_and_col2im_empty_batch():
    cols = im2col(np.zeros((0, 2, 5, 5)), 3, 1, 1)
    assert cols.shape == (18, 0, 25)
    assert col2im(cols, (0, 2, 5, 5), 3, 1, 1).shape == (0, 2, 5, 5)


@pytest.mark.parametrize("x,args,match", [
    (np.ones((1, 1, 5, 5)), ((9, 9), (1, 1), (0, 0)), r"im2col: kernel \(9, 9\) is larger than the padded input"),
    (np.ones((1, 1, 5, 5)), ((3, 9), (1, 1), (0, 0)), r"im2col: kernel \(3, 9\) is larger than the padded input \(5, 5\)"),
    (np.ones((1, 1, 5, 5)), ((3, 3), (0, 0), (0, 0)), r"im2col: stride must be a positive integer"),
    (np.ones((1, 1, 5, 5)), ((3, 3), (1, 1), (-1, 0)), r"im2col: padding must be a non-negative"),
    (np.ones((1, 1, 5, 5)), ((3, 3, 3), (1, 1), (0, 0)), r"im2col: kernel must be an int or an \(h, w\) pair"),
    (np.ones((1, 1, 5, 5), np.int64), ((3, 3), (1, 1), (0, 0)), r"im2col: x must be float32 or float64, got int64"),
    (np.ones((1, 5, 5)), ((3, 3), (1, 1), (0, 0)), r"im2col: x must be 4-D"),
])
def test_im2col_rejects_bad_arguments(x, args, match):
    with pytest.raises(ValueError, match=match):
        im2col(x, *args)


@pytest.mark.parametrize("cols,x_shape,args,match", [
    (np.ones((9, 1, 1)), (1, 1, 5, 5), ((3, 3), (1, 1), (0, 0)),
     r"col2im: cols must have shape \(9, 1, 9\) \(C\*kh\*kw, N, OH\*OW\) for x_shape \(1, 1, 5, 5\), got \(9, 1, 1\)"),
    (np.ones((9, 1, 9)), (1, 1, 5, 5), ((3, 3), (0, 1), (0, 0)), r"col2im: stride must be a positive integer"),
    (np.ones((9, 1, 9)), (1, 1, 5, 5), ((3, 3), (1, 1), (0, -1)), r"col2im: padding must be a non-negative"),
    (np.ones((81, 1, 1)), (1, 1, 5, 5), ((9, 9), (1, 1), (0, 0)), r"col2im: kernel \(9, 9\) is larger than the padded"),
    (np.ones((9, 1, 9), np.float16), (1, 1, 5, 5), ((3, 3), (1, 1), (0, 0)), r"col2im: cols must be float32 or"),
    (np.ones((9, 9)), (1, 1, 5, 5), ((3, 3), (1, 1), (0, 0)), r"col2im: cols must be 3-D"),
    (np.ones((9, 1, 9)), (1, 5, 5), ((3, 3), (1, 1), (0, 0)), r"col2im: x_shape must be a tuple of 4 non-neg"),
    (np.ones((9, 1, 9)), (1, 1, -5, 5), ((3, 3), (1, 1), (0, 0)), r"col2im: x_shape must be a tuple of 4"),
])
def test_col2im_rejects_bad_arguments(cols, x_shape, args, match):
    with pytest.raises(ValueError, match=match):
        col2im(cols, x_shape, *args)


# ----------------------------------------------------------------------------- Conv2d


def test_conv2d_hand_worked():
    conv = Conv2d(1, 1, 2).astype(np.float64)
    conv.weight.data[...] = [[[[1, 2], [3, 4]]]]
    conv.bias.data[...] = 0.5
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    # cross-correlation, not convolution: top-left = 0*1 + 1*2 + 3*3 + 4*4 + 0.5
    np.testing.assert_array_equal(conv(x), [[[[27.5, 37.5], [57.5, 67.5]]]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cin,cout,k,s,p,hw", [
    (3, 4, 3, 1, 1, (8, 9)),
    (2, 5, (3, 2), (2, 3), (0, 2), (9, 7)),
    (4, 3, 5, 2, 2, (7, 7)),
    (3, 2, 1, 1, 0, (4, 5)),
])
def test_conv2d_forward_matches_reference(dtype, cin, cout, k, s, p, hw):
    rng = np.random.default_rng(2)
    conv = Conv2d(cin, cout, k, s, p, rng=rng)
    conv.bias.data[...] = rng.standard_normal(cout)
    x = rng.standard_normal((2, cin) + hw).astype(dtype)
    out = conv(x)
    assert out.dtype == dtype
    ref = _conv2d_reference(x.astype(np.float64), conv.weight.data.astype(np.float64),
                            conv.bias.data.astype(np.float64), s, p)
    np.testing.assert_allclose(out, ref, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("cin,cout,k,s,p,hw", [
    (2, 3, 3, 1, 1, (5, 6)),
    (2, 3, 3, 2, 1, (7, 8)),        # stride does not divide evenly
    (3, 2, (3, 2), (2, 3), (0, 2), (8, 7)),
    (1, 2, 4, 3, 2, (6, 5)),
    (2, 2, 1, 2, 0, (5, 5)),
])
def test_conv2d_gradients(cin, cout, k, s, p, hw):
    rng = np.random.default_rng(3)
    conv = _float64(Conv2d(cin, cout, k, s, p, rng=rng), rng)
    result = check_layer(conv, rng.standard_normal((2, cin) + hw), rng=rng, eps=EPS)
    assert result.passed(TOL), str(result)
    assert {e["tensor"] for e in result.entries} == {"input", "weight", "bias"}


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3),
       st.integers(0, 2), st.integers(3, 7), st.integers(3, 7), st.integers(0, 2**31 - 1))
def test_conv2d_gradients_random_shapes(cin, cout, k, s, p, h, w, seed):
    rng = np.random.default_rng(seed)
    conv = _float64(Conv2d(cin, cout, k, s, p, rng=rng), rng)
    if k > h + 2 * p or k > w + 2 * p:
        return
    result = check_layer(conv, rng.standard_normal((1, cin, h, w)), rng=rng, eps=EPS)
    assert result.passed(TOL), str(result)


def test_float64_input_with_float32_parameters():
    rng = np.random.default_rng(4)
    conv = Conv2d(2, 3, 3, padding=1, rng=rng)
    x = rng.standard_normal((1, 2, 5, 5))
    out = conv(x)
    assert out.dtype == np.float64 and conv.backward(np.ones_like(out)).dtype == np.float64
    assert conv.weight.grad.dtype == np.float32
    out32 = conv(x.astype(np.float32))
    assert out32.dtype == np.float32 and conv.backward(np.ones_like(out32)).dtype == np.float32


# ----------------------------------------------------------------------------- MaxPool2d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,s,hw", [(2, None, (8, 8)), (2, None, (7, 9)), (3, 2, (7, 8)), ((2, 3), (1, 2), (5, 8))])
def test_maxpool_forward_matches_reference(dtype, k, s, hw):
    x = np.random.default_rng(5).standard_normal((2, 3) + hw).astype(dtype)
    out = MaxPool2d(k, s)(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, _maxpool2d_reference(x, k, k if s is None else s))


@pytest.mark.parametrize("k,s,hw", [(2, None, (6, 6)), (2, None, (7, 9)), (3, 2, (7, 8)), (3, 1, (5, 5))])
def test_maxpool_gradients(k, s, hw):
    rng = np.random.default_rng(6)
    # distinct values at least 1e-3 apart: no ties within the finite-difference step
    x = rng.permutation(np.prod((2, 2) + hw)).reshape((2, 2) + hw) * 1e-3
    result = check_layer(MaxPool2d(k, s), x.astype(np.float64), rng=rng, eps=EPS)
    assert result.passed(TOL), str(result)


def test_maxpool_tie_goes_to_first_maximum():
    x = np.ones((1, 1, 4, 4))
    x[0, 0, 3, 3] = 0.5
    x[0, 0, 2, 2] = 0.5
    pool = MaxPool2d(2)
    pool(x)
    dx = pool.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 3] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, 0], expected)


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), ((2, 3), (1, 2)), (3, 1)])
def test_maxpool_many_ties_route_to_first_maximum(k, s):
    rng = np.random.default_rng(14)
    x = rng.integers(0, 3, (2, 3, 7, 8)).astype(np.float32)  # ties in most windows
    pool = MaxPool2d(k, s)
    out = pool(x)
    g = rng.standard_normal(out.shape).astype(np.float32)
    dx = pool.backward(g)
    (kh, kw), (sh, sw) = pool.kernel_size, pool.stride
    expected = np.zeros_like(x)
    for n, c, y, xo in np.ndindex(out.shape):
        window = x[n, c, y * sh:y * sh + kh, xo * sw:xo * sw + kw]
        i, j = np.unravel_index(np.argmax(window), window.shape)  # np.argmax: first maximum
        expected[n, c, y * sh + i, xo * sw + j] += g[n, c, y, xo]
    np.testing.assert_array_equal(out, _maxpool2d_reference(x, k, s))
    np.testing.assert_allclose(dx, expected, rtol=1e-6)


def test_overlapping_pool_windows_sum_gradients():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0  # the centre is the max of all four 2x2 windows
    pool = MaxPool2d(2, 1)
    pool(x)
    dx = pool.backward(np.ones((1, 1, 2, 2)))
    assert dx[0, 0, 1, 1] == 4 and dx.sum() == 4


def test_maxpool_floor_output_size():
    assert MaxPool2d(2)(np.zeros((1, 1, 7, 5))).shape == (1, 1, 3, 2)
    assert MaxPool2d(3, 2)(np.zeros((1, 1, 8, 8))).shape == (1, 1, 3, 3)


@pytest.mark.parametrize("k,s", [((2, 2), (2, 2)), ((3, 2), (1, 2))])
def test_maxpool2d_backward_function_matches_the_layer(k, s):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 3, 7, 8))
    pool = MaxPool2d(k, s)
    g = rng.standard_normal(pool(x).shape)
    _, argmax = maxpool2d_forward(x, k, s)
    expected = pool.backward(g)
    np.testing.assert_array_equal(maxpool2d_backward(g, argmax, x.shape), expected)
    np.testing.assert_array_equal(maxpool2d_backward(g, argmax.astype(np.int64), list(x.shape), k, s), expected)
    empty = maxpool2d_backward(np.zeros((0, 3) + g.shape[2:]), argmax[:0], (0, 3, 7, 8), k, s)
    assert empty.shape == (0, 3, 7, 8)


_G = np.ones((1, 1, 2, 2), np.float32)
_A = np.array([[[[0, 2], [8, 10]]]], np.int32)  # each 2x2 window's top-left in a 4x4 plane


@pytest.mark.parametrize("grad_out,argmax,x_shape,kw,match", [
    (_G, np.full((1, 1, 2, 2), 10 ** 8, np.int32), (1, 1, 4, 4), {},
     r"maxpool2d_backward: argmax holds indices outside \[0, 16\)"),
    (_G, _A - 1, (1, 1, 4, 4), {}, r"argmax holds indices outside \[0, 16\)"),
    (_G, _A + 6, (1, 1, 4, 4), {}, r"argmax holds indices outside \[0, 16\)"),
    (_G, _A.astype(np.float64), (1, 1, 4, 4), {}, r"argmax must have an integer dtype, got float64"),
    (_G, _A[..., :1], (1, 1, 4, 4), {}, r"maxpool2d_backward: argmax has shape \(1, 1, 2, 1\) but grad_out has"),
    (_G, _A, (2, 1, 4, 4), {}, r"maxpool2d_backward: x_shape \(2, 1, 4, 4\) and grad_out .* same N and C"),
    (_G, _A, (1, 1, 16), {}, r"maxpool2d_backward: x_shape must be a tuple of 4 non-negative ints"),
    (_G, _A, (1, 1, 4, 4), {"kernel": 2}, r"maxpool2d_backward: give both kernel and stride or neither"),
    (_G, _A, (1, 1, 4, 4), {"kernel": 2, "stride": 1}, r"grad_out must have shape \(1, 1, 3, 3\)"),
    (_G, _A, (1, 1, 4, 4), {"kernel": 5, "stride": 1}, r"kernel \(5, 5\) is larger than the input \(4, 4\)"),
    (_G, _A, (1, 1, 4, 4), {"kernel": 2, "stride": 0}, r"maxpool2d_backward: stride must be a positive integer"),
    (_G, np.zeros((1, 1, 2, 2), np.int32), (1, 1, 4, 4), {"kernel": 2, "stride": 2},
     r"maxpool2d_backward: argmax\[0, 0, 0, 1\] = 0 is not in its 2x2 window at row 0, column 2"),
    (_G, np.array([[[[8, 2], [8, 10]]]], np.int32), (1, 1, 4, 4), {"kernel": 2, "stride": 2},
     r"maxpool2d_backward: argmax\[0, 0, 0, 0\] = 8 is not in its 2x2 window at row 0, column 0"),  # a row below
    (_G, np.array([[[[2, 2], [8, 10]]]], np.int32), (1, 1, 4, 4), {"kernel": 2, "stride": 2},
     r"maxpool2d_backward: argmax\[0, 0, 0, 0\] = 2 is not in its 2x2 window at row 0, column 0"),  # a column right
    (_G.astype(np.int32), _A, (1, 1, 4, 4), {}, r"maxpool2d_backward: grad_out must be float32 or float64"),
    (_G, _A.astype(">i4"), (1, 1, 4, 4), {}, r"maxpool2d_backward: argmax must be in this machine's byte order"),
    (_G.astype(">f4"), _A, (1, 1, 4, 4), {}, r"maxpool2d_backward: grad_out must be in this machine's byte order"),
])
def test_maxpool2d_backward_rejects_bad_arguments(grad_out, argmax, x_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        maxpool2d_backward(grad_out, argmax, x_shape, **kw)


# ----------------------------------------------------------------------------- ReLU, Linear, Flatten, Sequential


def test_relu_forward_and_gradient():
    relu = ReLU()
    x = np.array([[-1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(relu(x), [[0, 0, 2]])
    np.testing.assert_array_equal(relu.backward(np.array([[5.0, 5.0, 5.0]])), [[0, 0, 5]])
    rng = np.random.default_rng(7)
    assert check_layer(ReLU(), rng.standard_normal((3, 4, 5)), rng=rng, eps=EPS).passed(TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_forward(dtype):
    rng = np.random.default_rng(8)
    lin = Linear(5, 3, rng=rng)
    lin.bias.data[...] = [1, 2, 3]
    x = rng.standard_normal((4, 5)).astype(dtype)
    out = lin(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, x.astype(np.float64) @ lin.weight.data.T.astype(np.float64) + [1, 2, 3],
                               rtol=1e-5, atol=1e-5)


def test_linear_gradients():
    rng = np.random.default_rng(9)
    result = check_layer(_float64(Linear(6, 4, rng=rng), rng), rng.standard_normal((3, 6)), rng=rng, eps=EPS)
    assert result.passed(TOL), str(result)


def test_flatten_roundtrip():
    f = Flatten()
    x = np.arange(24.0).reshape(2, 3, 4)
    assert f(x).shape == (2, 12)
    assert f.backward(np.ones((2, 12))).shape == (2, 3, 4)
    assert f(np.zeros((3, 1))).shape == (3, 1)
    with pytest.raises(ValueError, match=r"Flatten: x must be \(N, ...\) with at least 2 dimensions"):
        f(np.zeros(5))


def test_sequential_gradients_and_container():
    rng = np.random.default_rng(10)
    model = Sequential(Conv2d(2, 3, 3, padding=1, rng=rng), ReLU(), MaxPool2d(2),
                       Conv2d(3, 2, 3, stride=2, padding=1, rng=rng), ReLU(), Flatten(), Linear(8, 3, rng=rng))
    assert len(model) == 7 and isinstance(model[3], Conv2d) and len(model[:2]) == 2
    assert len(model.parameters()) == 6
    assert [n for n, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]
    _float64(model, rng)
    result = check_layer(model, rng.standard_normal((2, 2, 7, 8)), rng=rng, eps=EPS)
    assert result.passed(TOL), str(result)


def test_parameter_gradients_accumulate():
    rng = np.random.default_rng(11)
    for layer, x in [(Conv2d(2, 3, 3, rng=rng), rng.standard_normal((2, 2, 5, 5))),
                     (Linear(4, 3, rng=rng), rng.standard_normal((2, 4)))]:
        layer.astype(np.float64)
        out = layer(x)
        g = rng.standard_normal(out.shape)
        layer.backward(g)
        once = [p.grad.copy() for p in layer.parameters()]
        layer.backward(g)
        for p, g1 in zip(layer.parameters(), once):
            np.testing.assert_allclose(p.grad, 2 * g1)
        layer.zero_grad()
        assert all(not p.grad.any() for p in layer.parameters())


def test_he_init_statistics_and_rng():
    conv = Conv2d(64, 128, 3, rng=np.random.default_rng(0))
    assert conv.weight.data.dtype == np.float32 and conv.weight.shape == (128, 64, 3, 3)
    assert abs(conv.weight.data.std() - np.sqrt(2 / (64 * 9))) < 0.01 * np.sqrt(2 / (64 * 9)) * 5
    assert not conv.bias.data.any()
    a, b = Linear(10, 5, rng=np.random.default_rng(3)), Linear(10, 5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)


def test_astype_and_parameter():
    lin = Linear(3, 2)
    assert lin.astype(np.float64) is lin
    assert all(p.data.dtype == np.float64 and p.grad.dtype == np.float64 for p in lin.parameters())
    p = Parameter(np.ones(3))
    p.grad += 1
    p.zero_grad()
    assert p.grad.shape == (3,) and not p.grad.any()


def test_relu_keeps_negative_zero_as_torch():
    x = np.array([-0.0, 0.0, -1.0, 2.0], np.float32)
    np.testing.assert_array_equal(np.signbit(ReLU()(x)), [True, False, False, False])
    relu = ReLU()
    out = _host(relu(cuda.to_device(x)))
    np.testing.assert_array_equal(np.signbit(out), [True, False, False, False])
    # device input is not scanned for NaN: it passes forward and backward, as in torch
    out = _host(relu(cuda.to_device(np.array([np.nan, -1.0], np.float32))))
    grad = _host(relu.backward(cuda.to_device(np.array([3.0, 3.0], np.float32))))
    np.testing.assert_array_equal(out, [np.nan, 0.0])
    np.testing.assert_array_equal(grad, [3.0, 0.0])


def test_relu_keeps_any_shape():
    relu = ReLU()
    for x in (np.array(-2.0), np.array(3.0), np.zeros((2, 0, 3)), np.arange(-3.0, 3.0).reshape(2, 3)[:, ::2]):
        out = relu(x)
        assert out.shape == x.shape
        np.testing.assert_array_equal(out, np.maximum(x, 0))
        assert relu.backward(np.ones_like(x)).shape == x.shape


def test_empty_batch():
    conv, pool, lin = Conv2d(2, 3, 3, padding=1), MaxPool2d(2), Linear(4, 2)
    out = conv(np.zeros((0, 2, 6, 6), np.float32))
    assert out.shape == (0, 3, 6, 6)
    assert conv.backward(out).shape == (0, 2, 6, 6)
    assert pool(np.zeros((0, 2, 6, 6))).shape == (0, 2, 3, 3)
    assert lin(np.zeros((0, 4))).shape == (0, 2)
    assert lin.backward(np.zeros((0, 2))).shape == (0, 4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,x,match", [
    (lambda: Conv2d(3, 4, 3), np.zeros((3, 8, 8)), r"Conv2d: x must be 4-D.*\(3, 8, 8\)"),
    (lambda: Conv2d(3, 4, 3), np.zeros((1, 2, 8, 8)), r"Conv2d: x has 2 channels.*in_channels=3"),
    (lambda: Conv2d(3, 4, 5), np.zeros((1, 3, 4, 4)), r"Conv2d: kernel_size \(5, 5\) is larger than the padded input \(4, 4\)"),
    (lambda: Conv2d(3, 4, 3), np.zeros((1, 3, 8, 8), dtype=np.int64), r"Conv2d: x must be float32 or float64, got int64"),
    (lambda: Conv2d(1, 1, 1), np.array([[[[0.0, np.nan]]]]), r"Conv2d: x holds NaN or inf \(first at index \(0, 0, 0, 1\)\)"),
    (lambda: Conv2d(1, 1, 1), np.array([[[[np.inf]]]]), r"Conv2d: x holds NaN or inf"),
    (lambda: MaxPool2d(2), np.zeros((2, 8, 8)), r"MaxPool2d: x must be 4-D"),
    (lambda: MaxPool2d(3), np.zeros((1, 1, 2, 5)), r"MaxPool2d: kernel_size \(3, 3\) is larger than the input"),
    (lambda: MaxPool2d(2), np.zeros((1, 1, 4, 4), dtype=np.int32), r"MaxPool2d: x must be float32 or float64"),
    (lambda: Linear(4, 2), np.zeros((3, 5)), r"Linear: x has 5 features \(shape \(3, 5\)\) but in_features=4"),
    (lambda: Linear(4, 2), np.zeros(4), r"Linear: x must be 2-D"),
    (lambda: Linear(4, 2), np.full((1, 4), np.nan), r"Linear: x holds NaN"),
    (lambda: ReLU(), np.array([1, 2]), r"ReLU: x must be float32 or float64"),
    (lambda: ReLU(), np.array([np.nan]), r"ReLU: x holds NaN"),
])
def test_bad_forward_input(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("args,match", [
    ((np.zeros((1, 1, 5, 5)), (0, 0), (1, 1)), r"maxpool2d_forward: kernel_size must be a positive integer, got 0"),
    ((np.zeros((1, 1, 5, 5)), 2, (0, 1)), r"maxpool2d_forward: stride must be a positive integer, got 0"),
    ((np.zeros((1, 1, 5, 5)), (6, 5), 1), r"maxpool2d_forward: kernel_size \(6, 5\) is larger than the input \(5, 5\)"),
    ((np.zeros((1, 5, 5)), 2, 2), r"maxpool2d_forward: x must be 4-D"),
    ((np.zeros((1, 1, 4, 4), np.int64), 2, 2), r"maxpool2d_forward: x must be float32 or float64"),
    ((np.full((1, 1, 4, 4), np.nan), 2, 2), r"maxpool2d_forward: x holds NaN"),
])
def test_maxpool2d_forward_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        maxpool2d_forward(*args)


def test_maxpool2d_forward_takes_int_kernel_and_stride():
    x = np.arange(16.0).reshape(1, 1, 4, 4)  # (N, C, H, W)
    out, argmax = maxpool2d_forward(x, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(argmax[0, 0], [[5, 7], [13, 15]])


@pytest.mark.parametrize("layer", [Conv2d(1, 1, 1), MaxPool2d(2), Linear(2, 2), ReLU(), Flatten()],
                         ids=lambda l: type(l).__name__)
def test_backward_before_forward(layer):
    with pytest.raises(ValueError, match=f"{type(layer).__name__}: backward called before forward"):
        layer.backward(np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("layer,x", [
    (Conv2d(1, 2, 3, padding=1), np.zeros((1, 1, 4, 4))),
    (MaxPool2d(2), np.zeros((1, 1, 4, 4))),
    (Linear(3, 2), np.zeros((2, 3))),
    (ReLU(), np.zeros((2, 3))),
    (Flatten(), np.zeros((2, 3, 2))),
], ids=lambda v: type(v).__name__)
def test_backward_wrong_grad_shape(layer, x):
    layer(x)
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}: grad_out must have the forward output's shape"):
        layer.backward(np.zeros((9, 9)))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="Conv2d: in_channels must be a positive integer"):
        Conv2d(0, 2, 3)
    with pytest.raises(ValueError, match="Conv2d: kernel_size must be an int or an"):
        Conv2d(1, 2, (3, 3, 3))
    with pytest.raises(ValueError, match="Conv2d: padding must be a non-negative"):
        Conv2d(1, 2, 3, padding=-1)
    with pytest.raises(ValueError, match="MaxPool2d: stride must be a positive integer"):
        MaxPool2d(2, 0)
    with pytest.raises(ValueError, match="Linear: out_features must be a positive integer"):
        Linear(2, 2.5)
    # Weights beyond NumPy's size limit are refused by name, before any allocation.
    with pytest.raises(ValueError, match=r"Conv2d: weight \(out_channels, in_channels, kh, kw\) \(10+, 1, 3, 3\)"):
        Conv2d(1, 10**30, 3)
    with pytest.raises(ValueError, match=r"Linear: weight \(out_features, in_features\) \(2, 10+\)"):
        Linear(10**30, 2)
    with pytest.raises(ValueError, match="Conv2d: rng must be a numpy.random.Generator"):
        Conv2d(1, 2, 3, rng=5)
    with pytest.raises(ValueError, match="Linear: rng must be a numpy.random.Generator"):
        Linear(2, 3, rng=np.random.RandomState(0))  # the legacy API draws other numbers
    with pytest.raises(ValueError, match="Sequential: layer 1 must be a Module"):
        Sequential(ReLU(), "relu")
    relu = ReLU()
    with pytest.raises(ValueError, match="Sequential: layers 0 and 2 are the same ReLU object"):
        Sequential(relu, Linear(2, 2), relu)  # the second forward would overwrite the first's state
    Sequential(ReLU(), Linear(2, 2), ReLU())  # equal but distinct layers are fine
    with pytest.raises(ValueError, match="astype: dtype must be float32 or float64"):
        Linear(2, 2).astype(np.int32)


def test_module_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Module()(np.zeros(1))


# ----------------------------------------------------------------------------- skipping the input gradient


def test_conv_without_input_grad_returns_none_and_same_parameter_grads():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 2, 6, 5))
    full = Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(1)).astype(np.float64)
    skip = Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(1), needs_input_grad=False).astype(np.float64)
    g = rng.standard_normal(full(x).shape)
    skip(x)
    assert full.backward(g) is not None and skip.backward(g) is None
    for a, b in zip(full.parameters(), skip.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad)
    assert "needs_input_grad=False" in repr(skip)
    with pytest.raises(ValueError, match="Conv2d: needs_input_grad must be True or False"):
        Conv2d(1, 1, 1, needs_input_grad="no")


def test_sequential_stops_at_a_layer_without_input_grad():
    rng = np.random.default_rng(13)
    model = Sequential(Conv2d(1, 2, 3, padding=1, rng=rng, needs_input_grad=False), ReLU())
    out = model(rng.standard_normal((1, 1, 4, 4)))
    assert model.backward(np.ones_like(out)) is None and model[0].weight.grad.any()
    bad = Sequential(Conv2d(1, 1, 1, rng=rng), Conv2d(1, 1, 1, rng=rng, needs_input_grad=False))
    out = bad(np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="Sequential: layer 1 returned no input gradient"):
        bad.backward(np.ones_like(out))


# ----------------------------------------------------------------------------- CUDA (simulator on small inputs)

from numba import cuda  # noqa: E402

from tests.ptx import assert_compiles_to_ptx  # noqa: E402
from tinyfrcnn.device import is_device_array  # noqa: E402
from tinyfrcnn.backbone import make_backbone  # noqa: E402
from tinyfrcnn.layers import _to_batch_major, _to_channel_major  # noqa: E402


def _host(a):
    return None if a is None else a.copy_to_host()


def test_cuda_im2col_and_col2im_match_cpu():
    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 2, 5, 6)).astype(np.float32)
    args = ((3, 2), (2, 1), (1, 1))
    cols = im2col(x, *args)
    dcols = im2col(cuda.to_device(x), *args)
    np.testing.assert_array_equal(_host(dcols), cols)
    c = rng.standard_normal(cols.shape).astype(np.float32)
    np.testing.assert_array_equal(_host(col2im(cuda.to_device(c), x.shape, *args)), col2im(c, x.shape, *args))


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((1, 2, 7, 5), (3, 3), (1, 1), (1, 1)),
    ((2, 1, 6, 7), (2, 3), (3, 2), (0, 1)),
    ((1, 2, 5, 5), (1, 1), (2, 2), (0, 0)),
    ((1, 1, 4, 6), (3, 2), (1, 3), (3, 2)),  # whole windows in the padding
    ((1, 1, 3, 3), (5, 5), (1, 1), (2, 2)),  # a kernel larger than the image
    ((1, 2, 8, 3), (2, 2), (4, 1), (1, 0)),  # strides larger than the kernel: pixels in no window
])
def test_cuda_im2col_and_col2im_match_cpu_to_the_bit(shape, kernel, stride, padding):
    # col2im adds up to kh*kw terms per pixel: float64 random values make any change in
    # their order show in the last bits.
    rng = np.random.default_rng(22)
    x = rng.standard_normal(shape)
    cols = im2col(x, kernel, stride, padding)
    np.testing.assert_array_equal(_host(im2col(cuda.to_device(x), kernel, stride, padding)), cols)
    c = rng.standard_normal(cols.shape)
    np.testing.assert_array_equal(_host(col2im(cuda.to_device(c), shape, kernel, stride, padding)),
                                  col2im(c, shape, kernel, stride, padding))


def test_cuda_im2col_reuses_only_a_contiguous_out_on_the_same_side():
    x = np.arange(16.0, dtype=np.float32).reshape(1, 1, 4, 4)
    expected = _im2col_reference(x, (1, 1), (1, 1), (0, 0))  # (1, 1, 16)
    out = cuda.to_device(np.zeros((1, 1, 16), np.float32))
    assert im2col(cuda.to_device(x), 1, 1, 0, out=out) is out
    np.testing.assert_array_equal(_host(out), expected)
    strided = cuda.to_device(np.zeros((1, 1, 32), np.float32))[:, :, ::2]
    host_out = np.zeros((1, 1, 16), np.float32)
    for src, bad in [(cuda.to_device(x), strided), (cuda.to_device(x), host_out),
                     (x, cuda.to_device(np.zeros((1, 1, 16), np.float32)))]:
        cols = im2col(src, 1, 1, 0, out=bad)
        assert cols is not bad and is_device_array(cols) == is_device_array(src)
        np.testing.assert_array_equal(_host(cols) if is_device_array(cols) else cols, expected)
        assert not (_host(bad) if is_device_array(bad) else bad).any()


def test_cuda_im2col_and_col2im_refuse_strided_device_input():
    with pytest.raises(ValueError, match="im2col: x must be C-contiguous on the device"):
        im2col(cuda.to_device(np.zeros((1, 1, 4, 8), np.float32))[..., ::2], 1, 1, 0)
    with pytest.raises(ValueError, match="col2im: cols must be C-contiguous on the device"):
        col2im(cuda.to_device(np.zeros((1, 1, 32), np.float32))[..., ::2], (1, 1, 4, 4), 1, 1, 0)


def _small_net(rng):
    # few matrix products: the simulator runs every thread of every block in Python
    return Sequential(Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), rng=rng), ReLU(), MaxPool2d(2),
                      Flatten(), Linear(3 * 2 * 2, 3, rng=rng))


def _run_both(model, x, g):
    """(out, dx, grads) on the CPU, then on the device (model moved there and back)."""
    model.zero_grad()
    cpu = (model(x), model.backward(g), [p.grad.copy() for p in model.parameters()])
    model.zero_grad()
    model.to("cuda")
    out = model(cuda.to_device(x))
    dx = model.backward(cuda.to_device(g))
    gpu = (_host(out), _host(dx), [_host(p.grad) for p in model.parameters()])
    model.to("cpu")
    return cpu, gpu


@pytest.mark.parametrize("o,n,p", [(3, 2, 5), (1, 4, 1), (2, 0, 3)])
def test_batch_and_channel_major_match_numpy(o, n, p):
    rng = np.random.default_rng(21)
    y = rng.standard_normal((o, n, p)).astype(np.float32)  # (O, N, P)
    bias = rng.standard_normal(o).astype(np.float32)
    expected = y.transpose(1, 0, 2) + bias[None, :, None]  # (N, O, P)
    np.testing.assert_array_equal(_to_batch_major(y, bias, False), expected)
    got = _to_batch_major(cuda.to_device(y), cuda.to_device(bias), True)
    np.testing.assert_array_equal(_host(got), expected)
    g = rng.standard_normal((n, o, p)).astype(np.float32)  # (N, O, P)
    np.testing.assert_array_equal(_to_channel_major(g, np.empty((o, n, p), np.float32), False),
                                  g.transpose(1, 0, 2))
    got = _to_channel_major(cuda.to_device(g), cuda.device_array((o, n, p), np.float32), True)
    np.testing.assert_array_equal(_host(got), g.transpose(1, 0, 2))


@pytest.mark.parametrize("chunk", [4, 5, 4096], ids=["chunks", "uneven-chunks", "one-block"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_gradient_sums_rows_or_columns_in_chunks(monkeypatch, chunk, dtype):
    # db[o] += sum over a channel's gradients: rows of a conv's (O, N*P), columns of a
    # linear layer's (N, O); a channel longer than BIAS_CHUNK takes several blocks,
    # whose sums a second kernel adds up. Integers: every order of the sum is exact.
    from tinyfrcnn import layers

    monkeypatch.setattr(layers, "BIAS_CHUNK", chunk)
    if numba.config.ENABLE_CUDASIM:
        monkeypatch.setattr(layers, "BIAS_THREADS", 2)  # the simulator's threads are Python threads
    rng = np.random.default_rng(25)
    for rows, shape in [(True, (3, 13)), (False, (13, 3)), (True, (2, 1)), (False, (1, 4)), (True, (3, 0))]:
        g = rng.integers(-8, 9, shape).astype(dtype)
        start = rng.integers(-8, 9, shape[0] if rows else shape[1]).astype(dtype)  # gradients so far
        expected = start + g.sum(axis=1 if rows else 0)
        gpu = Parameter(np.zeros_like(start)).to("cuda")
        gpu.grad = cuda.to_device(start)
        layers._accumulate_bias_grad(gpu, cuda.to_device(g), rows)
        np.testing.assert_array_equal(_host(gpu.grad), expected, err_msg=str(shape))
        cpu = Parameter(np.zeros_like(start))
        cpu.grad[...] = start
        layers._accumulate_bias_grad(cpu, g, rows)
        np.testing.assert_array_equal(cpu.grad, expected, err_msg=str(shape))


def test_cuda_layers_match_cpu():
    rng = np.random.default_rng(21)
    model = _small_net(rng)
    for p in model.parameters():
        p.data += 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    x = rng.standard_normal((2, 2, 8, 6)).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    (out, dx, grads), (dout, ddx, dgrads) = _run_both(model, x, g)
    np.testing.assert_allclose(dout, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddx, dx, rtol=1e-5, atol=1e-6)
    for name, a, b in zip([n for n, _ in model.named_parameters()], grads, dgrads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def test_cuda_backbone_matches_cpu():
    rng = np.random.default_rng(22)
    model = make_backbone(channels=(3, 4, 4, 2), rng=rng)
    for p in model.parameters():
        p.data += 0.1 * rng.standard_normal(p.shape).astype(np.float32)  # non-zero biases
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    g = rng.standard_normal((1, 2, 1, 1)).astype(np.float32)
    (out, dx, grads), (dout, ddx, dgrads) = _run_both(model, x, g)
    np.testing.assert_allclose(dout, out, rtol=1e-5, atol=1e-6)
    assert dx is None and ddx is None  # the first conv skips the image gradient
    for a, b in zip(grads, dgrads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_cuda_maxpool_ties_and_overlaps_match_cpu():
    x = np.ones((1, 1, 4, 4), np.float32)
    x[0, 0, 2, 2] = x[0, 0, 3, 3] = 0.5
    for pool, g in [(MaxPool2d(2), np.array([[[[1, 2], [3, 4]]]], np.float32)),
                    (MaxPool2d(3, 1), np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2) + 1)]:
        out, dx = pool(x), pool.backward(g)
        dout = pool(cuda.to_device(x))
        np.testing.assert_array_equal(_host(dout), out)
        np.testing.assert_array_equal(_host(pool.backward(cuda.to_device(g))), dx)
    # One input wins several windows: the device sums their gradients as the CPU does.
    centre = np.zeros((1, 1, 3, 3), np.float32)
    centre[0, 0, 1, 1] = 1.0  # the max of all four 2x2 windows
    pool = MaxPool2d(2, 1)
    pool(cuda.to_device(centre))
    dx = _host(pool.backward(cuda.to_device(np.array([[[[1, 2], [3, 4]]]], np.float32))))
    assert dx[0, 0, 1, 1] == 10 and dx.sum() == 10
    rng = np.random.default_rng(27)
    x = rng.integers(0, 3, size=(2, 3, 7, 6)).astype(np.float32)  # many ties and shared winners
    pool = MaxPool2d(3, 1)
    g = rng.standard_normal(pool(x).shape).astype(np.float32)
    dx = pool.backward(g)
    pool(cuda.to_device(x))
    np.testing.assert_allclose(_host(pool.backward(cuda.to_device(g))), dx, rtol=1e-6, atol=1e-6)


def test_cuda_maxpool2d_backward_checks_its_arguments():
    x = np.random.default_rng(26).standard_normal((1, 2, 4, 4)).astype(np.float32)
    _, argmax = maxpool2d_forward(x, (2, 2), (2, 2))
    g = np.ones((1, 2, 2, 2), np.float32)
    dx = maxpool2d_backward(cuda.to_device(g), cuda.to_device(argmax), x.shape, 2, 2)
    np.testing.assert_array_equal(_host(dx), maxpool2d_backward(g, argmax, x.shape))
    with pytest.raises(ValueError, match=r"maxpool2d_backward: argmax holds indices outside \[0, 16\)"):
        maxpool2d_backward(cuda.to_device(g), cuda.to_device(argmax + 10 ** 8), x.shape, 2, 2)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: argmax\[0, 0, 0, 0\] = 15 is not in its"):
        maxpool2d_backward(cuda.to_device(g), cuda.to_device(np.full_like(argmax, 15)), x.shape, 2, 2)
    with pytest.raises(ValueError, match="maxpool2d_backward: give both kernel and stride or neither "
                                         r"\(device arrays need both\)"):
        maxpool2d_backward(cuda.to_device(g), cuda.to_device(argmax), x.shape)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: arguments \['argmax'\] are CUDA device arrays"):
        maxpool2d_backward(g, cuda.to_device(argmax), x.shape, 2, 2)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: argmax has shape \(1, 2, 2, 1\)"):
        maxpool2d_backward(cuda.to_device(g), cuda.to_device(argmax[..., :1].copy()), x.shape, 2, 2)
    with pytest.raises(ValueError, match=r"maxpool2d_backward: x_shape \(3, 2, 4, 4\) and grad_out"):
        maxpool2d_backward(cuda.to_device(g), cuda.to_device(argmax), (3, 2, 4, 4), 2, 2)


def test_cuda_conv_without_input_grad_and_accumulation():
    rng = np.random.default_rng(23)
    conv = Conv2d(1, 2, 2, rng=rng, needs_input_grad=False).to("cuda")
    x = cuda.to_device(rng.standard_normal((1, 1, 3, 3)).astype(np.float32))
    g = cuda.to_device(np.ones((1, 2, 2, 2), np.float32))
    conv(x)
    assert conv.backward(g) is None
    once = _host(conv.bias.grad)
    conv.backward(g)
    np.testing.assert_array_equal(_host(conv.bias.grad), 2 * once)
    np.testing.assert_array_equal(once, [4, 4])
    conv.zero_grad()
    assert not _host(conv.weight.grad).any() and not _host(conv.bias.grad).any()


def test_module_to_round_trip_and_astype_on_device():
    lin = Linear(3, 2, rng=np.random.default_rng(24))
    before = [p.data.copy() for p in lin.parameters()]
    assert lin.to("cuda") is lin
    assert all(p.device == "cuda" and is_device_array(p.data) and is_device_array(p.grad)
               for p in lin.parameters())
    assert "device=cuda" in repr(lin.weight)
    lin.astype(np.float64)
    assert all(p.device == "cuda" and p.data.dtype == np.float64 for p in lin.parameters())
    lin.to("cpu").astype(np.float32)
    for p, b in zip(lin.parameters(), before):
        assert isinstance(p.data, np.ndarray) and isinstance(p.grad, np.ndarray)
        np.testing.assert_array_equal(p.data, b)
    with pytest.raises(ValueError, match="device must be one of"):
        lin.to("tpu")
    p = Parameter(cuda.to_device(np.ones(3, np.float32)))
    p.accumulate(cuda.to_device(np.full(3, 2, np.float32)))
    np.testing.assert_array_equal(_host(p.grad), [2, 2, 2])
    with pytest.raises(ValueError, match="Parameter.accumulate: g must be a device array"):
        p.accumulate(np.ones(3, np.float32))


def test_cuda_bad_input():
    rng = np.random.default_rng(25)
    conv = Conv2d(1, 2, 3, padding=1, rng=rng)
    x = cuda.to_device(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d: arguments \['x'\] are CUDA device arrays but \['weight', 'bias'\]"):
        conv(x)
    conv.to("cuda")
    with pytest.raises(ValueError, match="Conv2d: x is float64 but weight is float32"):
        conv(cuda.to_device(np.zeros((1, 1, 4, 4))))
    with pytest.raises(ValueError, match=r"Conv2d: x must be 4-D"):
        conv(cuda.to_device(np.zeros((1, 4, 4), np.float32)))
    with pytest.raises(ValueError, match=r"Conv2d: arguments \['weight', 'bias'\] are CUDA device arrays but \['x'\]"):
        conv(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="ReLU: x must be float32 or float64, got int32"):
        ReLU()(cuda.to_device(np.zeros(3, np.int32)))
    relu = ReLU()
    relu(cuda.to_device(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="ReLU: grad_out must be a CUDA device array"):
        relu.backward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="ReLU: grad_out must have the forward output's shape"):
        relu.backward(cuda.to_device(np.zeros((3, 2), np.float32)))
    with pytest.raises(ValueError, match="ReLU: grad_out must be float32 on the device, got float64"):
        relu.backward(cuda.to_device(np.zeros((2, 3))))
    pool = MaxPool2d(2)
    pool(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="MaxPool2d: grad_out must be a NumPy array"):
        pool.backward(cuda.to_device(np.zeros((1, 1, 1, 1), np.float32)))


def test_cuda_empty_batch():
    conv = Conv2d(2, 3, 3, padding=1).to("cuda")
    out = conv(cuda.to_device(np.zeros((0, 2, 6, 6), np.float32)))
    assert out.shape == (0, 3, 6, 6) and conv.backward(out).shape == (0, 2, 6, 6)
    lin = Linear(4, 2).to("cuda")
    out = lin(cuda.to_device(np.zeros((0, 4), np.float32)))
    assert out.shape == (0, 2) and lin.backward(out).shape == (0, 4)


def test_cuda_kernels_compile_to_ptx():
    f4, f3, f2, f1 = "float32[:,:,:,::1]", "float32[:,:,::1]", "float32[:,::1]", "float32[::1]"
    i4 = "int32[:,:,:,::1]"
    ints = ", ".join(["int64"] * 8)
    assert_compiles_to_ptx([
        ("tinyfrcnn.im2col", "_im2col_cuda", f"void({f4}, {ints}, {f3})"),
        ("tinyfrcnn.im2col", "_col2im_cuda", f"void({f3}, {ints}, {f4})"),
        ("tinyfrcnn.layers", "_fill_cuda", f"void({f1}, int64)"),
        ("tinyfrcnn.layers", "_add_cuda", f"void({f1}, {f1})"),
        ("tinyfrcnn.layers", "_bias_add_cuda", f"void({f3}, {f1})"),
        ("tinyfrcnn.layers", "_batch_major_cuda", f"void({f3}, {f1}, {f3})"),
        ("tinyfrcnn.layers", "_channel_major_cuda", f"void({f3}, {f3})"),
        ("tinyfrcnn.layers", "_bias_grad_cuda", f"void({f2}, boolean, int64, {f2}, {f1})"),
        ("tinyfrcnn.layers", "_bias_grad_cuda",
         "void(float64[:,::1], boolean, int64, float64[:,::1], float64[::1])"),
        ("tinyfrcnn.layers", "_bias_grad_finish_cuda", f"void({f2}, {f1})"),
        ("tinyfrcnn.layers", "_relu_forward_cuda", f"void({f1}, {f1})"),
        ("tinyfrcnn.layers", "_relu_backward_cuda", f"void({f1}, {f1}, {f1})"),
        ("tinyfrcnn.layers", "_maxpool2d_forward_cuda", f"void({f4}, int64, int64, int64, int64, {f4}, {i4})"),
        ("tinyfrcnn.layers", "_maxpool2d_backward_cuda", f"void({f4}, {i4}, int64, int64, int64, int64, {f4})"),
    ])


# ---------------------------------------------------------------- parameters packed on the device

from tinyfrcnn.layers import DeviceStore, packed_runs, packed_store  # noqa: E402


class Three(Module):
    def __init__(self, dtype=np.float32, seed=0):
        rng = np.random.default_rng(seed)
        self.a = Parameter(rng.standard_normal((3, 5)).astype(dtype))
        self.b = Parameter(rng.standard_normal(7).astype(dtype))
        self.c = Parameter(rng.standard_normal((2, 70)).astype(dtype))


def test_to_cuda_packs_parameters_into_one_store():
    host, dev = Three(), Three()
    for m in (host, dev):
        m.a.grad[...] = 2.0
    dev.to("cuda")
    store = packed_store(dev.parameters())
    assert store is not None and all(p.store is store for p in dev.parameters())
    assert store.offsets == [0, 64, 128] and store.data.size == 128 + 192  # 140 elements round up to 192
    for p, q in zip(host.parameters(), dev.parameters()):
        np.testing.assert_array_equal(q.data.copy_to_host(), p.data)
        np.testing.assert_array_equal(q.grad.copy_to_host(), p.grad)  # grads move too
    gaps = np.ones(store.data.size, bool)
    for p, off in zip(dev.parameters(), store.offsets):
        gaps[off:off + p.data.size] = False
    assert not store.data.copy_to_host()[gaps].any() and not store.grad.copy_to_host()[gaps].any()
    assert packed_store(dev.parameters()[:2]) is None  # only the whole store, in order
    assert packed_store(dev.parameters()[::-1]) is None


def test_to_cuda_keeps_each_parameters_dtype_when_they_differ():
    m = Three()
    m.b.data, m.b.grad = m.b.data.astype(np.float64), m.b.grad.astype(np.float64)
    before = [p.data.copy() for p in m.parameters()]
    m.to("cuda")
    assert packed_store(m.parameters()) is None  # one store holds one dtype
    for p, want in zip(m.parameters(), before):
        assert p.data.dtype == want.dtype
        np.testing.assert_array_equal(p.data.copy_to_host(), want)


def test_store_runs_of_some_parameters():
    dev = Three().to("cuda")
    a, b, c = dev.parameters()
    store = packed_store(dev.parameters())  # segments [0, 64), [64, 128), [128, 320)
    assert store.runs([a, b, c]) == [(0, 320)]
    assert store.runs([a, b]) == [(0, 128)] and store.runs([b, c]) == [(64, 320)]
    assert store.runs([a, c]) == [(0, 64), (128, 320)] and store.runs([b]) == [(64, 128)]
    assert store.offset(c) == 128 and packed_runs([a, c]) == (store, [(0, 64), (128, 320)])
    for bad in ([b, a], [a, a], [a, Parameter(np.zeros(3, np.float32))]):
        assert store.runs(bad) is None  # out of order, repeated, not in the store
    b.to("cpu").to("cuda")  # b has arrays of its own now
    assert store.runs([a, b]) is None and store.runs([a, c]) == [(0, 64), (128, 320)]
    assert packed_runs([b]) is None and packed_runs([]) is None


def test_astype_keeps_parameters_packed_with_their_grads():
    m = Three(np.float64)
    m.c.grad[...] = 3.0
    m.to("cuda").astype(np.float32)
    store = packed_store(m.parameters())
    assert store is not None and store.data.dtype == np.float32
    np.testing.assert_array_equal(m.c.grad.copy_to_host(), np.full((2, 70), 3.0, np.float32))
    np.testing.assert_allclose(m.b.data.copy_to_host(), Three(np.float64).b.data, rtol=1e-6)


def test_device_store_view_is_a_window_of_the_flat_buffer():
    flat = cuda.to_device(np.arange(10.0))
    view = DeviceStore.view(flat, 2, (2, 3))
    np.testing.assert_array_equal(view.copy_to_host(), [[2, 3, 4], [5, 6, 7]])
    view.copy_to_device(np.zeros((2, 3)))
    np.testing.assert_array_equal(flat.copy_to_host(), [0, 1, 0, 0, 0, 0, 0, 0, 8, 9])
