"""tinyfrcnn's CUDA kernels for the ops torch/torchvision also have (nms, RoI pooling,
box_iou, the matrix multiply) against those CUDA ops, and a whole training step on the
GPU against the same step on the CPU.

    python benchmarks/bench_gpu.py                # on a machine with an NVIDIA GPU
    python benchmarks/bench_gpu.py --simulate     # tiny inputs in numba's simulator
    python benchmarks/bench_gpu.py --json results.json
    python benchmarks/bench_gpu.py --only train,nms   # some of the benchmarks

Each row runs tinyfrcnn's public function on device arrays (the matmul rows call the
launchers, to compare tilings; the default tiling is checked against ``matmul``) and the
torch op on the same numbers, times both (median of several runs after warm-up,
synchronising the device around each run), and checks the answers against each other.
tinyfrcnn's times include its host-side work (input validation, and for nms the score
sort; the pass over the masks runs on the GPU), since that is what a caller waits for.
torch's matrix products run with TF32 off, so both sides do float32 arithmetic.

``--simulate`` runs the same code paths on tiny inputs in numba's CUDA simulator and
checks them against tinyfrcnn's CPU path instead of torch (the times mean nothing
there). Without a GPU and without ``--simulate`` the script says so and exits 0 (1 with
``--json``: the results file asked for cannot be written). Rows are
printed as they are measured and ``--json`` is rewritten (whole, via a temporary file)
after each row, so a run cut short keeps what it measured; a benchmark that raises adds
an ERROR row and the others still run.
numba-cuda 0.30 needs NumPy below 2.5 (it calls ``np.row_stack``): install
``numpy<2.5`` beside torch if importing numba.cuda fails with that error.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback

# The train step's CPU baseline is the project's 2-core setting: 2 Numba threads and
# one OpenBLAS thread, which tinyfrcnn sets only if NumPy is not loaded yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simulate", action="store_true", help="tiny inputs in numba's CUDA simulator, no torch")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per op (median reported)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated benchmarks to run, of {','.join(BENCHMARKS)} (default: all, in that order)")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown or not args.only:
        p.error(f"--only takes names from {','.join(BENCHMARKS)}, got {unknown or 'none'}")
    return args


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def median_ms(fn, sync, warmup, repeats):
    """Median wall time of ``fn()`` in ms, with ``sync()`` before and after each run."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


