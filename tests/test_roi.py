"""RoI max pooling and RoIAlign: hand-worked cases, references, gradients, CUDA, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda

from gradients import rel_err
from ptx import FUSED, SAME_ROUNDING_AS_CPU, assert_compiles_to_ptx
from tinyfrcnn import roi
from tinyfrcnn.gradcheck import numerical_gradient
from tinyfrcnn.roi import (RoIAlign, RoIPool, _roi_align_backward_reference, _roi_align_reference, _roi_pool_reference,
                           roi_align, roi_align_backward, roi_pool, roi_pool_backward)


def grid_features(h=4, w=4):
    return np.arange(h * w, dtype=np.float64).reshape(1, 1, h, w)  # (1, 1, H, W)


def random_rois(rng, n, n_images, height, width, spill=0.3):
    """RoIs in image coordinates, some crossing or beyond the edges, some tiny."""
    x1 = rng.uniform(-spill * width, width * (1 + spill), n)
    y1 = rng.uniform(-spill * height, height * (1 + spill), n)
    w = rng.uniform(0, width * 0.7, n) * (rng.random(n) > 0.1)
    h = rng.uniform(0, height * 0.7, n) * (rng.random(n) > 0.1)
    return np.column_stack([rng.integers(0, n_images, n), x1, y1, x1 + w, y1 + h])  # (n, 5)


def distinct_features(rng, shape):
    """Values that are all different, so max pooling has no ties."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) + rng.uniform(0.1, 0.4, shape)).astype(np.float64)


# --------------------------------------------------------------------------- RoI max pooling by hand


def test_roi_pool_hand_worked_whole_map():
    out, argmax = roi_pool(grid_features(), np.array([[0, 0, 0, 3, 3]], float), 2, 1.0)
    # Corners 0..3 -> RoI 4 cells wide, bins [0, 2) and [2, 4): the bottom-right of each quarter wins.
    assert out[0, 0].tolist() == [[5, 7], [13, 15]]
    assert argmax[0, 0].tolist() == [[5, 7], [13, 15]]


def test_roi_pool_crossing_the_edge_has_empty_bins():
    out, argmax = roi_pool(grid_features(), np.array([[0, -2, -2, 1, 1]], float), 2, 1.0)
    # Bins [-2, 0) clip to nothing: output 0, no argmax; bin [0, 2) x [0, 2) holds 0, 1, 4, 5.
    assert out[0, 0].tolist() == [[0, 0], [0, 5]]
    assert argmax[0, 0].tolist() == [[-1, -1], [-1, 5]]
    grad = roi_pool_backward(np.ones_like(out), argmax, (1, 1, 4, 4))
    assert grad.sum() == 1 and grad[0, 0, 1, 1] == 1


def test_roi_pool_single_pixel_roi_feeds_every_bin_and_gradient_accumulates():
    out, argmax = roi_pool(grid_features(), np.array([[0, 2, 1, 2, 1]], float), 2, 1.0)
    assert np.all(out == 6) and np.all(argmax == 6)
    grad = roi_pool_backward(np.full_like(out, 0.5), argmax, (1, 1, 4, 4))
    assert grad[0, 0, 1, 2] == 2.0 and grad.sum() == 2.0


def test_roi_pool_rounds_corners_half_away_from_zero():
    # scale 0.5: x1 = 1 -> 0.5 -> 1 and x2 = 5 -> 2.5 -> 3 (round-half-even would give 0 and 2).
    out, argmax = roi_pool(grid_features(), np.array([[0, 1, 1, 5, 5]], float), 1, 0.5)
    assert out[0, 0, 0, 0] == 15
    rows = roi._pool_bins(np.array([[0, 1, 1, 5, 5]], float), 0.5, 1, 1, 4, 4)
    assert [int(a[0, 0]) for a in rows] == [1, 4, 1, 4]
    assert roi._round_half_away(np.array([-0.5, 0.5, 2.5, -2.5, 0.49999997], np.float32)).tolist() == [-1, 1, 3, -3, 0]


def test_roi_pool_ties_keep_the_first_cell_in_row_major_order():
    out, argmax = roi_pool(np.ones((1, 1, 4, 4)), np.array([[0, 0, 0, 3, 3]], float), 2, 1.0)
    assert np.all(out == 1) and argmax[0, 0].tolist() == [[0, 2], [8, 10]]


def test_roi_pool_roi_wholly_outside_gives_zeros():
    out, argmax = roi_pool(grid_features(), np.array([[0, 10, 10, 12, 12]], float), 3, 1.0)
    assert np.all(out == 0) and np.all(argmax == -1)
    assert np.all(roi_pool_backward(np.ones_like(out), argmax, (1, 1, 4, 4)) == 0)


