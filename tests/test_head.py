"""Fast R-CNN head: gradients through the whole head, the multi-task loss, detection post-processing."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradients import rel_err
from tinyfrcnn.boxes import box_iou
from tinyfrcnn.gradcheck import numerical_gradient
from tinyfrcnn.head import FastRCNNHead, head_loss, postprocess_detections


def distinct_features(rng, shape):
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.05 + rng.uniform(0, 0.01, shape)  # no ties


@pytest.mark.parametrize("pooling", ["roi_pool", "roi_align"])
def test_head_gradient_check_features_and_every_parameter(pooling):
    rng = np.random.default_rng(0)
    head = FastRCNNHead(3, 2, pool_size=2, hidden=6, spatial_scale=0.5, pooling=pooling, rng=rng).astype(np.float64)
    # Larger output layers than the init, so their gradients reach the features clearly.
    head.cls_score.weight.data = rng.standard_normal(head.cls_score.weight.shape)
    head.bbox_pred.weight.data = rng.standard_normal(head.bbox_pred.weight.shape)
    features = distinct_features(rng, (2, 3, 5, 6))
    rois = np.array([[0, -2, -1, 9, 7], [1, 2.3, 1.1, 8.4, 7.9], [1, 0, 0, 11, 9]])
    r_cls = rng.standard_normal((3, 3))
    r_box = rng.standard_normal((3, 12))

    def loss(_=None):
        cls, box = head.forward(features, rois)
        return np.sum(cls * r_cls) + np.sum(box * r_box)

    head.zero_grad()
    loss()
    grad_features = head.backward(r_cls, r_box)
    assert rel_err(grad_features, numerical_gradient(loss, features)) < 1e-6
    assert np.abs(grad_features).sum() > 0
    for name, p in head.named_parameters():
        numeric = numerical_gradient(loss, p.data)
        assert rel_err(p.grad, numeric) < 1e-6, name


@pytest.mark.parametrize("pooling", ["roi_pool", "roi_align"])
def test_head_forward_is_its_layers_written_out(pooling):
    """pool -> flatten -> fc6 -> ReLU -> fc7 -> ReLU -> (cls_score, bbox_pred), in NumPy;
    RoIAlign with 2 x 2 samples per bin and the half-pixel alignment."""
    from tinyfrcnn.roi import roi_align, roi_pool

    rng = np.random.default_rng(5)
    head = FastRCNNHead(3, 2, pool_size=2, hidden=6, spatial_scale=0.5, pooling=pooling, rng=rng).astype(np.float64)
    for p in head.parameters():
        p.data = rng.standard_normal(p.shape)
    features = distinct_features(rng, (2, 3, 8, 9))
    rois = np.array([[0, 0.7, 1.3, 15.2, 11.9], [1, 3.1, 2.2, 9.6, 14.7], [1, 0, 0, 17, 15]])
    if pooling == "roi_pool":
        pooled, _ = roi_pool(features, rois, 2, 0.5)  # (R, C, 2, 2) and the argmax
    else:
        pooled = roi_align(features, rois, 2, 0.5, sampling_ratio=2, aligned=True)
    x = pooled.reshape(3, -1)  # (R, C * 2 * 2)
    x = np.maximum(x @ head.fc6.weight.data.T + head.fc6.bias.data, 0)
    x = np.maximum(x @ head.fc7.weight.data.T + head.fc7.bias.data, 0)
    assert x.any()
    cls, box = head.forward(features, rois)
    np.testing.assert_allclose(cls, x @ head.cls_score.weight.data.T + head.cls_score.bias.data, rtol=1e-12)
    np.testing.assert_allclose(box, x @ head.bbox_pred.weight.data.T + head.bbox_pred.bias.data, rtol=1e-12)


def test_head_backward_accumulates_parameter_gradients():
    rng = np.random.default_rng(1)
    head = FastRCNNHead(2, 1, pool_size=2, hidden=4, spatial_scale=1.0, rng=rng)
    features = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    cls, box = head.forward(features, rois)
    head.backward(np.ones_like(cls), np.ones_like(box))
    once = [p.grad.copy() for p in head.parameters()]
    head.forward(features, rois)
    head.backward(np.ones_like(cls), np.ones_like(box))
    for g1, p in zip(once, head.parameters()):
        assert np.allclose(p.grad, 2 * g1)


def test_head_shapes_dtype_init_and_empty():
    rng = np.random.default_rng(2)
    head = FastRCNNHead(16, 4, pool_size=(3, 2), hidden=512, spatial_scale=1 / 8, rng=rng)
    assert head.fc6.weight.shape == (512, 16 * 3 * 2)
    assert head.cls_score.weight.shape == (5, 512) and head.bbox_pred.weight.shape == (20, 512)
    assert abs(head.cls_score.weight.data.std() - 0.01) < 0.002
    assert abs(head.bbox_pred.weight.data.std() - 0.001) < 0.0001
    assert abs(head.fc7.weight.data.std() - math.sqrt(2 / 512)) < 0.005
    assert not head.cls_score.bias.data.any() and not head.bbox_pred.bias.data.any()
    features = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    cls, box = head.forward(features, np.array([[0, 0, 0, 40, 30]], np.float32))
    assert cls.shape == (1, 5) and box.shape == (1, 20) and cls.dtype == np.float32
    cls, box = head.forward(features, np.zeros((0, 5), np.float32))
    assert cls.shape == (0, 5) and box.shape == (0, 20)
    grad = head.backward(cls, box)
    assert grad.shape == features.shape and not grad.any()


def test_head_defaults():
    """7 x 7 max pooling of a stride-8 feature map and 256 hidden units, as the docstring says."""
    head = FastRCNNHead(4, 2)
    assert head.pool.output_size == (7, 7) and head.pool.spatial_scale == 1 / 8 and head.pooling == "roi_pool"
    assert head.fc6.weight.shape == (256, 4 * 7 * 7) and head.fc7.weight.shape == (256, 256)


def test_head_bad_input():
    with pytest.raises(ValueError, match="pooling"):
        FastRCNNHead(4, 2, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        FastRCNNHead(4, 0)
    with pytest.raises(ValueError, match="FastRCNNHead: rng must be a numpy.random.Generator"):
        FastRCNNHead(4, 2, rng=5)
    head = FastRCNNHead(4, 2, pool_size=2, hidden=4)
    with pytest.raises(ValueError, match="call forward first"):
        head.backward(np.zeros((1, 3)), np.zeros((1, 12)))
    with pytest.raises(ValueError, match="channels"):
        head.forward(np.zeros((1, 3, 4, 4)), np.zeros((1, 5)))
    head.forward(np.zeros((1, 4, 4, 4)), np.array([[0, 0, 0, 8, 8]], float))
    with pytest.raises(ValueError, match="grad_cls and grad_box must have shapes"):
        head.backward(np.zeros((1, 3)), np.zeros((1, 8)))
    with pytest.raises(ValueError, match=r"FastRCNNHead.backward: grad_cls and grad_box must have shapes \(1, 3\) "
                                         r"and \(1, 12\), got \(1, 2\) and \(1, 12\)"):
        head.backward(np.zeros((1, 2)), np.zeros((1, 12)))


# --------------------------------------------------------------------------- head_loss


def smooth_l1_scalar(x, beta):
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_head_loss_by_hand(sigma):
    logits = np.array([[0.1, 0.2, 2.0], [1.5, -0.3, 0.0], [3.0, 3.0, 3.0], [0.0, 1.0, -1.0]])
    labels = np.array([2, 0, -1, 1])
    deltas = np.arange(48, dtype=np.float64).reshape(4, 12) * 0.05
    targets = np.array([[0.3, 0.1, 0.5, 0.2], [9, 9, 9, 9], [9, 9, 9, 9], [0.0, 0.2, -0.9, 0.05]])
    out = head_loss(logits, deltas, labels, targets, sigma=sigma)

    def nll(z, u):
        return math.log(sum(math.exp(v) for v in z)) - z[u]

    n = 3  # three sampled RoIs (the -1 is ignored)
    assert out["loss_cls"] == pytest.approx((nll(logits[0], 2) + nll(logits[1], 0) + nll(logits[3], 1)) / n)
    beta = 1 / sigma**2
    box = sum(smooth_l1_scalar(deltas[0, 8 + j] - targets[0, j], beta) for j in range(4))
    box += sum(smooth_l1_scalar(deltas[3, 4 + j] - targets[3, j], beta) for j in range(4))
    assert out["loss_box"] == pytest.approx(box / n)
    # Only the own class's four columns of foreground RoIs get a gradient.
    nonzero = np.argwhere(out["grad_box"] != 0)
    assert set(map(tuple, nonzero)) <= {(0, 8), (0, 9), (0, 10), (0, 11), (3, 4), (3, 5), (3, 6), (3, 7)}
    assert not out["grad_cls"][2].any()


def test_head_loss_gradients_match_central_differences():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 4))
    deltas = rng.standard_normal((6, 16))
    labels = np.array([1, 3, 0, 0, -1, 2])
    targets = rng.standard_normal((6, 4))
    out = head_loss(logits, deltas, labels, targets, sigma=2.0)
    num_cls = numerical_gradient(lambda z: head_loss(z, deltas, labels, targets, sigma=2.0)["loss_cls"], logits)
    num_box = numerical_gradient(lambda d: head_loss(logits, d, labels, targets, sigma=2.0)["loss_box"], deltas)
    assert rel_err(out["grad_cls"], num_cls) < 1e-6
    assert rel_err(out["grad_box"], num_box) < 1e-6


def test_head_loss_nothing_sampled_and_bad_input():
    out = head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([-1, -1]), np.zeros((2, 4)))
    assert out["loss_cls"] == 0 and out["loss_box"] == 0
    assert not out["grad_cls"].any() and not out["grad_box"].any()
    with pytest.raises(ValueError, match="box_deltas must have shape"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 8)), np.array([0, 1]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"labels\[1\] = 3"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 3]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"head_loss: labels\[1\] = -2 is outside \[-1, 2\]"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, -2]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="box_targets must have shape"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="sigma"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), np.zeros((2, 4)), sigma=0)
    with pytest.raises(ValueError, match="cls_logits"):
        head_loss(np.array([[0, np.nan, 0], [0, 0, 0]]), np.zeros((2, 12)), np.array([0, 1]), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="box_targets"):
        head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), np.array([[0, 0, 0, 0], [0, np.inf, 0, 0]]))
    # a background row's target is never read, whatever it holds
    out = head_loss(np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), np.array([[np.nan] * 4, [0, 0, 0, 0]]))
    assert np.isfinite(out["loss_box"]) and np.isfinite(out["grad_box"]).all()


@pytest.mark.parametrize("cls_logits, box_deltas, labels, sigma, match", [
    (np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), 1e-200,  # sigma**2 underflows to 0
     r"head_loss: sigma must give a finite beta = 1/sigma\*\*2 > 0, got 1e-200"),
    (np.zeros((2, 3)), np.zeros((2, 12)), np.array([0, 1]), 1e200,  # sigma**2 overflows
     r"head_loss: sigma must give a finite beta = 1/sigma\*\*2 > 0, got 1e\+200"),
    (np.zeros((2, 0)), np.zeros((2, 0)), np.array([-1, -1]), 1.0,
     r"head_loss: cls_logits must have at least one \(background\) class column, got shape \(2, 0\)"),
])
def test_head_loss_bad_sigma_and_no_class_column(cls_logits, box_deltas, labels, sigma, match):
    with pytest.raises(ValueError, match=match):
        head_loss(cls_logits, box_deltas, labels, np.zeros((len(labels), 4)), sigma=sigma)


def test_head_loss_empty_list_labels():
    out = head_loss(np.zeros((0, 3)), np.zeros((0, 12)), [], np.zeros((0, 4)))  # an empty list has no dtype
    assert out["loss_cls"] == 0 and out["grad_cls"].shape == (0, 3) and out["grad_box"].shape == (0, 12)
    with pytest.raises(ValueError, match="labels must have an integer dtype, got float64"):
        head_loss(np.zeros((0, 3)), np.zeros((0, 12)), np.zeros(0), np.zeros((0, 4)))


# --------------------------------------------------------------------------- postprocess_detections


def test_postprocess_by_hand():
    rois = np.array([[10, 10, 50, 50], [12, 12, 52, 52], [100, 100, 140, 130]], np.float64)
    logits = np.log(np.array([[0.1, 0.9, 0.0001], [0.2, 0.8, 0.0001], [0.3, 0.01, 0.69]]))
    deltas = np.zeros((3, 12))
    out = postprocess_detections(rois, logits, deltas, (120, 200), score_thresh=0.05, nms_thresh=0.5)
    # Zero deltas leave each RoI as it is; RoI 1 overlaps RoI 0 (IoU > 0.5) in class 1 and goes;
    # RoI 2 is clipped to the image height.
    assert out["labels"].tolist() == [1, 2]
    assert np.allclose(out["scores"], [0.9 / 1.0001, 0.69], rtol=1e-6)
    assert np.allclose(out["boxes"], [[10, 10, 50, 50], [100, 100, 140, 120]])
    assert out["labels"].dtype == np.int64


def test_postprocess_decodes_with_normalised_weights():
    rois = np.array([[0, 0, 10, 10]], np.float64)
    deltas = np.zeros((1, 8))
    deltas[0, 4:] = [10 * 0.1, 0, 5 * math.log(2), 0]  # shift by 0.1 widths, double the width
    out = postprocess_detections(rois, np.array([[0.0, 5.0]]), deltas, (100, 100))
    # Centre 5 + 0.1 * 10 = 6, width 20: (-4, 0, 16, 10), clipped at x = 0.
    assert np.allclose(out["boxes"], [[0, 0, 16, 10]])


def test_postprocess_nms_is_per_class():
    """One RoI scored for two classes gives two detections of the same box: NMS only
    compares boxes of one class."""
    rois = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40.0]])
    logits = np.log(np.array([[0.2, 0.5, 0.3], [0.2, 0.6, 0.2], [0.9, 0.05, 0.05]]))
    out = postprocess_detections(rois, logits, np.zeros((3, 12)), (50, 50), score_thresh=0.1, nms_thresh=0.5)
    # class 1: RoI 1 (0.6) suppresses RoI 0 (0.5, IoU 9/11); class 2: RoI 0 (0.3) and RoI 1 (0.2) likewise
    assert out["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(out["scores"], [0.6, 0.3])
    np.testing.assert_array_equal(out["boxes"], [[1, 0, 11, 10], [0, 0, 10, 10]])


def test_postprocess_defaults():
    """score_thresh 0.05, nms_thresh 0.3 and at most 100 detections."""
    rois = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [40, 0, 50, 10], [60, 0, 70, 10.0]])
    # IoU(RoI 0, RoI 1) = 7/13 > 0.3; RoI 3's score 0.04 is below 0.05
    logits = np.log(np.array([[0.1, 0.9], [0.2, 0.8], [0.94, 0.06], [0.96, 0.04]]))
    out = postprocess_detections(rois, logits, np.zeros((4, 8)), (80, 80))
    np.testing.assert_array_equal(out["boxes"], rois[[0, 2]])
    np.testing.assert_allclose(out["scores"], [0.9, 0.06])
    # IoU 1/3 (boxes 0 and 1) is above 0.3: suppressed; 1/4 (boxes 0 and 2) is not
    rois = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [6, 0, 16, 10.0]])
    out = postprocess_detections(rois, np.log([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]), np.zeros((3, 8)), (80, 80))
    np.testing.assert_array_equal(out["boxes"], rois[[0, 2]])
    x = np.arange(150.0) * 20  # 150 boxes that do not overlap
    rois = np.column_stack([x, np.zeros(150), x + 10, np.full(150, 10.0)])
    out = postprocess_detections(rois, np.tile([0.0, 1.0], (150, 1)), np.zeros((150, 8)), (10, 3000))
    assert len(out["boxes"]) == 100


def test_postprocess_score_threshold_is_strict_and_small_boxes_go():
    """Kept: score > score_thresh (a score equal to it goes) and boxes at least 0.01 wide
    and high (torchvision's remove_small_boxes(boxes, 1e-2))."""
    rois = np.array([[0, 0, 0.5, 10], [5, 0, 5.005, 10], [20, 20, 30, 30.0]])
    logits = np.log(np.array([[0.2, 0.8], [0.2, 0.8], [0.5, 0.5]]))
    out = postprocess_detections(rois, logits, np.zeros((3, 8)), (40, 40), score_thresh=0.05)
    np.testing.assert_array_equal(out["boxes"], [[0, 0, 0.5, 10], [20, 20, 30, 30]])  # the 0.005-wide box goes
    out = postprocess_detections(rois, logits, np.zeros((3, 8)), (40, 40), score_thresh=0.5)
    np.testing.assert_array_equal(out["boxes"], [[0, 0, 0.5, 10]])  # score 0.5 is not above 0.5
    assert postprocess_detections(rois, np.zeros((3, 4)), np.zeros((3, 16)), (40, 40),
                                  score_thresh=0.25)["scores"].size == 0  # every score exactly 1/4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r=st.integers(0, 40), k=st.integers(1, 4),
       nms_thresh=st.sampled_from([0.0, 0.3, 0.5, 0.7]), score_thresh=st.sampled_from([0.0, 0.05, 0.3]),
       max_detections=st.integers(1, 60))