class Bench:
    """Sizes, timers and the baseline (torch on CUDA, or tinyfrcnn's CPU path)."""

    def __init__(self, simulate, repeats, json_path=None):
        import numpy as np
        from numba import cuda

        self.np = np
        self.cuda = cuda
        self.sim = simulate
        self.json_path = json_path
        self.header = ""
        self.warmup = 1 if simulate else 3
        self.repeats = repeats or (1 if simulate else 15)
        self.rows = []
        self.torch = self.tv = None
        if not simulate:
            import torch
            import torchvision

            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            self.torch, self.tv = torch, torchvision
        self.baseline = "tinyfrcnn CPU (simulator run: times mean nothing)" if simulate else "torch/torchvision CUDA"

    def sync_ours(self):
        self.cuda.synchronize()

    def sync_base(self):
        if self.torch is not None:
            self.torch.cuda.synchronize()

    def time_ours(self, fn, repeats=None):
        return median_ms(fn, self.sync_ours, self.warmup, repeats or self.repeats)

    def time_base(self, fn, repeats=None):
        return median_ms(fn, self.sync_base, self.warmup, repeats or self.repeats)

    def kernel_note(self, fn):
        """Of one call of ``fn``, the GPU time of its kernels (CUDA events around each
        launch): what the op's time is besides its host work (checks, copies, allocation)."""
        try:
            ms, launches = kernel_times(self.cuda, fn, self.repeats)
        except Exception as e:  # a note must not cost the row
            return f"kernel times failed: {type(e).__name__}: {e}"
        if self.sim:  # the simulator records no times
            return ""
        parts = ", ".join(f"{k} {v / self.repeats:.3f}" for k, v in ms.most_common())
        return f"ours: kernels {sum(ms.values()) / self.repeats:.3f} ms per call ({parts}), the rest host work"

    def tensor(self, x):
        return self.torch.from_numpy(x).cuda()

    def host(self, x):
        if self.torch is not None and isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        from tinyfrcnn.device import to_host

        return to_host(x)

    def add(self, name, size, ours_ms, base_ms, check, target="", note="", met=None):
        self.rows.append(dict(op=name, size=size, ours_ms=ours_ms, base_ms=base_ms, check=check,
                              target=target, met=None if self.sim else met, note=note))
        print(f"{name} ({size}): {fmt_ms(ours_ms)} ms vs {fmt_ms(base_ms)} ms, {check}", flush=True)
        self.save()

    def fail(self, name, exc):
        self.rows.append(dict(op=name, size="", ours_ms=None, base_ms=None, check="ERROR",
                              target="", met=None, note=f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        self.save()

    def save(self):
        """Rewrite the JSON file (if any) with every row so far; a kill mid-write leaves the
        previous version whole."""
        if not self.json_path:
            return
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(header=self.header, baseline=self.baseline, repeats=self.repeats, rows=self.rows),
                      f, indent=1)
        os.replace(tmp, self.json_path)


def max_abs_diff(np, a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    return f"{np.abs(a - b).max(initial=0.0):.2e}"


def within(ours_ms, base_ms, factor):
    return ours_ms <= factor * base_ms


# ---------------------------------------------------------------- inputs

def random_boxes(rng, n, width, height, min_size, max_size):
    """(n, 4) float32 boxes inside a width x height image."""
    wh = rng.uniform(min_size, max_size, (n, 2))  # (n, 2)
    x1 = rng.uniform(0, width - wh[:, 0])
    y1 = rng.uniform(0, height - wh[:, 1])
    return np.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], axis=1).astype(np.float32)  # (n, 4)


def clustered_boxes(rng, n, clusters, width, height):
    """(n, 4) float32 boxes jittered around a few centres: many heavy overlaps, like
    the RPN's proposals around real objects."""
    centres = rng.uniform(0.2, 0.8, (clusters, 2)) * (width, height)  # (clusters, 2)
    sizes = rng.uniform(0.05, 0.15, (clusters, 2)) * (width, height)  # (clusters, 2)
    pick = rng.integers(0, clusters, n)
    c = centres[pick] + rng.normal(0, 0.1, (n, 2)) * sizes[pick]  # (n, 2)
    half = 0.5 * sizes[pick] * rng.uniform(0.8, 1.2, (n, 2))  # (n, 2)
    return np.concatenate([c - half, c + half], axis=1).astype(np.float32)  # (n, 4)


# ---------------------------------------------------------------- rows

def bench_nms(B):
    np, cuda = B.np, B.cuda
    from tinyfrcnn.nms import nms

    n = 60 if B.sim else 12000
    rng = np.random.default_rng(0)
    sets = {
        "random": random_boxes(rng, n, 1000, 600, 10, 200),
        "clustered": clustered_boxes(rng, n, 4 if B.sim else 30, 1000, 600),
    }
    for label, boxes in sets.items():
        name = f"nms ({label})"
        try:
            scores = rng.random(n).astype(np.float32)
            db, ds = cuda.to_device(boxes), cuda.to_device(scores)
            keep = B.host(nms(db, ds, 0.7))
            ours = B.time_ours(lambda: nms(db, ds, 0.7))
            if B.sim:
                ref = nms(boxes, scores, 0.7)
                base = B.time_base(lambda: nms(boxes, scores, 0.7))
            else:
                tb, ts = B.tensor(boxes), B.tensor(scores)
                ref = B.host(B.tv.ops.nms(tb, ts, 0.7))
                base = B.time_base(lambda: B.tv.ops.nms(tb, ts, 0.7))
            same = np.array_equal(np.asarray(keep), np.asarray(ref))
            check = f"same {len(ref)} kept" if same else f"DIFFER: {len(keep)} vs {len(ref)} kept"
            B.add(name, f"{n} boxes, iou 0.7", ours, base, check, "<= 2x", met=within(ours, base, 2),
                  note=B.kernel_note(lambda: nms(db, ds, 0.7)))
        except Exception as e:  # one row's failure must not stop the table
            B.fail(name, e)


