"""The Fast R-CNN head: RoI pooling, two fully connected layers, then per RoI a class
score and class-specific box refinements; its loss; and turning its outputs into detections.

Girshick, "Fast R-CNN" (2015), section 2: "Each RoI is pooled into a fixed-size feature
map and then mapped to a feature vector by fully connected layers. The network has two
output vectors per RoI: softmax probabilities and per-class bounding-box regression
offsets." Its multi-task loss (section 2.3), for an RoI with class u and box target v:

    L(p, u, t^u, v) = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v)

with L_cls = -log p_u and L_loc = sum_{i in x,y,w,h} smooth_L1(t^u_i - v_i).
"""

import numpy as np

from .boxes import _check_weights, _decode, clip_boxes, remove_small_boxes
from .checks import as_float_array, cast_finite, check_boxes, check_finite, check_number, check_positive_int, check_rng
from .device import empty_on_device, grid_1d, is_device_array, launch, zeros_on_device
from .layers import Flatten, Linear, Module, Parameter, ReLU, _add_cuda, _flat
from .losses import _as_labels, _smooth_l1_beta, _smooth_l1_host, _softmax_cross_entropy_host
from .nms import batched_nms
from .roi import RoIAlign, RoIPool
from .targets import HEAD_BOX_WEIGHTS

POOLINGS = ("roi_pool", "roi_align")


class FastRCNNHead(Module):
    """RoI pooling -> Flatten -> Linear -> ReLU -> Linear -> ReLU -> (class logits, box deltas).

    ``forward(features, rois)``: features (N, C, H, W), rois (R, 5) as (batch_index, x1,
    y1, x2, y2) in image coordinates; returns cls_logits (R, K + 1) (column 0 is
    background) and box_deltas (R, 4 (K + 1)) (columns 4k..4k+3 refine the RoI for class
    k). ``backward(grad_cls, grad_box)`` accumulates the parameter gradients and returns
    dL/dfeatures. Init: hidden layers He normal; the class layer N(0, 0.01^2) and the box
    layer N(0, 0.001^2), biases 0, as py-faster-rcnn. ``pooling="roi_align"`` samples
    2 x 2 points per bin, as torchvision's Faster R-CNN does, but with the half-pixel
    alignment (``aligned=True``; torchvision's Faster R-CNN uses ``aligned=False``).

    On the device (``.to("cuda")``; features and rois both device arrays) the pooling,
    the fully connected layers and the ReLUs run as CUDA kernels and the outputs and
    dL/dfeatures are device arrays; ``backward`` then takes device gradients.
    """

    def __init__(self, in_channels, num_classes, pool_size=7, hidden=256, spatial_scale=1 / 8,
                 pooling="roi_pool", rng=None):
        where = "FastRCNNHead"
        self.in_channels = check_positive_int(in_channels, "in_channels", where)
        self.num_classes = check_positive_int(num_classes, "num_classes", where)
        hidden = check_positive_int(hidden, "hidden", where)
        if pooling not in POOLINGS:
            raise ValueError(f"{where}: pooling must be one of {POOLINGS}, got {pooling!r}")
        rng = np.random.default_rng(0) if rng is None else check_rng(rng, where)
        self.pooling = pooling
        self.pool = (RoIPool(pool_size, spatial_scale) if pooling == "roi_pool"
                     else RoIAlign(pool_size, spatial_scale, sampling_ratio=2, aligned=True))
        ph, pw = self.pool.output_size
        self.flatten = Flatten()
        self.fc6 = Linear(self.in_channels * ph * pw, hidden, rng=rng)
        self.relu6 = ReLU()
        self.fc7 = Linear(hidden, hidden, rng=rng)
        self.relu7 = ReLU()
        k1 = self.num_classes + 1
        self.cls_score = Linear(hidden, k1, rng=rng)
        self.cls_score.weight = Parameter((rng.standard_normal((k1, hidden)) * 0.01).astype(np.float32))
        self.bbox_pred = Linear(hidden, 4 * k1, rng=rng)
        self.bbox_pred.weight = Parameter((rng.standard_normal((4 * k1, hidden)) * 0.001).astype(np.float32))
        self._shape = None

    def __repr__(self):
        return (f"FastRCNNHead(in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"pool={self.pool!r}, hidden={self.fc7.in_features})")

    def forward(self, features, rois):
        where = "FastRCNNHead.forward"
        features = as_float_array(features, "features", ndim=4, where=where)
        if features.shape[1] != self.in_channels:
            raise ValueError(f"{where}: features have {features.shape[1]} channels but in_channels="
                             f"{self.in_channels}")
        pooled = self.pool.forward(features, rois)  # (R, C, ph, pw)
        self._shape = (features.shape, pooled.shape[0])
        k1 = self.num_classes + 1
        if pooled.shape[0] == 0:
            if is_device_array(pooled):
                return (empty_on_device((0, k1), features.dtype),  # (0, K + 1)
                        empty_on_device((0, 4 * k1), features.dtype))  # (0, 4 (K + 1))
            return np.zeros((0, k1), features.dtype), np.zeros((0, 4 * k1), features.dtype)
        x = self.flatten.forward(pooled)  # (R, C * ph * pw)
        x = self.relu6.forward(self.fc6.forward(x))  # (R, hidden)
        x = self.relu7.forward(self.fc7.forward(x))  # (R, hidden)
        return self.cls_score.forward(x), self.bbox_pred.forward(x)  # (R, K + 1), (R, 4 (K + 1))

    def backward(self, grad_cls, grad_box):
        where = "FastRCNNHead.backward"
        if self._shape is None:
            raise ValueError(f"{where}: call forward first")
        features_shape, num_rois = self._shape
        k1 = self.num_classes + 1
        grad_cls = as_float_array(grad_cls, "grad_cls", ndim=2, where=where)
        grad_box = as_float_array(grad_box, "grad_box", ndim=2, where=where)
        if grad_cls.shape != (num_rois, k1) or grad_box.shape != (num_rois, 4 * k1):
            raise ValueError(f"{where}: grad_cls and grad_box must have shapes {(num_rois, k1)} and "
                             f"{(num_rois, 4 * k1)}, got {grad_cls.shape} and {grad_box.shape}")
        if num_rois == 0:
            if is_device_array(grad_cls):
                return zeros_on_device(features_shape, grad_cls.dtype)
            return np.zeros(features_shape, grad_cls.dtype)
        g = self.cls_score.backward(grad_cls)  # (R, hidden)
        g_box = self.bbox_pred.backward(grad_box)  # (R, hidden)
        if is_device_array(g):
            launch(_add_cuda, *grid_1d(g.size), _flat(g), _flat(g_box))
        else:
            g = g + g_box
        g = self.fc7.backward(self.relu7.backward(g))
        g = self.fc6.backward(self.relu6.backward(g))  # (R, C * ph * pw)
        return self.pool.backward(self.flatten.backward(g))  # (N, C, H, W)


def head_loss(cls_logits, box_deltas, labels, box_targets, sigma=1.0):
    """Fast R-CNN's multi-task loss over the sampled RoIs, and its gradients.

        loss_cls = 1/N sum_i -log softmax(z_i)_{u_i}
        loss_box = 1/N sum_{i: u_i >= 1} sum_{j in x,y,w,h} smooth_L1(t_i^{u_i, j} - v_i^j)

    with N the number of sampled RoIs (``labels`` >= 0; -1 rows are ignored), u_i the
    RoI's class (0 background), t_i^u the deltas of the RoI's own class only and v_i
    its box target; smooth_L1 with ``beta = 1 / sigma**2``. Normalising the box term by
    all N RoIs, not just the foreground ones, is py-faster-rcnn's choice (lambda = 1).
    No sampled RoI: both losses 0 with zero gradients.

    cls_logits (R, K + 1), box_deltas (R, 4 (K + 1)), labels (R,) int in [-1, K],
    box_targets (R, 4) (rows of background RoIs are not read). Returns a dict with
    ``loss_cls``, ``loss_box`` (floats), ``grad_cls`` and ``grad_box`` (shapes and
    dtypes of cls_logits and box_deltas).
    """
    where = "head_loss"
    cls_logits = as_float_array(cls_logits, "cls_logits", ndim=2, where=where)
    box_deltas = as_float_array(box_deltas, "box_deltas", ndim=2, where=where)
    box_targets = as_float_array(box_targets, "box_targets", ndim=2, where=where)
    labels = _as_labels(labels, where)
    if any(is_device_array(a) for a in (cls_logits, box_deltas, box_targets, labels)):
        raise NotImplementedError(f"{where}: pass NumPy arrays")
    r, k1 = cls_logits.shape
    if k1 == 0:
        raise ValueError(f"{where}: cls_logits must have at least one (background) class column, "
                         f"got shape {cls_logits.shape}")
    if box_deltas.shape != (r, 4 * k1):
        raise ValueError(f"{where}: box_deltas must have shape {(r, 4 * k1)} to match cls_logits {cls_logits.shape}, "
                         f"got {box_deltas.shape}")
    if box_targets.shape != (r, 4):
        raise ValueError(f"{where}: box_targets must have shape {(r, 4)}, got {box_targets.shape}")
    if labels.shape[0] != r:
        raise ValueError(f"{where}: labels has {labels.shape[0]} entries but cls_logits has {r} rows")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must have an integer dtype, got {labels.dtype.name}")
    if labels.size and (labels.min() < -1 or labels.max() >= k1):
        i = int(np.flatnonzero((labels < -1) | (labels >= k1))[0])
        raise ValueError(f"{where}: labels[{i}] = {int(labels[i])} is outside [-1, {k1 - 1}]")
    beta = _smooth_l1_beta(sigma, where)
    check_finite(cls_logits, "cls_logits", where)
    check_finite(box_deltas, "box_deltas", where)
    fg = labels > 0
    targets = np.where(fg[:, None], box_targets, 0).astype(box_deltas.dtype)  # (R, 4): own rows only
    check_finite(targets, "box_targets (foreground rows)", where)

    # The inputs are checked: the losses' unchecked host cores (see losses.py).
    loss_cls, grad_cls = _softmax_cross_entropy_host(cls_logits, labels, ignore_index=-1)
    sampled = int((labels >= 0).sum())
    rows = np.arange(r)
    cols = 4 * np.maximum(labels, 0)[:, None] + np.arange(4)  # (R, 4): the own class's columns
    own = box_deltas[rows[:, None], cols]  # (R, 4)
    loss_box, grad_own = _smooth_l1_host(own, targets, beta,
                                         weights=np.repeat(fg[:, None], 4, axis=1).astype(box_deltas.dtype))
    scale = 1.0 / sampled if sampled else 0.0
    grad_box = np.zeros_like(box_deltas)  # (R, 4 (K + 1))
    grad_box[rows[:, None], cols] = grad_own * box_deltas.dtype.type(scale)
    return {"loss_cls": float(loss_cls), "loss_box": float(loss_box) * scale,
            "grad_cls": grad_cls, "grad_box": grad_box}


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))  # (R, K + 1)
    return e / e.sum(axis=1, keepdims=True)


