"""How closely each op that torch/torchvision also has matches it, on the same input.

    python benchmarks/torch_parity.py [--seed 0]       # needs torch and torchvision

The docstrings promise torch's numbers: bit for bit where the operations and their order
are the same, to a few units in the last place (ulps) where they are not (a fused
multiply-add in torch, another summation order, another exp or log). Each row runs one op on random input,
in float32 and float64, and prints how many elements differ from torch's and by how much
at most, in ulps of torch's largest value; the last column says whether that is within
what the docstring claims ("exact" or "<= n ulp"). The exit status is 1 if any row is
not. Inputs are small (a few seconds in all); the awkward cases (ties, zero-area boxes,
RoIs off the map) are in the chapters' checks and the tests.
"""

import argparse
import sys

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    import torchvision.ops as tvops
except ImportError:
    sys.exit("torch_parity.py needs torch and torchvision: pip install torch==2.14.1 torchvision==0.29.1 "
             "into a separate virtual environment that also has tinyfrcnn")

from tinyfrcnn.anchors import base_anchors, grid_anchors
from tinyfrcnn.boxes import box_iou, clip_boxes, decode, encode, remove_small_boxes
from tinyfrcnn.head import postprocess_detections
from tinyfrcnn.layers import Conv2d, Linear, MaxPool2d, ReLU
from tinyfrcnn.losses import smooth_l1, softmax_cross_entropy
from tinyfrcnn.nms import batched_nms, nms
from tinyfrcnn.optim import SGD
from tinyfrcnn.roi import roi_align, roi_align_backward, roi_pool, roi_pool_backward
from tinyfrcnn.targets import label_anchors

DTYPES = (np.float32, np.float64)


