import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfrcnn.boxes import box_iou, decode
from tinyfrcnn.targets import anchor_targets, label_anchors, sample_labels, sample_proposals

B = lambda *rows: np.array(rows, dtype=np.float64)  # noqa: E731


# ---------------------------------------------------------------- label_anchors, rule by rule


def test_threshold_rules():
    gt = B([0, 0, 10, 10])
    anchors = B(
        [0, 0, 10, 10],    # IoU 1        -> positive
        [0, 0, 10, 13],    # IoU 10/13    -> positive (>= 0.7)
        [0, 0, 10, 20],    # IoU 0.5      -> ignored
        [0, 0, 10, 40],    # IoU 0.25     -> negative
        [20, 20, 30, 30],  # IoU 0        -> negative
    )
    labels, matched = label_anchors(anchors, gt)
    assert labels.dtype == np.int64 and matched.dtype == np.int64
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 0])
    np.testing.assert_array_equal(matched, [0, 0, 0, 0, 0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_thresholds_exactly(dtype):
    """IoU exactly pos_iou is positive, exactly neg_iou is not negative (70/100 and 30/100
    round to the thresholds, as 0.7 and 0.3 do)."""
    gt = B([0, 0, 10, 10]).astype(dtype)
    anchors = B([0, 0, 10, 10], [0, 0, 7, 10], [0, 0, 6.9, 10], [0, 0, 3, 10], [0, 0, 2.9, 10]).astype(dtype)
    assert box_iou(anchors, gt)[1, 0] == dtype(0.7) and box_iou(anchors, gt)[3, 0] == dtype(0.3)
    labels, _ = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 1, -1, -1, 0])


def test_best_anchor_is_positive_even_below_neg_iou():
    # a 4x4 object: its best anchor has IoU 16/256 = 0.0625 < 0.3, still positive
    gt = B([0, 0, 4, 4])
    anchors = B([0, 0, 16, 16], [2, 2, 18, 18], [8, 8, 24, 24])
    labels, _ = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 0, 0])


def test_all_tied_best_anchors_are_positive():
    gt = B([0, 0, 10, 10])
    anchors = B([-5, 0, 5, 10], [5, 0, 15, 10], [0, -5, 10, 5], [-6, 0, 4, 10])  # 1/3, 1/3, 1/3, 0.25
    labels, _ = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0])


def test_rule_order_best_anchor_of_one_gt_keeps_its_own_argmax():
    # anchor 0 is gt 0's best anchor (IoU 0.25) but overlaps gt 1 more (IoU 0.5)
    gt = B([0, 0, 4, 16], [0, 0, 16, 8])
    anchors = B([0, 0, 16, 16], [40, 40, 50, 50])
    labels, matched = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 0])
    assert matched[0] == 1


def test_gt_overlapping_no_anchor_makes_nothing_positive():
    gt = B([0, 0, 10, 10], [100, 100, 110, 110])
    anchors = B([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50])
    labels, _ = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 0, 0])


def test_no_ground_truth_every_anchor_negative():
    anchors = B([0, 0, 10, 10], [-8, -8, 8, 8])
    labels, matched = label_anchors(anchors, np.zeros((0, 4)))
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_array_equal(matched, [-1, -1])
    labels, _ = label_anchors(anchors, np.zeros((0, 4)), image_size=(32, 32), allowed_border=0)
    np.testing.assert_array_equal(labels, [0, -1])


def test_border_anchors_are_ignored_and_cannot_win():
    gt = B([0, 0, 6, 6])
    anchors = B(
        [-1, -1, 6, 6],    # IoU 36/49 = 0.73, the overall best, crosses the border -> ignored
        [0, 0, 8, 8],      # IoU 36/64 = 0.56: best of the inside anchors -> positive
        [0, 0, 30, 30],    # IoU 0.04 -> negative
        [20, 20, 36, 36],  # crosses the right and bottom border by 4 -> ignored although IoU 0
    )
    labels, _ = label_anchors(anchors, gt, image_size=(32, 32), allowed_border=0)
    np.testing.assert_array_equal(labels, [-1, 1, 0, -1])
    labels, _ = label_anchors(anchors, gt, image_size=(32, 32), allowed_border=4)
    np.testing.assert_array_equal(labels, [1, -1, 0, 0])


