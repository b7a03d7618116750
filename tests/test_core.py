"""cosine_similarity against float64 references over shapes, dtypes, chunkings and schedulers."""

from __future__ import annotations

import dask
import dask.array as da
import distributed
import ml_dtypes
import numpy as np
import pytest
import zarr
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

import dask_cosim as dcs
from dask_cosim.testing import reference_cosine

from ._graphs import task_prefixes

# float32 products of unit vectors: error ~ sqrt(D) * eps32; float64 ~ 1e-15
TOL = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}


def rng(seed=0):
    return np.random.default_rng(seed)


def check(a, b=None, tol=None, **kw):
    S = dcs.cosine_similarity(a, b, **kw)
    assert isinstance(S, da.Array)
    got = S.compute()
    ref = reference_cosine(a, b)
    assert got.shape == ref.shape == S.shape
    assert got.dtype == S.dtype
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol or TOL[got.dtype])
    return S, got


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [
        ((3, 17, 5), (3, 11, 5)),
        ((17, 5), (11, 5)),
        ((17, 5), (4, 11, 5)),  # 2-D a pairs with every batch of b
        ((4, 17, 5), (11, 5)),
        ((1, 17, 5), (4, 11, 5)),  # batch of 1 broadcasts
        ((4, 17, 5), (1, 11, 5)),
        ((1, 17, 5), (1, 11, 5)),
        ((2, 1, 3), (2, 1, 3)),
    ],
)
@pytest.mark.parametrize("chunks", ["auto", (2, 5, 4), (1, 1, 1), (-1, 7, (3, 3, 5))])
def test_matches_reference_shapes_and_chunks(shape_a, shape_b, chunks):
    a = rng(1).standard_normal(shape_a)
    b = rng(2).standard_normal(shape_b)
    batched = len(shape_a) == 3 or len(shape_b) == 3
    if chunks != "auto" and not batched:
        chunks = chunks[1:]
    if isinstance(chunks, tuple) and isinstance(chunks[-1], tuple) and sum(chunks[-1]) != shape_b[-2]:
        chunks = chunks[:-1] + (-1,)  # explicit block sizes must sum to M
    S, _ = check(a, b, chunks=chunks)
    expected = np.broadcast_shapes(shape_a[:-2], shape_b[:-2]) + (shape_a[-2], shape_b[-2])
    assert S.shape == expected


def test_explicit_block_sizes_and_ragged_last_chunk():
    a = rng(1).standard_normal((5, 23, 8))
    b = rng(2).standard_normal((5, 19, 8))
    S, _ = check(a, b, chunks=((2, 3), (10, 10, 3), 4))
    assert S.chunks == ((2, 3), (10, 10, 3), (4, 4, 4, 4, 3))


def test_seed_question_check_against_sklearn_loop():
    """The original Keras answer's check: batch=100, n=400, m=500, d=200, np.random.rand."""
    gen = np.random.default_rng(42)
    A = gen.random((100, 400, 200))
    B = gen.random((100, 500, 200))
    sk = np.zeros((100, 400, 500))
    for i in range(100):
        sk[i] = sk_cosine(A[i], B[i])
    ours = dcs.cosine_similarity(A, B).compute()
    assert ours.dtype == np.float64
    assert np.allclose(sk, ours)
    np.testing.assert_allclose(ours, sk, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dtype_a, dtype_b, expected",
    [
        ("float64", "float64", "float64"),
        ("float32", "float32", "float32"),
        ("float16", "float32", "float32"),
        ("float16", "float16", "float32"),
        ("float32", "float64", "float64"),
        ("int64", "int64", "float64"),
        ("int8", "float32", "float64"),
        ("uint16", "uint16", "float64"),
        ("bool", "bool", "float64"),
    ],
)
def test_dtypes_follow_sklearn(dtype_a, dtype_b, expected):
    gen = rng(3)
    a = (gen.standard_normal((2, 9, 6)) * 10).astype(dtype_a)
    b = (gen.standard_normal((2, 7, 6)) * 10).astype(dtype_b)
    S, got = check(a, b, chunks=(1, 4, 3))
    assert S.dtype == np.dtype(expected) == got.dtype
    if dtype_a == dtype_b and dtype_a in ("float32", "float64"):
        sk = np.stack([sk_cosine(a[k], b[k]) for k in range(2)])
        assert sk.dtype == got.dtype  # scikit-learn agrees on the dtype


