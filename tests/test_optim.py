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
    with pytest.raises(ValueError, match="SGD: params is empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match=r"SGD: params\[0\] must be a Parameter"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="warmup_step_lr: step must be a non-negative integer"):
        warmup_step_lr(-1, 0.1, [10])
    with pytest.raises(ValueError, match="warmup_step_lr: milestones must be increasing"):
        warmup_step_lr(0, 0.1, [10, 5])


def test_warmup_step_lr_hand_worked():
    # base 0.02, warm-up over 4 steps from 1/3: 0.02*(1/3 + 2/3*s/4); x0.1 at 6 and 8
    lrs = [warmup_step_lr(s, 0.02, [6, 8], gamma=0.1, warmup_steps=4, warmup_factor=1 / 3) for s in range(10)]
    expected = [0.02 / 3, 0.01, 0.02 * 2 / 3, 0.015 + 0.02 / 12, 0.02, 0.02, 0.002, 0.002, 0.0002, 0.0002]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert warmup_step_lr(100, 0.1, []) == 0.1


def test_scheduler_sets_optimizer_lr():
    p = _param([0.0])
    opt = SGD([p], lr=0.02)
    sched = WarmupStepLR(opt, milestones=[3], warmup_steps=2, warmup_factor=0.5)
    seen = [opt.lr]
    for _ in range(4):
        sched.step()
        seen.append(opt.lr)
    np.testing.assert_allclose(seen, [0.01, 0.015, 0.02, 0.002, 0.002])
