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

Scores (:mod:`dask_cosim._rescore`): :func:`topk_block` and :func:`pairs_block` rank by
each pair's deterministic score, not by the block product: the product selects the
candidates with a margin that bounds its rounding, and the candidates that can still
reach a row's best ``k`` (or lie within the margin of a threshold) are scored. The
parts they return hold scores, so merges compare values that do not depend on where a
pair was computed.

Pruning: a block's local top-k needs only the entries that can still reach the row's
final top-k. Any top-k part of the same rows (a *pivot*, e.g. from the block computed
first) bounds that: its k-th best key ``t`` is at most the final k-th best, so entries
below ``t`` are dropped early and the part is filled with :data:`PAD_KEY` / index -1
(never in a final result). Without a pivot, each row's bound comes from the maxima of
``g`` column groups (at least ``k`` groups reach it).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache, partial

import array_api_compat
import numpy as np

from ._backend import (
    blas_threads_for_task,
    block_namespace,
    choose_backend,
    limit_blas,
    to_host_like,
    to_numpy,
)
from ._kernels import matmul_clip_numpy, similarity_block, transposed_numpy
from ._options import CHOICES
from ._rescore import Rescorer, score_margin, score_operands
from ._scan import row_col_hits, row_hits, sparse_flatnonzero
from ._sparse import SparseProduct, is_sparse, sparse_similarity_block
from ._sparse import nan_rows as find_nan_rows

__all__ = [
    "NAN_KEY",
    "EXCLUDED_KEY",
    "PAD_KEY",
    "part_bound",
    "similarity_keys",
    "select_topk",
    "topk_block",
    "merge_topk",
    "finish_topk",
    "select_above",
    "pairs_block",
    "LABEL_PAIRS",
    "label_excluded",
]

#: Key of a NaN similarity: below every clipped similarity, so NaN ranks last.
NAN_KEY = -2.0
#: Key of an excluded diagonal entry: below NaN.
EXCLUDED_KEY = -3.0
#: Key of padding (index -1) where a pruned block has fewer than k candidates in a row.
PAD_KEY = -4.0
#: Label masks: ``"different"`` keeps pairs whose labels differ, ``"same"`` pairs that share one.
LABEL_PAIRS = CHOICES["label_pairs"]
#: Number of column groups whose maxima bound the k-th best value of a row.
_GROUPS = 128
#: Row strips of the NumPy fast path hold about this many bytes of similarities.
_STRIP_BYTES = 4 * 2**20
#: ... and at least this many rows (small GEMMs are inefficient).
_MIN_STRIP_ROWS = 256
#: Where every row's bound is known before its strip is computed, strips are computed
#: and scanned in tiles of :data:`_MIN_STRIP_ROWS` rows and about this many bytes, which
#: the core's L2 cache holds from the GEMM that writes them to the scans that read them.
_GEMM_TILE_BYTES = 2 * 2**20
#: OpenBLAS runs a product with fewer multiply-adds than this on one thread anyway
#: (``GEMM_MULTITHREAD_THRESHOLD`` x 65536), so such blocks skip the process-wide BLAS
#: thread limit, whose changes cost more than the product.
_SMALL_GEMM = 4 * 65536


# --------------------------------------------------------------------------- keys


def _diagonal_mask(xp, shape, row_offset: int, col_offset: int, device=None):
    """Boolean ``(n, m)`` mask of the global diagonal ``row_offset + r == col_offset + c``."""
    n, m = shape[-2], shape[-1]
    r = xp.arange(n, device=device)[:, None] + row_offset
    c = xp.arange(m, device=device)[None, :] + col_offset
    return r == c


def label_excluded(row_labels, col_labels, label_pairs: str = "different"):
    """Boolean ``(n, m)`` mask of the pairs a label mask drops (any array namespace).

    ``label_pairs="different"`` keeps pairs whose labels differ (drops equal labels),
    ``"same"`` keeps pairs within a label (drops different labels).

    Examples
    --------
    >>> label_excluded(np.array([0, 1]), np.array([0, 0, 1]))
    array([[ True,  True, False],
           [False, False,  True]])
    """
    if label_pairs == "different":
        return row_labels[:, None] == col_labels[None, :]
    if label_pairs == "same":
        return row_labels[:, None] != col_labels[None, :]
    raise ValueError(f"label_pairs: expected one of {LABEL_PAIRS}, received {label_pairs!r}")


def _labels_like(labels, x):
    """Label slices moved to where block ``x`` lives (labels travel as host arrays)."""
    return None if labels is None else _bound_like(labels, x)


def similarity_keys(
    s, *, row_offset: int = 0, col_offset: int = 0, exclude_self: bool = False, excluded=None
):
    """Ranking keys of a similarity block ``(..., n, m)``: clipped values, NaN and diagonal marked.

    ``excluded``: optional boolean ``(n, m)`` mask (a label mask) whose entries are keyed
    :data:`EXCLUDED_KEY`, like the diagonal with ``exclude_self``.

    Examples
    --------
    >>> similarity_keys(np.array([[1.5, np.nan], [0.5, 1.0]]), exclude_self=True)
    array([[-3. , -2. ],
           [ 0.5, -3. ]])
    """
    if excluded is not None:
        key = similarity_keys(s, row_offset=row_offset, col_offset=col_offset, exclude_self=exclude_self)
        xp = array_api_compat.array_namespace(key)
        mark = xp.asarray(EXCLUDED_KEY, dtype=key.dtype, device=array_api_compat.device(key))
        return xp.where(excluded, mark, key)
    if isinstance(s, np.ndarray):
        return _similarity_keys_numpy(s, row_offset, col_offset, exclude_self)
    if array_api_compat.is_cupy_array(s):
        n, m = s.shape[-2:]
        return _cupy_keys_kernel()(s, n, m, row_offset, col_offset, bool(exclude_self))
    xp = array_api_compat.array_namespace(s)
    dev = array_api_compat.device(s)
    key = xp.clip(s, -1.0, 1.0)
    key = xp.where(xp.isnan(key), xp.asarray(NAN_KEY, dtype=key.dtype, device=dev), key)
    if exclude_self:
        diag = _diagonal_mask(xp, key.shape, row_offset, col_offset, device=dev)
        key = xp.where(diag, xp.asarray(EXCLUDED_KEY, dtype=key.dtype, device=dev), key)
    return key


def _similarity_keys_numpy(s, row_offset: int, col_offset: int, exclude_self: bool):
    """:func:`similarity_keys` with NumPy's own ``clip`` and masked ``copyto``, one pass per step.

    The array-API ``clip`` of ``array_api_compat`` assigns through boolean masks, several
    times slower than these steps; on CuPy the fused :func:`_cupy_keys_kernel` is faster
    still (figures: README, "Checking a GPU machine").
    """
    key = np.clip(s, -1.0, 1.0).astype(s.dtype, copy=False)
    np.copyto(key, NAN_KEY, where=np.isnan(key))
    if exclude_self:
        xp = array_api_compat.array_namespace(key)  # arange(device=) on NumPy < 2 too
        np.copyto(key, EXCLUDED_KEY, where=_diagonal_mask(xp, key.shape, row_offset, col_offset))
    return key


@lru_cache(maxsize=1)
def _cupy_keys_kernel():
    """CuPy twin of :func:`similarity_keys` (``i``: the element's flat index, C order)."""
    import cupy

    return cupy.ElementwiseKernel(
        "T s, int64 n, int64 m, int64 r0, int64 c0, bool exclude_self",
        "T key",
        f"""
        T v = s;
        if (v != v) {{ v = (T)({NAN_KEY}); }}
        else if (v > (T)1) {{ v = (T)1; }}
        else if (v < (T)(-1)) {{ v = (T)(-1); }}
        if (exclude_self) {{
            long long q = i % (n * m);
            if (q / m + r0 == q % m + c0) v = (T)({EXCLUDED_KEY});
        }}
        key = v;
        """,
        "dask_cosim_similarity_keys",
    )