def roi_inputs(B):
    np = B.np
    rng = np.random.default_rng(1)
    if B.sim:
        shape, n_rois, scale = (1, 3, 6, 8), 4, 1 / 4
    else:
        shape, n_rois, scale = (1, 512, 38, 63), 300, 1 / 16
    features = rng.standard_normal(shape).astype(np.float32)  # (N, C, H, W)
    height, width = shape[2] / scale, shape[3] / scale
    boxes = random_boxes(rng, n_rois, width, height, 0.05 * width, 0.6 * min(width, height))
    rois = np.concatenate([np.zeros((n_rois, 1), np.float32), boxes], axis=1)  # (R, 5)
    size = f"{n_rois} RoIs on {shape}, 1/{int(round(1 / scale))}, 7x7"
    return features, rois, scale, size


def bench_roi(B):
    np, cuda = B.np, B.cuda
    from tinyfrcnn import roi

    features, rois, scale, size = roi_inputs(B)
    df, dr = cuda.to_device(features), cuda.to_device(rois)
    grad = np.random.default_rng(2).standard_normal((rois.shape[0], features.shape[1], 7, 7)).astype(np.float32)
    dgrad = cuda.to_device(grad)
    if not B.sim:
        tf, tr, tg = B.tensor(features), B.tensor(rois), B.tensor(grad)
        tfg = tf.clone().requires_grad_(True)
    argmax = None

    name = "roi_pool forward"
    try:
        out, argmax = roi.roi_pool(df, dr, 7, scale)
        ours = B.time_ours(lambda: roi.roi_pool(df, dr, 7, scale))
        if B.sim:
            ref, _ = roi.roi_pool(features, rois, 7, scale)
            base = B.time_base(lambda: roi.roi_pool(features, rois, 7, scale))
        else:
            ref = B.host(B.tv.ops.roi_pool(tf, tr, 7, scale))
            base = B.time_base(lambda: B.tv.ops.roi_pool(tf, tr, 7, scale))
        B.add(name, size, ours, base, max_abs_diff(np, B.host(out), ref), "<= 2x", met=within(ours, base, 2),
              note=B.kernel_note(lambda: roi.roi_pool(df, dr, 7, scale)))
    except Exception as e:
        B.fail(name, e)

    name = "roi_pool backward"
    try:
        if argmax is None:
            raise RuntimeError("roi_pool forward failed, so there is no argmax")
        got = roi.roi_pool_backward(dgrad, argmax, features.shape)
        ours = B.time_ours(lambda: roi.roi_pool_backward(dgrad, argmax, features.shape))
        if B.sim:
            _, host_argmax = roi.roi_pool(features, rois, 7, scale)
            ref = roi.roi_pool_backward(grad, host_argmax, features.shape)
            base = B.time_base(lambda: roi.roi_pool_backward(grad, host_argmax, features.shape))
        else:
            tout = B.tv.ops.roi_pool(tfg, tr, 7, scale)
            ref = B.host(B.torch.autograd.grad(tout, tfg, tg, retain_graph=True)[0])
            base = B.time_base(lambda: B.torch.autograd.grad(tout, tfg, tg, retain_graph=True))
        B.add(name, size, ours, base, max_abs_diff(np, B.host(got), ref), "<= 2x", met=within(ours, base, 2),
              note=B.kernel_note(lambda: roi.roi_pool_backward(dgrad, argmax, features.shape)))
    except Exception as e:
        B.fail(name, e)

    for direction in ("forward", "backward"):
        name = f"roi_align {direction}"
        try:
            if direction == "forward":
                def ours_fn():
                    return roi.roi_align(df, dr, 7, scale, sampling_ratio=2, aligned=True)
            else:
                def ours_fn():
                    return roi.roi_align_backward(dgrad, dr, features.shape, scale, sampling_ratio=2, aligned=True)
            got = ours_fn()
            ours = B.time_ours(ours_fn)
            if B.sim:
                if direction == "forward":
                    def base_fn():
                        return roi.roi_align(features, rois, 7, scale, sampling_ratio=2, aligned=True)
                else:
                    def base_fn():
                        return roi.roi_align_backward(grad, rois, features.shape, scale, sampling_ratio=2, aligned=True)
            elif direction == "forward":
                def base_fn():
                    return B.tv.ops.roi_align(tf, tr, 7, scale, sampling_ratio=2, aligned=True)
            else:
                talign = B.tv.ops.roi_align(tfg, tr, 7, scale, sampling_ratio=2, aligned=True)

                def base_fn():
                    return B.torch.autograd.grad(talign, tfg, tg, retain_graph=True)[0]
            ref = B.host(base_fn())
            base = B.time_base(base_fn)
            B.add(name, size + ", sampling 2", ours, base, max_abs_diff(np, B.host(got), ref),
                  "<= 2x", met=within(ours, base, 2), note=B.kernel_note(ours_fn))
        except Exception as e:
            B.fail(name, e)


