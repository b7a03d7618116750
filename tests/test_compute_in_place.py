"""``S.compute()`` writes each block straight into the result on local schedulers.

The in-place path must give what dask's own ``compute`` gives (bit for bit) and what the
float64 reference gives, over shapes, chunkings, dtypes, broadcasting and self-similarity;
it must be taken only where tasks share this process's memory, and it must hold the
result once, not twice.
"""

from __future__ import annotations

import threading
import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim._kernels import matmul_clip_numpy, similarity_block
from dask_cosim._result import SimilarityArray
from dask_cosim.testing import reference_cosine

from .strategies import problems

pytestmark = pytest.mark.usefixtures("blocked_path")  # the in-place path serves blocked graphs

TOL = {np.dtype("float16"): 2e-3, np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture
def in_place_calls(monkeypatch):
    """How many computes took the in-place path."""
    calls = []
    real = SimilarityArray._written_into

    def spy(self, result):
        calls.append(result.shape)
        return real(self, result)

    monkeypatch.setattr(SimilarityArray, "_written_into", spy)
    return calls


@settings(max_examples=40, deadline=None)
@given(problem=problems(), dtype=st.sampled_from(["float32", "float64"]), self_sim=st.booleans())
def test_in_place_equals_dask_compute_and_reference(problem, dtype, self_sim):
    shape_a, shape_b, chunks = problem
    a = rng(1).standard_normal(shape_a).astype(dtype)
    b = None if self_sim else rng(2).standard_normal(shape_b).astype(dtype)
    if self_sim:  # square blocks over a's rows (the N spec was drawn for them)
        rows = chunks[-2]
        chunks = ("auto", rows, rows) if len(shape_a) == 3 else (rows, rows)
    S = dcs.cosine_similarity(a, b, chunks=chunks)
    assert type(S) is SimilarityArray and isinstance(S, da.Array)
    got = S.compute()
    assert got.shape == S.shape and got.dtype == S.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, da.Array.compute(S))  # dask's own assembly
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=TOL[got.dtype])


@pytest.mark.parametrize(
    "kw",
    [
        {"dtype": "float16"},  # stored dtype narrower than the work dtype: cast per panel
        {"precision": "bfloat16"},
        {"zero_vector": "nan"},
        {"chunks": (1, 5, 3)},
    ],
    ids=["dtype-float16", "bfloat16", "zero-nan", "small-blocks"],
)
def test_in_place_options(kw, in_place_calls):
    a = rng(3).standard_normal((3, 17, 6)).astype("float32")
    b = rng(4).standard_normal((3, 11, 6)).astype("float32")
    a[1, 4] = 0  # a zero vector
    b[2, 3, 2] = np.nan  # a NaN vector
    S = dcs.cosine_similarity(a, b, **kw)
    got = S.compute()
    assert in_place_calls == [S.shape]
    np.testing.assert_array_equal(got, da.Array.compute(S))
    assert np.isnan(got[2, :, 3]).all() and not np.isnan(np.delete(got[2], 3, axis=1)).any()
    ref = reference_cosine(a, b)
    if kw.get("zero_vector") == "nan":
        assert np.isnan(got[1, 4]).all()
        ref[1, 4] = np.nan
    tol = 1e-2 if "precision" in kw else TOL[got.dtype]
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("scheduler", [None, "threads", "sync", "synchronous"])
def test_local_shared_memory_schedulers_write_in_place(scheduler, in_place_calls):
    a, b = rng(5).standard_normal((2, 9, 4)), rng(6).standard_normal((2, 7, 4))
    S = dcs.cosine_similarity(a, b, chunks=(1, 4, 3))
    got = S.compute() if scheduler is None else S.compute(scheduler=scheduler)
    assert in_place_calls == [(2, 9, 7)]
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(S), got, rtol=0, atol=0)  # __array__ computes too
    assert len(in_place_calls) == 2


