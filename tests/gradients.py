"""How far an analytic gradient is from its central differences."""

import numpy as np


def rel_err(analytic, numeric):
    """max |a - n| / max |gradient|: the worst error, relative to the largest entry.

    Central differences of an O(1) loss in float64 carry round-off of about 1e-10 to
    1e-8 per entry, zeros included, so a relative error per entry would fail exact
    zeros; measured against the largest entry, a tolerance of 1e-6 still catches any
    entry that is wrong by more than a millionth of it.
    """
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    return float(np.abs(a - n).max(initial=0) / max(np.abs(a).max(initial=0), np.abs(n).max(initial=0), 1e-12))
