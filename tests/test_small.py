"""Small calls: one task, computed without a scheduler, equal to the blocked path.

The one-task path (:mod:`dask_cosim._small`) must give what the blocked graph with one
block gives, bit for bit, and what the float64 reference gives; it must be taken only for
small in-memory NumPy calls with default options, keep the lazy contract (nothing runs
until computed, errors at compute time), and run on a cluster like any graph.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim import NonFiniteError, ZeroVectorError, _small
from dask_cosim.testing import reference_cosine

TOL = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}


def rng(seed=0):
    return np.random.default_rng(seed)


def ntasks(x) -> int:
    return len(x.__dask_graph__())


@pytest.fixture
def scheduled(monkeypatch):
    """Graphs run by dask's threaded or synchronous scheduler (both call ``get_async``)."""
    import dask.local
    import dask.threaded

    runs = []
    real = dask.local.get_async

    def counting(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dask.threaded, "get_async", counting)
    monkeypatch.setattr(dask.local, "get_async", counting)
    return runs


SHAPES = [
    ((2, 10, 5), (2, 12, 5)),  # the tiny call
    ((10, 5), (12, 5)),  # 2-D
    ((3, 7, 4), (1, 9, 4)),  # b broadcast over a's batches
    ((1, 7, 4), (3, 9, 4)),  # a broadcast
    ((7, 4), (3, 9, 4)),  # 2-D with 3-D
    ((1, 7, 4), (1, 9, 4)),  # a batch of one each
    ((1, 1), (1, 1)),
    ((40, 60, 24), (40, 70, 24)),  # near the size limit
]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "float16"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_small_calls_equal_the_reference_and_the_one_block_graph(shapes, dtype, scheduled):
    a = (rng(1).standard_normal(shapes[0]) * 10).astype(dtype)
    b = (rng(2).standard_normal(shapes[1]) * 10).astype(dtype)
    a[..., 0, :] = 0  # a zero vector
    b[..., -1, :] = b[..., 0, :]  # a repeated vector
    S = dcs.cosine_similarity(a, b)
    assert ntasks(S) == 1 and S.numblocks == (1,) * S.ndim
    got = S.compute()
    assert scheduled == []  # computed in this thread, no scheduler
    assert isinstance(got, np.ndarray) and got.shape == S.shape and got.dtype == S.dtype
    blocked = dcs.cosine_similarity(a, b, chunks=(-1,) * S.ndim)  # explicit chunks: the graph
    assert ntasks(blocked) > 1
    np.testing.assert_array_equal(got, blocked.compute())  # the same kernels, bit for bit
    assert scheduled == [1]
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=TOL[np.dtype(S.dtype)])


@pytest.mark.parametrize("dtype", [None, "float32", "float64"])
def test_small_self_similarity_and_output_dtypes(dtype, scheduled):
    a = rng(3).standard_normal((2, 9, 6)).astype("float32")
    S = dcs.cosine_similarity(a, dtype=dtype)
    assert ntasks(S) == 1 and S.dtype == np.dtype(dtype or "float32")
    got = S.compute()
    assert scheduled == []
    np.testing.assert_array_equal(got, dcs.cosine_similarity(a, a.copy(), dtype=dtype).compute())
    np.testing.assert_allclose(got, reference_cosine(a, a), rtol=0, atol=TOL[got.dtype])
    np.testing.assert_array_equal(np.asarray(S), got)
    np.testing.assert_array_equal(S[1, :3].compute(), got[1, :3])  # dask operations work on it


def test_small_calls_are_lazy_and_fail_at_compute_like_the_graph():
    a = rng(4).standard_normal((5, 3))
    a[2] = 0
    S = dcs.cosine_similarity(a, zero_vector="error")
    with pytest.raises(ZeroVectorError, match=r"a.*row 2"):
        S.compute()
    a[2, 1] = np.nan
    S = dcs.cosine_similarity(a, check_finite=True)
    with pytest.raises(NonFiniteError, match="a"):
        S.compute()
    S = dcs.cosine_similarity(a, zero_vector="nan")
    a[:] = 1.0  # read when computed, as the graph's tasks read their blocks
    np.testing.assert_array_equal(S.compute(), np.ones((5, 5)))


