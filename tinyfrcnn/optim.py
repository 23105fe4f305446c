"""Stochastic gradient descent with momentum and weight decay, and learning-rate schedules.

The paper trains with SGD, momentum 0.9, weight decay 0.0005, and a learning rate
dropped by 10x after a fixed number of iterations; torchvision's reference scripts add
a linear warm-up over the first iterations. ``SGD`` makes the update of
``torch.optim.SGD`` (dampening 0, nesterov False):

    d   = grad + weight_decay * p
    buf = d                         (first step)
    buf = momentum * buf + d        (later steps)
    p   = p - lr * buf

On the CPU the numbers match torch's to about 1 ulp per step, not bit for bit: torch
computes ``p.add_(buf, alpha=-lr)`` (and ``grad.add(p, alpha=weight_decay)``) as a
fused multiply-add, rounding once, where NumPy rounds ``lr * buf`` (and
``weight_decay * p``) and then the sum; that extra rounding is at most half an ulp of
``lr * buf``.

Parameters on the GPU are updated in place by a CUDA kernel, the same formula element
by element, with the hyper-parameters cast to the parameter's dtype and every product
and sum rounded on its own as NumPy does on the CPU (no fused multiply-add), so the two
give the same bits. When the parameters sit in the ``DeviceStore`` that
``model.to("cuda")`` packed them into, that is one launch per run of neighbouring
segments (one for a whole model; the momentum buffers are then views of one flat
buffer too), else one per parameter.
"""

import numpy as np
from numba import cuda

from .checks import check_finite, check_non_negative_int, check_number
from .device import grid_1d, is_device_array, launch, rounded_ops
from .layers import DeviceStore, packed_runs


def _make_sgd_step_cuda(dtype):
    mul, add = rounded_ops(dtype)

    @cuda.jit
    def sgd_step(p, g, buf, lr, momentum, weight_decay, first):
        """One SGD step on flat arrays; ``buf`` is used only when ``momentum != 0``.
        Each product and sum rounded on its own, as NumPy does on the CPU."""
        i = cuda.grid(1)
        if i >= p.size:
            return
        d = g[i]
        if weight_decay != 0:
            d = add(d, mul(weight_decay, p[i]))
        if momentum != 0:
            if not first:
                d = add(mul(momentum, buf[i]), d)
            buf[i] = d
        p[i] = add(p[i], -mul(lr, d))

    return sgd_step


_sgd_step_cuda_f32 = _make_sgd_step_cuda(np.float32)
_sgd_step_cuda_f64 = _make_sgd_step_cuda(np.float64)
_SGD_STEP_CUDA = {np.dtype(np.float32): _sgd_step_cuda_f32, np.dtype(np.float64): _sgd_step_cuda_f64}


def _flat(a):
    return a.reshape(a.size)