def test_bfloat16_inputs_compute_in_float32():
    a = rng(4).standard_normal((10, 8)).astype(ml_dtypes.bfloat16)
    b = rng(5).standard_normal((6, 8)).astype(ml_dtypes.bfloat16)
    S = dcs.cosine_similarity(a, b)
    assert S.dtype == np.float32
    ref = reference_cosine(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(S.compute(), ref, atol=2e-6)


@pytest.mark.parametrize("out", ["float16", "float32", "float64"])
def test_output_dtype_override(out):
    a = rng(6).standard_normal((30, 16)).astype("float32")
    b = rng(7).standard_normal((20, 16)).astype("float32")
    S = dcs.cosine_similarity(a, b, dtype=out)
    got = S.compute()
    assert S.dtype == got.dtype == np.dtype(out)
    tol = {"float16": 1e-3, "float32": 2e-6, "float64": 1e-12}[out]
    np.testing.assert_allclose(got, reference_cosine(a, b), atol=tol)


def test_self_similarity_b_none_and_b_is_a():
    a = rng(8).standard_normal((3, 25, 7))
    S1, got1 = check(a, None, chunks=(1, 10, 10))
    S2, got2 = check(a, a, chunks=(1, 10, 10))
    np.testing.assert_allclose(got1, got2, atol=1e-15)
    assert np.all(np.abs(np.diagonal(got1, axis1=1, axis2=2) - 1) < 1e-12)


def test_never_above_one_even_for_parallel_vectors():
    gen = rng(9)
    base = gen.standard_normal((1, 64)).astype("float32")
    a = base * gen.uniform(0.1, 1000, (500, 1)).astype("float32")
    got = dcs.cosine_similarity(a, a, chunks=(128, 128)).compute()
    assert got.max() <= 1.0
    assert got.min() >= 1.0 - 1e-5


def test_extreme_magnitudes_do_not_overflow():
    gen = rng(10)
    a = gen.standard_normal((6, 5))
    big = np.concatenate([a * 1e200, a * 1e-200, a], axis=0)
    got = dcs.cosine_similarity(big, a).compute()
    ref = reference_cosine(a, a)
    for block in (got[:6], got[6:12], got[12:]):
        np.testing.assert_allclose(block, ref, atol=1e-12)
    f32 = (a * 1e30).astype("float32")
    np.testing.assert_allclose(dcs.cosine_similarity(f32, f32).compute(), ref, atol=2e-6)


class TestZeroAndNonFinite:
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5], [np.nan, 1.0, 1.0], [np.inf, 1, 1]])

    def test_zero_vector_default_is_zero_like_sklearn(self):
        got = dcs.cosine_similarity(self.a[:3], chunks=(2, 2)).compute()
        np.testing.assert_allclose(got, sk_cosine(self.a[:3]), atol=1e-15)
        assert np.all(got[1] == 0) and np.all(got[:, 1] == 0)

    def test_zero_vector_nan(self):
        got = dcs.cosine_similarity(self.a[:3], zero_vector="nan").compute()
        assert np.all(np.isnan(got[1])) and np.all(np.isnan(got[:, 1]))
        assert np.isfinite(np.delete(np.delete(got, 1, 0), 1, 1)).all()

    def test_zero_vector_error_names_input_batch_and_row(self):
        a = rng(11).standard_normal((3, 8, 4))
        b = rng(12).standard_normal((3, 9, 4))
        b[2, 6] = 0
        S = dcs.cosine_similarity(a, b, chunks=(1, 4, 4), zero_vector="error")  # lazy: no error yet
        with pytest.raises(dcs.ZeroVectorError, match=r"b: zero vector at batch 2, row 6"):
            S.compute()

    def test_zero_vector_error_2d_row(self):
        with pytest.raises(dcs.ZeroVectorError, match=r"a: zero vector at row 1\b"):
            dcs.cosine_similarity(self.a[:3], zero_vector="error").compute()

    def test_nan_and_inf_poison_only_their_row_and_column(self):
        b = rng(13).standard_normal((4, 3))
        got = dcs.cosine_similarity(self.a, b, chunks=(2, 3)).compute()
        assert np.isnan(got[3:]).all()
        np.testing.assert_allclose(got[:3], sk_cosine(self.a[:3], b), atol=1e-15)
        got_t = dcs.cosine_similarity(b, self.a).compute()
        assert np.isnan(got_t[:, 3:]).all() and np.isfinite(got_t[:, :3]).all()


@pytest.mark.parametrize(
    "shape_a, shape_b, expected", [((0, 4), (5, 4), (0, 5)), ((3, 6, 4), (3, 0, 4), (3, 6, 0))]
)
def test_empty_rows_give_empty_result(shape_a, shape_b, expected):
    S = dcs.cosine_similarity(np.ones(shape_a), np.ones(shape_b))
    assert S.shape == expected
    assert S.compute().shape == expected


