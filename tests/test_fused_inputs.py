"""Products that normalise their own input blocks (every input block feeds one product).

A batched ``cosine_similarity`` split only along the batch (the seed's shape) has no
normalise tasks: each product task takes its two raw blocks
(:class:`~dask_cosim._scaled.RawBlock`) and computes each batch element's inverse norms
right before scaling its rows. These tests hold that path to the normalise tasks' bits
and errors (a block with a vector that needs the careful path, in any element), to the
float64 reference over dtypes, precisions and ways of computing, and check that graphs
where a block feeds several products keep their normalise tasks.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim import core
from dask_cosim._kernels import normalize_rows, similarity_block
from dask_cosim._scaled import RawBlock
from dask_cosim.core import prepare

BAD = ("zero", "nan", "inf", "huge", "tiny")


def reference(a, b):
    """float64 cosine similarity, batch by batch; a zero vector's similarities are 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        na = a / np.linalg.norm(a, axis=-1, keepdims=True)
        nb = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return np.nan_to_num(np.matmul(na, np.swapaxes(nb, -1, -2)))


def graph_prefixes(x) -> set[str]:
    keys = dict(x.__dask_graph__()).keys()
    return {(k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0] for k in keys}


@pytest.fixture
def unfused(monkeypatch):
    """Build graphs as if every input block fed several products (normalise tasks)."""

    def use(flag: bool):
        monkeypatch.setattr(core, "_each_block_once", lambda *args: False if flag else True)

    return use


def _with_bad_rows(x, rows, kind):
    """``x`` with the vectors at ``rows`` made zero, NaN, inf, or so large (small) that
    their squared norm overflows (is subnormal) in ``x``'s dtype."""
    x, info = x.copy(), np.finfo(x.dtype)
    scale = {"huge": 4 * np.sqrt(info.max), "tiny": np.sqrt(info.smallest_normal) / 4}
    for idx in rows:
        if kind in scale:
            x[idx] = np.sign(x[idx]) * scale[kind] * (1 + np.arange(x.shape[-1]) % 3)
        else:
            x[idx] = {"zero": 0.0, "nan": np.nan, "inf": np.inf}[kind]
    return x


@st.composite
def raw_pairs(draw):
    batched = draw(st.booleans())
    batch = (draw(st.integers(1, 5)),) if batched else ()
    n, m, d = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    gen = np.random.default_rng(draw(st.integers(0, 2**16)))
    a = gen.standard_normal(batch + (n, d)).astype(dtype)
    b = gen.standard_normal(batch + (m, d)).astype(dtype)
    kind = draw(st.sampled_from(BAD))
    rows = st.tuples(*(st.integers(0, s - 1) for s in batch + (n,)))
    bad_a = draw(st.lists(rows, max_size=2))
    bad_b = draw(st.lists(st.tuples(*(st.integers(0, s - 1) for s in batch + (m,))), max_size=2))
    return _with_bad_rows(a, bad_a, kind), _with_bad_rows(b, bad_b, kind), dtype


@settings(max_examples=80, deadline=None)
@given(pair=raw_pairs(), zero_vector=st.sampled_from(["zero", "nan"]), into=st.booleans())
def test_raw_blocks_give_the_normalised_blocks_bits(pair, zero_vector, into):
    """Raw blocks normalised in the product, with zero, NaN, inf, overflowing or
    underflowing vectors in any batch element of either side: bit for bit the product of
    the blocks the normalise tasks return (the elements before a careful one were scaled
    in cache, the rest use the block's careful normalisation)."""
    a, b, dtype = pair
    norm = {"compute_dtype": dtype, "zero_vector": zero_vector, "scaled": True}
    want = similarity_block(normalize_rows(a, **norm), normalize_rows(b, **norm))
    out = np.full(want.shape, 7.0, dtype=want.dtype) if into else None
    got = similarity_block(RawBlock(a, norm), RawBlock(b, norm), out=out)
    assert got is out or out is None
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("option", ["zero_vector", "check_finite"])
def test_errors_name_the_vector_and_block_as_the_normalise_task_does(side, option, unfused):
    """``zero_vector="error"`` and ``check_finite=True`` raise from the product with the
    message the normalise task raises: the input, the block's batch span, the vector."""
    gen = np.random.default_rng(1)
    a, b = gen.standard_normal((12, 6, 5)), gen.standard_normal((12, 7, 5))
    x = a if side == "a" else b
    x[6, 3] = 0.0 if option == "zero_vector" else np.nan
    x[7, 1] = 0.0 if option == "zero_vector" else np.inf
    options = {"zero_vector": "error"} if option == "zero_vector" else {"check_finite": True}
    messages = []
    for flag in (False, True):
        unfused(flag)
        S = dcs.cosine_similarity(a, b, chunks=(4, -1, -1), **options)
        assert ("cosine-normalize" in graph_prefixes(S)) == flag
        with pytest.raises((dcs.ZeroVectorError, dcs.NonFiniteError)) as err:
            S.compute()
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{side}: ")
    assert "batch 6, row 3" in messages[0]
    if option == "check_finite":
        assert "2 vector(s) hold NaN or inf in batch 4:8, rows 0:" in messages[0]


