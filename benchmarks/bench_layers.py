"""Time a small conv backbone: tinyfrcnn layers vs the naive NumPy reference vs PyTorch.

Backbone: 3x3 convs 3->16->32->64->64 (padding 1), ReLU after each, 2x2 max pools after
the first three; input (8, 3, 128, 128) float32. Rows: forward, forward+backward. As in
training, the image needs no gradient: the first conv has ``needs_input_grad=False``
and torch's input has ``requires_grad=False``.

    python benchmarks/bench_layers.py [--threads 2] [--blas-threads N] [--repeats 10] [--device cuda]

``--blas-threads`` (default 1, as ``import tinyfrcnn`` sets it) sizes OpenBLAS's pool
apart from Numba's and torch's: after each matrix product OpenBLAS's workers spin
waiting for the next one, and on two cores they compete with every other thread
(tinyfrcnn runs a large product as two halves on two threads of its own).

tinyfrcnn and torch share one OpenMP runtime in this process, started with the
``OMP_WAIT_POLICY=passive`` that ``import tinyfrcnn`` sets, so that Numba's idle
workers sleep while those halves run. torch's convolutions do better with spinning
workers: ``OMP_WAIT_POLICY=active python benchmarks/bench_layers.py`` shows torch at its
best and tinyfrcnn at its worst (on a 2-core AMD EPYC, forward / forward+backward:
torch 9.7 / 15.8 ms instead of 10.8 / 19.6, tinyfrcnn 18.3 / 41.0 instead of 14.4 / 31.3).

``--device cuda`` runs the layers' CUDA kernels on device arrays and torch on the GPU
(each timed call ends with a device synchronisation).

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
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args()


args = parse_args()
os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)

import numpy as np  # noqa: E402

from tinyfrcnn.device import to_host  # noqa: E402
from tinyfrcnn.layers import (  # noqa: E402
    Conv2d, MaxPool2d, ReLU, Sequential, _conv2d_reference, _maxpool2d_reference,
)

CHANNELS = [3, 16, 32, 64, 64]


def build(rng):
    layers = []
    for i in range(4):
        layers += [Conv2d(CHANNELS[i], CHANNELS[i + 1], 3, padding=1, rng=rng, needs_input_grad=i > 0), ReLU()]
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
    gpu = args.device == "cuda"
    sync = lambda: None  # noqa: E731
    if gpu:
        from numba import cuda

        sync = cuda.synchronize
        model.to("cuda")
        xd = cuda.to_device(x)
        ones = cuda.to_device(np.ones(model(xd).shape, np.float32))
    else:
        xd = x
        ones = np.ones_like(model(x))

    def ours_fwd():
        out = model(xd)
        sync()
        return out

    def ours_fwd_bwd():
        model(xd)
        model.backward(ones)
        sync()

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
                    c.weight.copy_(torch.from_numpy(to_host(layer.weight.data)))
                    c.bias.copy_(torch.from_numpy(to_host(layer.bias.data)))
                tm.append(c)
            elif isinstance(layer, ReLU):
                tm.append(torch.nn.ReLU())
            else:
                tm.append(torch.nn.MaxPool2d(2))
        dev = "cuda" if gpu else "cpu"
        tsync = torch.cuda.synchronize if gpu else (lambda: None)
        tmodel = torch.nn.Sequential(*tm).to(dev)
        tx = torch.from_numpy(x).to(dev)
        out = tmodel(tx).detach().cpu().numpy()
        ours = ours_fwd()
        ours = ours.copy_to_host() if gpu else ours
        err = float(np.abs(out - ours).max() / max(np.abs(out).max(), 1e-12))

        def torch_fwd():
            with torch.no_grad():
                tmodel(tx)
            tsync()

        def torch_fwd_bwd():
            out = tmodel(tx)
            out.backward(torch.ones_like(out))
            tsync()

        fns[("forward", "torch")] = torch_fwd
        fns[("forward+backward", "torch")] = torch_fwd_bwd

    for (row, col), t in best_times(fns, args.repeats).items():
        rows[row][col] = t
    if not gpu:
        rows["forward"]["reference"] = best_time(lambda: reference_forward(model, x[:1]), 1) * args.batch

    import numba

    blas = args.blas_threads
    where = "CUDA" if gpu else f"{args.threads} threads (numba {numba.get_num_threads()}, OpenBLAS {blas})"
    print(f"conv backbone 3->16->32->64->64, input ({args.batch}, 3, {args.size}, {args.size}) float32, "
          f"{where}, best of {args.repeats} (taking turns)")
    if torch is not None:
        print(f"torch {torch.__version__}; max relative difference of outputs: {err:.1e}")
    if not gpu:
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
