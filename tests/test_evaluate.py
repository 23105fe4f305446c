"""Tests for tinyfrcnn.evaluate: COCO AP against pycocotools, VOC AP against hand-worked curves."""

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyfrcnn.evaluate import (
    COCO_RECALL_THRESHOLDS,
    _voc_ap_from_curve,
    coco_ap,
    precision_recall,
    voc_ap,
)


# ------------------------------------------------------------------- helpers


def _xywh(box):
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def cocoeval(detections, ground_truths, class_ids, max_dets=100):
    """Run pycocotools' COCOeval (bbox) on the same dicts; returns the COCOeval object."""
    from pycocotools.coco import COCO  # imported here, so that collecting the tests does not need it
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1} for i in range(len(ground_truths))]
    categories = [{"id": int(c)} for c in class_ids]
    anns = []
    for i, g in enumerate(ground_truths):
        for box, label in zip(g["boxes"], g["labels"]):
            xywh = _xywh(box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label),
                         "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
    results = [{"image_id": i + 1, "category_id": int(label), "bbox": _xywh(box), "score": float(score)}
               for i, d in enumerate(detections)
               for box, score, label in zip(d["boxes"], d["scores"], d["labels"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": anns}
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": images, "categories": categories, "annotations": []}
            coco_dt.createIndex()
        E = COCOeval(coco_gt, coco_dt, "bbox")
        if max_dets != 100:
            E.params.maxDets = [max_dets]  # summarize() needs the default [1, 10, 100]
        E.evaluate()
        E.accumulate()
        if max_dets == 100:
            E.summarize()
    return E


def assert_matches_cocoeval(detections, ground_truths, max_dets=100):
    labels = [d["labels"] for d in detections] + [g["labels"] for g in ground_truths]
    class_ids = np.unique(np.concatenate(labels)).astype(int)
    E = cocoeval(detections, ground_truths, class_ids, max_dets)
    ours = coco_ap(detections, ground_truths, max_detections=max_dets)
    if max_dets == 100:
        stats = E.stats
        ref = {"AP": stats[0], "AP50": stats[1], "AP75": stats[2], "AR100": stats[8]}
    else:  # summarize() reads maxDets=100, so read the arrays at our maxDets directly
        p = E.eval["precision"][:, :, :, 0, -1]
        r = E.eval["recall"][:, :, 0, -1]
        mean = lambda s: np.mean(s[s > -1]) if (s > -1).any() else -1
        ref = {"AP": mean(p), "AP50": mean(p[0]), "AP75": mean(p[5]), "AR100": mean(r)}
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_allclose(ours["precision"], E.eval["precision"][:, :, :, 0, -1], atol=1e-12)
    assert list(ours["class_ids"]) == list(class_ids)
    for k, c in enumerate(class_ids):
        s = E.eval["precision"][:, :, k, 0, -1]
        expected = np.mean(s[s > -1]) if (s > -1).any() else -1.0
        assert ours["per_class"][int(c)] == pytest.approx(expected, abs=1e-9), c
    return ours


def random_scene(rng, n_images=6, n_classes=3, gts_per_image=(0, 6), jitter=0.1, extra=(0, 4),
                 score_levels=None, image_size=100.0):
    """Ground truth plus detections jittered around it, some relabelled, some spurious."""
    detections, ground_truths = [], []
    for _ in range(n_images):
        g = rng.integers(gts_per_image[0], gts_per_image[1] + 1)
        xy = rng.uniform(0, image_size * 0.8, (g, 2))
        wh = rng.uniform(5, image_size * 0.3, (g, 2))
        gt_boxes = np.concatenate([xy, xy + wh], axis=1)  # (G, 4)
        gt_labels = rng.integers(1, n_classes + 1, g)
        copies = rng.integers(0, 3, g)  # 0, 1 or 2 detections per object
        src = np.repeat(np.arange(g), copies)
        size = np.tile(wh[src], 2)
        dt_boxes = gt_boxes[src] + rng.normal(0, jitter, (src.size, 4)) * size
        dt_labels = np.where(rng.random(src.size) < 0.1, rng.integers(1, n_classes + 1, src.size), gt_labels[src])
        e = rng.integers(extra[0], extra[1] + 1)
        exy = rng.uniform(0, image_size * 0.8, (e, 2))
        extra_boxes = np.concatenate([exy, exy + rng.uniform(5, image_size * 0.3, (e, 2))], axis=1)
        dt_boxes = np.concatenate([dt_boxes, extra_boxes])  # (D, 4)
        dt_boxes = np.concatenate([np.minimum(dt_boxes[:, :2], dt_boxes[:, 2:]),
                                   np.maximum(dt_boxes[:, :2], dt_boxes[:, 2:])], axis=1)
        dt_labels = np.concatenate([dt_labels, rng.integers(1, n_classes + 1, e)]).astype(np.int64)
        if score_levels:
            scores = rng.integers(0, score_levels, dt_labels.size) / score_levels
        else:
            scores = rng.random(dt_labels.size)
        detections.append({"boxes": dt_boxes, "scores": scores, "labels": dt_labels})
        ground_truths.append({"boxes": gt_boxes, "labels": gt_labels.astype(np.int64)})
    return detections, ground_truths


def det(boxes, scores, labels):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "scores": np.array(scores, float),
            "labels": np.array(labels, np.int64)}


def gt(boxes, labels):
    return {"boxes": np.array(boxes, float).reshape(-1, 4), "labels": np.array(labels, np.int64)}


# --------------------------------------------------------- COCO vs pycocotools


@pytest.mark.parametrize("seed,jitter", [(0, 0.02), (1, 0.1), (2, 0.25), (3, 0.1), (4, 0.4)])
def test_coco_random_matches_pycocotools(seed, jitter):
    rng = np.random.default_rng(seed)
    detections, ground_truths = random_scene(rng, jitter=jitter)
    out = assert_matches_cocoeval(detections, ground_truths)
    assert 0 < out["AP"] < 1


def test_coco_no_detections():
    rng = np.random.default_rng(10)
    _, ground_truths = random_scene(rng, gts_per_image=(1, 4))
    detections = [det([], [], []) for _ in ground_truths]
    out = assert_matches_cocoeval(detections, ground_truths)
    assert out["AP"] == 0.0 and out["AR100"] == 0.0


def test_coco_class_without_ground_truth_is_left_out():
    rng = np.random.default_rng(11)
    detections, ground_truths = random_scene(rng, n_classes=2)
    detections[0] = det(np.r_[detections[0]["boxes"].ravel(), [1, 1, 30, 30]],
                        np.r_[detections[0]["scores"], 0.99], np.r_[detections[0]["labels"], 7])
    out = assert_matches_cocoeval(detections, ground_truths)
    assert out["per_class"][7] == -1.0
    assert (out["precision"][:, :, -1] == -1).all()
    without = coco_ap(detections, ground_truths, class_ids=[1, 2])
    assert out["AP"] == pytest.approx(without["AP"], abs=1e-12)


def test_coco_duplicate_detections():
    rng = np.random.default_rng(12)
    detections, ground_truths = random_scene(rng, jitter=0.05)
    for i, d in enumerate(detections):
        reps = 3 if i % 2 else 1
        detections[i] = det(np.repeat(d["boxes"], reps, axis=0), np.repeat(d["scores"], reps),
                            np.repeat(d["labels"], reps))
    assert_matches_cocoeval(detections, ground_truths)


def test_coco_crowded_scene():
    rng = np.random.default_rng(13)
    detections, ground_truths = random_scene(rng, n_images=3, n_classes=2, gts_per_image=(25, 40),
                                             jitter=0.15, image_size=40.0)
    assert_matches_cocoeval(detections, ground_truths)


@pytest.mark.parametrize("seed", [20, 21])
def test_coco_tied_scores(seed):
    rng = np.random.default_rng(seed)
    detections, ground_truths = random_scene(rng, n_images=8, jitter=0.2, score_levels=3)
    assert_matches_cocoeval(detections, ground_truths)


def test_coco_tied_iou_takes_the_later_ground_truth():
    # Detection 1 has IoU 9/11 with both gts A and B; COCOeval gives it the later one, B.
    # Detection 2 (exactly B) is left with A at IoU 2/3. Per threshold t:
    #   t <= 0.65 (4 of 10): TP, TP -> AP 1
    #   t in 0.70..0.80 (3): TP, FP -> precision 1 up to recall 1/2 -> 51/101
    #   t >= 0.85 (3): FP, TP (det 2 takes B) -> envelope 1/2 up to recall 1/2 -> 25.5/101
    # Giving detection 1 the first gt instead would make both TPs for t <= 0.80.
    ground_truths = [gt([[0, 0, 10, 10], [2, 0, 12, 10]], [1, 1])]
    detections = [det([[1, 0, 11, 10], [2, 0, 12, 10]], [0.9, 0.8], [1, 1])]
    out = assert_matches_cocoeval(detections, ground_truths)
    assert out["AP"] == pytest.approx((4 + 3 * 51 / 101 + 3 * 25.5 / 101) / 10, abs=1e-12)


@pytest.mark.parametrize("max_dets", [100, 7])
def test_coco_more_detections_than_max(max_dets):
    rng = np.random.default_rng(30)
    detections, ground_truths = random_scene(rng, n_images=2, n_classes=1, gts_per_image=(10, 15),
                                             extra=(130, 150), jitter=0.1)
    assert min(len(d["scores"]) for d in detections) > 100  # all one class: > 100 per image and class
    out = assert_matches_cocoeval(detections, ground_truths, max_dets=max_dets)
    everything = coco_ap(detections, ground_truths, max_detections=10_000)
    assert out["AP"] != everything["AP"]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), jitter=st.floats(0.0, 0.5), levels=st.sampled_from([None, 2, 5]))
