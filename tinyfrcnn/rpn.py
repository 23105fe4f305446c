"""The Region Proposal Network: a small conv head, its loss, and the proposal layer.

The paper (section 3.1): "we slide a small network over the convolutional feature map
... each sliding window is mapped to a lower-dimensional feature ... fed into two
sibling fully-connected layers, a box-regression layer (reg) and a box-classification
layer (cls)", implemented as a 3x3 conv followed by two 1x1 convs. At each position
there are k anchors, so cls has 2k outputs (object / not object, softmax) and reg 4k
(t_x, t_y, t_w, t_h).

The proposal layer turns the head's outputs into boxes for the Fast R-CNN head: decode
the deltas on the anchors, clip to the image, drop tiny boxes, keep the top-scoring
ones, NMS, keep the top again. Proposals are constants for backpropagation: no gradient
flows through their coordinates (the paper's "approximate joint training").

The head is built from ``tinyfrcnn.layers`` (their kernels do the work) and runs on
NumPy arrays or, moved with ``.to("cuda")``, on numba device arrays; the loss from
``tinyfrcnn.losses``; the proposal layer from ``tinyfrcnn.boxes`` and ``tinyfrcnn.nms``.
The loss and the proposal layer take NumPy arrays: they read a few thousand numbers
per image, and their sorting and sampling belong on the host.
"""

from dataclasses import dataclass

import numpy as np
from numba import cuda

from .boxes import _clip_boxes, _decode, _large_boxes, box_iou
from .checks import (as_float_array, cast_finite, check_array_fits, check_boxes, check_finite, check_non_negative_int,
                     check_number, check_positive_int, check_rng)
from .device import empty_on_device, grid_1d, is_device_array, launch
from .layers import Conv2d, Module, Parameter, ReLU, _add_cuda, _flat
from .losses import _as_labels, _smooth_l1_beta, _smooth_l1_slices, _softmax_cross_entropy_slices
from .nms import _descending_order, _nms_sorted_segments


def _host(x, name, where):
    if is_device_array(x):
        raise ValueError(f"{where}: {name} is a CUDA device array; pass a NumPy array")
    return x


# ---------------------------------------------------------------- anchor rows


def _to_anchor_rows_reference(maps, num_anchors):
    n, c, h, w = maps.shape
    d = c // num_anchors
    return maps.reshape(n, num_anchors, d, h, w).transpose(0, 3, 4, 1, 2).reshape(n, h * w * num_anchors, d)


