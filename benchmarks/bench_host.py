"""The host's share of a training step: what the CPU does besides the network.

    python benchmarks/bench_host.py [--steps 200] [--batch-size 8]

Two figures, each the median over ``--steps`` steps of the default detector on 128x128
images:

1. ``FasterRCNN.forward`` outside the network, on the CPU: the backbone, RPN head and
   Fast R-CNN head return outputs computed once beforehand, so what is timed is the rest
   of the forward pass, the work that stays on the host with ``device="cuda"`` too:
   argument checks, anchor targets and sampling, the proposal layer, RoI sampling and
   the losses.
2. A whole step on "cuda" in numba's simulator with every kernel launch skipped (a
   child process; the simulator must be chosen before numba is imported): the host's
   Python of a GPU step, its layers' checks and bookkeeping, device arrays and the
   host stages, without the kernels or a real GPU's launch and copy costs. The
   simulator's arrays are slower to handle than numba's real ones, so this bounds the
   real figure from above.

The two need no GPU, so they can be compared across versions on any machine (run
this file from each checkout); the machine is noisy, so alternate and repeat.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch(np, n, size):
    """Random images and one or two boxes per image: (N, 3, H, W), lists of (K, 4), (K,)."""
    rng = np.random.default_rng(5)
    images = rng.random((n, 3, size, size)).astype(np.float32)  # (N, 3, H, W)
    boxes = np.array([[0.2 * size, 0.2 * size, 0.7 * size, 0.6 * size], [10, 12, 40, 50]], np.float32)
    labels = np.array([1, 2], np.int64)
    return images, [boxes[:1 + i % 2] for i in range(n)], [labels[:1 + i % 2] for i in range(n)]


def forward_outside_network(steps, n):
    import numpy as np

    from tinyfrcnn.model import FasterRCNN, ModelConfig

    images, gt_boxes, gt_labels = batch(np, n, 128)
    model = FasterRCNN(ModelConfig(), rng=np.random.default_rng(0))
    feats = model.backbone.forward(images)
    rpn_out = model.rpn.forward(feats)
    head = model.head.forward
    head_out = {}  # the head's outputs by number of RoIs: their values do not matter here

    def cached_head(features, rois):
        if len(rois) not in head_out:
            head_out[len(rois)] = head(features, rois)
        return head_out[len(rois)]

    model.backbone.forward = lambda x: feats
    model.rpn.forward = lambda f: rpn_out
    model.head.forward = cached_head
    times = []
    for i in range(steps + 20):
        t = time.perf_counter()
        model.forward(images, gt_boxes, gt_labels, rng=np.random.default_rng(i % 3))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times[20:]))


def gpu_step_host_python(steps, n):
    """Run in a child with NUMBA_ENABLE_CUDASIM=1: the median host time of a simulated
    GPU step whose kernel launches are skipped, and the launches per step."""
    import numpy as np

    from tinyfrcnn import device
    from tinyfrcnn import model as model_mod
    from tinyfrcnn.model import FasterRCNN, ModelConfig
    from tinyfrcnn.optim import SGD

    launches = [0]

    def skipped(self, kernel, grid, block, *args):
        launches[0] += 1

    type(device.launch).__call__ = skipped
    model_mod._require_finite = lambda *args: None  # the outputs are never computed
    model_mod.to_host = lambda a: np.zeros(a.shape, a.dtype)  # zeros for them instead
    images, gt_boxes, gt_labels = batch(np, n, 128)
    model = FasterRCNN(ModelConfig(), rng=np.random.default_rng(0), device="cuda")
    optim = SGD(model.parameters(), lr=0.001, momentum=0.9)
    times = []
    for i in range(steps + 3):
        if i == 3:
            launches[0] = 0
        t = time.perf_counter()
        optim.zero_grad()
        with np.errstate(all="ignore"):  # losses of zero outputs
            model.forward(images, gt_boxes, gt_labels, rng=np.random.default_rng(i))
        model.backward()
        optim.step()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times[3:])), launches[0] / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--simulated-gpu-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    if args.simulated_gpu_only:
        ms, launches = gpu_step_host_python(max(args.steps // 4, 10), args.batch_size)
        print(f"{ms} {launches}")
        return
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")
    import tinyfrcnn  # noqa: F401  (one OpenBLAS thread, as the CLI)

    forward = forward_outside_network(args.steps, args.batch_size)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--simulated-gpu-only", "--steps",
                            str(args.steps), "--batch-size", str(args.batch_size)],
                           capture_output=True, text=True, env=env, check=True)
    gpu_ms, launches = (float(v) for v in child.stdout.split()[-2:])
    print(f"batch {args.batch_size}, 128x128 images, medians")
    print(f"FasterRCNN.forward outside the network (CPU):            {forward:6.2f} ms")
    print(f"GPU step's host Python (simulator, kernels skipped):   {gpu_ms:6.2f} ms, {launches:.0f} launches")


if __name__ == "__main__":
    main()