def test_postprocess_properties(seed, r, k, nms_thresh, score_thresh, max_detections):
    rng = np.random.default_rng(seed)
    h, w = 60, 80
    xy = rng.uniform(-10, 70, (r, 2))
    rois = np.column_stack([xy, xy + rng.uniform(1, 40, (r, 2))])  # (r, 4)
    logits = rng.standard_normal((r, k + 1)) * 2
    deltas = rng.standard_normal((r, 4 * (k + 1)))
    out = postprocess_detections(rois, logits, deltas, (h, w), score_thresh, nms_thresh, max_detections)
    boxes, scores, labels = out["boxes"], out["scores"], out["labels"]
    assert len(boxes) == len(scores) == len(labels) <= max_detections
    assert np.all(scores > score_thresh) and np.all(np.diff(scores) <= 0)
    assert np.all((labels >= 1) & (labels <= k))
    assert np.all(boxes[:, [0, 2]] >= 0) and np.all(boxes[:, [0, 2]] <= w)
    assert np.all(boxes[:, [1, 3]] >= 0) and np.all(boxes[:, [1, 3]] <= h)
    assert np.all(boxes[:, 2] - boxes[:, 0] >= 1e-2) and np.all(boxes[:, 3] - boxes[:, 1] >= 1e-2)
    for c in np.unique(labels):
        same = boxes[labels == c]
        iou = box_iou(same, same) - np.eye(len(same)) * 2
        assert np.all(iou <= nms_thresh + 1e-6)
    # A smaller max_detections keeps a prefix of the full list.
    full = postprocess_detections(rois, logits, deltas, (h, w), score_thresh, nms_thresh, 10_000)
    assert np.array_equal(full["scores"][:len(scores)], scores)


