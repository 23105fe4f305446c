"""Anchors: k reference boxes of several scales and aspect ratios at every feature cell.

"At each sliding-window location, we simultaneously predict multiple region proposals
... The k proposals are parameterized relative to k reference boxes, which we call
anchors. An anchor is centered at the sliding window in question, and is associated
with a scale and aspect ratio" (Ren et al. 2015, sec. 3.1.1; the paper uses 3 scales,
box areas 128^2, 256^2, 512^2, and 3 ratios 1:1, 1:2, 2:1, so k = 9).

Order of the k anchors at a location: ratios outer, scales inner (anchor
``a = r * len(scales) + s``), as in py-faster-rcnn and torchvision. Anchor ``a`` at
feature cell ``(y, x)`` is row ``(y * W + x) * k + a``, centred at
``((x + 0.5) * stride, (y + 0.5) * stride)``. These are a few broadcast NumPy lines, so
there is no kernel; they take and return NumPy arrays.
"""

import numpy as np

from .checks import check_boxes, check_non_negative_int, check_number

MAX_ANCHORS = 2**40  # rows of grid_anchors' output (32 TiB in float64): beyond any real map


def _positive_numbers(values, name, where):
    if np.ndim(values) == 0 or len(values) == 0:
        raise ValueError(f"{where}: {name} must be a non-empty sequence of positive numbers, got {values!r}")
    return np.array([check_number(v, name, low=0, low_open=True, where=where) for v in values])


def base_anchors(base_size=16, scales=(8, 16, 32), ratios=(0.5, 1, 2)):
    """(k, 4) float32 anchors centred on (0, 0), k = len(ratios) * len(scales).

    Anchor (r, s) has side ``size = base_size * scales[s]`` and aspect ratio
    ``h / w = ratios[r]`` at area ``size^2``: ``w = size / sqrt(ratio)``,
    ``h = size * sqrt(ratio)``, box ``(-w/2, -h/2, w/2, h/2)``. Ratios outer, scales
    inner. Unlike torchvision's AnchorGenerator, coordinates are not rounded to
    integers: areas and ratios are exact.
    """
    where = "base_anchors"
    base_size = check_number(base_size, "base_size", low=0, low_open=True, where=where)
    scales = _positive_numbers(scales, "scales", where)
    ratios = _positive_numbers(ratios, "ratios", where)
    sizes = base_size * scales  # (S,)
    w = (sizes[None, :] / np.sqrt(ratios)[:, None]).reshape(-1)  # (R * S,)
    h = (sizes[None, :] * np.sqrt(ratios)[:, None]).reshape(-1)  # (R * S,)
    with np.errstate(over="ignore", under="ignore"):
        anchors = (np.stack([-w, -h, w, h], axis=1) / 2).astype(np.float32)  # (k, 4)
    if not np.isfinite(anchors).all():
        raise ValueError(f"{where}: base_size {base_size!r} x scales x sqrt(ratios) overflows float32")
    if (anchors[:, 2] <= anchors[:, 0]).any() or (anchors[:, 3] <= anchors[:, 1]).any():
        raise ValueError(f"{where}: base_size {base_size!r} x scales x sqrt(ratios) underflows float32 "
                         "(an anchor of zero size)")
    return anchors


def grid_anchors(base, feat_height, feat_width, stride):
    """All anchors over an H x W feature map: (H * W * k, 4), dtype of ``base``.

    Row ``(y * W + x) * k + a`` is ``base[a]`` shifted to the centre of cell (y, x)
    in image coordinates, ``((x + 0.5) * stride, (y + 0.5) * stride)``.
    """
    where = "grid_anchors"
    base = check_boxes(base, "base", where)
    feat_height = check_non_negative_int(feat_height, "feat_height", where)
    feat_width = check_non_negative_int(feat_width, "feat_width", where)
    stride = check_number(stride, "stride", low=0, low_open=True, where=where)
    if feat_height * feat_width * base.shape[0] > MAX_ANCHORS:
        raise ValueError(f"{where}: a {feat_height} x {feat_width} grid of {base.shape[0]} anchors is more than "
                         f"MAX_ANCHORS = {MAX_ANCHORS}")
    if feat_height * feat_width == 0:
        return np.zeros((0, 4), base.dtype)  # (0, 4), however long the other side
    cx = (np.arange(feat_width) + 0.5) * stride  # (W,)
    cy = (np.arange(feat_height) + 0.5) * stride  # (H,)
    cy, cx = np.meshgrid(cy, cx, indexing="ij")  # (H, W) each
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)  # (H * W, 1, 4)
    with np.errstate(over="ignore"):
        anchors = (shifts + base[None, :, :]).reshape(-1, 4).astype(base.dtype)  # (H * W * k, 4)
    if not np.isfinite(anchors).all():
        raise ValueError(f"{where}: the grid (feat_height, feat_width) x stride {stride!r} overflows "
                         f"{anchors.dtype.name}")
    return anchors
