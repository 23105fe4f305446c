"""FasterRCNN on numba device arrays: a whole training step, detection and checkpoints
on "cuda" against the CPU path, in numba's simulator on tiny inputs; device errors;
the RPN's anchor-row permutation kernels."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from ptx import assert_compiles_to_ptx

import tinyfrcnn.device
from tinyfrcnn import layers
from tinyfrcnn import matmul as mm
from tinyfrcnn.__main__ import main
from tinyfrcnn.device import is_device_array, to_host
from tinyfrcnn.model import FasterRCNN, ModelConfig
from tinyfrcnn.optim import SGD
from tinyfrcnn.rpn import _to_anchor_rows_reference, from_anchor_rows, to_anchor_rows
from tinyfrcnn.train import TrainConfig, Trainer

# Small enough for the simulator: 16x16 images give a 2x2 feature map (8 anchors each).
TINY = ModelConfig(
    backbone_channels=(2, 2, 4, 4), anchor_sizes=(8, 16), rpn_mid_channels=4, head_hidden=8, pool_size=2,
    rpn_batch=8, roi_batch=4, rpn_pre_nms_train=20, rpn_post_nms_train=6, rpn_pre_nms_test=20,
    rpn_post_nms_test=5,
)


def tiny_inputs():
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 16, 16)).astype(np.float32)  # (N, 3, H, W)
    boxes = [np.array([[2, 3, 10, 12]], np.float32), np.array([[6, 5, 15, 14], [0, 0, 7, 8]], np.float32)]
    labels = [np.array([1]), np.array([2, 3])]
    return images, boxes, labels


def train_step(device, config=TINY):
    """One SGD step from the same weights and seed; returns (model, optim, losses, grads, params)."""
    model = FasterRCNN(config, rng=np.random.default_rng(1), device=device)
    # non-zero biases, so that a wrong bias path shows in the outputs
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            value = np.random.default_rng(2).normal(0.0, 0.05, p.shape).astype(np.float32)
            p.data = cuda.to_device(value) if device == "cuda" else value
    optim = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    optim.zero_grad()
    images, boxes, labels = tiny_inputs()
    losses = model.forward(images, boxes, labels, rng=np.random.default_rng(3))
    model.backward()
    grads = {n: to_host(p.grad).copy() for n, p in model.named_parameters()}
    optim.step()
    params = {n: to_host(p.data).copy() for n, p in model.named_parameters()}
    return model, optim, losses, grads, params


def _naive_matmul(a, b, out, trans_a, trans_b, accumulate, *tiling_and_splits):
    mm.launch_naive(a, b, out, trans_a, trans_b, accumulate)


@pytest.fixture(scope="module")
def stepped():
    """The CPU and the CUDA step.

    The simulator runs every CUDA thread as a Python thread and every barrier as a
    Python lock, so there the kernels run with less of both: matrix products through the
    one-thread-per-output kernel (the tiled kernel's barriers dominated; test_matmul
    checks it), 32 threads per block for the elementwise kernels and 4 for the
    bias-gradient reduction. This changes no result beyond float rounding; on a GPU
    (``NUMBA_ENABLE_CUDASIM=0``) the defaults run.
    """
    launched = {}  # simulator: kernel -> the numba types of each launch's arguments
    with pytest.MonkeyPatch.context() as mp:
        if numba.config.ENABLE_CUDASIM:
            mp.setattr(mm, "launch_tiled", _naive_matmul)
            mp.setattr(tinyfrcnn.device.grid_1d, "__defaults__", (32,))
            mp.setattr(layers, "BIAS_THREADS", 4)
        cpu = train_step("cpu")
        if numba.config.ENABLE_CUDASIM:
            _record_launches(mp, launched)
        gpu = train_step("cuda")
        yield {"cpu": cpu, "cuda": gpu, "launched": launched}


def _record_launches(mp, launched):
    """Have the simulator note each kernel launch and the numba types of its arguments."""
    from numba.cuda.simulator import kernel as sim_kernel

    call = sim_kernel.FakeCUDAKernel.__call__

    def recording_call(kernel, *args):
        if not kernel._device:  # a launch, not a device function called by a kernel
            types = tuple(numba.typeof(getattr(a, "_ary", a)) for a in args)  # the simulator's arrays wrap NumPy's
            launched.setdefault(kernel, set()).add(types)
        return call(kernel, *args)

    mp.setattr(sim_kernel.FakeCUDAKernel, "__call__", recording_call)


def _signature(types):
    """numba types of a launch's arguments -> the signature string compile_ptx takes."""
    def one(t):
        if isinstance(t, numba.types.Array):
            dims = [":"] * t.ndim
            if t.layout == "C":
                dims[-1] = "::1"
            elif t.layout == "F":
                dims[0] = "::1"
            return f"{t.dtype}[{', '.join(dims)}]"
        return "boolean" if t == numba.types.boolean else str(t)

    return "void(" + ", ".join(one(t) for t in types) + ")"