def bench_box_iou(B):
    np, cuda = B.np, B.cuda
    from tinyfrcnn.boxes import box_iou

    name = "box_iou"
    try:
        n, m = (20, 10) if B.sim else (20000, 2000)
        rng = np.random.default_rng(3)
        a = random_boxes(rng, n, 1000, 600, 10, 300)
        b = random_boxes(rng, m, 1000, 600, 10, 300)
        da, db = cuda.to_device(a), cuda.to_device(b)
        got = B.host(box_iou(da, db))
        ours = B.time_ours(lambda: box_iou(da, db))
        if B.sim:
            ref = box_iou(a, b)
            base = B.time_base(lambda: box_iou(a, b))
        else:
            ta, tb = B.tensor(a), B.tensor(b)
            ref = B.host(B.tv.ops.box_iou(ta, tb))
            base = B.time_base(lambda: B.tv.ops.box_iou(ta, tb))
        B.add(name, f"{n} x {m}", ours, base, max_abs_diff(np, got, ref), "<= 1x", met=within(ours, base, 1),
              note=B.kernel_note(lambda: box_iou(da, db)))
    except Exception as e:
        B.fail(name, e)


def bench_bias_grad(B):
    """The bias gradient of the first conv of the train step (batch 8, 128x128): the sum
    of each of its 16 channels' 131072 gradients, against torch's sum over that axis."""
    np, cuda = B.np, B.cuda
    from tinyfrcnn import layers

    name = "bias gradient"
    try:
        o, m = (3, 40) if B.sim else (16, 8 * 128 * 128)
        g = np.random.default_rng(4).standard_normal((o, m)).astype(np.float32)  # (O, N*H*W)
        dg = cuda.to_device(g)
        p = layers.Parameter(np.zeros(o, np.float32)).to("cuda")
        layers._accumulate_bias_grad(p, dg, True)
        got = B.host(p.grad)
        ours = B.time_ours(lambda: layers._accumulate_bias_grad(p, dg, True))
        if B.sim:
            ref = g.sum(axis=1)
            base = B.time_base(lambda: g.sum(axis=1))
        else:
            tg = B.tensor(g)
            ref = B.host(tg.sum(dim=1))
            base = B.time_base(lambda: tg.sum(dim=1))
        B.add(name, f"{o} x {m}", ours, base, max_abs_diff(np, got, ref),
              note="; ".join(filter(None, ["no target; the largest in the step",
                                            B.kernel_note(lambda: layers._accumulate_bias_grad(p, dg, True))])))
    except Exception as e:
        B.fail(name, e)


