"""FasterRCNN: end-to-end gradients, detection output, checkpoints."""

import dataclasses
import os

import numpy as np
import pytest

from tinyfrcnn.model import FasterRCNN, ModelConfig, read_checkpoint
from tinyfrcnn.shapes import ShapesDataset

TINY = ModelConfig(
    backbone_channels=(4, 4, 8, 8), rpn_mid_channels=8, head_hidden=16, pool_size=3,
    rpn_batch=32, roi_batch=8, rpn_pre_nms_train=200, rpn_post_nms_train=30,
    rpn_pre_nms_test=100, rpn_post_nms_test=20,
)


def tiny_batch(n=2, size=64, seed=0):
    ds = ShapesDataset(n, image_size=size, seed=seed)
    return ds.batch(list(range(n)))


def test_one_training_step_gradients_match_central_differences():
    """The whole step: backbone -> RPN (+ loss) and proposals -> head (+ loss), float64.

    Proposals are held fixed (they are constants in approximate joint training), and the
    sampling generator is re-seeded for every evaluation, so the loss is a smooth
    function of the parameters."""
    images, boxes, labels = tiny_batch()
    images = images.astype(np.float64)
    model = FasterRCNN(TINY, rng=np.random.default_rng(1)).astype(np.float64)
    # Biases start at zero, so a conv over an all-zero (ReLU-killed) patch sits exactly on
    # ReLU's kink, where central differences see half a slope: move them off it.
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data[...] = np.random.default_rng(2).normal(0.0, 0.1, p.data.shape)
    props = [p for p, _ in model.propose(images)]

    def loss():
        return model.forward(images, boxes, labels, rng=np.random.default_rng(7), proposals=props)["loss"]

    model.zero_grad()
    loss()
    model.backward()
    rng = np.random.default_rng(3)
    worst = 0.0
    checked = 0
    for name, p in model.named_parameters():
        flat = p.data.reshape(-1)
        grad = p.grad.reshape(-1)
        # Two entries with a gradient and one without (dead ReLUs, unsampled anchors):
        # a zero that should not be, or a gradient that should be zero, both show.
        nonzero, zero = np.flatnonzero(grad), np.flatnonzero(grad == 0)
        assert len(nonzero), f"{name}: no gradient at all"
        picks = list(rng.choice(nonzero, size=min(2, len(nonzero)), replace=False))
        picks += list(rng.choice(zero, size=min(1, len(zero)), replace=False))
        for j in picks:
            old = flat[j]
            flat[j] = old + 1e-5
            up = loss()
            flat[j] = old - 1e-5
            down = loss()
            flat[j] = old
            numeric = (up - down) / 2e-5
            # step 1e-5: the loss is ~1, so a 1e-6 step left ~1e-10 of round-off in the
            # quotient; this one leaves up to ~5e-11, which the floor keeps below 1e-5
            # where a gradient is tiny
            err = abs(numeric - grad[j]) / max(abs(numeric) + abs(grad[j]), 1e-5)
            assert err < 1e-5, f"{name}[{j}]: analytic {grad[j]:.8g} numeric {numeric:.8g}"
            worst = max(worst, err)
            checked += grad[j] != 0
    assert checked >= 40, checked


def wide_batch(n=2):
    """Shapes images padded on the right to 64 rows x 80 columns (objects stay put)."""
    images, boxes, labels = tiny_batch(n)
    return np.concatenate([images, np.zeros((n, 3, 64, 16), images.dtype)], axis=3), boxes, labels


def test_forward_losses_are_those_of_the_public_pieces():
    """One training step's four losses, rebuilt from the public functions with the
    config's settings (each image's anchors sampled, then its RoIs, from one stream):
    anchor_targets -> sample_labels -> rpn_loss per image, averaged over the images;
    sample_proposals -> the head -> head_loss over all sampled RoIs."""
    from tinyfrcnn.head import head_loss
    from tinyfrcnn.rpn import rpn_loss
    from tinyfrcnn.targets import anchor_targets, sample_labels, sample_proposals

    cfg = dataclasses.replace(TINY, rpn_pos_iou=0.6, rpn_neg_iou=0.2, rpn_allowed_border=0.0, rpn_batch=20,
                              rpn_pos_fraction=0.25, rpn_sigma=2.0, roi_batch=6, fg_fraction=0.5, fg_iou=0.6,
                              bg_iou=(0.1, 0.6), head_sigma=1.5)
    model = FasterRCNN(cfg, rng=np.random.default_rng(4)).astype(np.float64)
    images, boxes, labels = wide_batch()
    images = images.astype(np.float64)
    rng = np.random.default_rng(8)
    props = []
    for b in boxes:  # near each object, and 12x12 boxes anywhere
        xy = rng.uniform(0, 60, (30, 2))
        near = b + rng.normal(0, 2, b.shape)
        props.append(np.concatenate([near, np.column_stack([xy, xy + 12])]).astype(np.float32))
    losses = model.forward(images, boxes, labels, rng=np.random.default_rng(9), proposals=props)

    feats = model.backbone.forward(images)
    assert feats.shape[2:] == (8, 10) and model.head.pool.spatial_scale == 1 / 8  # the backbone's stride
    logits, deltas = model.rpn.forward(feats)
    anchors = model.anchors_for(*feats.shape[2:])
    draws = np.random.default_rng(9)
    rpn_cls = rpn_reg = 0.0
    rois, roi_labels, roi_targets = [], [], []
    for i in range(2):
        anchor_labels, _, reg_targets = anchor_targets(anchors, boxes[i], 0.6, 0.2, image_size=(64, 80),
                                                       allowed_border=0.0)
        sampled = sample_labels(anchor_labels, 20, 0.25, rng=draws)
        out = rpn_loss(logits[i], deltas[i], sampled, reg_targets, sigma=2.0)
        rpn_cls += out["loss_cls"] / 2
        rpn_reg += out["loss_reg"] / 2
        sample = sample_proposals(props[i], boxes[i], labels[i], num_samples=6, fg_fraction=0.5, fg_iou=0.6,
                                  bg_iou=(0.1, 0.6), rng=draws)
        rois.append(np.column_stack([np.full(len(sample["rois"]), i), sample["rois"]]))
        roi_labels.append(sample["labels"])
        roi_targets.append(sample["box_targets"])
    assert all((r[:, 0] == i).sum() > 0 for i, r in enumerate(rois))
    cls_logits, box_deltas = model.head.forward(feats, np.concatenate(rois))
    head = head_loss(cls_logits, box_deltas, np.concatenate(roi_labels), np.concatenate(roi_targets), sigma=1.5)
    assert head["loss_box"] > 0 and rpn_reg > 0
    expected = {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg, "head_cls": head["loss_cls"], "head_box": head["loss_box"]}
    for name, value in expected.items():
        assert losses[name] == pytest.approx(value, rel=1e-9), name


def test_forward_takes_image_size_as_height_then_width():
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    images, boxes, labels = wide_batch()  # 64 rows, 80 columns
    right = [np.concatenate([b, [[66, 40, 79, 63]]]).astype(np.float32) for b in boxes]  # right of column 64
    model.forward(images, right, [np.append(l, 1) for l in labels], rng=np.random.default_rng(0), train_head=False)
    low = [boxes[0], np.concatenate([boxes[1], [[10, 50, 20, 70]]]).astype(np.float32)]  # below row 64
    with pytest.raises(ValueError, match=r"FasterRCNN.forward: gt_boxes\[1\]\[\d+\] = .* not inside the 64x80 image"):
        model.forward(images, low, [labels[0], np.append(labels[1], 1)], rng=np.random.default_rng(0))


def test_detect_is_postprocess_of_each_images_rois():
    """detect: the test-time proposals of each image, the head on all of them, then
    postprocess_detections per image with the config's thresholds."""
    from tinyfrcnn.head import postprocess_detections

    cfg = dataclasses.replace(TINY, score_thresh=0.3, nms_thresh=0.5, max_detections=7)
    model = FasterRCNN(cfg, rng=np.random.default_rng(0))
    for p in model.head.parameters():  # spread the class scores out
        p.data *= 5
    images, _, _ = wide_batch()
    dets = model.detect(images)
    proposals = model.propose(images)
    feats = model.backbone.forward(images)
    rois = np.concatenate([np.column_stack([np.full(len(p), i), p]) for i, (p, _) in enumerate(proposals)])
    cls_logits, box_deltas = model.head.forward(feats, rois.astype(np.float32))
    counts = []
    for i in range(2):
        rows = rois[:, 0] == i
        expected = postprocess_detections(rois[rows, 1:], cls_logits[rows], box_deltas[rows], (64, 80),
                                          score_thresh=0.3, nms_thresh=0.5, max_detections=7)
        assert 0 < len(expected["scores"])
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(dets[i][key], expected[key], err_msg=key)
        others = [postprocess_detections(rois[rows, 1:], cls_logits[rows], box_deltas[rows], (64, 80), **kwargs)
                  for kwargs in (dict(score_thresh=0.05, nms_thresh=0.5, max_detections=7),
                                 dict(score_thresh=0.3, nms_thresh=0.5, max_detections=100))]
        counts.append([len(o["scores"]) for o in others])
    # here each setting matters: a lower threshold or a higher cap would give more detections
    assert any(c[0] > len(d["scores"]) for c, d in zip(counts, dets))
    assert any(c[1] > len(d["scores"]) for c, d in zip(counts, dets))