class SGD:
    """SGD over a list of ``Parameter`` s; the update of ``torch.optim.SGD`` to about 1 ulp
    per step (torch rounds ``p - lr * buf`` once, a fused multiply-add; NumPy twice).

    ``lr`` is a plain attribute: a schedule sets it before each ``step()``.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        where = "SGD"
        if hasattr(params, "data") or not hasattr(params, "__iter__"):
            raise ValueError(f"{where}: params must be a list of Parameters, got {type(params).__name__}")
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{where}: params is empty")
        seen = {}
        for i, p in enumerate(self.params):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise ValueError(f"{where}: params[{i}] must be a Parameter (with .data and .grad), "
                                 f"got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"{where}: params[{i}] is params[{seen[id(p)]}] again (it would be stepped twice)")
            seen[id(p)] = i
            if np.dtype(p.data.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
                raise ValueError(f"{where}: params[{i}] must be float32 or float64, got {np.dtype(p.data.dtype).name}")
        self.lr = check_number(lr, "lr", low=0, where=where)
        self.momentum = check_number(momentum, "momentum", low=0, where=where)
        self.weight_decay = check_number(weight_decay, "weight_decay", low=0, where=where)
        self._buffers = [None] * len(self.params)
        self._flat_buffer = None  # set: the momentum buffers are views of it (params packed)

    def _make_flat_buffers(self, store):
        """Momentum buffers as views of one flat buffer laid out as the store,
        uninitialised (a first step writes every run of it)."""
        self._flat_buffer = cuda.device_array(store.data.size, dtype=store.data.dtype)  # (total,)
        self._buffers = [DeviceStore.view(self._flat_buffer, store.offset(p), p.data.shape) for p in self.params]

    def _buffers_are_flat(self):
        return self._flat_buffer is not None

    def zero_grad(self):
        packed = packed_runs(self.params)
        if packed is not None:
            store, runs = packed
            store.zero_grad(runs)
            return
        for p in self.params:
            if hasattr(p, "zero_grad"):
                p.zero_grad()
            else:
                p.grad[...] = 0

    def step(self):
        where = "SGD.step"
        lr = check_number(self.lr, "lr", low=0, where=where)
        check_number(self.momentum, "momentum", low=0, where=where)
        check_number(self.weight_decay, "weight_decay", low=0, where=where)
        packed = packed_runs(self.params)
        if packed is not None and self._step_packed(*packed, lr):
            return
        for i, p in enumerate(self.params):
            if is_device_array(p.data):
                self._step_cuda(i, p, lr)
                continue
            d = p.grad
            if np.shape(d) != p.data.shape:
                raise ValueError(f"{where}: params[{i}].grad has shape {np.shape(d)}, its data {p.data.shape}")
            if self.weight_decay:
                d = d + self.weight_decay * p.data
            if self.momentum:
                buf = self._buffers[i]
                if buf is None:
                    buf = self._buffers[i] = d.astype(p.data.dtype, copy=True)
                else:
                    buf *= self.momentum
                    buf += d
                d = buf
            p.data -= (lr * d).astype(p.data.dtype, copy=False)

    def _step_packed(self, store, runs, lr):
        """One launch per run of the store's flat buffers; False (nothing done) when the
        momentum buffers are not views of one flat buffer, e.g. after loading a state."""
        first = all(b is None for b in self._buffers)
        if self.momentum and not first and not self._buffers_are_flat():
            return False
        cast = np.dtype(store.data.dtype).type
        if self.momentum and first:
            self._make_flat_buffers(store)
        buf = self._flat_buffer if self.momentum else store.data
        for a, b in runs:
            if b > a:
                launch(_SGD_STEP_CUDA[np.dtype(store.data.dtype)], *grid_1d(b - a),
                    store.data[a:b], store.grad[a:b], buf[a:b], cast(lr), cast(self.momentum),
                    cast(self.weight_decay), first)
        return True

    def _step_cuda(self, i, p, lr):
        if not is_device_array(p.grad) or p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
            raise ValueError(f"SGD.step: params[{i}] is on the device, so its grad must be a device "
                             f"array of the same shape and dtype")
        if p.data.size == 0:
            return
        cast = np.dtype(p.data.dtype).type
        first = self._buffers[i] is None
        if self.momentum and first:
            self._buffers[i] = cuda.device_array(p.data.shape, dtype=p.data.dtype)
        buf = self._buffers[i] if self.momentum else p.data
        launch(_SGD_STEP_CUDA[np.dtype(p.data.dtype)], *grid_1d(p.data.size),
            _flat(p.data), _flat(p.grad), _flat(buf), cast(lr), cast(self.momentum),
            cast(self.weight_decay), first)

    def state_dict(self):
        """Learning rate, hyper-parameters and momentum buffers (NumPy copies)."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "buffers": [None if b is None else (b.copy_to_host() if is_device_array(b) else b.copy())
                            for b in self._buffers]}

    def load_state_dict(self, state):
        """Load what ``state_dict`` returned, checked as ``__init__`` checks its arguments:
        each buffer is None or a finite array of its parameter's shape and dtype."""
        where = "SGD.load_state_dict"
        missing = [k for k in ("lr", "momentum", "weight_decay", "buffers") if k not in state]
        if missing:
            raise ValueError(f"{where}: state is missing {missing}")
        lr = check_number(state["lr"], "lr", low=0, where=where)
        momentum = check_number(state["momentum"], "momentum", low=0, where=where)
        weight_decay = check_number(state["weight_decay"], "weight_decay", low=0, where=where)
        buffers = list(state["buffers"])
        if len(buffers) != len(self.params):
            raise ValueError(f"{where}: state has {len(buffers)} buffers for {len(self.params)} params")
        for i, (b, p) in enumerate(zip(buffers, self.params)):
            if b is None:
                continue
            b = b.copy_to_host() if is_device_array(b) else np.asarray(b)
            if b.shape != p.shape or b.dtype != p.data.dtype:
                raise ValueError(f"{where}: buffers[{i}] has shape {b.shape} and dtype {b.dtype.name}, but "
                                 f"params[{i}] has shape {p.shape} and dtype {np.dtype(p.data.dtype).name}")
            buffers[i] = check_finite(b, f"buffers[{i}]", where)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        packed = packed_runs(self.params)
        if packed is not None and self.momentum and all(b is not None for b in buffers):
            store = packed[0]
            self._make_flat_buffers(store)
            flat = np.zeros(store.data.size, store.data.dtype)  # (total,): zeros in the gaps
            for b, p in zip(buffers, self.params):
                off = store.offset(p)
                flat[off:off + p.data.size] = np.ravel(b)
            self._flat_buffer.copy_to_device(flat)
            return
        self._flat_buffer = None
        self._buffers = [None if b is None else (cuda.to_device(np.array(b)) if is_device_array(p.data)
                                                 else np.array(b, copy=True))
                         for b, p in zip(buffers, self.params)]