def test_postprocess_bad_input():
    rois, logits, deltas = np.zeros((1, 4)), np.zeros((1, 3)), np.zeros((1, 12))
    with pytest.raises(ValueError, match="box_deltas must have shape"):
        postprocess_detections(rois, logits, np.zeros((1, 8)), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        postprocess_detections(rois, logits, deltas, (10,))
    with pytest.raises(ValueError, match="score_thresh"):
        postprocess_detections(rois, logits, deltas, (10, 10), score_thresh=2)
    with pytest.raises(ValueError, match="postprocess_detections: nms_thresh must be <= 1, got 1.5"):
        postprocess_detections(rois, logits, deltas, (10, 10), nms_thresh=1.5)
    with pytest.raises(ValueError, match="cls_logits needs a background and at least one object column, got 1"):
        postprocess_detections(rois, np.zeros((1, 1)), np.zeros((1, 4)), (10, 10))
    with pytest.raises(ValueError, match="max_detections"):
        postprocess_detections(rois, logits, deltas, (10, 10), max_detections=0)
    with pytest.raises(ValueError, match="rois_boxes has 2 rows"):
        postprocess_detections(np.zeros((2, 4)), logits, deltas, (10, 10))
    with pytest.raises(ValueError, match="postprocess_detections: box_deltas holds NaN"):
        postprocess_detections(rois, logits, np.full((1, 12), np.nan), (10, 10))
    with pytest.raises(ValueError, match=r"postprocess_detections: rois_boxes in float32 \(the dtype of box_deltas\)"):
        postprocess_detections(np.array([[0, 0, 1e39, 1]]), logits, deltas.astype(np.float32), (10, 10))


def test_postprocess_scores_in_the_logits_dtype():
    # torchvision takes the softmax in the logits' dtype: a float64 logit beyond float32's
    # range still gives a score of 1 (cast first, it became inf and the score NaN)
    rois = np.array([[0, 0, 10, 10]], np.float32)
    out = postprocess_detections(rois, np.array([[0.0, 1e39]]), np.zeros((1, 8), np.float32), (20, 20))
    assert out["scores"].tolist() == [1.0] and out["scores"].dtype == np.float64
    assert out["boxes"].dtype == np.float32 and out["boxes"].tolist() == [[0, 0, 10, 10]]