def bench_matmul(B):
    np, cuda = B.np, B.cuda
    from tinyfrcnn import matmul as mm

    if B.sim:
        cases = [("ragged", 17, 33, 5, False, False, True), ("ragged a^T b^T", 17, 33, 5, True, True, True)]
        alternatives = [mm.Tiling(8, 8, 4, 2, 2)]
    else:
        cases = [
            ("square", 1024, 1024, 1024, False, False, True),
            ("square", 4096, 4096, 4096, False, False, False),
            ("conv fwd W cols", 64, 576, 8192, False, False, True),
            ("conv dW dY cols^T", 64, 8192, 576, False, True, False),
            ("conv dX W^T dY", 576, 64, 8192, True, False, False),
        ]
        alternatives = [mm.Tiling(128, 128, 8, 8, 8), mm.Tiling(128, 64, 8, 8, 4), mm.Tiling(64, 64, 16, 4, 4)]
    tilings = [mm.TILING] + [t for t in alternatives if t != mm.TILING]
    kernels = [(f"tiled {t.bm}x{t.bn}x{t.bk}/{t.tm}x{t.tn}", t, None) for t in tilings]
    rng = np.random.default_rng(4)
    for label, m, k, n, ta, tb, with_naive in cases:
        size = f"{m}x{k} @ {k}x{n}" + (" (a^T)" if ta else "") + (" (b^T)" if tb else "")
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
        flops = 2.0 * m * n * k
        try:
            if B.sim:
                ref = mm.matmul(a, b, ta, tb)
                base = B.time_base(lambda: mm.matmul(a, b, ta, tb))
            else:
                ta_, tb_ = B.tensor(a), B.tensor(b)
                opa = ta_.T if ta else ta_
                opb = tb_.T if tb else tb_
                ref = B.host(B.torch.matmul(opa, opb))
                base = B.time_base(lambda: B.torch.matmul(opa, opb))
        except Exception as e:
            B.fail(f"matmul {label} baseline", e)
            continue
        da, db = cuda.to_device(a), cuda.to_device(b)
        out = cuda.device_array((m, n), dtype=np.float32)  # (M, N)
        variants = list(kernels) + ([("naive", None, None)] if with_naive else [])
        if mm.choose_splits(m, n, k) > 1:
            t = mm.TILING
            variants.append((f"tiled {t.bm}x{t.bn}x{t.bk}/{t.tm}x{t.tn}, no split-K", t, 1))
        for kname, tiling, splits in variants:
            name = f"matmul {kname}"
            try:
                if tiling is None:
                    def run():
                        mm.launch_naive(da, db, out, ta, tb, False)
                else:
                    def run(tiling=tiling, splits=splits):
                        mm.launch_tiled(da, db, out, ta, tb, False, tiling, splits)
                run()
                got = out.copy_to_host()
                if tiling == mm.TILING and splits is None:  # the public function is the default tiling plus validation
                    np.testing.assert_array_equal(B.host(mm.matmul(da, db, ta, tb)), got)
                ours = B.time_ours(run, repeats=min(B.repeats, 5) if tiling is None else None)
                rel = np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30)
                note = (f"{flops / ours / 1e6:.0f} vs {flops / base / 1e6:.0f} GFLOP/s, "
                        f"{100 * base / ours:.0f}% of baseline, rel err {rel:.1e}")
                if not B.sim:
                    kernel = mm._matmul_naive_kernel if tiling is None else mm.tiled_kernel(tiling)
                    note += kernel_resources(kernel)
                    if tiling is not None:
                        note += f", split-K {splits or mm.choose_splits(m, n, k, tiling)}"
                B.add(name, f"{label} {size}", ours, base, max_abs_diff(np, got, ref), "% of torch", note=note)
            except Exception as e:
                B.fail(name, e)


def kernel_resources(kernel):
    """Registers and local (spilled) memory per thread of a compiled kernel, if known."""
    try:
        compiled = list(kernel.overloads.values())[-1]
        return f", {compiled.regs_per_thread} regs, {compiled.local_mem_per_thread} B local"
    except Exception:
        return ""


HOST_STEPS = ("_anchor_targets_batch", "_label_candidates", "_proposal_candidates", "_pick", "_sampled_labels",
              "_gather_proposals", "_rpn_loss_batch", "_proposals_batch", "head_loss")


