"""Opt-in check that the inputs hold no NaN or inf, block-wise and before any output exists.

Each input block yields one small record (the first offending vector of the block, its
column, what the value is, and how many vectors of the block are affected); a dask tree
reduction keeps the earliest record and sums the counts, so memory stays at one input
block per task whatever the input size.
"""

from __future__ import annotations

from collections.abc import Mapping

import dask
import dask.array as da
import numpy as np

from ._backend import to_numpy
from ._zarr_guard import guard_input

__all__ = ["NonFiniteError", "nonfinite_summary", "check_finite"]

_NONE = np.iinfo(np.int64).max  # sort key of "no offending vector in this block"
_KINDS = {1: "nan", 2: "inf", 3: "-inf"}
# record fields: batch, row, column, kind, number of offending vectors
_FIELDS = 5


class NonFiniteError(ValueError):
    """An input holds NaN or inf while ``check_finite=True``."""


def _block_record(x: np.ndarray, block_info=None) -> np.ndarray:
    """One record per block: the block's first non-finite vector (global batch/row) and the count."""
    x = to_numpy(x)  # a CuPy block is checked on the host
    loc = block_info[0]["array-location"]
    out = np.full((1,) * (x.ndim - 1) + (_FIELDS,), _NONE, dtype=np.int64)
    out[..., 4] = 0
    if x.size == 0 or np.issubdtype(x.dtype, np.integer):
        return out
    bad = ~np.isfinite(x)
    bad_rows = bad.any(axis=-1)
    count = int(np.count_nonzero(bad_rows))
    if count:
        first = np.unravel_index(int(np.argmax(bad_rows)), bad_rows.shape)  # C order: batch, then row
        col = int(np.argmax(bad[first]))
        value = x[first][col]
        kind = 1 if np.isnan(value) else (2 if value > 0 else 3)
        batch = loc[0][0] + int(first[0]) if x.ndim == 3 else 0
        row = loc[-2][0] + int(first[-1])
        out[..., :4] = (batch, row, loc[-1][0] + col, kind)
        out[..., 4] = count
    return out


def _merge(records: np.ndarray, axis, keepdims: bool = False) -> np.ndarray:
    """Keep the earliest (batch, row) record and add up the counts (chunk/combine/aggregate)."""
    flat = records.reshape(-1, _FIELDS)
    first = np.lexsort((flat[:, 1], flat[:, 0]))[0] if len(flat) else None
    merged = np.full(_FIELDS, _NONE, dtype=np.int64)
    merged[4] = 0
    if first is not None:
        merged[:4] = flat[first, :4]
        merged[4] = flat[:, 4].sum()
    if keepdims:
        return merged.reshape((1,) * (records.ndim - 1) + (_FIELDS,))
    return merged


def nonfinite_summary(x, *, name: str = "a", split_every: int | None = None) -> da.Array:
    """Lazy summary of the NaN/inf vectors of an input, as a length-5 int64 dask array.

    ``[batch, row, column, kind, count]``: the first offending vector in (batch, row)
    order, the column of its first offending value, ``kind`` 1 NaN / 2 inf / 3 -inf, and
    the number of offending vectors; ``count == 0`` means every value is finite.

    ``x`` is read block-wise (aligned to its own storage chunks, vector axis whole) and
    reduced with :func:`dask.array.reduction`, so no task holds more than one block.

    Examples
    --------
    >>> a = np.ones((4, 3)); a[2, 1] = np.nan
    >>> nonfinite_summary(a).compute().tolist()
    [0, 2, 1, 1, 1]
    """
    if not isinstance(x, da.Array):
        chunks = ("auto",) * (len(x.shape) - 1) + (-1,)
        token = dask.base.tokenize(x)
        x = da.from_array(guard_input(x, name), chunks=chunks, name=f"cosine-finite-input-{name}-{token}")
    elif len(x.chunks[-1]) > 1:
        x = x.rechunk({x.ndim - 1: -1})
    if x.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2-D or 3-D array, received shape {x.shape}")
    out_chunks = tuple((1,) * n for n in x.numblocks[:-1]) + ((_FIELDS,),)
    records = x.map_blocks(
        _block_record,
        dtype=np.int64,
        chunks=out_chunks,
        token=f"cosine-finite-{name}",
        meta=np.empty((0,) * x.ndim, np.int64),
    )
    return da.reduction(
        records,
        chunk=_merge,
        combine=_merge,
        aggregate=_merge,
        axis=tuple(range(x.ndim - 1)),
        keepdims=False,
        dtype=np.int64,
        split_every=split_every,
        concatenate=True,
        name=f"cosine-finite-merge-{name}",
        meta=np.empty((0,), np.int64),
    )


def describe(summary, name: str, shape) -> str | None:
    """A one-line description of a computed summary, ``None`` when the input is finite."""
    batch, row, col, kind, count = (int(v) for v in summary)
    if count == 0:
        return None
    where = f"batch {batch}, row {row}" if len(shape) == 3 else f"row {row}"
    return (
        f"{name}: {count} vector(s) hold NaN or inf; the first is at {where} "
        f"({_KINDS.get(kind, '?')} in column {col})"
    )


def check_finite(inputs: Mapping[str, object], *, split_every: int | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first NaN/inf vector of each offending input.

    ``inputs`` maps argument names ("a", "b") to arrays of shape ``(batch, N, D)`` or
    ``(N, D)``. All summaries are computed together (one pass over each input, on the
    active scheduler) before the caller builds or writes anything.

    Examples
    --------
    >>> check_finite({"a": np.ones((2, 3))})
    >>> bad = np.ones((2, 3)); bad[1, 0] = np.inf
    >>> check_finite({"a": bad})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dask_cosim._finite.NonFiniteError: a: 1 vector(s) hold NaN or inf; the first is at row 1 (inf ...
    """
    names = list(inputs)
    summaries = dask.compute(*(nonfinite_summary(inputs[n], name=n, split_every=split_every) for n in names))
    problems = [
        msg
        for n, s in zip(names, summaries, strict=True)
        if (msg := describe(s, n, inputs[n].shape)) is not None
    ]
    if problems:
        raise NonFiniteError("; ".join(problems) + "; check_finite=True refuses non-finite inputs")
