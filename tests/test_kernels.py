"""Per-block kernels: normalisation edge cases and the NumPy product fast path vs its generic twin."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dask_cosim import _kernels
from dask_cosim._kernels import matmul_clip_numpy, normalize_rows


def generic(an, bn, out_dtype=None):
    s = np.clip(np.matmul(an, np.swapaxes(bn, -1, -2)), -1.0, 1.0)
    return s.astype(out_dtype) if out_dtype else s


@pytest.mark.parametrize("panel_bytes, min_rows", [(64, 1), (64, 7), (1000, 1), (2**22, 1)])  # many
# panels (of one row, or of the fewest rows the panels keep), a few, one per batch element
@pytest.mark.parametrize(
    "shape_a, shape_b",
    [((3, 37, 5), (3, 29, 5)), ((37, 5), (3, 29, 5)), ((3, 37, 5), (29, 5)), ((1, 37, 5), (4, 29, 5)),
     ((37, 5), (29, 5)), ((0, 5), (4, 5)), ((2, 3, 5), (2, 0, 5))],
)  # fmt: skip
@pytest.mark.parametrize("dtype, out", [("float64", None), ("float32", None), ("float32", "float16"),
                                        ("float64", "float32")])  # fmt: skip
def test_numpy_fast_path_equals_generic_product(
    monkeypatch, panel_bytes, min_rows, shape_a, shape_b, dtype, out
):
    monkeypatch.setattr(_kernels, "PANEL_BYTES", panel_bytes)
    monkeypatch.setattr(_kernels, "MIN_PANEL_ROWS", min_rows)
    gen = np.random.default_rng(0)
    an = normalize_rows(gen.standard_normal(shape_a), compute_dtype=dtype)
    bn = normalize_rows(gen.standard_normal(shape_b), compute_dtype=dtype)
    got = matmul_clip_numpy(an, bn, out)
    want = generic(an, bn, out)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = {"float16": 1e-3, "float32": 1e-6, "float64": 1e-14}[str(got.dtype)]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert not np.any(got > 1)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("m", [1, 64, 1000, 2048, 12_500, 10**6])
def test_panels_hold_panel_bytes_but_never_fewer_than_the_fewest_rows(m, itemsize):
    rows, fewest, most_bytes = _kernels.panel_rows(m, itemsize), _kernels.MIN_PANEL_ROWS, _kernels.PANEL_BYTES
    if fewest * m * itemsize >= most_bytes:  # wide: thin panels would waste the GEMM's packing
        assert rows == fewest
    else:  # narrow: as many rows as a panel's bytes hold
        assert rows * m * itemsize <= most_bytes < (rows + 1) * m * itemsize


def test_normalize_fast_and_careful_paths_agree():
    gen = np.random.default_rng(1)
    x = gen.standard_normal((50, 7))
    fast = normalize_rows(x)
    careful, zero = _kernels._normalize_careful(np, x, np.float64, "zero")
    assert not zero.any()
    np.testing.assert_allclose(fast, careful, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-15)
    x_with_zero = np.vstack([x, np.zeros((1, 7))])
    np.testing.assert_array_equal(normalize_rows(x_with_zero)[:50], fast)  # a zero row changes no other row


def _rows_with_neighbours(dtype, gen, d=37):
    """Rows of every kind (regular, zero, NaN, inf, huge, tiny) with several exact copies of two vectors."""
    info = np.finfo(dtype)
    x = gen.standard_normal((60, d)).astype(dtype)
    x[7] = 0.0
    x[13, 4] = np.nan
    x[21, 2] = np.inf
    x[29] *= info.max / 16  # squared norm overflows
    x[33] *= info.smallest_normal  # squared norm underflows (float64)
    x[40] *= info.smallest_normal * 2.0**-10  # subnormal components
    for row in (3, 12, 30, 47, 59):
        x[row] = x[50]
    for row in (8, 22, 34):
        x[row] = x[33]  # copies of a row that takes the careful path
    return x


def _random_splits(n, gen, count):
    yield [n]
    yield [1] * n
    for _ in range(count):
        cuts = np.sort(gen.choice(np.arange(1, n), size=gen.integers(1, 8), replace=False))
        yield np.diff(np.concatenate([[0], cuts, [n]])).tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_vector", ["zero", "nan"])
def test_normalize_each_row_independent_of_its_block(dtype, zero_vector):
    """A row's normalised bits depend only on the row: any block it sits in, any neighbours."""
    gen = np.random.default_rng(2)
    x = _rows_with_neighbours(dtype, gen)
    kw = {"compute_dtype": np.dtype(dtype).name, "zero_vector": zero_vector}
    alone = np.concatenate([normalize_rows(x[i : i + 1], **kw) for i in range(len(x))])
    for sizes in _random_splits(len(x), gen, 25):
        starts = np.cumsum([0, *sizes])
        got = np.concatenate([normalize_rows(x[s:e], **kw) for s, e in itertools.pairwise(starts)])
        np.testing.assert_array_equal(got.view(np.uint8), alone.view(np.uint8), err_msg=str(sizes))
    batched = normalize_rows(x.reshape(3, 20, -1), batched=True, **kw).reshape(x.shape)
    np.testing.assert_array_equal(batched.view(np.uint8), alone.view(np.uint8))
    for rows in ([3, 12, 30, 47, 59, 50], [8, 22, 34, 33]):  # exact copies: equal bits
        assert (alone[rows].view(np.uint8) == alone[rows[0]].view(np.uint8)).all()
    finite = np.isfinite(x).all(axis=1) & (np.abs(x).max(axis=1) > 0)
    np.testing.assert_allclose(np.linalg.norm(alone[finite].astype(np.float64), axis=1), 1.0,
                               rtol=0, atol=8 * np.finfo(dtype).eps)  # fmt: skip
    assert np.isnan(alone[[13, 21]]).all()
    assert (alone[7] == 0).all() if zero_vector == "zero" else np.isnan(alone[7]).all()


