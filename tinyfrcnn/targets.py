"""Training targets: which anchors and proposals are objects, and where their boxes are.

Two places in Faster R-CNN need a teacher's answer for each box the network looks at:

* the RPN (paper, section 3.1.2): each anchor is labelled positive (an object), negative
  (background) or ignored by its IoU with the ground truth, and 256 of them are sampled
  per image with at most half positives;
* the Fast R-CNN head: 128 proposals per image are sampled (``sample_proposals``' default;
  the detector takes ``ModelConfig.roi_batch``, 64), a quarter foreground
  (IoU >= 0.5) and the rest background (IoU in [0, 0.5)), each labelled with its
  matched ground truth's class.

Regression targets are the paper's (t_x, t_y, t_w, t_h) from ``tinyfrcnn.boxes.encode``.
These functions work on NumPy arrays on the host, as py-faster-rcnn's anchor and
proposal target layers do: the arrays are small (a few thousand boxes), the logic is
data-dependent bookkeeping, and the hot loops are IoUs: ``tinyfrcnn.boxes.box_iou``'s
kernel for the anchors, and for the RoIs a kernel that keeps only each one's best match
among its own image's ground truth (``_best_match_by_image``, the same IoU arithmetic).
The train step samples all its images in one pass, but for the random draws, which stay
image by image so that a seed gives the same samples as one image at a time.
"""

import numpy as np
from numba import njit

from .boxes import _box_iou_host, _check_weights, _encode, _overlap
from .checks import as_array, check_boxes, check_number, check_positive_int, check_rng
from .device import is_device_array


HEAD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the head's box targets: py-faster-rcnn's 1 / (0.1, 0.1, 0.2, 0.2)


def _host(x, name, where):
    if is_device_array(x):
        raise ValueError(f"{where}: {name} is a CUDA device array; targets are computed on the host, "
                         "pass a NumPy array (tinyfrcnn.device.to_host)")
    return x


def _check_image_size(image_size, where):
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"{where}: image_size must be a (height, width) pair, got {image_size!r}")
    return (check_number(image_size[0], "image_size", low=0, low_open=True, where=where),
            check_number(image_size[1], "image_size", low=0, low_open=True, where=where))


def check_gt_boxes(gt_boxes, image_size=None, where="", name="gt_boxes"):
    """(G, 4) ground-truth boxes: finite, positive width and height, inside the image if given."""
    gt_boxes = check_boxes(_host(gt_boxes, name, where), name, where)
    prefix = f"{where}: " if where else ""
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    empty = ~((w > 0) & (h > 0))
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{prefix}{name}[{i}] = {gt_boxes[i].tolist()} has zero width or height")
    if image_size is not None:
        height, width = _check_image_size(image_size, where)
        outside = ((gt_boxes[:, 0] < 0) | (gt_boxes[:, 1] < 0)
                   | (gt_boxes[:, 2] > width) | (gt_boxes[:, 3] > height))
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{prefix}{name}[{i}] = {gt_boxes[i].tolist()} is not inside the "
                             f"{height:g}x{width:g} image")
    return gt_boxes


def check_gt_boxes_batch(gt_boxes, image_size, where):
    """``check_gt_boxes`` of each image's (G_i, 4) boxes of one dtype, in one pass over
    all of them; an error names the image (``gt_boxes[i][j]``)."""
    try:
        check_gt_boxes(np.concatenate(gt_boxes), image_size, where)
    except ValueError:
        for i, boxes in enumerate(gt_boxes):
            check_gt_boxes(boxes, image_size, where, name=f"gt_boxes[{i}]")
        raise


def check_labels(labels, name, where, low=None, high=None):
    """(N,) integer labels, all in [low, high] when those are given."""
    labels = as_array(_host(labels, name, where), name, ndim=1, where=where)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: {name} must have an integer dtype, got {labels.dtype.name}")
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{where}: {name} holds {int(labels.max())}, beyond int64")
    if low is not None and labels.size and (labels.min() < low or labels.max() > high):
        bad = labels[(labels < low) | (labels > high)][0]
        raise ValueError(f"{where}: {name} must hold only {list(range(low, high + 1))}, found {int(bad)}")
    return labels


# ---------------------------------------------------------------- anchors (RPN)


def label_anchors(anchors, gt_boxes, pos_iou=0.7, neg_iou=0.3, image_size=None, allowed_border=None):
    """Label each anchor positive (1), negative (0) or ignored (-1), as the paper's RPN.

    With IoU the (A, G) matrix between anchors and ground truth, in py-faster-rcnn's order
    (a later rule overrides an earlier one):

    1. an anchor whose best IoU is < ``neg_iou`` is negative;
    2. for each ground truth, the anchor(s) with the highest IoU with it are positive (all
       tied ones; a ground truth that overlaps no anchor at all is skipped). This gives
       every object at least one positive anchor even when no IoU reaches ``pos_iou``;
    3. an anchor whose best IoU is >= ``pos_iou`` is positive.

    Anchors in between are ignored. When ``image_size`` (h, w) and ``allowed_border`` are
    given, anchors that cross the image border by more than ``allowed_border`` pixels are
    ignored and take no part in rule 2 (the paper ignores cross-boundary anchors in
    training; py-faster-rcnn's allowed border is 0). ``image_size`` alone only checks that
    the ground truth lies inside the image.

    Returns ``labels`` (A,) int64 and ``matched_gt`` (A,) int64: the index of each anchor's
    highest-IoU ground truth (for every anchor, whatever its label; also for an anchor made
    positive by rule 2, which keeps its own argmax as py-faster-rcnn and torchvision do).
    With no ground truth every (inside) anchor is negative and ``matched_gt`` is all -1.
    """
    where = "label_anchors"
    anchors = check_boxes(_host(anchors, "anchors", where), "anchors", where)
    gt_boxes = check_gt_boxes(gt_boxes, image_size, where)
    neg_iou = check_number(neg_iou, "neg_iou", low=0.0, high=1.0, where=where)
    check_number(pos_iou, "pos_iou", low=0.0, high=1.0, low_open=True, where=where)
    pos_iou = check_number(pos_iou, "pos_iou", low=neg_iou, where=where)
    return _label_anchors(anchors, gt_boxes, pos_iou, neg_iou, _anchors_inside(anchors, image_size, allowed_border))


def _anchors_inside(anchors, image_size=None, allowed_border=None, where="label_anchors"):
    """(A,) bool: the anchors that cross the image border by at most ``allowed_border``
    pixels (all of them when ``allowed_border`` is None)."""
    if allowed_border is None:
        return np.ones(anchors.shape[0], dtype=bool)
    if image_size is None:
        raise ValueError(f"{where}: allowed_border needs image_size (height, width)")
    b = check_number(allowed_border, "allowed_border", where=where)
    height, width = _check_image_size(image_size, where)
    return ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
            & (anchors[:, 2] <= width + b) & (anchors[:, 3] <= height + b))


def _label_anchors(anchors, gt_boxes, pos_iou, neg_iou, inside):
    """``label_anchors`` of checked arguments, ``inside`` from ``_anchors_inside``."""
    labels, matched_gt = _label_anchors_batch(anchors, [gt_boxes], pos_iou, neg_iou, inside)
    return labels[0], matched_gt[0]


def _label_anchors_batch(anchors, gt_boxes, pos_iou, neg_iou, inside):
    """``_label_anchors`` of N images that share ``anchors`` (A, 4): ``gt_boxes`` one
    (G_i, 4) array per image, all of one dtype. Returns labels (N, A) and matched_gt
    (N, A), indices into each image's own ground truth; one IoU table for the batch."""
    n, num_anchors = len(gt_boxes), anchors.shape[0]
    counts = np.array([g.shape[0] for g in gt_boxes], dtype=np.int64)  # (N,)
    labels = np.full((n, num_anchors), -1, dtype=np.int64)
    matched_gt = np.full((n, num_anchors), -1, dtype=np.int64)
    labels[(counts == 0)[:, None] & inside[None, :]] = 0  # no ground truth: every inside anchor is negative
    with_gt = np.flatnonzero(counts)  # (M,)
    if num_anchors == 0 or with_gt.size == 0:
        return labels, matched_gt

    # One row per ground truth: NumPy reduces over the few rows, or along each long row,
    # much faster than along the short rows of the (A, G) matrix. (IoU is symmetric.)
    # The images' rows stacked, padded with -1 to the most ground truth of any image: the
    # padding never wins a max that a real row could win (IoUs are >= 0).
    iou = _box_iou_host(np.concatenate([gt_boxes[i] for i in with_gt]), anchors)  # (G, A)
    image_of_row = np.repeat(np.arange(with_gt.size), counts[with_gt])  # (G,)
    row_in_image = np.arange(iou.shape[0]) - np.repeat(_starts(counts[with_gt])[:-1], counts[with_gt])
    table = np.full((with_gt.size, counts.max(), num_anchors), -1.0, dtype=iou.dtype)  # (M, G_max, A)
    table[image_of_row, row_in_image] = iou
    matched = table.argmax(axis=1)  # (M, A): each anchor's best ground truth, over all anchors
    table[:, :, ~inside] = -1.0  # outside anchors never win
    iou = table[image_of_row, row_in_image]  # (G, A), masked
    best_iou = table.max(axis=1)  # (M, A)

    lab = np.full((with_gt.size, num_anchors), -1, dtype=np.int64)  # (M, A)
    lab[inside[None, :] & (best_iou < neg_iou)] = 0
    best_per_gt = iou.max(axis=1)  # (G,)
    rows, cols = np.nonzero((iou == best_per_gt[:, None]) & (best_per_gt > 0)[:, None])
    lab[image_of_row[rows], cols] = 1  # the anchors that are some gt's best
    lab[inside[None, :] & (best_iou >= pos_iou)] = 1
    labels[with_gt] = lab
    matched_gt[with_gt] = matched
    return labels, matched_gt


def sample_labels(labels, num_samples=256, positive_fraction=0.5, rng=None):
    """Keep a random mini-batch of ``num_samples`` labelled anchors; set the rest to -1.

    At most ``int(num_samples * positive_fraction)`` positives are kept (a random subset
    when there are more); negatives, also chosen at random, fill the batch up to
    ``num_samples`` (fewer when there are not enough). The paper: 256 anchors per image,
    up to half positive, padded with negatives. ``rng`` is a ``np.random.Generator``;
    the same seed gives the same batch. Returns a new (A,) int64 array.
    """
    where = "sample_labels"
    labels = check_labels(labels, "labels", where, low=-1, high=1)
    num_samples = check_positive_int(num_samples, "num_samples", where)
    positive_fraction = check_number(positive_fraction, "positive_fraction", low=0.0, high=1.0, where=where)
    return _sample_labels(labels, num_samples, positive_fraction, check_rng(rng, where))


def _sample_labels(labels, num_samples, positive_fraction, rng):
    """``sample_labels`` of checked arguments."""
    (positive,), (negative,) = _label_candidates(labels[None])
    return _sampled_labels((1, *labels.shape), [_pick(positive, negative, num_samples, positive_fraction, rng)])[0]


def _label_candidates(labels):
    """The positive and the negative anchors of each image of ``labels`` (N, A): two
    lists of N index arrays, in increasing order."""
    image, anchor = np.nonzero(labels >= 0)  # image-major
    bounds = np.searchsorted(image, np.arange(labels.shape[0] + 1))  # (N + 1,)
    positive = labels[image, anchor] == 1
    rows = [(anchor[a:b], positive[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [a[p] for a, p in rows], [a[~p] for a, p in rows]


def _pick(positive, negative, num_samples, positive_fraction, rng):
    """The random draws of one image's sample: at most ``int(num_samples *
    positive_fraction)`` of ``positive``, then ``negative`` up to ``num_samples``.
    Returns (kept positives, kept negatives) in the order drawn."""
    num_pos = min(positive.size, int(num_samples * positive_fraction))
    num_neg = min(negative.size, num_samples - num_pos)
    return rng.permutation(positive)[:num_pos], rng.permutation(negative)[:num_neg]


def _sampled_labels(shape, picks):
    """Labels (N, A) of -1 but for each image's picked positives (1) and negatives (0)."""
    out = np.full(shape, -1, dtype=np.int64)  # (N, A)
    for i, (positive, negative) in enumerate(picks):
        out[i, positive] = 1
        out[i, negative] = 0
    return out


def anchor_targets(anchors, gt_boxes, pos_iou=0.7, neg_iou=0.3, image_size=None, allowed_border=None,
                   weights=(1.0, 1.0, 1.0, 1.0)):
    """Anchor labels, matched ground truth and regression targets for the RPN.

    ``labels, matched_gt = label_anchors(...)`` (no sampling: follow with
    ``sample_labels``), and ``reg_targets`` (A, 4) = ``encode(anchors, gt[matched_gt],
    weights)`` on positive anchors, zeros elsewhere (the paper's p*_i makes the
    regression loss zero there anyway). The RPN uses unit weights, as the paper.
    """
    labels, matched_gt = label_anchors(anchors, gt_boxes, pos_iou, neg_iou, image_size, allowed_border)
    anchors, gt_boxes = np.asarray(anchors), np.asarray(gt_boxes)  # checked by label_anchors
    weights = _check_weights(weights, "anchor_targets", np.result_type(anchors.dtype, gt_boxes.dtype))
    return labels, matched_gt, _regression_targets(anchors, [gt_boxes], labels[None], matched_gt[None], weights)[0]


def _anchor_targets_batch(anchors, gt_boxes, pos_iou, neg_iou, inside, weights):
    """``anchor_targets`` of checked arguments for N images that share ``anchors``,
    ``gt_boxes`` one array per image, ``inside`` from ``_anchors_inside`` and ``weights``
    from ``boxes._check_weights`` in the dtype of anchors and gt_boxes: labels (N, A),
    matched_gt (N, A), reg_targets (N, A, 4), each image's numbers those of a call on it
    alone."""
    labels, matched_gt = _label_anchors_batch(anchors, gt_boxes, pos_iou, neg_iou, inside)
    return labels, matched_gt, _regression_targets(anchors, gt_boxes, labels, matched_gt, weights)


def _regression_targets(anchors, gt_boxes, labels, matched_gt, weights):
    """(N, A, 4): ``encode(anchor, its matched gt, weights)`` on positive anchors, else 0."""
    dtype = np.result_type(anchors.dtype, *(g.dtype for g in gt_boxes))
    reg_targets = np.zeros((*labels.shape, 4), dtype=dtype)  # (N, A, 4)
    image, anchor = np.nonzero(labels == 1)  # positives overlap their gt, so both have positive sizes
    if image.size:
        offsets = _starts([g.shape[0] for g in gt_boxes])[:-1]  # (N,)
        gts = np.concatenate(gt_boxes)  # (G, 4)
        reg_targets[image, anchor] = _encode(anchors[anchor], gts[offsets[image] + matched_gt[image, anchor]], weights)
    return reg_targets


# ---------------------------------------------------------------- proposals (Fast R-CNN head)


def sample_proposals(proposals, gt_boxes, gt_labels, num_samples=128, fg_fraction=0.25, fg_iou=0.5,
                     bg_iou=(0.0, 0.5), rng=None, weights=HEAD_BOX_WEIGHTS, num_classes=None,
                     image_size=None):
    """Sample the RoIs that train the Fast R-CNN head, with their class and box targets.

    The ground-truth boxes are appended to the proposals (so every object has at least
    one perfect RoI early in training). Each RoI is matched to its highest-IoU ground
    truth. Foreground: IoU >= ``fg_iou``, at most ``int(fg_fraction * num_samples)``
    chosen at random. Background: IoU in [bg_lo, bg_hi), chosen at random to fill the
    rest; when there are too few, all of them are taken and the batch is smaller than
    ``num_samples``, as in py-faster-rcnn and torchvision (tf-faster-rcnn samples with
    replacement instead, repeating RoIs). No ground truth: every RoI counts as IoU 0, a
    background candidate when ``bg_iou`` starts at 0 (the default).

    ``box_targets`` are ``encode(roi, gt, weights)``; the default (10, 10, 5, 5) divides
    the deltas by py-faster-rcnn's target stds (0.1, 0.1, 0.2, 0.2). Background rows are 0.

    Returns a dict: ``rois`` (S, 4), ``labels`` (S,) int64 (the gt's class, 0 for
    background), ``box_targets`` (S, 4), ``indices`` (S,) int64 into
    ``concatenate([proposals, gt_boxes])``, ``matched_gt`` (S,) int64 (-1 for background).
    Foreground rows come first.
    """
    where = "sample_proposals"
    proposals = check_boxes(_host(proposals, "proposals", where), "proposals", where)
    gt_boxes = check_gt_boxes(gt_boxes, image_size, where)
    gt_labels = check_labels(gt_labels, "gt_labels", where)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f"{where}: gt_labels has {gt_labels.shape[0]} entries but gt_boxes has {gt_boxes.shape[0]}")
    high = None if num_classes is None else check_positive_int(num_classes, "num_classes", where)
    bad = (gt_labels < 1) if high is None else ((gt_labels < 1) | (gt_labels > high))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        allowed = "1..num_classes" if high is None else f"1..{high}"
        raise ValueError(f"{where}: gt_labels[{i}] = {int(gt_labels[i])} is outside {allowed} (0 is background)")
    num_samples = check_positive_int(num_samples, "num_samples", where)
    fg_fraction = check_number(fg_fraction, "fg_fraction", low=0.0, high=1.0, where=where)
    fg_iou = check_number(fg_iou, "fg_iou", low=0.0, high=1.0, low_open=True, where=where)
    if not isinstance(bg_iou, (tuple, list)) or len(bg_iou) != 2:
        raise ValueError(f"{where}: bg_iou must be a (low, high) pair, got {bg_iou!r}")
    bg_lo = check_number(bg_iou[0], "bg_iou", low=0.0, high=1.0, where=where)
    bg_hi = check_number(bg_iou[1], "bg_iou", low=bg_lo, high=fg_iou, low_open=True, where=where)
    rng = check_rng(rng, where)
    weights = _check_weights(weights, where, np.result_type(proposals.dtype, gt_boxes.dtype))
    return _sample_proposals(proposals, gt_boxes, gt_labels, num_samples, fg_fraction, fg_iou, bg_lo, bg_hi, rng,
                             weights)


def _sample_proposals(proposals, gt_boxes, gt_labels, num_samples, fg_fraction, fg_iou, bg_lo, bg_hi, rng, weights):
    """``sample_proposals`` of checked arguments, ``weights`` from ``boxes._check_weights``
    in the dtype of proposals and gt_boxes: ``_proposal_candidates``, ``_pick`` and
    ``_gather_proposals`` on a batch of one."""
    candidates = _proposal_candidates([proposals], [gt_boxes], fg_iou, bg_lo, bg_hi)
    pick = _pick(candidates["fg"][0], candidates["bg"][0], num_samples, fg_fraction, rng)
    out = _gather_proposals(candidates, [pick], [gt_labels], weights)
    keep = np.concatenate(pick).astype(np.int64)  # (S,)
    matched = candidates["matched"][keep]
    matched[len(pick[0]):] = -1
    return {"rois": out["rois"], "labels": out["labels"], "box_targets": out["box_targets"],
            "indices": keep, "matched_gt": matched}


def _starts(counts):
    """Where each of N consecutive runs of ``counts`` rows begins, and the total: (N + 1,) int64."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _proposal_candidates(proposals, gt_boxes, fg_iou, bg_lo, bg_hi):
    """The part of sampling N images' proposals that needs no random draws: each image's
    RoIs (its proposals, then its ground truth), matched to the image's best-overlapping
    ground truth, and split into foreground (IoU >= ``fg_iou``) and background (IoU in
    [bg_lo, bg_hi)) candidates. ``proposals``, ``gt_boxes``: one checked array per image.

    Returns a dict: ``rois`` (M, 4) of all images, ``starts`` (N + 1,) where each image's
    rows begin, ``gts`` (G, 4) all images' ground truth in the RoIs' dtype and
    ``gt_starts`` (N + 1,), ``matched`` (M,) int64 into the image's own ground truth (-1:
    it has none), and ``fg``, ``bg``: N index arrays into each image's rows, in
    increasing order.
    """
    n = len(proposals)
    dtype = np.result_type(*(p.dtype for p in proposals), *(g.dtype for g in gt_boxes))
    rows = [x.astype(dtype) for p, g in zip(proposals, gt_boxes) for x in (p, g)]
    rois = np.concatenate(rows) if rows else np.zeros((0, 4), dtype)  # (M, 4)
    starts = _starts([len(p) + len(g) for p, g in zip(proposals, gt_boxes)])  # (N + 1,)
    gts = np.concatenate(rows[1::2]) if rows else np.zeros((0, 4), dtype)  # (G, 4)
    gt_starts = _starts([len(g) for g in gt_boxes])  # (N + 1,)
    best_iou = np.zeros(rois.shape[0], dtype=dtype)  # (M,); IoU 0 for an image without ground truth
    matched = np.full(rois.shape[0], -1, dtype=np.int64)  # (M,)
    _best_match_by_image(rois, starts, gts, gt_starts, best_iou, matched)
    image = np.repeat(np.arange(n), np.diff(starts))  # (M,)
    within = np.arange(rois.shape[0]) - starts[image]  # (M,) row in its image

    def split(mask):
        bounds = np.searchsorted(image[mask], np.arange(n + 1))  # (N + 1,)
        found = within[mask]
        return [found[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    return {"rois": rois, "starts": starts, "gts": gts, "gt_starts": gt_starts, "matched": matched,
            "fg": split(best_iou >= fg_iou), "bg": split((best_iou >= bg_lo) & (best_iou < bg_hi))}


@njit(cache=True, error_model="numpy")
def _best_match_by_image(rois, starts, gts, gt_starts, best_iou, matched):
    """For each RoI of image i (rows ``starts[i]:starts[i + 1]``), its highest IoU with
    that image's ground truth (rows ``gt_starts[i]:gt_starts[i + 1]`` of ``gts``) and the
    first such box (the argmax of that row of ``box_iou``); images without ground truth
    are left as they are."""
    for i in range(starts.shape[0] - 1):
        g0, g1 = gt_starts[i], gt_starts[i + 1]
        for r in range(starts[i], starts[i + 1]):
            x1, y1, x2, y2 = rois[r, 0], rois[r, 1], rois[r, 2], rois[r, 3]
            area = (x2 - x1) * (y2 - y1)
            for g in range(g0, g1):
                iou = _overlap(x1, y1, x2, y2, area, gts[g, 0], gts[g, 1], gts[g, 2], gts[g, 3],
                               (gts[g, 2] - gts[g, 0]) * (gts[g, 3] - gts[g, 1]))
                if g == g0 or iou > best_iou[r]:
                    best_iou[r] = iou
                    matched[r] = g - g0


def _gather_proposals(candidates, picks, gt_labels, weights):
    """The sampled RoIs of N images from ``_proposal_candidates`` and one ``_pick`` per
    image, image after image, each image's foreground first: ``rois`` (S, 4), ``labels``
    (S,) int64 (0 for background), ``box_targets`` (S, 4) (0 for background) and
    ``counts`` (N,) rows per image."""
    rois, starts, matched = candidates["rois"], candidates["starts"], candidates["matched"]
    keep = np.concatenate([np.zeros(0, np.int64)] + [starts[i] + np.concatenate(p).astype(np.int64)
                                                     for i, p in enumerate(picks)])  # (S,)
    counts = np.array([len(fg) + len(bg) for fg, bg in picks], dtype=np.int64)  # (N,)
    foreground = np.concatenate([np.zeros(0, bool)] + [np.arange(c) < len(p[0]) for c, p in zip(counts, picks)])
    fg = keep[foreground]  # (F,) rows of rois
    gt_row = candidates["gt_starts"][np.repeat(np.arange(len(picks)), [len(p[0]) for p in picks])] + matched[fg]  # (F,)
    labels = np.zeros(keep.size, dtype=np.int64)  # (S,)
    box_targets = np.zeros((keep.size, 4), dtype=rois.dtype)  # (S, 4)
    if fg.size:
        labels[foreground] = np.concatenate(gt_labels)[gt_row]
        matched_gt = np.take(candidates["gts"], gt_row, axis=0)  # (F, 4)
        box_targets[foreground] = _encode(np.take(rois, fg, axis=0), matched_gt, weights)
    return {"rois": np.take(rois, keep, axis=0), "labels": labels, "box_targets": box_targets, "counts": counts}