def test_roi_pool_roi_smaller_than_a_bin_repeats_cells():
    out, _ = roi_pool(grid_features(), np.array([[0, 0, 0, 1, 0]], float), (2, 4), 1.0)
    # 2 x 1 cells spread over 2 x 4 bins: each bin covers one cell.
    assert out[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


# --------------------------------------------------------------------------- RoIAlign by hand


def plane_features(h=8, w=8):
    y, x = np.mgrid[:h, :w]
    return (2.0 * y + 3.0 * x)[None, None]  # (1, 1, H, W)


def test_roi_align_linear_map_gives_value_at_bin_centre():
    # Bilinear interpolation of a linear map is exact, and the samples sit symmetrically in
    # each bin, so every bin averages to the map at its centre.
    f = plane_features()
    rois = np.array([[0, 1, 1, 5, 5]], float)
    aligned = roi_align(f, rois, 2, 1.0, aligned=True)  # RoI [0.5, 4.5]: centres 1.5, 3.5
    assert np.allclose(aligned[0, 0], [[2 * 1.5 + 3 * 1.5, 2 * 1.5 + 3 * 3.5], [2 * 3.5 + 3 * 1.5, 2 * 3.5 + 3 * 3.5]])
    legacy = roi_align(f, rois, 2, 1.0, aligned=False)  # RoI [1, 5]: centres 2, 4
    assert np.allclose(legacy[0, 0], [[10, 16], [14, 20]])


def test_roi_align_sample_rules_at_the_border():
    f = plane_features(4, 4) + 1
    # One sample at y = x = -0.5 (within [-1, 0]): clamped onto cell (0, 0).
    out = roi_align(f, np.array([[0, -1, -1, 0, 0]], float), 1, 1.0, sampling_ratio=1, aligned=False)
    assert out[0, 0, 0, 0] == f[0, 0, 0, 0]
    # Beyond -1: contributes 0.
    out = roi_align(f, np.array([[0, -3, -3, -2, -2]], float), 1, 1.0, sampling_ratio=1, aligned=False)
    assert out[0, 0, 0, 0] == 0
    # Between H - 1 and H: clamped onto the last row and column.
    out = roi_align(f, np.array([[0, 3, 3, 4, 4]], float), 1, 1.0, sampling_ratio=1, aligned=False)
    assert out[0, 0, 0, 0] == f[0, 0, 3, 3]
    # Samples at -2 (dropped) and 0 on each axis: one of the four counts, the mean divides by 4.
    out = roi_align(f, np.array([[0, -3, -3, 1, 1]], float), 1, 1.0, sampling_ratio=2, aligned=False)
    assert out[0, 0, 0, 0] == f[0, 0, 0, 0] / 4


@pytest.mark.parametrize("to", [np.asarray, cuda.to_device], ids=["cpu", "cuda"])
def test_roi_align_samples_exactly_on_the_limits_count(to):
    # Only samples below -1 or beyond H (W) drop out, as in torchvision: one at exactly -1
    # or exactly H is clamped onto the edge cell, forward and backward.
    f = plane_features(4, 4) + 1  # (1, 1, 4, 4)
    # One sample each (1 x 1 cell, not aligned): at (-1, -1), (4, 4), (y 4, x -1) and (5, 5).
    rois = np.array([[0, -1.5, -1.5, -0.5, -0.5], [0, 3.5, 3.5, 4.5, 4.5], [0, -1.5, 3.5, -0.5, 4.5],
                     [0, 4.5, 4.5, 5.5, 5.5]])
    out = roi_align(to(f), to(rois), 1, 1.0, sampling_ratio=1, aligned=False)
    out = out if isinstance(out, np.ndarray) else out.copy_to_host()
    assert out.ravel().tolist() == [f[0, 0, 0, 0], f[0, 0, 3, 3], f[0, 0, 3, 0], 0]
    np.testing.assert_array_equal(_roi_align_reference(f, rois, 1, 1.0, 1, False), out)
    g = np.ones((4, 1, 1, 1))
    grad = roi_align_backward(to(g), to(rois), f.shape, 1.0, sampling_ratio=1, aligned=False)
    grad = grad if isinstance(grad, np.ndarray) else grad.copy_to_host()
    expected = np.zeros(f.shape)
    expected[0, 0, [0, 3, 3], [0, 3, 0]] = 1
    np.testing.assert_array_equal(grad, expected)
    np.testing.assert_array_equal(_roi_align_backward_reference(g, rois, f.shape, 1.0, 1, False), expected)


def test_roi_align_adaptive_grid_is_ceil_of_bin_size():
    geometry = roi._align_geometry(np.array([[0, 0, 0, 10, 3]], float), 1.0, 2, 2, -1, True)
    assert geometry[4].tolist() == [2] and geometry[5].tolist() == [5]  # ceil(3/2), ceil(10/2)
    geometry = roi._align_geometry(np.array([[0, 0, 0, 10, 3]], float), 1.0, 2, 2, 3, True)
    assert geometry[4].tolist() == [3] and geometry[5].tolist() == [3]


def test_roi_align_degenerate_roi_has_no_samples():
    # aligned: a zero-size RoI has a 0 x 0 grid, so every bin is 0 (as torchvision).
    out = roi_align(plane_features(), np.array([[0, 2, 2, 2, 2]], float), 2, 1.0)
    assert np.all(out == 0)
    # not aligned: the RoI is stretched to 1 x 1 cell.
    out = roi_align(plane_features(), np.array([[0, 2, 2, 2, 2]], float), 1, 1.0, aligned=False)
    assert np.allclose(out, 2 * 2.5 + 3 * 2.5)


# --------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_pool_matches_reference(dtype):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 3, 9, 11)).astype(dtype)
    rois = random_rois(rng, 25, 2, 9 / 0.3, 11 / 0.3).astype(dtype)
    out, argmax = roi_pool(f, rois, (3, 4), 0.3)
    ref, ref_argmax = _roi_pool_reference(f, rois, (3, 4), 0.3)
    assert out.dtype == dtype and np.array_equal(out, ref) and np.array_equal(argmax, ref_argmax)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, True), (2, True), (3, True), (-1, False), (1, False)])
def test_roi_align_matches_reference_to_the_bit(dtype, sampling_ratio, aligned):
    # Scale 0.3 is inexact in binary, so every sample position depends on each rounding in
    # the features' dtype; sampling 3 divides by 9, where g * w / 9 and g / 9 * w differ.
    rng = np.random.default_rng(1)
    f = rng.standard_normal((2, 6, 9, 11)).astype(dtype)  # 6 channels: the CPU kernels' blocks of 4, one partial
    rois = random_rois(rng, 20, 2, 9 / 0.3, 11 / 0.3).astype(dtype)
    out = roi_align(f, rois, (3, 2), 0.3, sampling_ratio, aligned)
    ref = _roi_align_reference(f, rois, (3, 2), 0.3, sampling_ratio, aligned)
    assert out.dtype == dtype and np.array_equal(out, ref)
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = roi_align_backward(g, rois, f.shape, 0.3, sampling_ratio, aligned)
    ref = _roi_align_backward_reference(g, rois, f.shape, 0.3, sampling_ratio, aligned)
    assert grad.dtype == dtype and np.array_equal(grad, ref)


def test_roi_align_backward_multiplies_by_1_over_n_only_where_that_rounds_as_dividing():
    # torchvision divides g * w by the number of samples; for a power of two the CPU kernel
    # multiplies by its reciprocal instead, which must give the same float32, subnormals too.
    rng = np.random.default_rng(9)
    g = (rng.standard_normal(3000) * 10.0 ** rng.uniform(-44, 3, 3000)).astype(np.float32)  # (3000,)
    w = rng.uniform(0, 1, 3000).astype(np.float32)  # (3000,)
    for samples in (1, 2, 4, 8, 64, 3, 6, 9):
        n = np.float32(samples)
        inv = np.float32(1) / n if samples & (samples - 1) == 0 else np.float32(0)
        got = np.array([roi._share(a, b, n, inv) for a, b in zip(g, w)], np.float32)
        assert np.array_equal(got, g * w / n), samples


def test_roi_align_backward_of_non_finite_gradients_as_torchvision():
    # Off-map samples hand out nothing, so an inf gradient leaves the map's cells alone
    # (the CPU tables pad them as position 0, weight 0: inf * 0 would be NaN); on-map
    # samples hand inf * w to all four neighbours, NaN where w = 0, as torchvision does.
    f = plane_features(4, 4)
    rois = np.array([[0, 20, 20, 30, 30], [0, 1, 1, 3, 2]], float)
    g = np.full((2, 1, 2, 2), np.inf)
    grad = roi_align_backward(g, rois, f.shape, 1.0, sampling_ratio=2)
    np.testing.assert_array_equal(grad, _roi_align_backward_reference(g, rois, f.shape, 1.0, sampling_ratio=2))
    assert np.isfinite(roi_align_backward(g[:1], rois[:1], f.shape, 1.0, sampling_ratio=2)).all()


def test_roi_align_cpu_tables_in_chunks(monkeypatch):
    rng = np.random.default_rng(2)
    f = rng.standard_normal((2, 2, 7, 8))
    rois = random_rois(rng, 12, 2, 14, 16)
    g = rng.standard_normal((12, 2, 3, 3))
    whole = roi_align(f, rois, 3, 0.5), roi_align_backward(g, rois, f.shape, 0.5)
    monkeypatch.setattr(roi, "SAMPLE_TABLE_ROWS", 20)
    parts = roi_align(f, rois, 3, 0.5), roi_align_backward(g, rois, f.shape, 0.5)
    assert np.allclose(whole[0], parts[0], rtol=1e-14, atol=1e-14)
    assert np.allclose(whole[1], parts[1], rtol=1e-14, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 6), ph=st.integers(1, 4), pw=st.integers(1, 4),
       scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 3]), sampling_ratio=st.integers(-1, 3), aligned=st.booleans())
