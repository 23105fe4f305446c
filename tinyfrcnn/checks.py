"""Input validation shared by every public op.

Numba kernels do not check bounds, so every public function checks its arguments here
first and raises ``ValueError`` naming the argument and what is wrong. Device arrays
are checked for shape and dtype; their values are checked on a host copy only where
the op reads them as indices or coordinates (small arrays such as boxes and RoIs) or
reduces or sorts them on the host (the losses' inputs, NMS scores). The RoI kernels
check device RoIs themselves (``roi``'s ``defer``) and the host words a fault they flag.
"""

import math
import numbers

import numpy as np

from .device import is_device_array

FLOAT_DTYPES = (np.float32, np.float64)


def _host_values(x):
    return x.copy_to_host() if is_device_array(x) else x


def as_array(x, name, ndim=None, dtypes=None, where=""):
    """Return ``x`` as an array (NumPy or device), checking dimensions and dtype."""
    prefix = f"{where}: " if where else ""
    if not is_device_array(x):
        if isinstance(x, (list, tuple)) or np.isscalar(x):
            try:
                x = np.asarray(x)
            except ValueError as err:  # ragged nested lists
                raise ValueError(f"{prefix}{name} is not an array: {err}") from None
        if isinstance(x, np.ma.MaskedArray):
            raise ValueError(f"{prefix}{name} must be a plain NumPy array, got a masked array "
                             "(its masked values would be used: pass x.filled(value))")
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{prefix}{name} must be a NumPy or CUDA device array, got {type(x).__name__}")
        if not x.dtype.isnative:
            raise ValueError(f"{prefix}{name} must be in this machine's byte order, got dtype {x.dtype.str!r} "
                             f"(x.astype(x.dtype.newbyteorder('=')) converts it)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{prefix}{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if dtypes is not None and np.dtype(x.dtype) not in [np.dtype(d) for d in dtypes]:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{prefix}{name} must have dtype {names}, got {np.dtype(x.dtype).name}")
    return x


def as_float_array(x, name, ndim=None, where=""):
    """A float32/float64 array with ``ndim`` dimensions; ints are rejected, not cast."""
    x = as_array(x, name, ndim=ndim, where=where)
    if np.dtype(x.dtype) not in [np.dtype(d) for d in FLOAT_DTYPES]:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be float32 or float64, got {np.dtype(x.dtype).name}")
    return x


class NonFiniteValues(ValueError):
    """An array argument holds NaN or inf (raised by ``check_finite``)."""


def check_finite(x, name, where=""):
    """Raise NonFiniteValues if ``x`` holds NaN or inf (device arrays are checked on a host
    copy; lists and scalars as NumPy arrays). Returns ``x``."""
    prefix = f"{where}: " if where else ""
    values = _host_values(x)
    if not isinstance(values, np.ndarray):
        values = as_array(values, name, where=where)
    if values.dtype.kind not in "biufc":
        raise ValueError(f"{prefix}{name} must hold numbers, got dtype {values.dtype}")
    if values.size and not np.isfinite(values).all():
        bad = np.argwhere(~np.isfinite(values))[0]
        raise NonFiniteValues(f"{prefix}{name} holds NaN or inf (first at index {tuple(int(i) for i in bad)})")
    return x