def test_step_kernels_compile_to_ptx_with_the_types_they_are_launched_with(stepped):
    # The PTX tests of each module use signatures written by hand; this one compiles every
    # kernel of a CUDA train step with the argument types the step passed it, so that a
    # launch the real compiler cannot type (in a branch the simulator never took, or with
    # types no hand-written signature has) fails here, not on a GPU.
    if not numba.config.ENABLE_CUDASIM:
        pytest.skip("on a GPU the step itself compiled its kernels")
    import importlib
    import pkgutil

    import tinyfrcnn

    names = {}  # kernel -> (module, attribute) for the compiling process to import
    for info in pkgutil.iter_modules(tinyfrcnn.__path__):
        module = importlib.import_module(f"tinyfrcnn.{info.name}")
        for attr, value in vars(module).items():
            names.setdefault(id(value), (module.__name__, attr))
    launched = stepped["launched"]
    assert len(launched) >= 15  # im2col, matmul, bias, ReLU, pooling, RoIAlign, SGD, ...
    jobs = []
    for kernel, launches in launched.items():
        assert id(kernel) in names, f"kernel {kernel.fn.__qualname__} is not a module attribute of tinyfrcnn"
        jobs += [(*names[id(kernel)], _signature(types)) for types in sorted(launches, key=str)]
    assert_compiles_to_ptx(jobs)