def test_properties_match_reference_and_backward_is_adjoint(seed, n, ph, pw, scale, sampling_ratio, aligned):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((2, int(rng.integers(1, 7)), int(rng.integers(1, 7)), int(rng.integers(1, 7))))
    rois = random_rois(rng, n, 2, f.shape[2] / scale, f.shape[3] / scale)
    out, argmax = roi_pool(f, rois, (ph, pw), scale)
    ref, ref_argmax = _roi_pool_reference(f, rois, (ph, pw), scale)
    assert np.array_equal(out, ref) and np.array_equal(argmax, ref_argmax)
    al = roi_align(f, rois, (ph, pw), scale, sampling_ratio, aligned)
    assert np.allclose(al, _roi_align_reference(f, rois, (ph, pw), scale, sampling_ratio, aligned), atol=1e-12)
    # Both ops are linear in the features (given the argmax), so the backward is the adjoint:
    # <op(f), g> = <f, op^T(g)>.
    g = rng.standard_normal(out.shape)
    assert np.isclose(np.sum(out * g), np.sum(f * roi_pool_backward(g, argmax, f.shape)), atol=1e-10)
    assert np.isclose(np.sum(al * g), np.sum(f * roi_align_backward(g, rois, f.shape, scale, sampling_ratio,
                                                                     aligned)), atol=1e-10)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, True), (2, False)])
def test_roi_align_gradient_check(sampling_ratio, aligned):
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 2, 5, 6))
    rois = np.array([[0, -3, -2, 9, 7], [1, 2.3, 1.1, 4.4, 3.9], [1, 8, 6, 12, 11], [0, 1, 1, 1.2, 1.3]])
    g = rng.standard_normal((4, 2, 3, 2))
    analytic = roi_align_backward(g, rois, f.shape, 0.5, sampling_ratio, aligned)
    numeric = numerical_gradient(lambda _: np.sum(roi_align(f, rois, (3, 2), 0.5, sampling_ratio, aligned) * g), f)
    assert rel_err(analytic, numeric) < 1e-6
    assert np.abs(analytic).sum() > 0


def test_roi_pool_gradient_check():
    rng = np.random.default_rng(4)
    f = distinct_features(rng, (2, 2, 5, 6))
    rois = np.array([[0, -3, -2, 9, 7], [1, 2.3, 1.1, 4.4, 3.9], [1, 2, 2, 2, 2], [0, 0, 0, 11, 9]])
    g = rng.standard_normal((4, 2, 3, 2))
    layer = RoIPool((3, 2), 0.5)
    layer.forward(f, rois)
    analytic = layer.backward(g)
    numeric = numerical_gradient(lambda _: np.sum(roi_pool(f, rois, (3, 2), 0.5)[0] * g), f)
    assert rel_err(analytic, numeric) < 1e-6
    assert np.count_nonzero(analytic) > 4


def test_layers_match_functions():
    rng = np.random.default_rng(5)
    f = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    rois = random_rois(rng, 5, 1, 12, 12).astype(np.float32)
    g = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    align = RoIAlign(2, 0.5, sampling_ratio=2, aligned=False)
    assert np.array_equal(align.forward(f, rois), roi_align(f, rois, 2, 0.5, 2, False))
    assert np.array_equal(align.backward(g), roi_align_backward(g, rois, f.shape, 0.5, 2, False))
    pool = RoIPool(2, 0.5)
    out, argmax = roi_pool(f, rois, 2, 0.5)
    assert np.array_equal(pool.forward(f, rois), out)
    grad = pool.backward(g)
    assert grad.dtype == np.float32 and np.array_equal(grad, roi_pool_backward(g, argmax, f.shape))
    assert pool.parameters() == [] and align.parameters() == []
    assert np.array_equal(RoIPool(2, 0.5)(f, rois), out)  # called like any module


def test_roi_align_layer_keeps_its_own_rois_and_checks_the_gradient_shape():
    rng = np.random.default_rng(6)
    f = rng.standard_normal((1, 2, 6, 6))
    rois = random_rois(rng, 3, 1, 12, 12)
    g = rng.standard_normal((3, 2, 2, 2))
    expected = roi_align_backward(g, rois, f.shape, 0.5)
    align = RoIAlign(2, 0.5)
    align(f, rois)
    rois[:, 1:] += 1.5  # the caller reuses its array before the backward
    assert np.array_equal(align.backward(g), expected)
    for shape in [(3, 2, 3, 3), (3, 2, 1, 4), (2, 2, 2, 2)]:
        with pytest.raises(ValueError, match=r"RoIAlign.backward: grad_out must have the forward output's shape "
                                             r"\(3, 2, 2, 2\)"):
            align.backward(np.zeros(shape))


def test_roi_align_layer_backward_in_another_dtype_than_its_forward():
    # A float64 gradient after a float32 forward: the forward's RoIs and their samples are
    # worked out again in float64, as the function does for float64 gradients.
    rng = np.random.default_rng(13)
    f = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    rois = random_rois(rng, 3, 1, 20, 20).astype(np.float32)
    g = rng.standard_normal((3, 2, 2, 2))  # (R, C, 2, 2) float64
    expected = roi_align_backward(g, rois, f.shape, 0.3, 3)
    align = RoIAlign(2, 0.3, sampling_ratio=3)
    align.forward(f, rois)
    rois[:, 1:] += 1.5  # the caller reuses its array (already in the features' dtype) before the backward
    grad = align.backward(g)
    assert grad.dtype == np.float64 and np.array_equal(grad, expected)


def test_roi_pool_backward_rejects_argmax_in_another_channel():
    # The CPU kernel gives each channel to one thread; an argmax of channel 1 pointing
    # into channel 0 would race with channel 0's thread on the same input.
    g = np.ones((4, 2, 1, 1))
    argmax = np.zeros((4, 2, 1, 1), np.int64)  # every entry -> index 0, a channel-0 cell
    with pytest.raises(ValueError, match=r"roi_pool_backward: argmax\[:, 1\] holds indices outside the channel-1"):
        roi_pool_backward(g, argmax, (1, 2, 4, 4))
    argmax[:, 1] = 16  # channel 1's first cell
    assert roi_pool_backward(g, argmax, (1, 2, 4, 4)).ravel()[[0, 16]].tolist() == [4, 4]
    argmax[:, 1] = 16 + 32  # channel 1's first cell in image 1: also channel 1
    assert roi_pool_backward(g, argmax, (2, 2, 4, 4)).ravel()[[0, 48]].tolist() == [4, 4]
    big_endian = np.zeros((4, 2, 1, 1), ">i8")
    with pytest.raises(ValueError, match="roi_pool_backward: argmax must be in this machine's byte order"):
        roi_pool_backward(g, big_endian, (1, 2, 4, 4))


# --------------------------------------------------------------------------- CUDA (simulator) and PTX


def test_cuda_kernels_match_cpu():
    rng = np.random.default_rng(6)
    f = rng.standard_normal((2, 2, 5, 6))
    rois = np.array([[0, -3, -2, 9, 7], [1, 2.3, 1.1, 4.4, 3.9], [1, 20, 20, 22, 22], [0, 1, 1, 1, 1],
                     [1, 1, 20, 5, 22], [0, 20, 1, 22, 5]])  # the last two: off the map in y only, in x only
    g = rng.standard_normal((6, 2, 2, 3))
    d_f, d_r, d_g = cuda.to_device(f), cuda.to_device(rois), cuda.to_device(g)

    out, argmax = roi_pool(f, rois, (2, 3), 0.5)
    assert (out[4:] == 0).all() and (argmax[4:] == -1).all()  # empty bins
    d_out, d_argmax = roi_pool(d_f, d_r, (2, 3), 0.5)
    assert roi.is_device_array(d_out) and roi.is_device_array(d_argmax)
    assert np.array_equal(d_out.copy_to_host(), out) and np.array_equal(d_argmax.copy_to_host(), argmax)
    d_grad = roi_pool_backward(d_g, d_argmax, f.shape)
    assert np.allclose(d_grad.copy_to_host(), roi_pool_backward(g, argmax, f.shape), atol=1e-14)

    for sampling_ratio, aligned in [(-1, True), (2, False)]:
        d_al = roi_align(d_f, d_r, (2, 3), 0.5, sampling_ratio, aligned)
        assert np.array_equal(d_al.copy_to_host(), roi_align(f, rois, (2, 3), 0.5, sampling_ratio, aligned))
        d_grad = roi_align_backward(d_g, d_r, f.shape, 0.5, sampling_ratio, aligned)
        assert roi.is_device_array(d_grad)
        cpu = roi_align_backward(g, rois, f.shape, 0.5, sampling_ratio, aligned)
        assert np.allclose(d_grad.copy_to_host(), cpu, atol=1e-12)


