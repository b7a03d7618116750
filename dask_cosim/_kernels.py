"""Per-block kernels, written once against the array API.

Each function takes plain arrays of one block (NumPy, CuPy or any array-API array),
derives its namespace ``xp`` and knows nothing of dask. The only namespace-specific
code is :func:`_clip_unit`, an in-place fast path for NumPy/CuPy with a generic twin.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

from ._backend import (
    blas_threads_for_task,
    block_namespace,
    choose_backend,
    device_matmul,
    limit_blas,
    to_numpy,
)
from ._finite import raise_nonfinite
from ._options import CHOICES
from ._scaled import ScaledBlock, as_unit
from ._sparse import is_sparse, sparse_similarity_block
from ._zero_vector import ZeroVectorError, raise_zero_vector

__all__ = [
    "ZeroVectorError",
    "PRECISIONS",
    "normalize_rows",
    "reduce_precision",
    "similarity_block",
    "cosine_block",
]


def _dtype(xp, name: str):
    return getattr(xp, name)


def normalize_rows(
    x,
    *,
    compute_dtype: str = "float64",
    zero_vector: str = "zero",
    device: str = "cpu",
    input_name: str = "a",
    offset: tuple[int, int] | None = None,
    batched: bool = False,
    check_finite: bool = False,
    scaled: bool = False,
):
    """Scale every vector (last axis) of a block to unit L2 length.

    Each vector is normalised on its own: its result depends only on its own values,
    never on the other vectors of the block (so equal vectors give equal bits in any
    chunking), nor on the BLAS library (no BLAS call is involved). The fast path
    multiplies by ``1 / sqrt(x . x)``, the squared norm summed in ``compute_dtype`` by
    NumPy's pairwise sum along the vector axis; a vector whose squared norm is zero,
    subnormal or not finite takes a careful path instead, ``max|x| * ||x / max|x|||``
    in float64, so no finite input overflows or underflows. A vector holding NaN or inf
    becomes all NaN. A zero vector becomes all zeros (``zero_vector="zero"``,
    similarity 0 with everything, as scikit-learn), all NaN (``"nan"``), or raises
    :class:`ZeroVectorError` naming the input, batch and row (``"error"``).

    Parameters
    ----------
    x
        Block of shape ``(..., rows, D)``.
    compute_dtype
        ``"float32"`` or ``"float64"``: dtype of the normalised block.
    offset
        Global ``(batch, row)`` index of the block's first vector, for error messages.
    batched
        Whether the first axis is a batch axis (for error messages).
    check_finite
        Raise :class:`~dask_cosim.NonFiniteError` if the block holds NaN or inf (checked
        only on the careful path: the fast path is taken only when every value is finite).
    scaled
        On NumPy, when no vector needs the careful path, return a
        :class:`~dask_cosim._scaled.ScaledBlock` instead: the block itself and its rows'
        inverse norms, nothing written the size of the block (a dense product scales the
        rows in cache, :func:`similarity_block`). Otherwise as without it.

    Examples
    --------
    >>> normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    array([[0.6, 0.8],
           [0. , 0. ]])
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # handled per row below
        return _normalize(
            x, compute_dtype, zero_vector, device, input_name, offset, batched, check_finite, scaled
        )


#: Values of a NumPy block normalised together (rows of it): the scratch arrays stay in cache.
_NORM_CHUNK = 2**16


def _normalize(
    x, compute_dtype, zero_vector, device, input_name, offset, batched, check_finite=False, scaled=False
):
    xp, x = block_namespace(x, device)
    dtype = _dtype(xp, compute_dtype)
    x = xp.astype(x, dtype) if x.dtype != dtype else x
    if isinstance(x, np.ndarray):
        block = _scaled_numpy(x) if scaled else None
        if block is not None:
            return block
        out, bad = _normalize_numpy(x)
        if bad.any():  # only the rows that need it take the careful path
            if check_finite:  # the cast above never narrows (the work dtype is at least the input's)
                raise_nonfinite(x, input_name=input_name, offset=offset, batched=batched)
            where = np.nonzero(bad)
            unit, zero = _normalize_careful(np, x[where], dtype, zero_vector)
            if zero_vector == "error" and zero.any():
                mask = np.zeros(x.shape[:-1] + (1,), dtype=bool)
                mask[where] = zero
                raise_zero_vector(mask, input_name=input_name, offset=offset, batched=batched)
            out[where] = unit
        return out
    sq = xp.sum(x * x, axis=-1, keepdims=True)
    bad = ~_regular(xp, sq)
    out = x * (1 / xp.sqrt(sq))
    if bool(xp.any(bad)):  # rows that need the careful path take it, the others keep theirs
        if check_finite:
            raise_nonfinite(to_numpy(x), input_name=input_name, offset=offset, batched=batched)
        unit, zero = _normalize_careful(xp, x, dtype, zero_vector)
        if zero_vector == "error" and bool(xp.any(zero)):
            raise_zero_vector(zero, input_name=input_name, offset=offset, batched=batched)
        out = xp.where(bad, unit, out)
    return out


