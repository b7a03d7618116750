"""Deterministic pair scores: what decides ties and thresholds in the reductions.

A block product (a BLAS GEMM, cuBLAS) rounds the same dot product differently depending
on where the two vectors sit inside their blocks and on the BLAS kernel, so its values
cannot decide ties (exact duplicates) or a pair exactly at a threshold reproducibly.
The reductions therefore use block products only to *select candidates*, with a margin
(:func:`score_margin`) that bounds the difference between a block value and the pair's
*score* (:func:`pair_scores`): the products of the two vectors' components, summed
along the vector axis by NumPy's pairwise summation, both in the product dtype, then
clipped to [-1, 1]. The score depends only on the two vectors: not on chunking, block
position, BLAS library or kernel, thread count or scheduler (on CuPy blocks the sum is
a fixed binary tree over the zero-padded vector instead, equally independent of all
that, but not bitwise equal to NumPy's).

Only the few candidates near a decision are scored this way (the ``k`` best of a row
and their near-ties, pairs within the margin of a threshold), so the cost stays small
next to the product. Sparse blocks do not need it: their products sum each pair over
its non-zeros in index order, already independent of the block and of any BLAS.
"""

from __future__ import annotations

import math
import os

import array_api_compat
import numpy as np

from ._kernels import reduce_precision

__all__ = ["score_margin", "pair_scores", "Rescorer", "score_operands"]

#: Pairs scored together on NumPy: about this many values of scratch (in cache).
_CHUNK_VALUES = 2**17
#: Explicit mantissa bits of the reduced operand formats (see :data:`~dask_cosim._kernels.PRECISIONS`).
_OPERAND_BITS = {"tf32": 10, "bfloat16": 7, "float16": 10}


def score_margin(dim: int, dtype, *, precision: str = "float32", device_product: bool = False) -> float:
    """Upper bound of ``|block value - score|`` for one pair of unit vectors of length ``dim``.

    A dot product summed in any order (with or without FMA) in a dtype of unit roundoff
    ``u`` errs by at most ``dim * u`` times ``sum |a_d b_d| <= |a| |b| ~ 1``; both the
    block product and the score are such sums. The bound used is twice their sum plus
    the clipping's and a final rounding's share: ``4 (dim + 2) u``. ``device_product``:
    the block product ran on a GPU whose reduced-precision (or ``CUPY_TF32=1``) products
    may round operands and accumulate differently from the exact emulation; the margin
    then also covers operand rounding and a coarser accumulation.

    Examples
    --------
    >>> score_margin(128, np.float32) < 4e-5
    True
    """
    u = _eps(dtype) / 2
    margin = 4 * (dim + 2) * u
    if device_product:
        tf32 = precision == "float32" and os.environ.get("CUPY_TF32", "0") == "1"
        bits = _OPERAND_BITS.get("tf32" if tf32 else precision)
        if bits is not None:
            margin = 4 * (dim + 2) * 2.0**-22 + 4 * 2.0**-bits
    return margin


def _eps(dtype) -> float:
    """Machine epsilon of a float dtype of any namespace (NumPy's, CuPy's, ``array_api_strict``'s)."""
    try:
        return float(np.finfo(np.dtype(dtype)).eps)
    except TypeError:
        return float(np.finfo(str(dtype).rsplit(".", 1)[-1]).eps)


def score_operands(an, bn, precision: str):
    """The operands whose products a block multiplies: ``an``/``bn`` rounded to the reduced
    format for ``precision != "float32"`` (see :func:`~dask_cosim._kernels.reduce_precision`)."""
    if precision == "float32":
        return an, bn
    return reduce_precision(an, precision), reduce_precision(bn, precision)


def pair_scores(a, b, ia, ib, dtype=None):
    """Scores of the pairs ``(a[ia[p]], b[ib[p]])``: the deterministic formula (module docstring).

    ``a`` ``(Na, D)`` and ``b`` ``(Nb, D)`` are 2-D arrays of one namespace (NumPy, CuPy,
    any array API), ``ia``/``ib`` integer index arrays of one length. Products and sums
    run in the product dtype of ``a`` and ``b``; the scores are returned in ``dtype``
    (default: that dtype), clipped to [-1, 1], ``+0.0`` rather than ``-0.0``; a NaN
    component gives NaN.

    Examples
    --------
    >>> a = np.array([[0.6, 0.8], [1.0, 0.0]])
    >>> pair_scores(a, a, np.array([0, 0, 1]), np.array([0, 1, 1]))
    array([1. , 0.6, 1. ])
    """
    xp = array_api_compat.array_namespace(a, b)
    work = xp.result_type(a.dtype, b.dtype)
    dtype = dtype if dtype is not None else work
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        sums = _dot_numpy(
            a.astype(work, copy=False), b.astype(work, copy=False), np.asarray(ia), np.asarray(ib)
        )
    else:
        sums = _dot_generic(xp, xp.astype(a, work), xp.astype(b, work), ia, ib)
    scores = xp.clip(xp.astype(sums, dtype), -1.0, 1.0)
    return scores + xp.asarray(0.0, dtype=dtype, device=array_api_compat.device(scores))  # -0.0 -> 0.0