def test_cuda_roi_pool_ties_and_layout():
    """The forward kernel's flat reads: ties go to the first maximum in row-major order,
    as on the CPU (a few integer values, so most bins hold ties), every image and channel
    at its own offset; device features that are not one C-order run are refused."""
    rng = np.random.default_rng(8)
    f = rng.integers(0, 3, (3, 4, 6, 7)).astype(np.float32)
    rois = np.array([[2, 0, 0, 13, 11], [1, 3, 2, 9, 9], [0, 4, 4, 4, 4], [2, -6, 5, 30, 8]], np.float32)
    out, argmax = roi_pool(f, rois, (3, 2), 0.5)
    d_out, d_argmax = roi_pool(cuda.to_device(f), cuda.to_device(rois), (3, 2), 0.5)
    np.testing.assert_array_equal(d_out.copy_to_host(), out)
    np.testing.assert_array_equal(d_argmax.copy_to_host(), argmax)
    strided = cuda.to_device(np.concatenate([f, f], axis=1))[:, ::2]  # (3, 4, 6, 7), every other channel
    with pytest.raises(ValueError, match="roi_pool: features must be C-contiguous on the device"):
        roi_pool(strided, cuda.to_device(rois), (3, 2), 0.5)
    with pytest.raises(ValueError, match="roi_align: features must be C-contiguous on the device"):
        roi_align(strided, cuda.to_device(rois), (3, 2), 0.5)


def test_roi_blocks_cover_every_bin_without_dividing():
    assert roi._roi_blocks(300, 512, 7, 7) == ((300, 103), (7, 7, 5))  # 245 threads, 5 channels each
    assert roi._roi_blocks(4, 3, 2, 3) == ((4, 1), (3, 2, 3))
    assert roi._roi_blocks(1, 2, 40, 50) == ((1, 2), (50, 5, 1))  # 2000 bins: rows in strides
    assert roi._roi_blocks(1, 1, 3, 1000) == ((1, 1), (256, 1, 1))  # columns in strides
    for R, C, PH, PW in [(3, 5, 29, 31), (1, 1, 1, 1), (2, 600, 7, 7), (1, 3, 2, 300), (1, 1, 300, 2)]:
        (gx, gy), (bx, by, bz) = roi._roi_blocks(R, C, PH, PW, 4)
        assert bx * by * bz <= roi.ROI_THREADS  # what every RoI kernel can start with (RoIAlign: 640)
    assert roi._roi_blocks(1, 10**7, 1, 1) == ((1, roi.MAX_GRID_Y), (1, 1, 64))  # channel groups in strides
    assert roi._roi_blocks(300, 512, 7, 7, 4) == ((300, 26), (7, 7, 5))  # 4 channels a thread (3 for some)
    assert roi._roi_blocks(2, 3, 7, 7, 4) == ((2, 1), (7, 7, 3))


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_cuda_large_output_grids(dtype, tol):
    # 29 x 31 = 899 bins a RoI, more than a block of RoIAlign's forward kernel may hold on
    # a GPU (it needs 91 registers a thread: at most 640 threads): the bins go in strides.
    rng = np.random.default_rng(12)
    f = rng.standard_normal((1, 2, 9, 11)).astype(dtype)
    rois = np.array([[0, 0, 0, 40, 30], [0, 8, 4, 20, 36]], dtype)
    g = rng.standard_normal((2, 2, 29, 31)).astype(dtype)
    d_f, d_r, d_g = cuda.to_device(f), cuda.to_device(rois), cuda.to_device(g)
    out, argmax = roi_pool(f, rois, (29, 31), 0.25)
    d_out, d_argmax = roi_pool(d_f, d_r, (29, 31), 0.25)
    assert np.array_equal(d_out.copy_to_host(), out) and np.array_equal(d_argmax.copy_to_host(), argmax)
    np.testing.assert_allclose(roi_pool_backward(d_g, d_argmax, f.shape).copy_to_host(),
                               roi_pool_backward(g, argmax, f.shape), rtol=tol, atol=tol)
    np.testing.assert_array_equal(roi_align(d_f, d_r, (29, 31), 0.25, 2).copy_to_host(),
                                  roi_align(f, rois, (29, 31), 0.25, 2))
    np.testing.assert_allclose(roi_align_backward(d_g, d_r, f.shape, 0.25, 2).copy_to_host(),
                               roi_align_backward(g, rois, f.shape, 0.25, 2), rtol=tol, atol=tol)  # atomic order


def test_cuda_kernels_take_bins_and_channels_in_strides(monkeypatch):
    # Blocks smaller than the output and a grid with fewer channel groups than needed:
    # every bin must still be computed once (the loops stride over rows, columns and
    # channel groups), with the CPU's numbers.
    rng = np.random.default_rng(9)
    f = rng.standard_normal((2, 5, 6, 7))
    rois = np.array([[0, -3, -2, 9, 7], [1, 2.3, 1.1, 4.4, 3.9], [1, 0, 0, 13, 11]])
    g = rng.standard_normal((3, 5, 3, 4))
    d_f, d_r, d_g = cuda.to_device(f), cuda.to_device(rois), cuda.to_device(g)
    # 4 of 5 channels at once, so some threads take two:
    monkeypatch.setattr(roi, "_roi_blocks", lambda R, C, PH, PW, *per_thread: ((R, 2), (3, 2, 2)))
    out, argmax = roi_pool(f, rois, (3, 4), 0.5)
    d_out, d_argmax = roi_pool(d_f, d_r, (3, 4), 0.5)
    assert np.array_equal(d_out.copy_to_host(), out) and np.array_equal(d_argmax.copy_to_host(), argmax)
    assert np.allclose(roi_pool_backward(d_g, d_argmax, f.shape).copy_to_host(),
                       roi_pool_backward(g, argmax, f.shape), atol=1e-14)
    assert np.array_equal(roi_align(d_f, d_r, (3, 4), 0.5).copy_to_host(), roi_align(f, rois, (3, 4), 0.5))
    assert np.allclose(roi_align_backward(d_g, d_r, f.shape, 0.5).copy_to_host(),
                       roi_align_backward(g, rois, f.shape, 0.5), atol=1e-12)
    # One channel slot per RoI: the forward kernels' threads take 4 channels at a time,
    # so the 5 channels need a second round.
    monkeypatch.setattr(roi, "_roi_blocks", lambda R, C, PH, PW, *per_thread: ((R, 1), (3, 2, 1)))
    d_out, d_argmax = roi_pool(d_f, d_r, (3, 4), 0.5)
    assert np.array_equal(d_out.copy_to_host(), out) and np.array_equal(d_argmax.copy_to_host(), argmax)
    assert np.array_equal(roi_align(d_f, d_r, (3, 4), 0.5).copy_to_host(), roi_align(f, rois, (3, 4), 0.5))


