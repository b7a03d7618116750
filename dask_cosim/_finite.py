"""Opt-in refusal of NaN/inf inputs (``check_finite=True``), inside the tasks that read each block.

Nothing is read while the graph is built: each ``cosine-normalize`` task checks the one
input block it normalises anyway, and only when that block is not plainly finite (its
fast path already proved every squared norm finite, so a finite block costs nothing). A
block holding NaN or inf raises :class:`NonFiniteError` from its task, naming the input,
the block, how many of its vectors are affected and the first of them; ``compute`` (and a
writer, and the CLI) then fails like any other task error.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NonFiniteError", "first_nonfinite", "raise_nonfinite"]

_KINDS = {1: "nan", 2: "inf", 3: "-inf"}


class NonFiniteError(ValueError):
    """An input holds NaN or inf while ``check_finite=True``."""


def first_nonfinite(x: np.ndarray) -> tuple[tuple[int, ...], int, int, int] | None:
    """``(vector index, column, kind, vectors affected)`` of the first NaN/inf vector of a block
    (C order: batch, then row), ``None`` when every value is finite; ``kind`` 1 NaN, 2 inf, 3 -inf.

    >>> x = np.ones((4, 3)); x[2, 1] = np.nan; x[3, 0] = -np.inf
    >>> first_nonfinite(x)
    ((2,), 1, 1, 2)
    >>> first_nonfinite(np.ones((2, 2))) is None
    True
    """
    if x.size == 0 or np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
        return None
    bad = ~np.isfinite(x)
    bad_rows = bad.any(axis=-1)
    count = int(np.count_nonzero(bad_rows))
    if not count:
        return None
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad_rows)), bad_rows.shape))
    col = int(np.argmax(bad[first]))
    value = x[first][col]
    kind = 1 if np.isnan(value) else (2 if value > 0 else 3)
    return first, col, kind, count


def raise_nonfinite(x: np.ndarray, *, input_name: str, offset: tuple[int, int] | None, batched: bool) -> None:
    """Raise :class:`NonFiniteError` if the block ``x`` (first vector at global ``offset =
    (batch, row)``) holds NaN or inf.

    >>> bad = np.ones((2, 5, 3)); bad[1, 4, 2] = np.inf
    >>> try:
    ...     raise_nonfinite(bad, input_name="b", offset=(2, 10), batched=True)
    ... except NonFiniteError as err:
    ...     found, first, _ = str(err).split("; ")
    >>> found
    'b: 1 vector(s) hold NaN or inf in batch 2:4, rows 10:15'
    >>> first
    'the first is at batch 3, row 14 (inf in column 2)'
    """
    found = first_nonfinite(x)
    if found is None:
        return
    (*lead, row), col, kind, count = found
    b0, r0 = offset or (0, 0)
    rows = f"rows {r0}:{r0 + x.shape[-2]}"
    if batched:
        span = f"batch {b0}:{b0 + x.shape[0]}, {rows}"
        where = f"batch {b0 + lead[0]}, row {r0 + row}"
    else:
        span, where = rows, f"row {r0 + row}"
    raise NonFiniteError(
        f"{input_name}: {count} vector(s) hold NaN or inf in {span}; the first is at {where} "
        f"({_KINDS[kind]} in column {col}); check_finite=True refuses non-finite inputs"
    )