def test_accepts_lists_dask_zarr_paths_and_npy(tmp_path):
    a = rng(14).standard_normal((2, 12, 6)).astype("float32")
    b = rng(15).standard_normal((2, 10, 6)).astype("float32")
    ref = reference_cosine(a, b)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=a.shape, chunks=(1, 5, 6), dtype=a.dtype)
    z[:] = a
    np.save(tmp_path / "b.npy", b)
    dask_b_split_over_d = da.from_array(b, chunks=(1, 3, 2))
    for left, right, dtype in [
        (a.tolist(), b.tolist(), "float64"),  # Python floats: float64, the same values as a and b
        (z, b, "float32"),
        (str(tmp_path / "a.zarr"), str(tmp_path / "b.npy"), "float32"),
        (tmp_path / "a.zarr", dask_b_split_over_d, "float32"),
    ]:
        S = dcs.cosine_similarity(left, right)
        got = S.compute()
        assert S.dtype == got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 if dtype == "float64" else 2e-6)


def test_zarr_input_blocks_align_with_storage_chunks(tmp_path):
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(1000, 8), chunks=(100, 8), dtype="float64")
    z[:] = rng(16).standard_normal((1000, 8))
    with dask.config.set({"array.chunk-size": "300KiB"}):
        S = dcs.cosine_similarity(z, np.ones((1000, 8)))
    assert all(c % 100 == 0 for c in S.chunks[0][:-1])