@contextlib.contextmanager
def timing_host_steps(totals):
    """Time the host-side steps of ``FasterRCNN.forward`` (targets, proposals, losses):
    while active, the time spent in them is added to ``totals["host"]`` (seconds)."""
    import tinyfrcnn.model as model_mod

    originals = {name: getattr(model_mod, name) for name in HOST_STEPS}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals["host"] += time.perf_counter() - t0
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(model_mod, name, timed(fn))
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(model_mod, name, fn)


@contextlib.contextmanager
def timing_downloads(totals):
    """While active, the time ``FasterRCNN.forward`` spends in its downloads (``to_host``:
    the host waits there for the GPU to finish what was queued before) is added to
    ``totals["wait"]`` (seconds)."""
    import tinyfrcnn.model as model_mod

    original = model_mod.to_host

    def timed(x):
        t0 = time.perf_counter()
        try:
            return original(x)
        finally:
            totals["wait"] += time.perf_counter() - t0

    model_mod.to_host = timed
    try:
        yield totals
    finally:
        model_mod.to_host = original


def kernel_times(cuda, step, repeats):
    """GPU time per kernel over ``repeats`` calls of ``step``: a CUDA event recorded before
    and after each launch of ``tinyfrcnn.device.launch``. Returns {kernel name: ms},
    {kernel name: launches}. An upper bound: where the GPU sits idle when a launch is
    recorded, the time to its start counts too. The simulator records no times (-1)."""
    import collections

    from tinyfrcnn import device

    events = []
    call = device.Launcher.__call__

    def timed(self, kernel, grid, block, *args):
        start, end = cuda.event(), cuda.event()
        start.record()
        call(self, kernel, grid, block, *args)
        end.record()
        events.append((getattr(kernel, "py_func", kernel).__name__, start, end))

    device.Launcher.__call__ = timed
    try:
        for _ in range(repeats):
            step()
    finally:
        device.Launcher.__call__ = call
    cuda.synchronize()
    ms, launches = collections.Counter(), collections.Counter()
    for name, start, end in events:
        ms[name] += start.elapsed_time(end)
        launches[name] += 1
    return ms, launches