# --------------------------------------------------------------------------- generic top-k


def _group_count(m: int, kk: int) -> int:
    return max(kk, min(m, _GROUPS))


def _topk_rows(xp, key, kk: int, score=None, margin: float = 0.0, bound=None):
    """Exact top-``kk`` of each row of a 2-D key array ``(R, m)``: ``(keys, local columns)``.

    Pruned selection: the ``kk``-th largest of the maxima of ``g`` column groups is a
    lower bound ``t`` of the ``kk``-th largest key, so only entries ``>= t`` (all of the
    top ``kk`` and their ties) are candidates; the candidates are then ordered by (row,
    key descending, column) with stable sorts.

    ``score(rows, cols)``: the keys are products within ``margin`` of the entries'
    scores; candidates are then taken ``2 margin`` lower, those that can still reach a
    row's best ``kk`` by score are scored (as :func:`_rescore_candidates`), and ranked by
    score; scores below the row's ``bound`` (if given) become :data:`PAD_KEY`.
    """
    rows_n, m = key.shape
    dev = array_api_compat.device(key)
    g = _group_count(m, kk)
    slabs = m // g
    grouped = xp.reshape(key[:, : slabs * g], (rows_n, slabs, g))
    gmax = xp.max(grouped, axis=1)
    t = xp.sort(gmax, axis=-1)[:, g - kk]
    mask = key >= (t - 2 * margin)[:, None] if score is not None else key >= t[:, None]
    flat = xp.nonzero(xp.reshape(mask, (-1,)))[0]
    vals = xp.take(xp.reshape(key, (-1,)), flat)
    rows = flat // m
    order, rank, starts = _order_candidates(xp, rows, vals, rows_n, dev)
    if score is not None:
        counts = xp.concat([starts[1:], xp.asarray([rows.shape[0]], dtype=starts.dtype, device=dev)]) - starts
        at = xp.take(vals, xp.take(order, xp.clip(starts + kk - 1, 0, max(0, rows.shape[0] - 1))))
        kth = xp.where(counts >= kk, at, xp.asarray(PAD_KEY, dtype=vals.dtype, device=dev))
        keep = xp.nonzero(vals >= xp.take(kth, rows) - 2 * margin)[0]
        flat, vals, rows = xp.take(flat, keep), xp.take(vals, keep), xp.take(rows, keep)
        vals = _scored(xp, vals, rows, flat % m, score)
        if bound is not None:
            pad = xp.asarray(PAD_KEY, dtype=vals.dtype, device=dev)
            vals = xp.where(vals >= xp.take(bound, rows), vals, pad)
        order, rank, _ = _order_candidates(xp, rows, vals, rows_n, dev)
    chosen = order[rank < kk]
    top = xp.reshape(xp.take(vals, chosen), (rows_n, kk))
    cols = xp.reshape(xp.take(flat, chosen) % m, (rows_n, kk))
    return top, cols


def _order_candidates(xp, rows, vals, rows_n: int, dev):
    """Candidates (in row-major order) ordered by (row, value descending, column):
    ``(order, rank of each ordered candidate within its row, first position of each row)``."""
    by_value = xp.argsort(vals, descending=True, stable=True)  # ties keep column order
    order = xp.take(by_value, xp.argsort(xp.take(rows, by_value), stable=True))
    rows_sorted = xp.take(rows, order)
    starts = xp.searchsorted(rows_sorted, xp.arange(rows_n, dtype=rows_sorted.dtype, device=dev))
    rank = xp.arange(rows_sorted.shape[0], dtype=rows_sorted.dtype, device=dev) - xp.take(starts, rows_sorted)
    return order, rank, starts


def _scored(xp, vals, rows, cols, score):
    """``vals`` with each real similarity (not a NaN / excluded / padding key) replaced by its score."""
    real = vals >= -1.5
    where = xp.nonzero(real)[0]
    if where.shape[0] == 0:
        return vals
    return _fill(xp, real, score(xp.take(rows, where), xp.take(cols, where)), vals)


def _fill(xp, mask, new, vals):
    """``vals`` with its ``mask`` entries replaced, in order, by ``new`` (a scatter in array-API terms)."""
    slot = xp.cumulative_sum(xp.astype(mask, xp.int64)) - 1  # position in new of each masked entry
    return xp.where(mask, xp.take(xp.astype(new, vals.dtype), xp.clip(slot, 0, None)), vals)


def select_topk(
    s,
    k: int,
    *,
    axis: int = -1,
    row_offset: int = 0,
    col_offset: int = 0,
    exclude_self: bool = False,
    bound=None,
    excluded=None,
    rescorer=None,
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
    bound
        Optional lower bound of each selected row's final k-th best key (shape
        ``(..., n)`` for ``axis=-1``, ``(..., m)`` for ``axis=-2``): entries below it are
        dropped and the rows padded (:data:`PAD_KEY`, index -1).
    excluded
        Optional boolean ``(n, m)`` mask of entries ranked last like the excluded
        diagonal (a label mask, :func:`label_excluded`).
    rescorer
        Optional :class:`~dask_cosim._rescore.Rescorer` of the block's operands: ``s`` is
        their product, within ``rescorer.margin`` of the pairs' scores, and the result
        ranks (and holds) the scores (:mod:`dask_cosim._rescore`).

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
    key = similarity_keys(
        s, row_offset=row_offset, col_offset=col_offset, exclude_self=exclude_self, excluded=excluded
    )
    score = None
    if axis in (-2, key.ndim - 2):
        key = xp.permute_dims(key, (*range(key.ndim - 2), key.ndim - 1, key.ndim - 2))
        offset = row_offset
        score = None if rescorer is None else rescorer.cols
    elif axis in (-1, key.ndim - 1):
        offset = col_offset
        score = None if rescorer is None else rescorer.rows
    else:
        raise ValueError(f"axis: expected -1 (rows) or -2 (columns), received {axis}")
    lead, (n, m) = key.shape[:-2], key.shape[-2:]
    kk = min(k, m)
    if n == 0 or kk == 0 or any(d == 0 for d in lead):
        empty_k = xp.empty((*lead, n, kk), dtype=key.dtype, device=array_api_compat.device(key))
        return empty_k, xp.astype(xp.zeros_like(empty_k), xp.int64)
    margin = 0.0 if rescorer is None else rescorer.margin
    if bound is not None:
        pad = xp.asarray(PAD_KEY, dtype=key.dtype, device=array_api_compat.device(key))
        key = xp.where(key >= xp.astype(bound, key.dtype)[..., None] - margin, key, pad)
    batch = 1
    for d in lead:
        batch *= d
    flat_bound = None
    if bound is not None and score is not None:
        flat_bound = xp.reshape(xp.broadcast_to(xp.astype(bound, key.dtype), (*lead, n)), (-1,))
    top, cols = _topk_rows(xp, xp.reshape(key, (batch * n, m)), kk, score, margin, flat_bound)
    idx = xp.astype(cols, xp.int64) + offset
    if bound is not None:
        idx = xp.where(
            top == PAD_KEY, xp.asarray(-1, dtype=xp.int64, device=array_api_compat.device(idx)), idx
        )
    return xp.reshape(top, (*lead, n, kk)), xp.reshape(idx, (*lead, n, kk))


