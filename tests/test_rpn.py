import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradients import rel_err
from tinyfrcnn.boxes import box_iou, decode
from tinyfrcnn.gradcheck import numerical_gradient
from tinyfrcnn.nms import _nms_reference
from tinyfrcnn.rpn import (TEST_PROPOSALS, TRAIN_PROPOSALS, RPNHead, generate_proposals,
                           generate_proposals_batch, objectness, rpn_loss)


def simple_anchors(h, w, k, stride=8.0, sizes=(8.0, 16.0, 24.0)):
    """Square anchors of ``sizes[:k]`` centred on each cell, in row order (y*W + x)*k + a."""
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * stride, (np.arange(w) + 0.5) * stride, indexing="ij")
    half = np.array(sizes[:k]) / 2
    cx = np.repeat(xs.reshape(-1), k)
    cy = np.repeat(ys.reshape(-1), k)
    r = np.tile(half, h * w)
    return np.stack([cx - r, cy - r, cx + r, cy + r], axis=1)  # (H*W*k, 4)


# ---------------------------------------------------------------- head


def test_head_shapes_init_and_anchor_row_order():
    rng = np.random.default_rng(0)
    head = RPNHead(4, 6, 3, rng=rng)
    for conv in (head.conv, head.cls, head.reg):
        assert np.all(conv.bias.data == 0) and 0.005 < conv.weight.data.std() < 0.015
    assert head.cls.weight.shape == (6, 6, 1, 1) and head.reg.weight.shape == (12, 6, 1, 1)
    assert len(head.parameters()) == 6
    for p in head.parameters():
        p.data = rng.normal(size=p.shape).astype(np.float32)
    x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)
    logits, deltas = head.forward(x)
    assert logits.shape == (2, 3 * 5 * 3, 2) and deltas.shape == (2, 45, 4)
    assert logits.dtype == np.float32
    hidden = np.maximum(head.conv.forward(x), 0)
    cls, reg = head.cls.forward(hidden), head.reg.forward(hidden)  # (N, 2k, H, W), (N, 4k, H, W)
    for n, y, xx, a in [(0, 0, 0, 0), (1, 2, 4, 2), (0, 1, 3, 1), (1, 0, 4, 0)]:
        row = (y * 5 + xx) * 3 + a
        np.testing.assert_allclose(logits[n, row], cls[n, 2 * a:2 * a + 2, y, xx])
        np.testing.assert_allclose(deltas[n, row], reg[n, 4 * a:4 * a + 4, y, xx])


def test_head_gradient_check_float64():
    rng = np.random.default_rng(1)
    head = RPNHead(3, 4, 2, rng=rng).astype(np.float64)
    for p in head.parameters():
        p.data = rng.normal(scale=0.5, size=p.shape)
    x = rng.normal(size=(2, 3, 3, 4))
    r_logits = rng.normal(size=(2, 24, 2))
    r_deltas = rng.normal(size=(2, 24, 4))

    def loss():
        logits, deltas = head.forward(x)
        return (logits * r_logits).sum() + (deltas * r_deltas).sum()

    head.zero_grad()
    head.forward(x)
    grad_x = head.backward(r_logits, r_deltas)
    assert grad_x.shape == x.shape and grad_x.dtype == np.float64
    assert rel_err(grad_x, numerical_gradient(lambda _: loss(), x)) < 1e-6
    for p in head.parameters():
        assert rel_err(p.grad, numerical_gradient(lambda _: loss(), p.data)) < 1e-6
    # one of the two gradients alone
    head.forward(x)
    only = head.backward(r_logits, None)
    head.forward(x)
    both_minus_reg = grad_x - head.backward(None, r_deltas)
    np.testing.assert_allclose(only, both_minus_reg, atol=1e-12)


def test_head_bad_input():
    head = RPNHead(3, 4, 2)
    with pytest.raises(ValueError, match="before forward"):
        head.backward(np.zeros((1, 8, 2)), np.zeros((1, 8, 4)))
    head.forward(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="grad_logits must have shape"):
        head.backward(np.zeros((1, 9, 2), np.float32), None)
    with pytest.raises(ValueError, match="both None"):
        head.backward(None, None)
    from numba import cuda

    with pytest.raises(ValueError, match="RPNHead.backward: grad_deltas must be a NumPy array, like the forward's"):
        head.backward(None, cuda.to_device(np.zeros((1, 8, 4), np.float32)))
    with pytest.raises(ValueError, match="channels"):
        head.forward(np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="num_anchors"):
        RPNHead(3, 4, 0)
    with pytest.raises(ValueError, match="RPNHead: rng must be a numpy.random.Generator"):
        RPNHead(3, 4, 2, rng=5)


