"""Central-difference gradient checking in float64.

For a scalar function f, the central difference

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

has truncation error O(eps^2) and round-off error O(ulp(f) / eps), so in float64 with
eps = 1e-6 it agrees with a correct analytic gradient to about 1e-8 relative, while a
wrong backward is off by O(1). Layers are checked through a random projection of their
output, L = sum(out * R) with R ~ N(0, 1): dL/dout = R is what ``backward`` receives,
and every entry of the output contributes to L.
"""

import numpy as np

from .checks import as_float_array, check_number

DEFAULT_FLOOR = 1e-8


def relative_error(analytic, numeric, floor=DEFAULT_FLOOR):
    """Elementwise |a - n| / max(|a| + |n|, floor).

    0 when they agree, 1 when one is zero and the other at least ``floor`` in size (or
    they have opposite signs and |a| + |n| >= ``floor``). The ``floor`` keeps exact
    zeros from dividing by zero: where both gradients are smaller than ``floor`` the
    error is absolute, |a - n| / floor, so two values below about ``floor * 1e-6`` count
    as agreeing to 1e-6.
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"relative_error: analytic has shape {a.shape} but numeric has shape {n.shape}")
    return np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), floor)


def _as_float64(x, name, where):
    x = as_float_array(x, name, where=where)
    if x.dtype != np.float64:
        raise ValueError(f"{where}: {name} must be float64 for central differences, got {x.dtype.name}")
    return x


def numerical_gradient(f, x, eps=1e-6, indices=None):
    """Central differences of the scalar ``f`` at ``x`` (float64), perturbing ``x`` in place.

    Every entry is restored after use. ``indices`` (flat indices) limits the work to
    those entries; the others are left as NaN in the result.
    """
    where = "numerical_gradient"
    x = _as_float64(x, "x", where)
    eps = check_number(eps, "eps", low=0, low_open=True, where=where)
    if indices is not None:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise ValueError(f"{where}: indices must be a 1-D list of integer flat indices, got {indices!r}")
        if indices.size and (indices.min() < 0 or indices.max() >= x.size):
            raise ValueError(f"{where}: indices must lie in [0, {x.size}) (flat indices into x), "
                             f"got {indices.min()}..{indices.max()}")
    grad = np.full(x.shape, np.nan) if indices is not None else np.zeros(x.shape)
    if x.size == 0:
        return grad
    flat_x = x.reshape(-1)
    if not np.shares_memory(flat_x, x):
        raise ValueError(f"{where}: x must be contiguous, since it is perturbed in place")
    flat_g = grad.reshape(-1)
    for i in (range(x.size) if indices is None else indices.tolist()):
        old = flat_x[i]
        try:
            flat_x[i] = old + eps
            plus = _scalar(f(x), where)
            flat_x[i] = old - eps
            minus = _scalar(f(x), where)
        finally:
            flat_x[i] = old
        flat_g[i] = (plus - minus) / (2 * eps)
    return grad


def _scalar(value, where):
    if np.ndim(value) != 0 or not isinstance(np.asarray(value).item(), (int, float)):
        raise ValueError(f"{where}: f must return a real scalar, got {type(value).__name__} {np.shape(value)}")
    return float(value)


class GradCheckResult:
    """Per-tensor worst relative errors of a gradient check.

    ``entries`` is a list of dicts with keys ``tensor`` ("input", "weight", "bias", ...),
    ``error`` (worst relative error), ``index`` (where it occurred), ``analytic`` and
    ``numeric`` (the two values there). ``max_error``, ``worst`` and ``passed(tol)``
    summarise them.
    """

    def __init__(self, what, entries, tol=1e-6):
        self.what = what
        self.entries = entries
        self.tol = tol

    @property
    def worst(self):
        """The entry with the largest error; a NaN error counts as the largest (it fails)."""
        return max(self.entries, key=lambda e: (np.isnan(e["error"]), e["error"])) if self.entries else None

    @property
    def max_error(self):
        return self.worst["error"] if self.entries else 0.0

    def passed(self, tol=None):
        return self.max_error < (self.tol if tol is None else tol)

    def __bool__(self):
        return self.passed()

    def __getitem__(self, tensor):
        for e in self.entries:
            if e["tensor"] == tensor:
                return e
        raise KeyError(tensor)

    def __str__(self):
        lines = [f"gradient check of {self.what}: max relative error {self.max_error:.2e} "
                 f"({'PASS' if self.passed() else 'FAIL'} at tol {self.tol:.0e})"]
        for e in self.entries:
            lines.append(
                f"  {e['tensor']:>14s} {str(e['shape']):>18s}  worst {e['error']:.2e} at {e['index']}"
                f"  analytic {e['analytic']: .6e}  numeric {e['numeric']: .6e}"
            )
        return "\n".join(lines)

    __repr__ = __str__


def _entry(tensor, analytic, numeric, indices, floor):
    analytic = np.asarray(analytic, dtype=np.float64)
    if indices is None:
        indices = np.arange(analytic.size)
    if len(indices) == 0:
        return {"tensor": tensor, "shape": analytic.shape, "error": 0.0, "index": None,
                "analytic": 0.0, "numeric": 0.0}
    a = analytic.reshape(-1)[indices]
    n = numeric.reshape(-1)[indices]
    err = relative_error(a, n, floor)
    k = int(np.argmax(err))
    return {"tensor": tensor, "shape": analytic.shape, "error": float(err[k]),
            "index": tuple(int(i) for i in np.unravel_index(indices[k], analytic.shape)),
            "analytic": float(a[k]), "numeric": float(n[k])}


def _pick(size, samples, rng):
    if samples is None or samples >= size:
        return None
    return np.sort(rng.choice(size, size=samples, replace=False))


def check_layer(layer, x, rng=None, eps=1e-6, samples=None, tol=1e-6, floor=DEFAULT_FLOOR):
    """Check ``layer.backward`` against central differences of L = sum(out * R).

    ``x`` and the layer's parameters must be float64 (``layer.astype(np.float64)``).
    The layer's parameter gradients are zeroed, then hold the analytic gradient of L.
    ``samples`` checks only that many random entries of each tensor (for large ones).
    Returns a ``GradCheckResult`` for the input and every parameter.

    Differences are taken of sum((out(x') - out(x)) * R), which has the same gradient as
    L but no large constant part, so round-off stays far below the tolerance.
    """
    where = "check_layer"
    x = np.ascontiguousarray(_as_float64(x, "x", where))
    named = layer.named_parameters() if hasattr(layer, "named_parameters") else []
    for name, p in named:
        if p.data.dtype != np.float64:
            raise ValueError(f"{where}: parameter {name} is {p.data.dtype.name}; "
                             "call layer.astype(np.float64) first")
    rng = np.random.default_rng(0) if rng is None else rng
    x = x.copy()
    out0 = np.array(layer.forward(x), dtype=np.float64)
    proj = rng.standard_normal(out0.shape)  # R, same shape as the output

    def loss(_):
        return np.sum((layer.forward(x) - out0) * proj)

    for _, p in named:
        p.zero_grad()
    layer.forward(x)
    dx = np.asarray(layer.backward(proj.copy()), dtype=np.float64)
    if dx.shape != x.shape:
        raise ValueError(f"{where}: backward returned shape {dx.shape} for input of shape {x.shape}")
    param_grads = [(name, p.grad.copy()) for name, p in named]

    entries = []
    idx = _pick(x.size, samples, rng)
    entries.append(_entry("input", dx, numerical_gradient(loss, x, eps, idx), idx, floor))
    for (name, p), (_, analytic) in zip(named, param_grads):
        idx = _pick(p.data.size, samples, rng)
        entries.append(_entry(name, analytic, numerical_gradient(loss, p.data, eps, idx), idx, floor))
    layer.forward(x)
    return GradCheckResult(repr(layer), entries, tol)


def check_loss(loss_fn, x, eps=1e-6, samples=None, rng=None, tol=1e-6, floor=DEFAULT_FLOOR):
    """Check a function returning ``(loss, grad)`` against central differences of ``loss``.

    ``x`` must be float64; it is not modified (a copy is perturbed).
    """
    where = "check_loss"
    x = np.ascontiguousarray(_as_float64(x, "x", where)).copy()
    rng = np.random.default_rng(0) if rng is None else rng
    loss, grad = loss_fn(x.copy())
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != x.shape:
        raise ValueError(f"{where}: loss_fn returned a gradient of shape {grad.shape} for x of shape {x.shape}")
    idx = _pick(x.size, samples, rng)
    numeric = numerical_gradient(lambda z: loss_fn(z)[0], x, eps, idx)
    name = getattr(loss_fn, "__name__", "loss")
    return GradCheckResult(name, [_entry("input", grad, numeric, idx, floor)], tol)
