"""Average precision: COCO-style (COCOeval, bbox) and VOC-style (the PASCAL VOC devkit).

Both metrics rank a class's detections over the whole test set by score, decide which
are true positives by IoU matching against the ground truth, and summarise the
resulting precision/recall curve::

    precision_n = TP_n / (TP_n + FP_n),    recall_n = TP_n / (number of ground-truth boxes)

after the first ``n`` detections. They differ in the matching rule and in how the curve
is turned into one number (see ``coco_ap`` and ``voc_ap``).

Inputs are one dict per image. ``detections[i]`` has ``boxes`` (D, 4) (x1, y1, x2, y2),
``scores`` (D,) and ``labels`` (D,); ``ground_truths[i]`` has ``boxes`` (G, 4) and
``labels`` (G,). Labels are object classes, integers >= 1 (0 is the background). Box
areas must stay within COCO's limit of 1e10 (the "all" area range, 1e5 squared). There
are no crowd regions and no "difficult" flags.

The matching runs for all images of a class at once: boxes are padded to
(images, D, G) and the greedy loop walks down the detection ranks, each step a few
NumPy operations over every image and IoU threshold together.
"""

import numpy as np

from .checks import as_array, as_boxes, check_finite, check_number, check_positive_int

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
MAX_AREA = 1e10  # COCOeval's "all" area range ends at 1e5 ** 2
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
VOC07_RECALL_THRESHOLDS = np.arange(11) / 10  # i/10 rounded once, so a recall of 7/10 reaches 0.7


# --------------------------------------------------------------------------- inputs


def _image_arrays(entry, where, with_scores):
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict with boxes{', scores' if with_scores else ''} and labels, "
                         f"got {type(entry).__name__}")
    keys = ("boxes", "scores", "labels") if with_scores else ("boxes", "labels")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{where} has no '{key}'")
    boxes = as_boxes(entry["boxes"], "boxes", where).astype(np.float64)
    n = boxes.shape[0]
    with np.errstate(over="ignore"):
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (n,)
    if (area > MAX_AREA).any():
        i = int(np.flatnonzero(area > MAX_AREA)[0])
        raise ValueError(f"{where}: boxes[{i}] has area {area[i]:.3g}, beyond COCO's limit of {MAX_AREA:g}")

    labels = as_array(entry["labels"], "labels", ndim=1, where=where)
    if labels.size == 0:
        labels = np.zeros(0, np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"{where}: labels has {labels.shape[0]} entries but boxes has {n}")
    _check_class_ids(labels, "labels", where)
    labels = labels.astype(np.int64)
    if not with_scores:
        return boxes, labels

    scores = as_array(entry["scores"], "scores", ndim=1, where=where)
    if scores.size == 0:
        scores = np.zeros(0)
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"{where}: scores must be real numbers, got dtype {scores.dtype}")
    if scores.shape[0] != n:
        raise ValueError(f"{where}: scores has {scores.shape[0]} entries but boxes has {n}")
    scores = check_finite(scores.astype(np.float64), "scores", where=where)
    return boxes, scores, labels


class _Flat:
    """Every image's boxes concatenated, with the image index of each row."""

    def __init__(self, images, with_scores):
        self.image = np.concatenate([np.full(len(im[0]), i, np.int64) for i, im in enumerate(images)]
                                    + [np.zeros(0, np.int64)])  # (N,)
        self.boxes = np.concatenate([im[0] for im in images] + [np.zeros((0, 4))])  # (N, 4)
        self.labels = np.concatenate([im[-1] for im in images] + [np.zeros(0, np.int64)])  # (N,)
        if with_scores:
            self.scores = np.concatenate([im[1] for im in images] + [np.zeros(0)])  # (N,)


def _check_class_ids(ids, name, where):
    """Integer class ids, each an object class: 1 <= id < 2**63."""
    if ids.size and (ids.min() < 1 or ids.max() > np.iinfo(np.int64).max):
        bad = ids[(ids < 1) | (ids > np.iinfo(np.int64).max)][0]
        raise ValueError(f"{where}: {name} must be object classes >= 1 (0 is the background), found {int(bad)}")