# ---------------------------------------------------------------- loss


def test_rpn_loss_hand_worked():
    logits = np.zeros((4, 2))
    labels = np.array([1, 0, -1, 1])
    deltas = np.array([[0.0, 0, 0, 0], [5, 5, 5, 5], [5, 5, 5, 5], [0.1, -1, 0, 0]])
    targets = np.zeros((4, 4))
    out = rpn_loss(logits, deltas, labels, targets, sigma=3.0)
    assert out["loss_cls"] == pytest.approx(np.log(2))
    np.testing.assert_allclose(out["grad_logits"], [[0.5, -0.5], [-0.5, 0.5], [0, 0], [0.5, -0.5]] / np.array(3.0))
    # beta = 1/9: 0.1 -> 0.5 * 0.01 * 9 = 0.045; -1 -> 1 - 1/18; the negative anchor's deltas do not count
    assert out["loss_reg"] == pytest.approx((0.045 + 1 - 1 / 18) / 3)
    np.testing.assert_allclose(out["grad_deltas"][3], [0.9 / 3, -1 / 3, 0, 0])
    assert np.all(out["grad_deltas"][:3] == 0)
    out10 = rpn_loss(logits, deltas, labels, targets, sigma=3.0, lam=10.0)
    assert out10["loss_reg"] == pytest.approx(10 * out["loss_reg"])
    assert out10["loss_cls"] == pytest.approx(out["loss_cls"])
    np.testing.assert_allclose(out10["grad_deltas"], 10 * out["grad_deltas"], rtol=1e-12)
    np.testing.assert_array_equal(out10["grad_logits"], out["grad_logits"])


@pytest.mark.parametrize("lam,sigma", [(1.0, 3.0), (10.0, 1.0)])
def test_rpn_loss_gradient_check(lam, sigma):
    rng = np.random.default_rng(2)
    logits, deltas = rng.normal(size=(30, 2)), rng.normal(scale=0.5, size=(30, 4))
    targets = rng.normal(scale=0.5, size=(30, 4))
    labels = rng.integers(-1, 2, size=30)
    out = rpn_loss(logits, deltas, labels, targets, sigma=sigma, lam=lam)

    def total():
        o = rpn_loss(logits, deltas, labels, targets, sigma=sigma, lam=lam)
        return o["loss_cls"] + o["loss_reg"]

    assert rel_err(out["grad_logits"], numerical_gradient(lambda _: total(), logits)) < 1e-6
    assert rel_err(out["grad_deltas"], numerical_gradient(lambda _: total(), deltas)) < 1e-6


def test_head_and_loss_end_to_end_gradient():
    rng = np.random.default_rng(3)
    head = RPNHead(2, 3, 2, rng=rng).astype(np.float64)
    for p in head.parameters():
        p.data = rng.normal(scale=0.5, size=p.shape)
    x = rng.normal(size=(1, 2, 3, 3))
    labels = rng.integers(-1, 2, size=18)
    targets = rng.normal(scale=0.3, size=(18, 4))

    def total():
        logits, deltas = head.forward(x)
        o = rpn_loss(logits[0], deltas[0], labels, targets)
        return o["loss_cls"] + o["loss_reg"]

    logits, deltas = head.forward(x)
    o = rpn_loss(logits[0], deltas[0], labels, targets)
    head.zero_grad()
    grad_x = head.backward(o["grad_logits"][None], o["grad_deltas"][None])
    assert rel_err(grad_x, numerical_gradient(lambda _: total(), x)) < 1e-6
    assert rel_err(head.conv.weight.grad, numerical_gradient(lambda _: total(), head.conv.weight.data)) < 1e-6


