"""SGD against hand-computed steps, and the warm-up + step-decay schedule."""

import numpy as np
import pytest

from tinyfrcnn.layers import Parameter
from tinyfrcnn.optim import SGD, WarmupStepLR, warmup_step_lr


def _param(values):
    return Parameter(np.array(values, dtype=np.float64))


def test_plain_sgd_step():
    p = _param([1.0, -2.0])
    opt = SGD([p], lr=0.1)
    p.grad[...] = [0.5, 1.0]
    opt.step()
    np.testing.assert_allclose(p.data, [0.95, -2.1])


def test_momentum_and_weight_decay_by_hand():
    # p=1, grad=1 every step, lr=0.1, momentum=0.9, wd=0.1
    # step 1: d = 1 + 0.1*1 = 1.1; buf = 1.1; p = 1 - 0.11 = 0.89
    # step 2: d = 1 + 0.089 = 1.089; buf = 0.99 + 1.089 = 2.079; p = 0.89 - 0.2079 = 0.6821
    # step 3: d = 1 + 0.06821 = 1.06821; buf = 1.8711 + 1.06821 = 2.93931; p = 0.6821 - 0.293931
    p = _param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    expected = [0.89, 0.6821, 0.6821 - 0.293931]
    for e in expected:
        opt.zero_grad()
        p.grad += 1.0
        opt.step()
        assert p.data[0] == pytest.approx(e, abs=1e-12)


def test_lr_is_settable_between_steps():
    p = _param([0.0])
    opt = SGD([p], lr=1.0, momentum=0.5)
    p.grad[...] = 1.0
    opt.step()       # buf = 1, p = -1
    opt.lr = 0.1
    opt.step()       # buf = 1.5, p = -1.15
    assert p.data[0] == pytest.approx(-1.15)


def test_zero_grad_and_float32_params_stay_float32():
    p = Parameter(np.ones(3, dtype=np.float32))
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4)
    p.grad += 1
    opt.step()
    assert p.data.dtype == np.float32
    opt.zero_grad()
    assert not p.grad.any()