def test_border_anchors_ignored_even_above_pos_iou():
    gt = B([0, 0, 10, 10])
    anchors = B([-1, 0, 10, 10], [0, 0, 10, 10], [0, 0, 20, 20])
    labels, _ = label_anchors(anchors, gt)
    np.testing.assert_array_equal(labels, [1, 1, 0])
    labels, _ = label_anchors(anchors, gt, image_size=(20, 20), allowed_border=0)
    np.testing.assert_array_equal(labels, [-1, 1, 0])


def test_image_size_is_height_then_width():
    """On a tall image (40 rows, 20 columns) x is checked against the width and y against
    the height, for the ground truth and for the border anchors alike."""
    tall = (40, 20)
    labels, _ = label_anchors(B([0, 0, 10, 30]), B([0, 0, 10, 30]), image_size=tall)
    np.testing.assert_array_equal(labels, [1])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] = \[0.0, 0.0, 30.0, 10.0\] is not inside the 40x20 image"):
        label_anchors(B([0, 0, 10, 10]), B([0, 0, 30, 10]), image_size=tall)
    anchors = B(
        [0, 0, 10, 36],   # inside: 36 rows of the 40
        [0, 0, 24, 10],   # 24 columns: crosses the right border by 4
        [0, 0, 20, 40],   # the whole image
        [0, 0, 10, 44],   # crosses the bottom border by 4
    )
    labels, _ = label_anchors(anchors, B([0, 0, 10, 36]), image_size=tall, allowed_border=0)
    np.testing.assert_array_equal(labels, [1, -1, -1, -1])  # anchor 2: IoU 0.45, ignored
    labels, _ = label_anchors(anchors, B([0, 0, 10, 36]), image_size=tall, allowed_border=4)
    np.testing.assert_array_equal(labels, [1, 0, -1, 1])  # anchor 3: IoU 36/44 >= 0.7


@pytest.mark.parametrize(
    "gt, kwargs, match",
    [
        (B([0, 0, 0, 10]), {}, "zero width"),
        (B([0, 0, 10, 10]), dict(image_size=(0, 32)), r"image_size must be > 0, got 0"),
        (B([0, 0, 10, 10]), dict(image_size=(32, 0)), r"image_size must be > 0, got 0"),
        (B([0, 0, np.nan, 10]), {}, "NaN"),
        (B([0, 0, 40, 10]), dict(image_size=(32, 32)), "inside"),
        (B([-1, 0, 10, 10]), dict(image_size=(32, 32)), "inside"),
        (B([0, 0, 10, 10]), dict(allowed_border=0), "image_size"),
        (B([0, 0, 10, 10]), dict(pos_iou=0.2, neg_iou=0.3), "pos_iou"),
        (B([0, 0, 10, 10]), dict(pos_iou=0.0, neg_iou=0.0), r"pos_iou must be > 0"),
        (np.zeros((2, 3)), {}, "shape"),
    ],
)
def test_label_anchors_bad_input(gt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        label_anchors(B([0, 0, 10, 10]), gt, **kwargs)


def random_boxes(rng, n, size=64.0, lo=2.0, hi=40.0):
    xy = rng.uniform(0, size - hi, size=(n, 2))
    wh = rng.uniform(lo, hi, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_label_anchors_matches_its_definition(num_anchors, num_gt, seed, border):
    """Each label checked anchor by anchor against the three rules, written as loops."""
    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, num_anchors) - 4  # some cross the border
    gt = random_boxes(rng, num_gt)
    kwargs = dict(image_size=(64, 64), allowed_border=0) if border else {}
    labels, matched = label_anchors(anchors, gt, **kwargs)
    iou = box_iou(anchors, gt) if num_gt else np.zeros((num_anchors, 0))
    inside = [(not border) or (a[0] >= 0 and a[1] >= 0 and a[2] <= 64 and a[3] <= 64) for a in anchors]
    for i in range(num_anchors):
        if not inside[i]:
            assert labels[i] == -1
            continue
        if num_gt == 0:
            assert labels[i] == 0 and matched[i] == -1
            continue
        assert iou[i, matched[i]] == iou[i].max()
        best_of_some_gt = any(
            iou[i, g] > 0 and iou[i, g] == max(iou[j, g] for j in range(num_anchors) if inside[j])
            for g in range(num_gt))
        if best_of_some_gt or iou[i].max() >= 0.7:
            assert labels[i] == 1
        elif iou[i].max() < 0.3:
            assert labels[i] == 0
        else:
            assert labels[i] == -1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=5), st.integers(0, 2**31 - 1), st.booleans())