def _regular(xp, sq):
    """Rows whose squared norm is a normal, finite, positive number (the fast path is exact)."""
    info = xp.finfo(sq.dtype)
    return (sq >= info.smallest_normal) & (sq <= info.max)


def _normalize_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fast path on NumPy, a chunk of rows at a time: ``(unit rows, bad rows)``.

    ``bad`` (shape ``(..., rows)``) marks the rows whose result is not valid (they need
    the careful path). NumPy's pairwise sum along the contiguous vector axis depends only
    on the row, never on the chunk it is computed in.
    """
    shape = x.shape
    x2 = x.reshape(math.prod(shape[:-1]), shape[-1])
    out = np.empty_like(x2)
    sq, _ = _row_norms(x2, out)
    bad = ~_regular(np, sq)
    return out.reshape(shape), bad.reshape(shape[:-1])


def _scaled_numpy(x: np.ndarray) -> ScaledBlock | None:
    """``x`` with its rows' inverse norms (the fast path's), when the fast path is exact
    for every row (no row needs the careful path); else ``None``. Reads ``x`` only."""
    lead, d = x.shape[:-1], x.shape[-1]
    if not d:
        return None
    sq = np.empty(lead, dtype=x.dtype)
    inv = np.empty(lead, dtype=x.dtype)
    if x.flags.c_contiguous:  # one 2-D view
        _row_norms(x.reshape(-1, d), None, sq.reshape(-1), inv.reshape(-1))
    else:  # 2-D views: reshaping a strided block would copy it
        for k in np.ndindex(lead[:-1]):
            _row_norms(x[k], None, sq[k], inv[k])
    return ScaledBlock(x, inv) if _regular(np, sq).all() else None


def _row_norms(x2: np.ndarray, out: np.ndarray | None, sq=None, inv=None):
    """``(squared norms, inverse norms)`` of the rows of the 2-D ``x2``, a chunk of rows at
    a time (the chunk's squares stay in cache); ``out``: also write the unit rows there."""
    d = max(1, x2.shape[-1])
    rows = max(1, min(len(x2), _NORM_CHUNK // d))
    squares = np.empty((rows, x2.shape[-1]), dtype=x2.dtype)
    sq = np.empty(len(x2), dtype=x2.dtype) if sq is None else sq
    inv = np.empty(len(x2), dtype=x2.dtype) if inv is None else inv
    for r0 in range(0, len(x2), rows):
        chunk, s, t = x2[r0 : r0 + rows], sq[r0 : r0 + rows], inv[r0 : r0 + rows]
        np.add.reduce(np.multiply(chunk, chunk, out=squares[: len(chunk)]), axis=-1, out=s)
        np.divide(1, np.sqrt(s, out=t), out=t)
        if out is not None:
            np.multiply(chunk, t[:, None], out=out[r0 : r0 + rows])
    return sq, inv


def _normalize_careful(xp, x, dtype, zero_vector):
    """Overflow-safe normalisation (``max|x| * ||x / max|x|||`` in float64) of every row:
    ``(unit rows in dtype, zero-row mask of shape (..., 1))``."""
    work = xp.astype(x, xp.float64)
    scale = xp.max(xp.abs(work), axis=-1, keepdims=True)
    zero = scale == 0
    one = xp.ones_like(scale)
    scaled = work / xp.where(zero, one, scale)
    norm = xp.sqrt(xp.sum(scaled * scaled, axis=-1, keepdims=True))
    unit = scaled / xp.where(zero, one, norm)
    if zero_vector == "nan":
        unit = xp.where(zero, xp.full_like(scale, xp.nan), unit)
    return xp.astype(unit, dtype), zero


#: Product precisions: "float32" is the blocks' own dtype; the others round the operands.
PRECISIONS = CHOICES["precision"]
#: explicit mantissa bits and smallest normal exponent of each reduced format
_FORMATS = {"tf32": (10, -126), "bfloat16": (7, -126), "float16": (10, -14)}


def reduce_precision(x, precision: str):
    """Round to the nearest value of a reduced float format (ties to even), returned as float32.

    The array-API emulation of the operand rounding a tensor-core product does:
    ``"tf32"`` and ``"float16"`` keep 10 mantissa bits, ``"bfloat16"`` 7; float16's
    narrow exponent range is honoured down to its subnormals (values below 2**-25 become
    0). Works in float64 with exact power-of-two scaling, so the result is exactly
    representable in the target format and in float32. NaN and inf pass through;
    ``"float32"`` returns ``x`` as float32.

    Examples
    --------
    >>> reduce_precision(np.array([1.0 + 2.0**-9, 1.0 + 3 * 2.0**-9]), "bfloat16")
    array([1.       , 1.0078125], dtype=float32)
    """
    xp = array_api_compat.array_namespace(x)
    if precision == "float32":
        return xp.astype(x, xp.float32)
    bits, emin = _FORMATS[precision]
    w = xp.astype(x, xp.float64)
    mag = xp.abs(w)
    regular = xp.isfinite(w) & (mag > 0)
    mag = xp.where(regular, mag, xp.ones_like(mag))
    two = xp.full_like(mag, 2.0)
    e = xp.floor(xp.log2(mag))
    e = xp.where(xp.pow(two, e) > mag, e - 1, e)  # log2 may round across a power of two
    e = xp.where(xp.pow(two, e + 1) <= mag, e + 1, e)
    step = xp.pow(two, xp.clip(e, float(emin), None) - bits)  # spacing of the target format
    rounded = xp.round(w / step) * step
    return xp.astype(xp.where(regular, rounded, w), xp.float32)


def _clip_unit(xp, s):
    """Clip to [-1, 1] in place where the namespace allows (NumPy, CuPy), NaN kept."""
    if isinstance(s, np.ndarray):
        return np.clip(s, -1.0, 1.0, out=s)
    if array_api_compat.is_cupy_array(s):
        import cupy

        return cupy.clip(s, -1.0, 1.0, out=s)
    return xp.clip(s, -1.0, 1.0)


#: Bytes of each row segment :func:`transposed_numpy` writes at a time: a few cache lines.
_TRANSPOSE_SEGMENT_BYTES = 256


def transposed_numpy(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A C-contiguous copy of ``x`` with its last two axes swapped, a band of rows at a time
    (``out``: write it there instead, for instance into a region of a larger array).

    ``np.ascontiguousarray(x.swapaxes(-1, -2))`` walks the source in the order of the
    result, so each element it reads comes from another row: several times slower once a
    block outgrows the cache. Here each band of rows is read whole and written as short
    row segments of the result (:data:`_TRANSPOSE_SEGMENT_BYTES`), both in cache.

    >>> transposed_numpy(np.arange(6).reshape(2, 3))
    array([[0, 3],
           [1, 4],
           [2, 5]])
    """
    if out is None:
        out = np.empty(x.shape[:-2] + (x.shape[-1], x.shape[-2]), dtype=x.dtype)
    band = max(8, _TRANSPOSE_SEGMENT_BYTES // max(1, x.dtype.itemsize))
    for r0 in range(0, x.shape[-2], band):
        out[..., r0 : r0 + band] = np.swapaxes(x[..., r0 : r0 + band, :], -1, -2)
    return out


#: Output panel size for the NumPy fast path: small enough to stay in cache between the
#: product and the clip/cast that follow it, large enough for efficient GEMMs.
PANEL_BYTES = 4 * 2**20
#: Fewest rows of a panel, whatever its width: each GEMM packs all the columns of ``b``
#: again, so a wide block in thin panels loses more to that than its clip gains in cache.
MIN_PANEL_ROWS = 1024


def panel_rows(m: int, itemsize: int) -> int:
    """Rows of ``a`` per GEMM of :func:`matmul_clip_numpy` for ``m`` columns of ``itemsize``
    bytes: a :data:`PANEL_BYTES` panel, but never fewer than :data:`MIN_PANEL_ROWS` rows.

    >>> panel_rows(256, 4), panel_rows(2048, 4), panel_rows(50_000, 4)
    (4096, 1024, 1024)
    """
    return max(MIN_PANEL_ROWS, PANEL_BYTES // max(1, m * itemsize))


def matmul_clip_numpy(
    an: np.ndarray,
    bn: np.ndarray,
    out_dtype: str | None = None,
    out: np.ndarray | None = None,
    a_scale: np.ndarray | None = None,
    b_scale: np.ndarray | None = None,
) -> np.ndarray:
    """NumPy twin of ``clip(an @ bn.T, -1, 1)`` that clips (and casts) each panel while hot.

    The generic path makes one pass for the product, then a second pass over the whole
    block in memory for the clip (and a third for a cast); here each batch element, or
    each panel of its rows (:func:`panel_rows`), is clipped and cast right after its
    GEMM, while it is still in cache (or, for a wide block, at least while the clip is
    the only pass after the GEMM). Results equal the generic path's up to the
    rounding of a differently-blocked GEMM. ``out``: write into this array (for instance
    a region of a larger result) instead of a new one. ``a_scale`` / ``b_scale``
    (shapes ``(..., n)`` / ``(..., m)``): ``an`` / ``bn`` are raw blocks whose rows are
    multiplied by these (their inverse norms, :mod:`dask_cosim._scaled`) into scratch
    memory, a batch element of ``bn`` and a panel of ``an`` at a time, right before the
    product reads them from cache: the same unit rows, bit for bit, as the normalise task's.
    """
    work = np.result_type(an, bn)
    batch = np.broadcast_shapes(an.shape[:-2], bn.shape[:-2])
    an = np.broadcast_to(an, batch + an.shape[-2:])  # views: no copies
    bn = np.broadcast_to(bn, batch + bn.shape[-2:])
    if a_scale is not None:
        a_scale = np.broadcast_to(a_scale, batch + a_scale.shape[-1:])
    if b_scale is not None:
        b_scale = np.broadcast_to(b_scale, batch + b_scale.shape[-1:])
    shape = batch + (an.shape[-2], bn.shape[-2])
    if out is None:
        out = np.empty(shape, dtype=out_dtype or work)
    elif out.shape != shape or out.dtype != np.dtype(out_dtype or work):
        raise ValueError(
            f"out: expected an array of shape {shape} and dtype {np.dtype(out_dtype or work)}, "
            f"received shape {out.shape} and dtype {out.dtype}"
        )
    m = bn.shape[-2]
    rows = panel_rows(m, work.itemsize)
    scratch = None if out.dtype == work else np.empty((min(rows, an.shape[-2]), m), dtype=work)
    d = an.shape[-1]
    unit_a = None if a_scale is None else np.empty((min(rows, an.shape[-2]), d), dtype=work)
    unit_b = None if b_scale is None else np.empty((m, d), dtype=work)
    b_shared = all(step == 0 for step in bn.strides[:-2])  # one b for every batch element
    for i, k in enumerate(np.ndindex(out.shape[:-2])):
        ak, bk = an[k], (bn[k] if unit_b is None else unit_b)
        if unit_b is not None and (i == 0 or not b_shared):  # unit rows of b, while they are in cache
            np.multiply(bn[k], b_scale[k][:, None], out=unit_b)
        bt = bk.T
        for r0 in range(0, an.shape[-2], rows):
            dest = out[k][r0 : r0 + rows]
            panel = dest if scratch is None else scratch[: dest.shape[0]]
            a_rows = ak[r0 : r0 + rows]
            if a_scale is not None:
                a_rows = np.multiply(a_rows, a_scale[k][r0 : r0 + rows, None], out=unit_a[: len(a_rows)])
            np.matmul(a_rows, bt, out=panel)
            np.clip(panel, -1.0, 1.0, out=panel)
            if scratch is not None:
                dest[...] = panel
    return out


def similarity_block(
    an,
    bn,
    *,
    out_dtype: str | None = None,
    device: str = "cpu",
    blas_threads: int | None = None,
    like: str = "numpy",
    precision: str = "float32",
    out: np.ndarray | None = None,
):
    """One output block: ``an @ bn.T`` of unit vectors, clipped to [-1, 1].

    Parameters
    ----------
    an, bn
        Normalised blocks ``(..., n, D)`` and ``(..., m, D)`` (leading axes broadcast).
    out_dtype
        dtype name of the result; default: the inputs' dtype.
    blas_threads
        BLAS threads for a NumPy product; ``None``: cores // dask threads of this process.
    like
        ``"numpy"`` returns a host array, ``"input"`` leaves the result where it was
        computed (a CuPy block stays on the device).
    precision
        ``"float32"`` (default): products in the blocks' dtype (float32, or float64 for
        float64 work). ``"tf32"``, ``"bfloat16"``, ``"float16"``: operands rounded to that
        format, products accumulated in float32 (on CuPy by cuBLAS on tensor cores; on
        other namespaces emulated exactly by :func:`reduce_precision` then a float32
        product, so results are reproducible on the CPU). See README: GPU workers.
    out
        A NumPy array of the block's shape and output dtype (for instance a region of
        the whole result) to write the block into; it is returned. A NumPy product
        writes straight into it, a device product is copied into it.

    Examples
    --------
    >>> similarity_block(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    array([[1., 0.]])
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, received {precision!r}")
    if is_sparse(an) or is_sparse(bn):  # normalised CSR blocks: a sparse product, a dense block
        return sparse_similarity_block(an, bn, out_dtype=out_dtype, out=out)
    scaled = _scales(an, bn, device, precision)
    if scaled is not None:  # raw NumPy blocks: their unit rows are written in cache, per panel
        (an, a_scale), (bn, b_scale) = scaled
        with limit_blas(blas_threads_for_task(blas_threads)):
            return matmul_clip_numpy(an, bn, out_dtype, out=out, a_scale=a_scale, b_scale=b_scale)
    an, bn = as_unit(an), as_unit(bn)
    xp, an = block_namespace(an, device)
    if array_api_compat.is_cupy_array(an):
        import cupy

        s = device_matmul(an, cupy.asarray(bn), precision)
    else:
        _, bn = block_namespace(bn, device)
        if precision != "float32":
            an, bn = reduce_precision(an, precision), reduce_precision(bn, precision)
        if isinstance(an, np.ndarray) and isinstance(bn, np.ndarray):
            with limit_blas(blas_threads_for_task(blas_threads)):
                return matmul_clip_numpy(an, bn, out_dtype, out=out)
        else:
            s = xp.matmul(an, xp.matrix_transpose(bn))
    s = _clip_unit(xp, s)
    if out_dtype is not None and s.dtype != _dtype(xp, out_dtype):
        s = xp.astype(s, _dtype(xp, out_dtype))
    if out is not None:
        if tuple(out.shape) != tuple(s.shape) or out.dtype != np.dtype(str(s.dtype)):
            raise ValueError(
                f"out: expected an array of shape {tuple(s.shape)} and dtype {s.dtype}, "
                f"received shape {out.shape} and dtype {out.dtype}"
            )
        out[...] = to_numpy(s)
        return out
    return to_numpy(s) if like == "numpy" and array_api_compat.is_cupy_array(s) else s


def _scales(an, bn, device: str, precision: str):
    """``((an, its rows' scales), (bn, its rows' scales))`` when at least one block is a
    :class:`~dask_cosim._scaled.ScaledBlock` and the product runs on NumPy in the blocks'
    own precision (a block already normalised gets ``None``); else ``None``."""
    if not (isinstance(an, ScaledBlock) or isinstance(bn, ScaledBlock)) or precision != "float32":
        return None
    pairs = [(x.raw, x.inv) if isinstance(x, ScaledBlock) else (x, None) for x in (an, bn)]
    if not all(isinstance(x, np.ndarray) and choose_backend(x, device) == "numpy" for x, _ in pairs):
        return None
    return tuple(pairs)


def cosine_block(a, b, *, zero_vector: str = "zero", out_dtype: str | None = None, device: str = "cpu"):
    """Cosine similarity of two raw blocks (normalise both, then one product).

    A convenience for users and tests; the dask graph normalises each input block once
    and calls :func:`similarity_block` per output block instead.

    Examples
    --------
    >>> cosine_block(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0], [0.0, 3.0]]))
    array([[1.        , 0.70710678]])
    """
    ca = "float32" if _narrow(a) and _narrow(b) else "float64"
    an = normalize_rows(a, compute_dtype=ca, zero_vector=zero_vector, device=device)
    bn = normalize_rows(b, compute_dtype=ca, zero_vector=zero_vector, device=device, input_name="b")
    return similarity_block(an, bn, out_dtype=out_dtype, device=device, like="input")


def _narrow(x) -> bool:
    name = str(x.dtype)
    return name in ("float16", "float32", "bfloat16")