def test_train_step_on_cuda_matches_cpu(stepped):
    cpu_model, _, cpu_losses, cpu_grads, cpu_params = stepped["cpu"]
    gpu_model, _, gpu_losses, gpu_grads, gpu_params = stepped["cuda"]
    assert cpu_model.device == "cpu" and gpu_model.device == "cuda"
    assert all(is_device_array(p.data) and is_device_array(p.grad) for p in gpu_model.parameters())
    for term, value in cpu_losses.items():
        assert gpu_losses[term] == pytest.approx(value, rel=1e-5, abs=1e-9), term
    assert cpu_losses["head_cls"] > 0 and cpu_losses["rpn_reg"] > 0
    assert len(cpu_grads) == len(gpu_grads) == len(cpu_model.parameters())
    for name, g in cpu_grads.items():
        assert np.abs(g).max() > 0, f"{name} got no gradient"
        np.testing.assert_allclose(gpu_grads[name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=name)
    for name, p in cpu_params.items():
        np.testing.assert_allclose(gpu_params[name], p, rtol=1e-5, atol=1e-7, err_msg=name)


def test_train_step_with_roi_max_pooling_on_cuda_matches_cpu(monkeypatch):
    # The default step pools with RoIAlign; this one with RoI max pooling, whose layer runs
    # its backward on its own argmax (without the wait that checks it).
    import dataclasses

    if numba.config.ENABLE_CUDASIM:  # as the stepped fixture: fewer simulated threads
        monkeypatch.setattr(mm, "launch_tiled", _naive_matmul)
        monkeypatch.setattr(tinyfrcnn.device.grid_1d, "__defaults__", (32,))
        monkeypatch.setattr(layers, "BIAS_THREADS", 4)
    config = dataclasses.replace(TINY, pooling="roi_pool")
    _, _, cpu_losses, cpu_grads, _ = train_step("cpu", config)
    _, _, gpu_losses, gpu_grads, _ = train_step("cuda", config)
    for term, value in cpu_losses.items():
        assert gpu_losses[term] == pytest.approx(value, rel=1e-5, abs=1e-9), term
    for name, g in cpu_grads.items():
        np.testing.assert_allclose(gpu_grads[name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=name)
    assert all(np.abs(g).max() > 0 for g in cpu_grads.values())  # every layer got a gradient


def test_detect_on_cuda_matches_cpu(stepped):
    images, _, _ = tiny_inputs()
    cpu = stepped["cpu"][0].detect(images)
    gpu = stepped["cuda"][0].detect(images)
    assert len(cpu) == len(gpu) == 2
    assert sum(len(d["boxes"]) for d in cpu) > 0
    for c, g in zip(cpu, gpu):
        assert all(isinstance(v, np.ndarray) for v in g.values())
        np.testing.assert_array_equal(g["labels"], c["labels"])
        np.testing.assert_allclose(g["scores"], c["scores"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g["boxes"], c["boxes"], rtol=1e-5, atol=1e-4)


def test_checkpoint_from_cuda_loads_on_cpu(stepped, tmp_path):
    gpu_model, gpu_optim, _, _, gpu_params = stepped["cuda"]
    path = str(tmp_path / "model.npz")
    gpu_model.save(path)
    model, _ = FasterRCNN.load(path)
    assert model.device == "cpu"
    for name, p in model.named_parameters():
        assert isinstance(p.data, np.ndarray)
        np.testing.assert_array_equal(p.data, gpu_params[name], err_msg=name)
    back, _ = FasterRCNN.load(path, device="cuda")
    assert back.device == "cuda"
    for name, p in back.named_parameters():
        np.testing.assert_array_equal(p.data.copy_to_host(), gpu_params[name], err_msg=name)

    # a training run on "cuda": weights and momentum buffers saved as host copies, resumed on the CPU
    trainer = Trainer(TINY, TrainConfig(device="cuda", batch_size=2, train_images=2, val_images=0), out_dir=str(tmp_path))
    assert trainer.model.device == "cuda"
    trainer.model, trainer.optim = gpu_model, gpu_optim
    trainer.save()
    resumed = Trainer.resume(trainer.checkpoint_path(), device="cpu")
    assert resumed.cfg.device == "cpu" and resumed.model.device == "cpu"
    for name, p in resumed.model.named_parameters():
        np.testing.assert_array_equal(p.data, gpu_params[name], err_msg=name)
    for mine, theirs in zip(resumed.optim.state_dict()["buffers"], gpu_optim.state_dict()["buffers"]):
        assert isinstance(theirs, np.ndarray) and np.abs(theirs).max() > 0
        np.testing.assert_array_equal(mine, theirs)
    assert Trainer.resume(trainer.checkpoint_path()).model.device == "cuda"  # the run's own device


def test_model_moves_between_devices():
    model = FasterRCNN(TINY, rng=np.random.default_rng(1))
    before = {n: v.copy() for n, v in model.state_dict().items()}
    assert model.to("cuda") is model and model.device == "cuda"
    assert layers.packed_store(model.parameters()) is not None  # one store: one SGD launch
    assert all(isinstance(v, np.ndarray) for v in model.state_dict().values())
    model.to("cpu")
    assert model.device == "cpu"
    assert all(p.store is None for p in model.parameters())  # nothing keeps the device buffers alive
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[name])
    model.to("cuda")
    assert layers.packed_store(model.parameters()) is not None
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_device_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="device must be one of"):
        FasterRCNN(TINY, device="gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        Trainer(TINY, TrainConfig(device="gpu", train_images=2, val_images=0))
    model = FasterRCNN(TINY, device="cuda")
    images, _, _ = tiny_inputs()
    with pytest.raises(ValueError, match="images must be a NumPy array"):
        model.detect(cuda.to_device(images))
    model.rpn.forward(cuda.to_device(np.zeros((1, 4, 1, 1), np.float32)))
    with pytest.raises(ValueError, match="RPNHead.backward: grad_logits must be a CUDA device array"):
        model.rpn.backward(np.zeros((1, 2, 2), np.float32), None)
    path = str(tmp_path / "m.npz")
    FasterRCNN(TINY).save(path)
    with pytest.raises(SystemExit, match="2"):
        main(["evaluate", "--checkpoint", path, "--device", "gpu"])

    monkeypatch.setattr(tinyfrcnn.device, "cuda_available", lambda: False)
    for make in (lambda: FasterRCNN(TINY, device="cuda"),
                 lambda: FasterRCNN(TINY).to("cuda"),
                 lambda: FasterRCNN.load(path, device="cuda"),
                 lambda: Trainer(TINY, TrainConfig(device="cuda", batch_size=2, train_images=2, val_images=0))):
        with pytest.raises(RuntimeError, match="no usable GPU"):
            make()
    for command in (["evaluate", "--checkpoint", path], ["detect", "--checkpoint", path, "x.png"],
                    ["train", "--steps", "1"]):
        with pytest.raises(SystemExit, match="--device cuda: .*no usable GPU"):
            main(command + ["--device", "cuda"])


# ------------------------------------------------------------------ anchor rows


def test_anchor_rows_hand_worked():
    # k = 2 anchors, D = 2 numbers each, a 1x2 grid: channel a*D + j at cell x
    maps = np.arange(8, dtype=np.float32).reshape(1, 4, 1, 2)  # (N, k*D, H, W)
    rows = to_anchor_rows(maps, 2)
    # row (y*W + x)*k + a = [maps[0, 2a, 0, x], maps[0, 2a + 1, 0, x]]
    np.testing.assert_array_equal(rows[0], [[0, 2], [4, 6], [1, 3], [5, 7]])
    np.testing.assert_array_equal(from_anchor_rows(rows, 2, 1, 2), maps)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 2), k=st.integers(1, 3), d=st.sampled_from([2, 4]), h=st.integers(0, 3),
       w=st.integers(0, 3))