def part_bound(part, k: int):
    """Lower bound of the final k-th best key of each row, from any top-k part of those rows.

    The part's own k-th best key (``-inf`` if it holds fewer than ``k`` entries).

    Examples
    --------
    >>> part_bound((np.array([[0.9, 0.5, 0.1]]), np.array([[4, 2, 0]])), 2)
    array([0.5])
    """
    keys = part[0]
    xp = array_api_compat.array_namespace(keys)
    if keys.shape[-1] < k:
        return xp.full(keys.shape[:-1], -xp.inf, dtype=keys.dtype, device=array_api_compat.device(keys))
    return keys[..., k - 1]


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
    row_pivot=None,
    col_pivot=None,
    fast: bool = True,
    row_labels=None,
    col_labels=None,
    label_pairs: str = "different",
    symmetric: bool = False,
):
    """Product of two normalised blocks and its local top-``k``, without keeping the product.

    Returns the row part ``(keys, idx)`` (best columns of every row of ``an``); with
    ``both=True`` a pair ``(rows_part, cols_part)`` where ``cols_part`` holds the best rows
    of every column (the top-k of the transposed block, for self-similarity triangles).
    Selection runs where the product ran; ``like="numpy"`` brings the small results to
    the host. ``precision`` is that of :func:`~dask_cosim._kernels.similarity_block`.
    ``row_pivot`` / ``col_pivot``: top-k parts of the same rows / columns from another
    block, whose k-th best keys prune this block (:func:`part_bound`).
    ``fast=False`` forces the generic array-API path (used by tests).
    ``row_labels`` / ``col_labels``: 1-D integer labels of the block's rows and columns;
    pairs the mask ``label_pairs`` drops (:func:`label_excluded`) rank last like the
    excluded diagonal.
    ``symmetric``: ``an`` and ``bn`` are the same vectors (a diagonal block of a
    self-similarity, ``row_offset == col_offset``): a 2-D NumPy block is then computed
    as the upper triangle of its tiles (:func:`_topk_diagonal_tiled`), the same part.

    Examples
    --------
    >>> an = np.array([[1.0, 0.0], [0.6, 0.8]])
    >>> keys, idx = topk_block(an, an, k=1, exclude_self=True)
    >>> idx
    array([[1],
           [0]])
    """
    offsets = {"row_offset": row_offset, "col_offset": col_offset, "exclude_self": exclude_self}
    if is_sparse(an) or is_sparse(bn):  # normalised CSR blocks: the fused NumPy path, sparse strips
        parts = _topk_block_tiled(
            an,
            bn,
            k,
            both=both,
            row_bound=None if row_pivot is None else to_numpy(part_bound(row_pivot, k)),
            col_bound=None if col_pivot is None else to_numpy(part_bound(col_pivot, k)),
            labels=None if row_labels is None else (to_numpy(row_labels), to_numpy(col_labels), label_pairs),
            **offsets,
        )
        parts = tuple(_cast_part(p, out_dtype, like) for p in parts)
        return parts if both else parts[0]
    xp, an = block_namespace(an, device)
    if array_api_compat.is_cupy_array(an):
        import cupy

        bn = cupy.asarray(bn)
    else:
        _, bn = block_namespace(bn, device)
    row_bound = None if row_pivot is None else _bound_like(part_bound(row_pivot, k), an)
    col_bound = None if col_pivot is None else _bound_like(part_bound(col_pivot, k), an)
    labels = None
    if row_labels is not None:
        labels = (_labels_like(row_labels, an), _labels_like(col_labels, an), label_pairs)
    if fast and _fast_path_fits(an, bn):
        an, bn = score_operands(an, bn, precision)  # the product's own operands (exact emulation)
        margin = score_margin(an.shape[-1], np.result_type(an, bn))
        small = _is_small_numpy(an, bn, device)
        with nullcontext() if small else limit_blas(blas_threads_for_task(blas_threads)):
            if symmetric and _diagonal_fits(an, bn, both, labels, row_bound, col_bound, offsets):
                diagonal = {"offset": row_offset, "exclude_self": exclude_self, "margin": margin}
                parts = (_topk_diagonal_tiled(an, k, **diagonal),)
            else:
                bounds = {"row_bound": row_bound, "col_bound": col_bound}
                parts = _topk_block_tiled(
                    an, bn, k, both=both, labels=labels, margin=margin, **bounds, **offsets
                )
    else:
        s = similarity_block(
            an, bn, device=device, blas_threads=blas_threads, like="input", precision=precision
        )
        if labels is not None:
            offsets["excluded"] = label_excluded(*labels)
        offsets["rescorer"] = Rescorer.for_block(an, bn, precision=precision, dtype=s.dtype)
        rows = select_topk(s, k, axis=-1, bound=row_bound, **offsets)
        parts = (rows, select_topk(s, k, axis=-2, bound=col_bound, **offsets)) if both else (rows,)
        del s
    parts = tuple(_cast_part(p, out_dtype, like) for p in parts)
    return parts if both else parts[0]


def _diagonal_fits(an, bn, both: bool, labels, row_bound, col_bound, offsets) -> bool:
    """A diagonal block :func:`_topk_diagonal_tiled` computes: 2-D, rows part only, no
    label mask or pivot, wider than one diagonal tile (the caller vouches ``an == bn``)."""
    return (
        an.shape == bn.shape
        and an.ndim == 2
        and not both
        and labels is None
        and row_bound is None
        and col_bound is None
        and offsets["row_offset"] == offsets["col_offset"]
        and an.shape[0] > DIAGONAL_TILE
    )


def _is_small_numpy(an, bn, device: str) -> bool:
    """NumPy blocks whose product is below :data:`_SMALL_GEMM` multiply-adds."""
    if device == "gpu" or not (isinstance(an, np.ndarray) and isinstance(bn, np.ndarray)):
        return False
    batch = int(np.prod(np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])))
    return batch * an.shape[-2] * bn.shape[-2] * an.shape[-1] < _SMALL_GEMM


def _bound_like(bound, x):
    """A pivot's bound moved to where block ``x`` lives."""
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.asarray(bound)
    if isinstance(x, np.ndarray):
        return to_numpy(bound)
    return bound


def _fast_path_fits(an, bn) -> bool:
    """NumPy blocks big enough for the fused path (tiny batched blocks vectorise better generically)."""
    if not (isinstance(an, np.ndarray) and isinstance(bn, np.ndarray)):
        return False
    n, m = an.shape[-2], bn.shape[-2]
    batch = int(np.prod(np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])))
    return n > 0 and m > 0 and (batch == 1 or n * m >= 2**16)


def _cast_part(part, out_dtype, like: str):
    keys, idx = part
    if out_dtype is not None:
        xp = array_api_compat.array_namespace(keys)
        want = getattr(xp, out_dtype)
        if keys.dtype != want:
            keys = xp.astype(keys, want)
    return to_host_like(keys, like), to_host_like(idx, like)


# --------------------------------------------------------------------------- column tiles
#
# A block of S is never held whole on the CPU: :func:`_topk_block_tiled` runs the fast path
# on column tiles of at most :data:`TILE_COLS` columns (each computed in row strips), so a
# task's memory does not grow with the block's width, and merges the tiles' row parts as
# it goes; the running k-th best of each row prunes the next tiles like a pivot does.

#: Widest column tile of a CPU top-k or pairs kernel (row strips of it stay cache-sized).
TILE_COLS = 4096
#: Largest tile of S (bytes) a CPU pairs kernel computes at once.
_PAIRS_TILE_BYTES = 16 * 2**20


def _even_tiles(size: int, most: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(size)`` in near-equal tiles of at most ``most``.

    >>> _even_tiles(10, 4)
    [(0, 4), (4, 7), (7, 10)]
    """
    count = max(1, -(-size // max(1, most)))
    step, extra = divmod(size, count)
    out, start = [], 0
    for t in range(count):
        stop = start + step + (t < extra)
        out.append((start, stop))
        start = stop
    return out


def _topk_block_tiled(
    an, bn, k: int, *, both: bool, row_bound=None, col_bound=None, labels=None, margin=None, **offsets
):
    """:func:`_topk_block_numpy` over column tiles of ``bn``, merged: the same parts.

    ``labels``: ``(row_labels, col_labels, label_pairs)``, the column labels sliced per tile.
    ``margin``: as :func:`_topk_pair_numpy` (rank by scores)."""
    m = bn.shape[-2]
    most = TILE_COLS
    if both and col_bound is None:  # that path keeps one tile whole: narrower tiles for tall blocks
        rows = int(np.prod(an.shape[:-1]))
        most = max(256, min(TILE_COLS, _PAIRS_TILE_BYTES // max(1, rows * an.dtype.itemsize)))
    tiles = _even_tiles(m, most)
    if len(tiles) == 1:
        return _topk_block_numpy(
            an, bn, k, both=both, row_bound=row_bound, col_bound=col_bound, labels=labels, margin=margin,
            **offsets,
        )  # fmt: skip
    # one 2-D dense block ranked by scores: its rows' candidates are scored once, not per tile
    band = None
    if margin is not None and an.ndim == 2 and bn.ndim == 2 and not (is_sparse(an) or is_sparse(bn)):
        band = _RowBand(an.shape[0], min(k, m), margin)
    rows_part, col_parts = None, []
    for c0, c1 in tiles:
        bound = row_bound
        running = None
        if band is not None and band.vals is not None:
            running = band.bound()
        elif rows_part is not None and rows_part[0].shape[-1] >= k:  # the running k-th best prunes
            running = part_bound(rows_part, k)
        if running is not None:
            bound = running if bound is None else np.maximum(bound, running.astype(bound.dtype))
        out = _topk_block_numpy(
            an,
            bn[c0:c1] if is_sparse(bn) else bn[..., c0:c1, :],
            k,
            both=both,
            row_offset=offsets["row_offset"],
            col_offset=offsets["col_offset"] + c0,
            exclude_self=offsets["exclude_self"],
            row_bound=bound,
            col_bound=None if col_bound is None else col_bound[..., c0:c1],
            labels=None if labels is None else (labels[0], labels[1][c0:c1], labels[2]),
            margin=margin,
            band=None if band is None else _TileBand(band, c0),
        )
        if band is None:
            rows_part = out[0] if rows_part is None else merge_topk([rows_part, out[0]], k)
        if both:
            col_parts.append(out[1])
    if band is not None:
        keys, idx = band.part(row_bound, Rescorer(an, bn, margin, np.result_type(an, bn)).rows)
        rows_part = (keys, np.where(idx < 0, -1, idx + offsets["col_offset"]))
    if not both:
        return (rows_part,)
    keys = np.concatenate([p[0] for p in col_parts], axis=-2)
    idx = np.concatenate([p[1] for p in col_parts], axis=-2)
    return rows_part, (keys, idx)


#: Widest row (and column) tile of a diagonal block of a self-similarity top-k: the block
#: is computed as the upper triangle of its T tiles, (T + 1) / (2 T) of its products.
#: Narrower tiles save products, but each tile pair is pruned only by the bounds of the
#: tiles done so far (over fewer columns: more candidates), which costs more than that.
DIAGONAL_TILE = 2048


def _topk_diagonal_tiled(an, k: int, *, offset: int, exclude_self: bool, margin: float):
    """Rows part of the diagonal block ``an @ an.T`` of a self-similarity (2-D, NumPy),
    from the upper triangle of its tiles only: the same part as the whole block gives.

    Tile pair ``(p, q)``, ``p < q``, is one product whose rows' candidates go to the rows
    of tile ``p`` and whose columns' candidates (the transposed entries) to the rows of
    tile ``q``; the diagonal tiles run first, so every later product is pruned by both
    tiles' running bounds (:class:`_RowBand`). Each row's candidates are scored once.
    """
    n = an.shape[0]
    kk = min(k, n)
    tiles = _even_tiles(n, DIAGONAL_TILE)
    bands = [_RowBand(p1 - p0, kk, margin) for p0, p1 in tiles]
    at = transposed_numpy(an)  # cheaper GEMM packing per strip
    nan = find_nan_rows(an)  # once for the block, not per tile pair
    dtype = an.dtype

    def run(p, q):
        (p0, p1), (q0, q1) = tiles[p], tiles[q]
        bound_p = bands[p].bound() if bands[p].vals is not None else None
        bound_q = None if p == q else bands[q].bound()

        def product(r0, r1, out, c0=0, c1=None):
            np.matmul(an[p0 + r0 : p0 + r1], at[:, q0:q1][:, c0:c1], out=out)

        _topk_pair_numpy(
            an[p0:p1], an[q0:q1], k, p != q, (offset + p0, offset + q0, exclude_self), product, dtype,
            bound_p, bound_q, None, margin, _TileBand(bands[p], q0),
            None if p == q else _TileBand(bands[q], p0), tiles=True, nan_masks=(nan[p0:p1], nan[q0:q1]),
        )  # fmt: skip

    for p in range(len(tiles)):  # diagonal tiles first: the bounds of every later product
        run(p, p)
    for p in range(len(tiles)):
        for q in range(p + 1, len(tiles)):
            run(p, q)
    keys, idx = [], []
    for (p0, p1), band in zip(tiles, bands, strict=True):
        part = band.part(None, Rescorer(an[p0:p1], an, margin, dtype).rows)
        keys.append(part[0])
        idx.append(np.where(part[1] < 0, -1, part[1] + offset))
    return np.concatenate(keys), np.concatenate(idx)


# --------------------------------------------------------------------------- NumPy fast path
#
# The same selection as :func:`select_topk`, fused with the product and organised for
# speed on the CPU: the block is computed in row strips (in cache-sized tiles of them where
# the bounds are known first, :func:`_scan_tiles`) that are scanned while they are in
# cache; candidates come from one comparison pass per strip against each row's bound (a
# pivot's, or the k-th best of the row's column-group maxima; :mod:`dask_cosim._scan`
# compares against the lowest bound first where that pays); the few candidates are
# ranked by sorting one packed integer (row, key descending, column). NaN similarities
# only come from NaN vectors, so they are marked from ``an``/``bn`` rather than found by
# scanning; clipping is applied to candidates only (see :func:`_threshold`).

#: Packed keys hold a column (or row) index in 16 bits and a group in 15.
_PACK_LIMIT = 2**15


def _topk_block_numpy(
    an,
    bn,
    k: int,
    *,
    both: bool,
    row_offset: int,
    col_offset: int,
    exclude_self: bool,
    row_bound=None,
    col_bound=None,
    product=None,
    labels=None,
    margin=None,
    band=None,
    tiles=None,
):
    """NumPy twin of :func:`select_topk` on ``an @ bn.T`` (raw), one 2-D block at a time.

    ``labels``: optional ``(row_labels, col_labels, label_pairs)`` label mask.
    ``margin``: rank dense blocks by scores (see :func:`_topk_pair_numpy`); sparse blocks
    always rank by their products (already independent of the block).

    ``product(b, r0, r1, out)`` writes rows ``r0:r1`` of batch element ``b`` of the raw
    product into ``out`` (default: the GEMM); tests pass synthetic products through it.
    ``tiles``: ``product`` also takes a column range, ``product(b, r0, r1, out, c0, c1)``
    (see :func:`_topk_pair_numpy`); default: only the GEMM does.
    ``band``: 2-D blocks only; the rows' candidates go to it unscored (see
    :class:`_RowBand`) and the rows part is ``None``.
    """
    if is_sparse(an) or is_sparse(bn):  # 2-D, at least one CSR: strips by sparse products
        if product is None:
            product = SparseProduct(an, bn, panels=False)  # exact pair sums: the scores

        dtype = np.result_type(an.dtype, bn.dtype)
        offsets = (row_offset, col_offset, exclude_self)
        rows, cols = _topk_pair_numpy(an, bn, k, both, offsets, product, dtype, row_bound, col_bound, labels)
        return (rows, cols) if both else (rows,)
    lead = np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])
    n, m = an.shape[-2], bn.shape[-2]
    a3 = np.broadcast_to(an, lead + an.shape[-2:]).reshape(-1, n, an.shape[-1])
    b3 = np.broadcast_to(bn, lead + bn.shape[-2:]).reshape(-1, m, bn.shape[-1])
    tiles = product is None if tiles is None else tiles
    if product is None:
        bt = transposed_numpy(b3)  # cheaper GEMM packing per strip

        def product(b, r0, r1, out, c0=0, c1=None):
            np.matmul(a3[b, r0:r1], bt[b][:, c0:c1], out=out)

    def flat_bound(bound, size):
        return None if bound is None else np.broadcast_to(bound, lead + (size,)).reshape(-1, size)

    rb, cb = flat_bound(row_bound, n), flat_bound(col_bound, m)
    dtype = np.result_type(an, bn)
    offsets = (row_offset, col_offset, exclude_self)
    parts = [
        _topk_pair_numpy(
            a3[b],
            b3[b],
            k,
            both,
            offsets,
            partial(product, b),
            dtype,
            None if rb is None else rb[b],
            None if cb is None else cb[b],
            labels,
            margin,
            band,  # only for 2-D blocks (one batch element)
            tiles=tiles,
        )  # fmt: skip
        for b in range(len(a3))
    ]
    if band is not None:
        return (None, parts[0][1]) if both else (None,)
    rows = _stack_parts([p[0] for p in parts], lead)
    return (rows, _stack_parts([p[1] for p in parts], lead)) if both else (rows,)


def _stack_parts(parts, lead):
    keys = np.stack([p[0] for p in parts]).reshape(*lead, *parts[0][0].shape)
    idx = np.stack([p[1] for p in parts]).reshape(*lead, *parts[0][1].shape)
    return keys, idx


def _topk_pair_numpy(
    an,
    bn,
    k,
    both,
    offsets,
    product,
    dtype,
    row_bound,
    col_bound,
    labels=None,
    margin=None,
    band=None,
    col_band=None,
    tiles=False,
    nan_masks=None,
):
    """Rows part (and with ``both`` the columns part) of one 2-D block.

    ``margin``: rank by scores (:mod:`dask_cosim._rescore`), the products of this block
    being within ``margin`` of them; ``None``: rank by the products themselves.
    ``band``: a :class:`_RowBand` that takes the rows' candidates unscored (columns
    local to this block); the rows part is then ``None``. ``col_band``: the same for the
    columns' candidates (rows local to this block; needs ``both`` and ``col_bound``).
    ``tiles``: ``product(r0, r1, out, c0, c1)`` also takes a column range; with the rows'
    bounds known (and the columns', with ``both``) the block is then computed in tiles
    (:func:`_scan_tiles`) instead of whole-width strips.
    ``nan_masks``: ``(find_nan_rows(an), find_nan_rows(bn))`` where the caller has them.
    """
    row_offset, col_offset, exclude_self = offsets
    rescorer = None if margin is None else Rescorer(an, bn, margin, dtype)
    margin = 0.0 if margin is None else margin
    n, m = an.shape[0], bn.shape[0]
    kk_r, kk_c = min(k, m), min(k, n)
    nan_rows, nan_cols = (find_nan_rows(an), find_nan_rows(bn)) if nan_masks is None else nan_masks
    nan_cols = nan_cols.nonzero()[0] if nan_cols.any() else None
    g_r = _group_count(m, kk_r)
    g_c = _group_count(n, kk_c)
    t_r = None if row_bound is None else _threshold(row_bound.astype(dtype), margin)
    t_c = None if col_bound is None else _threshold(col_bound.astype(dtype), margin)
    group_cols = both and t_c is None
    rows = _Candidates(n, m)
    cols = _Candidates(n, m) if both and not group_cols else None
    if tiles and t_r is not None and not group_cols:
        _scan_tiles(product, (n, m), dtype, t_r, t_c, rows, cols, (nan_rows, nan_cols, offsets, labels))
    else:
        step = max(_MIN_STRIP_ROWS, _STRIP_BYTES // max(1, m * dtype.itemsize))
        if group_cols:
            step = -(-step // g_c) * g_c  # whole row groups per strip
            col_max = np.full((g_c, m), -np.inf, dtype=dtype)
        full = np.empty((n, m), dtype=dtype) if group_cols else None
        buf = None if group_cols else np.empty((min(step, n), m), dtype=dtype)
        mask = np.empty((min(step, n), m), dtype=bool)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            strip = full[r0:r1] if group_cols else buf[: r1 - r0]
            product(r0, r1, strip)
            _mark_tile(strip, (nan_rows, nan_cols, offsets, labels), r0, r1, 0, m)
            t = _group_threshold(strip, kk_r, g_r, margin) if t_r is None else t_r[r0:r1]
            if cols is None:
                rows.add(strip, t, r0, mask[: r1 - r0])
            else:  # the rows' and the columns' bounds (a self-similarity's off-diagonal block)
                flat, vals, flat_c, vals_c = row_col_hits(strip, t, t_c, mask[: r1 - r0])
                rows.extend(flat + r0 * m, vals)
                cols.extend(flat_c + r0 * m, vals_c)
            if group_cols:
                whole = (r1 - r0) // g_c * g_c
                if whole:
                    np.maximum(col_max, strip[:whole].reshape(-1, g_c, m).max(axis=0), out=col_max)
    if band is not None:
        band.add(*rows.trimmed_rows(kk_r, row_bound, margin))
        out_rows = None
    else:
        keys, idx = rows.rank_rows(kk_r, row_bound, rescorer)
        out_rows = (keys, np.where(idx < 0, -1, idx + col_offset))
    if not both:
        return out_rows, None
    if group_cols:
        if n % g_c:  # rows beyond the last whole group join their groups (row % g_c)
            tail = full[n - n % g_c :]
            col_max[: n % g_c] = np.maximum(col_max[: n % g_c], tail)
        t = _threshold(np.partition(col_max, g_c - kk_c, axis=0)[g_c - kk_c], 2 * margin)
        cols = _Candidates(n, m)
        for r0 in range(0, n, step):
            part = full[r0 : r0 + step]
            cols.add_by_column(part, t, r0, mask[: part.shape[0]])
    if col_band is not None:
        col_band.add(*cols.trimmed_cols(kk_c, col_bound, margin))
        return out_rows, None
    keys, idx = cols.rank_cols(kk_c, col_bound, rescorer)
    return out_rows, (keys, np.where(idx < 0, -1, idx + row_offset))


def _scan_tiles(product, shape, dtype, t_r, t_c, rows, cols, marks) -> None:
    """The candidates of a block whose bounds are known in advance, computed in tiles.

    Each tile (:data:`_MIN_STRIP_ROWS` rows, :data:`_GEMM_TILE_BYTES`) is one GEMM,
    ``product(r0, r1, out, c0, c1)``, scanned at once against the rows' bounds ``t_r``
    into ``rows`` and, with ``cols``, against the columns' bounds ``t_c`` into ``cols``.
    ``marks``: ``(nan_rows, nan_cols, offsets, labels)`` of :func:`_topk_pair_numpy`.
    Column tiles run in the outer loop, so one tile of the block's columns is reused from
    cache by every row strip.
    """
    n, m = shape
    nan_rows, nan_cols, offsets, labels = marks
    step = min(n, _MIN_STRIP_ROWS)
    col_tiles = _even_tiles(m, max(1, _GEMM_TILE_BYTES // (step * dtype.itemsize)))
    widest = col_tiles[0][1] - col_tiles[0][0]
    buf = np.empty(step * widest, dtype=dtype)
    mask = np.empty(step * widest, dtype=bool)
    for c0, c1 in col_tiles:
        w = c1 - c0
        tile_nan = None
        if nan_cols is not None:
            tile_nan = nan_cols[(nan_cols >= c0) & (nan_cols < c1)] - c0
            tile_nan = tile_nan if tile_nan.size else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            tile = buf[: (r1 - r0) * w].reshape(r1 - r0, w)
            product(r0, r1, tile, c0, c1)
            _mark_tile(tile, (nan_rows, tile_nan, offsets, labels), r0, r1, c0, c1)
            tile_mask = mask[: tile.size].reshape(tile.shape)
            if cols is None:
                flat, vals = row_hits(tile, t_r[r0:r1], tile_mask, lowest_first=True)
            else:
                flat, vals, flat_c, vals_c = row_col_hits(tile, t_r[r0:r1], t_c[c0:c1], tile_mask)
                cols.extend(_block_flat(flat_c, w, r0, c0, m), vals_c)
            rows.extend(_block_flat(flat, w, r0, c0, m), vals)


def _mark_tile(tile, marks, r0: int, r1: int, c0: int, c1: int) -> None:
    """Mark NaN, the excluded diagonal and label-masked pairs in the raw tile of rows
    ``r0:r1`` and columns ``c0:c1`` of a block; ``marks``: ``(nan_rows, nan_cols, offsets,
    labels)`` as in :func:`_scan_tiles`, ``nan_cols`` local to the tile (or ``None``)."""
    nan_rows, nan_cols, (row_offset, col_offset, exclude_self), labels = marks
    _mark_strip(tile, nan_rows[r0:r1], nan_cols, row_offset + r0, col_offset + c0, exclude_self)
    if labels is not None:
        tile[label_excluded(labels[0][r0:r1], labels[1][c0:c1], labels[2])] = EXCLUDED_KEY


def _block_flat(flat, width: int, r0: int, c0: int, m: int):
    """Flat indices into a tile of ``width`` columns at ``(r0, c0)`` as flat indices into
    its block of ``m`` columns.

    >>> _block_flat(np.array([0, 5]), 3, 2, 4, 10)
    array([24, 36])
    """
    r, c = np.divmod(flat, width)
    return (r + r0) * m + (c + c0)


class _Candidates:
    """Entries ``>= bound`` of a block, collected strip by strip as flat indices and values."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.flat: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def add(self, strip, bound, r0: int, mask=None) -> None:
        """The entries of ``strip`` (rows ``r0:``) at or above their row's ``bound``."""
        hit, vals = row_hits(strip, bound, mask)
        self.extend(hit + r0 * self.m, vals)

    def add_by_column(self, strip, bound, r0: int, mask=None) -> None:
        """The entries of ``strip`` (rows ``r0:``) at or above their column's ``bound``."""
        hit = sparse_flatnonzero(np.greater_equal(strip, bound[None, :], out=mask))
        self.extend(hit + r0 * self.m, strip.reshape(-1)[hit])

    def extend(self, flat, vals) -> None:
        self.flat.append(flat)
        self.vals.append(vals)

    def _gather(self):
        flat = np.concatenate(self.flat) if len(self.flat) > 1 else self.flat[0]
        vals = np.concatenate(self.vals) if len(self.vals) > 1 else self.vals[0]
        return np.divmod(flat, self.m), vals

    def rank_rows(self, kk: int, bound=None, rescorer=None):
        (r, c), vals = self._gather()
        score = None if rescorer is None else rescorer.rows
        return _rank(r, c, vals, kk, self.n, bound, score, _margin_of(rescorer))

    def trimmed_rows(self, kk: int, bound=None, margin: float = 0.0):
        """Row candidates (row, column, clipped product) at or above ``bound - margin``,
        sorted, within the band of their row's ``kk``-th best (:func:`_band`)."""
        (r, c), vals = self._gather()
        return _trimmed(r, c, vals, self.n, kk, bound, margin)

    def trimmed_cols(self, kk: int, bound=None, margin: float = 0.0):
        """:meth:`trimmed_rows` of the transposed block: (column, row, clipped product)."""
        (r, c), vals = self._gather()
        return _trimmed(c, r, vals, self.m, kk, bound, margin)

    def rank_cols(self, kk: int, bound=None, rescorer=None):
        (r, c), vals = self._gather()
        score = None if rescorer is None else rescorer.cols
        return _rank(c, r, vals, kk, self.m, bound, score, _margin_of(rescorer))


def _trimmed(group, member, vals, ngroups: int, kk: int, bound, margin: float):
    """Candidates of each group at or above ``bound - margin``, clipped and sorted, within
    the band of the group's ``kk``-th best (:func:`_band`)."""
    vals = _clip_candidates(vals)
    if bound is not None:
        keep = vals >= bound[group] - margin
        group, member, vals = group[keep], member[keep], vals[keep]
    group, member, vals = _sort_candidates(group, member, vals, ngroups)
    return _band(group, member, vals, np.bincount(group, minlength=ngroups), kk, margin)


def _margin_of(rescorer) -> float:
    return 0.0 if rescorer is None else rescorer.margin


def _mark_strip(strip, nan_rows, nan_cols, row_offset: int, col_offset: int, exclude_self: bool) -> None:
    """Write the NaN / excluded keys into a raw strip (cheap: only the rows/columns affected)."""
    if nan_rows.any():
        strip[nan_rows] = NAN_KEY
    if nan_cols is not None:
        strip[:, nan_cols] = NAN_KEY
    if exclude_self:
        n, m = strip.shape
        r = np.arange(max(0, col_offset - row_offset), min(n, m + col_offset - row_offset))
        strip[r, r + row_offset - col_offset] = EXCLUDED_KEY


def _group_threshold(strip, kk: int, g: int, margin: float = 0.0):
    """Each row's candidate bound from the k-th best of its ``g`` column-group maxima.

    With rescoring (``margin`` > 0) the bound is lowered by twice the margin: the k-th
    best score is at least the k-th best product minus the margin, and an entry whose
    score reaches it has a product at least that minus the margin again.
    """
    r, m = strip.shape
    slabs = m // g
    gmax = strip[:, : slabs * g].reshape(r, slabs, g).max(axis=1)  # group: column % g
    return _threshold(np.partition(gmax, g - kk, axis=1)[:, g - kk], 2 * margin)


def _threshold(t, margin: float = 0.0):
    """Candidate bound on raw products from a bound ``t`` of the k-th best (clipped) key.

    Clipping to [-1, 1] is monotone, so an entry below ``t`` loses to the ``kk`` entries
    at or above it, unless clipping makes them equal: at ``t >= 1`` every entry that
    clips to 1 is a candidate, and at ``t <= -1`` every entry is. ``margin``: ``t`` bounds
    scores that may differ from the products by this much (see :mod:`dask_cosim._rescore`).
    """
    t = np.minimum(t, 1.0) - margin
    t[t <= -1.0] = -np.inf
    return t


def _clip_candidates(vals):
    """Clip candidate values to [-1, 1], leaving the NaN/excluded keys (< -1.5) alone; -0.0 -> 0.0."""
    out = np.clip(vals, -1.0, 1.0)
    special = vals < -1.5
    if special.any():
        out[special] = vals[special]
    out += 0.0  # -0.0 == 0.0 must tie (the packed sort compares bits)
    return out


def _pack_desc(vals):
    """float32 -> int64 in [0, 2**32) whose ascending order is the floats' descending order."""
    i = vals.view(np.int32)
    ordered = i ^ ((i >> 31) & 0x7FFFFFFF)  # signed order == float order
    return (~ordered).astype(np.int64) + 2**31


def _unpack_desc(packed32):
    ordered = ~(packed32 - 2**31).astype(np.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)


def _rank(group, member, vals, kk: int, ngroups: int, bound=None, score=None, margin: float = 0.0):
    """The best ``kk`` candidates of every group, by (key descending, member); padded.

    float32 keys with small indices are packed into one int64 (group, key, member) and
    sorted once; other cases use a lexsort. Groups with fewer than ``kk`` candidates
    (keys ``>= bound`` of the group, when given) are filled with :data:`PAD_KEY` and
    member -1. ``score(group, member)``: the candidates' products are only within
    ``margin`` of their scores; the candidates that can still reach the best ``kk`` by
    score are scored and ranked by score (:func:`_band`, :func:`_rescore`).
    """
    vals = _clip_candidates(vals)
    if bound is not None:
        keep = vals >= bound[group] - margin  # margin 0 without scores
        group, member, vals = group[keep], member[keep], vals[keep]
    group, member, vals = _sort_candidates(group, member, vals, ngroups)
    counts = np.bincount(group, minlength=ngroups)
    if score is not None and vals.size:
        group, member, vals = _band(group, member, vals, counts, kk, margin)
        group, member, vals = _rescore(group, member, vals, score)
        if bound is not None:
            keep = vals >= bound[group]
            group, member, vals = group[keep], member[keep], vals[keep]
        group, member, vals = _sort_candidates(group, member, vals, ngroups)
        counts = np.bincount(group, minlength=ngroups)
    rank = np.arange(group.size) - (np.cumsum(counts) - counts)[group]
    chosen = rank < kk
    if (counts >= kk).all():
        return vals[chosen].reshape(ngroups, kk), member[chosen].reshape(ngroups, kk)
    keys = np.full((ngroups, kk), PAD_KEY, dtype=vals.dtype)
    idx = np.full((ngroups, kk), -1, dtype=np.int64)
    keys[group[chosen], rank[chosen]] = vals[chosen]
    idx[group[chosen], rank[chosen]] = member[chosen]
    return keys, idx


def _sort_candidates(group, member, vals, ngroups: int, *, runs: bool = False):
    """Candidates ordered by (group, key descending, member).

    ``runs``: the candidates are a few runs each already in that order (a band and the
    candidates added to it): a merging sort takes them in about one pass.
    """
    if (
        vals.dtype == np.float32
        and ngroups < _PACK_LIMIT
        and (not member.size or member.max() < 2 * _PACK_LIMIT)
    ):
        packed = (group.astype(np.int64) << 48) | (_pack_desc(vals) << 16) | member
        packed.sort(kind="stable" if runs else None)
        return packed >> 48, packed & 0xFFFF, _unpack_desc((packed >> 16) & 0xFFFFFFFF)
    order = np.lexsort((member, -vals, group))
    return group[order], member[order], vals[order]


def _band(group, member, vals, counts, kk: int, margin: float):
    """The sorted candidates whose scores may reach their group's best ``kk`` (still sorted).

    ``vals`` are clipped products, each within ``margin`` of its score, sorted by
    (group, product descending), ``counts`` candidates per group. Let ``t`` be a group's
    ``kk``-th best product among its candidates: every entry whose score reaches the
    group's ``kk``-th best score has a product ``>= t - 2 margin``, so only those are kept
    (all of them when the group has fewer than ``kk``). With a ``bound`` (the caller keeps
    scores ``>= bound``) the candidates are those at or above ``bound - margin``, which
    covers every score at or above it.
    """
    starts = np.cumsum(counts) - counts
    full = counts >= kk
    kth = np.full(len(counts), PAD_KEY - 1, dtype=vals.dtype)  # below every key: keep all
    kth[full] = vals[starts[full] + kk - 1]
    keep = vals >= kth[group] - 2 * margin
    return group[keep], member[keep], vals[keep]


def _rescore(group, member, vals, score):
    """``vals`` with each real product replaced by its score; NaN, excluded and padding keys
    are exact and stay as they are."""
    real = np.flatnonzero(vals >= -1.5)  # not NAN_KEY / EXCLUDED_KEY / PAD_KEY
    if real.size:
        vals = vals.copy()
        vals[real] = score(group[real], member[real])
    return group, member, vals


class _TileBand:
    """A :class:`_RowBand` seen from one tile whose members (columns) start at ``c0``."""

    def __init__(self, band: _RowBand, c0: int):
        self.band, self.c0 = band, c0

    def add(self, group, member, vals) -> None:
        self.band.add(group, member + self.c0, vals)


class _RowBand:
    """Row candidates of a block gathered over its column tiles, scored once at the end.

    Each tile adds its candidates within the band of its rows' ``kk``-th best product
    (:func:`_band`); the band of everything added so far gives the running bound that
    prunes the next tiles (:meth:`bound`), and :meth:`part` scores the final band once:
    a row's candidates are scored once per task, not once per tile.
    """

    def __init__(self, n: int, kk: int, margin: float):
        self.n, self.kk, self.margin = n, kk, margin
        self.group = self.member = self.vals = None

    def add(self, group, member, vals) -> None:
        if self.vals is not None:
            group = np.concatenate([self.group, group])
            member = np.concatenate([self.member, member])
            vals = np.concatenate([self.vals, vals])
        group, member, vals = _sort_candidates(group, member, vals, self.n, runs=True)
        counts = np.bincount(group, minlength=self.n)
        self.group, self.member, self.vals = _band(group, member, vals, counts, self.kk, self.margin)

    def bound(self):
        """Per row, a bound for the next tiles as the tiles take it (a bound ``b`` keeps
        products ``>= b - margin``): the ``kk``-th best product less the margin, so that
        products within ``2 margin`` of it stay candidates; ``-inf`` for a row with fewer
        than ``kk`` candidates so far."""
        counts = np.bincount(self.group, minlength=self.n)
        starts = np.cumsum(counts) - counts
        out = np.full(self.n, -np.inf, dtype=self.vals.dtype)
        full = counts >= self.kk
        out[full] = self.vals[starts[full] + self.kk - 1] - self.margin
        return out

    def part(self, bound, score):
        """The rows part ``(keys, local columns)``: the band ranked by score."""
        return _rank(self.group, self.member, self.vals, self.kk, self.n, bound, score, self.margin)


# --------------------------------------------------------------------------- merging


def merge_topk(parts, k: int, *, fast: bool = True):
    """Merge local top-k parts ``[(keys, idx), ...]`` of the same rows into one, best first.

    ``fast=False`` forces the generic path (the NumPy float32 twin sorts packed keys).

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
    if fast and isinstance(keys, np.ndarray) and keys.dtype == np.float32 and keys.size:
        return _merge_numpy(keys, idx, k)
    by_index = xp.argsort(idx, axis=-1, stable=True)
    keys = xp.take_along_axis(keys, by_index, axis=-1)
    idx = xp.take_along_axis(idx, by_index, axis=-1)
    order = xp.argsort(keys, axis=-1, descending=True, stable=True)[..., :k]
    return xp.take_along_axis(keys, order, axis=-1), xp.take_along_axis(idx, order, axis=-1)


def _merge_numpy(keys, idx, k: int):
    """NumPy twin of :func:`merge_topk` for float32 keys: one sort of (key desc, index) packed in int64."""
    if idx.min() < -1 or idx.max() >= 2**32 - 1:
        return merge_topk([(keys, idx)], k, fast=False)
    desc = _pack_desc(keys + np.float32(0.0)).astype(np.uint64)  # -0.0 -> 0.0
    packed = (desc << np.uint64(32)) | (idx + 1).astype(np.uint64)  # padding (-1) -> 0
    packed.sort(axis=-1)
    top = packed[..., :k]
    keys = _unpack_desc((top >> np.uint64(32)).astype(np.int64))
    return keys, (top & np.uint64(0xFFFFFFFF)).astype(np.int64) - 1


def finish_topk(part):
    """Final ``(values, idx)`` from merged keys: NaN keys become NaN values.

    Entries a label mask excluded (or padding) reach a final result only when a row has
    fewer than ``k`` valid neighbours; they become value NaN and index -1.

    Examples
    --------
    >>> finish_topk((np.array([[0.5, NAN_KEY]]), np.array([[1, 0]])))
    (array([[0.5, nan]]), array([[1, 0]]))
    """
    keys, idx = part
    xp = array_api_compat.array_namespace(keys)
    nan = xp.asarray(xp.nan, dtype=keys.dtype, device=array_api_compat.device(keys))
    invalid = keys < (NAN_KEY + EXCLUDED_KEY) / 2  # EXCLUDED_KEY or PAD_KEY
    if bool(xp.any(invalid)):
        idx = xp.where(invalid, xp.asarray(-1, dtype=idx.dtype, device=array_api_compat.device(idx)), idx)
    return xp.where((keys == NAN_KEY) | invalid, nan, keys), idx


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
    row_labels=None,
    col_labels=None,
    label_pairs: str = "different",
):
    """Every entry of a similarity block ``(..., n, m)`` with ``s >= threshold``.

    Parameters
    ----------
    upper
        Keep only global ``j >= i`` (self-similarity: each unordered pair once).
    exclude_self
        Drop the global diagonal ``i == j``.
    row_labels, col_labels, label_pairs
        Optional label mask: drop the pairs :func:`label_excluded` marks.

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
    if row_labels is not None:
        excluded = label_excluded(_labels_like(row_labels, s), _labels_like(col_labels, s), label_pairs)
        mask = mask & ~excluded
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
    row_labels=None,
    col_labels=None,
    label_pairs: str = "different",
):
    """Product of two normalised blocks filtered by :func:`select_above` (the block is dropped).

    Examples
    --------
    >>> an, bn = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> b, i, j, score = pairs_block(an, bn, threshold=0.5)
    >>> j, score
    (array([1]), array([1.]))
    """
    if is_sparse(an) or is_sparse(bn):  # normalised CSR blocks: dense tiles of S from sparse products
        return _pairs_block_sparse(
            an, bn, threshold=threshold, row_offset=row_offset, col_offset=col_offset,
            batch_offset=batch_offset, upper=upper, exclude_self=exclude_self, out_dtype=out_dtype,
            row_labels=None if row_labels is None else to_numpy(row_labels),
            col_labels=None if col_labels is None else to_numpy(col_labels), label_pairs=label_pairs,
        )  # fmt: skip
    if _is_small_numpy(an, bn, device):  # as similarity_block, without the BLAS thread limit
        an, bn = score_operands(an, bn, precision)
        s = matmul_clip_numpy(an, bn, out_dtype)
        rescorer = Rescorer.for_block(an, bn, dtype=s.dtype)
    elif _needs_tiles(an, bn, device):
        return _pairs_block_tiled(
            an, bn, threshold=threshold, row_offset=row_offset, col_offset=col_offset,
            batch_offset=batch_offset, upper=upper, exclude_self=exclude_self, out_dtype=out_dtype,
            blas_threads=blas_threads, precision=precision, row_labels=row_labels, col_labels=col_labels,
            label_pairs=label_pairs,
        )  # fmt: skip
    else:
        s = similarity_block(
            an,
            bn,
            out_dtype=out_dtype,
            device=device,
            blas_threads=blas_threads,
            like="input",
            precision=precision,
        )
        rescorer = Rescorer.for_block(_like(an, s), _like(bn, s), precision=precision, dtype=s.dtype)
    out = select_above(
        s,
        threshold - rescorer.margin,  # candidates; scores decide those near the threshold
        row_offset=row_offset,
        col_offset=col_offset,
        batch_offset=batch_offset,
        upper=upper,
        exclude_self=exclude_self,
        row_labels=row_labels,
        col_labels=col_labels,
        label_pairs=label_pairs,
    )
    out = _decide_pairs(out, threshold, rescorer, (batch_offset, row_offset, col_offset))
    return tuple(to_host_like(v, like) for v in out)


def _like(x, s):
    """Block ``x`` moved to where the similarity block ``s`` lives (NumPy or CuPy)."""
    if array_api_compat.is_cupy_array(s):
        import cupy

        return cupy.asarray(x)
    return to_numpy(x) if isinstance(s, np.ndarray) else x


def _decide_pairs(found, threshold: float, rescorer, offsets: tuple[int, int, int]):
    """Pairs ``>= threshold - margin`` reduced to those whose score is ``>= threshold``.

    A pair whose product is at least ``threshold + margin`` is in whatever its score;
    the others (within the margin) are scored, kept if the score reaches the threshold,
    and report their score. ``offsets``: the block's first batch, row and column.
    """
    b, i, j, score = found
    xp = array_api_compat.array_namespace(score)
    band = score < threshold + rescorer.margin
    where = xp.nonzero(band)[0]
    if where.shape[0] == 0:
        return found
    b0, r0, c0 = offsets
    rows = (xp.take(b, where) - b0) * rescorer.n + (xp.take(i, where) - r0)
    score = _fill(xp, band, rescorer.rows(rows, xp.take(j, where) - c0), score)
    keep = xp.nonzero(~band | (score >= threshold))[0]
    return tuple(xp.take(v, keep) for v in (b, i, j, score))


def _needs_tiles(an, bn, device: str) -> bool:
    """NumPy blocks whose product exceeds :data:`_PAIRS_TILE_BYTES` (computed tile by tile)."""
    if not (isinstance(an, np.ndarray) and isinstance(bn, np.ndarray)):
        return False
    if choose_backend(an, device) != "numpy":
        return False
    batch = int(np.prod(np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])))
    return batch * an.shape[-2] * bn.shape[-2] * np.result_type(an, bn).itemsize > _PAIRS_TILE_BYTES