def test_anchor_targets_of_a_batch_are_each_image_alone(num_gt, seed, border):
    """The train step labels all images in one pass (one IoU table, images padded to the
    most ground truth): the same labels, matches and targets as one image at a time."""
    from tinyfrcnn.boxes import _check_weights
    from tinyfrcnn.targets import _anchor_targets_batch, _anchors_inside

    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, 30) - 4  # some cross the border
    anchors = np.concatenate([anchors, anchors[:5]])  # repeated anchors: tied IoUs
    gts = [random_boxes(rng, g).astype(np.float32) for g in num_gt]
    inside = _anchors_inside(anchors, (64, 64), 0 if border else None)
    unit = _check_weights((1.0,) * 4, "test", np.dtype(np.float64))
    labels, matched, targets = _anchor_targets_batch(anchors, gts, 0.7, 0.3, inside, unit)
    assert labels.shape == matched.shape == (len(gts), len(anchors)) and targets.shape == (*labels.shape, 4)
    kwargs = dict(image_size=(64, 64), allowed_border=0) if border else {}
    for i, gt in enumerate(gts):
        alone = anchor_targets(anchors, gt, **kwargs)
        assert np.array_equal(labels[i], alone[0]) and np.array_equal(matched[i], alone[1])
        assert np.array_equal(targets[i], alone[2])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_sampling_a_batch_is_each_image_alone(sizes, seed):
    """The train step samples all images' anchors and RoIs in one pass but for the
    random draws, which stay image by image (anchors, then RoIs): the same samples as
    ``sample_labels`` and ``sample_proposals`` on one image at a time with that stream."""
    from tinyfrcnn.boxes import _check_weights
    from tinyfrcnn.targets import _gather_proposals, _label_candidates, _pick, _proposal_candidates, _sampled_labels

    rng = np.random.default_rng(seed)
    proposals, gts, gt_labels = [], [], []
    for num_props, num_gt in sizes:
        gt = random_boxes(rng, num_gt).astype(np.float32)
        props = np.concatenate([random_boxes(rng, num_props), gt[:1], gt[:1] + 1.0]).astype(np.float32)  # ties
        proposals.append(props)
        gts.append(np.concatenate([gt, gt[:1]]))  # a repeated gt box: tied matches
        gt_labels.append(rng.integers(1, 4, len(gts[-1])))
    anchor_labels = rng.integers(-1, 2, (len(sizes), 40))
    weights = _check_weights((10.0, 10.0, 5.0, 5.0), "test", np.dtype(np.float32))

    draws = np.random.default_rng(seed + 1)
    positive, negative = _label_candidates(anchor_labels)
    candidates = _proposal_candidates(proposals, gts, 0.5, 0.1, 0.5)
    anchor_picks, roi_picks = [], []
    for i in range(len(sizes)):
        anchor_picks.append(_pick(positive[i], negative[i], 8, 0.5, draws))
        roi_picks.append(_pick(candidates["fg"][i], candidates["bg"][i], 6, 0.25, draws))
    sampled = _sampled_labels(anchor_labels.shape, anchor_picks)
    batch = _gather_proposals(candidates, roi_picks, gt_labels, weights)

    alone = np.random.default_rng(seed + 1)
    bounds = np.concatenate([[0], np.cumsum(batch["counts"])])
    for i in range(len(sizes)):
        np.testing.assert_array_equal(sampled[i], sample_labels(anchor_labels[i], 8, 0.5, rng=alone))
        one = sample_proposals(proposals[i], gts[i], gt_labels[i], num_samples=6, fg_iou=0.5, bg_iou=(0.1, 0.5),
                               rng=alone)
        a, b = bounds[i], bounds[i + 1]
        for key in ("rois", "labels", "box_targets"):
            np.testing.assert_array_equal(batch[key][a:b], one[key], err_msg=key)


