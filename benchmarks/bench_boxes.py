"""Time box_iou and nms: tinyfrcnn vs its NumPy reference vs torchvision.

    python benchmarks/bench_boxes.py [--threads 2] [--repeats 7]
    python benchmarks/bench_boxes.py --cuda      # CUDA kernels vs torchvision's CUDA ops

Inputs (float32): box_iou on 20000 x 2000 random boxes; nms at IoU 0.7 on 6000 random
boxes in a 1000 x 1000 image and on 6000 clustered boxes (20 objects x 300 jittered
copies); ``--cuda`` uses 12000 boxes for nms (py-faster-rcnn's pre-NMS count in
training). Each cell is the fastest of ``--repeats`` runs (a third as many for the slow
NumPy reference) after a warm-up (the machine is shared; the minimum is the least noisy
estimate). The NumPy reference of box_iou runs on the first 2000 rows and is scaled by
10 (its (N, M, 2) temporaries are large). torchvision columns appear only when torch is
importable; tinyfrcnn and torch get the same thread count, and every row then checks
that tinyfrcnn's answers equal torchvision's (tests/ compares them with the references).
"""

import argparse
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cuda", action="store_true", help="time the CUDA kernels against torchvision on the GPU")
    return p.parse_args()


args = parse_args()
os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import numpy as np  # noqa: E402

from tinyfrcnn.boxes import _box_iou_reference, box_iou  # noqa: E402
from tinyfrcnn.nms import _nms_reference, nms  # noqa: E402

try:
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
except ImportError:
    torch = torchvision = None


def best_ms(fn, repeats, sync=lambda: None):
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def make_inputs(seed=0, n_nms=6000):
    rng = np.random.default_rng(seed)

    def random_boxes(n, image=1000.0):
        xy = rng.uniform(0, image, (n, 2))
        wh = rng.uniform(16, 128, (n, 2))
        return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)  # (n, 4)

    copies = n_nms // 20
    objects = random_boxes(20, 800)
    sides = np.repeat(objects[:, 2:] - objects[:, :2], copies, axis=0)  # (n_nms, 2)
    clustered = np.repeat(objects, copies, axis=0) + rng.normal(0, 0.08, (20 * copies, 4)) * np.tile(sides, 2)
    clustered[:, 2:] = np.maximum(clustered[:, 2:], clustered[:, :2] + 1)
    return {
        "iou_a": random_boxes(20000), "iou_b": random_boxes(2000),
        "nms random": (random_boxes(n_nms), rng.random(n_nms).astype(np.float32)),
        "nms clustered": (clustered.astype(np.float32), rng.random(20 * copies).astype(np.float32)),
    }


def table(rows, headers):
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def fmt(ms):
    return "" if ms is None else f"{ms:.2f}"


def ratio(a, b):
    return "" if a is None or b is None else f"{a / b:.2f}x"


def cpu(inputs):
    rows = []
    a, b = inputs["iou_a"], inputs["iou_b"]
    ours = best_ms(lambda: box_iou(a, b), args.repeats)
    ref = 10 * best_ms(lambda: _box_iou_reference(a[:2000], b), max(1, args.repeats // 3))
    tv = None
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tv = best_ms(lambda: torchvision.ops.box_iou(ta, tb), args.repeats)
        assert np.array_equal(box_iou(a[:500], b), torchvision.ops.box_iou(ta[:500], tb).numpy())
    rows.append(["box_iou 20000x2000", fmt(ours), fmt(ref), fmt(tv), ratio(ours, ref), ratio(ours, tv)])
    for name in ("nms random", "nms clustered"):
        boxes, scores = inputs[name]
        keep = nms(boxes, scores, 0.7)
        ours = best_ms(lambda: nms(boxes, scores, 0.7), args.repeats)
        ref = best_ms(lambda: _nms_reference(boxes, scores, 0.7), max(1, args.repeats // 3))
        tv = None
        if torch is not None:
            tboxes, tscores = torch.from_numpy(boxes), torch.from_numpy(scores)
            tv = best_ms(lambda: torchvision.ops.nms(tboxes, tscores, 0.7), args.repeats)
            assert np.array_equal(keep, torchvision.ops.nms(tboxes, tscores, 0.7).numpy())
        label = f"{name} 6000 (kept {len(keep)})"
        rows.append([label, fmt(ours), fmt(ref), fmt(tv), ratio(ours, ref), ratio(ours, tv)])
    print(f"CPU, {args.threads} threads, float32, best of {args.repeats} runs, times in ms")
    table(rows, ["op", "tinyfrcnn", "numpy ref", "torchvision", "vs ref", "vs torchvision"])


def gpu(inputs):
    from numba import cuda

    try:
        have_gpu = cuda.is_available() and not os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    except Exception:
        have_gpu = False
    if not have_gpu:
        print("--cuda: numba finds no GPU here (or the simulator is on); nothing to time.")
        return
    if torch is None or not torch.cuda.is_available():
        print("--cuda: torch with CUDA is not importable here; nothing to compare against.")
        return

    def sync():
        cuda.synchronize()
        torch.cuda.synchronize()

    rows = []
    a, b = inputs["iou_a"], inputs["iou_b"]
    da, db = cuda.to_device(a), cuda.to_device(b)
    ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
    ours = best_ms(lambda: box_iou(da, db), args.repeats, sync)
    tv = best_ms(lambda: torchvision.ops.box_iou(ta, tb), args.repeats, sync)
    diff = np.abs(box_iou(da, db).copy_to_host() - torchvision.ops.box_iou(ta, tb).cpu().numpy()).max()
    rows.append(["box_iou 20000x2000", fmt(ours), fmt(tv), ratio(ours, tv), f"max |diff| {diff:.1e}"])
    for name in ("nms random", "nms clustered"):
        boxes, scores = inputs[name]
        dboxes, dscores = cuda.to_device(boxes), cuda.to_device(scores)
        tboxes, tscores = torch.from_numpy(boxes).cuda(), torch.from_numpy(scores).cuda()
        ours = best_ms(lambda: nms(dboxes, dscores, 0.7), args.repeats, sync)
        tv = best_ms(lambda: torchvision.ops.nms(tboxes, tscores, 0.7), args.repeats, sync)
        keep = nms(dboxes, dscores, 0.7).copy_to_host()
        same = np.array_equal(keep, nms(boxes, scores, 0.7))
        same_tv = np.array_equal(keep, torchvision.ops.nms(tboxes, tscores, 0.7).cpu().numpy())
        rows.append([f"{name} {len(boxes)} (kept {len(keep)})", fmt(ours), fmt(tv), ratio(ours, tv),
                     f"same as CPU: {same}, as torchvision: {same_tv}"])
    name = cuda.get_current_device().name
    name = name.decode() if isinstance(name, bytes) else name
    print(f"CUDA ({name}), float32, best of {args.repeats} runs, times in ms "
          "(tinyfrcnn's nms includes its input checks and score sort on the host)")
    table(rows, ["op", "tinyfrcnn", "torchvision", "ratio", "check"])


if __name__ == "__main__":
    inputs = make_inputs(n_nms=12000 if args.cuda else 6000)
    if args.cuda:
        gpu(inputs)
    else:
        cpu(inputs)
    sys.stdout.flush()