def test_normalize_rows_do_not_depend_on_the_blas_or_the_block_in_the_graph():
    """Through the graph: copies of a vector in different input blocks, some next to a zero or NaN
    vector, come out bitwise equal whatever the chunking."""
    import dask

    from dask_cosim.core import prepare

    gen = np.random.default_rng(3)
    b = gen.standard_normal((300, 32)).astype(np.float32)
    b[[11, 150, 299]] = b[70]
    b[151] = 0.0
    b[10, 3] = np.nan
    ref = None
    for chunks in [(-1, -1), (50, 7), (50, 150), (50, 151), (50, 100), (50, 1), (50, 13)]:
        prep = prepare(b[:5], b, chunks=chunks)
        (bn,) = dask.compute(prep.bn)
        copies = bn[[11, 70, 150, 299]].view(np.uint32)
        assert (copies == copies[0]).all(), chunks
        ref = bn if ref is None else ref
        np.testing.assert_array_equal(bn.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_normalize_any_finite_magnitude(scale):
    x = np.array([[3.0, 4.0], [-1.0, 0.0]]) * scale
    np.testing.assert_allclose(normalize_rows(x), [[0.6, 0.8], [-1.0, 0.0]], atol=1e-15)


def test_normalize_float32_overflow_and_subnormal():
    x = np.array([[3e30, 4e30], [3e-40, 4e-40]], dtype=np.float32)
    got = normalize_rows(x, compute_dtype="float32")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.6, 0.8]], atol=1e-6)


@pytest.mark.parametrize(
    "shape", [(1, 1), (3, 5), (63, 70), (300, 17), (2, 129, 65), (0, 4), (5, 0)], ids=str
)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64"])
def test_transposed_numpy_equals_swapaxes(shape, dtype):
    x = (np.arange(int(np.prod(shape))) * 7 % 101).astype(dtype).reshape(shape)
    got = _kernels.transposed_numpy(x)
    assert got.flags.c_contiguous and got.dtype == x.dtype
    np.testing.assert_array_equal(got, np.swapaxes(x, -1, -2))
    strided = np.repeat(x, 2, axis=-1)[..., ::2]  # a non-contiguous view of the same values
    np.testing.assert_array_equal(_kernels.transposed_numpy(strided), np.swapaxes(x, -1, -2))


def test_transposed_numpy_writes_into_a_region():
    x = np.random.default_rng(0).standard_normal((130, 70))
    big = np.zeros((200, 300))
    _kernels.transposed_numpy(x, out=big[10:80, 20:150])
    np.testing.assert_array_equal(big[10:80, 20:150], x.T)
    big[10:80, 20:150] = 0
    assert not big.any()  # nothing outside the region was touched