def test_rpn_loss_nothing_sampled_and_float32():
    out = rpn_loss(np.ones((3, 2)), np.ones((3, 4)), np.array([-1, -1, -1]), np.zeros((3, 4)))
    assert out["loss_cls"] == 0 and out["loss_reg"] == 0
    assert np.all(out["grad_logits"] == 0) and np.all(out["grad_deltas"] == 0)
    out = rpn_loss(np.ones((2, 2), np.float32), np.ones((2, 4), np.float32), np.array([1, 0]), np.zeros((2, 4)))
    assert out["grad_logits"].dtype == np.float32 and out["grad_deltas"].dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rpn_loss_batch_is_each_image_alone(dtype):
    # The train step computes the RPN loss of all images in one pass; each image keeps
    # its own normalisation, and the numbers are those of rpn_loss on it, to the bit.
    from tinyfrcnn.rpn import _rpn_loss_batch

    rng = np.random.default_rng(12)
    n, a = 4, 37
    logits = (3 * rng.standard_normal((n, a, 2))).astype(dtype)
    deltas = rng.standard_normal((n, a, 4)).astype(dtype)
    targets = rng.standard_normal((n, a, 4)).astype(dtype)
    labels = rng.integers(-1, 2, (n, a))
    labels[1] = -1  # nothing sampled
    labels[2] = np.where(labels[2] == 1, 0, labels[2])  # negatives only
    out = _rpn_loss_batch(logits, deltas, labels, targets, 1 / 9, 0.7)
    for i in range(n):
        alone = rpn_loss(logits[i], deltas[i], labels[i], targets[i], sigma=3.0, lam=0.7)
        assert out["loss_cls"][i] == alone["loss_cls"] and out["loss_reg"][i] == alone["loss_reg"]
        assert np.array_equal(out["grad_logits"][i], alone["grad_logits"])
        assert np.array_equal(out["grad_deltas"][i], alone["grad_deltas"])
        assert out["grad_logits"].dtype == dtype and out["grad_deltas"].dtype == dtype
    assert out["loss_cls"][1] == 0 and out["loss_reg"][2] == 0 and out["loss_cls"][2] > 0
    assert out["loss_reg"][0] > 0 and out["loss_reg"][3] > 0


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, 1]), np.zeros((3, 4))), "labels has 2"),
        ((np.zeros((3, 2)), np.zeros((2, 4)), np.array([0, 1, 0]), np.zeros((3, 4))), "deltas must have shape"),
        ((np.zeros((3, 3)), np.zeros((3, 4)), np.array([0, 1, 0]), np.zeros((3, 4))), "logits must have shape"),
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, 2, 0]), np.zeros((3, 4))), "labels must be"),
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, -2, 0]), np.zeros((3, 4))),
         r"rpn_loss: labels must be integers in \{-1, 0, 1\}, got dtype int64, values \[-2, 0\]"),
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, 1, 0]), np.full((3, 4), np.nan)), "NaN"),
        ((np.array([[0, 0], [np.inf, 0], [0, 0]]), np.zeros((3, 4)), np.array([0, 1, 0]), np.zeros((3, 4))),
         "rpn_loss: logits"),
        ((np.zeros((3, 2)), np.full((3, 4), np.nan), np.array([-1, -1, -1]), np.zeros((3, 4))), "rpn_loss: deltas"),
        ((np.zeros((3, 2), np.float32), np.zeros((3, 4), np.float32), np.array([0, 1, 0]), np.full((3, 4), 1e300)),
         "reg_targets"),  # finite in float64, inf in the deltas' float32
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, 1, 0]), np.zeros((3, 4)), 1e-200),
         r"rpn_loss: sigma must give a finite beta = 1/sigma\*\*2 > 0, got 1e-200"),  # sigma**2 underflows to 0
        ((np.zeros((3, 2)), np.zeros((3, 4)), np.array([0, 1, 0]), np.zeros((3, 4)), 1e200),
         r"rpn_loss: sigma must give a finite beta"),  # sigma**2 overflows
        ((np.zeros((0, 2)), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4))), "labels must be integers"),
    ],
)
def test_rpn_loss_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rpn_loss(*args)


def test_rpn_loss_empty_list_labels():
    out = rpn_loss(np.zeros((0, 2)), np.zeros((0, 4)), [], np.zeros((0, 4)))
    assert out["loss_cls"] == 0 and out["loss_reg"] == 0
    assert out["grad_logits"].shape == (0, 2) and out["grad_deltas"].shape == (0, 4)


# ---------------------------------------------------------------- proposals


