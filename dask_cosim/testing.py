"""Helpers shared by the tests (and useful in users' own tests).

>>> import numpy as np
>>> reference_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0], [3.0, 0.0]]))
array([[0., 1.]])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from dask.callbacks import Callback
from dask.utils import key_split

from ._backend import to_numpy
from ._select import EXCLUDED_KEY, NAN_KEY

__all__ = ["reference_cosine", "to_numpy", "count_task_prefixes", "assert_topk_indices"]


def reference_cosine(a, b=None) -> np.ndarray:
    """float64 cosine similarity with scikit-learn's semantics (zero vectors give 0).

    Accepts 2-D or 3-D inputs and broadcasts batches like :func:`numpy.matmul`.
    """
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = a if b is None else np.asarray(to_numpy(b), dtype=np.float64)

    def unit(x):
        norm = np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]
        return x / np.where(norm == 0, 1.0, norm)

    return np.clip(np.matmul(unit(a), np.swapaxes(unit(b), -1, -2)), -1.0, 1.0)


def assert_topk_indices(idx, s, *, atol: float, exclude_self=False, row_offset=0, col_offset=0) -> None:
    """Top-k indices ``idx`` (``(..., n, k)``) of the rows of ``s`` (``(..., n, m)``, the float64
    reference, NaN allowed) equal the exact ranking wherever it is not a near-tie.

    The ranking is the library's: descending, ties by the smaller column, NaN last, with
    ``exclude_self`` the global diagonal (row ``i + row_offset`` = column ``j + col_offset``)
    never picked; ``idx`` holds global columns (``j + col_offset``). A product computed in
    another order (other blocks, precision, device) may swap two neighbours whose values lie
    within ``2 * atol``; every other position must hold the reference's column, a swapped
    one a column whose value is within ``2 * atol`` of the reference's, and no row may
    repeat a column. A bug that wrecks one row fails, whatever the other rows do.

    >>> s = np.array([[0.1, 0.9, 0.5, 0.5000001]])
    >>> assert_topk_indices(np.array([[1, 3, 2]]), s, atol=1e-6)  # 2 and 3 are a near-tie
    >>> assert_topk_indices(np.array([[1, 0, 2]]), s, atol=1e-6)
    Traceback (most recent call last):
    ...
    AssertionError: row 0: positions [1] hold [0] (values [0.1]), the reference [3] (values [0.5000001])
    """
    idx = np.asarray(to_numpy(idx))
    s = np.asarray(to_numpy(s), dtype=np.float64)
    k = idx.shape[-1]
    key = np.where(np.isnan(s), NAN_KEY, s)
    n, m = s.shape[-2:]
    if exclude_self:
        diagonal = (np.arange(n)[:, None] + row_offset) == (np.arange(m)[None, :] + col_offset)
        key = np.where(diagonal, EXCLUDED_KEY, key)
    ref = np.argsort(-key, axis=-1, kind="stable")[..., :k]
    assert idx.shape == ref.shape, (idx.shape, ref.shape)
    key2, got2, ref2 = key.reshape(-1, m), idx.reshape(-1, k) - col_offset, ref.reshape(-1, k)
    for row, (g, r) in enumerate(zip(got2, ref2, strict=True)):
        assert len(set(g.tolist())) == k, f"row {row}: repeated columns {g + col_offset}"
        assert ((g >= 0) & (g < m)).all(), f"row {row}: columns {g + col_offset} out of range"
        if exclude_self:
            assert not (key2[row][g] == EXCLUDED_KEY).any(), f"row {row}: picked itself ({g + col_offset})"
        others = np.abs(key2[row][None, :] - key2[row][r][:, None])  # (k, m)
        others[np.arange(k), r] = np.inf
        isolated = others.min(axis=1) > 2 * atol
        off = np.abs(key2[row][g] - key2[row][r]) > 2 * atol
        wrong = np.flatnonzero((isolated & (g != r)) | off)
        if len(wrong):
            raise AssertionError(
                f"row {row}: positions {wrong.tolist()} hold {(g[wrong] + col_offset).tolist()} (values "
                f"{key2[row][g[wrong]].tolist()}), the reference {(r[wrong] + col_offset).tolist()} "
                f"(values {key2[row][r[wrong]].tolist()})"
            )


@contextmanager
def count_task_prefixes() -> Iterator[Counter]:
    """Count executed tasks by key prefix (``cosine-block``...) under the local schedulers."""
    counts: Counter = Counter()

    class _Count(Callback):
        def _posttask(self, key, result, dsk, state, id):
            counts[key_split(key)] += 1

    with _Count():
        yield counts