def test_best_match_by_image_is_box_iou_per_image():
    """Each RoI against its own image's ground truth only, first box on ties, images
    without ground truth untouched; the IoUs bitwise ``box_iou``'s."""
    from tinyfrcnn.targets import _best_match_by_image

    rng = np.random.default_rng(3)
    gts = [random_boxes(rng, 3), np.zeros((0, 4)), random_boxes(rng, 1)]
    gts[0][2] = gts[0][0]  # a repeated box: ties go to the first
    rois = [np.concatenate([random_boxes(rng, 20), g]) for g in gts]
    starts = np.array([0, 23, 43, 64])
    gt_starts = np.array([0, 3, 3, 4])
    best, matched = np.full(64, 7.0), np.full(64, -5, np.int64)
    _best_match_by_image(np.concatenate(rois), starts, np.concatenate(gts), gt_starts, best, matched)
    for i in (0, 2):
        iou = box_iou(rois[i], gts[i])  # (R, G)
        np.testing.assert_array_equal(matched[starts[i]:starts[i + 1]], iou.argmax(axis=1))
        np.testing.assert_array_equal(best[starts[i]:starts[i + 1]], iou.max(axis=1))
    assert (matched[23:43] == -5).all() and (best[23:43] == 7.0).all()
    assert (matched[:20] != 2).all()  # box 2 repeats box 0, which comes first


@pytest.mark.parametrize("bad, match", [
    ([5, 5, 5, 9], r"gt_boxes\[2\]\[1\] = \[5.0, 5.0, 5.0, 9.0\] has zero width or height"),
    ([5, 5, 70, 9], r"gt_boxes\[2\]\[1\] = .* is not inside the 64x64 image"),
    ([5, np.nan, 7, 9], r"gt_boxes\[2\] holds NaN"),
    ([5, 9, 7, 5], r"gt_boxes\[2\]\[1\] = .* has x2 < x1 or y2 < y1"),
])
def test_check_gt_boxes_batch_names_the_image(bad, match):
    from tinyfrcnn.targets import check_gt_boxes_batch

    good = [np.array([[1, 2, 30, 40]], np.float32), np.zeros((0, 4), np.float32),
            np.array([[0, 0, 64, 64], [3, 3, 9, 9]], np.float32)]
    assert check_gt_boxes_batch(good, (64, 64), "w") is None
    boxes = [b.copy() for b in good]
    boxes[2][1] = bad
    with pytest.raises(ValueError, match=match):
        check_gt_boxes_batch(boxes, (64, 64), "w")
    if "inside" in match:
        check_gt_boxes_batch(boxes, None, "w")  # no image size: boxes may leave the image


# ---------------------------------------------------------------- sample_labels


def make_labels(num_pos, num_neg, num_ignored, seed=0):
    labels = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignored, dtype=np.int64)
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize(
    "num_pos, num_neg, expect_pos, expect_neg",
    [(300, 5000, 128, 128), (10, 5000, 10, 246), (300, 20, 128, 20), (0, 100, 0, 100), (3, 2, 3, 2)],
)
def test_sample_labels_counts(num_pos, num_neg, expect_pos, expect_neg):
    labels = make_labels(num_pos, num_neg, 50)
    out = sample_labels(labels, 256, 0.5, rng=np.random.default_rng(0))
    assert (out == 1).sum() == expect_pos and (out == 0).sum() == expect_neg
    assert np.all(labels[out == 1] == 1) and np.all(labels[out == 0] == 0)
    assert np.all(labels == make_labels(num_pos, num_neg, 50))  # input untouched