def test_objectness_is_the_softmax_and_stable():
    logits = np.array([[0.0, 0.0], [0.0, np.log(3)], [1000.0, -1000.0], [-1000.0, 1000.0]])
    np.testing.assert_allclose(objectness(logits), [0.5, 0.75, 0.0, 1.0])
    np.testing.assert_allclose(objectness([[1.0, 2.0]]), [1 / (1 + np.exp(-1))])
    assert objectness(np.zeros((0, 2), np.float32)).shape == (0,)


@pytest.mark.parametrize(
    "logits, match",
    [
        (np.array([[1, 2]]), "objectness: logits must be float32 or float64, got int64"),
        (np.array([[np.nan, 2.0]]), r"objectness: logits holds NaN or inf \(first at index \(0, 0\)\)"),
        (np.zeros((2, 3)), r"objectness: logits must have shape \(A, 2\), got \(2, 3\)"),
        (np.zeros(2), r"objectness: logits must be 2-D, got shape \(2,\)"),
    ],
)
def test_objectness_bad_input(logits, match):
    with pytest.raises(ValueError, match=match):
        objectness(logits)


def test_proposals_hand_worked():
    anchors = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 40, 40], [-10, -10, 5, 5], [50, 50, 51, 51.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.99])
    # anchor 1 overlaps anchor 0 with IoU 0.82 -> suppressed; anchor 3 is clipped to (0,0,5,5);
    # anchor 4 is 1x1 -> removed by min_size 2
    boxes, out_scores = generate_proposals(scores, np.zeros((5, 4)), anchors, (64, 64), min_size=2.0)
    np.testing.assert_allclose(out_scores, [0.95, 0.9, 0.7])
    np.testing.assert_allclose(boxes, [[0, 0, 5, 5], [0, 0, 10, 10], [20, 20, 40, 40]])
    boxes, _ = generate_proposals(scores, np.zeros((5, 4)), anchors, (64, 64), post_nms_top_n=2)
    assert len(boxes) == 2
    boxes, _ = generate_proposals(scores, np.zeros((5, 4)), anchors, (64, 64), pre_nms_top_n=2)
    np.testing.assert_allclose(boxes, [[0, 0, 5, 5], [0, 0, 10, 10]])  # 0.99 removed as small first


def test_proposals_from_deltas_that_overflow():
    """A finite but huge t_x decodes to inf; like torchvision, the box is clipped to the
    border (and then dropped by min_size) instead of failing."""
    anchors = np.array([[0, 0, 256, 256], [10, 10, 20, 20]], np.float32)
    deltas = np.array([[1e37, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    boxes, scores = generate_proposals(np.float32([0.9, 0.5]), deltas, anchors, (100, 100))
    np.testing.assert_array_equal(boxes, [[10, 10, 20, 20]])
    boxes, scores = generate_proposals(np.float32([0.9, 0.5]), deltas, anchors, (100, 100), min_size=0)
    np.testing.assert_array_equal(boxes, [[100, 0, 100, 100], [10, 10, 20, 20]])


def test_proposals_rank_by_the_logit_gap_where_probabilities_tie():
    """In float32 the object probability of gaps 18, 25 and 30 all round to 1.0, and near
    0.5 gaps a few 1e-8 apart round to the same probability; equal probabilities rank by the gap."""
    anchors = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], np.float32)
    for gaps in ([18.0, 25.0, 30.0, 5.0], [0.0, 1e-8, 3e-8, -1.0]):
        logits = np.stack([np.zeros(4), gaps], axis=1).astype(np.float32)  # (4, 2)
        probs = objectness(logits)
        assert probs[0] == probs[1] == probs[2]  # the ties this test is about
        boxes, scores = generate_proposals(logits, np.zeros((4, 4), np.float32), anchors, (16, 80))
        order = np.argsort(-logits[:, 1], kind="stable")
        np.testing.assert_array_equal(boxes, anchors[order])
        np.testing.assert_array_equal(scores, probs[order])
    # float32 rounding can go the other way: the gap 0.3 - 1.0 is a few 1e-8 below 0.6 - 1.3,
    # yet its probability can come out one ulp above; the list stays sorted by score
    logits = np.float32([[1.3, 0.6], [1.0, 0.3]])  # (2, 2)
    probs, gaps = objectness(logits), np.float64(logits[:, 1]) - logits[:, 0]
    assert gaps[0] > gaps[1]
    boxes, scores = generate_proposals(logits, np.zeros((2, 4), np.float32), anchors[:2], (16, 80))
    order = np.lexsort((-gaps, -probs))
    np.testing.assert_array_equal(boxes, anchors[order])
    np.testing.assert_array_equal(scores, probs[order])
    assert scores[0] >= scores[1]
    # finite float64 logits whose gap overflows: the last box still ranks above the small
    # box 0 (dropped by min_size), so pre_nms_top_n=3 keeps all three large ones
    tiny = np.array([[0, 0, 1, 1]], np.float32)
    logits = np.array([[0, 5], [1e308, -1e308], [0, 1], [0, 2]], np.float64)  # (4, 2)
    boxes, scores = generate_proposals(logits, np.zeros((4, 4)), np.concatenate([tiny, anchors[1:]]), (16, 80),
                                       pre_nms_top_n=3, min_size=2.0)
    np.testing.assert_array_equal(boxes, anchors[[3, 2, 1]])
    np.testing.assert_array_equal(scores, objectness(logits[[3, 2, 1]]))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.3, 0.9), st.integers(1, 80))