def test_layers_upload_host_rois_and_never_copy_them_back(monkeypatch):
    # With device features the layers take the RoIs from the host, where the model makes
    # them: checked there, uploaded once, the checked copy kept for the backward, so no
    # pass waits for a copy back. The numbers are the functions' on device RoIs.
    rng = np.random.default_rng(10)
    f = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    rois = random_rois(rng, 6, 2, 10, 12).astype(np.float32)
    g = rng.standard_normal((6, 3, 2, 3)).astype(np.float32)
    d_f, d_r, d_g = cuda.to_device(f), cuda.to_device(rois), cuda.to_device(g)
    expected_align = (roi_align(d_f, d_r, (2, 3), 0.5).copy_to_host(),
                      roi_align_backward(d_g, d_r, f.shape, 0.5).copy_to_host())
    d_out, d_argmax = roi_pool(d_f, d_r, (2, 3), 0.5)
    expected_pool = (d_out.copy_to_host(), roi_pool_backward(d_g, d_argmax, f.shape).copy_to_host())

    copies = []
    device_array = type(d_f)
    to_host = device_array.copy_to_host
    monkeypatch.setattr(device_array, "copy_to_host", lambda a, *args, **kw: copies.append(a.shape) or
                        to_host(a, *args, **kw))
    align, pool = RoIAlign((2, 3), 0.5), RoIPool((2, 3), 0.5)
    results = []
    for layer in (align, pool):
        host_rois = rois.astype(np.float64)  # any float dtype: the layer casts to the features'
        out = layer.forward(d_f, host_rois)
        host_rois[:, 1:] += 2.0  # the caller reuses its array before the backward
        grad = layer.backward(d_g)
        assert roi.is_device_array(out) and roi.is_device_array(grad)
        results.append((out, grad))
    assert copies == []
    monkeypatch.undo()
    for (out, grad), (want_out, want_grad) in zip(results, (expected_align, expected_pool)):
        assert np.array_equal(out.copy_to_host(), want_out)
        assert np.allclose(grad.copy_to_host(), want_grad, atol=1e-6)
    # A gradient in another dtype than the forward's: the function's own checks and casts.
    grad64 = align.backward(cuda.to_device(g.astype(np.float64)))
    assert grad64.dtype == np.float64
    assert np.allclose(grad64.copy_to_host(), roi_align_backward(g.astype(np.float64), rois, f.shape, 0.5),
                       atol=1e-6)
    with pytest.raises(ValueError, match="device arrays"):
        align.backward(g)  # the forward ran on the device
    with pytest.raises(ValueError, match="device arrays"):
        roi_align(d_f, rois, (2, 3), 0.5)  # the functions still take all-host or all-device arguments
    with pytest.raises(ValueError, match=r"RoIAlign: rois\[0, 0\] = 2.0 is not an integer batch index"):
        align.forward(d_f, np.array([[2, 0, 0, 1, 1]], np.float32))  # checked on the host, before any upload


def test_roi_pool_layer_backward_does_not_wait_to_check_its_own_argmax(monkeypatch):
    # roi_pool_backward takes any argmax, so on the GPU it waits for the kernel's flag of
    # indices outside the features; the layer's argmax is its own forward's, so it does not.
    rng = np.random.default_rng(11)
    f = rng.standard_normal((1, 2, 5, 6)).astype(np.float32)
    rois = random_rois(rng, 4, 1, 10, 12).astype(np.float32)
    g = rng.standard_normal((4, 2, 2, 2)).astype(np.float32)
    waits = []
    synchronize = roi.cuda.synchronize
    monkeypatch.setattr(roi.cuda, "synchronize", lambda: waits.append(1) or synchronize())
    layer = RoIPool(2, 0.5)
    layer.forward(cuda.to_device(f), rois)
    grad = layer.backward(cuda.to_device(g))
    assert waits == []
    expected = roi_pool_backward(g, roi_pool(f, rois, 2, 0.5)[1], f.shape)
    np.testing.assert_allclose(grad.copy_to_host(), expected, atol=1e-6)
    roi_pool_backward(cuda.to_device(g), layer._argmax, f.shape)
    assert waits == [1]  # the function checks
    with pytest.raises(ValueError, match=r"RoIPool.backward: grad_out must have the forward output's shape"):
        layer.backward(cuda.to_device(g[:3]))
    with pytest.raises(ValueError, match="RoIPool.backward: grad_out must be a CUDA device array"):
        layer.backward(g)