def test_anchors_for_keeps_each_grid_read_only():
    from tinyfrcnn.anchors import grid_anchors

    model = FasterRCNN(ModelConfig(), rng=np.random.default_rng(0))
    a = model.anchors_for(16, 16)
    assert np.array_equal(a, grid_anchors(model.base_anchors, 16, 16, model.stride))
    assert model.anchors_for(16, 16) is a and not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 1.0
    b = model.anchors_for(16, 20)
    assert b.shape == (16 * 20 * model.num_anchors, 4) and model.anchors_for(16, 16) is a
    for w in range(21, 30):  # a few grids at most are kept
        model.anchors_for(16, w)
    assert len(model._anchor_grids) <= 8
    assert np.array_equal(model.anchors_for(16, 16), a)


def test_backward_without_the_backbone_leaves_it_alone():
    images, boxes, labels = tiny_batch()
    model = FasterRCNN(TINY, rng=np.random.default_rng(1))
    model.forward(images, boxes, labels, rng=np.random.default_rng(7))
    model.backward()
    full = {name: p.grad.copy() for name, p in model.named_parameters()}
    model.zero_grad()
    model.forward(images, boxes, labels, rng=np.random.default_rng(7))
    model.backward(train_backbone=False)
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert not p.grad.any(), name
        else:
            np.testing.assert_array_equal(p.grad, full[name], err_msg=name)
    assert any(full[name].any() for name in full if name.startswith("backbone."))


def test_detect_output_format():
    images, _, _ = tiny_batch(2)
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    dets = model.detect(images)
    assert len(dets) == 2
    for d in dets:
        assert d["boxes"].ndim == 2 and d["boxes"].shape[1] == 4
        assert d["scores"].shape == d["labels"].shape == (len(d["boxes"]),)
        assert len(d["boxes"]) <= TINY.max_detections
        if len(d["labels"]):
            assert d["labels"].min() >= 1 and d["labels"].max() <= TINY.num_classes
            assert (d["boxes"] >= 0).all() and (d["boxes"][:, [0, 2]] <= 64).all()


