"""Bound scans of the top-k kernels: the entries of a strip of a block product at or
above per-row (and per-column) bounds.

After the GEMM, these scans are the largest cost of a top-k task: every entry of the
block is compared once. :func:`row_hits` finds the entries at or above their row's
bound; :func:`row_col_hits` does it for the rows' and the columns' bounds at once (the
off-diagonal blocks of a self-similarity select for both). Both return row-major flat
indices into the strip (ascending) and the entries' values.
"""

from __future__ import annotations

import numpy as np

__all__ = ["row_hits", "row_col_hits", "sparse_flatnonzero"]

#: The scan of two bounds compares each row against the lower of its bound and the
#: columns' floor: this quantile of the column bounds. The columns below the floor (this
#: share of them) are compared on their own.
LOW_COLUMNS = 1 / 32
_BYTE_LANES = np.arange(8)


def row_hits(strip, t, mask=None):
    """``(flat, vals)``: the entries of the 2-D ``strip`` with ``strip[i, j] >= t[i]``
    (``mask``: optional boolean scratch of the strip's shape).

    >>> flat, vals = row_hits(np.array([[0.1, 0.9], [0.5, 0.4]], dtype=np.float32), np.array([0.5, 0.45]))
    >>> flat, vals
    (array([1, 2]), array([0.9, 0.5], dtype=float32))
    """
    flat = sparse_flatnonzero(np.greater_equal(strip, np.asarray(t)[:, None], out=mask))
    return flat, strip.reshape(-1)[flat]


def row_col_hits(strip, t, t_c, mask=None):
    """``(rows_flat, rows_vals, cols_flat, cols_vals)``: the entries of ``strip`` at or
    above their row's bound ``t[i]``, and those at or above their column's bound ``t_c[j]``.

    One comparison pass against each row's ``min(t, floor)`` (:func:`_column_floor`), the
    few low columns on their own, then the (few) hits split by the two bounds.

    >>> s = np.array([[0.1, 0.9], [0.5, 0.4]], dtype=np.float32)
    >>> row_col_hits(s, np.array([0.5, 0.45]), np.array([0.05, 0.95]))
    (array([1, 2]), array([0.9, 0.5], dtype=float32), array([0, 2]), array([0.1, 0.5], dtype=float32))
    """
    t, t_c = np.asarray(t), np.asarray(t_c)
    m = strip.shape[1]
    floor, low = _column_floor(t_c)
    lower = np.minimum(t, floor)
    flat = sparse_flatnonzero(np.greater_equal(strip, lower[:, None], out=mask))
    if low is not None:  # entries of the low columns under `lower`, against their own bounds
        lv = np.take(strip, low, axis=1)
        lr, lc = np.divmod(np.flatnonzero((lv >= t_c[low]) & (lv < lower[:, None])), low.size)
        flat = np.sort(np.concatenate([flat, lr * m + low[lc]]))
    vals = strip.reshape(-1)[flat]
    r, c = np.divmod(flat, m)
    row_hit, col_hit = vals >= t[r], vals >= t_c[c]
    return flat[row_hit], vals[row_hit], flat[col_hit], vals[col_hit]


def _column_floor(t_c):
    """``(floor, low)``: a value at most every column bound but those of ``low`` (an index
    array of at most :data:`LOW_COLUMNS` of the columns, or ``None``).

    An entry at or above its column's bound is at or above the floor, or in a low column:
    comparing rows against ``min(row bound, floor)`` and the low columns against their own
    bounds finds every entry either bound keeps, in about one pass over the strip.

    >>> floor, low = _column_floor(np.array([0.5, 0.4, -np.inf, 0.6] * 16, dtype=np.float32))
    >>> float(floor), low[:6]
    (0.4000000059604645, array([ 2,  6, 10, 14, 18, 22]))
    """
    bounded = t_c[t_c > -np.inf]  # columns without a bound are low whatever the floor
    if not bounded.size:
        return t_c.dtype.type(np.inf), np.arange(t_c.shape[0])
    kth = int(bounded.size * LOW_COLUMNS)
    floor = np.partition(bounded, kth)[kth]
    low = np.flatnonzero(t_c < floor)
    return floor, (low if low.size else None)


def sparse_flatnonzero(mask):
    """``np.flatnonzero`` of a boolean array with few true entries, faster.

    NumPy's ``nonzero`` visits every byte; here the mask is read 8 bytes at a time, and
    only the words holding a true byte are expanded (same result, same order).

    >>> sparse_flatnonzero(np.arange(20) % 7 == 3)
    array([ 3, 10, 17])
    """
    flat = mask.reshape(-1)
    whole = flat.size // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64) != 0)
    hits = ((words * 8)[:, None] + _BYTE_LANES).reshape(-1)
    hits = hits[flat[hits]]
    if whole < flat.size:
        hits = np.concatenate([hits, whole + np.flatnonzero(flat[whole:])])
    return hits