def postprocess_detections(rois_boxes, cls_logits, box_deltas, image_size, score_thresh=0.05, nms_thresh=0.3,
                           max_detections=100, weights=HEAD_BOX_WEIGHTS):
    """Detections of one image from the head's outputs, as torchvision's RoIHeads.postprocess_detections.

    Softmax scores p_k; each RoI decoded with its class-k deltas (``weights`` undo the
    target normalisation by stds (0.1, 0.1, 0.2, 0.2)) and clipped to the image; then,
    over every (RoI, object class) pair: drop background, keep p_k > score_thresh, drop
    boxes narrower or shorter than 0.01, NMS per class at ``nms_thresh``, keep the
    ``max_detections`` highest scores.

    rois_boxes (R, 4), cls_logits (R, K + 1), box_deltas (R, 4 (K + 1)), image_size
    (height, width). Returns a dict: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,)
    int64 in 1..K, by decreasing score.

    On the same input torchvision keeps the same detections in the same order; scores
    agree to a few ulps (the softmax's exp and division are NumPy's, not torch's), boxes
    to an ulp or so (``decode``'s exp), so only a score within an ulp or two of
    ``score_thresh`` or of another score could be decided differently, or
    (rarely) an IoU that torchvision's ``batched_nms`` moves across ``nms_thresh`` by
    shifting the coordinates, which it does for inputs of up to 1000 boxes on the CPU
    (see ``tinyfrcnn.nms.batched_nms``).
    """
    where = "postprocess_detections"
    rois_boxes = check_boxes(rois_boxes, "rois_boxes", where)
    cls_logits = as_float_array(cls_logits, "cls_logits", ndim=2, where=where)
    box_deltas = as_float_array(box_deltas, "box_deltas", ndim=2, where=where)
    r, k1 = cls_logits.shape
    if rois_boxes.shape[0] != r:
        raise ValueError(f"{where}: rois_boxes has {rois_boxes.shape[0]} rows but cls_logits has {r}")
    if box_deltas.shape != (r, 4 * k1):
        raise ValueError(f"{where}: box_deltas must have shape {(r, 4 * k1)}, got {box_deltas.shape}")
    if k1 < 2:
        raise ValueError(f"{where}: cls_logits needs a background and at least one object column, got {k1}")
    check_finite(cls_logits, "cls_logits", where)
    check_finite(box_deltas, "box_deltas", where)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise ValueError(f"{where}: image_size must be (height, width), got {image_size!r}")
    height = check_number(image_size[0], "image_size", low=0, low_open=True, where=where)
    width = check_number(image_size[1], "image_size", low=0, low_open=True, where=where)
    score_thresh = check_number(score_thresh, "score_thresh", low=0, high=1, where=where)
    nms_thresh = check_number(nms_thresh, "nms_thresh", low=0, high=1, where=where)
    max_detections = check_positive_int(max_detections, "max_detections", where)

    weights = _check_weights(weights, where, box_deltas.dtype)
    rois_boxes = cast_finite(rois_boxes, box_deltas.dtype, "rois_boxes", "box_deltas", where)
    scores = _softmax(cls_logits)[:, 1:].reshape(-1)  # (R K,) in the dtype of cls_logits, as torchvision
    boxes = clip_boxes(_decode(rois_boxes, box_deltas, weights), height, width)  # (R, 4 (K + 1))
    boxes = boxes[:, 4:].reshape(-1, 4)  # (R K, 4)
    labels = np.tile(np.arange(1, k1, dtype=np.int64), r)  # (R K,)
    keep = np.flatnonzero(scores > score_thresh)
    keep = keep[remove_small_boxes(boxes[keep], 1e-2)]
    keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], nms_thresh)][:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