def _prepare(detections, ground_truths, where):
    """Validate both lists and return them flattened (detections, ground truths)."""
    for name, value in (("detections", detections), ("ground_truths", ground_truths)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: {name} must be a list with one dict per image, got {type(value).__name__}")
    if len(detections) != len(ground_truths):
        raise ValueError(f"{where}: detections and ground_truths must have one entry per image, "
                         f"got {len(detections)} and {len(ground_truths)}")
    dts = [_image_arrays(d, f"{where}: detections[{i}]", True) for i, d in enumerate(detections)]
    gts = [_image_arrays(g, f"{where}: ground_truths[{i}]", False) for i, g in enumerate(ground_truths)]
    return _Flat(dts, True), _Flat(gts, False)


def _class_ids(dt, gt, class_ids, where):
    if class_ids is None:
        return np.union1d(dt.labels, gt.labels)
    ids = as_array(class_ids, "class_ids", ndim=1, where=where).ravel()
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: class_ids must be integers, got dtype {ids.dtype}")
    _check_class_ids(ids, "class_ids", where)
    if np.unique(ids).size != ids.size:
        raise ValueError(f"{where}: class_ids must not repeat a class, got {ids.tolist()}")
    return ids.astype(np.int64)


# --------------------------------------------------------------------- matching


def _pairwise_iou(dt_boxes, gt_boxes):
    """IoU of every detection with every ground-truth box, batched over leading axes.

    ``IoU = |A n B| / (|A| + |B| - |A n B|)``, zero when the boxes do not overlap. The
    arithmetic follows COCO's ``bbIou`` on (x, y, w, h) boxes (right edge ``x + w``), so
    the values agree with COCOeval to the last bit.
    """
    dx, dy = dt_boxes[..., :, None, 0], dt_boxes[..., :, None, 1]  # (..., D, 1)
    dw, dh = dt_boxes[..., :, None, 2] - dx, dt_boxes[..., :, None, 3] - dy
    gx, gy = gt_boxes[..., None, :, 0], gt_boxes[..., None, :, 1]  # (..., 1, G)
    gw, gh = gt_boxes[..., None, :, 2] - gx, gt_boxes[..., None, :, 3] - gy
    iw = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)  # (..., D, G)
    ih = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = iw * ih
    union = dw * dh + gw * gh - inter
    overlap = (iw > 0) & (ih > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


class _ClassBatch:
    """One class's detections and ground truth, padded into one row per image.

    Rows are the images that hold the class (ascending image index). Within a row,
    detections are sorted by score, highest first (stable: ties keep input order) and
    cut to ``max_det``; ground-truth boxes keep their input order. The IoU table is
    (images, most detections in an image, most gt boxes in an image), so one very
    crowded image makes every row that wide.
    """

    def __init__(self, dt, gt, label, max_det=None):
        d = np.flatnonzero(dt.labels == label)
        d = d[np.argsort(-dt.scores[d], kind="stable")]
        d = d[np.argsort(dt.image[d], kind="stable")]  # by image, then by score
        g = np.flatnonzero(gt.labels == label)
        self.images = np.union1d(dt.image[d], gt.image[g])  # (B,)
        self.num_gt = g.size

        d_row, d_rank = self._rows_and_ranks(dt.image[d])
        if max_det is not None:
            keep = d_rank < max_det
            d, d_row, d_rank = d[keep], d_row[keep], d_rank[keep]
        g_row, g_rank = self._rows_and_ranks(gt.image[g])

        B = self.images.size
        D = int(d_rank.max()) + 1 if d.size else 0
        G = int(g_rank.max()) + 1 if g.size else 0
        self.dt_valid = np.zeros((B, D), bool)
        self.dt_valid[d_row, d_rank] = True
        self.scores = np.zeros((B, D))
        self.scores[d_row, d_rank] = dt.scores[d]
        dt_boxes = np.zeros((B, D, 4))
        dt_boxes[d_row, d_rank] = dt.boxes[d]
        gt_valid = np.zeros((B, G), bool)
        gt_valid[g_row, g_rank] = True
        gt_boxes = np.zeros((B, G, 4))
        gt_boxes[g_row, g_rank] = gt.boxes[g]

        self.iou = _pairwise_iou(dt_boxes, gt_boxes)  # (B, D, G)
        self.iou[~(self.dt_valid[:, :, None] & gt_valid[:, None, :])] = -np.inf

    def _rows_and_ranks(self, image):
        """Row of each box (``image`` sorted) and its position among its image's boxes."""
        return np.searchsorted(self.images, image), np.arange(image.size) - np.searchsorted(image, image)

    def ranked(self, matched):
        """Scores and match flags (..., N) of all kept detections, best score first.

        Images are concatenated in order and then stably sorted by score, so ties
        between images go to the earlier image (as COCOeval and the VOC devkit do).
        """
        scores = self.scores[self.dt_valid]  # (N,)
        order = np.argsort(-scores, kind="mergesort")
        return scores[order], matched[..., self.dt_valid][..., order]


def _coco_match(batch, iou_thresholds):
    """COCOeval's greedy matching for every image and threshold at once -> (T, B, D) bool.

    Per image, detections in score order each take the unmatched ground-truth box with
    the highest IoU, provided IoU >= min(t, 1 - 1e-10); among equal IoUs the later box
    wins, as in COCOeval's loop.
    """
    B, D, G = batch.iou.shape
    T = iou_thresholds.size
    thr = np.minimum(iou_thresholds, 1 - 1e-10)[None, :, None]  # (1, T, 1)
    gt_taken = np.zeros((B, T, G), bool)
    matched = np.zeros((T, B, D), bool)
    if G == 0:
        return matched
    rows_t, rows_b = np.meshgrid(np.arange(T), np.arange(B), indexing="xy")  # (B, T)
    for d in range(D):
        iou = batch.iou[:, None, d, :]  # (B, 1, G)
        cand = np.where(~gt_taken & (iou >= thr), iou, -np.inf)  # (B, T, G)
        best = cand.max(axis=2)  # (B, T)
        hit = best > -np.inf
        last = G - 1 - np.argmax(cand[:, :, ::-1] == best[:, :, None], axis=2)  # (B, T)
        gt_taken[rows_b[hit], rows_t[hit], last[hit]] = True
        matched[:, :, d] = hit.T
    return matched


def _voc_match(batch, iou_threshold):
    """The VOC devkit's matching -> (B, D) bool.

    Per image, detections in score order each look at the ground-truth box with the
    highest IoU (first among equals). It is a true positive if the boxes overlap, IoU >=
    threshold and that box is not taken yet (then it is taken); otherwise a false
    positive (a duplicate or a miss).
    """
    B, D, G = batch.iou.shape
    matched = np.zeros((B, D), bool)
    if G == 0:
        return matched
    gt_taken = np.zeros((B, G), bool)
    rows = np.arange(B)
    for d in range(D):
        best = np.argmax(batch.iou[:, d, :], axis=1)  # (B,)
        iou = batch.iou[rows, d, best]  # (B,)
        hit = (iou > 0) & (iou >= iou_threshold) & ~gt_taken[rows, best]
        gt_taken[rows[hit], best[hit]] = True
        matched[:, d] = hit
    return matched


# ------------------------------------------------------------------------ COCO


def _coco_curve(tp, num_gt, recall_thresholds):
    """COCOeval's precision at each recall threshold and final recall for one class.

    ``tp`` (T, N) are the match flags in score order. Precision is made monotone
    (``p(r) = max_{r' >= r} p(r')``) and read at the first rank whose recall reaches
    each threshold (``searchsorted(..., 'left')``); thresholds never reached give 0.
    """
    T, N = tp.shape
    tp_sum = np.cumsum(tp, axis=1).astype(float)  # (T, N)
    fp_sum = np.cumsum(~tp, axis=1).astype(float)
    recall = tp_sum / num_gt
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    q = np.zeros((T, recall_thresholds.size))  # (T, R)
    for t in range(T):
        inds = np.searchsorted(recall[t], recall_thresholds, side="left")
        reached = inds < N
        q[t, reached] = precision[t, inds[reached]]
    final_recall = recall[:, -1] if N else np.zeros(T)
    return q, final_recall


def _mean_valid(values):
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def coco_ap(detections, ground_truths, iou_thresholds=None, max_detections=100, class_ids=None):
    """COCO average precision, the same numbers as pycocotools' COCOeval (bbox, area "all").

    For each class and IoU threshold ``t`` (default 0.50:0.05:0.95, the very values
    COCOeval uses):

    - Per image, keep the ``max_detections`` highest-scoring detections of the class
      (per image *and* class, as COCOeval's ``evaluateImg``), and match greedily in
      score order: each detection takes the unmatched ground-truth box with the highest
      IoU >= t; unmatched detections are false positives.
    - Rank all kept detections of the class by score (stable mergesort on -score) and
      form precision/recall. Make precision monotone, ``p(r) = max_{r'>=r} p(r')``,
      and average it over the 101 recall points ``r in {0, 0.01, ..., 1}``:
      ``AP_t = 1/101 sum_r p(first rank with recall >= r)`` (0 if r is never reached).

    ``AP`` averages over thresholds and classes; classes with no ground truth get -1
    and are left out of every mean. ``AP50``/``AP75`` use t = 0.5/0.75 only (-1 if that
    threshold is not evaluated). ``AR100`` is the recall after all kept detections,
    averaged the same way. IoU is computed from continuous boxes, no +1. A box with an
    area beyond COCO's 1e10 limit for the "all" range is a ValueError.

    Returns a dict with ``AP``, ``AP50``, ``AP75``, ``AR100``, ``per_class`` {label: AP},
    ``precision`` (T, 101, K), ``recall`` (T, K), ``iou_thresholds`` (T,),
    ``recall_thresholds`` (101,) and ``class_ids`` (K,).
    """
    where = "coco_ap"
    if iou_thresholds is None:
        iou_thresholds = COCO_IOU_THRESHOLDS
    try:
        values = np.atleast_1d(np.asarray(iou_thresholds))
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iuf":
        raise ValueError(f"{where}: iou_thresholds must be a non-empty 1-D list of numbers, got {iou_thresholds!r}")
    iou_thresholds = values.astype(float)
    for t in iou_thresholds:
        check_number(t, "iou_thresholds", low=0.0, high=1.0, where=where)
    max_detections = check_positive_int(max_detections, "max_detections", where)
    dt, gt = _prepare(detections, ground_truths, where)
    classes = _class_ids(dt, gt, class_ids, where)

    T, R, K = iou_thresholds.size, COCO_RECALL_THRESHOLDS.size, classes.size
    precision = -np.ones((T, R, K))
    recall = -np.ones((T, K))
    for k, label in enumerate(classes):
        batch = _ClassBatch(dt, gt, label, max_detections)
        if batch.num_gt == 0:
            continue
        _, tp = batch.ranked(_coco_match(batch, iou_thresholds))  # (T, N)
        precision[:, :, k], recall[:, k] = _coco_curve(tp, batch.num_gt, COCO_RECALL_THRESHOLDS)

    def at(threshold):
        t = np.flatnonzero(np.isclose(iou_thresholds, threshold, rtol=0, atol=1e-12))
        return _mean_valid(precision[t]) if t.size else -1.0

    return {
        "AP": _mean_valid(precision),
        "AP50": at(0.5),
        "AP75": at(0.75),
        "AR100": _mean_valid(recall),
        "per_class": {int(c): _mean_valid(precision[:, :, k]) for k, c in enumerate(classes)},
        "precision": precision,
        "recall": recall,
        "iou_thresholds": iou_thresholds,
        "recall_thresholds": COCO_RECALL_THRESHOLDS,
        "class_ids": classes,
    }


# ------------------------------------------------------------------------- VOC


def _voc_curve(dt, gt, label, iou_threshold):
    batch = _ClassBatch(dt, gt, label)
    scores, tp = batch.ranked(_voc_match(batch, iou_threshold))  # (N,), (N,)
    tp_sum = np.cumsum(tp).astype(float)
    fp_sum = np.cumsum(~tp).astype(float)
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(float).eps)
    recall = tp_sum / batch.num_gt if batch.num_gt else np.full(tp.size, np.nan)
    return precision, recall, scores


