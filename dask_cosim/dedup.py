"""Exact near-duplicate groups: connected components of the threshold graph, computed blockwise.

The graph has an edge wherever ``similarity >= threshold``. Each upper block of the
self-similarity (the same tasks as :func:`dask_cosim.pairs_above`) finds its pairs and
reduces them at once to a *forest* of its connected components (union-find in NumPy,
:mod:`dask_cosim._components`); the pairs themselves never leave the task. Forests are
merged as a tree, :data:`SPLIT_EVERY` per ``cosine-union`` task, into one forest
over the rows that have any link; one ``cosine-groups`` task per row block then labels
its rows from it. Peak memory: a block of S per product task, and forests that hold at
most one entry per linked row.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.core import flatten
from dask.delayed import Delayed, delayed

from ._compat import collection_name, delayed_from_graph
from ._components import components, finish_forest, group_rows, merge_forests
from ._labels import LabelPairs, block_labels, check_label_pairs, check_labels, labels_token
from ._options import check_threshold
from ._prepared import Prepared
from ._resources import routed
from ._select import pairs_block
from ._triangle import pairs_triangle_graph, use_triangle
from .core import Device, record_result
from .reductions import _prepare, _row_and_col_indices

if TYPE_CHECKING:  # imported where used: ``import dask_cosim`` stays light
    import dask.dataframe as dd
    import pandas as pd

__all__ = ["duplicate_groups", "SPLIT_EVERY"]

#: Forests merged by one ``cosine-union`` task.
SPLIT_EVERY = 8


def duplicate_groups(
    a,
    threshold: float = 0.95,
    *,
    labels=None,
    label_pairs: LabelPairs = "different",
    chunks="auto",
    device: Device = "auto",
) -> dd.DataFrame:
    """Groups of near-duplicate vectors: connected components of ``similarity >= threshold``.

    Two rows are linked when their cosine similarity is ``>= threshold``; a group is a
    connected component of that graph over the whole set (so ``A ~ B ~ C`` puts ``A`` and
    ``C`` in one group even when ``A`` and ``C`` are below the threshold). Each block of
    the self-similarity reduces its pairs to a union-find forest inside its task; the
    forests merge as a tree, so the number of pairs may far exceed memory.

    Parameters
    ----------
    a
        As :func:`dask_cosim.cosine_similarity`: ``(N, D)``, or ``(batch, N, D)`` where
        each batch is deduplicated on its own.
    threshold : float
        Link rows with ``similarity >= threshold``, a real number in [-1, 1]. NaN vectors
        are never linked (singletons); zero vectors have similarity 0 with everything.
    labels : array_like or dask.array.Array, optional
        One integer label per row (length N): only pairs that pass the label mask link.
    label_pairs : {"different", "same"}
        ``"different"``: link only rows whose labels differ; ``"same"``: only rows that
        share a label (e.g. deduplicate per language).
    chunks, device
        As :func:`dask_cosim.pairs_above` (blocks of S one task computes; where).

    Returns
    -------
    dask.dataframe.DataFrame
        One row per input row, in row order: ``batch`` (3-D input only), ``i``, ``group``
        (the smallest row index of the group: ``i == group`` keeps one row of each) and
        ``size`` (the group's size), all int64; one partition per block of rows (and of
        batches), indexed by ``batch * N + i``. Links are decided by deterministic pair
        scores (as :func:`dask_cosim.pairs_above`; README: Scores and ties), so the result
        does not depend on chunking, scheduler or BLAS kernel.

    Examples
    --------
    >>> import numpy as np, dask_cosim as dcs
    >>> a = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [1.0, 1.0]])
    >>> dcs.duplicate_groups(a, threshold=0.95).compute()
       i  group  size
    0  0      0     2
    1  1      0     2
    2  2      2     2
    3  3      2     2
    4  4      4     1
    >>> dcs.duplicate_groups(a, threshold=0.95, labels=[0, 0, 1, 2, 3]).compute()["group"].tolist()
    [0, 1, 2, 2, 4]
    """
    return _duplicate_groups(
        a, threshold, labels=labels, label_pairs=label_pairs, chunks=chunks, device=device, checkpoint=None
    )


def _duplicate_groups(
    a, threshold, *, labels, label_pairs, chunks, device, checkpoint: tuple | None
) -> dd.DataFrame:
    """:func:`duplicate_groups`; ``checkpoint=(fs, folder)`` (fsspec) keeps each block's forest
    there, and a rerun loads the forests it finds instead of computing their blocks again
    (``dask-cosim dedup --resume``)."""
    import dask.dataframe as dd

    threshold = check_threshold(threshold)  # a real number in [-1, 1], as for pairs_above
    label_pairs = check_label_pairs(label_pairs)
    prep = _prepare(a, None, op="pairs", chunks=chunks, device=device)
    labels = check_labels(labels, prep)
    batched = len(prep.out_index) == 3
    meta = _groups_meta(batched)
    if 0 in prep.out_shape:
        result = dd.from_pandas(meta, npartitions=1)
    else:
        token = tokenize(prep.an.name, prep.plan.chunks, threshold, labels_token(labels), label_pairs)
        if checkpoint is not None:
            token = tokenize(token, checkpoint[1])
        forests = _forests(prep, token, threshold, labels, label_pairs, checkpoint)
        final = _merge_tree(forests, token)
        n, n_batch = prep.out_shape[-2], prep.out_shape[0]
        rows = _spans(prep.plan.rows)
        # rows in (batch, i) order: one batch per partition when there are several row blocks
        batches = [(0, 1)] if not batched else _spans(prep.plan.batch if len(rows) == 1 else (1,) * n_batch)
        parts = [
            delayed(_groups_frame, pure=True)(
                final, b0, b1, r0, r1, n, batched, dask_key_name=(f"cosine-groups-{token}", p)
            )
            for p, ((b0, b1), (r0, r1)) in enumerate((bb, rr) for bb in batches for rr in rows)
        ]
        result = dd.from_delayed(parts, meta=meta, verify_meta=False)
    facts = {} if labels is None else {"labels": labels_token(labels), "label_pairs": label_pairs}
    record_result(collection_name(result), "groups", prep, a, None, threshold=threshold, **facts)
    return result


def _spans(sizes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block of the given sizes."""
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def _groups_meta(batched: bool) -> pd.DataFrame:
    import pandas as pd

    cols = ("batch", "i", "group", "size") if batched else ("i", "group", "size")
    return pd.DataFrame({c: np.empty(0, dtype=np.int64) for c in cols})