def test_proposal_invariants(seed, thresh, post):
    rng = np.random.default_rng(seed)
    anchors = simple_anchors(6, 6, 3)
    logits = rng.normal(size=(len(anchors), 2)).astype(np.float32)
    deltas = rng.normal(scale=0.3, size=(len(anchors), 4)).astype(np.float32)
    boxes, scores = generate_proposals(logits, deltas, anchors, (48, 40), pre_nms_top_n=70,
                                       post_nms_top_n=post, nms_thresh=thresh, min_size=2.0)
    assert len(boxes) <= post and len(boxes) == len(scores) and len(boxes) > 0
    assert np.all(np.diff(scores) <= 0)
    assert np.all(boxes[:, [0, 2]] >= 0) and np.all(boxes[:, [0, 2]] <= 40)
    assert np.all(boxes[:, [1, 3]] >= 0) and np.all(boxes[:, [1, 3]] <= 48)
    assert np.all(boxes[:, 2] - boxes[:, 0] >= 2) and np.all(boxes[:, 3] - boxes[:, 1] >= 2)
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= thresh
    # the best-scoring surviving box is the best decoded, clipped, large-enough box
    all_boxes = np.clip(decode(anchors, deltas), 0, None)
    all_boxes[:, [0, 2]] = np.minimum(all_boxes[:, [0, 2]], 40)
    all_boxes[:, [1, 3]] = np.minimum(all_boxes[:, [1, 3]], 48)
    big = (all_boxes[:, 2] - all_boxes[:, 0] >= 2) & (all_boxes[:, 3] - all_boxes[:, 1] >= 2)
    assert scores[0] == pytest.approx(objectness(logits)[big].max())
    # scores given directly give the same result as logits
    same, same_scores = generate_proposals(objectness(logits), deltas, anchors, (48, 40), pre_nms_top_n=70,
                                           post_nms_top_n=post, nms_thresh=thresh, min_size=2.0)
    np.testing.assert_array_equal(same, boxes)


def _proposals_reference(scores, deltas, anchors, image_size, pre, post, thresh, min_size, gap=None):
    """py-faster-rcnn's proposal layer step by step, for one image; equal ``scores`` rank
    by ``gap`` (A,) where given, then by index."""
    h, w = image_size
    gap = np.zeros(len(scores)) if gap is None else gap
    boxes = decode(anchors, deltas)  # (A, 4)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    big = np.flatnonzero((boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size))
    boxes, scores, gap = boxes[big], scores[big], gap[big]
    order = np.lexsort((-gap, -scores))[:pre]
    boxes, scores = boxes[order], scores[order]
    keep = _nms_reference(boxes, scores, thresh)[:post]
    return boxes[keep], scores[keep]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 4), st.integers(1, 120), st.integers(1, 60),
       st.floats(0.3, 0.9), st.sampled_from([np.float32, np.float64]))