def test_scheduler_options_pass_through(in_place_calls):
    a = rng(7).standard_normal((3, 10, 4))
    S = dcs.cosine_similarity(a, chunks=(1, 5, 5))
    got = S.compute(scheduler="threads", num_workers=1, optimize_graph=False)
    assert len(in_place_calls) == 1
    np.testing.assert_allclose(got, reference_cosine(a), rtol=0, atol=1e-12)


@pytest.fixture
def compute_keywords(monkeypatch):
    """The keywords of every ``dask.compute`` call."""
    seen = []
    real = dask.compute

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dask, "compute", spy)
    return seen


@pytest.mark.parametrize("source", ["numpy", "zarr", "dask"])
def test_only_a_dask_input_gets_dask_graph_optimisation(source, compute_keywords, tmp_path):
    """A graph of this package's layers only (no input is a dask array) runs without dask's
    graph optimisation, which has nothing to fuse or cull in it; a dask input's layers keep
    it. The caller's ``optimize_graph`` wins either way."""
    import zarr

    a = rng(12).standard_normal((2, 9, 4))
    if source == "zarr":
        x = zarr.create_array(str(tmp_path / "a.zarr"), shape=a.shape, chunks=(1, 5, 4), dtype=a.dtype)
        x[...] = a
    else:
        x = da.from_array(a, chunks=(1, 5, 4)) if source == "dask" else a
    S = dcs.cosine_similarity(x, rng(13).standard_normal((2, 7, 4)), chunks=(1, 4, 3))
    want = reference_cosine(a, rng(13).standard_normal((2, 7, 4)))
    np.testing.assert_allclose(S.compute(), want, rtol=0, atol=1e-12)
    assert compute_keywords[-1].get("optimize_graph", True) is (source == "dask")
    np.testing.assert_allclose(S.compute(optimize_graph=True), want, rtol=0, atol=1e-12)
    assert compute_keywords[-1]["optimize_graph"] is True


def test_processes_scheduler_uses_dask_compute(in_place_calls):
    a, b = rng(8).standard_normal((2, 9, 4)), rng(9).standard_normal((2, 7, 4))
    got = dcs.cosine_similarity(a, b, chunks=(1, 4, 3)).compute(scheduler="processes")
    assert in_place_calls == []  # tasks in other processes cannot write into our buffer
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=1e-12)


def test_distributed_client_uses_dask_compute(in_place_calls):
    from distributed import Client, LocalCluster

    a, b = rng(10).standard_normal((2, 9, 4)), rng(11).standard_normal((2, 7, 4))
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster),
    ):
        got = dcs.cosine_similarity(a, b, chunks=(1, 4, 3)).compute()
    assert in_place_calls == []
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=1e-12)


def test_derived_arrays_are_plain_dask_arrays():
    a, b = rng(12).standard_normal((3, 8, 4)), rng(13).standard_normal((3, 6, 4))
    S = dcs.cosine_similarity(a, b, chunks=(1, 3, 4))
    ref = reference_cosine(a, b)
    for derived, expected in [
        (S[1:, 2:], ref[1:, 2:]),
        (S.transpose((0, 2, 1)), ref.transpose(0, 2, 1)),
        (S + 1, ref + 1),
    ]:
        assert type(derived) is da.Array
        np.testing.assert_allclose(derived.compute(), expected, rtol=0, atol=1e-12)
    (persisted,) = dask.persist(S)
    np.testing.assert_allclose(persisted.compute(), ref, rtol=0, atol=1e-12)


def test_empty_output():
    S = dcs.cosine_similarity(np.ones((2, 0, 3)), np.ones((2, 4, 3)))
    got = S.compute()
    assert got.shape == (2, 0, 4) and got.dtype == np.float64


def test_zero_vector_error_is_raised_in_place():
    a = rng(14).standard_normal((2, 6, 3))
    a[1, 4] = 0
    S = dcs.cosine_similarity(a, rng(15).standard_normal((2, 5, 3)), zero_vector="error", chunks=(1, 3, 5))
    with pytest.raises(dcs.ZeroVectorError, match=r"a: zero vector at batch 1, row 4"):
        S.compute()


