"""Time a small conv backbone: tinyfrcnn layers vs the naive NumPy reference vs PyTorch.

Backbone: 3x3 convs 3->16->32->64->64 (padding 1), ReLU after each, 2x2 max pools after
the first three; input (8, 3, 128, 128) float32. Rows: forward, forward+backward.

    python benchmarks/bench_layers.py [--threads 2] [--repeats 10]

The naive reference (Python loops over output pixels) is timed on batch 1 and scaled
by the batch size; it has no backward, so that cell is left empty.
"""

import argparse
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    return p.parse_args()


args = parse_args()
os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

import numpy as np  # noqa: E402

from tinyfrcnn.layers import (  # noqa: E402
    Conv2d, MaxPool2d, ReLU, Sequential, _conv2d_reference, _maxpool2d_reference,
)

CHANNELS = [3, 16, 32, 64, 64]


def build(rng):
    layers = []
    for i in range(4):
        layers += [Conv2d(CHANNELS[i], CHANNELS[i + 1], 3, padding=1, rng=rng), ReLU()]
        if i < 3:
            layers.append(MaxPool2d(2))
    return Sequential(*layers)


def best_time(fn, repeats):
    return best_times({"": fn}, repeats)[""]


def best_times(fns, repeats):
    """Best time of each function, taking turns so that load from elsewhere hits all alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def reference_forward(model, x):
    for layer in model:
        if isinstance(layer, Conv2d):
            x = _conv2d_reference(x, layer.weight.data, layer.bias.data, layer.stride, layer.padding)
        elif isinstance(layer, ReLU):
            x = np.maximum(x, 0)
        else:
            x = _maxpool2d_reference(x, layer.kernel_size, layer.stride)
    return x


def main():
    rng = np.random.default_rng(0)
    model = build(rng)
    x = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

    def ours_fwd():
        return model(x)

    def ours_fwd_bwd():
        out = model(x)
        model.backward(np.ones_like(out))

    rows = {"forward": {}, "forward+backward": {}}
    fns = {("forward", "tinyfrcnn"): ours_fwd, ("forward+backward", "tinyfrcnn"): ours_fwd_bwd}

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        tm = []
        for layer in model:
            if isinstance(layer, Conv2d):
                c = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
                with torch.no_grad():
                    c.weight.copy_(torch.from_numpy(layer.weight.data))
                    c.bias.copy_(torch.from_numpy(layer.bias.data))
                tm.append(c)
            elif isinstance(layer, ReLU):
                tm.append(torch.nn.ReLU())
            else:
                tm.append(torch.nn.MaxPool2d(2))
        tmodel = torch.nn.Sequential(*tm)
        tx = torch.from_numpy(x)
        out = tmodel(tx).detach().numpy()
        ours = model(x)
        err = float(np.abs(out - ours).max() / max(np.abs(out).max(), 1e-12))

        def torch_fwd():
            with torch.no_grad():
                tmodel(tx)

        def torch_fwd_bwd():
            txg = tx.clone().requires_grad_()
            out = tmodel(txg)
            out.backward(torch.ones_like(out))

        fns[("forward", "torch")] = torch_fwd
        fns[("forward+backward", "torch")] = torch_fwd_bwd

    for (row, col), t in best_times(fns, args.repeats).items():
        rows[row][col] = t
    rows["forward"]["reference"] = best_time(lambda: reference_forward(model, x[:1]), 1) * args.batch

    import numba

    print(f"conv backbone 3->16->32->64->64, input ({args.batch}, 3, {args.size}, {args.size}) float32, "
          f"{args.threads} threads (numba {numba.get_num_threads()}), best of {args.repeats} (taking turns)")
    if torch is not None:
        print(f"torch {torch.__version__}; max relative difference of outputs: {err:.1e}")
    print("reference: naive NumPy loops, timed on batch 1 and scaled by the batch size; forward only")
    header = f"{'':18s} {'tinyfrcnn ms':>13s} {'reference ms':>13s} {'torch ms':>10s} {'tinyfrcnn/torch':>16s} {'reference/tinyfrcnn':>20s}"
    print(header)
    for name, r in rows.items():
        ours = r["tinyfrcnn"] * 1e3
        ref = f"{r['reference'] * 1e3:13.1f}" if "reference" in r else f"{'-':>13s}"
        tt = f"{r['torch'] * 1e3:10.1f}" if "torch" in r else f"{'-':>10s}"
        ratio = f"{r['tinyfrcnn'] / r['torch']:16.2f}" if "torch" in r else f"{'-':>16s}"
        speed = f"{r['reference'] / r['tinyfrcnn']:20.1f}" if "reference" in r else f"{'-':>20s}"
        print(f"{name:18s} {ours:13.1f} {ref} {tt} {ratio} {speed}")


if __name__ == "__main__":
    sys.exit(main())