def bench_train_step(B):
    """One whole training step (forward with losses, backward, SGD update) of FasterRCNN
    on the GPU against the same step on the CPU with 2 Numba threads and one BLAS thread.
    On a GPU: the default ModelConfig at 128x128, batch 8; simulated: a tiny network on
    16x16 images. The check compares the first step's losses of the two devices (same
    weights, seed). Three more rows give parts of the GPU step: the time spent on the
    host in anchor targets, proposals, RoI sampling and the losses (``HOST_STEPS``), the
    step with the buffer pool off, and the time of ``zero_grad`` and the SGD update."""
    name = "train step"
    try:
        import numba

        from tinyfrcnn.device import POOL, launch
        from tinyfrcnn.layers import packed_runs
        from tinyfrcnn.model import FasterRCNN, ModelConfig
        from tinyfrcnn.optim import SGD

        np = B.np
        rng = np.random.default_rng(5)
        if B.sim:
            n, size = 1, 16
            config = ModelConfig(backbone_channels=(2, 2, 4, 4), anchor_sizes=(8, 16), rpn_mid_channels=4,
                                 head_hidden=8, pool_size=2, rpn_batch=8, roi_batch=4, rpn_pre_nms_train=20,
                                 rpn_post_nms_train=6)
        else:
            n, size, config = 8, 128, ModelConfig()
        images = rng.random((n, 3, size, size)).astype(np.float32)  # (N, 3, H, W)
        gt_boxes = [np.array([[0.2 * size, 0.2 * size, 0.7 * size, 0.6 * size]], np.float32) for _ in range(n)]
        gt_labels = [np.array([1], np.int64) for _ in range(n)]

        def make(device):
            model = FasterRCNN(config, rng=np.random.default_rng(0), device=device)
            return model, SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def step(model, optim):
            optim.zero_grad()
            losses = model.forward(images, gt_boxes, gt_labels, rng=np.random.default_rng(0))
            model.backward()
            optim.step()
            return losses

        threads = numba.get_num_threads()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        try:
            gpu_model, gpu_optim = make("cuda")
            cpu_model, cpu_optim = make("cpu")
            first_gpu, first_cpu = step(gpu_model, gpu_optim), step(cpu_model, cpu_optim)
            repeats = 1 if B.sim else 5
            ours = B.time_ours(lambda: step(gpu_model, gpu_optim), repeats=repeats)
            cpu = median_ms(lambda: step(cpu_model, cpu_optim), lambda: None, 1, repeats)
            totals = {"host": 0.0, "wait": 0.0}
            with timing_host_steps(totals), timing_downloads(totals):
                for _ in range(repeats):
                    step(gpu_model, gpu_optim)
            host, wait = (1e3 * totals[k] / repeats for k in ("host", "wait"))
            kernel_ms, kernel_launches = kernel_times(B.cuda, lambda: step(gpu_model, gpu_optim), repeats)
            # the same GPU step with every dropped buffer handed back to the driver
            allocations = POOL.allocations
            ours_again = B.time_ours(lambda: step(gpu_model, gpu_optim), repeats=repeats)
            per_step = (POOL.allocations - allocations) / (B.warmup + repeats)
            POOL.enabled = False
            try:
                unpooled = B.time_ours(lambda: step(gpu_model, gpu_optim), repeats=repeats)
            finally:
                POOL.enabled = True
            # the same GPU step with numba's own launches instead of tinyfrcnn.device.launch's
            ours_third = B.time_ours(lambda: step(gpu_model, gpu_optim), repeats=repeats)
            fast = launch.fast_launches
            step(gpu_model, gpu_optim)
            launches_per_step = launch.fast_launches - fast
            launch.enabled = False
            try:
                numba_launches = B.time_ours(lambda: step(gpu_model, gpu_optim), repeats=repeats)
            finally:
                launch.enabled = True
            # after the timed steps: this applies extra updates to the GPU model
            update = B.time_ours(lambda: (gpu_optim.zero_grad(), gpu_optim.step()), repeats=repeats)
            packed = packed_runs(gpu_optim.params)
            launches = 2 * (len(packed[1]) if packed is not None else len(gpu_optim.params))
        finally:
            numba.set_num_threads(threads)
        diff = max(abs(first_gpu[k] - first_cpu[k]) for k in first_cpu)
        check = f"losses {diff:.2e}" if diff <= 1e-4 * max(1.0, first_cpu["loss"]) else f"DIFFER: losses {diff:.2e}"
        B.add(name, f"{size}x{size}, batch {n}", ours, cpu, check, "<= 0.1x",
              note="baseline column is tinyfrcnn on this machine's CPU (2 Numba threads, 1 BLAS thread); "
                   "step = forward, backward, SGD; target: 10x faster",
              met=within(ours, cpu, 0.1))
        B.add(name + ": host part", f"{size}x{size}, batch {n}", host, ours, "-",
              note="ours: ms of the GPU step spent in the host steps (targets, proposals, losses); "
                   "baseline column: the whole GPU step")
        B.add(name + ": waiting for the GPU", f"{size}x{size}, batch {n}", wait, ours, "-",
              note="ours: ms of the GPU step the host waits in the forward's two downloads (RPN and head "
                   "outputs) for the GPU to get there; baseline column: the whole GPU step")
        top = ", ".join(f"{k} {v / repeats:.3f} ({kernel_launches[k] / repeats:.0f}x)"
                        for k, v in kernel_ms.most_common(6))
        kernels = None if B.sim else sum(kernel_ms.values()) / repeats
        B.add(name + ": kernels", f"{size}x{size}, batch {n}", kernels, ours, "-",
              note=f"ours: GPU ms per step summed over its {sum(kernel_launches.values()) / repeats:.0f} "
                   "launches (CUDA events around each; an upper bound); baseline column: the whole GPU step; "
                   + ("the simulator records no times" if B.sim else f"largest, ms per step: {top}"))
        B.add(name + ": no buffer pool", f"{size}x{size}, batch {n}", unpooled, ours_again, "-",
              note="ours: the GPU step with the pool off (numba's cuMemAlloc/cuMemFree per array); "
                   f"baseline column: the pooled step ({per_step:.1f} driver allocations per pooled step)")
        B.add(name + ": numba's launches", f"{size}x{size}, batch {n}", numba_launches, ours_third, "-",
              note="ours: the GPU step with every kernel started by numba's kernel[grid, block](...); "
                   f"baseline column: by tinyfrcnn.device.launch ({launches_per_step} launches per step)")
        B.add(name + ": zero_grad + SGD", f"{size}x{size}, batch {n}", update, ours, "-",
              note=f"ours: ms of the GPU step in zero_grad and the SGD update ({launches} launches for "
                   f"{len(gpu_optim.params)} parameters); baseline column: the whole GPU step")
    except Exception as e:
        B.fail(name, e)