def test_cuda_float32_and_empty():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((1, 2, 4, 5)).astype(np.float32)
    rois = np.array([[0, 0.5, 0.2, 3.7, 2.9]], np.float32)
    d_al = roi_align(cuda.to_device(f), cuda.to_device(rois), 2, 1.0)
    assert d_al.dtype == np.float32
    assert np.array_equal(d_al.copy_to_host(), roi_align(f, rois, 2, 1.0))
    empty = roi_pool(cuda.to_device(f), cuda.to_device(np.zeros((0, 5), np.float32)), 2, 1.0)[0]
    assert roi.is_device_array(empty) and empty.shape == (0, 2, 2, 2)
    out, argmax = roi_pool(f, rois, 2, 1.0)
    with pytest.raises(ValueError, match="argmax holds indices outside"):
        roi_pool_backward(cuda.to_device(out), cuda.to_device(argmax + f.size), f.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_geometry_in_kernel_is_the_cpus_to_the_bit(dtype):
    # Scale 0.3 is inexact in binary, so corners, bin edges and sample grids depend on every
    # rounding; the kernels must reproduce the CPU's exactly. RoIs stay float64 on purpose:
    # both paths cast them to the features' dtype.
    rng = np.random.default_rng(8)
    f = rng.standard_normal((2, 2, 5, 6)).astype(dtype)
    rois = np.array([[0, -3.3, -2.1, 9.7, 7.2], [1, 2.3, 1.1, 4.4, 3.9], [1, 5, 5, 5, 5], [0, 1.5, 0.5, 18.5, 16.5]])
    d_f, d_r = cuda.to_device(f), cuda.to_device(rois)
    out, argmax = roi_pool(f, rois, (2, 3), 0.3)
    d_out, d_argmax = roi_pool(d_f, d_r, (2, 3), 0.3)
    assert np.array_equal(d_out.copy_to_host(), out) and np.array_equal(d_argmax.copy_to_host(), argmax)
    g = rng.standard_normal((4, 2, 2, 3)).astype(dtype)
    for sampling_ratio, aligned in [(-1, True), (-1, False), (3, True)]:
        cpu = roi_align(f, rois, (2, 3), 0.3, sampling_ratio, aligned)
        assert np.array_equal(roi_align(d_f, d_r, (2, 3), 0.3, sampling_ratio, aligned).copy_to_host(), cpu)
        # The backward's atomic adds may land in another order than the CPU's loop.
        cpu = roi_align_backward(g, rois, f.shape, 0.3, sampling_ratio, aligned)
        gpu = roi_align_backward(cuda.to_device(g), d_r, f.shape, 0.3, sampling_ratio, aligned).copy_to_host()
        assert np.allclose(gpu, cpu, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("to", [np.asarray, cuda.to_device], ids=["cpu", "cuda"])
def test_roi_pool_backward_argmax_range_is_exactly_minus_1_to_size(to):
    # features_shape (1, 1, 4, 4): -1 (an empty bin) and 15 (the last cell) are valid
    # entries; -2 and 16 are one step outside.
    g = np.array([[[[1.0, 2.0]]]])  # (1, 1, 1, 2)
    grad = roi_pool_backward(to(g), to(np.array([[[[-1, 15]]]])), (1, 1, 4, 4))
    grad = grad if isinstance(grad, np.ndarray) else grad.copy_to_host()
    assert grad.ravel().tolist() == [0] * 15 + [2]
    for bad in (-2, 16):
        with pytest.raises(ValueError, match=r"roi_pool_backward: argmax holds indices outside \[-1, 16\)"):
            roi_pool_backward(to(g), to(np.array([[[[0, bad]]]])), (1, 1, 4, 4))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the simulator's float32(1e39)
@pytest.mark.parametrize("corruption", ["negative", "reversed", "huge"])
def test_device_rois_are_checked_when_the_features_have_no_channels(corruption):
    """With no channels there is nothing for a kernel to compute, but bad RoIs are still
    an error, with the host path's words."""
    rois, _ = corrupted_rois(0, np.float32, np.float32, corruption)
    f = np.zeros((3, 0, 5, 6), np.float32)  # (N, 0, H, W)
    g = np.zeros((len(rois), 0, 2, 2), np.float32)  # (R, 0, 2, 2)
    calls = [lambda f, r, g: roi_pool(f, r, 2, 0.5), lambda f, r, g: roi_align(f, r, 2, 0.5, sampling_ratio=2),
             lambda f, r, g: roi_align_backward(g, r, f.shape, 0.5, sampling_ratio=2)]
    for call in calls:
        with pytest.raises(ValueError) as on_host:
            call(f, rois, g)
        with pytest.raises(ValueError) as on_device:
            call(cuda.to_device(f), cuda.to_device(rois), cuda.to_device(g))
        assert str(on_device.value) == str(on_host.value)


def test_cuda_pool_backward_rejects_bad_argmax_after_the_kernel():
    f = np.arange(16.0).reshape(1, 1, 4, 4)
    out, argmax = roi_pool(f, np.array([[0, 0, 0, 3, 3]], float), 2, 1.0)
    bad = argmax.copy()
    bad[0, 0, 1, 1] = -2
    with pytest.raises(ValueError, match="argmax holds indices outside"):
        roi_pool_backward(cuda.to_device(out), cuda.to_device(bad), f.shape)
    # The flag is reset: a good call after a bad one succeeds.
    grad = roi_pool_backward(cuda.to_device(out), cuda.to_device(argmax), f.shape).copy_to_host()
    assert np.array_equal(grad, roi_pool_backward(out, argmax, f.shape))


def test_each_thread_reads_its_own_kernels_verdict(monkeypatch):
    """Two host threads at once: while one call waits for its kernel, another thread's
    kernel meets a bad RoI and raises its flag. The waiting call must not see it."""
    import threading

    others = []
    thread = threading.Thread(target=lambda: others.append(roi._fault_flag()))
    thread.start()
    thread.join()
    real_launch = roi.launch

    def launch_while_another_thread_faults(*args):
        real_launch(*args)
        others[0][0] = 1  # the other thread's kernel, running meanwhile

    monkeypatch.setattr(roi, "launch", launch_while_another_thread_faults)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((1, 2, 5, 6)).astype(np.float32)  # (N, C, H, W)
    rois = np.array([[0, 0, 0, 4, 3], [0, 1, 2, 5, 4]], np.float32)  # (R, 5)
    g = rng.standard_normal((2, 2, 2, 2)).astype(np.float32)  # (R, C, 2, 2)
    d_f, d_r = cuda.to_device(f), cuda.to_device(rois)
    out, argmax = roi_pool(d_f, d_r, 2, 1.0)
    assert np.array_equal(out.copy_to_host(), roi_pool(f, rois, 2, 1.0)[0])
    grad = roi_pool_backward(cuda.to_device(g), argmax, f.shape).copy_to_host()
    assert np.array_equal(grad, roi_pool_backward(g, argmax.copy_to_host(), f.shape))
    assert np.array_equal(roi_align(d_f, d_r, 2, 1.0, 2).copy_to_host(), roi_align(f, rois, 2, 1.0, 2))
    got = roi_align_backward(cuda.to_device(g), d_r, f.shape, 1.0, 2).copy_to_host()
    np.testing.assert_allclose(got, roi_align_backward(g, rois, f.shape, 1.0, 2), rtol=1e-6, atol=1e-6)
    assert others[0] is not roi._fault_flag(reset=False)


def test_kernels_compile_to_ptx():
    jobs = []
    for t, s in (("float32", "f32"), ("float64", "f64")):
        f4 = f"{t}[:, :, :, ::1]"
        jobs += [
            ("tinyfrcnn.roi", f"_roi_pool_forward_cuda_{s}",
             f"void({t}[::1], int64, int64, {t}[:, ::1], {t}, int64, {f4}, int64[:, :, :, ::1], int32[::1])",
             SAME_ROUNDING_AS_CPU[t]),
            ("tinyfrcnn.roi", "_roi_pool_backward_cuda", f"void({f4}, int64[:, :, :, ::1], {t}[::1], int32[::1])"),
            ("tinyfrcnn.roi", f"_roi_align_forward_cuda_{s}",
             f"void({t}[::1], int64, int64, {t}[:, ::1], {t}, int64, int64, boolean, {f4}, int32[::1])",
             SAME_ROUNDING_AS_CPU[t]),
            ("tinyfrcnn.roi", f"_roi_align_backward_cuda_{s}",
             f"void({f4}, {t}[:, ::1], {t}, int64, int64, boolean, int64, int64, {t}[::1], int32[::1])",
             SAME_ROUNDING_AS_CPU[t]),
        ]
    # RoIs in float64 with float32 features: the kernels cast them, as the CPU path does,
    # after checking them in float64, as the host does (so float64 comparisons are allowed).
    jobs.append(("tinyfrcnn.roi", "_roi_pool_forward_cuda_f32",
                 "void(float32[::1], int64, int64, float64[:, :], float32, int64, float32[:, :, :, ::1], "
                 "int64[:, :, :, ::1], int32[::1])", [FUSED]))
    jobs.append(("tinyfrcnn.roi", "_roi_align_forward_cuda_f32",
                 "void(float32[::1], int64, int64, float64[:, :], float32, int64, int64, boolean, "
                 "float32[:, :, :, ::1], int32[::1])", [FUSED]))
    assert_compiles_to_ptx(jobs)


# --------------------------------------------------------------------------- input handling


def test_empty_rois_give_empty_outputs():
    f = np.zeros((1, 3, 4, 4), np.float32)
    out, argmax = roi_pool(f, np.zeros((0, 5), np.float32), (2, 3), 1.0)
    assert out.shape == (0, 3, 2, 3) and out.dtype == np.float32 and argmax.shape == (0, 3, 2, 3)
    assert roi_align(f, np.zeros((0, 5)), 2, 1.0).shape == (0, 3, 2, 2)
    assert np.all(roi_pool_backward(out, argmax, f.shape) == 0)
    assert roi_align_backward(np.zeros((0, 3, 2, 2)), np.zeros((0, 5)), f.shape, 1.0).shape == f.shape


@pytest.mark.parametrize("op", [roi_pool, roi_align])
@pytest.mark.parametrize("features,rois,output_size,scale,match", [
    (np.zeros((3, 4, 4)), np.zeros((1, 5)), 2, 1.0, "features must be 4-D"),
    (np.zeros((1, 1, 4, 4), np.int64), np.zeros((1, 5)), 2, 1.0, "features must be float32 or float64"),
    (np.zeros((1, 1, 0, 4)), np.zeros((1, 5)), 2, 1.0, "non-zero height"),
    (np.zeros((1, 1, 4, 0)), np.zeros((1, 5)), 2, 1.0, "non-zero height and width"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 4)), 2, 1.0, r"rois must have shape \(R, 5\)"),
    (np.zeros((1, 1, 4, 4)), np.zeros(5), 2, 1.0, "rois must be 2-D"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5), np.int64), 2, 1.0, "rois must be float32 or float64"),
    (np.zeros((1, 1, 4, 4)), np.array([[0.5, 0, 0, 1, 1]]), 2, 1.0, r"rois\[0, 0\].*integer batch index"),
    (np.zeros((1, 1, 4, 4)), np.array([[0, 0, 0, 1, 1], [1, 0, 0, 1, 1]], float), 2, 1.0, r"rois\[1, 0\].*\[0, 1\)"),
    (np.zeros((1, 1, 4, 4)), np.array([[-1, 0, 0, 1, 1]], float), 2, 1.0, "batch index"),
    (np.zeros((1, 1, 4, 4)), np.array([[0, 0, np.nan, 1, 1]]), 2, 1.0, "rois holds NaN"),
    (np.zeros((1, 1, 4, 4)), np.array([[0, 0, 0, np.inf, 1]]), 2, 1.0, "rois holds NaN or inf"),
    (np.zeros((1, 1, 4, 4)), np.array([[0, 2, 0, 1, 1]], float), 2, 1.0, "x2 < x1"),
    (np.zeros((1, 1, 4, 4)), np.array([[0, 0, 2, 1, 1]], float), 2, 1.0, "y2 < y1"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), 0, 1.0, "output_size must be a positive integer"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), (2, -1), 1.0, "output_size"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), (2, 2, 2), 1.0, "output_size"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), 2, 0.0, "spatial_scale must be > 0"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), 2, -1.0, "spatial_scale"),
    (np.zeros((1, 1, 4, 4)), np.zeros((1, 5)), 2, float("nan"), "spatial_scale must be finite"),
])
def test_bad_input_names_the_argument(op, features, rois, output_size, scale, match):
    with pytest.raises(ValueError, match=match):
        op(features, rois, output_size, scale)