def test_concurrent_computes_get_separate_results():
    a = rng(16).standard_normal((4, 40, 8))
    S = dcs.cosine_similarity(a, chunks=(1, 20, 20))
    results = [None, None]

    def run(i):
        results[i] = S.compute()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] is not results[1] and not np.shares_memory(results[0], results[1])
    for r in results:
        np.testing.assert_allclose(r, reference_cosine(a), rtol=0, atol=1e-12)


def test_result_is_held_once_not_twice():
    """dask's compute holds every block and the assembled copy (2x the result); in place, ~1x."""
    a, b = rng(17).standard_normal((8, 512, 4)), rng(18).standard_normal((8, 512, 4))
    S = dcs.cosine_similarity(a, b, chunks=(1, 512, 512))  # 8 blocks of 2 MiB, result 16 MiB
    S.compute()  # warm-up (imports, thread pool)
    peaks = {}
    for name, compute in [("in place", S.compute), ("dask", lambda: da.Array.compute(S))]:
        tracemalloc.start()
        try:
            result = compute()
            peaks[name] = tracemalloc.get_traced_memory()[1] / result.nbytes
        finally:
            tracemalloc.stop()
        del result
    assert peaks["in place"] < 1.4, peaks
    assert peaks["dask"] > 1.9, peaks  # the measurement sees the difference


def test_self_similarity_writes_products_and_mirrors_in_place(monkeypatch):
    """Upper blocks are written by their products, lower ones transposed region to region:
    the result is held once, exactly symmetric, and no block is transposed into a copy."""
    from dask_cosim import _triangle

    def no_copy(x):
        raise AssertionError("a block was transposed into a copy")

    monkeypatch.setattr(_triangle, "transpose_block", no_copy)
    a = rng(19).standard_normal((4, 768, 5))
    S = dcs.cosine_similarity(a, chunks=(2, 256, 256))  # 2 x 3 x 3 blocks, 3 mirrored per batch block
    assert _triangle.use_triangle(S._prepared)
    S.compute()  # warm-up
    tracemalloc.start()
    try:
        got = S.compute()
        peak = tracemalloc.get_traced_memory()[1] / got.nbytes
    finally:
        tracemalloc.stop()
    assert peak < 1.4, peak
    np.testing.assert_array_equal(got, np.swapaxes(got, -1, -2))
    np.testing.assert_allclose(got, reference_cosine(a), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the kernel's out=


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_kernel_writes_into_a_strided_region(out_dtype):
    an = rng(19).standard_normal((2, 5, 3))
    bn = rng(20).standard_normal((2, 4, 3))
    an /= np.linalg.norm(an, axis=-1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=-1, keepdims=True)
    dtype = np.dtype(out_dtype or "float64")
    whole = np.full((3, 9, 10), -7.0, dtype=dtype)
    region = whole[1:3, 2:7, 5:9]  # a non-contiguous view
    returned = similarity_block(an, bn, out=region, out_dtype=out_dtype)
    assert returned is region
    np.testing.assert_array_equal(region, similarity_block(an, bn, out_dtype=out_dtype))
    untouched = np.ones(whole.shape, bool)
    untouched[1:3, 2:7, 5:9] = False
    assert (whole[untouched] == -7.0).all()


def test_kernel_out_of_the_wrong_shape_or_dtype_is_refused():
    an, bn = np.eye(3)[:2], np.eye(3)
    with pytest.raises(ValueError, match=r"out: expected an array of shape \(2, 3\) and dtype float64"):
        matmul_clip_numpy(an, bn, out=np.empty((3, 2)))
    with pytest.raises(ValueError, match=r"received shape \(2, 3\) and dtype float32"):
        similarity_block(an, bn, out=np.empty((2, 3), np.float32))