@cuda.jit
def _to_anchor_rows_cuda(maps, k, d, hw, rows):
    """rows[n, cell*k + a, j] = maps[n, a*d + j, cell], both flat; one thread per row entry."""
    t = cuda.grid(1)
    if t < rows.size:
        j = t % d
        a = (t // d) % k
        cell = (t // (d * k)) % hw
        n = t // (d * k * hw)
        rows[t] = maps[(n * k * d + a * d + j) * hw + cell]


@cuda.jit
def _from_anchor_rows_cuda(rows, k, d, hw, maps):
    """The inverse: maps[n, c, cell] = rows[n, cell*k + c // d, c % d]; one thread per map entry."""
    t = cuda.grid(1)
    if t < maps.size:
        cell = t % hw
        c = (t // hw) % (k * d)
        n = t // (hw * k * d)
        maps[t] = rows[((n * hw + cell) * k + c // d) * d + c % d]


def to_anchor_rows(maps, num_anchors):
    """A 1x1 conv's output (N, k*D, H, W) as one row per anchor: (N, H*W*k, D).

    Channel ``a*D + j`` at cell (y, x) goes to row ``(y*W + x)*k + a``, column ``j``:
    the row order of ``tinyfrcnn.anchors.grid_anchors``. It only moves numbers. NumPy
    in: reshape to (N, k, D, H, W), transpose to (N, H, W, k, D), flatten; device array
    in: one CUDA thread per output entry, device array out.
    """
    where = "to_anchor_rows"
    maps = as_float_array(maps, "maps", ndim=4, where=where)
    k = check_positive_int(num_anchors, "num_anchors", where)
    n, c, h, w = maps.shape
    if c % k:
        raise ValueError(f"{where}: maps has {c} channels, not a multiple of num_anchors={k}")
    d = c // k
    if not is_device_array(maps):
        return np.ascontiguousarray(_to_anchor_rows_reference(maps, k))
    if not maps.is_c_contiguous():
        raise ValueError(f"{where}: maps must be C-contiguous on the device")
    rows = empty_on_device((n, h * w * k, d), dtype=maps.dtype)  # (N, H*W*k, D)
    if rows.size:
        launch(_to_anchor_rows_cuda, *grid_1d(rows.size), _flat(maps), k, d, h * w, _flat(rows))
    return rows


def from_anchor_rows(rows, num_anchors, height, width):
    """The inverse of ``to_anchor_rows`` (and so its backward): (N, H*W*k, D) ->
    (N, k*D, H, W). NumPy in: NumPy out; device array in: CUDA kernel, device array out."""
    where = "from_anchor_rows"
    rows = as_float_array(rows, "rows", ndim=3, where=where)
    k = check_positive_int(num_anchors, "num_anchors", where)
    h = check_non_negative_int(height, "height", where)
    w = check_non_negative_int(width, "width", where)
    n, num, d = rows.shape
    if num != h * w * k:
        raise ValueError(f"{where}: rows has {num} rows, but height*width*num_anchors = {h}*{w}*{k} = {h * w * k}")
    check_array_fits((n, k * d, h, w), "(N, num_anchors*D, height, width)", where)
    if not is_device_array(rows):
        return np.ascontiguousarray(rows.reshape(n, h, w, k, d).transpose(0, 3, 4, 1, 2).reshape(n, k * d, h, w))
    if not rows.is_c_contiguous():
        raise ValueError(f"{where}: rows must be C-contiguous on the device")
    maps = empty_on_device((n, k * d, h, w), dtype=rows.dtype)  # (N, k*D, H, W)
    if maps.size:
        launch(_from_anchor_rows_cuda, *grid_1d(maps.size), _flat(rows), k, d, h * w, _flat(maps))
    return maps


# ---------------------------------------------------------------- head


class RPNHead(Module):
    """3x3 conv (padding 1) + ReLU, then sibling 1x1 convs: cls (2k) and reg (4k).

    Weights ~ N(0, 0.01^2) and biases 0, as the paper initialises new layers.

    Channel layout: cls channel ``2a + j`` is anchor ``a``'s logit for class ``j``
    (0 background, 1 object); reg channel ``4a + d`` is its delta ``d`` of
    (t_x, t_y, t_w, t_h). ``forward`` reshapes (N, 2k, H, W) -> (N, k, 2, H, W),
    transposes to (N, H, W, k, 2) and flattens to (N, H*W*k, 2) (``to_anchor_rows``),
    so row ``(y*W + x)*k + a`` is anchor ``a`` at cell (y, x), the row order of
    ``tinyfrcnn.anchors.grid_anchors``. ``backward`` undoes the same steps
    (``from_anchor_rows``).

    On the device (``.to("cuda")``, device features in) the three convs and the
    permutation run as CUDA kernels and the outputs are device arrays; ``backward``
    then takes device gradients.
    """

    def __init__(self, in_channels, mid_channels, num_anchors, rng=None):
        where = "RPNHead"
        in_channels = check_positive_int(in_channels, "in_channels", where)
        mid_channels = check_positive_int(mid_channels, "mid_channels", where)
        self.num_anchors = k = check_positive_int(num_anchors, "num_anchors", where)
        rng = np.random.default_rng(0) if rng is None else check_rng(rng, where)
        self.conv = Conv2d(in_channels, mid_channels, 3, padding=1, rng=rng)
        self.relu = ReLU()
        self.cls = Conv2d(mid_channels, 2 * k, 1, rng=rng)
        self.reg = Conv2d(mid_channels, 4 * k, 1, rng=rng)
        for conv in (self.conv, self.cls, self.reg):
            conv.weight = Parameter((rng.standard_normal(conv.weight.shape) * 0.01).astype(np.float32))
            conv.bias = Parameter(np.zeros(conv.bias.shape, dtype=np.float32))
        self._shape = None

    def __repr__(self):
        return f"RPNHead(conv={self.conv!r}, num_anchors={self.num_anchors})"

    def forward(self, features):
        """features (N, C, H, W) -> (logits (N, H*W*k, 2), deltas (N, H*W*k, 4))."""
        hidden = self.relu.forward(self.conv.forward(features))  # (N, mid, H, W)
        n, _, h, w = hidden.shape
        k = self.num_anchors
        self._shape = (n, h, w, is_device_array(hidden))
        return to_anchor_rows(self.cls.forward(hidden), k), to_anchor_rows(self.reg.forward(hidden), k)

    def backward(self, grad_logits, grad_deltas):
        """Gradient w.r.t. the features; either gradient may be None (counted as zero)."""
        where = "RPNHead.backward"
        if self._shape is None:
            raise ValueError(f"{where}: backward called before forward")
        n, h, w, gpu = self._shape
        k = self.num_anchors
        grad_hidden = None
        for name, grad, width, conv in (("grad_logits", grad_logits, 2, self.cls),
                                        ("grad_deltas", grad_deltas, 4, self.reg)):
            if grad is None:
                continue
            grad = as_float_array(grad, name, ndim=3, where=where)
            if is_device_array(grad) != gpu:
                raise ValueError(f"{where}: {name} must be {'a CUDA device' if gpu else 'a NumPy'} array, "
                                 "like the forward's features")
            if tuple(grad.shape) != (n, h * w * k, width):
                raise ValueError(f"{where}: {name} must have shape {(n, h * w * k, width)}, got {tuple(grad.shape)}")
            g = conv.backward(from_anchor_rows(grad, k, h, w))  # (N, mid, H, W)
            if grad_hidden is None:
                grad_hidden = g
            elif gpu:
                launch(_add_cuda, *grid_1d(g.size), _flat(grad_hidden), _flat(g))
            else:
                grad_hidden = grad_hidden + g
        if grad_hidden is None:
            raise ValueError(f"{where}: grad_logits and grad_deltas are both None")
        return self.conv.backward(self.relu.backward(grad_hidden))


# ---------------------------------------------------------------- loss


def rpn_loss(logits, deltas, labels, reg_targets, sigma=3.0, lam=1.0):
    """The RPN's loss for one image and its gradients w.r.t. logits and deltas.

        L = 1/N_cls sum_i L_cls(p_i, p*_i) + lam 1/N_reg sum_i p*_i L_reg(t_i, t*_i)

    over the sampled anchors (``labels`` 1 positive, 0 negative, -1 not sampled): L_cls
    is softmax cross-entropy, L_reg smooth L1 with ``beta = 1 / sigma**2`` summed over
    the four coordinates, p*_i = 1 for positives only. Normalisation as py-faster-rcnn:
    N_cls = N_reg = the number of sampled anchors (256), lam = 1, sigma = 3. (The paper
    instead takes N_reg ~ 2400 anchor locations with lam = 10: about the same weight.)
    No sampled anchor: both losses 0 with zero gradients.

    logits (A, 2), deltas (A, 4), labels (A,) int, reg_targets (A, 4). Returns a dict:
    ``loss_cls``, ``loss_reg`` (lam included), floats; ``grad_logits`` (A, 2),
    ``grad_deltas`` (A, 4) in the dtypes of logits and deltas.
    """
    where = "rpn_loss"
    logits = as_float_array(_host(logits, "logits", where), "logits", ndim=2, where=where)
    deltas = as_float_array(_host(deltas, "deltas", where), "deltas", ndim=2, where=where)
    reg_targets = as_float_array(_host(reg_targets, "reg_targets", where), "reg_targets", ndim=2, where=where)
    labels = _as_labels(_host(labels, "labels", where), where)
    num = logits.shape[0]
    for name, a, width in (("logits", logits, 2), ("deltas", deltas, 4), ("reg_targets", reg_targets, 4)):
        if a.shape != (num, width):
            raise ValueError(f"{where}: {name} must have shape ({num}, {width}), got {a.shape}")
    if labels.shape[0] != num:
        raise ValueError(f"{where}: labels has {labels.shape[0]} entries but logits has {num} rows")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < -1 or labels.max() > 1)):
        raise ValueError(f"{where}: labels must be integers in {{-1, 0, 1}}, got dtype {labels.dtype.name}, "
                         f"values {np.unique(labels)[:5].tolist()}")
    beta = _smooth_l1_beta(sigma, where)
    lam = check_number(lam, "lam", low=0.0, where=where)
    with np.errstate(over="ignore"):  # an overflow to inf is reported just below
        reg_targets = reg_targets.astype(deltas.dtype, copy=False)
    for name, a in (("logits", logits), ("deltas", deltas), ("reg_targets", reg_targets)):
        check_finite(a, name, where)
    return _rpn_loss(logits, deltas, labels, reg_targets, beta, lam)


def _rpn_loss(logits, deltas, labels, reg_targets, beta, lam):
    """``rpn_loss`` of checked NumPy arguments (finite, shapes agreeing, reg_targets in
    the deltas' dtype), with the smooth L1 ``beta`` worked out from sigma."""
    out = _rpn_loss_batch(logits[None], deltas[None], labels[None], reg_targets[None], beta, lam)
    return {name: value[0] for name, value in out.items()}


def _rpn_loss_batch(logits, deltas, labels, reg_targets, beta, lam):
    """``_rpn_loss`` of N images at once: logits (N, A, 2), deltas (N, A, 4), labels (N, A),
    reg_targets (N, A, 4). Each image is normalised by its own sampled anchors; returns
    the per-image losses as lists and the gradients as (N, A, 2) and (N, A, 4), the
    numbers of one ``_rpn_loss`` per image."""
    n, a = labels.shape
    loss_cls, grad_logits = _softmax_cross_entropy_slices(logits.reshape(n * a, 2), labels.reshape(n * a), -1, n)
    scales = [lam / int(c) if c else 0.0 for c in (labels >= 0).sum(axis=1)]  # lam / N_reg per image
    p_star = np.repeat((labels == 1)[:, :, None], 4, axis=2).astype(deltas.dtype)  # (N, A, 4)
    loss_reg, grad_deltas = _smooth_l1_slices(deltas, reg_targets, beta, p_star, n)
    scale_rows = np.array(scales, dtype=deltas.dtype)[:, None, None]  # (N, 1, 1)
    return {"loss_cls": loss_cls, "loss_reg": [loss * scale for loss, scale in zip(loss_reg, scales)],
            "grad_logits": grad_logits.reshape(n, a, 2), "grad_deltas": (grad_deltas * scale_rows).astype(deltas.dtype)}


# ---------------------------------------------------------------- proposals


@dataclass(frozen=True)
class ProposalSettings:
    """How many boxes the proposal layer keeps, before and after NMS.

    The paper, on ~600x1000 images with ~20000 anchors: 12000 -> NMS 0.7 -> 2000 in
    training, 6000 -> 300 at test (the top-N before NMS are py-faster-rcnn's settings).
    The shapes images (128x128, a 16x16 feature map at stride 8, k = 5) have only 1280
    anchors, so: training keeps 2000 before NMS (all of them, as the paper keeps most)
    and 500 after, plenty for sampling 64-128 RoIs on images with a few objects; test
    keeps 1000 -> 300, the paper's 300 that its section 4 shows are enough. ``min_size``
    2 px only removes degenerate boxes: the smallest shapes are about 8 px, and
    py-faster-rcnn's 16 px is its stride at 600 px.
    """

    pre_nms_top_n: int
    post_nms_top_n: int
    nms_thresh: float = 0.7
    min_size: float = 2.0


TRAIN_PROPOSALS = ProposalSettings(pre_nms_top_n=2000, post_nms_top_n=500)
TEST_PROPOSALS = ProposalSettings(pre_nms_top_n=1000, post_nms_top_n=300)


def objectness(logits):
    """P(object) = softmax(logits)[:, 1] = 1 / (1 + exp(l0 - l1)), computed without overflow
    (a gap l1 - l0 past the dtype's range gives exactly 1 or 0).

    logits: (A, 2) float32/float64 NumPy array, finite. Returns (A,) of its dtype.
    """
    where = "objectness"
    logits = as_float_array(_host(logits, "logits", where), "logits", ndim=2, where=where)
    if logits.shape[1] != 2:
        raise ValueError(f"{where}: logits must have shape (A, 2), got {logits.shape}")
    return _objectness(check_finite(logits, "logits", where))


def _objectness(logits):
    """``objectness`` of checked logits (A, 2)."""
    with np.errstate(over="ignore"):
        z = logits[:, 1] - logits[:, 0]
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(logits.dtype)


def generate_proposals(logits, deltas, anchors, image_size, pre_nms_top_n=TEST_PROPOSALS.pre_nms_top_n,
                       post_nms_top_n=TEST_PROPOSALS.post_nms_top_n, nms_thresh=TEST_PROPOSALS.nms_thresh,
                       min_size=TEST_PROPOSALS.min_size):
    """The proposal layer: boxes (P, 4) and their objectness (P,), highest score first.

    ``logits`` (A, 2) are the head's (the softmax object probability is the score; equal
    scores, common in float32, rank by the logit gap l1 - l0) or (A,) scores given
    directly. py-faster-rcnn's order: decode ``deltas`` (A, 4) on
    ``anchors`` (A, 4), clip to ``image_size`` (h, w), drop boxes narrower or shorter
    than ``min_size``, keep the ``pre_nms_top_n`` highest scores, NMS at ``nms_thresh``,
    keep the first ``post_nms_top_n``. Defaults: ``TEST_PROPOSALS``; training uses
    ``TRAIN_PROPOSALS``. The proposals are constants for backprop (no gradient).
    One image of ``generate_proposals_batch``.
    """
    where = "generate_proposals"
    logits = as_float_array(_host(logits, "logits", where), "logits", where=where)
    deltas = as_float_array(_host(deltas, "deltas", where), "deltas", ndim=2, where=where)
    if not (logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 2)):
        raise ValueError(f"{where}: logits must be (A, 2) logits or (A,) scores, got shape {logits.shape}")
    if deltas.shape != (logits.shape[0], 4) or np.shape(anchors) != (logits.shape[0], 4):
        raise ValueError(f"{where}: logits {logits.shape}, deltas {deltas.shape} and anchors "
                         f"{np.shape(anchors)} must describe the same A anchors ((A, 2) or (A,), (A, 4), (A, 4))")
    return generate_proposals_batch(logits[None], deltas[None], anchors, image_size, pre_nms_top_n,
                                    post_nms_top_n, nms_thresh, min_size, where=where)[0]


def generate_proposals_batch(logits, deltas, anchors, image_size, pre_nms_top_n=TEST_PROPOSALS.pre_nms_top_n,
                             post_nms_top_n=TEST_PROPOSALS.post_nms_top_n, nms_thresh=TEST_PROPOSALS.nms_thresh,
                             min_size=TEST_PROPOSALS.min_size, where="generate_proposals_batch"):
    """``generate_proposals`` for a batch of N images that share ``anchors`` (A, 4) and
    ``image_size``: ``logits`` (N, A, 2) or scores (N, A), ``deltas`` (N, A, 4). Returns
    one (boxes (P_i, 4), scores (P_i,)) pair per image, the same as ``generate_proposals``
    on each image alone, in one pass: decoding and the top-n cut run on the whole batch,
    and NMS once, with each image's boxes as a category of their own.
    """
    logits = as_float_array(_host(logits, "logits", where), "logits", where=where)
    deltas = as_float_array(_host(deltas, "deltas", where), "deltas", ndim=3, where=where)
    anchors = as_float_array(_host(anchors, "anchors", where), "anchors", ndim=2, where=where)
    num = anchors.shape[0]
    if not (logits.ndim == 2 or (logits.ndim == 3 and logits.shape[2] == 2)):
        raise ValueError(f"{where}: logits must be (N, A, 2) logits or (N, A) scores, got shape {logits.shape}")
    n = logits.shape[0]
    if logits.shape[1] != num or deltas.shape != (n, num, 4) or anchors.shape != (num, 4):
        raise ValueError(f"{where}: logits {logits.shape}, deltas {deltas.shape} and anchors {anchors.shape} "
                         "must describe the same A anchors ((N, A, 2) or (N, A), (N, A, 4), (A, 4))")
    check_finite(logits, "logits", where)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"{where}: image_size must be a (height, width) pair, got {image_size!r}")
    height = check_number(image_size[0], "image_size", low=0, low_open=True, where=where)
    width = check_number(image_size[1], "image_size", low=0, low_open=True, where=where)
    pre_nms_top_n = check_positive_int(pre_nms_top_n, "pre_nms_top_n", where)
    post_nms_top_n = check_positive_int(post_nms_top_n, "post_nms_top_n", where)
    nms_thresh = check_number(nms_thresh, "nms_thresh", low=0.0, high=1.0, where=where)
    min_size = check_number(min_size, "min_size", low=0.0, where=where)
    check_boxes(anchors, "anchors", where)
    check_finite(deltas, "deltas", where)
    anchors = cast_finite(anchors, deltas.dtype, "anchors", "deltas", where)
    return _proposals_batch(logits, deltas, anchors, height, width, pre_nms_top_n, post_nms_top_n, nms_thresh, min_size)


def _proposals_batch(logits, deltas, anchors, height, width, pre_nms_top_n, post_nms_top_n, nms_thresh, min_size):
    """``generate_proposals_batch`` of checked arguments: finite ``logits`` (N, A, 2) or
    scores (N, A), ``deltas`` (N, A, 4), valid ``anchors`` (A, 4) in the deltas' dtype."""
    n, num = deltas.shape[:2]
    scores = logits if logits.ndim == 2 else None
    unit = (deltas.dtype.type(1),) * 4  # the RPN's box weights
    boxes = _decode(np.tile(anchors, (n, 1)), deltas.reshape(n * num, 4), unit)  # (N * A, 4)
    boxes = _clip_boxes(boxes, height, width)  # (N * A, 4); finite deltas decode to no NaN
    big = _large_boxes(boxes, min_size).reshape(n, num)  # (N, A)
    # Each image's boxes by decreasing score, small ones last (scores are finite); then
    # the first pre_nms_top_n, less the small ones.
    if scores is None:
        # Equal scores rank by the logit gap l1 - l0, then by index. In float32 the
        # probability rounds to 1.0 once the gap passes about 17, and near 0.5 gaps a few
        # 1e-8 apart share one value. The gap alone would not do: rounding can give the
        # larger gap a probability one ulp smaller, and the scores must come out sorted.
        flat_logits = logits.reshape(n * num, 2)  # (N * A, 2)
        with np.errstate(over="ignore"):
            gap = np.subtract(flat_logits[:, 1], flat_logits[:, 0], dtype=np.float64)  # (N * A,)
        scores = _objectness(flat_logits).reshape(n, num)  # (N, A)
        ranked = np.where(big, scores, -np.inf)  # (N, A)
        top = _descending_order(ranked, ties=gap.reshape(n, num))[:, :pre_nms_top_n]  # (N, T)
    else:
        top = _descending_order(np.where(big, scores, -np.inf))[:, :pre_nms_top_n]  # (N, T)
    take = np.take_along_axis(big, top, axis=1)  # (N, T)
    flat = (top + num * np.arange(n)[:, None])[take]  # (M,) candidates, image-major, by score
    cand_boxes, cand_scores = np.take(boxes, flat, axis=0), scores.reshape(n * num)[flat]  # (M, 4), (M,)
    # NMS with each image as a category, as batched_nms would do it; the candidates
    # already lie in its order (image by image, by decreasing score), so no sort is needed.
    starts = np.concatenate([[0], np.cumsum(take.sum(axis=1))])  # (N + 1,)
    keep = _nms_sorted_segments(cand_boxes, starts, nms_thresh, min(post_nms_top_n, num))  # (K,) image-major
    bounds = np.searchsorted(keep, starts)  # (N + 1,): image i kept keep[bounds[i]:bounds[i + 1]]
    return [(np.take(cand_boxes, keep[a:b], axis=0), cand_scores[keep[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------- evaluation


def _per_image(values, name, where):
    """``values`` as a list with one entry per image."""
    try:
        values = iter(values)
    except TypeError:
        raise ValueError(f"{where}: {name} must be a list with one entry per image, "
                         f"got {type(values).__name__}") from None
    return list(values)


def proposal_recall(proposals_per_image, gt_boxes_per_image, iou_threshold=0.5, top_n=None):
    """Fraction of ground-truth boxes covered by a proposal, over a set of images.

        recall = #{g : max_{p in top_n(image of g)} IoU(p, g) >= iou_threshold} / #{g}

    the measure of the paper's figure 4 (recall vs IoU, and vs the number of proposals).
    ``proposals_per_image``: one (P_i, 4) array per image, highest score first, or the
    (boxes, scores) pairs that ``FasterRCNN.propose`` returns; ``top_n`` keeps the first
    ``top_n`` of each (None: all). ``gt_boxes_per_image``: one (G_i, 4) array per image.
    Counts over all images together (not a mean of per-image recalls); an image with no
    proposals covers none of its boxes. Returns a float in [0, 1].
    """
    where = "proposal_recall"
    proposals_per_image = _per_image(proposals_per_image, "proposals_per_image", where)
    gt_boxes_per_image = _per_image(gt_boxes_per_image, "gt_boxes_per_image", where)
    if len(proposals_per_image) != len(gt_boxes_per_image):
        raise ValueError(f"{where}: proposals_per_image has {len(proposals_per_image)} images but "
                         f"gt_boxes_per_image has {len(gt_boxes_per_image)}")
    iou_threshold = check_number(iou_threshold, "iou_threshold", low=0.0, high=1.0, low_open=True, where=where)
    if top_n is not None:
        top_n = check_positive_int(top_n, "top_n", where)
    covered = total = 0
    for i, (props, gt) in enumerate(zip(proposals_per_image, gt_boxes_per_image)):
        if isinstance(props, (tuple, list)) and len(props) == 2 and np.ndim(props[0]) == 2:
            props = props[0]
        props = np.asarray(_host(props, f"proposals_per_image[{i}]", where))
        gt = np.asarray(_host(gt, f"gt_boxes_per_image[{i}]", where))
        props = check_boxes(props.reshape(-1, 4) if props.size == 0 else props, f"proposals_per_image[{i}]", where)
        gt = check_boxes(gt.reshape(-1, 4) if gt.size == 0 else gt, f"gt_boxes_per_image[{i}]", where)
        if top_n is not None:
            props = props[:top_n]
        total += len(gt)
        if len(gt) and len(props):
            best = box_iou(props.astype(np.float64), gt.astype(np.float64)).max(axis=0)  # (G,)
            covered += int((best >= iou_threshold).sum())
    if total == 0:
        raise ValueError(f"{where}: gt_boxes_per_image holds no boxes, so recall is undefined")
    return covered / total
