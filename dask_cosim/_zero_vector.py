"""Zero vectors under ``zero_vector="error"``: the error the normalise tasks raise, naming the row.

Shared by the dense kernels (:mod:`dask_cosim._kernels`) and the sparse ones
(:mod:`dask_cosim._sparse`), which the dense kernels call: its own module, so that
neither kernel module imports the other for it.
"""

from __future__ import annotations

import numpy as np

from ._backend import to_numpy

__all__ = ["ZeroVectorError", "raise_zero_vector"]


class ZeroVectorError(ValueError):
    """A zero vector was found while ``zero_vector="error"``."""


def raise_zero_vector(zero, *, input_name, offset, batched):
    """Raise :class:`ZeroVectorError` for the first zero vector of a block.

    ``zero`` marks the block's zero vectors (``(..., rows, 1)``); ``offset`` is the block's
    first ``(batch, row)``.

    >>> try:
    ...     raise_zero_vector(np.array([[False], [True]]), input_name="a", offset=(0, 10), batched=False)
    ... except ZeroVectorError as err:
    ...     print(str(err).split(" while ")[0])
    a: zero vector at row 11 (1 zero vector(s) in this block)
    """
    hits = np.argwhere(to_numpy(zero)[..., 0])
    first = [int(v) for v in hits[0]]
    b0, r0 = offset or (0, 0)
    if batched:
        where = f"batch {b0 + first[0]}, row {r0 + first[-1]}"
    else:
        where = f"row {r0 + first[-1]}"
    raise ZeroVectorError(
        f"{input_name}: zero vector at {where} ({len(hits)} zero vector(s) in this block) "
        "while zero_vector='error'; use zero_vector='zero' (similarity 0, as scikit-learn) "
        "or 'nan'"
    )