def warmup_step_lr(step, base_lr, milestones, gamma=0.1, warmup_steps=0, warmup_factor=1 / 3):
    """Learning rate at ``step`` (0-based): linear warm-up, then step decay.

    lr = base_lr * w(step) * gamma ** (number of milestones <= step), where the warm-up
    factor w rises linearly from ``warmup_factor`` at step 0 to 1 at ``warmup_steps``:
    w = warmup_factor + (1 - warmup_factor) * step / warmup_steps (and 1 afterwards).
    """
    where = "warmup_step_lr"
    step = check_non_negative_int(step, "step", where)
    base_lr = check_number(base_lr, "base_lr", low=0, where=where)
    gamma = check_number(gamma, "gamma", low=0, where=where)
    warmup_factor = check_number(warmup_factor, "warmup_factor", low=0, high=1, where=where)
    if not isinstance(milestones, (tuple, list, range, np.ndarray)):
        raise ValueError(f"{where}: milestones must be a list of steps, got {milestones!r}")
    milestones = [check_non_negative_int(m, f"milestones[{i}]", where) for i, m in enumerate(milestones)]
    if milestones != sorted(milestones):
        raise ValueError(f"{where}: milestones must be increasing, got {milestones}")
    warmup_steps = check_non_negative_int(warmup_steps, "warmup_steps", where)
    w = 1.0
    if step < warmup_steps:
        w = warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    passed = sum(1 for m in milestones if step >= m)
    return base_lr * w * gamma ** passed


class WarmupStepLR:
    """Sets ``optimizer.lr = warmup_step_lr(step, ...)``; call ``step()`` once per iteration.

    The learning rate for iteration 0 is set at construction, so the loop is
    ``optimizer.step(); scheduler.step()``.
    """

    def __init__(self, optimizer, milestones, gamma=0.1, warmup_steps=0, warmup_factor=1 / 3):
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.last_step = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, step):
        return warmup_step_lr(step, self.base_lr, self.milestones, self.gamma,
                              self.warmup_steps, self.warmup_factor)

    def step(self):
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr
