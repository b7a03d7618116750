"""Reductions that never materialise the similarity array: top-k neighbours and pairs above a threshold.

Both run one task per output block that computes the product and immediately reduces it
(:func:`dask_cosim._select.topk_block`, :func:`~dask_cosim._select.pairs_block`), so no
task holds more than one block of S. Top-k parts are merged along the column blocks by
dask's tree reduction; pairs become one DataFrame partition per block. Self-similarity
uses only the upper block triangle (:mod:`dask_cosim._triangle`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.core import flatten

from ._compat import collection_name, column_blocks, frame_from_graph, map_blocks, tree_reduce
from ._labels import LabelPairs, block_labels, check_label_pairs, check_labels, labels_token
from ._options import check_flag, check_k, check_threshold
from ._prepared import Prepared
from ._resources import annotate_for, routed
from ._select import finish_topk, merge_topk, pairs_block, topk_block
from ._sizing import SPLIT_EVERY
from ._topk_store import INPUT_PRIORITY, TopkSource, priority_of
from ._topk_store import register as register_topk
from ._triangle import pairs_triangle_graph, topk_triangle_parts, use_triangle
from .core import Device, Like, Precision, ZeroVector, prepare, record_result

if TYPE_CHECKING:  # imported where used: ``import dask_cosim`` stays light
    import dask.dataframe as dd
    import pandas as pd

__all__ = ["topk", "pairs_above"]


# --------------------------------------------------------------------------- validation


def _check_k_fits(k: int, prep: Prepared, exclude_self: bool) -> None:
    m = prep.out_shape[-1]
    if exclude_self and k > m - 1:
        raise ValueError(
            f"k: with exclude_self=True each row has only M - 1 = {m - 1} other vectors, "
            f"received k={k}; expected k <= {m - 1}"
        )
    if k > m:
        raise ValueError(f"k: b has M = {m} vectors, received k={k}; expected k <= M = {m}")


def _check_exclude_self(exclude_self, prep: Prepared) -> bool:
    exclude_self = check_flag("exclude_self", exclude_self)
    n, m = prep.out_shape[-2:]
    if exclude_self and not prep.self_similar and n != m:
        raise ValueError(
            f"exclude_self=True drops pairs with i == j, which needs b=None (or b is a) or b "
            f"with as many vectors as a; received a with N={n} and b with M={m}"
        )
    return bool(exclude_self)


def _prepare(a, b, op: str = "topk", **kwargs) -> Prepared:
    """:func:`~dask_cosim.core.prepare` for a reduction: "auto" blocks sized by work
    (``cosine.task-flops``), not by bytes (see :mod:`dask_cosim._sizing`)."""
    return prepare(a, b, op=op, **kwargs)


# --------------------------------------------------------------------------- top-k


def topk(
    a,
    b=None,
    k: int = 10,
    *,
    exclude_self: bool = False,
    chunks="auto",
    dtype=None,
    device: Device = "auto",
    zero_vector: ZeroVector = "zero",
    precision: Precision = "float32",
    like: Like | None = None,
    check_finite: bool = False,
    labels=None,
    label_pairs: LabelPairs = "different",
) -> tuple[da.Array, da.Array]:
    """The ``k`` most similar vectors of ``b`` for every vector of ``a``, without storing S.

    Each output block of S is computed by one ``cosine-topk`` task that keeps only its
    rows' local top-k (values and global column indices); ``cosine-merge`` tasks
    merge those along the column blocks as a tree. Memory stays at a few blocks per
    worker whatever the size of S. The first column block of each row block runs first
    and its k-th best values prune the other blocks' selection. With ``b=None`` only the
    block upper triangle runs a product (each block also yields the top-k of its
    transpose; the diagonal blocks do the pruning).

    Parameters
    ----------
    a, b
        As :func:`dask_cosim.cosine_similarity` (``b=None`` or ``b is a``: self-similarity).
    k : int
        Neighbours per row, ``1 <= k <= M`` (``<= M - 1`` with ``exclude_self``).
    exclude_self : bool
        Drop the pair ``i == j`` (for self-similarity; ``b`` must have as many vectors as ``a``).
    chunks, device, precision
        As :func:`dask_cosim.cosine_similarity` (blocks of S that one task computes),
        except that ``chunks="auto"`` sizes blocks by work: about ``cosine.task-flops``
        each (no task holds its block of S: the CPU kernel tiles it), split further only to
        give every thread several tasks; ``cosine.gpu-block-bytes`` (1 GiB) when the
        products run on a GPU known when the graph is built (``device="gpu"``, or CuPy
        inputs). See :mod:`dask_cosim._sizing` and :func:`dask_cosim.plan`. Selection runs
        where the product ran (on the GPU for CuPy blocks); only the ``k`` best per row
        leave the device.
    dtype : float dtype, optional
        The values' dtype, as the output dtype of :func:`dask_cosim.cosine_similarity`
        (default float32 when both inputs are float32 or narrower floats, float64
        otherwise; a wider dtype also runs the products in it). Parts of a row are merged
        in this dtype, so neighbours closer than its rounding (about 5e-4 for float16) may
        come in either order.
    zero_vector : {"zero", "nan", "error"}
        As :func:`dask_cosim.cosine_similarity`: a zero vector's similarities are 0, NaN
        (ranked last, like any NaN) or a :class:`~dask_cosim.ZeroVectorError` at compute time.
    like : {"numpy", "cupy"}, optional
        Where the results live, as in :func:`dask_cosim.cosine_similarity`.
    check_finite : bool
        As :func:`dask_cosim.cosine_similarity`: the normalise tasks refuse NaN/inf blocks.
    labels : array_like or dask.array.Array, optional
        Label mask: one 1-D integer label per vector (self-similarity), or a tuple
        ``(labels_a, labels_b)`` with ``b``. Pairs the mask drops rank below every
        similarity inside the block tasks, so a row keeps ``k`` valid neighbours when it
        has that many; rows with fewer end in value NaN / index -1. Self-similarity with
        labels computes every block (no triangle). Bad labels are a ValueError here.
    label_pairs : {"different", "same"}
        ``"different"``: only pairs whose labels differ; ``"same"``: only pairs within a label.

    Returns
    -------
    values : dask.array.Array
        ``(batch, N, k)`` (``(N, k)`` for 2-D inputs) similarities in the similarity dtype,
        each row sorted descending; equal values are ordered by the smaller ``j``, NaN
        ranks last. Every value is the pair's deterministic *score* (README: Scores and
        ties): the products of the two normalised vectors summed by NumPy's pairwise
        summation in the work dtype, which depends on the two vectors alone; block
        products (BLAS) only select the candidates. So exact duplicates tie exactly and
        come in index order, and the result is bitwise identical for every chunking,
        scheduler and BLAS kernel.
    indices : dask.array.Array
        Same shape, int64 column indices ``j`` into ``b``.

    Compute both together (``dask.compute(values, indices)``) to run the graph once.

    Examples
    --------
    >>> import dask, numpy as np, dask_cosim as dcs
    >>> a = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    >>> vals, idx = dcs.topk(a, k=2, exclude_self=True)
    >>> vals, idx = dask.compute(vals, idx)
    >>> idx
    array([[1, 2],
           [0, 2],
           [1, 0]])
    >>> vals.round(2)
    array([[0.8, 0. ],
           [0.8, 0.6],
           [0.6, 0. ]])
    """
    k = check_k(k)
    with dask.annotate(priority=INPUT_PRIORITY):  # read and normalise the inputs first (see _topk_store)
        prep = _prepare(
            a, b, chunks=chunks, dtype=dtype, device=device, zero_vector=zero_vector, precision=precision,
            like=like, check_finite=check_finite, k=k,
        )  # fmt: skip
    exclude_self = _check_exclude_self(exclude_self, prep)
    _check_k_fits(k, prep, exclude_self)
    labels, label_pairs = check_labels(labels, prep), check_label_pairs(label_pairs)

    out_chunks = prep.plan.chunks if len(prep.out_index) == 3 else prep.plan.chunks[1:]
    topk_chunks = (*out_chunks[:-1], (k,))
    if 0 in prep.out_shape:
        vals, idx = _empty_topk(prep, topk_chunks)
    else:
        triangle = use_triangle(prep) and labels is None
        # priorities by upper row and column: on a cluster, row panels finish in order and
        # each finished block is the next link of its panels (see _topk_store)
        with dask.annotate(priority=priority_of(triangle, len(prep.plan.rows))):
            upper = None
            if triangle:
                parts, upper = topk_triangle_parts(prep, k, exclude_self)
            else:
                parts = _topk_parts(prep, k, exclude_self, labels, label_pairs)
        # parts left on the GPU (like="cupy") are merged there too
        where = prep.device if prep.like == "cupy" else "cpu"
        with annotate_for(where):
            # the product + selection tasks keep their own layer (no reduction chunk step)
            merged = tree_reduce(
                parts,
                routed(partial(_merge_parts, k=k, final=True), where),
                (parts.ndim - 1,),
                True,
                object,
                split_every=SPLIT_EVERY,
                combine=routed(partial(_merge_parts, k=k, final=False), where),
                name="cosine-merge",
                concatenate=False,
            )
            vals = map_blocks(
                routed(_values, where),
                merged,
                chunks=topk_chunks,
                dtype=prep.out_dtype,
                meta=prep.meta,
                prefix="cosine-values",
            )
            idx = map_blocks(
                routed(_indices, where),
                merged,
                chunks=topk_chunks,
                dtype=np.int64,
                meta=prep.meta.astype(np.int64),
                prefix="cosine-indices",
            )
        rebuild = None
        if triangle:

            def rebuild(diagonals: frozenset, pivots: dict) -> tuple[da.Array, str]:
                with dask.annotate(priority=priority_of(True, len(prep.plan.rows))):
                    return topk_triangle_parts(prep, k, exclude_self, diagonals, pivots)

        pivot = None if triangle or not _pivoted(prep, k) else 0
        register_topk(vals.name, TopkSource(parts, k, triangle, where, upper, rebuild, pivot=pivot))
    for result in (vals, idx):
        record_result(
            result.name, "topk", prep, a, b, k=k, exclude_self=exclude_self, zero_vector=zero_vector,
            precision=precision, **_label_facts(labels, label_pairs),
        )  # fmt: skip
    return vals, idx


def _empty_topk(prep: Prepared, chunks) -> tuple[da.Array, da.Array]:
    shape = (*prep.out_shape[:-1], chunks[-1][0])
    chunks = tuple((max(s, 0),) for s in shape)
    vals = da.zeros(shape, dtype=prep.out_dtype, chunks=chunks, meta=prep.meta)
    idx = da.zeros(shape, dtype=np.int64, chunks=chunks, meta=prep.meta.astype(np.int64))
    return vals, idx


def _row_and_col_indices(prep: Prepared) -> tuple[da.Array, da.Array]:
    """Global row/column numbers as dask arrays chunked like the output (block offsets)."""
    rows = da.arange(prep.out_shape[-2], chunks=(prep.plan.rows,), dtype=np.int64)
    cols = da.arange(prep.out_shape[-1], chunks=(prep.plan.cols,), dtype=np.int64)
    return rows, cols


def _label_facts(labels, label_pairs: str) -> dict:
    """Provenance of a label mask (nothing without labels, so unlabelled results keep their facts)."""
    return {} if labels is None else {"labels": labels_token(labels), "label_pairs": label_pairs}


def _topk_parts(
    prep: Prepared, k: int, exclude_self: bool, labels=None, label_pairs: str = "different"
) -> da.Array:
    """Object array of local top-k parts, one ``cosine-topk`` task per output block.

    The first column block of every row block is its *pivot*: those tasks run first, and
    each row's k-th best value there is a lower bound of its final k-th best, so the
    tasks of the other column blocks keep only entries at or above it (pruning).
    ``labels``: validated ``(labels_a, labels_b)``, passed to each task as its slices.
    """
    rows, cols = _row_and_col_indices(prep)
    lrows = lcols = None
    if labels is not None:
        lrows, lcols = block_labels(labels, prep)
    common = {
        "dtype": object,
        "meta": np.empty((0,) * len(prep.out_index), dtype=object),
        "adjust_chunks": {"j": lambda m: min(k, m)},
        "k": k,
        "exclude_self": exclude_self,
        **prep.product_kwargs(),
    }
    if labels is not None:
        common["label_pairs"] = label_pairs
    jb = prep.bn.ndim - 2  # the j axis of bn

    def label_args(sl: slice | None) -> list:
        if labels is None:
            return []
        return [lrows, "i", lcols if sl is None else column_blocks(lcols, 0, sl), "j"]

    if not _pivoted(prep, k):
        return prep.pair_blockwise(
            _topk_task, rows, "i", cols, "j", *label_args(None), token="cosine-topk", **common
        )
    first, others = slice(0, 1), slice(1, None)
    pivot = prep.pair_blockwise(
        _topk_task, rows, "i", column_blocks(cols, 0, first), "j", *label_args(first),
        bn=column_blocks(prep.bn, jb, first), token="cosine-topk", **common,
    )  # fmt: skip
    pruned = prep.pair_blockwise(
        _pruned_topk_task,
        pivot, prep.out_index,  # one block along j: every column block of the row block
        rows, "i", column_blocks(cols, 0, others), "j", *label_args(others),
        bn=column_blocks(prep.bn, jb, others), token="cosine-topk", align_arrays=False, **common,
    )  # fmt: skip
    return da.concatenate([pivot, pruned], axis=len(prep.out_index) - 1)


def _pivoted(prep: Prepared, k: int) -> bool:
    """Whether the first column block prunes the others of its row (:func:`_topk_parts`):
    there are others, and it has ``k`` columns."""
    return len(prep.plan.cols) > 1 and prep.plan.cols[0] >= k


def _topk_task(an, bn, rows, cols, row_labels=None, col_labels=None, **kwargs):
    return topk_block(
        an, bn, row_offset=int(rows[0]), col_offset=int(cols[0]),
        row_labels=row_labels, col_labels=col_labels, **kwargs,
    )  # fmt: skip


def _pruned_topk_task(an, bn, pivot, rows, cols, row_labels=None, col_labels=None, **kwargs):
    return topk_block(
        an, bn, row_offset=int(rows[0]), col_offset=int(cols[0]), row_pivot=pivot,
        row_labels=row_labels, col_labels=col_labels, **kwargs,
    )  # fmt: skip


def _merge_parts(parts, axis=None, keepdims=True, *, k: int, final: bool):
    merged = merge_topk(parts, k)
    return finish_topk(merged) if final else merged


def _values(pair):
    return pair[0]


def _indices(pair):
    return pair[1]


# --------------------------------------------------------------------------- pairs


def pairs_above(
    a,
    b=None,
    threshold: float = 0.9,
    *,
    exclude_self: bool = False,
    chunks="auto",
    dtype=None,
    device: Device = "auto",
    zero_vector: ZeroVector = "zero",
    precision: Precision = "float32",
    check_finite: bool = False,
    labels=None,
    label_pairs: LabelPairs = "different",
) -> dd.DataFrame:
    """Every pair ``(batch, i, j)`` with similarity ``>= threshold``, as a lazy DataFrame.

    One ``cosine-pairs`` task per output block computes the block and keeps only the
    pairs above the threshold; each becomes one partition (unknown divisions).

    With ``b=None`` (or ``b is a``) each unordered pair is reported once, as ``i < j``,
    plus the diagonal ``i == j`` unless ``exclude_self=True``; only the block upper
    triangle is computed, so there is one partition per upper block.

    Parameters
    ----------
    a, b, chunks, device, precision
        As :func:`dask_cosim.cosine_similarity` (``chunks="auto"``: blocks sized by work,
        as in :func:`topk`). The threshold is applied where the
        product ran (on the GPU for CuPy blocks); only the pairs leave the device.
    threshold : float
        Keep the pairs whose deterministic score (as in :func:`topk`; README: Scores and
        ties) is ``>= threshold``: a pair exactly at the threshold is in, for every
        chunking and BLAS kernel. Scores are clipped to [-1, 1]; NaN never passes.
    dtype : float dtype, optional
        The ``score`` column's dtype, as the output dtype of
        :func:`dask_cosim.cosine_similarity` (a wider dtype also runs the products in it).
    zero_vector : {"zero", "nan", "error"}
        As :func:`dask_cosim.cosine_similarity`: a zero vector scores 0 with every vector
        (so it passes thresholds <= 0), NaN (never passes) or raises
        :class:`~dask_cosim.ZeroVectorError` at compute time.
    exclude_self : bool
        Drop pairs with ``i == j`` (``b`` must have as many vectors as ``a``).
    check_finite : bool
        As :func:`dask_cosim.cosine_similarity`: the normalise tasks refuse NaN/inf blocks.
    labels, label_pairs
        Label mask as in :func:`topk`: pairs it drops are filtered inside the block tasks.

    Returns
    -------
    dask.dataframe.DataFrame
        Columns ``batch``, ``i``, ``j`` (int64; ``batch`` is 0 for 2-D inputs) and
        ``score`` (the similarity dtype, ``>= threshold``), in block order. ``score`` is
        the pair's deterministic score where the block product lies within the rounding
        margin of the threshold, the block product otherwise (within that margin of the
        score).

    Examples
    --------
    >>> import numpy as np, dask_cosim as dcs
    >>> a = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    >>> dcs.pairs_above(a, threshold=0.5, exclude_self=True).compute()
       batch  i  j  score
    0      0  0  1    0.8
    1      0  1  2    0.6
    """
    import dask.dataframe as dd

    threshold = check_threshold(threshold)
    prep = _prepare(
        a, b, op="pairs", chunks=chunks, dtype=dtype, device=device, zero_vector=zero_vector,
        precision=precision, check_finite=check_finite,
    )  # fmt: skip
    exclude_self = _check_exclude_self(exclude_self, prep)
    labels, label_pairs = check_labels(labels, prep), check_label_pairs(label_pairs)
    meta = _pairs_meta(prep.out_dtype)
    if 0 in prep.out_shape:
        result = dd.from_pandas(meta, npartitions=1)
    else:
        token = tokenize(prep.an.name, prep.bn.name, prep.plan.chunks, threshold, exclude_self)
        if labels is not None:
            token = tokenize(token, labels_token(labels), label_pairs)
        name = f"cosine-pairs-{token}"
        kwargs = {**prep.product_kwargs(), "like": "numpy", "threshold": threshold}
        if labels is not None:
            kwargs["label_pairs"] = label_pairs
        if use_triangle(prep):

            def task_for(kb, i, j, offsets):
                task = partial(_pairs_frame, exclude_self=exclude_self, **offsets, **kwargs)
                return routed(task, prep.device)

            extras = () if labels is None else (block_labels(labels, prep)[0],)
            graph, keys = pairs_triangle_graph(prep, name, task_for, extras)
        else:
            parts = _pairs_parts(prep, exclude_self, kwargs, labels)
            graph, keys = parts.__dask_graph__(), list(flatten(parts.__dask_keys__()))
        divisions = (None,) * (len(keys) + 1)
        result = frame_from_graph(graph, meta, divisions, keys, "cosine-frame")
    record_result(
        collection_name(result), "pairs", prep, a, b, threshold=threshold, exclude_self=exclude_self,
        zero_vector=zero_vector, precision=precision, **_label_facts(labels, label_pairs),
    )  # fmt: skip
    return result


def _pairs_meta(dtype) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "batch": np.empty(0, dtype=np.int64),
            "i": np.empty(0, dtype=np.int64),
            "j": np.empty(0, dtype=np.int64),
            "score": np.empty(0, dtype=dtype),
        }
    )


def _pairs_parts(prep: Prepared, exclude_self: bool, kwargs: dict, labels=None) -> da.Array:
    """Object array of per-block DataFrames (rectangular blocks)."""
    rows, cols = _row_and_col_indices(prep)
    extra = []
    if labels is not None:  # before the batch numbers: _pairs_task takes them positionally
        lrows, lcols = block_labels(labels, prep)
        extra = [lrows, "i", lcols, "j"]
    if len(prep.out_index) == 3:
        extra += [da.arange(prep.out_shape[0], chunks=(prep.plan.batch,), dtype=np.int64), "k"]
    return prep.pair_blockwise(
        _pairs_task if labels is None else _labelled_pairs_task,
        rows,
        "i",
        cols,
        "j",
        *extra,
        token="cosine-pairs",  # a token, not a name: see dask_cosim._compat.map_blocks
        dtype=object,
        meta=np.empty((0,) * len(prep.out_index), dtype=object),
        upper=prep.self_similar,
        exclude_self=exclude_self,
        **kwargs,
    )


def _pairs_task(an, bn, rows, cols, batches=None, **kwargs):
    return _pairs_frame(
        an,
        bn,
        row_offset=int(rows[0]),
        col_offset=int(cols[0]),
        batch_offset=0 if batches is None else int(batches[0]),
        **kwargs,
    )


def _labelled_pairs_task(an, bn, rows, cols, row_labels, col_labels, batches=None, **kwargs):
    return _pairs_task(an, bn, rows, cols, batches, row_labels=row_labels, col_labels=col_labels, **kwargs)


def _pairs_frame(an, bn, row_labels=None, col_labels=None, **kwargs) -> pd.DataFrame:
    import pandas as pd

    if row_labels is not None:
        kwargs.update(row_labels=row_labels, col_labels=col_labels)
    batch, i, j, score = pairs_block(an, bn, **kwargs)
    return pd.DataFrame({"batch": batch, "i": i, "j": j, "score": score})