def test_small_calls_refuse_bad_options_at_call_time():
    a = rng(5).standard_normal((4, 3))
    with pytest.raises(ValueError, match="zero_vector"):
        dcs.cosine_similarity(a, zero_vector="skip")
    with pytest.raises(ValueError, match="D=3"):
        dcs.cosine_similarity(a, rng(6).standard_normal((4, 2)))
    with pytest.raises(TypeError, match="dtype"):
        dcs.cosine_similarity(a, dtype="int32")


@pytest.mark.parametrize(
    "case",
    ["dask", "chunks", "precision", "large", "chunk-size", "masked", "list"],
)
def test_what_takes_the_blocked_path(case):
    a = rng(7).standard_normal((30, 8))
    kwargs: dict = {}
    if case == "dask":
        a = da.from_array(a, chunks=10)
    elif case == "chunks":
        kwargs["chunks"] = (10, 10)
    elif case == "precision":
        kwargs["precision"] = "bfloat16"
    elif case == "large":
        a = rng(7).standard_normal((400, 200))  # 2 x 400 x 400 x 200 FLOP > SMALL_FLOPS
    elif case == "masked":
        with pytest.raises(TypeError, match="masked"):
            dcs.cosine_similarity(np.ma.masked_array(a))
        return
    elif case == "list":
        a = a.tolist()
    if case == "chunk-size":
        with dask.config.set({"array.chunk-size": "1KiB"}):
            S = dcs.cosine_similarity(a)
    else:
        S = dcs.cosine_similarity(a, **kwargs)
    assert ntasks(S) > 1
    atol = 2e-2 if case == "precision" else 1e-12  # bfloat16 operands
    x = a.compute() if isinstance(a, da.Array) else np.asarray(a)
    np.testing.assert_allclose(S.compute(), reference_cosine(x, x), rtol=0, atol=atol)


def test_the_size_limits_are_what_decides():
    n = int((_small.SMALL_FLOPS / (2 * 64)) ** 0.5)  # work binds: 2 n^2 D FLOP
    assert ntasks(dcs.cosine_similarity(np.ones((n, 64), "float32"))) == 1
    assert ntasks(dcs.cosine_similarity(np.ones((n + 1, 64), "float32"))) > 1
    n = int((_small.SMALL_BYTES / 8) ** 0.5) - 1  # memory binds: the output (counted as float64)
    assert ntasks(dcs.cosine_similarity(np.ones((n, 2), "float32"))) == 1
    assert ntasks(dcs.cosine_similarity(np.ones((n + 2, 2), "float32"))) > 1


def test_small_results_write_and_plan_like_any_result(tmp_path):
    a = rng(8).standard_normal((2, 6, 4))
    S = dcs.cosine_similarity(a)
    report = dcs.to_zarr(S, tmp_path / "s.zarr")
    assert report.blocks_written == 1
    import zarr

    np.testing.assert_array_equal(zarr.open_array(tmp_path / "s.zarr", path="similarity")[...], S.compute())
    p = dcs.plan(a)
    assert p.graph_tasks == 1 and p.write_tasks == 1 and "small call" in repr(p)


def test_small_calls_run_on_a_cluster(scheduler):
    from distributed import Client

    a = rng(9).standard_normal((3, 5, 4))
    with Client(scheduler, set_as_default=True) as client:
        S = dcs.cosine_similarity(a)
        got = S.compute()
        seen = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    assert "cosine-similarity" in seen  # the one task ran on the cluster
    np.testing.assert_allclose(got, reference_cosine(a, a), atol=1e-12)