def _dot_numpy(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Pairwise sums of the pairs' products, a chunk of pairs at a time in reused scratch.

    NumPy sums each row of a C-contiguous 2-D array along its last axis with its pairwise
    summation, whose order depends only on the row's length: never on the chunk.
    """
    count, d = len(ia), a.shape[-1]
    out = np.empty(count, dtype=a.dtype)
    if count == 0:
        return out
    if d == 0:
        out[:] = 0.0
        return out
    rows = max(1, min(count, _CHUNK_VALUES // d))
    ga = np.empty((rows, d), dtype=a.dtype)
    gb = np.empty((rows, d), dtype=b.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for p0 in range(0, count, rows):
            n = min(rows, count - p0)
            np.take(a, ia[p0 : p0 + n], axis=0, out=ga[:n], mode="clip")  # indices are valid
            np.take(b, ib[p0 : p0 + n], axis=0, out=gb[:n], mode="clip")
            np.add.reduce(np.multiply(ga[:n], gb[:n], out=ga[:n]), axis=1, out=out[p0 : p0 + n])
    return out


def _dot_generic(xp, a, b, ia, ib):
    """The sums on other namespaces: ``xp.sum`` where it is NumPy's (``array_api_strict``),
    a fixed binary tree over the zero-padded vector axis on CuPy (whose reductions may
    change order with the number of pairs)."""
    p = xp.take(a, ia, axis=0) * xp.take(b, ib, axis=0)
    if not array_api_compat.is_cupy_array(p):
        return xp.sum(p, axis=1)
    d = p.shape[1]
    width = 1 << max(0, d - 1).bit_length()
    if width != d:
        p = xp.concat(
            [p, xp.zeros((p.shape[0], width - d), dtype=p.dtype, device=array_api_compat.device(p))], axis=1
        )
    while width > 1:
        width //= 2
        p = p[:, :width] + p[:, width : 2 * width]
    return p[:, 0]


class Rescorer:
    """Scores pairs of one block: rows of ``a`` against rows of ``b`` (2-D or batched).

    ``a`` ``(..., n, D)`` and ``b`` ``(..., m, D)`` are the operands of the block product
    (leading axes broadcast); :meth:`rows` and :meth:`cols` score candidates named the
    way the selection kernels name them. ``margin``: :func:`score_margin` for this block.
    """

    def __init__(self, a, b, margin: float, dtype=None):
        xp = array_api_compat.array_namespace(a, b)
        lead = tuple(np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2])))
        self.batch = math.prod(lead)
        self.n, self.m = a.shape[-2], b.shape[-2]
        self.a = _flat(xp, a, lead)
        self.b = _flat(xp, b, lead)
        self.margin = margin
        self.dtype = dtype if dtype is not None else xp.result_type(a.dtype, b.dtype)
        self.xp = xp

    @classmethod
    def for_block(cls, a, b, *, precision: str = "float32", dtype=None) -> Rescorer:
        """The rescorer of a block product ``a @ b.T`` in ``precision`` (operands rounded to it)."""
        device_product = array_api_compat.is_cupy_array(a)
        a, b = score_operands(a, b, precision)
        xp = array_api_compat.array_namespace(a, b)
        product_dtype = xp.result_type(a.dtype, b.dtype)
        margin = score_margin(a.shape[-1], product_dtype, precision=precision, device_product=device_product)
        if dtype is not None:  # the block's values were rounded once more, to dtype
            margin += _eps(dtype)
        return cls(a, b, margin, dtype)

    def scores(self, ia, ib):
        """Scores of flat pairs: ``ia`` into the ``(batch * n)`` rows of ``a``, ``ib`` into ``b``'s."""
        return pair_scores(self.a, self.b, ia, ib, self.dtype)

    def rows(self, group, member):
        """Scores of candidates named (row ``group`` of the flat ``(batch * n, m)`` block,
        column ``member``), as the row selections name them."""
        return self.scores(group, self._b_index(group // self.n, member))

    def cols(self, group, member):
        """Scores of candidates named (column ``group`` of the flat ``(batch * m, n)``
        transposed block, row ``member``), as the column selections name them."""
        return self.scores(self._a_index(group // self.m, member), group)

    def _a_index(self, batch, row):
        return row if self.batch == 1 else batch * self.n + row

    def _b_index(self, batch, col):
        return col if self.batch == 1 else batch * self.m + col


def _flat(xp, x, lead):
    """``x`` as ``(batch * rows, D)``, broadcast over the leading axes ``lead`` (a view when it can be)."""
    if not lead:
        return x
    if tuple(x.shape[:-2]) == lead:
        return xp.reshape(x, (-1, x.shape[-1]))
    full = xp.broadcast_to(x, (*lead, *x.shape[-2:]))
    return xp.reshape(full, (-1, x.shape[-1]))