def ulps(ours, theirs):
    """(number of differing elements, largest difference in ulps of torch's largest |value|).

    The scale of the whole array, not of each element: a sum of many terms whose result
    is near 0 carries the rounding of its large terms, so an element-wise ulp count
    would call an ordinary change of summation order thousands of ulps."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    if ours.shape != theirs.shape:  # e.g. NMS keeping another number of boxes
        return max(ours.size, theirs.size), np.inf
    if ours.dtype.kind not in "f":
        return int((ours != theirs).sum()), (0.0 if np.array_equal(ours, theirs) else np.inf)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    scale = np.spacing(np.abs(theirs).max(initial=0).astype(ours.dtype)).astype(np.float64)
    return int((diff > 0).sum()), float(diff.max(initial=0.0) / scale)


def boxes(rng, n, size=100.0, dtype=np.float32):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(dtype)  # (n, 4)


def t(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def layers(rng, dtype):
    x = rng.standard_normal((2, 3, 11, 9)).astype(dtype)  # (N, C, H, W)
    conv = Conv2d(3, 5, 3, stride=2, padding=1, rng=rng).astype(dtype)
    y = conv(x)
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = conv.backward(g)
    tx, tw, tb = t(x, True), t(conv.weight.data, True), t(conv.bias.data, True)
    ty = F.conv2d(tx, tw, tb, stride=2, padding=1)
    ty.backward(t(g))
    # sums of products: torch's convolution adds them up in another order
    yield "Conv2d forward", y, ty.detach().numpy(), 4
    yield "Conv2d d input", dx, tx.grad.numpy(), 4
    yield "Conv2d d weight", conv.weight.grad, tw.grad.numpy(), 4
    yield "Conv2d d bias", conv.bias.grad, tb.grad.numpy(), 4

    relu = ReLU()
    g = rng.standard_normal(x.shape).astype(dtype)
    tx = t(x, True)
    F.relu(tx).backward(t(g))
    yield "ReLU forward", relu(x), np.maximum(x, 0), 0
    yield "ReLU backward", relu.backward(g), tx.grad.numpy(), 0

    pool = MaxPool2d(3, 2)
    y = pool(x)
    g = rng.standard_normal(y.shape).astype(dtype)
    tx = t(x, True)
    ty = F.max_pool2d(tx, 3, 2)
    ty.backward(t(g))
    yield "MaxPool2d forward", y, ty.detach().numpy(), 0
    yield "MaxPool2d backward", pool.backward(g), tx.grad.numpy(), 0

    x = rng.standard_normal((6, 20)).astype(dtype)  # (N, in)
    fc = Linear(20, 7, rng=rng).astype(dtype)
    y = fc(x)
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = fc.backward(g)
    tx, tw, tb = t(x, True), t(fc.weight.data, True), t(fc.bias.data, True)
    ty = F.linear(tx, tw, tb)
    ty.backward(t(g))
    # one matrix product each: two BLAS libraries may order the sums differently
    yield "Linear forward", y, ty.detach().numpy(), 4
    yield "Linear d input", dx, tx.grad.numpy(), 4
    yield "Linear d weight", fc.weight.grad, tw.grad.numpy(), 4


def box_ops(rng, dtype):
    a, b = boxes(rng, 300, dtype=dtype), boxes(rng, 200, dtype=dtype)
    yield "box_iou", box_iou(a, b), tvops.box_iou(t(a), t(b)).numpy(), 0

    scores = rng.uniform(0, 1, 300).astype(dtype)
    yield "nms (kept indices)", nms(a, scores, 0.5), tvops.nms(t(a), t(scores), 0.5).numpy(), 0
    classes = rng.integers(0, 3, 300)
    per_class = np.concatenate([np.flatnonzero(classes == c)[tvops.nms(t(a[classes == c]), t(scores[classes == c]),
                                                                       0.5).numpy()] for c in range(3)])
    per_class = per_class[np.argsort(-scores[per_class], kind="stable")]
    yield "batched_nms vs per-class nms", batched_nms(a, scores, classes, 0.5), per_class, 0

    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref, target = boxes(rng, 200, dtype=dtype), boxes(rng, 200, dtype=dtype)
    deltas = encode(ref, target, (10, 10, 5, 5))
    close = 1 if dtype == np.float64 else 4  # NumPy's and torch's log and exp, which vary with the CPU
    yield "encode (10, 10, 5, 5)", deltas, coder.encode_single(t(target), t(ref)).numpy(), close
    yield "decode (10, 10, 5, 5)", decode(ref, deltas, (10, 10, 5, 5)), \
        coder.decode_single(t(deltas), t(ref)).numpy(), close

    spill = boxes(rng, 200, size=120.0, dtype=dtype) - dtype(10)  # (200, 4), some past each edge of 90 x 80
    yield "clip_boxes", clip_boxes(spill, 80, 90), tvops.clip_boxes_to_image(t(spill), (80, 90)).numpy(), 0
    xy = rng.uniform(0, 50, (200, 2))
    thin = np.concatenate([xy, xy + rng.uniform(0, 4, (200, 2))], axis=1).astype(dtype)  # (200, 4), sides 0 to 4
    yield "remove_small_boxes (min_size 2)", remove_small_boxes(thin, 2.0), \
        tvops.remove_small_boxes(t(thin), 2.0).numpy(), 0


def anchor_labels(rng, dtype):
    from torchvision.models.detection._utils import Matcher

    # the paper's 3 sizes x 3 ratios (16, 32, 64 px; 0.5, 1, 2) on the model's 16 x 16,
    # stride-8 grid of a 128 x 128 image: a regular grid, so many anchors tie for a ground
    # truth's best IoU
    anchors = grid_anchors(base_anchors(1, (16, 32, 64), (0.5, 1, 2)), 16, 16, 8).astype(dtype)  # (2304, 4)
    xy = rng.uniform(0, 80, (6, 2))
    gt = np.concatenate([xy, xy + rng.uniform(12, 48, (6, 2))], axis=1).astype(dtype)  # (6, 4), as the shapes
    labels, matched = label_anchors(anchors, gt, pos_iou=0.7, neg_iou=0.3)
    # torchvision's RPN: Matcher(0.7, 0.3, allow_low_quality_matches=True), then
    # matched >= 0 -> 1, below 0.3 -> 0, between -> -1
    idx = Matcher(0.7, 0.3, allow_low_quality_matches=True)(tvops.box_iou(t(gt), t(anchors))).numpy()
    theirs = np.where(idx >= 0, 1, np.where(idx == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
    yield "label_anchors vs Matcher (0.7, 0.3, low quality)", labels, theirs, 0
    yield "label_anchors matched gt of positives", matched[labels == 1], idx[theirs == 1], 0


def detections(rng, dtype):
    from torchvision.models.detection.roi_heads import RoIHeads

    proposals = boxes(rng, 200, size=110.0, dtype=dtype)  # (R, 4), some past the 100 x 120 image
    logits = rng.normal(0, 2, (200, 4)).astype(dtype)  # (R, K + 1)
    deltas = rng.normal(0, 0.5, (200, 16)).astype(dtype)  # (R, 4 (K + 1))
    ours = postprocess_detections(proposals, logits, deltas, (100, 120), score_thresh=0.05, nms_thresh=0.3,
                                  max_detections=100)
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh=0.05, nms_thresh=0.3,
                     detections_per_img=100)
    (tb,), (ts,), (tl,) = heads.postprocess_detections(t(logits), t(deltas), [t(proposals)], [(100, 120)])
    # the kept set and its order must agree; the scores are a softmax (torch multiplies by the
    # reciprocal of the sum, with its own exp) and the boxes carry decode's exp
    yield "postprocess_detections labels", ours["labels"], tl.numpy(), 0
    yield "postprocess_detections scores", ours["scores"], ts.numpy(), 4
    yield "postprocess_detections boxes", ours["boxes"], tb.numpy(), 1 if dtype == np.float64 else 4


def roi_ops(rng, dtype):
    features = rng.standard_normal((2, 4, 12, 14)).astype(dtype)  # (N, C, H, W)
    rois = np.concatenate([rng.integers(0, 2, (40, 1)), boxes(rng, 40, size=60.0, dtype=np.float64)], axis=1)
    rois = rois.astype(dtype)  # (R, 5), some reaching past the map's 56 x 48 image pixels
    out, argmax = roi_pool(features, rois, 3, 0.25)
    g = rng.standard_normal(out.shape).astype(dtype)
    tf = t(features, True)
    ty = tvops.roi_pool(tf, t(rois), 3, 0.25)
    ty.backward(t(g))
    yield "roi_pool forward", out, ty.detach().numpy(), 0
    yield "roi_pool backward", roi_pool_backward(g, argmax, features.shape), tf.grad.numpy(), 0
    # sampling 3: nine samples per bin, so the backward's g * w / 9 shows its order of operations
    for aligned, sampling in ((True, 2), (False, -1), (True, 3)):
        out = roi_align(features, rois, 3, 0.25, sampling, aligned)
        tf = t(features, True)
        ty = tvops.roi_align(tf, t(rois), 3, 0.25, sampling, aligned)
        ty.backward(t(g))
        name = f"roi_align aligned={aligned} sampling={sampling}"
        yield name + " forward", out, ty.detach().numpy(), 0
        yield name + " backward", roi_align_backward(g, rois, features.shape, 0.25, sampling, aligned), \
            tf.grad.numpy(), 0


def losses(rng, dtype):
    pred, target = rng.standard_normal((50, 4)).astype(dtype), rng.standard_normal((50, 4)).astype(dtype)
    loss, grad = smooth_l1(pred, target, 1 / 9)
    tp = t(pred, True)
    tl = F.smooth_l1_loss(tp, t(target), reduction="none", beta=1 / 9).sum()
    tl.backward()
    # the losses are sums, added up in another order (in float64 here, for float32 input)
    yield "smooth_l1 loss", np.asarray(loss, dtype), tl.detach().numpy(), 2
    yield "smooth_l1 gradient", grad, tp.grad.numpy(), 0 if dtype == np.float64 else 1

    logits, labels = rng.normal(0, 3, (60, 4)).astype(dtype), rng.integers(-1, 4, 60)
    loss, grad = softmax_cross_entropy(logits, labels, ignore_index=-1)
    tz = t(logits, True)
    tl = F.cross_entropy(tz, t(labels), ignore_index=-1)
    tl.backward()
    yield "cross-entropy loss", np.asarray(loss, dtype), tl.detach().numpy(), 2
    yield "cross-entropy gradient", grad, tz.grad.numpy(), 2


def sgd(rng, dtype):
    shape = (40, 30)
    w0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
    fc = Linear(30, 40, rng=rng).astype(dtype)
    fc.weight.data[...] = w0
    opt = SGD([fc.weight], lr=0.1, momentum=0.9, weight_decay=1e-4)
    tw = torch.nn.Parameter(t(w0))
    topt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=1e-4)
    for g in grads:
        fc.weight.grad[...] = g
        opt.step()
        tw.grad = t(g)
        topt.step()
    yield "SGD, 3 steps (momentum, weight decay)", fc.weight.data, tw.detach().numpy(), 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"tinyfrcnn vs torch {torch.__version__}, seed {args.seed}")
    print(f"{'op':48} {'dtype':8} {'elements':>8} {'differ':>7} {'max ulps':>9}  claim")
    failed = 0
    for dtype in DTYPES:
        rng = np.random.default_rng(args.seed)
        for rows in (layers, box_ops, anchor_labels, roi_ops, detections, losses, sgd):
            for name, ours, theirs, allowed in rows(rng, dtype):
                differ, worst = ulps(ours, theirs)
                ok = worst <= allowed
                failed += not ok
                claim = "exact" if allowed == 0 else f"<= {allowed} ulp"
                print(f"{name:48} {np.dtype(dtype).name:8} {np.size(theirs):8d} {differ:7d} {worst:9.1f}  "
                      f"{claim}{'' if ok else '  NOT MET'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
