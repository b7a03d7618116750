"""Sparse inputs: detection, per-block conversion to CSR, normalisation and products.

Sparse vectors (scipy.sparse matrices and arrays of every format, pydata ``sparse``
arrays, dask arrays of such chunks, ``cupyx.scipy.sparse`` matrices) are never densified:
each block is converted once to a canonical ``scipy.sparse.csr_matrix`` (duplicates
summed, indices sorted), every stored value is scaled by its row's inverse L2 norm
(accumulated in float64) and products are CSR x CSR\\ :sup:`T` (or CSR x dense) per
block, written into a dense block of S.

A normalised sparse block encodes the dense semantics without densifying: a row holding
NaN or inf (or a zero row under ``zero_vector="nan"``) keeps at least one stored NaN, and
:func:`nan_rows` finds such rows so the products make their whole row (or column) of S
NaN; a zero row under ``zero_vector="zero"`` stores nothing (similarity 0).

Like :mod:`dask_cosim._kernels`, the functions here take plain blocks and know nothing
of dask. scipy is imported lazily (it is a dependency of the sparse inputs only).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = [
    "is_sparse",
    "is_sparse_dask",
    "sparse_kind",
    "to_csr",
    "SparseSource",
    "normalize_sparse_rows",
    "nan_rows",
    "sparse_product",
    "sparse_similarity_block",
    "strip_product",
    "SparseProduct",
]


def _module(x) -> str:
    return type(x).__module__ or ""


def sparse_kind(x) -> str | None:
    """``"scipy"``, ``"pydata"`` or ``"cupyx"`` for a sparse array or matrix, else ``None``.

    Decided from the type's module, so nothing is imported for dense inputs.

    >>> import scipy.sparse
    >>> sparse_kind(scipy.sparse.eye(2, format="csr")), sparse_kind(np.eye(2))
    ('scipy', None)
    """
    mod = _module(x)
    if mod.startswith("scipy.sparse"):
        import scipy.sparse

        return "scipy" if scipy.sparse.issparse(x) else None
    if mod.startswith("cupyx.scipy.sparse"):
        return "cupyx"
    if mod == "sparse" or mod.startswith("sparse."):
        return "pydata" if hasattr(x, "nnz") and hasattr(x, "shape") else None
    return None


def is_sparse(x) -> bool:
    """Whether ``x`` is a sparse array or matrix this package reads (see :func:`sparse_kind`)."""
    return sparse_kind(x) is not None


def is_sparse_dask(x) -> bool:
    """Whether ``x`` is a dask array whose chunks are sparse (its ``_meta`` is)."""
    from ._compat import dask_meta

    meta = dask_meta(x)
    return meta is not None and is_sparse(meta)


def nnz_of(x) -> int:
    """Stored entries of an in-memory sparse input (duplicates of a COO counted)."""
    return int(x.nnz)


def to_csr(x):
    """A canonical ``scipy.sparse.csr_matrix`` (sorted indices, no duplicates) of a sparse block.

    Converts any scipy format, pydata ``sparse`` and (on the host) ``cupyx`` blocks. The
    result never shares its index arrays with a non-canonical input, so the input is
    never modified; a canonical CSR input is returned as a ``csr_matrix`` view of it.

    >>> import scipy.sparse
    >>> x = scipy.sparse.coo_array(([1.0, 2.0], ([0, 0], [1, 1])), shape=(1, 3))  # duplicates
    >>> to_csr(x).toarray()
    array([[0., 3., 0.]])
    """
    import scipy.sparse

    kind = sparse_kind(x)
    if kind == "cupyx":
        x = x.get()
    elif kind == "pydata":
        x = x.to_scipy_sparse()
    elif kind is None:
        raise TypeError(f"expected a sparse block, received {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"sparse blocks must be 2-D, received shape {x.shape}")
    if x.format == "csr" and x.has_canonical_format:
        return x if isinstance(x, scipy.sparse.csr_matrix) else scipy.sparse.csr_matrix(x)
    csr = scipy.sparse.csr_matrix(x, copy=True)  # copy: never sort/sum the user's arrays in place
    csr.sum_duplicates()  # also sorts the indices
    return csr


class SparseSource:
    """An in-memory sparse input as a source of row blocks for :func:`dask.array.from_array`.

    A canonical CSR input is sliced per block (no copy of the whole input); any other
    format is converted to CSR once per process, on the first block read (COO and DOK
    have no cheap row slices), and that copy is kept until the graph is gone. Blocks are
    always read over all columns (D is never split).
    """

    def __init__(self, x):
        self.x = x
        self.shape, self.dtype, self.ndim = tuple(x.shape), np.dtype(x.dtype), 2
        self._csr = None
        self._lock = threading.Lock()

    def csr(self):
        if self._csr is None:
            with self._lock:
                if self._csr is None:
                    self._csr = to_csr(self.x)
        return self._csr

    def __getitem__(self, index):
        rows = index[0] if isinstance(index, tuple) else index
        return self.csr()[rows]

    def __getstate__(self):
        return {"x": self.x, "shape": self.shape, "dtype": self.dtype, "ndim": self.ndim}

    def __setstate__(self, state):
        self.__dict__.update(state, _csr=None, _lock=threading.Lock())


def csr_meta(dtype):
    """An empty ``csr_matrix`` of ``dtype``: the ``meta`` of sparse dask blocks."""
    import scipy.sparse

    return scipy.sparse.csr_matrix((0, 0), dtype=dtype)


def _row_ids(x) -> np.ndarray:
    return np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))


def normalize_sparse_rows(
    x,
    *,
    compute_dtype: str = "float64",
    zero_vector: str = "zero",
    input_name: str = "a",
    offset: tuple[int, int] | None = None,
):
    """Scale every row of a sparse block to unit L2 length, storing only its non-zeros.

    The block is converted once to canonical CSR (:func:`to_csr`); squared norms are
    accumulated in float64, and a row whose squared norm is zero, subnormal or not finite
    is scaled by ``max|x|`` first, as the dense kernel does (each row on its own path). Rows holding
    NaN or inf become all-NaN stored values; a zero row stores nothing (``"zero"``),
    one NaN (``"nan"``) or raises :class:`~dask_cosim.ZeroVectorError` (``"error"``).

    Examples
    --------
    >>> import scipy.sparse
    >>> x = scipy.sparse.csr_matrix(np.array([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    >>> normalize_sparse_rows(x).toarray()
    array([[0.6, 0. , 0.8],
           [0. , 0. , 0. ]])
    """
    import scipy.sparse

    x = to_csr(x)
    n = x.shape[0]
    data = x.data.astype(np.float64)
    rows = _row_ids(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        sq = np.bincount(rows, weights=data * data, minlength=n)
        tiny = np.finfo(np.float64).smallest_normal
        regular = (sq >= tiny) & (sq <= np.finfo(np.float64).max)
        inv = 1.0 / np.sqrt(sq)
        bad = zero = None
        if not regular.all():  # careful path for the rows that need it: max|x| * ||x / max|x|||
            bad = np.zeros(n, dtype=bool)
            bad[rows[~np.isfinite(data)]] = True
            scale = np.zeros(n)
            np.maximum.at(scale, rows, np.where(np.isfinite(data), np.abs(data), 0.0))
            zero = (scale == 0) & ~bad
            safe = np.where(scale > 0, scale, 1.0)
            scaled = data / safe[rows]
            norm = safe * np.sqrt(np.bincount(rows, weights=scaled * scaled, minlength=n))
            careful = np.where(zero | bad, 0.0, 1.0 / np.where(norm > 0, norm, 1.0))
            inv = np.where(regular, inv, careful)  # each row's own path: equal rows, equal bits
        out = data * inv[rows]
    if zero is not None and zero_vector == "error" and zero.any():
        from ._zero_vector import raise_zero_vector

        raise_zero_vector(zero[:, None], input_name=input_name, offset=offset, batched=False)
    if bad is not None and bad.any():
        out[bad[rows]] = np.nan
    indptr, indices = x.indptr, x.indices
    nan_zero = zero is not None and zero_vector == "nan" and zero.any()
    if nan_zero:  # one stored NaN per zero row, so the products make its row of S NaN
        out, indices, indptr = _with_nan_rows(out, indices, indptr, zero)
    else:  # explicit stored zeros of zero rows are dropped below
        pass
    result = scipy.sparse.csr_matrix(
        (out.astype(compute_dtype, copy=False), indices.copy(), indptr.copy()), shape=x.shape
    )
    if zero is not None and not nan_zero:
        result.eliminate_zeros()
    result.has_sorted_indices = True
    return result


def _with_nan_rows(data, indices, indptr, rows_mask):
    """``data, indices, indptr`` with each row of ``rows_mask`` replaced by one NaN at column 0."""
    counts = np.diff(indptr)
    keep = ~np.repeat(rows_mask, counts)
    new_counts = np.where(rows_mask, 1, counts)
    new_ptr = np.zeros(len(counts) + 1, dtype=indptr.dtype)
    np.cumsum(new_counts, out=new_ptr[1:])
    new_data = np.empty(new_ptr[-1], dtype=data.dtype)
    new_idx = np.empty(new_ptr[-1], dtype=indices.dtype)
    slot_rows = np.repeat(np.arange(len(counts)), new_counts)
    is_nan_slot = rows_mask[slot_rows]
    new_data[is_nan_slot], new_idx[is_nan_slot] = np.nan, 0
    new_data[~is_nan_slot], new_idx[~is_nan_slot] = data[keep], indices[keep]
    return new_data, new_idx, new_ptr


def nan_rows(x) -> np.ndarray:
    """Rows of a normalised block (sparse or dense) whose row of S is NaN.

    >>> import scipy.sparse
    >>> nan_rows(scipy.sparse.csr_matrix(np.array([[np.nan, 0.0], [1.0, 0.0]])))
    array([ True, False])
    """
    if is_sparse(x):
        out = np.zeros(x.shape[0], dtype=bool)
        out[_row_ids(x)[np.isnan(x.data)]] = True
        return out
    return np.isnan(x).any(axis=-1)


def transposed(b):
    """``b.T`` ready for :func:`strip_product`: CSR ``(D, m)`` for sparse ``b``, a view otherwise."""
    if is_sparse(b):
        return b.T.tocsr()
    return b.T


def strip_product(a_rows, bt, out: np.ndarray) -> np.ndarray:
    """Raw ``a_rows @ bt`` (``bt`` from :func:`transposed`) written into the dense ``out``.

    Either operand may be sparse (CSR) or dense; the result is never clipped here.
    """
    if is_sparse(a_rows) and is_sparse(bt):
        kernel = _to_dense_kernel(a_rows, bt, out)
        if kernel is not None:
            kernel(a_rows, bt, out=out)
            return out
        prod = a_rows @ bt
        if prod.dtype == out.dtype and out.flags.c_contiguous:
            prod.toarray(out=out)  # zeros out, then writes the stored entries
        else:
            out[...] = prod.toarray()
    elif is_sparse(a_rows):
        out[...] = a_rows @ bt
    else:  # dense rows, sparse columns (scipy computes it as (bt.T @ a.T).T, bt.T a CSC view)
        out[...] = np.asarray(a_rows @ bt)
    return out


def _add_sparse_product(a_rows, bt, out: np.ndarray) -> None:
    """``out += a_rows @ bt`` for CSR ``a_rows`` and ``bt`` (a product has no duplicate entries)."""
    kernel = _to_dense_kernel(a_rows, bt, out)
    if kernel is not None:
        out += kernel(a_rows, bt)
        return
    prod = (a_rows @ bt).tocoo()
    out[prod.row, prod.col] += prod.data


#: Threads running tasks in one process from which sparse x sparse products go through
#: SciPy, which releases the GIL, instead of scikit-learn's kernel, which holds it: alone,
#: scikit-learn's is about 2.3x faster per call; with threads it runs one call at a time.
#: Both sum each pair over its non-zeros in index order: the same bits either way.
GIL_FREE_THREADS = 3


def _to_dense_kernel(a_rows, bt, out):
    """scikit-learn's CSR x CSR product written straight into a dense array (Gustavson's
    row-by-row algorithm, no sparse intermediate: several times faster than scipy's
    product followed by ``toarray`` when the product is dense), if installed, the dtypes
    suit it and fewer than :data:`GIL_FREE_THREADS` tasks share this process; else ``None``.

    Upstream: ``sklearn.utils.sparsefuncs.sparse_matmul_to_dense`` (scikit-learn >= 1.8,
    the routine behind ``safe_sparse_dot(..., dense_output=True)``).
    """
    from ._backend import threads_sharing_this_process

    if threads_sharing_this_process() >= GIL_FREE_THREADS:
        return None
    try:
        from sklearn.utils.sparsefuncs import sparse_matmul_to_dense
    except ImportError:
        return None
    if not (a_rows.dtype == bt.dtype == out.dtype and out.dtype in (np.float32, np.float64)):
        return None
    if not out.flags.c_contiguous:
        return None
    return sparse_matmul_to_dense


#: A column (term) shared by the fractions ``fa`` and ``fb`` of two sparse blocks' rows
#: costs ``fa * fb * n * m`` scattered multiply-adds in a sparse product, and ``n * m``
#: multiply-adds in a dense matrix product, which runs far faster per operation. Columns
#: with ``fa * fb`` at or above this share are gathered into dense panels and multiplied
#: by BLAS; the rest stay sparse.
DENSE_COLUMN_SHARE = 1 / 64
#: Most bytes of a dense panel of shared columns (of ``b``'s block, or of ``a``'s).
DENSE_PANEL_BYTES = 64 * 2**20


class SparseProduct:
    """Raw products ``an[r0:r1] @ bn.T`` of two normalised blocks, at least one sparse, into
    dense strips: ``product(r0, r1, out)``.

    For two CSR blocks, the columns most rows of both share (frequent terms of a TF-IDF
    matrix: a few dozen columns carry most of a sparse product's work) are gathered into
    dense panels whose product is one BLAS call, and only the other columns go through
    the sparse product (:data:`DENSE_COLUMN_SHARE`). Each panel (``b``'s, and ``a``'s for
    any strip of its rows) holds at most :data:`DENSE_PANEL_BYTES`; the input stays sparse.
    ``panels=False`` keeps every column sparse: each pair is then summed over its non-zeros
    in index order, whatever the block or the BLAS (the reductions' scores, README: Scores
    and ties); a panel's GEMM rounds by position and BLAS kernel.

    Examples
    --------
    >>> import scipy.sparse
    >>> x = normalize_sparse_rows(scipy.sparse.csr_matrix(np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])))
    >>> out = np.empty((2, 2))
    >>> SparseProduct(x, x)(0, 2, out).round(4)
    array([[1.    , 0.6325],
           [0.6325, 1.    ]])
    """

    def __init__(self, an, bn, *, panels: bool = True):
        self.an = an
        self.bt = transposed(bn)
        self.columns = None  # position of each shared column in the dense panels (-1: sparse)
        if panels and is_sparse(an) and is_sparse(bn) and an.shape[0] and bn.shape[0]:
            self._split_shared_columns(an, bn)

    def _split_shared_columns(self, an, bn) -> None:
        n, m, dim = an.shape[0], bn.shape[0], an.shape[1]
        work = np.bincount(an.indices, minlength=dim) * np.bincount(bn.indices, minlength=dim).astype(float)
        shared = np.flatnonzero(work >= DENSE_COLUMN_SHARE * n * m)
        if not shared.size:
            return
        dtype = np.result_type(an.dtype, bn.dtype)
        most = max(1, DENSE_PANEL_BYTES // (max(n, m) * dtype.itemsize))  # either panel
        if shared.size > most:  # the columns that save the most first
            shared = shared[np.argsort(work[shared])[::-1][:most]]
        columns = np.full(dim, -1, dtype=np.int64)
        columns[shared] = np.arange(shared.size)
        self.columns, self.dtype = columns, dtype
        panel, rest = self._split(bn)
        self.b_panel_t = np.ascontiguousarray(panel.T)
        self.bt = transposed(rest)

    def _split(self, x):
        """``(dense panel of the shared columns, CSR of the other columns)`` of CSR ``x``."""
        import scipy.sparse

        pos = self.columns[x.indices]
        in_panel = pos >= 0
        rows = _row_ids(x)
        panel = np.zeros((x.shape[0], int(self.columns.max()) + 1), dtype=self.dtype)
        panel[rows[in_panel], pos[in_panel]] = x.data[in_panel]
        keep = ~in_panel
        indptr = np.zeros(x.shape[0] + 1, dtype=x.indptr.dtype)
        np.cumsum(np.bincount(rows[keep], minlength=x.shape[0]), out=indptr[1:])
        rest = scipy.sparse.csr_matrix((x.data[keep], x.indices[keep], indptr), shape=x.shape)
        rest.has_sorted_indices = True
        return panel, rest

    def __call__(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Write the raw product of rows ``r0:r1`` of ``an`` with every row of ``bn`` into ``out``."""
        rows = self.an[r0:r1]
        if self.columns is None:
            return strip_product(rows, self.bt, out)
        panel, rest = self._split(rows)
        if out.dtype == self.dtype and out.flags.c_contiguous:
            np.matmul(panel, self.b_panel_t, out=out)
        else:
            out[...] = panel @ self.b_panel_t
        if rest.nnz and self.bt.nnz:
            _add_sparse_product(rest, self.bt, out)
        return out


def sparse_product(an, bn, dtype, *, panels: bool = True) -> np.ndarray:
    """Dense raw product ``an @ bn.T`` of two normalised blocks (either may be sparse);
    ``panels`` as for :class:`SparseProduct`."""
    out = np.empty((an.shape[0], bn.shape[0]), dtype=dtype)
    if out.size:
        SparseProduct(an, bn, panels=panels)(0, an.shape[0], out)
    return out


def sparse_similarity_block(
    an, bn, *, out_dtype: str | None = None, out: np.ndarray | None = None, panels: bool = True, **_
):
    """One dense output block of S from normalised blocks, at least one of them sparse.

    The product is clipped to [-1, 1]; rows (columns) that :func:`nan_rows` flags are
    NaN. Other keyword arguments of :func:`~dask_cosim._kernels.similarity_block`
    (device, BLAS threads, precision) do not apply and are ignored.

    Examples
    --------
    >>> import scipy.sparse
    >>> an = normalize_sparse_rows(scipy.sparse.csr_matrix(np.array([[1.0, 1.0], [0.0, 2.0]])))
    >>> sparse_similarity_block(an, an).round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    """
    work = np.result_type(an.dtype, bn.dtype)
    s = sparse_product(an, bn, work, panels=panels)
    np.clip(s, -1.0, 1.0, out=s)
    s[nan_rows(an)] = np.nan
    s[:, nan_rows(bn)] = np.nan
    want = np.dtype(out_dtype or work)
    if out is not None:
        if out.shape != s.shape or out.dtype != want:
            raise ValueError(
                f"out: expected an array of shape {s.shape} and dtype {want}, "
                f"received shape {out.shape} and dtype {out.dtype}"
            )
        out[...] = s
        return out
    return s.astype(want, copy=False)


def describe(x: Any) -> str:
    """``"scipy csr_matrix"``-style name of a sparse input, for messages."""
    return f"{sparse_kind(x)} {type(x).__name__}"
