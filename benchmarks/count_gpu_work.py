"""Count what a GPU training step asks of the device, without a GPU.

Runs a few training steps of a tiny FasterRCNN on "cuda" in numba's CUDA simulator and
counts, per step: kernel launches (by kernel), device arrays requested from
``tinyfrcnn.device``'s buffer pool and how many of those a real GPU would have to get
from the driver (the pool's bookkeeping replayed on the simulator's arrays: a buffer
comes back when the last view of it is dropped), and copies between host and device.
Times in the simulator mean nothing; these counts are what a real GPU step pays per
launch, per allocation and per synchronising copy. The simulator runs every CUDA thread
as a Python thread, so this takes a few minutes.

    python benchmarks/count_gpu_work.py [--steps 3] [--batch-size 2] [--schedule-stages]

``--schedule-stages`` also counts the SGD and zero_grad launches of the optimizers of
the 4-step alternating schedule (each trains some of the parameters).
"""

import argparse
import collections
import gc
import os
import sys
import weakref

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from numba.cuda.simulator import kernel as sim_kernel  # noqa: E402
from numba.cuda.simulator.cudadrv import devicearray as sim_array  # noqa: E402

from tinyfrcnn import device  # noqa: E402
from tinyfrcnn.model import FasterRCNN, ModelConfig  # noqa: E402
from tinyfrcnn.optim import SGD  # noqa: E402

TINY = ModelConfig(backbone_channels=(2, 2, 4, 4), anchor_sizes=(8, 16), rpn_mid_channels=4, head_hidden=8,
                   pool_size=2, rpn_batch=8, roi_batch=4, rpn_pre_nms_train=20, rpn_post_nms_train=6)


class Counter:
    """Wraps the simulator's launch, the pool and the copies; ``take()`` returns and
    resets the counts since the last call."""

    def __init__(self):
        self.counts = collections.Counter()
        self.free = collections.Counter()  # size class -> buffers a real pool would hold
        launch = sim_kernel.FakeCUDAKernel.__getitem__
        empty = device.BufferPool.empty
        to_host = sim_array.FakeCUDAArray.copy_to_host
        to_dev = sim_array.FakeCUDAArray.copy_to_device
        counter = self

        def counted_launch(kernel, config):
            counter.counts["launch " + kernel.fn.__name__] += 1
            return launch(kernel, config)

        def counted_empty(pool, shape, dtype):
            a = empty(pool, shape, dtype)
            nbytes = a.size * a.dtype.itemsize
            if nbytes:
                counter._request(a, device.size_class(nbytes))
            return a

        def counted_to_host(a, *args, **kwargs):
            counter.counts["copy device -> host"] += 1
            return to_host(a, *args, **kwargs)

        def counted_to_device(a, *args, **kwargs):
            counter.counts["copy host -> device"] += 1
            return to_dev(a, *args, **kwargs)

        sim_kernel.FakeCUDAKernel.__getitem__ = counted_launch
        device.BufferPool.empty = counted_empty
        sim_array.FakeCUDAArray.copy_to_host = counted_to_host
        sim_array.FakeCUDAArray.copy_to_device = counted_to_device

    def _request(self, a, size):
        self.counts["pool: arrays requested"] += 1
        if self.free[size]:
            self.free[size] -= 1
        else:
            self.counts["pool: from the driver"] += 1
        memory = a._ary.base if a._ary.base is not None else a._ary  # what every view keeps alive
        weakref.finalize(memory, self.free.update, {size: 1})

    def take(self):
        gc.collect()
        counts, self.counts = self.counts, collections.Counter()
        return counts


def summary(counts):
    launches = sum(v for k, v in counts.items() if k.startswith("launch "))
    return (f"{launches:4d} launches, {counts['pool: arrays requested']:3d} arrays "
            f"({counts['pool: from the driver']:2d} from the driver), "
            f"{counts['copy host -> device']:2d} copies to and {counts['copy device -> host']:2d} from the device")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--schedule-stages", action="store_true")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.batch_size
    images = rng.random((n, 3, 16, 16)).astype(np.float32)  # (N, 3, H, W)
    boxes = [np.array([[3, 3, 11, 10]], np.float32)] * n
    labels = [np.array([1])] * n
    counter = Counter()
    model = FasterRCNN(TINY, rng=np.random.default_rng(0), device="cuda")
    optim = SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    counter.take()
    print(f"tiny FasterRCNN on 'cuda' (numba's simulator), batch {n}, 16x16 images, "
          f"{len(model.parameters())} parameter arrays")
    for step in range(args.steps):
        optim.zero_grad()
        model.forward(images, boxes, labels, rng=np.random.default_rng(step))
        model.backward()
        optim.step()
        counts = counter.take()
        print(f"step {step}: {summary(counts)}")
    print("launches per kernel in the last step:")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        if k.startswith("launch "):
            print(f"  {k[7:]:28s} {v}")

    if args.schedule_stages:
        print("zero_grad + one SGD step of the alternating schedule's optimizers:")
        stages = {"1/4 backbone + RPN": model.backbone.parameters() + model.rpn.parameters(),
                  "2/4 backbone + head": model.backbone.parameters() + model.head.parameters(),
                  "3/4 RPN": model.rpn.parameters(), "4/4 head": model.head.parameters()}
        for name, params in stages.items():
            stage_optim = SGD(params, lr=0.01, momentum=0.9)
            counter.take()
            stage_optim.zero_grad()
            stage_optim.step()
            launches = sum(v for k, v in counter.take().items() if k.startswith("launch "))
            print(f"  {name:20s} {len(params):2d} parameter arrays: {launches} launches")


if __name__ == "__main__":
    main()
