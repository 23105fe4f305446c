"""RoI max pooling and RoIAlign: tinyfrcnn vs the NumPy reference vs torchvision.

Features (1, 512, 38, 63) at spatial_scale 1/16 (a 600 x 1000 image through VGG16's
conv5), 7 x 7 output, 128 and 300 random RoIs inside the image.

    python benchmarks/bench_roi.py [--threads 2] [--repeat 7] [--cuda]

``--cuda`` times the numba-cuda kernels against torchvision's CUDA ops instead.
"""

import argparse
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--cuda", action="store_true", help="compare the CUDA kernels (needs an NVIDIA GPU)")
    return p.parse_args()


ARGS = parse()
os.environ["NUMBA_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

from tinyfrcnn import roi  # noqa: E402

try:
    import torch
    import torchvision.ops as tv_ops

    torch.set_num_threads(ARGS.threads)
except ImportError:
    torch = None

SCALE = 1 / 16
OUT = 7


def random_rois(rng, n, height=600, width=1000):
    x = np.sort(rng.uniform(0, width, (n, 2)), axis=1)  # (n, 2)
    y = np.sort(rng.uniform(0, height, (n, 2)), axis=1)  # (n, 2)
    return np.column_stack([np.zeros(n), x[:, 0], y[:, 0], x[:, 1], y[:, 1]]).astype(np.float32)  # (n, 5)


def interleaved_times(fns, repeat, sync=lambda: None):
    """Best wall time of each function, timed in turn so that machine noise hits all alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    sync()
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def cases(features, rois, grad):
    """name -> (tinyfrcnn fn, reference fn or None, torch fn maker or None)."""
    def pool_fb():
        out, argmax = roi.roi_pool(features, rois, OUT, SCALE)
        return roi.roi_pool_backward(grad, argmax, features.shape)

    def align_fb():
        roi.roi_align(features, rois, OUT, SCALE, -1, True)
        return roi.roi_align_backward(grad, rois, features.shape, SCALE, -1, True)

    table = {
        "roi_pool forward": (lambda: roi.roi_pool(features, rois, OUT, SCALE),
                             lambda: roi._roi_pool_reference(features, rois, OUT, SCALE)),
        "roi_pool fwd+bwd": (pool_fb, None),
        "roi_align forward": (lambda: roi.roi_align(features, rois, OUT, SCALE, -1, True),
                              lambda: roi._roi_align_reference(features, rois, OUT, SCALE, -1, True)),
        "roi_align fwd+bwd": (align_fb, None),
    }
    return table


def torch_cases(features, rois, grad, device):
    f = torch.tensor(features, device=device)
    r = torch.tensor(rois, device=device)
    g = torch.tensor(grad, device=device)
    fg = f.clone().requires_grad_(True)

    def pool_fb():
        fg.grad = None
        tv_ops.roi_pool(fg, r, OUT, SCALE).backward(g)

    def align_fb():
        fg.grad = None
        tv_ops.roi_align(fg, r, OUT, SCALE, -1, True).backward(g)

    return {
        "roi_pool forward": lambda: tv_ops.roi_pool(f, r, OUT, SCALE),
        "roi_pool fwd+bwd": pool_fb,
        "roi_align forward": lambda: tv_ops.roi_align(f, r, OUT, SCALE, -1, True),
        "roi_align fwd+bwd": align_fb,
    }


def main():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 512, 38, 63)).astype(np.float32)  # (N, C, H, W)
    rows = []
    if ARGS.cuda:
        from tinyfrcnn.device import cuda_available

        if not cuda_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            sys.exit("bench_roi --cuda needs an NVIDIA GPU that numba can use (none found; "
                     "the simulator is not worth timing)")
        from numba import cuda

        if torch is None or not torch.cuda.is_available():
            print("torch with CUDA not available: timing tinyfrcnn only")

        def sync():
            cuda.synchronize()
            if torch is not None and torch.cuda.is_available():
                torch.cuda.synchronize()
        for n in (128, 300):
            rois = random_rois(rng, n)
            grad = rng.standard_normal((n, 512, OUT, OUT)).astype(np.float32)
            d_f, d_r, d_g = cuda.to_device(features), cuda.to_device(rois), cuda.to_device(grad)
            ours = {name: fn for name, (fn, _) in cases(d_f, d_r, d_g).items()}
            theirs = torch_cases(features, rois, grad, "cuda") if torch is not None and torch.cuda.is_available() else {}
            for name, fn in ours.items():
                if name in theirs:
                    t_ours, t_tv = interleaved_times([fn, theirs[name]], ARGS.repeat, sync)
                else:
                    (t_ours,), t_tv = interleaved_times([fn], ARGS.repeat, sync), None
                rows.append((f"{name} R={n}", t_ours, None, t_tv))
        header = "CUDA"
    else:
        for n in (128, 300):
            rois = random_rois(rng, n)
            grad = rng.standard_normal((n, 512, OUT, OUT)).astype(np.float32)
            theirs = torch_cases(features, rois, grad, "cpu") if torch is not None else {}
            for name, (fn, ref) in cases(features, rois, grad).items():
                if name in theirs:
                    t_ours, t_tv = interleaved_times([fn, theirs[name]], ARGS.repeat)
                else:
                    (t_ours,), t_tv = interleaved_times([fn], ARGS.repeat), None
                t_ref = interleaved_times([ref], 1)[0] if ref is not None else None
                rows.append((f"{name} R={n}", t_ours, t_ref, t_tv))
        header = f"CPU, {ARGS.threads} threads"

    def ms(t):
        return f"{t * 1e3:9.2f}" if t is not None else "        -"

    def ratio(a, b):
        return f"{a / b:8.2f}x" if a is not None and b is not None else "        -"

    print(f"RoI ops, features (1, 512, 38, 63) float32, {OUT}x{OUT} output, {header}; best of {ARGS.repeat}")
    print(f"{'op':<26}{'tinyfrcnn ms':>13}{'reference ms':>13}{'torchvision ms':>15}{'ref/ours':>10}{'ours/tv':>10}")
    for name, t_ours, t_ref, t_tv in rows:
        print(f"{name:<26}{ms(t_ours):>13}{ms(t_ref):>13}{ms(t_tv):>15}{ratio(t_ref, t_ours):>10}{ratio(t_ours, t_tv):>10}")


if __name__ == "__main__":
    main()
