"""Scaled blocks: an input block left as it is, with its rows' inverse norms.

A dense product needs the unit rows of its two blocks only while it multiplies them. So
for :func:`~dask_cosim.cosine_similarity` a normalise task on NumPy only reads its block:
it returns the block itself with its rows' inverse norms, and each product task writes
the unit rows (each row times its inverse norm, the very bits the normalisation writes)
into scratch memory, a batch element or panel at a time, right before its GEMM reads them
from cache (:func:`dask_cosim._kernels.matmul_clip_numpy`). No normalised copy of an
input is written to memory and read back, and the GEMMs multiply the same unit rows.

A block with a vector that needs the careful normalisation (zero, NaN, inf, or a squared
norm that is not a normal float) is normalised by its task as before.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ScaledBlock", "as_unit"]


class ScaledBlock:
    """A NumPy block ``raw`` of shape ``(..., rows, D)`` and ``inv`` of shape ``(..., rows)``,
    the inverse L2 norms of its rows: the normalised block is ``raw * inv[..., None]``.

    Examples
    --------
    >>> s = ScaledBlock(np.array([[3.0, 4.0]]), np.array([0.2]))
    >>> as_unit(s)
    array([[0.6, 0.8]])
    """

    __slots__ = ("raw", "inv")

    def __init__(self, raw: np.ndarray, inv: np.ndarray):
        self.raw, self.inv = raw, inv

    # as a dask chunk it stands for the normalised block: code that inspects chunks sees its shape
    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def dtype(self) -> np.dtype:
        return self.raw.dtype

    def __sizeof__(self) -> int:  # what dask's sizeof (and so the dashboard) reports
        return self.raw.nbytes + self.inv.nbytes


def as_unit(x):
    """The normalised block of a :class:`ScaledBlock` (bit for bit what the normalise task
    computes: each row times its inverse norm); any other block as it is."""
    if isinstance(x, ScaledBlock):
        return x.raw * x.inv[..., None]
    return x