def test_sample_labels_is_deterministic_and_random():
    labels = make_labels(300, 5000, 50)
    a = sample_labels(labels, rng=np.random.default_rng(7))
    b = sample_labels(labels, rng=np.random.default_rng(7))
    c = sample_labels(labels, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_labels_other_fraction():
    out = sample_labels(make_labels(300, 5000, 0), num_samples=64, positive_fraction=0.25,
                        rng=np.random.default_rng(0))
    assert (out == 1).sum() == 16 and (out == 0).sum() == 48
    # at most int(7 * 0.5) = 3 positives (rounded down), the other 4 negatives
    out = sample_labels(make_labels(20, 20, 0), num_samples=7, positive_fraction=0.5, rng=np.random.default_rng(0))
    assert (out == 1).sum() == 3 and (out == 0).sum() == 4


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (np.array([0, 1, 2]), {}, "only"),
        (np.array([0, 1, -2]), {}, r"labels must hold only \[-1, 0, 1\], found -2"),
        (np.array([0.0, 1.0]), {}, "integer"),
        (np.array([0, 1]), dict(rng=None), "rng"),
        (np.array([0, 1]), dict(num_samples=0), "num_samples"),
        (np.array([0, 1]), dict(positive_fraction=1.5), "positive_fraction"),
    ],
)
def test_sample_labels_bad_input(labels, kwargs, match):
    kwargs = {"rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_labels(labels, **kwargs)


# ---------------------------------------------------------------- anchor_targets


def test_anchor_targets_decode_back_to_the_matched_gt():
    rng = np.random.default_rng(1)
    gt = random_boxes(rng, 3)
    anchors = np.concatenate([random_boxes(rng, 200), gt + rng.normal(scale=1.0, size=gt.shape)])
    labels, matched, targets = anchor_targets(anchors, gt)
    pos = labels == 1
    assert pos.sum() >= 3
    np.testing.assert_allclose(decode(anchors[pos], targets[pos]), gt[matched[pos]], atol=1e-9)
    assert np.all(targets[~pos] == 0)
    # hand-worked: anchor (0,0,10,10) -> gt (1,2,13,12): t = (0.2, 0.2, log 1.2, 0)
    _, _, t = anchor_targets(B([0, 0, 10, 10]), B([1, 2, 13, 12]))
    np.testing.assert_allclose(t, [[0.2, 0.2, np.log(1.2), 0.0]])


def test_anchor_targets_no_ground_truth():
    labels, matched, targets = anchor_targets(B([0, 0, 10, 10], [5, 5, 9, 9]), np.zeros((0, 4)))
    np.testing.assert_array_equal(labels, [0, 0])
    assert targets.shape == (2, 4) and np.all(targets == 0)


# ---------------------------------------------------------------- sample_proposals


def test_sample_proposals_counts_labels_and_targets():
    rng = np.random.default_rng(2)
    gt = B([10, 10, 40, 40], [60, 60, 100, 90])
    gt_labels = np.array([2, 1])
    jitter = lambda box, n, s: box + rng.normal(scale=s, size=(n, 4))  # noqa: E731
    proposals = np.concatenate([jitter(gt[0], 60, 2), jitter(gt[1], 60, 2), random_boxes(rng, 300, 128, 4, 30)])
    out = sample_proposals(proposals, gt, gt_labels, rng=np.random.default_rng(0))
    rois, labels, targets, idx = out["rois"], out["labels"], out["box_targets"], out["indices"]
    all_rois = np.concatenate([proposals, gt])
    np.testing.assert_array_equal(rois, all_rois[idx])
    num_fg = (labels > 0).sum()
    assert num_fg == 32 and len(rois) == 128 and len(np.unique(idx)) == 128
    assert np.all(labels[:num_fg] > 0) and np.all(labels[num_fg:] == 0)
    iou = box_iou(rois, gt)
    assert np.all(iou[:num_fg].max(1) >= 0.5) and np.all(iou[num_fg:].max(1) < 0.5)
    np.testing.assert_array_equal(labels[:num_fg], gt_labels[iou[:num_fg].argmax(1)])
    np.testing.assert_array_equal(out["matched_gt"][:num_fg], iou[:num_fg].argmax(1))
    assert np.all(out["matched_gt"][num_fg:] == -1)
    matched_gt = gt[out["matched_gt"][:num_fg]]
    np.testing.assert_allclose(decode(rois[:num_fg], targets[:num_fg], (10, 10, 5, 5)), matched_gt, atol=1e-9)
    assert np.all(targets[num_fg:] == 0)
    again = sample_proposals(proposals, gt, gt_labels, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again["indices"], idx)


def test_sample_proposals_ground_truth_is_appended_and_hand_worked_target():
    gt = B([0, 0, 10, 10])
    proposals = B([1, 0, 12, 10], [50, 50, 60, 60])  # IoU with gt: 90/120 -> foreground
    out = sample_proposals(proposals, gt, np.array([3]), rng=np.random.default_rng(0))
    assert sorted(out["indices"][out["labels"] == 3].tolist()) == [0, 2]  # proposal 0 and the gt itself
    assert out["indices"][out["labels"] == 0].tolist() == [1]
    row = int(np.flatnonzero(out["indices"] == 0)[0])
    # (1,0,12,10) -> (0,0,10,10): dx = (5 - 6.5) / 11, dy = 0, dw = log(10/11), dh = 0; times (10,10,5,5)
    np.testing.assert_allclose(out["box_targets"][row], [-15 / 11, 0.0, 5 * np.log(10 / 11), 0.0])


def test_sample_proposals_few_background_and_no_ground_truth():
    gt = B([0, 0, 10, 10])
    proposals = np.repeat(B([0, 0, 10, 10]), 50, axis=0)  # all foreground
    out = sample_proposals(proposals, gt, np.array([1]), num_samples=16, rng=np.random.default_rng(0))
    assert len(out["rois"]) == 4 and np.all(out["labels"] == 1)  # 4 = 16 * 0.25 fg, no bg at all
    proposals = random_boxes(np.random.default_rng(3), 20)
    out = sample_proposals(proposals, np.zeros((0, 4)), np.zeros(0, np.int64), num_samples=16,
                           rng=np.random.default_rng(0))
    assert len(out["rois"]) == 16 and np.all(out["labels"] == 0) and np.all(out["box_targets"] == 0)
    out = sample_proposals(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, np.int64), rng=np.random.default_rng(0))
    assert out["rois"].shape == (0, 4) and out["labels"].shape == (0,)