def test_bad_input_align_options_backward_and_devices():
    f, rois = np.zeros((1, 1, 4, 4)), np.array([[0, 0, 0, 2, 2]], float)
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(f, rois, 2, 1.0, sampling_ratio=1.5)
    with pytest.raises(ValueError, match="aligned"):
        roi_align(f, rois, 2, 1.0, aligned="yes")
    with pytest.raises(ValueError, match="roi_align: sampling_ratio must be an integer"):
        roi_align(f, rois, 2, 1.0, sampling_ratio=True)
    out, argmax = roi_pool(f, rois, 2, 1.0)
    with pytest.raises(ValueError, match="argmax has shape"):
        roi_pool_backward(out, argmax[:, :, :1], f.shape)
    with pytest.raises(ValueError, match="argmax must be int64"):
        roi_pool_backward(out, argmax.astype(np.float64), f.shape)
    with pytest.raises(ValueError, match="argmax holds indices outside"):
        roi_pool_backward(out, argmax + 100, f.shape)
    with pytest.raises(ValueError, match="features_shape"):
        roi_pool_backward(out, argmax, (4, 4))
    with pytest.raises(ValueError, match=r"roi_pool_backward: grad_out has 1 channels but features_shape \(1, 2, 4, 4\)"):
        roi_pool_backward(out, argmax, (1, 2, 4, 4))
    with pytest.raises(ValueError, match="grad_out has shape"):
        roi_align_backward(np.zeros((2, 1, 2, 2)), rois, f.shape, 1.0)
    with pytest.raises(ValueError, match=r"roi_align_backward: grad_out has shape \(1, 2, 2, 2\) but there are 1 rois "
                                         r"and features_shape \(1, 1, 4, 4\) has 1 channels"):
        roi_align_backward(np.zeros((1, 2, 2, 2)), rois, f.shape, 1.0)
    with pytest.raises(ValueError, match="roi_align_backward: features_shape must have non-zero height and width"):
        roi_align_backward(np.zeros((1, 1, 2, 2)), rois, (1, 1, 0, 4), 1.0)
    with pytest.raises(ValueError, match="device arrays"):
        roi_align(f, cuda.to_device(rois), 2, 1.0)
    with pytest.raises(ValueError, match="call forward first"):
        RoIPool(2, 1.0).backward(out)
    with pytest.raises(ValueError, match="call forward first"):
        RoIAlign(2, 1.0).backward(out)
    with pytest.raises(ValueError, match="RoIAlign: spatial_scale must be > 0"):
        RoIAlign(2, 0)
    with pytest.raises(ValueError, match="RoIPool: spatial_scale must be > 0"):
        RoIPool(2, 0)


@pytest.mark.parametrize("op", [roi_pool, roi_align])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_features_are_rejected(op, bad):
    f = np.zeros((1, 2, 4, 4), np.float32)
    f[0, 1, 2, 3] = bad
    rois = np.array([[0, 0, 0, 1, 1]], np.float32)
    match = rf"{op.__name__}: features holds NaN or inf \(first at index \(0, 1, 2, 3\)\)"
    with pytest.raises(ValueError, match=match):
        op(f, rois, 2, 1.0)


HUGE_ROIS = [np.array([[0, 0, 0, 1, 1], [0, -1e30, 0, 1e30, 1]]),  # roi_pool used to return 0 with argmax -1
             np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1e30, 1]]),  # roi_align used to raise SystemError
             np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1e300, 1]])]  # float64 RoI that becomes inf in float32


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the simulator's float32(1e300)
@pytest.mark.parametrize("rois", HUGE_ROIS)
@pytest.mark.parametrize("to", [np.asarray, cuda.to_device], ids=["cpu", "cuda"])
def test_huge_roi_coordinates_are_rejected_on_both_paths(rois, to):
    f = np.zeros((1, 1, 4, 4), np.float32)
    d_f, d_r = to(f), to(rois)
    match = r"rois\[1\] = .* feature cells at spatial_scale 0.5; .* within \+-16777216 \(2\*\*24\)"
    for call in (lambda: roi_pool(d_f, d_r, 2, 0.5), lambda: roi_align(d_f, d_r, 2, 0.5, 2),
                 lambda: roi_align_backward(to(np.zeros((2, 1, 2, 2), np.float32)), d_r, f.shape, 0.5, 2)):
        with pytest.raises(ValueError, match=match):
            call()


CORRUPTIONS = ["none", "nan", "inf", "reversed", "fraction", "sliver", "negative", "beyond", "huge", "edge"]


def corrupted_rois(seed, rois_dtype, features_dtype, corruption):
    """1-5 valid RoIs on 3 images (scale 0.5), at most one of them corrupted; returns them
    and their cast to the features' dtype."""
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 6))
    xy = rng.uniform(-20, 40, (r, 2))
    rois = np.concatenate([rng.integers(0, 3, (r, 1)), xy, xy + rng.uniform(0, 30, (r, 2))], axis=1)
    i, k = int(rng.integers(r)), int(rng.integers(1, 5))
    if corruption in ("nan", "inf"):
        rois[i, int(rng.integers(5))] = np.nan if corruption == "nan" else -np.inf
    elif corruption == "reversed":
        axis = k % 2  # x or y
        rois[i, 1 + axis] = rois[i, 3 + axis] + rng.uniform(0.01, 5)  # x1 > x2 or y1 > y2
    elif corruption == "fraction":
        rois[i, 0] += 0.5
    elif corruption == "sliver":
        rois[i, 0] += 2.0**-30  # a fraction float64 RoIs keep, float32 ones round away
    elif corruption == "negative":
        rois[i, 0] = -1
    elif corruption == "beyond":
        rois[i, 0] = 3
    elif corruption == "huge":
        rois[i, 3:] = 1e39  # beyond float32, and beyond 2**24 cells in float64
    elif corruption == "edge":
        rois[i, 3:] = 2.0**25 * rng.choice([1.0, np.nextafter(1.0, 2.0)])  # times 0.5: 2**24 cells, or just over
    with np.errstate(over="ignore", invalid="ignore"):
        rois = rois.astype(rois_dtype)  # 1e39 in float32: inf
        cast = rois.astype(features_dtype)
    return rois, cast


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]), st.sampled_from([np.float32, np.float64]),
       st.sampled_from(CORRUPTIONS))