def test_proposals_batch_is_each_image_alone(seed, n, pre, post, thresh, dtype):
    rng = np.random.default_rng(seed)
    anchors = simple_anchors(6, 6, 3)
    # few distinct scores, so that ties decide the order
    logits = np.round(rng.normal(size=(n, len(anchors), 2)), 1).astype(dtype)
    deltas = rng.normal(scale=0.5, size=(n, len(anchors), 4)).astype(dtype)
    batch = generate_proposals_batch(logits, deltas, anchors, (48, 40), pre, post, thresh, min_size=3.0)
    assert len(batch) == n
    for i, (boxes, scores) in enumerate(batch):
        one = generate_proposals(logits[i], deltas[i], anchors, (48, 40), pre, post, thresh, min_size=3.0)
        ref = _proposals_reference(objectness(logits[i]), deltas[i], anchors, (48, 40), pre, post, thresh, 3.0,
                                   gap=np.float64(logits[i, :, 1]) - logits[i, :, 0])
        for got in (one, (boxes, scores)):
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
            assert np.all(np.diff(got[1]) <= 0)
            assert got[0].dtype == dtype and got[1].dtype == dtype


def test_proposals_batch_bad_input():
    anchors = simple_anchors(2, 2, 1)
    with pytest.raises(ValueError, match="same A anchors"):
        generate_proposals_batch(np.zeros((2, 4, 2)), np.zeros((3, 4, 4)), anchors, (16, 16))
    for logits in (np.zeros((2, 5, 2)), np.zeros((2, 5))):  # 5 anchors' logits or scores, 4 anchors
        with pytest.raises(ValueError, match=r"generate_proposals_batch: logits \(2, 5.*same A anchors"):
            generate_proposals_batch(logits, np.zeros((2, 4, 4)), anchors, (16, 16))
    with pytest.raises(ValueError, match=r"\(N, A, 2\) logits"):
        generate_proposals_batch(np.zeros((2, 4, 3)), np.zeros((2, 4, 4)), anchors, (16, 16))
    with pytest.raises(ValueError, match="deltas"):
        generate_proposals_batch(np.zeros((2, 4, 2)), np.zeros((4, 4)), anchors, (16, 16))
    assert generate_proposals_batch(np.zeros((0, 4, 2)), np.zeros((0, 4, 4)), anchors, (16, 16)) == []


def test_proposal_settings():
    assert TRAIN_PROPOSALS.pre_nms_top_n == 2000 and TRAIN_PROPOSALS.post_nms_top_n == 500
    assert TEST_PROPOSALS.pre_nms_top_n == 1000 and TEST_PROPOSALS.post_nms_top_n == 300
    assert TEST_PROPOSALS.nms_thresh == 0.7


def test_proposals_post_nms_top_n_beyond_any_count_keeps_everything():
    args = (np.random.default_rng(0).standard_normal((4, 2)), np.zeros((4, 4)), simple_anchors(2, 2, 1), (16, 16))
    for n in (2**63, 10**30):
        kept = generate_proposals(*args, post_nms_top_n=n)
        assert all(np.array_equal(a, b) for a, b in zip(kept, generate_proposals(*args, post_nms_top_n=4)))


