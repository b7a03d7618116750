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

__all__ = ["reference_cosine", "to_numpy", "count_task_prefixes"]


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


@contextmanager
def count_task_prefixes() -> Iterator[Counter]:
    """Count executed tasks by key prefix (``cosine-block``...) under the local schedulers."""
    counts: Counter = Counter()

    class _Count(Callback):
        def _posttask(self, key, result, dsk, state, id):
            counts[key_split(key)] += 1

    with _Count():
        yield counts