def test_anchor_rows_round_trip(n, k, d, h, w):
    maps = np.random.default_rng(n * 100 + k * 10 + h).standard_normal((n, k * d, h, w)).astype(np.float32)
    rows = to_anchor_rows(maps, k)
    assert rows.shape == (n, h * w * k, d)
    np.testing.assert_array_equal(rows, _to_anchor_rows_reference(maps, k))
    np.testing.assert_array_equal(from_anchor_rows(rows, k, h, w), maps)


def test_anchor_rows_cuda_match_cpu():
    maps = np.random.default_rng(4).standard_normal((2, 6, 2, 3)).astype(np.float32)
    rows = to_anchor_rows(cuda.to_device(maps), 3)
    assert is_device_array(rows)
    np.testing.assert_array_equal(rows.copy_to_host(), to_anchor_rows(maps, 3))
    back = from_anchor_rows(rows, 3, 2, 3)
    assert is_device_array(back)
    np.testing.assert_array_equal(back.copy_to_host(), maps)
    assert to_anchor_rows(cuda.to_device(np.zeros((0, 6, 2, 3), np.float32)), 3).shape == (0, 18, 2)


def test_anchor_rows_bad_input():
    with pytest.raises(ValueError, match="to_anchor_rows: maps has 5 channels, not a multiple of num_anchors=2"):
        to_anchor_rows(np.zeros((1, 5, 2, 2), np.float32), 2)
    with pytest.raises(ValueError, match="to_anchor_rows: maps must be 4-D"):
        to_anchor_rows(np.zeros((5, 2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="to_anchor_rows: num_anchors"):
        to_anchor_rows(np.zeros((1, 4, 2, 2), np.float32), 0)
    with pytest.raises(ValueError, match=r"from_anchor_rows: rows has 7 rows, but height\*width\*num_anchors"):
        from_anchor_rows(np.zeros((1, 7, 2), np.float32), 2, 2, 2)
    with pytest.raises(ValueError, match="from_anchor_rows: rows must be float32 or float64"):
        from_anchor_rows(np.zeros((1, 8, 2), np.int64), 2, 2, 2)
    with pytest.raises(ValueError, match="from_anchor_rows: height must be a non-negative integer, got -1"):
        from_anchor_rows(np.zeros((1, 0, 2), np.float32), 2, -1, 2)


def test_anchor_row_kernels_compile_to_ptx():
    assert_compiles_to_ptx([
        ("tinyfrcnn.rpn", "_to_anchor_rows_cuda", "void(float32[::1], int64, int64, int64, float32[::1])"),
        ("tinyfrcnn.rpn", "_from_anchor_rows_cuda", "void(float32[::1], int64, int64, int64, float32[::1])"),
    ])