def test_a_batch_split_graph_has_no_normalise_tasks():
    """Split along the batch only, each product reads its two raw blocks: the graph holds
    the input blocks and the products, nothing else."""
    gen = np.random.default_rng(2)
    a, b = gen.standard_normal((8, 30, 6)), gen.standard_normal((8, 20, 6))
    S = dcs.cosine_similarity(a, b, chunks=(2, -1, -1))
    assert "cosine-normalize" not in graph_prefixes(S)
    products = [k for k in dict(S.__dask_graph__()) if isinstance(k, tuple) and k[0] == S.name]
    assert len(products) == 4
    into = S._written_into(np.empty(S.shape))
    assert "cosine-normalize" not in graph_prefixes(into)
    np.testing.assert_allclose(S.compute(), reference(a, b), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "shapes, chunks",
    [
        (((6, 20, 4), (6, 15, 4)), (2, 10, -1)),  # two row blocks: each block of b feeds two products
        (((6, 20, 4), (6, 15, 4)), (2, -1, 5)),  # three column blocks
        (((20, 4), (6, 15, 4)), (2, -1, -1)),  # a 2-D a broadcast to every batch
        (((1, 20, 4), (6, 15, 4)), (3, -1, -1)),  # a batch of one, broadcast
    ],
    ids=["rows-split", "cols-split", "2d-broadcast", "batch-of-one"],
)
def test_blocks_feeding_several_products_keep_their_normalise_tasks(shapes, chunks):
    """A block read by several products is normalised once, by its own task."""
    gen = np.random.default_rng(3)
    a, b = (gen.standard_normal(s) for s in shapes)
    prep = prepare(a, b, chunks=chunks, scaled=True)
    assert prep.raw is None
    S = dcs.cosine_similarity(a, b, chunks=chunks)
    assert "cosine-normalize" in graph_prefixes(S)
    np.testing.assert_allclose(S.compute(), reference(a, b), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "dtypes, precision, tol",
    [
        (("float64", "float64"), "float32", 1e-14),
        (("float32", "float32"), "float32", 2e-6),
        (("float16", "float16"), "float32", 2e-6),  # cast to float32 first: normalised as a whole
        (("float32", "float64"), "float32", 1e-14),  # a cast to float64
        (("float32", "float32"), "bfloat16", 2e-2),  # reduced precision: normalised as a whole
    ],
)
@pytest.mark.parametrize("how", ["compute", "optimized", "dask-compute", "slice", "store"])
def test_fused_results_match_the_reference(dtypes, precision, tol, how, tmp_path):
    """Every dtype and precision, every way of computing the array (in place, through
    dask's optimisation and compute, a slice, a zarr store): within tolerance of float64,
    never above 1, zero vectors at 0."""
    gen = np.random.default_rng(4)
    a = gen.standard_normal((9, 17, 8)).astype(dtypes[0])
    b = gen.standard_normal((9, 13, 8)).astype(dtypes[1])
    a[5, 2] = 0
    S = dcs.cosine_similarity(a, b, chunks=(4, -1, -1), precision=precision)
    # reduced precisions round the unit vectors: their products take normalised blocks
    assert ("cosine-normalize" in graph_prefixes(S)) == (precision != "float32")
    want = reference(a, b)
    if how == "compute":
        got = S.compute()
    elif how == "optimized":
        got = S.compute(optimize_graph=True)
    elif how == "dask-compute":
        (got,) = dask.compute(S)
    elif how == "slice":
        got, want = S[3:7, 1:].compute(), want[3:7, 1:]
    else:
        zarr = pytest.importorskip("zarr")
        path = str(tmp_path / "s.zarr")
        dcs.to_zarr(S, path)
        got = zarr.open_group(path, mode="r")["similarity"][...]
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert not np.any(got > 1)


def test_fused_and_normalise_task_graphs_agree_bit_for_bit(unfused):
    """The same job with and without normalise tasks: identical results, so a user's
    chunking never changes the bits through this choice."""
    gen = np.random.default_rng(5)
    a, b = gen.standard_normal((10, 40, 12)), gen.standard_normal((10, 30, 12))
    a[3, 7] = 0
    b[8, 2] = np.inf
    results = []
    for flag in (False, True):
        unfused(flag)
        results.append(dcs.cosine_similarity(a, b, chunks=(3, -1, -1), zero_vector="nan").compute())
    np.testing.assert_array_equal(results[0], results[1])


def test_a_careful_vector_restarts_the_product_at_its_element_only(monkeypatch):
    """A vector that needs the careful path in element 3 of 5: the elements before it are
    not multiplied again (the product goes on from element 3 with the block normalised)."""
    from dask_cosim import _kernels

    calls = []
    real = _kernels.matmul_clip_numpy

    def spy(an, bn, *args, **kwargs):
        calls.append(an.shape[0])
        return real(an, bn, *args, **kwargs)

    monkeypatch.setattr(_kernels, "matmul_clip_numpy", spy)
    gen = np.random.default_rng(6)
    a, b = gen.standard_normal((5, 8, 4)), gen.standard_normal((5, 6, 4))
    a[3, 2] = 0
    norm = {"compute_dtype": "float64", "scaled": True}
    got = similarity_block(RawBlock(a, norm), RawBlock(b, norm))
    assert calls == [5, 2]
    np.testing.assert_allclose(got, reference(a, b), rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", ["one-raw", "broadcast-batch", "cast"])
def test_raw_blocks_the_kernel_cannot_take_element_by_element_are_normalised_first(case):
    """A raw block beside a normalised one, raw blocks of different batch shapes, or one
    not yet in its work dtype: normalised as a whole first, the same bits as the normalise
    tasks' blocks."""
    gen = np.random.default_rng(7)
    a, b = gen.standard_normal((3, 8, 4)), gen.standard_normal((3, 6, 4))
    norm = {"compute_dtype": "float64", "scaled": True}
    if case == "broadcast-batch":
        b = b[:1]
    if case == "cast":
        a = a.astype("float32")
    want = similarity_block(normalize_rows(a, **norm), normalize_rows(b, **norm))
    left = normalize_rows(a, **norm) if case == "one-raw" else RawBlock(a, norm)
    np.testing.assert_array_equal(similarity_block(left, RawBlock(b, norm)), want)
