"""Training throughput of the detector on the CPU, with a breakdown by stage.

    python benchmarks/bench_train.py [--batch-size 4] [--steps 20] [--threads 2]

Times full SGD steps (data generation, forward, losses, backward, update) with the
default configuration at 128x128, after warm-up steps that compile the kernels, and
then each stage on its own on one batch, so that the table shows where a step's time
goes.
"""

import argparse
import os
import time


# Stages that run on the host whatever the device: targets, proposals and losses.
HOST_STAGES = ("anchor targets + sampling", "proposal layer (decode, NMS)", "proposal sampling", "losses (RPN + head)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))

    import tinyfrcnn  # noqa: F401  (sets one OpenBLAS thread before NumPy loads, as the CLI does)
    import numpy as np

    from tinyfrcnn.boxes import _check_weights
    from tinyfrcnn.head import head_loss
    from tinyfrcnn.losses import _smooth_l1_beta
    from tinyfrcnn.rpn import _proposals_batch, _rpn_loss_batch
    from tinyfrcnn.targets import (HEAD_BOX_WEIGHTS, _anchor_targets_batch, _anchors_inside, _gather_proposals,
                                   _label_candidates, _pick, _proposal_candidates, _sampled_labels)
    from tinyfrcnn.train import Trainer, TrainConfig

    cfg = TrainConfig(batch_size=args.batch_size, steps=10**6, val_images=0, warmup_steps=0)
    trainer = Trainer(train_config=cfg)
    for _ in range(args.warmup):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    per_step = (time.perf_counter() - start) / args.steps

    model, mc = trainer.model, trainer.model.config
    images, boxes, labels = trainer.data.batch(list(range(args.batch_size)))
    rng = np.random.default_rng(0)

    def timed(fn, repeat=5):
        fn()
        t = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        return (time.perf_counter() - t) / repeat, out

    rows = []
    t, _ = timed(lambda: trainer.data.batch(list(range(args.batch_size))))
    rows.append(("generate the batch", t))
    t, feats = timed(lambda: model.backbone.forward(images))
    rows.append(("backbone forward", t))
    t, (logits, deltas) = timed(lambda: model.rpn.forward(feats))
    rows.append(("RPN head forward", t))
    anchors = model.anchors_for(*feats.shape[2:])
    border = None if mc.rpn_allowed_border < 0 else mc.rpn_allowed_border
    # The host stages as FasterRCNN.forward runs them: its arguments checked once, then
    # the unchecked cores, batched where the model batches them.
    gt = [np.asarray(b, np.float32) for b in boxes]
    inside = _anchors_inside(anchors, images.shape[2:], border)
    unit = _check_weights((1.0,) * 4, "bench_train", np.result_type(anchors.dtype, np.float32))
    head_weights = _check_weights(HEAD_BOX_WEIGHTS, "bench_train", np.dtype(np.float32))

    def targets():
        labels_a, _, reg = _anchor_targets_batch(anchors, gt, mc.rpn_pos_iou, mc.rpn_neg_iou, inside, unit)
        positive, negative = _label_candidates(labels_a)
        picks = [_pick(p, q, mc.rpn_batch, mc.rpn_pos_fraction, rng) for p, q in zip(positive, negative)]
        return _sampled_labels(labels_a.shape, picks), reg
    t, (sampled, reg_targets) = timed(targets)
    rows.append(("anchor targets + sampling", t))

    def proposals():
        return [p for p, _ in _proposals_batch(logits, deltas, anchors.astype(deltas.dtype, copy=False),
                                               *images.shape[2:], mc.rpn_pre_nms_train, mc.rpn_post_nms_train,
                                               mc.rpn_nms, mc.rpn_min_size)]
    t, props = timed(proposals)
    rows.append(("proposal layer (decode, NMS)", t))

    def roi_sampling():
        candidates = _proposal_candidates(props, gt, mc.fg_iou, mc.bg_iou[0], mc.bg_iou[1])
        picks = [_pick(fg, bg, mc.roi_batch, mc.fg_fraction, rng) for fg, bg in zip(candidates["fg"], candidates["bg"])]
        s = _gather_proposals(candidates, picks, labels, head_weights)
        image = np.repeat(np.arange(len(images)), s["counts"]).astype(np.float32)  # (R,)
        return np.concatenate([image[:, None], s["rois"]], axis=1).astype(np.float32)  # (R, 5)
    t, rois = timed(roi_sampling)
    rows.append(("proposal sampling", t))
    t, (cls_logits, box_deltas) = timed(lambda: model.head.forward(feats, rois))
    rows.append(("head forward (RoI pool + fc)", t))
    roi_labels = rng.integers(0, mc.num_classes + 1, len(rois))
    roi_targets = rng.normal(0, 1, (len(rois), 4)).astype(np.float32)

    def losses():
        _rpn_loss_batch(logits, deltas, sampled, reg_targets.astype(deltas.dtype), _smooth_l1_beta(mc.rpn_sigma, "bench_train"), 1.0)
        head_loss(cls_logits, box_deltas, roi_labels, roi_targets, sigma=mc.head_sigma)
    rows.append(("losses (RPN + head)", timed(losses)[0]))
    rows.append(("head backward", timed(lambda: model.head.backward(np.ones_like(cls_logits), np.ones_like(box_deltas)))[0]))
    rows.append(("RPN head backward", timed(lambda: model.rpn.backward(np.ones_like(logits), np.ones_like(deltas)))[0]))
    rows.append(("backbone backward", timed(lambda: model.backbone.backward(np.ones_like(feats)))[0]))

    print(f"threads: {args.threads}   batch: {args.batch_size} images of 128x128   pooling: {mc.pooling}")
    print(f"full SGD step: {per_step * 1000:8.1f} ms   throughput: {args.batch_size / per_step:6.1f} images/s")
    print()
    print(f"{'stage (one batch, measured alone)':36s} {'ms':>8s} {'share':>7s}")
    total = sum(t for _, t in rows)
    for name, t in rows:
        print(f"{name:36s} {t * 1000:8.1f} {t / total:7.1%}")
    print(f"{'sum of stages':36s} {total * 1000:8.1f}")
    host = sum(t for name, t in rows if name in HOST_STAGES)
    print(f"\nhost stages (on the host with --device cuda too): {host * 1000:.1f} ms per step "
          f"({host / per_step:.1%} of the CPU step)")


if __name__ == "__main__":
    main()
