"""Per-block selection kernels: local top-k of a similarity block, merges, threshold filters.

Like :mod:`dask_cosim._kernels`, every function takes plain arrays of one block, derives
its array namespace ``xp`` and knows nothing of dask. The generic functions work for any
array-API namespace (NumPy, CuPy, ``array_api_strict``); :func:`topk_block` has an
isolated NumPy fast path (:func:`_topk_block_numpy`) that the tests check against the
generic path.

Ranking rules (shared by every function here, so results do not depend on chunking):
similarities are compared after clipping to [-1, 1]; higher ranks first; equal values
rank by the smaller column index ``j``; NaN ranks after every number; an excluded
diagonal entry (``exclude_self``) ranks after NaN and never reaches a final result.
Internally a candidate is a *key* (the clipped similarity, or :data:`NAN_KEY` /
:data:`EXCLUDED_KEY`, both below -1) and a global column index.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

from ._backend import blas_threads_for_task, block_namespace, limit_blas, to_host_like
from ._kernels import reduce_precision, similarity_block

__all__ = [
    "NAN_KEY",
    "EXCLUDED_KEY",
    "similarity_keys",
    "select_topk",
    "topk_block",
    "merge_topk",
    "finish_topk",
    "select_above",
    "pairs_block",
]

#: Key of a NaN similarity: below every clipped similarity, so NaN ranks last.
NAN_KEY = -2.0
#: Key of an excluded diagonal entry: below NaN.
EXCLUDED_KEY = -3.0
#: Number of column groups whose maxima bound the k-th best value of a row.
_GROUPS = 128
#: Row strips of the NumPy fast path hold about this many bytes of similarities.
_STRIP_BYTES = 4 * 2**20


# --------------------------------------------------------------------------- keys


def _diagonal_mask(xp, shape, row_offset: int, col_offset: int, device=None):
    """Boolean ``(n, m)`` mask of the global diagonal ``row_offset + r == col_offset + c``."""
    n, m = shape[-2], shape[-1]
    r = xp.arange(n, device=device)[:, None] + row_offset
    c = xp.arange(m, device=device)[None, :] + col_offset
    return r == c


def similarity_keys(s, *, row_offset: int = 0, col_offset: int = 0, exclude_self: bool = False):
    """Ranking keys of a similarity block ``(..., n, m)``: clipped values, NaN and diagonal marked.

    Examples
    --------
    >>> similarity_keys(np.array([[1.5, np.nan], [0.5, 1.0]]), exclude_self=True)
    array([[-3., -2.],
           [ 0.5, -3.]])
    """
    xp = array_api_compat.array_namespace(s)
    dev = array_api_compat.device(s)
    key = xp.clip(s, -1.0, 1.0)
    key = xp.where(xp.isnan(key), xp.asarray(NAN_KEY, dtype=key.dtype, device=dev), key)
    if exclude_self:
        diag = _diagonal_mask(xp, key.shape, row_offset, col_offset, device=dev)
        key = xp.where(diag, xp.asarray(EXCLUDED_KEY, dtype=key.dtype, device=dev), key)
    return key


# --------------------------------------------------------------------------- generic top-k


def _group_count(m: int, kk: int) -> int:
    return max(kk, min(m, _GROUPS))


def _topk_rows(xp, key, kk: int):
    """Exact top-``kk`` of each row of a 2-D key array ``(R, m)``: ``(keys, local columns)``.

    Pruned selection: the ``kk``-th largest of the maxima of ``g`` column groups is a
    lower bound ``t`` of the ``kk``-th largest key, so only entries ``>= t`` (all of the
    top ``kk`` and their ties) are candidates; the candidates are then ordered by (row,
    key descending, column) with stable sorts.
    """
    rows_n, m = key.shape
    dev = array_api_compat.device(key)
    g = _group_count(m, kk)
    slabs = m // g
    grouped = xp.reshape(key[:, : slabs * g], (rows_n, slabs, g))
    gmax = xp.max(grouped, axis=1)
    t = xp.sort(gmax, axis=-1)[:, g - kk]
    mask = key >= t[:, None]
    flat = xp.nonzero(xp.reshape(mask, (-1,)))[0]
    vals = xp.take(xp.reshape(key, (-1,)), flat)
    rows = flat // m
    by_value = xp.argsort(vals, descending=True, stable=True)  # ties keep column order
    order = xp.take(by_value, xp.argsort(xp.take(rows, by_value), stable=True))
    rows_sorted = xp.take(rows, order)
    starts = xp.searchsorted(rows_sorted, xp.arange(rows_n, dtype=rows_sorted.dtype, device=dev))
    rank = xp.arange(rows_sorted.shape[0], dtype=rows_sorted.dtype, device=dev) - xp.take(starts, rows_sorted)
    chosen = order[rank < kk]
    top = xp.reshape(xp.take(vals, chosen), (rows_n, kk))
    cols = xp.reshape(xp.take(flat, chosen) % m, (rows_n, kk))
    return top, cols


def select_topk(
    s,
    k: int,
    *,
    axis: int = -1,
    row_offset: int = 0,
    col_offset: int = 0,
    exclude_self: bool = False,
):
    """Local top-``k`` of a similarity block ``(..., n, m)`` for any array namespace.

    Parameters
    ----------
    s
        Similarities (clipped or not; NaN allowed).
    k
        Wanted entries per row; blocks narrower than ``k`` return all of theirs.
    axis
        ``-1``: the best columns of every row (result ``(..., n, min(k, m))``,
        indices ``col_offset + c``); ``-2``: the best rows of every column (result
        ``(..., m, min(k, n))``, indices ``row_offset + r``), i.e. the top-k of the
        transposed block.
    row_offset, col_offset
        Global index of the block's first row and column.
    exclude_self
        Drop the global diagonal (rank it last, as :data:`EXCLUDED_KEY`).

    Returns
    -------
    keys, idx
        Ranking keys (see :func:`similarity_keys`) sorted best first and global int64
        indices.

    Examples
    --------
    >>> keys, idx = select_topk(np.array([[0.1, 0.9, 0.9, np.nan]]), 3, col_offset=10)
    >>> keys, idx
    (array([[0.9, 0.9, 0.1]]), array([[11, 12, 10]]))
    """
    xp = array_api_compat.array_namespace(s)
    key = similarity_keys(s, row_offset=row_offset, col_offset=col_offset, exclude_self=exclude_self)
    if axis in (-2, key.ndim - 2):
        key = xp.permute_dims(key, (*range(key.ndim - 2), key.ndim - 1, key.ndim - 2))
        offset = row_offset
    elif axis in (-1, key.ndim - 1):
        offset = col_offset
    else:
        raise ValueError(f"axis: expected -1 (rows) or -2 (columns), received {axis}")
    lead, (n, m) = key.shape[:-2], key.shape[-2:]
    kk = min(k, m)
    if n == 0 or kk == 0 or any(d == 0 for d in lead):
        empty_k = xp.empty((*lead, n, kk), dtype=key.dtype, device=array_api_compat.device(key))
        return empty_k, xp.astype(xp.zeros_like(empty_k), xp.int64)
    batch = 1
    for d in lead:
        batch *= d
    top, cols = _topk_rows(xp, xp.reshape(key, (batch * n, m)), kk)
    idx = xp.astype(cols, xp.int64) + offset
    return xp.reshape(top, (*lead, n, kk)), xp.reshape(idx, (*lead, n, kk))


# --------------------------------------------------------------------------- fused block


def topk_block(
    an,
    bn,
    *,
    k: int,
    row_offset: int = 0,
    col_offset: int = 0,
    exclude_self: bool = False,
    both: bool = False,
    out_dtype: str | None = None,
    device: str = "cpu",
    blas_threads: int | None = None,
    like: str = "numpy",
    precision: str = "float32",
    fast: bool = True,
):
    """Product of two normalised blocks and its local top-``k``, without keeping the product.

    Returns the row part ``(keys, idx)`` (best columns of every row of ``an``); with
    ``both=True`` a pair ``(rows_part, cols_part)`` where ``cols_part`` holds the best rows
    of every column (the top-k of the transposed block, for self-similarity triangles).
    Selection runs where the product ran; ``like="numpy"`` brings the small results to
    the host. ``precision`` is that of :func:`~dask_cosim._kernels.similarity_block`.
    ``fast=False`` forces the generic array-API path (used by tests).

    Examples
    --------
    >>> an = np.array([[1.0, 0.0], [0.6, 0.8]])
    >>> keys, idx = topk_block(an, an, k=1, exclude_self=True)
    >>> idx
    array([[1],
           [0]])
    """
    xp, an = block_namespace(an, device)
    if array_api_compat.is_cupy_array(an):
        import cupy

        bn = cupy.asarray(bn)
    else:
        _, bn = block_namespace(bn, device)
    offsets = {"row_offset": row_offset, "col_offset": col_offset, "exclude_self": exclude_self}
    if fast and isinstance(an, np.ndarray) and isinstance(bn, np.ndarray):
        if precision != "float32":
            an, bn = reduce_precision(an, precision), reduce_precision(bn, precision)
        with limit_blas(blas_threads_for_task(blas_threads)):
            s = np.matmul(an, np.swapaxes(bn, -1, -2))
        parts = _topk_block_numpy(s, an, bn, k, both=both, **offsets)
    else:
        s = similarity_block(
            an, bn, device=device, blas_threads=blas_threads, like="input", precision=precision
        )
        rows = select_topk(s, k, axis=-1, **offsets)
        parts = (rows, select_topk(s, k, axis=-2, **offsets)) if both else (rows,)
    del s
    parts = tuple(_cast_part(p, out_dtype, like) for p in parts)
    return parts if both else parts[0]


def _cast_part(part, out_dtype, like: str):
    keys, idx = part
    if out_dtype is not None:
        xp = array_api_compat.array_namespace(keys)
        want = getattr(xp, out_dtype)
        if keys.dtype != want:
            keys = xp.astype(keys, want)
    return to_host_like(keys, like), to_host_like(idx, like)


# --------------------------------------------------------------------------- NumPy fast path


def _topk_block_numpy(s, an, bn, k: int, *, both: bool, row_offset: int, col_offset: int, exclude_self: bool):
    """NumPy twin of ``select_topk`` on a raw (unclipped) product, modified in place.

    NaN similarities only come from NaN vectors, so they are marked from ``an``/``bn``
    (cheap) instead of scanning the block; clipping is applied to candidates only
    (see :func:`_threshold`).
    """
    lead, (n, m) = s.shape[:-2], s.shape[-2:]
    if s.size == 0:
        offsets = {"row_offset": row_offset, "col_offset": col_offset, "exclude_self": exclude_self}
        rows = select_topk(s, k, axis=-1, **offsets)
        return (rows, select_topk(s, k, axis=-2, **offsets)) if both else (rows,)
    _mark_numpy(s, an, bn, row_offset, col_offset, exclude_self)
    batch = int(np.prod(lead)) if lead else 1
    rows = _topk_rows_numpy(s.reshape(batch * n, m), min(k, m))
    rows = (rows[0].reshape(*lead, n, -1), (rows[1] + col_offset).reshape(*lead, n, -1))
    if not both:
        return (rows,)
    s3 = s.reshape(batch, n, m)
    cols = [_topk_cols_numpy(s3[b], min(k, n)) for b in range(batch)]
    keys = np.stack([c[0] for c in cols]).reshape(*lead, m, -1)
    idx = (np.stack([c[1] for c in cols]) + row_offset).reshape(*lead, m, -1)
    return rows, (keys, idx)


def _mark_numpy(s, an, bn, row_offset: int, col_offset: int, exclude_self: bool) -> None:
    nan_a = np.isnan(an).any(axis=-1)
    nan_b = np.isnan(bn).any(axis=-1)
    if nan_a.any() or nan_b.any():
        nan = nan_a[..., :, None] | nan_b[..., None, :]
        s[np.broadcast_to(nan, s.shape)] = NAN_KEY
    if exclude_self:
        n, m = s.shape[-2:]
        r = np.arange(max(0, col_offset - row_offset), min(n, m + col_offset - row_offset))
        s[..., r, r + row_offset - col_offset] = EXCLUDED_KEY


def _threshold(t):
    """Candidate bound on raw products from a bound ``t`` of the k-th best raw value.

    Clipping to [-1, 1] is monotone, so an entry below ``t`` loses to the ``kk`` entries
    at or above it, unless clipping makes them equal: at ``t >= 1`` every entry that
    clips to 1 is a candidate, and at ``t <= -1`` every entry is.
    """
    t = np.minimum(t, 1.0)
    t[t <= -1.0] = -np.inf
    return t


def _clip_candidates(vals):
    """Clip candidate values to [-1, 1], leaving the NaN/excluded keys (< -1.5) alone."""
    return np.where(vals < -1.5, vals, np.clip(vals, -1.0, 1.0))


def _rank_groups(group, vals, kk: int, ngroups: int):
    """Indices (into the candidates) of the best ``kk`` per group, ordered; ties keep input order."""
    order = np.lexsort((-vals, group))
    group = group[order]
    counts = np.bincount(group, minlength=ngroups)
    starts = np.cumsum(counts) - counts
    rank = np.arange(group.size) - starts[group]
    return order[rank < kk]


def _topk_rows_numpy(s, kk: int):
    """Top-``kk`` of every row of a contiguous 2-D raw product, strip by strip."""
    rows_n, m = s.shape
    keys = np.empty((rows_n, kk), dtype=s.dtype)
    idx = np.empty((rows_n, kk), dtype=np.int64)
    g = _group_count(m, kk)
    slabs = m // g
    step = max(1, _STRIP_BYTES // max(1, m * s.itemsize))
    mask = np.empty((min(step, rows_n), m), dtype=bool)
    for start in range(0, rows_n, step):
        block = s[start : start + step]
        r = block.shape[0]
        gmax = block[:, : slabs * g].reshape(r, slabs, g).max(axis=1)
        t = _threshold(np.partition(gmax, g - kk, axis=1)[:, g - kk])
        flat = np.flatnonzero(np.greater_equal(block, t[:, None], out=mask[:r]))
        vals = _clip_candidates(block.reshape(-1)[flat])
        chosen = _rank_groups(flat // m, vals, kk, r)
        keys[start : start + r] = vals[chosen].reshape(r, kk)
        idx[start : start + r] = (flat[chosen] % m).reshape(r, kk)
    return keys, idx


def _topk_cols_numpy(s, kk: int):
    """Top-``kk`` of every column of a 2-D raw product (the rows of its transpose)."""
    n, m = s.shape
    g = _group_count(n, kk)
    slabs = n // g
    gmax = s[: slabs * g].reshape(slabs, g, m).max(axis=0)
    t = _threshold(np.partition(gmax, g - kk, axis=0)[g - kk])
    step = max(1, _STRIP_BYTES // max(1, m * s.itemsize))
    mask = np.empty((min(step, n), m), dtype=bool)
    flats = []
    for start in range(0, n, step):
        block = s[start : start + step]
        flats.append(
            np.flatnonzero(np.greater_equal(block, t[None, :], out=mask[: block.shape[0]])) + start * m
        )
    flat = np.concatenate(flats)
    vals = _clip_candidates(s.reshape(-1)[flat])
    chosen = _rank_groups(flat % m, vals, kk, m)
    return vals[chosen].reshape(m, kk), (flat[chosen] // m).reshape(m, kk)


# --------------------------------------------------------------------------- merging


def merge_topk(parts, k: int):
    """Merge local top-k parts ``[(keys, idx), ...]`` of the same rows into one, best first.

    Examples
    --------
    >>> p1 = (np.array([[0.9, 0.1]]), np.array([[3, 1]]))
    >>> p2 = (np.array([[0.9, 0.5]]), np.array([[0, 2]]))
    >>> merge_topk([p1, p2], 3)
    (array([[0.9, 0.9, 0.5]]), array([[0, 3, 2]]))
    """
    if isinstance(parts, tuple):
        parts = [parts]
    xp = array_api_compat.array_namespace(parts[0][0], parts[0][1])
    keys = xp.concat([p[0] for p in parts], axis=-1) if len(parts) > 1 else parts[0][0]
    idx = xp.concat([p[1] for p in parts], axis=-1) if len(parts) > 1 else parts[0][1]
    by_index = xp.argsort(idx, axis=-1, stable=True)
    keys = xp.take_along_axis(keys, by_index, axis=-1)
    idx = xp.take_along_axis(idx, by_index, axis=-1)
    order = xp.argsort(keys, axis=-1, descending=True, stable=True)[..., :k]
    return xp.take_along_axis(keys, order, axis=-1), xp.take_along_axis(idx, order, axis=-1)


def finish_topk(part):
    """Final ``(values, idx)`` from merged keys: NaN keys become NaN values.

    Examples
    --------
    >>> finish_topk((np.array([[0.5, NAN_KEY]]), np.array([[1, 0]])))
    (array([[0.5, nan]]), array([[1, 0]]))
    """
    keys, idx = part
    xp = array_api_compat.array_namespace(keys)
    nan = xp.asarray(xp.nan, dtype=keys.dtype, device=array_api_compat.device(keys))
    return xp.where(keys == NAN_KEY, nan, keys), idx


# --------------------------------------------------------------------------- thresholds


def select_above(
    s,
    threshold: float,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    batch_offset: int = 0,
    upper: bool = False,
    exclude_self: bool = False,
):
    """Every entry of a similarity block ``(..., n, m)`` with ``s >= threshold``.

    Parameters
    ----------
    upper
        Keep only global ``j >= i`` (self-similarity: each unordered pair once).
    exclude_self
        Drop the global diagonal ``i == j``.

    Returns
    -------
    batch, i, j, score
        1-D arrays in row-major order: global batch, row and column (int64) and the
        similarity. NaN never passes.

    Examples
    --------
    >>> select_above(np.array([[1.0, 0.2], [0.95, 1.0]]), 0.1, upper=True, exclude_self=True)
    (array([0]), array([0]), array([1]), array([0.2]))
    """
    xp = array_api_compat.array_namespace(s)
    dev = array_api_compat.device(s)
    s3 = s if s.ndim == 3 else s[None, ...]
    mask = s3 >= threshold
    if upper or exclude_self:
        r = xp.arange(s3.shape[-2], device=dev)[:, None] + row_offset
        c = xp.arange(s3.shape[-1], device=dev)[None, :] + col_offset
        keep = (c > r) if (upper and exclude_self) else (c >= r) if upper else (c != r)
        mask = mask & keep
    b, i, j = xp.nonzero(mask)
    score = s3[mask]
    as64 = lambda v, off: xp.astype(v, xp.int64) + off  # noqa: E731
    return as64(b, batch_offset), as64(i, row_offset), as64(j, col_offset), score


def pairs_block(
    an,
    bn,
    *,
    threshold: float,
    row_offset: int = 0,
    col_offset: int = 0,
    batch_offset: int = 0,
    upper: bool = False,
    exclude_self: bool = False,
    out_dtype: str | None = None,
    device: str = "cpu",
    blas_threads: int | None = None,
    like: str = "numpy",
    precision: str = "float32",
):
    """Product of two normalised blocks filtered by :func:`select_above` (the block is dropped).

    Examples
    --------
    >>> an, bn = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> b, i, j, score = pairs_block(an, bn, threshold=0.5)
    >>> j, score
    (array([1]), array([1.]))
    """
    s = similarity_block(
        an,
        bn,
        out_dtype=out_dtype,
        device=device,
        blas_threads=blas_threads,
        like="input",
        precision=precision,
    )
    out = select_above(
        s,
        threshold,
        row_offset=row_offset,
        col_offset=col_offset,
        batch_offset=batch_offset,
        upper=upper,
        exclude_self=exclude_self,
    )
    return tuple(to_host_like(v, like) for v in out)
