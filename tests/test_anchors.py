import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfrcnn.anchors import base_anchors, grid_anchors


def sizes(anchors):
    return anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]


def test_base_anchors_paper_default():
    a = base_anchors()
    assert a.shape == (9, 4) and a.dtype == np.float32
    w, h = sizes(a.astype(np.float64))
    np.testing.assert_allclose(w * h, np.tile([128.0**2, 256.0**2, 512.0**2], 3), rtol=1e-6)
    np.testing.assert_allclose(h / w, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-6)
    np.testing.assert_allclose(a[:, :2] + a[:, 2:], 0, atol=1e-4)  # centred on (0, 0)
    np.testing.assert_array_equal(a[4], [-128, -128, 128, 128])


def test_base_anchors_order_is_ratios_outer_scales_inner():
    a = base_anchors(base_size=1, scales=(16, 32), ratios=(1, 4)).astype(np.float64)
    np.testing.assert_allclose(a, [[-8, -8, 8, 8], [-16, -16, 16, 16],
                                   [-4, -16, 4, 16], [-8, -32, 8, 32]], rtol=1e-7)


@settings(max_examples=50, deadline=None)
@given(st.floats(1, 64), st.lists(st.floats(0.25, 8), min_size=1, max_size=4),
       st.lists(st.floats(0.2, 5), min_size=1, max_size=4))
def test_base_anchor_areas_and_ratios(base_size, scales, ratios):
    a = base_anchors(base_size, scales, ratios).astype(np.float64)
    assert a.shape == (len(scales) * len(ratios), 4)
    w, h = sizes(a)
    expected_side = base_size * np.tile(scales, len(ratios))
    np.testing.assert_allclose(np.sqrt(w * h), expected_side, rtol=1e-6)
    np.testing.assert_allclose(h / w, np.repeat(ratios, len(scales)), rtol=1e-6)


def test_grid_anchors_row_order_and_centres():
    base = base_anchors(base_size=8, scales=(2, 4, 8), ratios=(0.5, 1, 2))
    H, W, k, stride = 3, 5, 9, 8
    grid = grid_anchors(base, H, W, stride)
    assert grid.shape == (H * W * k, 4) and grid.dtype == np.float32
    for y in range(H):
        for x in range(W):
            for a in range(k):
                centre = np.array([(x + 0.5) * stride, (y + 0.5) * stride] * 2, np.float32)
                np.testing.assert_allclose(grid[(y * W + x) * k + a], base[a] + centre, rtol=1e-6)
    centres = (grid[:, :2] + grid[:, 2:]) / 2
    np.testing.assert_allclose(centres[0], [4, 4], atol=1e-5)
    np.testing.assert_allclose(centres[-1], [(W - 0.5) * 8, (H - 0.5) * 8], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.floats(1, 32))
def test_grid_anchors_shift_base_by_cell_centres(H, W, stride):
    base = base_anchors(4, (1, 2), (0.5, 2)).astype(np.float64)
    grid = grid_anchors(base, H, W, stride).reshape(H, W, 4, 4)
    assert grid.dtype == np.float64
    ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    shift = grid - base[None, None]  # (H, W, k, 4)
    np.testing.assert_allclose(shift[..., 0], ((xs + 0.5) * stride)[..., None].repeat(4, -1), atol=1e-9)
    np.testing.assert_allclose(shift[..., 1], ((ys + 0.5) * stride)[..., None].repeat(4, -1), atol=1e-9)
    np.testing.assert_allclose(shift[..., 0], shift[..., 2], atol=1e-9)


def test_empty_feature_map_gives_no_anchors():
    out = grid_anchors(base_anchors(), 0, 7, 16)
    assert out.shape == (0, 4) and out.dtype == np.float32
    # However long the other side: no (W,) row of centres is made for an empty grid.
    for h, w in [(0, 10**30), (10**30, 0)]:
        assert grid_anchors(base_anchors().astype(np.float64), h, w, 16).shape == (0, 4)


@pytest.mark.parametrize("call, message", [
    (lambda: base_anchors(0), "base_size"),
    (lambda: base_anchors(16, scales=()), "scales"),
    (lambda: base_anchors(16, scales=(1, -2)), "scales"),
    (lambda: base_anchors(16, ratios=(0,)), "ratios"),
    (lambda: base_anchors(16, ratios=(float("nan"),)), "ratios"),
    (lambda: base_anchors(16, scales=8), "scales"),
    (lambda: base_anchors(16, scales=np.array(8)), "scales must be a non-empty sequence"),
    (lambda: base_anchors(1e30, scales=(1e10,)), "overflows float32"),
    (lambda: base_anchors(1e-300), "underflows float32"),
    (lambda: base_anchors(0), "base_anchors: base_size must be > 0, got 0"),
    (lambda: base_anchors(-16), "base_anchors: base_size must be > 0, got -16"),
    (lambda: base_anchors(16, scales=(8, 0)), "base_anchors: scales must be > 0, got 0"),
    (lambda: base_anchors(16, ratios=(1, 0.0)), r"base_anchors: ratios must be > 0, got 0\.0"),
    (lambda: base_anchors(1e-30, scales=(1,), ratios=(1e30,)), "underflows float32"),  # width 1e-45 rounds to 0
    (lambda: base_anchors(1e-30, scales=(1,), ratios=(1e-30,)), "underflows float32"),  # height 1e-45 rounds to 0
    (lambda: grid_anchors(np.zeros((9, 3), np.float32), 2, 2, 16), "base"),
    (lambda: grid_anchors(np.zeros((9, 4), np.int64), 2, 2, 16), "base"),
    (lambda: grid_anchors(np.full((9, 4), np.nan, np.float32), 2, 2, 16), "base"),
    (lambda: grid_anchors(np.array([[8, -8, -8, 8]], np.float32), 2, 2, 16), r"base\[0\] .* x2 < x1"),
    (lambda: grid_anchors(base_anchors(), -1, 2, 16), "feat_height"),
    (lambda: grid_anchors(base_anchors(), 2, 2.5, 16), "feat_width"),
    (lambda: grid_anchors(base_anchors(), 2, 2, 0), "stride"),
    (lambda: grid_anchors(base_anchors(), 2, 2, 3e38), r"x stride 3e\+38 overflows float32"),
    (lambda: grid_anchors(base_anchors(), 2**63 - 1, 1, 16), "is more than MAX_ANCHORS"),
    (lambda: grid_anchors(base_anchors(), 2, 2, 10**400), "stride must be finite"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