def test_coco_property_matches_pycocotools(seed, jitter, levels):
    rng = np.random.default_rng(seed)
    detections, ground_truths = random_scene(rng, n_images=4, jitter=jitter, score_levels=levels)
    out = assert_matches_cocoeval(detections, ground_truths)
    valid = out["precision"][out["precision"] > -1]
    assert ((valid >= 0) & (valid <= 1)).all()
    # precision at increasing recall never rises
    p = out["precision"]
    assert (np.diff(p, axis=1)[:, :, p[0, 0] > -1] <= 0).all()


# ----------------------------------------------------------- COCO by hand


def test_coco_hand_worked_false_positive_then_true_positive():
    # 1 gt; ranked detections FP (0.9) then TP (0.8): TP cumsum [0, 1], FP [1, 1],
    # precision [0, 1/2] -> envelope [1/2, 1/2]; recall [0, 1]: every recall point reads 1/2.
    ground_truths = [gt([[0, 0, 10, 10]], [1])]
    detections = [det([[20, 20, 30, 30], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    out = coco_ap(detections, ground_truths)
    assert out["AP"] == pytest.approx(0.5, abs=1e-12)
    assert out["AR100"] == 1.0


def test_coco_hand_worked_envelope():
    # 2 gts; ranked TP, FP, TP: precision [1, 1/2, 2/3] -> envelope [1, 2/3, 2/3],
    # recall [1/2, 1/2, 1]. Recall points 0..0.50 (51 of them) read 1, 0.51..1 (50) read 2/3.
    ground_truths = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    detections = [det([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 1, 1])]
    assert COCO_RECALL_THRESHOLDS[50] == 0.5
    out = coco_ap(detections, ground_truths)
    assert out["AP"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101, abs=1e-12)


def test_coco_hand_worked_iou_threshold():
    # IoU of [0,0,10,10] with [0,0,10,8] is 0.8: a TP for t <= 0.8 (7 of 10 thresholds).
    ground_truths = [gt([[0, 0, 10, 10]], [1])]
    detections = [det([[0, 0, 10, 8]], [0.5], [1])]
    out = coco_ap(detections, ground_truths)
    assert out["AP50"] == pytest.approx(1.0) and out["AP75"] == pytest.approx(1.0)
    assert out["AP"] == pytest.approx(0.7, abs=1e-12)
    assert_matches_cocoeval(detections, ground_truths)


def test_coco_max_detections_keeps_the_top_per_image():
    # 2 gts, both found, but only the best detection counts with max_detections=1:
    # recall 1/2 at precision 1 -> recall points 0..0.50 (51 of 101) read 1.
    ground_truths = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
    detections = [det([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [1, 1])]
    out = coco_ap(detections, ground_truths, max_detections=1)
    assert out["AP"] == pytest.approx(51 / 101, abs=1e-12) and out["AR100"] == 0.5
    assert_matches_cocoeval(detections, ground_truths, max_dets=1)


def test_coco_thresholds_at_the_ends():
    # t = 1 asks for IoU >= 1 - 1e-10 (COCOeval's min(t, 1 - 1e-10)): a box off by 1e-11 matches
    ground_truths = [gt([[0, 0, 10, 10]], [1])]
    ap = coco_ap([det([[1e-11, 0, 10, 10]], [0.9], [1])], ground_truths, iou_thresholds=[1.0])["AP"]
    assert ap == pytest.approx(1.0, abs=1e-12)
    assert coco_ap([det([[1e-9, 0, 10, 10]], [0.9], [1])], ground_truths, iou_thresholds=[1.0])["AP"] == 0.0
    # t = 0: IoU 0 >= 0, so any detection takes a free gt, also one that overlaps it in x
    # only (IoU 0, not a negative "intersection" of 5 x -10) or not at all
    for box in ([5, 20, 15, 30], [20, 20, 30, 30]):
        ap = coco_ap([det([box], [0.9], [1])], ground_truths, iou_thresholds=[0.0])["AP"]
        assert ap == pytest.approx(1.0, abs=1e-12)


def test_coco_perfect_detections():
    rng = np.random.default_rng(40)
    _, ground_truths = random_scene(rng, gts_per_image=(1, 5))
    detections = [det(g["boxes"], rng.random(len(g["labels"])), g["labels"]) for g in ground_truths]
    out = coco_ap(detections, ground_truths)
    assert out["AP"] == pytest.approx(1.0, abs=1e-12)
    assert all(v == pytest.approx(1.0) for v in out["per_class"].values())


def test_coco_no_ground_truth_anywhere():
    detections = [det([[0, 0, 5, 5]], [0.5], [1])]
    out = coco_ap(detections, [gt([], [])])
    assert out["AP"] == -1.0 and out["per_class"] == {1: -1.0}


def test_bench_evaluate_checks_both_agree_and_prints_both_times(capsys, monkeypatch):
    import os
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_evaluate.py")
    monkeypatch.setattr("sys.argv", [path, "--images", "12", "--repeats", "1"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert "COCO AP on 12 images" in out and "from both" in out
    assert "tinyfrcnn coco_ap" in out and "pycocotools COCOeval" in out


# ------------------------------------------------------------------------- VOC


def test_voc_hand_worked_curve():
    # Same ranked TP, FP, TP as above: precision [1, 1/2, 2/3], recall [1/2, 1/2, 1].
    precision, recall = np.array([1, 0.5, 2 / 3]), np.array([0.5, 0.5, 1.0])
    # 11-point: r = 0..0.5 (6 points) -> 1, r = 0.6..1 (5 points) -> 2/3.
    assert _voc_ap_from_curve(precision, recall, True) == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    # Area: 0.5 * 1 + 0.5 * 2/3.
    assert _voc_ap_from_curve(precision, recall, False) == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_voc_area_uses_the_monotone_envelope():
    # Ranked FP, TP, TP with 2 gts: precision [0, 1/2, 2/3], recall [0, 1/2, 1]. The
    # envelope reads 2/3 over all of [0, 1]; the raw curve would give 1/2 * 1/2 + 1/2 * 2/3.
    precision, recall = np.array([0, 0.5, 2 / 3]), np.array([0, 0.5, 1.0])
    assert _voc_ap_from_curve(precision, recall, False) == pytest.approx(2 / 3, abs=1e-12)
    assert _voc_ap_from_curve(precision, recall, True) == pytest.approx(2 / 3, abs=1e-12)


def test_voc_hand_made_11_point():
    # recall 0.2 at precision 1, 0.4 at 0.8, 0.7 at 0.5; never beyond 0.7.
    precision, recall = np.array([1.0, 0.8, 0.5]), np.array([0.2, 0.4, 0.7])
    expected = (3 * 1.0 + 2 * 0.8 + 3 * 0.5 + 3 * 0.0) / 11
    assert _voc_ap_from_curve(precision, recall, True) == pytest.approx(expected, abs=1e-12)
    assert _voc_ap_from_curve(precision, recall, False) == pytest.approx(0.2 + 0.2 * 0.8 + 0.3 * 0.5, abs=1e-12)


def test_voc_end_to_end_and_precision_recall():
    ground_truths = [gt([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1]), gt([[0, 0, 20, 20]], [2])]
    detections = [det([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 1, 1]),
                  det([[0, 0, 20, 20], [1, 1, 20, 20]], [0.6, 0.95], [2, 2])]
    p, r, s = precision_recall(detections, ground_truths, 1)
    np.testing.assert_allclose(p, [1, 0.5, 2 / 3])
    np.testing.assert_allclose(r, [0.5, 0.5, 1])
    np.testing.assert_allclose(s, [0.9, 0.8, 0.7])
    # class 2: the higher-scored, slightly off box takes the gt; the exact one is a duplicate.
    p2, r2, _ = precision_recall(detections, ground_truths, 2)
    np.testing.assert_allclose(p2, [1, 0.5])
    np.testing.assert_allclose(r2, [1, 1])
    out = voc_ap(detections, ground_truths, use_07_metric=True)
    assert out["per_class"][1] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert out["per_class"][2] == pytest.approx(1.0)
    assert out["mAP"] == pytest.approx(((6 + 5 * 2 / 3) / 11 + 1) / 2)
    assert voc_ap(detections, ground_truths)["per_class"][1] == pytest.approx(0.5 + 1 / 3)


def test_voc_duplicate_counts_even_when_a_worse_gt_is_free():
    # VOC looks only at the best-IoU gt: the second detection overlaps gt 0 best (taken)
    # and gt 1 enough, but is still a false positive. COCO gives it gt 1.
    ground_truths = [gt([[0, 0, 10, 10], [4, 0, 14, 10]], [1, 1])]
    detections = [det([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.8], [1, 1])]
    p, r, _ = precision_recall(detections, ground_truths, 1)
    np.testing.assert_allclose(r, [0.5, 0.5])
    coco = coco_ap(detections, ground_truths, iou_thresholds=[0.5])
    assert coco["AP"] == pytest.approx(1.0)


def test_voc_threshold_is_inclusive():
    ground_truths = [gt([[0, 0, 10, 10]], [1])]
    detections = [det([[0, 0, 10, 5]], [0.5], [1])]  # IoU exactly 0.5
    assert voc_ap(detections, ground_truths)["mAP"] == 1.0
    assert voc_ap(detections, ground_truths, iou_threshold=0.51)["mAP"] == 0.0


def test_voc_threshold_zero_still_needs_overlap():
    # the devkit's ov > 0 test: at iou_threshold 0 a box that does not overlap is a false positive
    ground_truths = [gt([[0, 0, 10, 10]], [1])]
    detections = [det([[20, 20, 30, 30], [0, 0, 10, 1]], [0.9, 0.8], [1, 1])]  # IoU 0, then 0.1
    p, r, _ = precision_recall(detections, ground_truths, 1, iou_threshold=0.0)
    np.testing.assert_allclose(p, [0, 0.5])
    np.testing.assert_allclose(r, [0, 1])


def test_voc_perfect_and_empty():
    rng = np.random.default_rng(60)
    _, ground_truths = random_scene(rng, gts_per_image=(1, 5))
    perfect = [det(g["boxes"], rng.random(len(g["labels"])), g["labels"]) for g in ground_truths]
    for metric in (True, False):
        assert voc_ap(perfect, ground_truths, use_07_metric=metric)["mAP"] == pytest.approx(1.0)
        empty = [det([], [], []) for _ in ground_truths]
        assert voc_ap(empty, ground_truths, use_07_metric=metric)["mAP"] == 0.0
    p, r, s = precision_recall([det([], [], [])], [gt([], [])], 1)
    assert p.shape == r.shape == s.shape == (0,)


def test_voc_class_without_ground_truth():
    out = voc_ap([det([[0, 0, 5, 5], [0, 0, 5, 5]], [0.5, 0.4], [1, 2])], [gt([[0, 0, 5, 5]], [1])])
    assert out["per_class"] == {1: 1.0, 2: -1.0} and out["mAP"] == 1.0
    p, r, _ = precision_recall([det([[0, 0, 5, 5]], [0.5], [2])], [gt([[0, 0, 5, 5]], [1])], 2)
    assert np.isnan(r).all() and p.tolist() == [0.0]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("fn", [coco_ap, voc_ap, lambda d, g: precision_recall(d, g, 1)])
def test_validation(fn):
    good_d, good_g = det([[0, 0, 5, 5]], [0.5], [1]), gt([[0, 0, 5, 5]], [1])
    with pytest.raises(ValueError, match="one entry per image"):
        fn([good_d, good_d], [good_g])
    with pytest.raises(ValueError, match=r"detections\[1\].*boxes.*\(N, 4\)"):
        fn([good_d, {**good_d, "boxes": np.zeros((1, 3))}], [good_g, good_g])
    with pytest.raises(ValueError, match=r"detections\[0\].*scores has 2"):
        fn([{**good_d, "scores": np.array([0.5, 0.4])}], [good_g])
    with pytest.raises(ValueError, match=r"detections\[0\].*labels has 2"):
        fn([{**good_d, "labels": np.array([1, 1])}], [good_g])
    with pytest.raises(ValueError, match=r"detections\[0\].*scores.*NaN"):
        fn([{**good_d, "scores": np.array([np.nan])}], [good_g])
    with pytest.raises(ValueError, match=r"ground_truths\[1\].*boxes.*NaN"):
        fn([good_d, good_d], [good_g, gt([[0, 0, np.nan, 5]], [1])])
    with pytest.raises(ValueError, match=r"ground_truths\[0\].*x2 < x1"):
        fn([good_d], [gt([[5, 0, 0, 5]], [1])])
    with pytest.raises(ValueError, match=r"ground_truths\[0\] has no 'labels'"):
        fn([good_d], [{"boxes": np.zeros((0, 4))}])
    with pytest.raises(ValueError, match=r"detections\[0\].*labels must be integers"):
        fn([{**good_d, "labels": np.array([1.0])}], [good_g])
    with pytest.raises(ValueError, match="detections must be a list"):
        fn(good_d, [good_g])


def test_validation_of_parameters():
    d, g = [det([[0, 0, 5, 5]], [0.5], [1])], [gt([[0, 0, 5, 5]], [1])]
    with pytest.raises(ValueError, match="iou_thresholds"):
        coco_ap(d, g, iou_thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="max_detections"):
        coco_ap(d, g, max_detections=0)
    with pytest.raises(ValueError, match="iou_threshold"):
        voc_ap(d, g, iou_threshold=float("nan"))
    for metric in ("no", 1, None):
        with pytest.raises(ValueError, match="voc_ap: use_07_metric must be True or False"):
            voc_ap(d, g, use_07_metric=metric)
    assert voc_ap(d, g, use_07_metric=np.bool_(True))["mAP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="label"):
        precision_recall(d, g, 1.5)
    with pytest.raises(ValueError, match="precision_recall: label must be an object class id, an integer >= 1"):
        precision_recall(d, g, 0)
    for thresholds in ("0.5", [True], []):
        with pytest.raises(ValueError, match="coco_ap: iou_thresholds must be a non-empty 1-D list of numbers"):
            coco_ap(d, g, iou_thresholds=thresholds)


@pytest.mark.parametrize("metric", [coco_ap, voc_ap])
def test_labels_are_object_classes_and_areas_stay_within_cocos_limit(metric):
    name = metric.__name__
    d, g = [det([[0, 0, 5, 5]], [0.5], [1])], [gt([[0, 0, 5, 5]], [1])]
    for labels, match in [([0], "must be object classes >= 1 \\(0 is the background\\), found 0"),
                          ([-1], "found -1"),
                          (np.array([2**64 - 1], np.uint64), "found 18446744073709551615")]:
        with pytest.raises(ValueError, match=rf"{name}: detections\[0\]: labels .*{match}"):
            metric([{**d[0], "labels": np.asarray(labels)}], g)
        with pytest.raises(ValueError, match=rf"{name}: ground_truths\[0\]: labels .*{match}"):
            metric(d, [{**g[0], "labels": np.asarray(labels)}])
    with pytest.raises(ValueError, match=f"{name}: class_ids must be object classes >= 1"):
        metric(d, g, class_ids=[0, 1])
    with pytest.raises(ValueError, match=rf"{name}: class_ids must not repeat a class, got \[1, 2, 1\]"):
        metric(d, g, class_ids=[1, 2, 1])
    with pytest.raises(ValueError, match=f"{name}: class_ids must be integers, got dtype float64"):
        metric(d, g, class_ids=[1.0])
    huge = [[0, 0, 1e160, 1e160]]  # its IoU with itself would overflow to NaN
    with pytest.raises(ValueError, match=rf"{name}: ground_truths\[0\]: boxes\[0\] has area 1e\+320|area inf"):
        metric([det(huge, [0.5], [1])], [gt(huge, [1])])
    with pytest.raises(ValueError, match=rf"{name}: detections\[0\]: boxes\[0\] has area 1.5e\+10, beyond COCO"):
        metric([det([[0, 0, 1e5, 1.5e5]], [0.5], [1])], g)
    edge = [[0, 0, 1e5, 1e5]]  # exactly COCO's limit: still evaluated
    assert metric([det(edge, [0.5], [1])], [gt(edge, [1])])["per_class"][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=rf"{name}: detections\[0\] has no 'scores'"):
        metric([{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}], g)
    # integer boxes and scores, and plain lists, are accepted
    assert coco_ap([{"boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": [1]}],
                   [{"boxes": [[0, 0, 5, 5]], "labels": [1]}])["AP"] == pytest.approx(1.0)
    assert metric([{"boxes": [[0, 0, 5, 5], [9, 9, 12, 12]], "scores": [2, 3], "labels": [1, 1]}],
                  [{"boxes": [[0, 0, 5, 5]], "labels": [1]}])["per_class"][1] == pytest.approx(0.5)