def _groups_frame(final, b0: int, b1: int, r0: int, r1: int, n: int, batched: bool) -> pd.DataFrame:
    import pandas as pd

    cols = group_rows(final, range(b0, b1), range(r0, r1), n, batched)
    b = cols["batch"] if batched else 0
    return pd.DataFrame(cols, index=pd.Index(b * n + cols["i"]))


# --------------------------------------------------------------------------- graph


def _forests(
    prep: Prepared, token: str, threshold: float, labels, label_pairs: str, checkpoint=None
) -> list[Delayed]:
    """One ``cosine-forest`` task per upper block of S: the forest of its pairs."""
    name = f"cosine-forest-{token}"
    kwargs = {**prep.product_kwargs(), "like": "numpy", "threshold": threshold, "n": prep.out_shape[-2]}
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    if labels is not None:
        kwargs["label_pairs"] = label_pairs
    if use_triangle(prep):

        def task_for(kb, i, j, offsets):
            return routed(partial(_forest_block, **offsets, **kwargs), prep.device)

        extras = () if labels is None else (block_labels(labels, prep)[0],)
        graph, keys = pairs_triangle_graph(prep, name, task_for, extras)
    else:
        rows, cols = _row_and_col_indices(prep)
        extra = []
        if labels is not None:  # before the batch numbers: _forest_task takes them positionally
            lrows, lcols = block_labels(labels, prep)
            extra = [lrows, "i", lcols, "j"]
        if len(prep.out_index) == 3:
            extra += [da.arange(prep.out_shape[0], chunks=(prep.plan.batch,), dtype=np.int64), "k"]
        parts = prep.pair_blockwise(
            _forest_task, rows, "i", cols, "j", *extra,
            token="cosine-forest", dtype=object, meta=np.empty((0,) * len(prep.out_index), dtype=object),
            upper=True, labelled=labels is not None, **kwargs,
        )  # fmt: skip
        graph, keys = parts.__dask_graph__(), list(flatten(parts.__dask_keys__()))
    return [delayed_from_graph(key, graph, layer=key[0]) for key in keys]


def _merge_tree(forests: list[Delayed], token: str) -> Delayed:
    """Merge forests :data:`SPLIT_EVERY` at a time until one is left, then add the sizes."""
    level = 0
    while len(forests) > 1:
        forests = [
            delayed(merge_forests, pure=True)(
                forests[s : s + SPLIT_EVERY], dask_key_name=(f"cosine-union-{token}", level, s)
            )
            for s in range(0, len(forests), SPLIT_EVERY)
        ]
        level += 1
    return delayed(finish_forest, pure=True)(forests[0], dask_key_name=f"cosine-roots-{token}")


def _forest_block(an, bn, row_labels=None, col_labels=None, *, n: int, checkpoint=None, **kwargs):
    """The forest of one block's pairs (node ids ``batch * n + i``); the diagonal is no link.

    With ``checkpoint=(fs, folder)`` the forest is loaded from the folder if an earlier run
    stored it there, else computed and stored (under a temporary name, then renamed).
    """
    if row_labels is not None:
        kwargs.update(row_labels=row_labels, col_labels=col_labels)

    def compute():
        b, i, j, _ = pairs_block(an, bn, exclude_self=True, **kwargs)
        return components(b * n + i, b * n + j)

    if checkpoint is None:
        return compute()
    offsets = (kwargs.get("batch_offset", 0), kwargs.get("row_offset", 0), kwargs.get("col_offset", 0))
    return _stored(checkpoint, "forest-{}-{}-{}.npy".format(*offsets), compute)


def _stored(checkpoint: tuple, name: str, compute):
    """``compute()``'s forest, kept as ``folder/name``: loaded when there, else computed and saved."""
    fs, folder = checkpoint
    path = f"{folder}/{name}"
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            nodes, roots = np.load(f, allow_pickle=False)
        return nodes, roots
    nodes, roots = compute()
    fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.{os.getpid()}.tmp"
    with fs.open(tmp, "wb") as f:
        np.save(f, np.stack([nodes, roots]))
    fs.mv(tmp, path)
    return nodes, roots


def _forest_task(an, bn, rows, cols, *rest, labelled: bool, **kwargs):
    """:func:`_forest_block` on rectangular blocks (offsets from the row/column numbers)."""
    if labelled:
        kwargs.update(row_labels=rest[0], col_labels=rest[1])
        rest = rest[2:]
    return _forest_block(
        an,
        bn,
        row_offset=int(rows[0]),
        col_offset=int(cols[0]),
        batch_offset=int(rest[0][0]) if rest else 0,
        **kwargs,
    )
