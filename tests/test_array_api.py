"""Every per-block kernel runs on ``array_api_strict`` arrays and gives NumPy's results.

``array_api_strict`` implements the standard and nothing else, so a kernel that works
here uses no NumPy-only behaviour and will run on CuPy (or any other namespace) too.
The kernels run with ``device="auto"``, which keeps non-NumPy blocks in their own
namespace; every result is checked to still be a strict array.
"""

from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest

from dask_cosim import _select as select
from dask_cosim._kernels import cosine_block, normalize_rows, reduce_precision, similarity_block

PRECISIONS = ["float32", "tf32", "bfloat16", "float16"]


def strict(x):
    return xps.asarray(np.asarray(x))


def host(x):
    assert type(x).__module__.startswith("array_api_strict"), type(x)  # stayed in the strict namespace
    return np.asarray(x)


def data(shape, seed=0, dtype=np.float64):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return x


def edge_rows(dtype=np.float64):
    """Zero, NaN, huge, tiny and ordinary vectors (exercises the careful normalisation path)."""
    x = data((7, 5), 1, dtype)
    x[1] = 0
    x[2, 3] = np.nan
    x[3] *= np.finfo(dtype).max / 8
    x[4] *= np.finfo(dtype).smallest_normal * 4
    x[5] = [3, 4, 0, 0, 0]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("zero_vector", ["zero", "nan"])
@pytest.mark.parametrize("make", [lambda d: data((2, 6, 5), 2, d), edge_rows], ids=["regular", "edge"])
def test_normalize_rows(make, dtype, zero_vector):
    x = make(dtype)
    kw = {"compute_dtype": np.dtype(dtype).name, "zero_vector": zero_vector}
    got = host(normalize_rows(strict(x), device="auto", **kw))
    want = normalize_rows(x, device="cpu", **kw)
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=0, equal_nan=True)


def test_normalize_zero_vector_error_names_the_row():
    from dask_cosim import ZeroVectorError

    x = edge_rows()
    with pytest.raises(ZeroVectorError, match="row 1"):
        normalize_rows(strict(x), device="auto", zero_vector="error")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    "shape_a, shape_b", [((6, 5), (4, 5)), ((3, 6, 5), (3, 4, 5)), ((3, 6, 5), (4, 5)), ((6, 5), (2, 4, 5))]
)
def test_similarity_block(shape_a, shape_b, precision):
    an = normalize_rows(data(shape_a, 3))
    bn = normalize_rows(data(shape_b, 4))
    got = host(similarity_block(strict(an), strict(bn), device="auto", like="input", precision=precision))
    want = similarity_block(an, bn, device="cpu", precision=precision)
    tol = 1e-15 if precision == "float32" else 1e-6  # the reduced modes end in float32 products
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert np.abs(got).max() <= 1


def test_similarity_block_out_dtype_and_nan():
    an = normalize_rows(edge_rows())
    got = host(similarity_block(strict(an), strict(an), device="auto", like="input", out_dtype="float32"))
    want = similarity_block(an, an, device="cpu", out_dtype="float32")
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, equal_nan=True)


def test_cosine_block():
    a, b = edge_rows(), data((4, 5), 5)
    got = host(cosine_block(strict(a), strict(b), device="auto"))
    np.testing.assert_allclose(got, cosine_block(a, b, device="cpu"), rtol=0, atol=1e-15, equal_nan=True)


@pytest.mark.parametrize("precision", PRECISIONS[1:])
def test_reduce_precision(precision):
    x = data(2000, 6) * np.exp2(np.random.default_rng(7).uniform(-40, 10, 2000))
    x[:3] = [0.0, np.nan, np.inf]
    got = host(reduce_precision(strict(x), precision))
    np.testing.assert_array_equal(got, reduce_precision(x, precision))


# ------------------------------------------------------------------ selection kernels


def similarities(shape, seed=8):
    s = np.clip(data(shape, seed) / 2, -1.2, 1.2)
    s[..., 0, 1] = np.nan
    s[..., 1, :3] = 0.25  # ties
    return s


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("shape", [(9, 7), (2, 9, 7)])
def test_select_topk(shape, axis, exclude_self):
    s = similarities(shape)
    kw = {"axis": axis, "row_offset": 3, "col_offset": 2, "exclude_self": exclude_self}
    keys, idx = select.select_topk(strict(s), 4, **kw)
    want_keys, want_idx = select.select_topk(s, 4, **kw)
    np.testing.assert_array_equal(host(keys), want_keys)
    np.testing.assert_array_equal(host(idx), want_idx)


def test_merge_and_finish_topk():
    s = similarities((6, 10))
    parts = [select.select_topk(s[:, c : c + 5], 3, col_offset=c) for c in (0, 5)]
    want = select.finish_topk(select.merge_topk(parts, 3))
    got = select.finish_topk(select.merge_topk([(strict(k), strict(i)) for k, i in parts], 3))
    np.testing.assert_array_equal(host(got[0]), want[0])
    np.testing.assert_array_equal(host(got[1]), want[1])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("both", [False, True])
def test_topk_block(both, precision):
    an, bn = normalize_rows(data((8, 5), 9)), normalize_rows(data((8, 5), 10))
    kw = {
        "k": 3,
        "row_offset": 8,
        "col_offset": 8,
        "exclude_self": True,
        "both": both,
        "precision": precision,
    }
    got = select.topk_block(strict(an), strict(bn), device="auto", like="input", **kw)
    want = select.topk_block(an, bn, device="cpu", fast=False, **kw)
    for g, w in zip(got if both else (got,), want if both else (want,), strict=True):
        np.testing.assert_allclose(host(g[0]), w[0], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(host(g[1]), w[1])


@pytest.mark.parametrize("upper, exclude_self", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(9, 7), (2, 9, 7)])
def test_select_above(shape, upper, exclude_self):
    s = similarities(shape)
    kw = {"row_offset": 1, "col_offset": 2, "batch_offset": 5, "upper": upper, "exclude_self": exclude_self}
    got = select.select_above(strict(s), 0.2, **kw)
    want = select.select_above(s, 0.2, **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(host(g), w)
    assert len(want[0]) > 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pairs_block(precision):
    an, bn = normalize_rows(data((2, 8, 5), 11)), normalize_rows(data((2, 6, 5), 12))
    kw = {"threshold": 0.1, "row_offset": 4, "col_offset": 0, "precision": precision}
    got = select.pairs_block(strict(an), strict(bn), device="auto", like="input", **kw)
    want = select.pairs_block(an, bn, device="cpu", **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(host(g), w, rtol=0, atol=1e-12)
    assert len(want[0]) > 0