def cast_finite(x, dtype, name, dtype_of, where=""):
    """``x`` cast to ``dtype``, the dtype of the array ``dtype_of`` it is combined with,
    raising NonFiniteValues if the cast overflows (a float64 value beyond float32)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):
        x = x.astype(dtype, copy=False)
    return check_finite(x, f"{name} in {dtype.name} (the dtype of {dtype_of})", where)


def check_rng(rng, where=""):
    """A ``numpy.random.Generator``."""
    if not isinstance(rng, np.random.Generator):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {rng!r}")
    return rng


def as_box_array(boxes, name="boxes", where=""):
    """An (N, 4) float array; its values unchecked (``check_boxes`` checks them)."""
    boxes = as_float_array(boxes, name, ndim=2, where=where)
    if boxes.shape[1] != 4:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must have shape (N, 4), got {tuple(boxes.shape)}")
    return boxes


def check_boxes(boxes, name="boxes", where="", allow_inf=False):
    """(N, 4) float boxes (x1, y1, x2, y2), finite (or, with ``allow_inf``, not NaN),
    with x2 >= x1 and y2 >= y1."""
    boxes = as_box_array(boxes, name, where)
    prefix = f"{where}: " if where else ""
    values = _host_values(boxes)
    if not allow_inf:
        check_finite(values, name, where)
    elif np.isnan(values).any():
        bad = np.argwhere(np.isnan(values))[0]
        raise ValueError(f"{prefix}{name} holds NaN (first at index {tuple(int(i) for i in bad)})")
    bad = (values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{prefix}{name}[{i}] = {values[i].tolist()} has x2 < x1 or y2 < y1")
    return boxes


def as_boxes(boxes, name, where=""):
    """Boxes given in any real dtype (ints, lists) as a checked (K, 4) float array; an empty
    input, whatever its shape, is (0, 4)."""
    boxes = as_array(boxes, name, where=where)
    if boxes.size == 0:
        boxes = np.zeros((0, 4))  # (0, 4)
    elif np.issubdtype(boxes.dtype, np.integer):
        boxes = boxes.astype(np.float64)
    return check_boxes(boxes, name, where)


def check_number(value, name, low=None, high=None, low_open=False, high_open=False, where=""):
    """A finite real number within [low, high] (ends open where asked).

    Python and NumPy ints and floats, and 0-d arrays of them, are numbers; bools and
    strings are not (``float`` would turn ``True`` into 1.0 and ``"0.5"`` into 0.5).
    """
    prefix = f"{where}: " if where else ""
    real = isinstance(value, numbers.Real) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")
    if not real or isinstance(value, bool):
        raise ValueError(f"{prefix}{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int or Fraction beyond float64
        v = math.inf
    if not np.isfinite(v):
        raise ValueError(f"{prefix}{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{prefix}{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{prefix}{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _int_at_least(value, name, low, kind, where):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be a {kind} integer, got {value!r}")
    return int(value)


def check_positive_int(value, name, where=""):
    """An integer > 0 (bools rejected)."""
    return _int_at_least(value, name, 1, "positive", where)


def check_non_negative_int(value, name, where=""):
    """An integer >= 0 (bools rejected)."""
    return _int_at_least(value, name, 0, "non-negative", where)


def pair(value, name, where=""):
    """An int or an (h, w) pair of positive ints, as an (h, w) tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{name} must be an int or an (h, w) pair, got {value!r}")
        return check_positive_int(value[0], name, where), check_positive_int(value[1], name, where)
    v = check_positive_int(value, name, where)
    return v, v


def padding_pair(value, name, where=""):
    """An int or an (h, w) pair of non-negative ints, as an (h, w) tuple."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{prefix}{name} must be an int or an (h, w) pair, got {value!r}")
        vals = tuple(value)
    else:
        vals = (value, value)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{prefix}{name} must be a non-negative integer or pair, got {value!r}")
    return int(vals[0]), int(vals[1])


def check_shape(value, name, ndim, where=""):
    """A shape: a tuple or list of ``ndim`` non-negative ints that an array can have, as a tuple."""
    prefix = f"{where}: " if where else ""
    if (not isinstance(value, (tuple, list)) or len(value) != ndim
            or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in value)):
        raise ValueError(f"{prefix}{name} must be a tuple of {ndim} non-negative ints, got {value!r}")
    shape = tuple(int(s) for s in value)
    check_array_fits(shape, name, where)
    return shape


MAX_ARRAY_BYTES = np.iinfo(np.intp).max  # NumPy's limit on an array's bytes


def check_array_fits(shape, name, where=""):
    """An array of ``shape`` and 8-byte items must fit NumPy's limit: the product of its
    non-zero dimensions times 8 at most ``MAX_ARRAY_BYTES`` (an empty array's shape too)."""
    if math.prod(s for s in shape if s) * 8 > MAX_ARRAY_BYTES:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} {tuple(shape)} describes an array beyond NumPy's size limit")