def _check_iou_threshold(iou_threshold, where):
    return check_number(iou_threshold, "iou_threshold", low=0.0, high=1.0, where=where)


def precision_recall(detections, ground_truths, label, iou_threshold=0.5):
    """VOC-style precision/recall curve of one class, for plotting.

    Returns ``(precision, recall, scores)``, each (N,) over the class's detections in
    descending score order: after the n-th detection ``precision = TP/(TP+FP)`` and
    ``recall = TP / #gt`` (NaN when the class has no ground truth), with the VOC
    devkit's matching (see ``voc_ap``).
    """
    where = "precision_recall"
    iou_threshold = _check_iou_threshold(iou_threshold, where)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= label < 2**63:
        raise ValueError(f"{where}: label must be an object class id, an integer >= 1, got {label!r}")
    dt, gt = _prepare(detections, ground_truths, where)
    return _voc_curve(dt, gt, int(label), iou_threshold)


def _voc_ap_from_curve(precision, recall, use_07_metric):
    """AP of a PR curve: VOC2007's 11-point rule or VOC2010+'s area under the envelope.

    11-point: ``AP = 1/11 sum_{r in {0, 0.1, ..., 1}} max_{recall >= r} precision`` (0
    where recall never reaches r). Area: pad the curve with (0, 0) and (1, 0), make
    precision monotone ``p(r) = max_{r'>=r} p(r')`` and sum ``(r_{i+1} - r_i) p(r_{i+1})``.
    """
    if use_07_metric:
        total = 0.0
        for r in VOC07_RECALL_THRESHOLDS:
            above = precision[recall >= r]
            total += above.max() if above.size else 0.0
        return total / VOC07_RECALL_THRESHOLDS.size
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def voc_ap(detections, ground_truths, iou_threshold=0.5, use_07_metric=False, class_ids=None):
    """PASCAL VOC average precision per class and its mean (mAP).

    Matching as the VOC devkit (``VOCevaldet``): all detections of a class ranked by
    score (stable sort); each looks at the ground-truth box in its image with the
    highest IoU and is a true positive if IoU >= ``iou_threshold`` and that box is not
    already taken, else a false positive. No "difficult" flags; IoU from continuous
    boxes (no +1). ``use_07_metric=True`` gives VOC2007's 11-point interpolated AP,
    otherwise the area under the monotone precision envelope (VOC2010 onwards).

    Returns ``{"mAP": float, "per_class": {label: AP}}``; classes without ground truth
    get -1 and are left out of the mean (-1 if no class has any).
    """
    where = "voc_ap"
    iou_threshold = _check_iou_threshold(iou_threshold, where)
    if not isinstance(use_07_metric, (bool, np.bool_)):
        raise ValueError(f"{where}: use_07_metric must be True or False, got {use_07_metric!r}")
    dt, gt = _prepare(detections, ground_truths, where)
    classes = _class_ids(dt, gt, class_ids, where)
    per_class = {}
    for label in classes:
        precision, recall, _ = _voc_curve(dt, gt, label, iou_threshold)
        has_gt = np.any(gt.labels == label)
        per_class[int(label)] = _voc_ap_from_curve(precision, recall, use_07_metric) if has_gt else -1.0
    return {"mAP": _mean_valid(np.array(list(per_class.values()))), "per_class": per_class}