def test_proposals_empty():
    boxes, scores = generate_proposals(np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((0, 4)), (32, 32))
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    boxes, scores = generate_proposals(np.zeros(1), np.zeros((1, 4)), np.array([[0, 0, 1, 1.0]]), (32, 32))
    assert boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=np.zeros((4, 3))), r"logits must be \(A, 2\) logits or \(A,\) scores, got shape \(4, 3\)"),
        (dict(deltas=np.zeros((3, 4))), r"deltas \(3, 4\) and anchors \(4, 4\) must describe the same A anchors"),
        (dict(anchors=np.zeros((3, 4))), r"anchors \(3, 4\) must describe the same A anchors"),
        (dict(logits=np.full((4, 2), np.nan)), "NaN"),
        (dict(image_size=(32,)), "image_size"),
        (dict(image_size=(0, 32)), "image_size"),
        (dict(pre_nms_top_n=0), "pre_nms_top_n"),
        (dict(nms_thresh=1.5), "nms_thresh"),
        (dict(min_size=-1), "min_size"),
        (dict(deltas=np.full((4, 4), np.inf)), "generate_proposals: deltas holds NaN or inf"),
        (dict(anchors=np.array([[2, 0, 1, 1.0]] * 4)), r"generate_proposals: anchors\[0\] .* x2 < x1"),
        (dict(anchors=np.array([[0, 0, 1e39, 1.0]] * 4), deltas=np.zeros((4, 4), np.float32)),
         r"generate_proposals: anchors in float32 \(the dtype of deltas\) holds NaN or inf"),
    ],
)
def test_proposals_bad_input(kwargs, match):
    args = dict(logits=np.zeros((4, 2)), deltas=np.zeros((4, 4)), anchors=simple_anchors(2, 2, 1),
                image_size=(16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_proposals(**args)


# ---------------------------------------------------------------- proposal recall


def test_proposal_recall_hand_worked():
    from tinyfrcnn.rpn import proposal_recall

    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30.0]]), np.array([[0, 0, 4, 4.0]])]
    props = [
        np.array([[0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10.0]]),  # IoU with gt 0: 0.5, 0, 1
        np.array([[0, 0, 2, 4.0]]),  # IoU 0.5
    ]
    assert proposal_recall(props, gt) == 1.0
    assert proposal_recall(props, gt, iou_threshold=0.51) == pytest.approx(2 / 3)
    assert proposal_recall(props, gt, top_n=1) == pytest.approx(2 / 3)  # row 1 (the second gt's match) cut
    assert proposal_recall(props, gt, top_n=1, iou_threshold=0.6) == 0.0
    # (boxes, scores) pairs as FasterRCNN.propose returns them; empty proposals cover nothing
    pairs = [(p, np.linspace(1, 0, len(p))) for p in props]
    assert proposal_recall(pairs, gt, top_n=2) == 1.0
    assert proposal_recall([np.zeros((0, 4)), props[1]], gt) == pytest.approx(1 / 3)
    # images without ground truth add nothing to either count
    assert proposal_recall(props + [np.zeros((0, 4))], gt + [np.zeros((0, 4))]) == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.0))
def test_proposal_recall_matches_reference_and_is_monotone(seed, thresh):
    from tinyfrcnn.rpn import proposal_recall

    rng = np.random.default_rng(seed)

    def boxes(n):
        xy = rng.uniform(0, 50, size=(n, 2))
        wh = rng.uniform(1, 30, size=(n, 2))
        return np.concatenate([xy, xy + wh], axis=1)

    gts = [boxes(int(rng.integers(1, 5))) for _ in range(4)]
    props = [boxes(int(rng.integers(0, 30))) for _ in range(4)]
    hits = sum(sum(any(box_iou(p[j:j + 1], g[m:m + 1])[0, 0] >= thresh for j in range(len(p)))
                   for m in range(len(g))) for p, g in zip(props, gts))
    total = sum(len(g) for g in gts)
    assert proposal_recall(props, gts, iou_threshold=thresh) == pytest.approx(hits / total)
    # more proposals or a lower threshold never lowers recall
    by_n = [proposal_recall(props, gts, iou_threshold=thresh, top_n=n) for n in (1, 3, 10, 30)]
    assert all(a <= b for a, b in zip(by_n, by_n[1:]))
    assert proposal_recall(props, gts, iou_threshold=thresh / 2) >= by_n[-1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gts=[np.zeros((1, 4))] * 2), "has 1 images but"),
        (dict(iou_threshold=0.0), "iou_threshold"),
        (dict(iou_threshold=1.5), "iou_threshold"),
        (dict(top_n=0), "top_n"),
        (dict(props=[np.array([[0, 0, 1, 1]])]), "float32 or float64"),
        (dict(props=[np.array([[0, 0, 1.0]])]), r"proposals_per_image\[0\] must have shape"),
        (dict(gts=[np.array([[5, 0, 1, 1.0]])]), r"gt_boxes_per_image\[0\]"),
        (dict(gts=[np.zeros((0, 4))]), "no boxes"),
        (dict(props=5), "proposal_recall: proposals_per_image must be a list with one entry per image, got int"),
        (dict(gts=None), "proposal_recall: gt_boxes_per_image must be a list with one entry per image"),
    ],
)
def test_proposal_recall_bad_input(kwargs, match):
    from tinyfrcnn.rpn import proposal_recall

    args = dict(props=[np.array([[0, 0, 2, 2.0]])], gts=[np.array([[0, 0, 2, 2.0]])])
    args.update(kwargs)
    extra = {k: v for k, v in args.items() if k not in ("props", "gts")}
    with pytest.raises(ValueError, match=match):
        proposal_recall(args["props"], args["gts"], **extra)
