"""Scaled blocks: dense products of raw blocks and their rows' inverse norms.

Where no vector needs the careful normalisation, a dense product's normalise tasks return
the block itself with its rows' inverse norms (:mod:`dask_cosim._scaled`) and each product
writes the unit rows into scratch right before its GEMM; these tests hold that path to the
normalisation's bits, to the float64 reference, and to the normalised path wherever
scaling does not apply.
"""

from __future__ import annotations

import pickle

import dask
import numpy as np
import pytest
from dask.sizeof import sizeof
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim import _kernels
from dask_cosim._kernels import matmul_clip_numpy, normalize_rows, similarity_block
from dask_cosim._scaled import ScaledBlock, as_unit
from dask_cosim.core import prepare


def reference(a, b):
    """float64 cosine similarity, batch by batch (the seed's check, without scikit-learn's rounding)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a zero vector: NaN here, 0 where the caller says so
        return np.matmul(a / na, np.swapaxes(b / nb, -1, -2))


TOL = {"float32": 2e-6, "float64": 1e-14}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_scaled_block_unit_rows_are_the_normalised_bits(dtype, contiguous):
    """A scaled block's rows times their inverse norms are bit for bit the normalise
    task's rows (contiguous blocks and strided views of a larger array)."""
    x = np.random.default_rng(0).standard_normal((3, 70, 9)).astype(dtype) * 7
    block = x if contiguous else x[:, 10:50]
    scaled = normalize_rows(block, compute_dtype=dtype, scaled=True)
    assert isinstance(scaled, ScaledBlock) and scaled.raw is block  # nothing copied
    assert scaled.inv.shape == block.shape[:-1]
    assert scaled.shape == block.shape and scaled.dtype == block.dtype  # it stands for the block
    np.testing.assert_array_equal(as_unit(scaled), normalize_rows(block, compute_dtype=dtype))


@pytest.mark.parametrize(
    "value", [0.0, np.nan, np.inf, 1e200, 1e-200], ids=["zero", "nan", "inf", "huge", "tiny"]
)
def test_blocks_needing_the_careful_path_are_normalised(value):
    """A block with a zero, NaN or inf vector, or one whose squared norm overflows or
    underflows, is normalised (the careful path for that vector), never scaled."""
    x = np.random.default_rng(1).standard_normal((20, 6))
    x[4] = value if value in (0.0, np.nan, np.inf) else x[4] * value
    got = normalize_rows(x, scaled=True)
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, normalize_rows(x))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("out", [None, "float16"])
@pytest.mark.parametrize("sides", ["both", "a", "b"])
def test_scaled_product_matches_the_reference(dtype, out, sides):
    """Raw blocks scaled in the product (one or both sides), rows of very different norms,
    batched and broadcast: within the dtype's tolerance of float64, never above 1."""
    gen = np.random.default_rng(2)
    a = gen.standard_normal((4, 33, 17)) * gen.uniform(1e-4, 1e4, (4, 33, 1))
    b = gen.standard_normal((1, 41, 17)) * gen.uniform(1e-4, 1e4, (1, 41, 1))
    b[0, 5] = a[2, 7] * 3  # parallel vectors: similarity 1 up to rounding
    a, b = a.astype(dtype), b.astype(dtype)
    an = normalize_rows(a, compute_dtype=dtype, scaled=sides in ("both", "a"))
    bn = normalize_rows(b, compute_dtype=dtype, scaled=sides in ("both", "b"))
    assert isinstance(an, ScaledBlock) == (sides in ("both", "a"))
    got = similarity_block(an, bn, out_dtype=out)
    assert got.dtype == np.dtype(out or dtype) and got.shape == (4, 33, 41)
    tol = 1e-3 if out == "float16" else TOL[dtype]
    np.testing.assert_allclose(got, reference(a, b), rtol=0, atol=tol)
    assert not np.any(got > 1)


@pytest.mark.parametrize("panel_bytes", [64, 2**22])
def test_scaled_product_writes_into_out(monkeypatch, panel_bytes):
    """The scaled kernel writes a region of a larger result in panels, as the normalised one."""
    monkeypatch.setattr(_kernels, "PANEL_BYTES", panel_bytes)
    monkeypatch.setattr(_kernels, "MIN_PANEL_ROWS", 1)
    gen = np.random.default_rng(3)
    a, b = gen.standard_normal((3, 25, 8)), gen.standard_normal((3, 30, 8))
    result = np.full((3, 40, 30), 7.0)
    an, bn = normalize_rows(a, scaled=True), normalize_rows(b, scaled=True)
    similarity_block(an, bn, out=result[:, 10:35])
    np.testing.assert_allclose(result[:, 10:35], reference(a, b), rtol=0, atol=1e-14)
    assert (result[:, :10] == 7).all() and (result[:, 35:] == 7).all()