def test_call_is_lazy_and_builds_readable_task_names():
    def boom(x):
        raise AssertionError("input was read at call time")

    a = da.ones((2, 8, 4), chunks=(1, 4, 4)).map_blocks(boom, dtype=float)
    S = dcs.cosine_similarity(a, np.ones((2, 5, 4)), chunks=(1, 4, 5))
    assert {"cosine-normalize", "cosine-block"} <= task_prefixes(S)
    assert S.name.startswith("cosine-block-")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count normalise and product kernel invocations (the graph captures the patched functions).

    Products run from two graph builders: ``core`` (the lazy array) and ``_result``
    (``S.compute()`` writing blocks into the result, with ``_triangle.product_into``);
    both are counted.
    """
    import dask_cosim._triangle as triangle  # the in-place product tasks (product_into)
    import dask_cosim.core as core

    calls = {"normalize": [], "block": []}
    real_norm, real_block = core.normalize_rows, core.similarity_block

    def norm(x, **kw):
        calls["normalize"].append((kw["input_name"], x.shape))
        return real_norm(x, **kw)

    def block(an, bn, **kw):
        calls["block"].append(an.shape)
        return real_block(an, bn, **kw)

    monkeypatch.setattr(core, "normalize_rows", norm)
    monkeypatch.setattr(core, "similarity_block", block)
    monkeypatch.setattr(triangle, "similarity_block", block)
    return calls


def test_each_input_block_normalised_once(kernel_calls):
    a = rng(17).standard_normal((4, 30, 5))
    b = rng(18).standard_normal((4, 20, 5))
    S = dcs.cosine_similarity(a, b, chunks=(2, 10, 5))  # a: 2x3 blocks, b: 2x4 blocks, out: 2x3x4
    np.testing.assert_allclose(S.compute(), reference_cosine(a, b), atol=1e-12)
    names = [n for n, _ in kernel_calls["normalize"]]
    assert names.count("a") == 2 * 3 and names.count("b") == 2 * 4
    assert len(kernel_calls["block"]) == 2 * 3 * 4


def test_slice_runs_only_the_blocks_it_touches(kernel_calls):
    a = rng(19).standard_normal((4, 30, 5))
    b = rng(20).standard_normal((4, 20, 5))
    S = dcs.cosine_similarity(a, b, chunks=(1, 10, 5))
    part = S[2, 12:18, 3:7].compute()  # one row block, one column block (3:5) + (5:7): two blocks
    np.testing.assert_allclose(part, reference_cosine(a, b)[2, 12:18, 3:7], atol=1e-12)
    assert len(kernel_calls["block"]) == 2
    assert sorted(n for n, _ in kernel_calls["normalize"]) == ["a", "b", "b"]


@pytest.mark.parametrize("shape_a", [(4, 30, 5), (30, 5)])
@pytest.mark.parametrize("how", ["compute", "dask.compute"])
def test_products_read_the_normalised_blocks_without_copying_them(monkeypatch, shape_a, how):
    """Each product task gets the very arrays its normalise tasks returned.

    Blockwise with ``concatenate=True`` copies even a single block along the contracted
    vector axis into fresh memory, in every product task (measured: a quarter of W1's
    product time); the graph unwraps the one block instead.
    """
    import dask_cosim._triangle as triangle  # the in-place product tasks (product_into)
    import dask_cosim.core as core

    normalised, received = [], []
    real_norm, real_block = core.normalize_rows, core.similarity_block

    def norm(x, **kw):
        normalised.append(real_norm(x, **kw))
        return normalised[-1]

    def block(an, bn, **kw):
        received.extend([an, bn])
        return real_block(an, bn, **kw)

    monkeypatch.setattr(core, "normalize_rows", norm)
    monkeypatch.setattr(core, "similarity_block", block)
    monkeypatch.setattr(triangle, "similarity_block", block)
    a, b = rng(25).standard_normal(shape_a), rng(26).standard_normal((4, 20, 5))
    S = dcs.cosine_similarity(a, b, chunks=(2, 10, 5))
    got = S.compute() if how == "compute" else dask.compute(S)[0]
    np.testing.assert_allclose(got, reference_cosine(a, b), atol=1e-12)
    assert len(received) == 2 * 2 * 3 * 4
    assert all(any(x is y for y in normalised) for x in received)


@pytest.mark.parametrize("chunks", ["auto", (1, 7, 5), (2, 30, 11)])
def test_store_into_a_kept_buffer_matches_reference(chunks):
    """The README's fast in-memory path: block tasks write into the caller's buffer."""
    gen = np.random.default_rng(11)
    a = gen.standard_normal((3, 30, 6)).astype(np.float32)
    b = gen.standard_normal((3, 22, 6)).astype(np.float32)
    S = dcs.cosine_similarity(a, b, chunks=chunks)
    out = np.full(S.shape, np.nan, S.dtype)
    for _ in range(2):  # a reused buffer is fully overwritten
        S.store(out, lock=False)
        np.testing.assert_allclose(out, reference_cosine(a, b), rtol=0, atol=3e-6)


@pytest.mark.parametrize("scheduler", ["threads", "sync", "processes"])
def test_local_schedulers(scheduler):
    a = rng(21).standard_normal((3, 20, 6)).astype("float32")
    b = rng(22).standard_normal((3, 15, 6)).astype("float32")
    got = dcs.cosine_similarity(a, b, chunks=(1, 8, 8)).compute(scheduler=scheduler)
    np.testing.assert_allclose(got, reference_cosine(a, b), atol=2e-6)


def test_distributed_local_cluster_two_processes():
    a = rng(23).standard_normal((3, 40, 6))
    b = rng(24).standard_normal((3, 30, 6))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        S = dcs.cosine_similarity(a, b, chunks=(1, 16, 16))
        got = client.compute(S).result()
        np.testing.assert_allclose(got, reference_cosine(a, b), atol=1e-12)
        seen = client.run_on_scheduler(lambda dask_scheduler: set(dask_scheduler.task_prefixes))
        assert {"cosine-block"} <= seen and any("cosine-normalize" in p for p in seen)


def test_building_the_graph_copies_no_input():
    import tracemalloc

    a, b = np.ones((2000, 256)), np.ones((2000, 256))  # 4 MB each
    tracemalloc.start()
    S = dcs.cosine_similarity(a, b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < a.nbytes / 4, f"graph construction allocated {peak} bytes"
    assert S.shape == (2000, 2000)


def test_npy_inputs_are_memory_mapped_and_pickle_as_paths(tmp_path):
    import pickle

    from dask_cosim._inputs import NpyFile, open_input

    a = rng(25).standard_normal((300, 16))
    np.save(tmp_path / "a.npy", a)
    src = open_input(str(tmp_path / "a.npy"), "a")
    assert isinstance(src, NpyFile) and isinstance(src._mmap, np.memmap)
    clone = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 1000  # the path, not the data
    np.testing.assert_array_equal(clone[10:20], a[10:20])
    got = dcs.cosine_similarity(str(tmp_path / "a.npy"), chunks=(100, 100)).compute(scheduler="processes")
    np.testing.assert_allclose(got, reference_cosine(a), atol=1e-12)


def test_in_memory_inputs_are_named_without_hashing_their_data(monkeypatch):
    import dask.tokenize

    hashed = []
    real = dask.tokenize.hash_buffer_hex

    def spy(buf, *args, **kwargs):
        hashed.append(memoryview(buf).nbytes)
        return real(buf, *args, **kwargs)

    monkeypatch.setattr(dask.tokenize, "hash_buffer_hex", spy)
    gen = np.random.default_rng(5)
    a, b = gen.standard_normal((600, 48)), gen.standard_normal((500, 48))
    S = dcs.cosine_similarity(a, b, chunks=(200, 250))
    vals, idx = dcs.topk(a, k=3, chunks=(200, 200))
    assert max(hashed, default=0) < a.nbytes // 10  # names, chunk specs: never the data
    # one live object, one name; a copy (or another object) is another input
    assert dcs.cosine_similarity(a, b, chunks=(200, 250)).name == S.name
    assert dcs.cosine_similarity(a.copy(), b, chunks=(200, 250)).name != S.name
    monkeypatch.undo()
    np.testing.assert_allclose(S.compute(), reference_cosine(a, b), rtol=0, atol=1e-12)
    assert idx.compute().shape == (600, 3)