# ---------------------------------------------------------------- table

def fmt_ms(v):
    return "-" if v is None else f"{v:.3f}"


def print_table(B, header):
    print(header)
    print(f"baseline: {B.baseline}; times are medians of {B.repeats} runs after {B.warmup} warm-up(s), in ms")
    cols = ["op", "size", "tinyfrcnn ms", "baseline ms", "ours/base", "check (max abs diff)", "target", "note"]
    table = []
    for r in B.rows:
        ratio = "-" if not (r["ours_ms"] and r["base_ms"]) else f"{r['ours_ms'] / r['base_ms']:.2f}x"
        target = r["target"] + ("" if r["met"] is None else (" ok" if r["met"] else " MISSED"))
        table.append([r["op"], r["size"], fmt_ms(r["ours_ms"]), fmt_ms(r["base_ms"]), ratio, r["check"],
                      target, r["note"]])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for row in table:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# --only's names, in the default order: the train step first, the figure that matters most
BENCHMARKS = {"train": bench_train_step, "nms": bench_nms, "roi": bench_roi, "box_iou": bench_box_iou,
              "matmul": bench_matmul, "bias": bench_bias_grad}


def main(argv=None):
    args = parse_args(argv)
    # numba reads this once, at import: it must be settled before numba is imported.
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if args.simulate else "0"
    sys.path.insert(0, ROOT)
    from numba import cuda

    nothing_done = 1 if args.json else 0  # asked for a results file that cannot be written

    if not args.simulate and not cuda.is_available():
        print("bench_gpu: numba finds no CUDA GPU here, so there is nothing to time. "
              "Run it on a machine with an NVIDIA GPU, or use --simulate to exercise the "
              "code paths on tiny inputs in numba's simulator.")
        return nothing_done
    if not args.simulate:
        try:
            import torch
            import torchvision  # noqa: F401
        except ImportError:
            print("bench_gpu: torch and torchvision are needed for the comparison "
                  "(pip install torch torchvision in a separate environment).")
            return nothing_done
        if not torch.cuda.is_available():
            print("bench_gpu: numba sees a GPU but torch does not; nothing to compare with.")
            return nothing_done

    import numba

    B = Bench(args.simulate, args.repeats, args.json)
    if args.simulate:
        B.header = "tinyfrcnn CUDA kernels in numba's simulator (tiny inputs, checked against the CPU path)"
    else:
        gpu = cuda.get_current_device().name
        gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
        B.header = (f"tinyfrcnn CUDA kernels vs torch {B.torch.__version__} / torchvision {B.tv.__version__} "
                    f"on {gpu} ({os.cpu_count()} CPU cores); numba {numba.__version__}, "
                    f"numba-cuda {_version('numba-cuda')}, numpy {np.__version__}, Python {platform.python_version()}")
    print(B.header, flush=True)
    B.save()
    t0 = time.perf_counter()
    for name in args.only:
        try:
            BENCHMARKS[name](B)
        except Exception as e:  # a failure outside a benchmark's own guard: record it, go on
            B.fail(name, e)
    print()
    print_table(B, B.header)
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    errors = [r for r in B.rows if r["check"] == "ERROR" or str(r["check"]).startswith("DIFFER")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
