"""Time COCO AP: tinyfrcnn.evaluate.coco_ap vs pycocotools' COCOeval on the same scene.

    python benchmarks/bench_evaluate.py [--images 500] [--repeats 5]

The scene is drawn by tests/test_evaluate.py's ``random_scene`` (seed 50): ``--images``
images of 5 classes with 5 to 15 ground-truth boxes each, 0 to 2 jittered detections per
object (a tenth relabelled) and 80 spurious ones with random scores, about 90 detections
per image, near the 100 a detector keeps (the AP is low; only the work counts here).
COCOeval's column is its ``evaluate`` + ``accumulate``, the part that computes AP (index
building and the printout of ``summarize`` are left out). Each time is the fastest of
``--repeats`` runs (half as many for the slower COCOeval) after a warm-up. The script
first checks that both give the same AP.
"""

import argparse
import contextlib
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_evaluate import cocoeval, random_scene  # noqa: E402

from tinyfrcnn.evaluate import coco_ap  # noqa: E402


def best_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rng = np.random.default_rng(50)
    detections, ground_truths = random_scene(rng, n_images=args.images, n_classes=5, gts_per_image=(5, 15),
                                             extra=(80, 80))
    ours = coco_ap(detections, ground_truths)
    E = cocoeval(detections, ground_truths, ours["class_ids"])
    assert abs(ours["AP"] - E.stats[0]) < 1e-9, (ours["AP"], E.stats[0])

    def pycocotools_ap():
        with contextlib.redirect_stdout(io.StringIO()):
            E.evaluate()
            E.accumulate()

    n_det = sum(len(d["scores"]) for d in detections)
    n_gt = sum(len(g["labels"]) for g in ground_truths)
    t_ours = best_s(lambda: coco_ap(detections, ground_truths), args.repeats)
    t_ref = best_s(pycocotools_ap, max(1, args.repeats // 2))
    print(f"COCO AP on {args.images} images ({n_det} detections, {n_gt} ground-truth boxes, 5 classes): "
          f"AP {ours['AP']:.4f} from both")
    print(f"tinyfrcnn coco_ap        {1e3 * t_ours:8.1f} ms")
    print(f"pycocotools COCOeval     {1e3 * t_ref:8.1f} ms   ({t_ref / t_ours:.1f}x tinyfrcnn's time)")


if __name__ == "__main__":
    main()