def test_numpy_products_never_normalise_scaled_blocks(monkeypatch):
    """On NumPy in the blocks' own precision the product takes raw blocks as they are: no
    normalised copy is made (the point of scaling)."""
    gen = np.random.default_rng(8)
    sa = normalize_rows(gen.standard_normal((2, 30, 12)), scaled=True)
    sb = normalize_rows(gen.standard_normal((2, 20, 12)), scaled=True)
    want = similarity_block(sa, sb)

    def refuse(x):
        assert not isinstance(x, ScaledBlock), "a scaled block was normalised"
        return x

    monkeypatch.setattr(_kernels, "as_unit", refuse)
    np.testing.assert_array_equal(similarity_block(sa, sb, device="cpu"), want)
    np.testing.assert_array_equal(similarity_block(sa, sb, device="auto"), want)


def test_scaled_blocks_in_other_precisions_are_normalised_first():
    """Reduced precisions round the normalised operands: a scaled block gives the same
    bits there as the normalised one."""
    gen = np.random.default_rng(4)
    a, b = gen.standard_normal((30, 12)).astype("float32"), gen.standard_normal((20, 12)).astype("float32")
    an, bn = normalize_rows(a, compute_dtype="float32"), normalize_rows(b, compute_dtype="float32")
    sa, sb = (normalize_rows(x, compute_dtype="float32", scaled=True) for x in (a, b))
    for precision in ("tf32", "bfloat16", "float16"):
        np.testing.assert_array_equal(
            similarity_block(sa, sb, precision=precision), similarity_block(an, bn, precision=precision)
        )


def test_scaled_block_pickles_and_reports_its_size():
    """Distributed workers send scaled blocks to each other: they pickle, and dask (the
    scheduler's memory accounting, the dashboard) sees their size."""
    block = normalize_rows(np.random.default_rng(5).standard_normal((50, 8)), scaled=True)
    back = pickle.loads(pickle.dumps(block))
    np.testing.assert_array_equal(back.raw, block.raw)
    np.testing.assert_array_equal(back.inv, block.inv)
    assert sizeof(block) >= block.raw.nbytes + block.inv.nbytes


def _normalised_blocks(x: dask.array.Array) -> list:
    """What each normalise task of ``x`` returns (its graph run by the synchronous scheduler)."""

    def flat(keys):
        return [k for sub in keys for k in flat(sub)] if isinstance(keys, list) else [keys]

    return list(dask.get(dict(x.__dask_graph__()), flat(x.__dask_keys__())))


def test_dense_graph_scales_regular_blocks_and_normalises_the_others():
    """``cosine_similarity``'s normalise tasks return scaled blocks where that is exact
    (here: every block of ``b``, the blocks of ``a`` without its zero vector), normalised
    copies elsewhere; the result is the reference either way."""
    gen = np.random.default_rng(6)
    a, b = gen.standard_normal((60, 10)), gen.standard_normal((45, 10))
    a[37] = 0
    prep = prepare(a, b, chunks=(20, 15), scaled=True)
    kinds_a = [type(x).__name__ for x in _normalised_blocks(prep.an)]
    kinds_b = [type(x).__name__ for x in _normalised_blocks(prep.bn)]
    assert kinds_a == ["ScaledBlock", "ndarray", "ScaledBlock"]
    assert kinds_b == ["ScaledBlock"] * 3
    want = np.nan_to_num(reference(a, b))  # the zero vector: similarity 0
    got = dcs.cosine_similarity(a, b, chunks=(20, 15)).compute()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert (got[37] == 0).all()


def test_reductions_keep_normalised_blocks():
    """Top-k and pairs score candidates from normalised vectors: their graphs never scale."""
    a = np.random.default_rng(7).standard_normal((40, 6))
    for op in ("topk", "pairs"):
        prep = prepare(a, chunks=(20, 20), op=op, k=3)
        assert all(type(x) is np.ndarray for x in _normalised_blocks(prep.an))


@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 12),
    chunk_n=st.integers(1, 40),
    chunk_m=st.integers(1, 40),
    dtype=st.sampled_from(["float32", "float64"]),
    log_scale=st.floats(-70, 70),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_scaled_dense_results_over_chunkings_and_magnitudes(
    n, m, d, chunk_n, chunk_m, dtype, log_scale, seed
):
    """Any shape, chunking and common magnitude of the vectors (2^-70 to 2^70; float32
    blocks beyond about 2^±63 take the careful path): the dense result is within the
    dtype's tolerance of float64 and never above 1."""
    gen = np.random.default_rng(seed)
    a = (gen.standard_normal((n, d)) * 2.0**log_scale).astype(dtype)
    b = (gen.standard_normal((m, d)) * 2.0**log_scale).astype(dtype)
    got = dcs.cosine_similarity(a, b, chunks=(chunk_n, chunk_m)).compute()
    want = np.nan_to_num(reference(a, b))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * 2)
    assert not np.any(got > 1)


def test_matmul_clip_scales_rows_and_columns():
    """The kernel's scales multiply rows and columns of the raw product before the clip."""
    a = np.array([[2.0, 0.0], [0.0, 4.0]])
    b = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    got = matmul_clip_numpy(a, b, a_scale=np.array([0.5, 0.25]), b_scale=np.array([1.0, 1 / 3, 1.0]))
    np.testing.assert_array_equal(got, [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