def test_state_dict_roundtrip():
    p = _param([1.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad[...] = 1
    opt.step()
    q = _param(p.data.copy())
    opt2 = SGD([q], lr=0.5, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    for o, par in [(opt, p), (opt2, q)]:
        par.grad[...] = 1
        o.step()
    np.testing.assert_array_equal(p.data, q.data)


def test_bad_arguments():
    with pytest.raises(ValueError, match="SGD: lr must be >= 0"):
        SGD([_param([1.0])], lr=-1)
    with pytest.raises(ValueError, match="SGD: momentum must be >= 0, got -0.9"):
        SGD([_param([1.0])], lr=0.1, momentum=-0.9)
    with pytest.raises(ValueError, match="SGD: weight_decay must be >= 0, got -0.0005"):
        SGD([_param([1.0])], lr=0.1, weight_decay=-5e-4)
    with pytest.raises(ValueError, match=r"warmup_step_lr: warmup_factor must be <= 1, got 1.5"):
        warmup_step_lr(0, 0.1, [], warmup_steps=4, warmup_factor=1.5)
    with pytest.raises(ValueError, match="SGD: params is empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: params\[0\] must be a Parameter"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="warmup_step_lr: step must be a non-negative integer"):
        warmup_step_lr(-1, 0.1, [10])
    with pytest.raises(ValueError, match="warmup_step_lr: milestones must be increasing"):
        warmup_step_lr(0, 0.1, [10, 5])
    with pytest.raises(ValueError, match=r"warmup_step_lr: milestones\[1\] must be a non-negative integer"):
        warmup_step_lr(20, 0.1, [10, float("nan")])
    with pytest.raises(ValueError, match=r"warmup_step_lr: milestones\[0\] must be a non-negative integer"):
        warmup_step_lr(20, 0.1, [-3])


def test_parameters_that_sgd_would_step_wrongly_are_refused():
    p = _param([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"SGD: params\[1\] is params\[0\] again \(it would be stepped twice\)"):
        SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="SGD: params must be a list of Parameters, got Parameter"):
        SGD(p, lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: params\[0\] must be float32 or float64, got int64"):
        SGD([Parameter(np.ones(3, np.int64))], lr=0.5)  # lr * grad would round to 0: never updated
    opt = SGD([p], lr=0.1)
    p.grad = np.ones(1)  # would broadcast over the three entries
    with pytest.raises(ValueError, match=r"SGD.step: params\[0\].grad has shape \(1,\), its data \(3,\)"):
        opt.step()
    p.grad = np.ones(3)
    opt.lr = -0.1  # a schedule sets lr between steps
    with pytest.raises(ValueError, match="SGD.step: lr must be >= 0, got -0.1"):
        opt.step()
    opt.lr = 0.1
    opt.momentum = float("nan")
    with pytest.raises(ValueError, match="SGD.step: momentum must be finite"):
        opt.step()
    assert p.data.tolist() == [1.0, 2.0, 3.0]


def test_milestones_are_whole_steps():
    # torch's MultiStepLR compares whole steps: a milestone of 2.5 would never be reached there
    with pytest.raises(ValueError, match=r"warmup_step_lr: milestones\[0\] must be a non-negative integer, got 2.5"):
        warmup_step_lr(3, 0.1, [2.5])
    with pytest.raises(ValueError, match="warmup_step_lr: milestones must be a list of steps, got 5"):
        warmup_step_lr(3, 0.1, 5)
    for bad in (False, 0.0, 2.5):
        with pytest.raises(ValueError, match="warmup_step_lr: warmup_steps must be a non-negative integer"):
            warmup_step_lr(3, 0.1, [], warmup_steps=bad)
    assert warmup_step_lr(3, 0.1, range(2, 10, 4)) == pytest.approx(0.01)


def test_numbers_must_be_real_numbers_not_bools_or_strings():
    for bad in ["0.1", True, np.bool_(False), None, [0.1], np.array([0.1]), 1j]:
        with pytest.raises(ValueError, match="SGD: lr must be a number, got"):
            SGD([_param([1.0])], lr=bad)
    with pytest.raises(ValueError, match="warmup_step_lr: base_lr must be a number, got '0.1'"):
        warmup_step_lr(0, "0.1", [])
    for good in [1, 0.5, np.float32(0.5), np.int64(2), np.array(0.25)]:
        assert SGD([_param([1.0])], lr=good).lr == float(good)
        assert isinstance(SGD([_param([1.0])], lr=good).lr, float)


def _stepped(momentum=0.9):
    p = _param([1.0, 2.0])
    opt = SGD([p], lr=0.1, momentum=momentum)
    p.grad[...] = 1
    opt.step()
    return opt


@pytest.mark.parametrize("change,match", [
    ({"momentum": np.nan}, "SGD.load_state_dict: momentum must be finite, got nan"),
    ({"weight_decay": -5}, "SGD.load_state_dict: weight_decay must be >= 0, got -5"),
    ({"lr": "0.1"}, "SGD.load_state_dict: lr must be a number"),
    ({"buffers": [np.zeros(3)]}, r"SGD.load_state_dict: buffers\[0\] has shape \(3,\) and dtype float64, "
                                 r"but params\[0\] has shape \(2,\) and dtype float64"),
    ({"buffers": [np.zeros(2, np.float32)]}, r"buffers\[0\] has shape \(2,\) and dtype float32"),
    ({"buffers": [np.array([0.0, np.inf])]}, r"SGD.load_state_dict: buffers\[0\] holds NaN or inf"),
    ({"buffers": []}, "SGD.load_state_dict: state has 0 buffers for 1 params"),
])
def test_load_state_dict_checks_the_state_and_keeps_the_old_one(change, match):
    opt = _stepped()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict({**before, **change})
    after = opt.state_dict()
    assert (after["lr"], after["momentum"], after["weight_decay"]) == (0.1, 0.9, 0.0)
    np.testing.assert_array_equal(after["buffers"][0], before["buffers"][0])
    with pytest.raises(ValueError, match=r"SGD.load_state_dict: state is missing \['buffers'\]"):
        opt.load_state_dict({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0})


def test_load_state_dict_accepts_missing_buffers():
    opt = SGD([_param([1.0, 2.0])], lr=0.5)
    opt.load_state_dict(_stepped(momentum=0.0).state_dict())
    assert opt.lr == 0.1 and opt.state_dict()["buffers"] == [None]


def test_warmup_step_lr_hand_worked():
    # base 0.02, warm-up over 4 steps from 1/3: 0.02*(1/3 + 2/3*s/4); x0.1 at 6 and 8
    lrs = [warmup_step_lr(s, 0.02, [6, 8], gamma=0.1, warmup_steps=4, warmup_factor=1 / 3) for s in range(10)]
    expected = [0.02 / 3, 0.01, 0.02 * 2 / 3, 0.015 + 0.02 / 12, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert warmup_step_lr(100, 0.1, []) == 0.1


def test_warmup_starts_at_a_third_by_default():
    # torch.optim.lr_scheduler.LinearLR's start_factor, 1/3, as torchvision's reference scripts use it
    assert warmup_step_lr(0, 0.3, [], warmup_steps=2) == pytest.approx(0.1)
    assert warmup_step_lr(1, 0.3, [], warmup_steps=2) == pytest.approx(0.2)
    opt = SGD([_param([0.0])], lr=0.3)
    WarmupStepLR(opt, milestones=[], warmup_steps=2)
    assert opt.lr == pytest.approx(0.1)


def test_load_state_dict_copies_the_buffers():
    opt = _stepped()
    state = opt.state_dict()
    before = state["buffers"][0].copy()
    again = SGD([_param([1.0, 2.0])], lr=0.1, momentum=0.9)
    again.load_state_dict(state)
    again.params[0].grad[...] = 1
    again.step()
    np.testing.assert_array_equal(state["buffers"][0], before)  # the caller's state is left as it was


def test_scheduler_sets_optimizer_lr():
    p = _param([0.0])
    opt = SGD([p], lr=0.02)
    sched = WarmupStepLR(opt, milestones=[3], warmup_steps=2, warmup_factor=0.5)
    seen = [opt.lr]
    for _ in range(4):
        sched.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, [0.01, 0.015, 0.02, 0.002, 0.002])


# ----------------------------------------------------------------------------- CUDA (simulator)

from numba import cuda  # noqa: E402

from ptx import SAME_ROUNDING_AS_CPU, assert_compiles_to_ptx  # noqa: E402
from tinyfrcnn.device import is_device_array  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 0.1)])
def test_cuda_step_matches_cpu(dtype, momentum, weight_decay):
    rng = np.random.default_rng(0)
    start = rng.standard_normal((3, 5)).astype(dtype)
    grads = [rng.standard_normal((3, 5)).astype(dtype) for _ in range(3)]
    host, dev = Parameter(start.copy()), Parameter(start.copy()).to("cuda")
    opts = [SGD([p], lr=0.05, momentum=momentum, weight_decay=weight_decay) for p in (host, dev)]
    for g in grads:
        for opt, p in zip(opts, (host, dev)):
            opt.zero_grad()
            p.accumulate(cuda.to_device(g) if p.device == "cuda" else g)
            opt.step()
        np.testing.assert_array_equal(dev.data.copy_to_host(), host.data)
    assert dev.data.dtype == dtype
    state = opts[1].state_dict()
    assert all(b is None or isinstance(b, np.ndarray) for b in state["buffers"])


def test_cuda_state_dict_roundtrip():
    p = Parameter(np.ones(4, np.float32)).to("cuda")
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.accumulate(cuda.to_device(np.ones(4, np.float32)))
    opt.step()
    q = Parameter(p.data.copy_to_host()).to("cuda")
    opt2 = SGD([q], lr=0.5, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert is_device_array(opt2._buffers[0])
    q.accumulate(cuda.to_device(np.ones(4, np.float32)))
    for o in (opt, opt2):
        o.step()
    np.testing.assert_array_equal(p.data.copy_to_host(), q.data.copy_to_host())
    opt.zero_grad()
    assert not p.grad.copy_to_host().any()


def test_cuda_grad_must_live_with_data():
    p = Parameter(np.ones(2, np.float32)).to("cuda")
    p.grad = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"SGD.step: params\[0\] is on the device"):
        SGD([p], lr=0.1).step()
    for grad in (np.ones(3, np.float32), np.ones(2, np.float64)):  # a wrong shape, a wrong dtype
        p.grad = cuda.to_device(grad)
        with pytest.raises(ValueError, match=r"SGD.step: params\[0\] is on the device, so its grad must be a device "
                                             "array of the same shape and dtype"):
            SGD([p], lr=0.1).step()
    np.testing.assert_array_equal(p.data.copy_to_host(), [1.0, 1.0])


def test_cuda_kernel_compiles_to_ptx():
    f1 = "float32[::1]"
    assert_compiles_to_ptx([
        ("tinyfrcnn.optim", "_sgd_step_cuda_f32", f"void({f1}, {f1}, {f1}, float32, float32, float32, boolean)",
         SAME_ROUNDING_AS_CPU["float32"]),
        ("tinyfrcnn.optim", "_sgd_step_cuda_f64",
         "void(float64[::1], float64[::1], float64[::1], float64, float64, float64, boolean)",
         SAME_ROUNDING_AS_CPU["float64"]),
    ])


# ----------------------------------------------------------------------------- packed parameters

from tinyfrcnn import layers as layers_mod  # noqa: E402
from tinyfrcnn import optim as optim_mod  # noqa: E402
from tinyfrcnn.layers import Linear, Module, Sequential, packed_store  # noqa: E402


def net(dtype=np.float32):
    """Two linear layers: parameters of 15, 3, 210 and 70 numbers (segments at 0, 64, 128, 384)."""
    return Sequential(Linear(5, 3, rng=np.random.default_rng(0)),
                      Linear(3, 70, rng=np.random.default_rng(1))).astype(dtype)


class CountLaunches:
    """Stands in for a CUDA kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, config):
        self.launches += 1
        return self.kernel[config]


class CountLaunchesByDtype(dict):
    """Stands in for a dtype -> kernel table and counts the launches of all of them."""

    @property
    def launches(self):
        return sum(k.launches for k in self.values())


def _grads(model, step):
    for p in model.parameters():
        g = np.random.default_rng(step * 10 + p.data.size).standard_normal(p.shape).astype(p.data.dtype)
        p.accumulate(cuda.to_device(g) if p.device == "cuda" else g)


def _count_launches(monkeypatch):
    """The SGD and fill kernels, swapped for counting stand-ins: (sgd, fill)."""
    sgd_kernel = CountLaunchesByDtype({dt: CountLaunches(k) for dt, k in optim_mod._SGD_STEP_CUDA.items()})
    fill_kernel = CountLaunches(layers_mod._fill_cuda)
    monkeypatch.setattr(optim_mod, "_SGD_STEP_CUDA", sgd_kernel)
    monkeypatch.setattr(layers_mod, "_fill_cuda", fill_kernel)
    return sgd_kernel, fill_kernel


def _sgd_step(opts, models, step):
    """zero_grad, the step's gradients, and one update, for each (optimizer, model)."""
    for opt, model in zip(opts, models):
        opt.zero_grad()
        _grads(model, step)
        opt.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_sgd_is_one_launch_and_matches_cpu(monkeypatch, dtype):
    host, dev = net(dtype), net(dtype).to("cuda")
    opts = [SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (host, dev)]
    sgd_kernel, fill_kernel = _count_launches(monkeypatch)
    for step in range(3):
        _sgd_step(opts, (host, dev), step)
        for p, q in zip(host.parameters(), dev.parameters()):
            np.testing.assert_array_equal(q.data.copy_to_host(), p.data)
    assert sgd_kernel.launches == 3 and fill_kernel.launches == 3  # one per step each, not one per parameter
    store = packed_store(dev.parameters())
    assert store.offsets == [0, 64, 128, 384]
    gaps = np.ones(store.data.size, bool)  # (512,)
    for p, off in zip(dev.parameters(), store.offsets):
        gaps[off:off + p.data.size] = False
    assert gaps.sum() == 512 - 298 and not store.data.copy_to_host()[gaps].any()  # the gaps stay zero
    assert opts[1]._buffers_are_flat()


@pytest.mark.parametrize("which", [(1, 3), (0, 1), (2,)])
def test_sgd_on_some_packed_parameters_is_one_launch_per_run(monkeypatch, which):
    # A stage of the alternating schedule trains some of a model's parameters.
    host, dev = net(), net().to("cuda")
    before = [p.data.copy_to_host() for p in dev.parameters()]
    opts = [SGD([m.parameters()[i] for i in which], lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (host, dev)]
    sgd_kernel, fill_kernel = _count_launches(monkeypatch)
    for step in range(3):
        _sgd_step(opts, (host, dev), step)
    runs = 1 if which != (1, 3) else 2
    assert sgd_kernel.launches == 3 * runs and fill_kernel.launches == 3 * runs
    for i, (p, q) in enumerate(zip(host.parameters(), dev.parameters())):
        if i in which:
            np.testing.assert_array_equal(q.data.copy_to_host(), p.data)
        else:
            np.testing.assert_array_equal(q.data.copy_to_host(), before[i])  # not in the optimizer
    state = opts[1].state_dict()
    again = SGD([dev.parameters()[i] for i in which], lr=0.05, momentum=0.9, weight_decay=5e-4)
    again.load_state_dict(state)
    assert again._buffers_are_flat()
    for buf, ref in zip(again.state_dict()["buffers"], state["buffers"]):
        np.testing.assert_array_equal(buf, ref)


def test_module_zero_grad_of_a_packed_submodule_is_one_launch(monkeypatch):
    dev = net().to("cuda")
    for p in dev.parameters():
        p.accumulate(cuda.to_device(np.ones(p.shape, np.float32)))
    _, fill_kernel = _count_launches(monkeypatch)
    dev[1].zero_grad()
    assert fill_kernel.launches == 1
    assert [bool(p.grad.copy_to_host().any()) for p in dev.parameters()] == [True, True, False, False]


def test_broken_packing_falls_back_to_one_launch_per_parameter(monkeypatch):
    host, dev = net(), net().to("cuda")
    opts = [SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (host, dev)]
    for opt, model in zip(opts, (host, dev)):
        _grads(model, 0)
        opt.step()
    dev.parameters()[1].to("cpu").to("cuda")  # it now has arrays of its own: the store no longer holds it
    assert packed_store(dev.parameters()) is None
    sgd_kernel, _ = _count_launches(monkeypatch)
    for opt in opts:
        opt.step()
    assert sgd_kernel.launches == 4  # one per parameter
    for p, q in zip(host.parameters(), dev.parameters()):
        np.testing.assert_array_equal(q.data.copy_to_host(), p.data)


@pytest.mark.parametrize("packed_target", [True, False])
def test_packed_state_dict_roundtrip(packed_target):
    a = net().to("cuda")
    opt = SGD(a.parameters(), lr=0.1, momentum=0.9)
    _grads(a, 0)
    opt.step()
    b = net()
    for p, q in zip(a.parameters(), b.parameters()):
        q.data[...] = p.data.copy_to_host()
    b.to("cuda")
    if not packed_target:
        b.parameters()[0].to("cpu").to("cuda")
    opt2 = SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert opt2._buffers_are_flat() == packed_target
    _grads(b, 0)  # a still holds these grads
    for o in (opt, opt2):
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(q.data.copy_to_host(), p.data.copy_to_host())
    for buf, ref in zip(opt2.state_dict()["buffers"], opt.state_dict()["buffers"]):
        np.testing.assert_array_equal(buf, ref)


def test_packed_load_of_a_state_with_some_buffers_unset_matches_cpu():
    # a parameter whose buffer is None takes its first momentum step; the others go on from theirs
    host, dev = net(), net().to("cuda")
    first = SGD(net().parameters(), lr=0.05, momentum=0.9)
    for p in first.params:
        p.grad[...] = 1
    first.step()
    state = first.state_dict()
    state["buffers"][2:] = [None, None]
    opts = [SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (host, dev)]
    for opt in opts:
        opt.load_state_dict(state)
    for step in range(2):
        _sgd_step(opts, (host, dev), step)
    for p, q in zip(host.parameters(), dev.parameters()):
        np.testing.assert_array_equal(q.data.copy_to_host(), p.data)


class Empty(Module):
    def __init__(self):
        self.w = Parameter(np.zeros((0, 3), np.float32))
        self.b = Parameter(np.zeros(0, np.float32))


def test_packed_empty_parameters():
    m = Empty().to("cuda")
    assert packed_store(m.parameters()).data.size == 0
    opt = SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    opt.step()
    assert all(p.data.copy_to_host().shape == p.shape for p in m.parameters())