def test_one_pass_roi_check_agrees_with_the_step_by_step_checks(seed, rois_dtype, features_dtype, corruption):
    """``_rois_valid`` (one compiled pass, the common case) accepts exactly the RoIs that
    the step-by-step checks, which word the errors, accept: run both on valid RoIs with
    at most one corruption each."""
    rois, cast = corrupted_rois(seed, rois_dtype, features_dtype, corruption)
    fast = roi._rois_valid(rois, cast, 3, np.dtype(features_dtype).type(0.5), roi.MAX_ROI_CELLS)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(roi, "_rois_valid", lambda *args: False)  # go through every step-by-step check
            roi._check_rois(rois, 3, features_dtype, 0.5, "test")
    except AssertionError:
        slow = True  # no step found a fault
    except ValueError:
        slow = False
    assert fast == slow
    if corruption == "none":
        assert fast


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the simulator's float32(1e39)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("rois_dtype, features_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                                        (np.float64, np.float32), (np.float32, np.float64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_check_device_rois_as_the_host_does(seed, rois_dtype, features_dtype, corruption):
    """Device RoIs with device features are not copied back to be checked: the kernels
    check them (``_check_rois`` runs only to word a fault they flag). Each function
    raises exactly when the host path does, with its words, and otherwise gives its
    numbers."""
    rois, cast = corrupted_rois(seed, rois_dtype, features_dtype, corruption)
    valid = roi._rois_valid(rois, cast, 3, np.dtype(features_dtype).type(0.5), roi.MAX_ROI_CELLS)
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((3, 2, 5, 6)).astype(features_dtype)  # (N, C, H, W)
    grad = rng.standard_normal((len(rois), 2, 2, 2)).astype(features_dtype)  # (R, C, 2, 2)
    calls = {
        "roi_pool": lambda f, r, g: roi_pool(f, r, 2, 0.5)[0],
        "roi_align": lambda f, r, g: roi_align(f, r, 2, 0.5, sampling_ratio=2),
        "roi_align_backward": lambda f, r, g: roi_align_backward(g, r, features.shape, 0.5, sampling_ratio=2),
    }
    checks = []
    real_check = roi._check_rois

    def counted(*args):
        checks.append(args[-1])
        return real_check(*args)

    for name, call in calls.items():
        try:
            expected, message = call(features, rois, grad), None
        except ValueError as e:
            expected, message = None, str(e)
        assert (message is None) == valid, message
        checks.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(roi, "_check_rois", counted)
            if valid:
                got = call(cuda.to_device(features), cuda.to_device(rois), cuda.to_device(grad)).copy_to_host()
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
            else:
                with pytest.raises(ValueError) as raised:
                    call(cuda.to_device(features), cuda.to_device(rois), cuda.to_device(grad))
                assert str(raised.value) == message
        assert checks == ([] if valid else [name])  # the host checks ran only to word the fault


def test_roi_coordinate_bound_is_inclusive():
    f = np.ones((1, 1, 4, 4), np.float32)
    edge = float(2**25)  # times 0.5: exactly 2**24 cells
    rois = np.array([[0, -edge, -edge, edge, edge]])
    out, argmax = roi_pool(f, rois, 1, 0.5)
    assert out.ravel().tolist() == [1] and argmax.ravel().tolist() == [0]
    assert roi_align(f, rois, 1, 0.5, 1).shape == (1, 1, 1, 1)
    rois[0, 3] = np.nextafter(edge, np.inf)
    with pytest.raises(ValueError, match=r"rois\[0\]"):
        roi_pool(f.astype(np.float64), rois, 1, 0.5)


@pytest.mark.parametrize("sampling_ratio", [2**32, 2**31, 2**20, 1025, -1025, -2**70])
def test_huge_sampling_ratio_is_rejected(sampling_ratio):
    f, rois = np.zeros((1, 1, 4, 4)), np.array([[0, 0, 0, 2, 2]], float)
    match = r"sampling_ratio must lie in \[-1024, 1024\]"
    with pytest.raises(ValueError, match="roi_align: " + match):
        roi_align(f, rois, 7, 1.0, sampling_ratio)
    with pytest.raises(ValueError, match="roi_align_backward: " + match):
        roi_align_backward(np.zeros((1, 1, 7, 7)), rois, f.shape, 1.0, sampling_ratio)
    with pytest.raises(ValueError, match="RoIAlign: " + match):
        RoIAlign(7, 1.0, sampling_ratio)


@pytest.mark.parametrize("to", [np.asarray, cuda.to_device], ids=["cpu", "cuda"])
def test_roi_needing_too_many_samples_is_rejected_on_both_paths(to, monkeypatch):
    f = to(np.zeros((1, 1, 4, 4), np.float32))
    # Adaptive grid: the RoI is 62500 cells a side, ceil(62500 / 7) = 8929 samples a bin side.
    rois = to(np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1e6, 1e6]], np.float32))
    match = (r"rois\[1\] needs 3906625009 bilinear samples \(7 x 7 bins of 8929 x 8929\), more than the "
             r"2097152 one RoI may take; clip the RoIs to the feature map or pass a smaller sampling_ratio")
    with pytest.raises(ValueError, match="roi_align: " + match):
        roi_align(f, rois, 7, 1 / 16)
    with pytest.raises(ValueError, match="roi_align_backward: " + match):
        roi_align_backward(to(np.zeros((2, 1, 7, 7), np.float32)), rois, f.shape, 1 / 16)
    with pytest.raises(ValueError, match=r"rois\[0\] needs 4194304 bilinear samples \(2 x 2 bins of 1024 x 1024\)"):
        roi_align(f, rois, 2, 1 / 16, 1024)
    monkeypatch.setattr(roi, "MAX_ROI_SAMPLES", 16)
    small = to(np.array([[0, 0, 0, 1, 1]], np.float32))
    assert roi_align(f, small, 2, 1 / 16, 2).shape == (1, 1, 2, 2)  # 16 samples: exactly the limit
    with pytest.raises(ValueError, match=r"rois\[0\] needs 24 bilinear samples"):
        roi_align(f, small, (2, 3), 1 / 16, 2)


def test_default_detector_rois_are_far_from_the_sample_limit():
    # Its largest RoI: a whole 128 x 128 image at scale 1/8 (a 16 x 16 map), 7 x 7 bins.
    rois = np.array([[0, 0, 0, 128, 128]], np.float32)
    for sampling_ratio, grid in [(2, 2), (-1, 3)]:
        geometry = roi._align_geometry(rois, 1 / 8, 7, 7, sampling_ratio, True)
        assert geometry[4].tolist() == geometry[5].tolist() == [grid]
    assert 7 * 7 * 3 * 3 < roi.MAX_ROI_SAMPLES // 1000
