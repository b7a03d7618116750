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

_BYTE_LANES = np.arange(8)
#: The pass against the lowest bound (:func:`_below_lowest`) is kept while it finds at
#: most one entry in this many; beyond that, one pass per bound costs less.
_MOST_SHARED = 64


def row_hits(strip, t, mask=None, *, lowest_first: bool = False):
    """``(flat, vals)``: the entries of the 2-D ``strip`` with ``strip[i, j] >= t[i]``
    (``mask``: optional boolean scratch of the strip's shape).

    ``lowest_first``: compare against the lowest bound first, a faster pass than one
    against a bound per row, and sort out its hits by the rows' bounds (see
    :func:`_below_lowest`); for bounds known to be alike, such as a pivot's.

    >>> flat, vals = row_hits(np.array([[0.1, 0.9], [0.5, 0.4]], dtype=np.float32), np.array([0.5, 0.45]))
    >>> flat, vals
    (array([1, 2]), array([0.9, 0.5], dtype=float32))
    """
    t = np.asarray(t)
    if lowest_first:
        found = _below_lowest(strip, (t,), mask)
        if found is not None:
            return found[0]
    flat = sparse_flatnonzero(np.greater_equal(strip, t[:, None], out=mask))
    return flat, strip.reshape(-1)[flat]


def row_col_hits(strip, t, t_c, mask=None):
    """``(rows_flat, rows_vals, cols_flat, cols_vals)``: the entries of ``strip`` at or
    above their row's bound ``t[i]``, and those at or above their column's bound ``t_c[j]``.

    One comparison pass against the lowest of all these bounds finds a superset of both
    (with bounds as alike as a top-k's usually are, a few times the hits), which the exact
    bounds then sort out; where that superset is large (bounds far apart), the strip
    takes two passes instead, one per bound.

    >>> s = np.array([[0.1, 0.9], [0.5, 0.4]], dtype=np.float32)
    >>> row_col_hits(s, np.array([0.5, 0.45]), np.array([0.05, 0.95]))
    (array([1, 2]), array([0.9, 0.5], dtype=float32), array([0, 2]), array([0.1, 0.5], dtype=float32))
    """
    t, t_c = np.asarray(t), np.asarray(t_c)
    found = _below_lowest(strip, (t, t_c), mask)
    if found is not None:
        return (*found[0], *found[1])
    flat, vals = row_hits(strip, t, mask)
    flat_c = sparse_flatnonzero(np.greater_equal(strip, t_c[None, :], out=mask))
    return flat, vals, flat_c, strip.reshape(-1)[flat_c]


def _below_lowest(strip, bounds, mask):
    """``[(flat, vals), ...]``, one per bound in ``bounds`` (the rows' ``t``, then
    optionally the columns' ``t_c``), from one pass against the lowest of them all; or
    ``None`` where that pass finds more than one entry in :data:`_MOST_SHARED` (the
    bounds are too far apart for it to pay)."""
    if not strip.size:
        return None
    lowest = min(b.min() for b in bounds)
    flat = sparse_flatnonzero(np.greater_equal(strip, lowest, out=mask))
    if flat.size > strip.size // _MOST_SHARED:
        return None
    vals = strip.reshape(-1)[flat]
    at = np.divmod(flat, strip.shape[1])  # rows, columns
    out = []
    for b, bound in enumerate(bounds):
        keep = vals >= bound[at[b]]
        out.append((flat[keep], vals[keep]))
    return out


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