def test_images_without_objects_train():
    images, _, _ = tiny_batch(2)
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    empty = [np.zeros((0, 4), np.float32)] * 2
    losses = model.forward(images, empty, [np.zeros(0, np.int64)] * 2, rng=np.random.default_rng(0))
    model.backward()
    assert np.isfinite(losses["loss"])
    assert losses["rpn_reg"] == 0 and losses["head_box"] == 0
    assert any(np.abs(p.grad).sum() > 0 for p in model.parameters())


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = FasterRCNN(TINY, rng=np.random.default_rng(5))
    path = str(tmp_path / "m.npz")
    model.save(path)
    loaded, _ = FasterRCNN.load(path)
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.data, p2.data)
    images, _, _ = tiny_batch(1)
    a, b = model.detect(images)[0], loaded.detect(images)[0]
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    umask = os.umask(0o027)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "umask", None)  # saving leaves the umask alone (other threads use it)
            model.save(path)  # the mode a new file gets, as with open(): not mkstemp's 0o600
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        FasterRCNN.load(str(tmp_path / "missing.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a tinyfrcnn checkpoint"):
        FasterRCNN.load(str(junk))
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a tinyfrcnn checkpoint"):
        read_checkpoint(str(other))
    # a checkpoint of another configuration
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    path = str(tmp_path / "m.npz")
    model.save(path)
    with pytest.raises(ValueError, match="shape"):
        FasterRCNN(ModelConfig()).load_state_dict(FasterRCNN.load(path)[0].state_dict())
    state = model.state_dict()
    state["head.cls_score.bias"] = state["head.cls_score.bias"][:1]  # would broadcast over the (4,) bias
    with pytest.raises(ValueError, match=r"checkpoint parameter 'head.cls_score.bias' has shape \(1,\), "
                                         r"the model expects \(4,\)"):
        model.load_state_dict(state)


def test_damaged_checkpoints_and_unreadable_extras_are_clear_errors(tmp_path):
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    path = str(tmp_path / "m.npz")
    model.save(path)
    good = open(path, "rb").read()
    with pytest.raises(ValueError, match=r"FasterRCNN.save: extra\['o'\] must be numbers or a string, got dict"):
        model.save(path, extra={"o": {"a": 1}})
    assert open(path, "rb").read() == good  # nothing was written over it
    arrays = read_checkpoint(path)
    name = "param/head.fc6.weight"
    for value, match in [(np.full_like(arrays[name], np.nan), "holds NaN or inf"),
                         (np.full(arrays[name].shape, 1e39), r"holds NaN or inf \(in float32\)"),
                         (arrays[name].astype(np.complex64), "has dtype complex64, not a real number type")]:
        np.savez(str(tmp_path / "bad.npz"), **{**arrays, name: value})
        with pytest.raises(ValueError, match=f"checkpoint parameter 'head.fc6.weight' {match}"):
            FasterRCNN.load(str(tmp_path / "bad.npz"))
    for config, match in [("null", "must be a JSON object"), ("{oops", "is not JSON"),
                          ('{"backbone_channels": 64}', "backbone_channels must be a non-empty tuple"),
                          ('{"score_thresh": 2.0}', "score_thresh must be <= 1")]:
        np.savez(str(tmp_path / "bad.npz"), **{**arrays, "config": np.array(config)})
        with pytest.raises(ValueError, match=f"checkpoint config.*{match}"):
            FasterRCNN.load(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="checkpoint path must be a string or path, got NoneType"):
        FasterRCNN.load(None)


@pytest.mark.parametrize("field, value, match", [
    ("score_thresh", 2.0, "score_thresh must be <= 1"), ("max_detections", 0, "max_detections must be a positive"),
    ("nms_thresh", float("nan"), "nms_thresh must be finite"), ("rpn_pre_nms_test", 0, "rpn_pre_nms_test must be"),
    ("backbone_channels", (8, 8, 8), "backbone_channels needs at least 4 entries"),
    ("anchor_sizes", (16, -1), r"anchor_sizes\[1\] must be > 0"), ("rpn_neg_iou", 0.8, "rpn_neg_iou must be <= 0.7"),
    ("bg_iou", (0.0, 0.6), r"bg_iou\[1\] must be <= 0.5"), ("pooling", "max", "pooling must be 'roi_pool' or"),
    ("bg_iou", (0.2, 0.2), r"bg_iou must be a \(low, high\) pair with low < high, got \(0.2, 0.2\)"),
    ("num_classes", True, "num_classes must be a positive integer"),
])
def test_model_config_checks_its_fields(field, value, match):
    with pytest.raises(ValueError, match=f"ModelConfig: {match}"):
        ModelConfig(**{field: value})
    config = ModelConfig()
    setattr(config, field, value)  # set after construction: caught when a model is built
    with pytest.raises(ValueError, match=f"ModelConfig: {match}"):
        FasterRCNN(config)
    with pytest.raises(ValueError, match="FasterRCNN: config must be a ModelConfig, got dict"):
        FasterRCNN({"num_classes": 3})


def test_propose_takes_a_nested_list_as_detect_does():
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    images = tiny_batch(n=1)[0].tolist()
    expected = model.propose(np.array(images))
    got = model.propose(images)
    assert len(got) == 1 and np.array_equal(got[0][0], expected[0][0]) and np.array_equal(got[0][1], expected[0][1])


def test_detect_and_propose_on_an_empty_batch():
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    empty = np.zeros((0, 3, 64, 64), np.float32)  # (N, 3, H, W)
    assert model.detect(empty) == []
    assert model.propose(empty) == []


def test_forward_rejects_bad_input():
    model = FasterRCNN(TINY, rng=np.random.default_rng(0))
    images, boxes, labels = tiny_batch(2)
    with pytest.raises(ValueError, match="images"):
        model.forward(images[0], boxes, labels, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="gt_boxes"):
        model.forward(images, boxes[:1], labels, rng=np.random.default_rng(0))
    for bad_boxes, bad_labels, match in [
        ([boxes[0][:, :3], boxes[1]], labels, r"gt_boxes\[0\] must have shape \(N, 4\)"),
        (boxes, [labels[0].astype(np.float64) + 0.7, labels[1]], r"gt_labels\[0\] must have an integer dtype, got float64"),
        (boxes, [labels[0], np.full(len(labels[1]), 4)], r"gt_labels\[1\] must hold only \[1, 2, 3\], found 4"),
        (boxes, [labels[0], labels[1] * 0], r"gt_labels\[1\] must hold only \[1, 2, 3\], found 0"),
        (boxes, [labels[0][:-1], labels[1]], r"gt_labels\[0\] has \d+ labels but gt_boxes\[0\] has \d+ boxes"),
        ([np.zeros((0, 5)), boxes[1]], [[], labels[1]], r"gt_boxes\[0\] must have shape \(N, 4\), got \(0, 5\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.forward(images, bad_boxes, bad_labels, rng=np.random.default_rng(0), train_head=False)
    with pytest.raises(ValueError, match="images holds no images"):
        model.forward(images[:0], [], [], rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 images but 1 proposals"):
        model.forward(images, boxes, labels, rng=np.random.default_rng(0), proposals=[boxes[0]])
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.detect(bad)
    with pytest.raises(ValueError, match="backward"):
        FasterRCNN(TINY).backward()


def test_forward_checks_what_the_targets_take_unchecked():
    # The forward pass checks the ground truth, the proposals, the rng and its config once,
    # then calls the targets' and the RPN loss's unchecked cores for every image.
    model = FasterRCNN(dataclasses.replace(TINY), rng=np.random.default_rng(0))
    images, boxes, labels = tiny_batch(2)
    flat = [boxes[0], boxes[1].copy()]
    flat[1][0, 3] = flat[1][0, 1]  # zero height
    outside = [boxes[0], boxes[1] + np.float32(64)]
    with_nan = [boxes[0].copy(), boxes[1]]
    with_nan[0][0, 0] = np.nan
    for kwargs, match in [
        (dict(gt_boxes=flat), r"FasterRCNN.forward: gt_boxes\[1\]\[0\] = .* has zero width or height"),
        (dict(gt_boxes=outside), r"FasterRCNN.forward: gt_boxes\[1\]\[0\] = .* is not inside the 64x64 image"),
        (dict(proposals=with_nan), r"FasterRCNN.forward: proposals\[0\] holds NaN or inf"),
        (dict(rng=np.random.RandomState(0)), r"FasterRCNN.forward: rng must be a numpy.random.Generator"),
    ]:
        args = dict(gt_boxes=boxes, rng=np.random.default_rng(0)) | kwargs
        with pytest.raises(ValueError, match=match):
            model.forward(images, args.pop("gt_boxes"), labels, **args)
    # boxes outside the image only matter to the anchor targets: the head alone takes them
    model.forward(images, outside, labels, rng=np.random.default_rng(0), train_rpn=False)
    model.config.rpn_pos_iou = 1.5  # set after construction
    with pytest.raises(ValueError, match="ModelConfig: rpn_pos_iou"):
        model.forward(images, boxes, labels, rng=np.random.default_rng(0))


def _load_bench_gpu():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_gpu_times_the_models_host_steps():
    # benchmarks/bench_gpu.py times the GPU step's host part by wrapping these names
    import tinyfrcnn.model as model_mod

    bench = _load_bench_gpu()
    assert bench.HOST_STEPS and all(callable(getattr(model_mod, name, None)) for name in bench.HOST_STEPS)


def test_bench_gpu_runs_the_benchmarks_asked_for_and_writes_their_rows(tmp_path, capsys, monkeypatch):
    import json
    import sys

    bench = _load_bench_gpu()
    # main() sets NUMBA_ENABLE_CUDASIM and sys.path for its own process; give both back after
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", os.environ.get("NUMBA_ENABLE_CUDASIM", "1"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "rows.json"
    assert bench.main(["--simulate", "--only", "box_iou", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["box_iou"] and rows[0]["check"] == "0.00e+00"
    assert rows[0]["note"] == ""  # the kernel-time note ran (the simulator records no times)
    assert "box_iou (20 x 10):" in capsys.readouterr().out  # printed when measured
    with pytest.raises(SystemExit):
        bench.main(["--simulate", "--only", "box_iou,nmz"])

    def broken(B):
        raise RuntimeError("no such device")

    monkeypatch.setitem(bench.BENCHMARKS, "nms", broken)
    assert bench.main(["--simulate", "--only", "nms,box_iou", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["check"]) for r in rows] == [("nms", "ERROR"), ("box_iou", "0.00e+00")]
    assert rows[0]["note"] == "RuntimeError: no such device"
    assert not os.path.exists(str(out) + ".tmp")