def _pairs_block_tiled(
    an,
    bn,
    *,
    threshold,
    row_offset,
    col_offset,
    upper,
    exclude_self,
    row_labels=None,
    col_labels=None,
    **kwargs,
):
    """:func:`pairs_block` on NumPy blocks, one tile of S at a time; the same pairs in the
    same (batch, i, j) order, while memory holds one tile (plus the pairs found)."""
    batch = int(np.prod(np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])))
    item = np.result_type(an, bn).itemsize
    cols = _even_tiles(bn.shape[-2], TILE_COLS)
    width = cols[0][1] - cols[0][0]
    rows = _even_tiles(an.shape[-2], max(1, _PAIRS_TILE_BYTES // max(1, batch * width * item)))
    found = []
    for r0, r1 in rows:
        for c0, c1 in cols:
            if upper and col_offset + c1 - 1 < row_offset + r0:  # the tile lies below the diagonal
                continue
            found.append(
                pairs_block(
                    an[..., r0:r1, :],
                    bn[..., c0:c1, :],
                    threshold=threshold,
                    row_offset=row_offset + r0,
                    col_offset=col_offset + c0,
                    upper=upper,
                    exclude_self=exclude_self,
                    device="cpu",
                    row_labels=None if row_labels is None else row_labels[r0:r1],
                    col_labels=None if col_labels is None else col_labels[c0:c1],
                    **kwargs,
                )
            )
    b, i, j, score = (np.concatenate([f[n] for f in found]) for n in range(4))
    if len(found) > 1:  # tiles interleave rows (and batches): restore (batch, i, j) order
        order = np.lexsort((j, i, b))
        b, i, j, score = b[order], i[order], j[order], score[order]
    return b, i, j, score


def _pairs_block_sparse(
    an, bn, *, threshold, row_offset, col_offset, upper, row_labels, col_labels, out_dtype, **kwargs
):
    """:func:`pairs_block` of two 2-D normalised blocks, at least one sparse: each tile of
    at most :data:`_PAIRS_TILE_BYTES` is one sparse product written into a dense tile (a
    row strip of every column, so pairs come out in (i, j) order)."""
    m = bn.shape[0]
    item = np.result_type(an.dtype, bn.dtype).itemsize
    rows = _even_tiles(an.shape[0], max(1, _PAIRS_TILE_BYTES // max(1, m * item)))
    found = []
    for r0, r1 in rows:
        s = sparse_similarity_block(an[r0:r1], bn, out_dtype=out_dtype, panels=False)  # the scores
        found.append(
            select_above(
                s,
                threshold,
                row_offset=row_offset + r0,
                col_offset=col_offset,
                upper=upper,
                row_labels=None if row_labels is None else row_labels[r0:r1],
                col_labels=col_labels,
                **kwargs,
            )
        )
    return tuple(np.concatenate([f[n] for f in found]) for n in range(4))