def test_sample_proposals_thresholds_exactly():
    """IoU exactly fg_iou is foreground; background is bg_iou[0] <= IoU < bg_iou[1]."""
    gt = B([0, 0, 10, 10])
    proposals = B([0, 0, 5, 10], [0, 0, 4.9, 10], [0, 0, 1, 10], [0, 0, 0.9, 10])  # IoU 0.5, 0.49, 0.1, 0.09
    out = sample_proposals(proposals, gt, np.array([1]), bg_iou=(0.1, 0.5), rng=np.random.default_rng(0))
    assert sorted(out["indices"][out["labels"] == 1].tolist()) == [0, 4]  # and the gt itself
    assert sorted(out["indices"][out["labels"] == 0].tolist()) == [1, 2]


def test_sample_proposals_bg_low_threshold():
    gt = B([0, 0, 10, 10])
    proposals = B([0, 0, 10, 40], [50, 50, 60, 60])  # IoU 0.25 and 0
    out = sample_proposals(proposals, gt, np.array([1]), bg_iou=(0.1, 0.5), rng=np.random.default_rng(0))
    assert out["indices"][out["labels"] == 0].tolist() == [0]


@pytest.mark.parametrize(
    "gt, gt_labels, kwargs, match",
    [
        (B([0, 0, 10, 0]), [1], {}, "zero width"),
        (B([0, 0, np.inf, 10]), [1], {}, "NaN or inf"),
        (B([0, 0, 10, 10]), [0], {}, "outside 1..num_classes"),
        (B([0, 0, 10, 10]), [4], dict(num_classes=3), "outside 1..3"),
        (B([0, 0, 10, 10]), [1, 2], {}, "entries"),
        (B([0, 0, 10, 10]), [1.0], {}, "integer"),
        (B([0, 0, 10, 10]), np.array([2**64 - 1], np.uint64), {}, "gt_labels holds 18446744073709551615, beyond int64"),
        (B([0, 0, 10, 10]), [1], dict(weights=(10, 10, 5, 10**400)), r"weights\[3\] must be finite"),
        (B([0, 0, 100, 10]), [1], dict(image_size=(64, 64)), "inside"),
        (B([0, 0, 10, 10]), [1], dict(rng=None), "rng"),
        (B([0, 0, 10, 10]), [1], dict(bg_iou=(0.0, 0.6)), "bg_iou"),
        (B([0, 0, 10, 10]), [1], dict(fg_iou=0.0), "fg_iou"),
    ],
)
def test_sample_proposals_bad_input(gt, gt_labels, kwargs, match):
    kwargs = {"rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_proposals(B([0, 0, 5, 5]), gt, np.array(gt_labels), **kwargs)


def test_device_arrays_are_refused():
    from numba import cuda

    with pytest.raises(ValueError, match="host"):
        label_anchors(cuda.to_device(B([0, 0, 10, 10])), B([0, 0, 10, 10]))
