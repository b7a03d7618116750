"""topk and pairs_above against brute force (float64 NumPy), kernels fast path vs generic path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import array_api_strict as xps
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim import _select
from dask_cosim._kernels import normalize_rows
from dask_cosim._rescore import pair_scores
from dask_cosim._select import (
    EXCLUDED_KEY,
    NAN_KEY,
    PAD_KEY,
    finish_topk,
    merge_topk,
    select_above,
    select_topk,
    topk_block,
)
from dask_cosim.core import prepare
from dask_cosim.reductions import _prepare
from dask_cosim.testing import assert_topk_indices, reference_cosine

from ._graphs import block_metadata, copy_of, dependencies, stage_names, task_prefixes

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rng(seed):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ brute-force references


def reference_similarity(a, b=None):
    """float64 S with NaN rows/columns for vectors holding NaN (as the library does)."""
    a = np.asarray(a, dtype=np.float64)
    b = a if b is None else np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        s = reference_cosine(np.nan_to_num(a), np.nan_to_num(b))
    nan_a = np.isnan(a).any(-1)[..., :, None]
    nan_b = np.isnan(b).any(-1)[..., None, :]
    return np.where(nan_a | nan_b, np.nan, s)


def reference_topk(s, k, exclude_self=False):
    """argsort of the full S: descending, ties by smaller j (stable), NaN last, diagonal dropped."""
    key = np.where(np.isnan(s), NAN_KEY, s)
    if exclude_self:
        n, m = s.shape[-2:]
        key = np.where(np.eye(n, m, dtype=bool), EXCLUDED_KEY, key)
    idx = np.argsort(-key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, idx, axis=-1), idx


def reference_pairs(s, threshold, *, upper=False, exclude_self=False):
    s3 = s if s.ndim == 3 else s[None]
    keep = s3 >= threshold
    n, m = s3.shape[-2:]
    r, c = np.arange(n)[:, None], np.arange(m)[None, :]
    if upper:
        keep &= c >= r
    if exclude_self:
        keep &= c != r
    b, i, j = np.nonzero(keep)
    return pd.DataFrame({"batch": b, "i": i, "j": j, "score": s3[keep]})


def assert_topk(vals, idx, s, k, *, exclude_self=False, atol=1e-5):
    """Values match the brute-force top-k; indices equal it wherever a value is not a near-tie.

    Where the library's product rounds differently from the float64 reference, two
    neighbours closer than ``atol`` may legitimately swap; any other index must match.
    """
    ref_vals, ref_idx = reference_topk(s, k, exclude_self)
    assert vals.shape == ref_vals.shape and idx.shape == ref_idx.shape and idx.dtype == np.int64
    np.testing.assert_allclose(vals, ref_vals, atol=atol, rtol=0, equal_nan=True)
    np.testing.assert_allclose(np.take_along_axis(s, idx, axis=-1), vals, atol=atol, rtol=0, equal_nan=True)
    assert_topk_indices(idx, s, atol=atol, exclude_self=exclude_self)


# ------------------------------------------------------------------ topk: values and indices


@pytest.mark.parametrize(
    "chunks",
    [(-1, -1), (7, 5), (13, 64), ((30, 3, 20), (1, 9, 40, 14)), ("auto", "auto"), (4, 1)],
)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_matches_brute_force_2d(chunks, k):
    a, b = rng(0).standard_normal((53, 9)), rng(1).standard_normal((64, 9))
    vals, idx = dask.compute(*dcs.topk(a, b, k=k, chunks=chunks))
    assert vals.dtype == np.float64
    assert_topk(vals, idx, reference_similarity(a, b), k, atol=1e-12)


@pytest.mark.parametrize("k", [1, 12, 40])
def test_topk_k_equal_m_and_larger_than_a_block(k):
    a, b = rng(2).standard_normal((21, 5)), rng(3).standard_normal((40, 5))
    vals, idx = dask.compute(*dcs.topk(a, b, k=k, chunks=(8, 7)))
    assert vals.shape == (21, k)
    assert_topk(vals, idx, reference_similarity(a, b), k, atol=1e-12)
    if k == 40:  # every column exactly once per row
        assert (np.sort(idx, axis=1) == np.arange(40)).all()


def test_topk_float32_and_3d_batches_with_broadcasting():
    a = rng(4).standard_normal((3, 30, 16), dtype=np.float32)
    b = rng(5).standard_normal((1, 45, 16), dtype=np.float32)
    vals, idx = dask.compute(*dcs.topk(a, b, k=6, chunks=(2, 11, 9)))
    assert vals.dtype == np.float32 and vals.shape == (3, 30, 6) and idx.shape == (3, 30, 6)
    assert_topk(vals, idx, reference_similarity(a, b), 6, atol=2e-6)
    a2 = rng(6).standard_normal((30, 16))  # 2-D a with a 3-D b: each batch of b
    b3 = rng(7).standard_normal((2, 25, 16))
    vals, idx = dask.compute(*dcs.topk(a2, b3, k=4, chunks=(1, 10, 10)))
    assert vals.shape == (2, 30, 4)
    assert_topk(vals, idx, reference_similarity(a2, b3), 4, atol=1e-12)


def test_topk_ties_zero_vectors_and_nan_rows():
    """Exact duplicates tie exactly (values are deterministic pair scores, README: Scores and
    ties), whatever the BLAS kernel and the chunking, so they come in index order."""
    gen = rng(8)
    b = gen.standard_normal((30, 4))
    b[[3, 11, 27]] = b[20]  # duplicates of column 20: exact ties, smaller j first
    b[[5, 6]] = 0.0  # zero vectors: similarity 0 with everything
    b[8, 2] = np.nan  # a NaN vector: a NaN column, ranks last
    a = gen.standard_normal((25, 4))
    a[4] = b[20] * 3.0  # its top-4 are the four copies of b[20], in j order
    a[7] = 0.0  # zero row: all zeros (and NaN last) -> columns in j order
    a[9, 0] = np.nan  # NaN row: all NaN -> columns 0..k-1
    s = reference_similarity(a, b)
    for chunks in [(-1, -1), (5, 4), (25, 1), (3, 7)]:
        vals, idx = dask.compute(*dcs.topk(a, b, k=5, chunks=chunks))
        assert_topk(vals, idx, s, 5, atol=1e-12)
        assert list(idx[4, :4]) == [3, 11, 20, 27] and (vals[4, :4] == vals[4, 0]).all()
        assert list(idx[7]) == [0, 1, 2, 3, 4] and (vals[7] == 0).all()
        assert list(idx[9]) == [0, 1, 2, 3, 4] and np.isnan(vals[9]).all()
        assert 8 not in idx[np.arange(25) != 9]  # NaN column never beats a number
    vals, idx = dask.compute(*dcs.topk(a, b, k=30, chunks=(6, 7)))
    assert (idx[:, -1][np.arange(25) != 9] == 8).all()  # ... and comes last when k == M


def test_topk_exclude_self():
    a = rng(9).standard_normal((33, 6))
    a[10] = a[2]  # a duplicate: its best other vector is its twin (similarity 1)
    s = reference_similarity(a)
    for b, chunks in [(None, (8, 8)), (None, (8, 5)), (a, (8, 5)), (a.copy(), (33, 4))]:
        vals, idx = dask.compute(*dcs.topk(a, b, k=32, exclude_self=True, chunks=chunks))
        assert_topk(vals, idx, s, 32, exclude_self=True, atol=1e-12)
        assert not (idx == np.arange(33)[:, None]).any()
        assert idx[2, 0] == 10 and idx[10, 0] == 2


#: Vectors whose normalised forms and dot products are exact in binary floating point
#: (dyadic components, power-of-two norms): every BLAS path gives the same similarities,
#: so equal similarities are exact ties and the tie rule alone decides the order.
EXACT = np.array(
    [
        [1, 0, 0, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 4],
        [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [-0.5, -0.5, 0.5, 0.5], [2, 2, -2, 2],
        [0, 0, 0, 0],
    ]
)  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 14),
    m=st.integers(1, 14),
    k=st.integers(1, 14),
    cn=st.integers(3, 14),
    cm=st.integers(3, 14),
    self_sim=st.booleans(),
    exclude_self=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_topk_deterministic_across_chunkings(n, m, k, cn, cm, self_sim, exclude_self, seed):
    gen = rng(seed)
    a = EXACT[gen.integers(0, len(EXACT), size=n)]
    b = None if self_sim else EXACT[gen.integers(0, len(EXACT), size=m)]
    m = n if self_sim else m
    exclude_self = exclude_self and self_sim and m > 1
    k = min(k, m - exclude_self)
    s = reference_similarity(a, b)
    ref_vals, ref_idx = reference_topk(s, k, exclude_self)
    for chunks, scheduler in [((cn, cm), "threads"), ((-1, -1), "sync"), ((cm, cn), "threads")]:
        vals, idx = dask.compute(
            *dcs.topk(a, b, k=k, exclude_self=exclude_self, chunks=chunks), scheduler=scheduler
        )
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(vals, ref_vals)


#: Tolerance of an output dtype against the float64 reference (float16: half an ulp near 1).
OUT_ATOL = {"float16": 5e-4, "float32": 1e-6, "float64": 1e-12}


#: Where :func:`_zero_vector_inputs` put zero vectors (whichever block fails first is named).
ZERO_AT = r"^(a: zero vector at batch (0, row 3|1, row 17)|b: zero vector at batch 1, row 9) "


def _zero_vector_inputs(self_similar: bool):
    a = rng(40).standard_normal((2, 30, 8)).astype(np.float32)
    a[0, 3] = 0.0
    a[1, 17] = 0.0
    if self_similar:
        return a, None
    b = rng(41).standard_normal((2, 45, 8)).astype(np.float32)
    b[1, 9] = 0.0
    return a, b


def _reference_with_policy(a, b, zero_vector):
    """float64 S under a zero-vector policy: "zero" gives 0 (scikit-learn), "nan" NaN."""
    s = reference_similarity(a, b)
    if zero_vector == "nan":
        b = a if b is None else b
        zero_a = ~np.asarray(a, dtype=np.float64).any(-1)[..., :, None]
        zero_b = ~np.asarray(b, dtype=np.float64).any(-1)[..., None, :]
        s = np.where(zero_a | zero_b, np.nan, s)
    return s


@pytest.mark.parametrize("self_similar", [False, True], ids=["a-b", "self"])
@pytest.mark.parametrize("dtype", [None, "float16", "float32", "float64"])
@pytest.mark.parametrize("zero_vector", ["zero", "nan", "error"])
def test_topk_takes_zero_vector_and_dtype_like_cosine_similarity(zero_vector, dtype, self_similar):
    a, b = _zero_vector_inputs(self_similar)
    vals, idx = dcs.topk(a, b, k=4, chunks=(1, 8, 8), dtype=dtype, zero_vector=zero_vector)
    want = np.dtype(dtype or "float32")  # float32 inputs: float32 unless asked
    assert vals.dtype == want and idx.dtype == np.int64
    if zero_vector == "error":
        with pytest.raises(dcs.ZeroVectorError, match=ZERO_AT):
            dask.compute(vals, idx)
        return
    vals, idx = dask.compute(vals, idx)
    assert vals.dtype == want
    s = _reference_with_policy(a, b, zero_vector)
    assert_topk(vals.astype(np.float64), idx, s, 4, atol=OUT_ATOL[want.name])
    zero_row = vals[0, 3]
    assert (np.isnan(zero_row) if zero_vector == "nan" else zero_row == 0).all()


@pytest.mark.parametrize("self_similar", [False, True], ids=["a-b", "self"])
@pytest.mark.parametrize("dtype", [None, "float16", "float32", "float64"])
@pytest.mark.parametrize("zero_vector", ["zero", "nan", "error"])
def test_pairs_above_takes_zero_vector_and_dtype_like_cosine_similarity(zero_vector, dtype, self_similar):
    a, b = _zero_vector_inputs(self_similar)
    threshold = -0.05  # below 0: the zero vectors' pairs pass under "zero", never under "nan"
    df = dcs.pairs_above(a, b, threshold=threshold, chunks=(1, 8, 8), dtype=dtype, zero_vector=zero_vector)
    want = np.dtype(dtype or "float32")
    assert df.dtypes["score"] == want
    if zero_vector == "error":
        with pytest.raises(dcs.ZeroVectorError, match=ZERO_AT):
            df.compute()
        return
    got = df.compute().sort_values(["batch", "i", "j"]).reset_index(drop=True)
    assert got["score"].dtype == want
    s = _reference_with_policy(a, b, zero_vector)
    ref = reference_pairs(s, threshold, upper=self_similar)
    atol = OUT_ATOL[want.name]
    s3 = s if s.ndim == 3 else s[None]
    clear = ~(np.abs(s3 - threshold) <= atol)  # pairs this close to the threshold may go either way

    def pairs(frame):
        return {(b, i, j) for b, i, j in zip(frame.batch, frame.i, frame.j, strict=True) if clear[b, i, j]}

    assert pairs(got) == pairs(ref)
    np.testing.assert_allclose(
        got["score"].astype(np.float64), s3[got.batch, got.i, got.j], atol=atol, rtol=0
    )
    zero_pairs = (got.batch == 0) & ((got.i == 3) | (got.j == 3) if self_similar else (got.i == 3))
    assert zero_pairs.sum() == (0 if zero_vector == "nan" else (30 if self_similar else 45))


def test_topk_same_result_with_every_scheduler():
    a, b = rng(10).standard_normal((40, 8)), rng(11).standard_normal((50, 8))
    results = [dask.compute(*dcs.topk(a, b, k=7, chunks=(9, 11)), scheduler=s) for s in ("sync", "threads")]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][0], results[1][0])


# ------------------------------------------------------------------ topk: API and graph


@pytest.mark.parametrize(
    ("k", "match"),
    [
        (0, r"k: expected a positive integer \(k >= 1\), received 0"),
        (-3, r"k >= 1"),
        (2.0, r"k: expected a positive integer, received 2.0 \(float\)"),
        ("3", r"received '3' \(str\)"),
        (True, r"received True"),
        (11, r"k: b has M = 10 vectors, received k=11; expected k <= M = 10"),
    ],
)
def test_topk_rejects_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        dcs.topk(np.ones((4, 3)), np.ones((10, 3)), k=k)


def test_topk_rejects_bad_exclude_self():
    with pytest.raises(ValueError, match=r"exclude_self=True.*N=4 and b with M=10"):
        dcs.topk(np.ones((4, 3)), np.ones((10, 3)), k=2, exclude_self=True)
    with pytest.raises(ValueError, match=r"M - 1 = 3 other vectors, received k=4"):
        dcs.topk(np.ones((4, 3)), k=4, exclude_self=True)
    with pytest.raises(TypeError, match=r"exclude_self: expected True or False, received 'yes'"):
        dcs.topk(np.ones((4, 3)), k=1, exclude_self="yes")
    with pytest.raises(ValueError, match=r"same vector length D"):
        dcs.topk(np.ones((4, 3)), np.ones((4, 2)), k=1)


def test_topk_is_lazy_with_readable_names_and_output_chunks():
    def boom(x):
        raise AssertionError("input was read at call time")

    a = da.ones((2, 20, 4), chunks=(1, 10, 4)).map_blocks(boom, dtype=float)
    vals, idx = dcs.topk(a, np.ones((2, 30, 4)), k=3, chunks=(1, 10, 6))
    assert vals.shape == idx.shape == (2, 20, 3) and vals.dtype == np.float64 and idx.dtype == np.int64
    assert vals.chunks == ((1, 1), (10, 10), (3,))
    prefixes = task_prefixes(vals)
    assert {"cosine-normalize", "cosine-topk", "cosine-values"} <= prefixes
    assert any(p.startswith("cosine-merge") for p in prefixes)
    assert vals.name.startswith("cosine-values-") and idx.name.startswith("cosine-indices-")


def test_topk_merges_as_a_tree():
    a, b = rng(12).standard_normal((10, 4)), rng(13).standard_normal((200, 4))
    vals, idx = dcs.topk(a, b, k=3, chunks=(10, 2))  # 100 column blocks
    split = _reductions().SPLIT_EVERY
    levels = [
        n for prefix, names in stage_names(vals).items() if prefix.startswith("cosine-merge") for n in names
    ]
    assert len(levels) == math.ceil(math.log(100, split))  # tree levels
    deps = dependencies(vals)
    fan_in = [len(d) for key, d in deps.items() if isinstance(key, tuple) and key[0] in levels]
    assert max(fan_in) == split and len(fan_in) == 13 + 2 + 1  # 100 parts -> 13 -> 2 -> 1
    assert_topk(*dask.compute(vals, idx), reference_similarity(a, b), 3, atol=1e-12)


def _reductions():
    from dask_cosim import reductions

    return reductions


def test_reduction_auto_blocks_are_sized_by_work(monkeypatch):
    """topk / pairs_above blocks carry about cosine.task-flops each (nothing of S is held),
    split further only so that every thread gets REDUCTION_TASKS_PER_CORE of them."""
    import dask_cosim.core as core
    from dask_cosim._sizing import REDUCTION_TASKS_PER_CORE

    monkeypatch.setattr(core, "_cores", lambda: 2)
    a = da.zeros((60_000, 32), dtype=np.float32, chunks=(60_000, 32))
    b = da.zeros((50_000, 32), dtype=np.float32, chunks=(50_000, 32))
    small_job = _prepare(a, b).plan  # 6e9 FLOP in all: split for the two threads
    assert len(small_job.rows) * len(small_job.cols) >= 2 * REDUCTION_TASKS_PER_CORE
    for op in ("topk", "pairs"):
        with dask.config.set({"cosine.task-flops": 1e8}):
            plan = _prepare(a, b, op=op).plan
        flops = 2 * 32 * max(plan.rows) * max(plan.cols)
        assert 1e8 / 4 <= flops <= 1e8, plan.chunks
        with dask.config.set({"cosine.task-flops": 1e9}):
            assert 2 * 32 * max(_prepare(a, b, op=op).plan.rows) ** 2 > flops  # more work, bigger blocks
    vals, _ = dcs.topk(a, k=3)
    assert vals.chunks[0] == _prepare(a, None).plan.rows


@pytest.mark.parametrize("gpu", ["device", "cupy-inputs"])
def test_topk_and_pairs_auto_blocks_on_a_gpu_are_gpu_sized(monkeypatch, gpu):
    """Products known to run on a GPU (device="gpu", or CuPy inputs): blocks near
    cosine.gpu-block-bytes, not split for the host's cores; device="auto" with host inputs
    (the worker decides) keeps host-sized blocks."""
    import dask_cosim.core as core

    monkeypatch.setattr(core, "_cores", lambda: 16)
    if gpu == "cupy-inputs":  # CuPy stand-in: only the planner's view of the inputs matters here
        monkeypatch.setattr(core, "is_device_array", lambda x: True)
        monkeypatch.setattr(core, "_meta", lambda on_device, ndim, dtype: np.empty((0,) * ndim, dtype))
    a = da.zeros((16_384, 1024), dtype=np.float32, chunks=(16_384, 1024))
    kw = {"device": "gpu"} if gpu == "device" else {"like": "numpy"}
    assert _prepare(a, copy_of(a), **kw).plan.chunks == ((1,), (16_384,), (16_384,))  # S: 1 GiB
    with dask.config.set({"cosine.gpu-block-bytes": "64MiB"}):
        plan = _prepare(a, copy_of(a), **kw).plan
    assert 32 * 2**20 < max(plan.rows) * max(plan.cols) * 4 <= 64 * 2**20
    if gpu == "device":  # the worker decides: blocks planned for the host's threads
        host = _prepare(a, copy_of(a)).plan
        assert len(host.rows) * len(host.cols) >= 16


def test_reductions_on_a_gpu_take_whole_rows_of_s_when_enough_fit():
    """Row blocks spanning every column (no pivot, pruned blocks or merge of parts) when
    MIN_GPU_ROWS such rows fit in cosine.gpu-block-bytes; square blocks otherwise, and for
    self-similarity (its block triangle needs them)."""
    from dask_cosim._sizing import MIN_GPU_ROWS

    a = da.zeros((32_768, 1024), dtype=np.float32, chunks=(32_768, 1024))
    plan = _prepare(a, copy_of(a), device="gpu").plan
    assert plan.cols == (32_768,) and plan.rows == (8192,) * 4  # 1 GiB each
    assert _prepare(a, copy_of(a), device="cpu").plan.cols != (32_768,)
    assert len(_prepare(a, None, device="gpu").plan.cols) > 1  # self-similarity: square blocks
    with dask.config.set({"cosine.gpu-block-bytes": MIN_GPU_ROWS * 32_768 * 4 - 1}):
        assert len(_prepare(a, copy_of(a), device="gpu").plan.cols) > 1
    with dask.config.set({"cosine.max-task-memory": "256MiB"}):  # the budget binds too
        assert len(_prepare(a, copy_of(a), device="gpu").plan.cols) > 1
    wide = da.zeros((200_000, 4096), dtype=np.float32, chunks=(200_000, 4096))  # b's blocks dominate
    narrow = da.zeros((2048, 4096), dtype=np.float32, chunks=(2048, 4096))
    for plan in (
        _prepare(narrow, wide, device="gpu").plan,
        prepare(wide, copy_of(wide), device="gpu", like="cupy").plan,
    ):
        assert len(plan.cols) > 1 and plan.task_bytes <= 4 * 2**30  # auto always fits the budget
    explicit = _prepare(a, copy_of(a), device="gpu", chunks=(4096, 4096)).plan
    assert explicit.rows == (4096,) * 8 and explicit.cols == (4096,) * 8
    vals, _ = dcs.topk(a, copy_of(a), k=3, device="gpu")  # one part per row block: nothing to prune or merge
    stages = task_prefixes(vals)
    assert vals.numblocks == (4, 1) and "cosine-topk" in stages
    assert not stages & {"blocks", "concatenate", "stack", "getitem", "cosine-merge-partial"}


def test_topk_empty_inputs():
    vals, idx = dcs.topk(np.ones((0, 3)), np.ones((5, 3)), k=2)
    assert vals.compute().shape == (0, 2) and idx.compute().dtype == np.int64
    vals, idx = dcs.topk(np.ones((0, 4, 3)), np.ones((0, 5, 3)), k=5)
    assert vals.compute().shape == (0, 4, 5)


def test_topk_records_provenance():
    from dask_cosim import _provenance

    a = rng(14).standard_normal((10, 3))
    vals, idx = dcs.topk(a, k=2, exclude_self=True)
    for x in (vals, idx):
        info = _provenance.lookup(x.name)
        assert info["kind"] == "topk" and info["k"] == 2 and info["exclude_self"] is True
        assert info["self_similar"] is True


# ------------------------------------------------------------------ memory


def _layer_block_bytes(collections, k: int, pair_bytes: int) -> dict[str, int]:
    """Largest block (bytes) of every stage, from the graphs' block metadata only."""
    out = {}
    for name, (chunks, dtype) in block_metadata(*collections).items():
        size = [max(c) if c else 0 for c in chunks]
        if dtype.kind == "O":  # (key, index) candidates; merge levels say 1 along j, hold k
            size[-1] = max(size[-1], k)
            out[name] = math.prod(size) * pair_bytes
        else:
            out[name] = math.prod(size) * dtype.itemsize
    return out


@pytest.mark.parametrize("self_similar", [False, True])
def test_topk_graph_never_holds_more_than_a_block(self_similar):
    """N = M = 2e5, D = 64 float32: S would be 160 GB; no task's output may exceed one block of S.

    Checked on the graph (every layer's block metadata), nothing is computed.
    """
    n, d, k = 200_000, 64, 10
    a = da.zeros((n, d), dtype=np.float32, chunks=(25_000, d))
    b = None if self_similar else da.ones((n, d), dtype=np.float32, chunks=(25_000, d))
    vals, idx = dcs.topk(a, b, k=k)
    plan = _prepare(a, b).plan  # as topk plans it
    s_block = max(plan.rows) * max(plan.cols) * 4
    assert n * n * 4 > 50 * s_block  # S is ~160 GB, a block a small part of it
    assert plan.task_bytes < s_block / 4  # and a task computes its block in tiles, never whole
    sizes = _layer_block_bytes([vals, idx], k, pair_bytes=4 + 8)
    assert max(sizes.values()) <= s_block, {name: v for name, v in sizes.items() if v > s_block}
    # the top-k parts and merges are tiny next to a block of S: at most 2 x rows x k candidates
    stages = ("cosine-topk", "cosine-pick", "cosine-merge", "cosine-values", "cosine-indices")
    topk_layers = {name: v for name, v in sizes.items() if name.startswith(stages)}
    assert len(topk_layers) >= 4
    assert max(topk_layers.values()) <= 2 * max(plan.rows) * k * 12
    assert vals.chunks == (plan.rows, (k,))


def test_task_outputs_match_the_graph_metadata_when_run():
    """Run a small topk and measure every task's output: none exceeds one block of S."""
    from dask.callbacks import Callback
    from dask.sizeof import sizeof
    from dask.utils import key_split

    a, b = rng(15).standard_normal((300, 8)), rng(16).standard_normal((400, 8))
    biggest: dict[str, int] = {}

    class Sizes(Callback):
        def _posttask(self, key, result, dsk, state, id):
            name = key_split(key)
            biggest[name] = max(biggest.get(name, 0), sizeof(result))

    with Sizes():
        vals, idx = dask.compute(*dcs.topk(a, b, k=5, chunks=(100, 50)), scheduler="sync")
    s_block = 100 * 50 * 8
    assert biggest["cosine-topk"] <= 100 * 5 * 16 + 1024 < s_block
    assert all(v <= s_block for v in biggest.values()), biggest
    assert_topk(vals, idx, reference_similarity(a, b), 5, atol=1e-12)


# ------------------------------------------------------------------ kernels: fast path == generic


@FAST
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 300),
    k=st.integers(1, 20),
    row_offset=st.integers(0, 30),
    col_offset=st.integers(0, 30),
    exclude_self=st.booleans(),
    bounds=st.sampled_from(["none", "rows", "cols", "both"]),
    strip=st.sampled_from([None, 8]),
    seed=st.integers(0, 2**16),
)
def test_numpy_fast_path_equals_generic_on_ties_clipping_and_bounds(
    n, m, k, row_offset, col_offset, exclude_self, bounds, strip, seed
):
    """Raw products with exact ties, values just outside [-1, 1], NaN vectors and pivot bounds."""
    gen = rng(seed)
    levels = np.array([-1.0000001, -1.0, -0.5, -0.0, 0.0, 0.25, 1.0, 1.0000002], dtype=np.float32)
    s = levels[gen.integers(0, len(levels), size=(n, m))]
    an = np.ones((n, 2), dtype=np.float32)
    bn = np.ones((m, 2), dtype=np.float32)
    nan_rows = gen.random(n) < 0.15
    nan_cols = gen.random(m) < 0.1
    an[nan_rows, 0] = np.nan
    bn[nan_cols, 1] = np.nan
    s[nan_rows] = np.nan
    s[:, nan_cols] = np.nan
    key_levels = np.array([-np.inf, -3.0, -2.0, -1.0, -0.5, 0.0, 0.25, 1.0], dtype=np.float32)
    row_bound = key_levels[gen.integers(0, 8, size=n)] if bounds in ("rows", "both") else None
    col_bound = key_levels[gen.integers(0, 8, size=m)] if bounds in ("cols", "both") else None
    kw = {"row_offset": row_offset, "col_offset": col_offset, "exclude_self": exclude_self}

    def product(b, r0, r1, out, c0=0, c1=None):
        out[...] = s[r0:r1, c0:c1]

    with strip_rows(strip):
        fast_rows, fast_cols = _select._topk_block_numpy(
            an, bn, k, both=True, row_bound=row_bound, col_bound=col_bound, product=product, tiles=True, **kw
        )
    for axis, fast, bound in ((-1, fast_rows, row_bound), (-2, fast_cols, col_bound)):
        generic = select_topk(s, k, axis=axis, bound=bound, **kw)
        strict = select_topk(
            xps.asarray(s), k, axis=axis, bound=None if bound is None else xps.asarray(bound), **kw
        )
        for got in (fast, strict):
            np.testing.assert_array_equal(np.asarray(got[1]), generic[1])
            np.testing.assert_array_equal(np.asarray(got[0]), generic[0])
    # and the generic path against brute force on the clipped keys
    for axis, offset, full, bound in ((-1, col_offset, s, row_bound), (-2, row_offset, s.T, col_bound)):
        key = np.where(np.isnan(full), NAN_KEY, np.clip(full, -1, 1))
        if exclude_self:
            diag = (np.arange(full.shape[0])[:, None] + (row_offset if axis == -1 else col_offset)) == (
                np.arange(full.shape[1])[None, :] + offset
            )
            key = np.where(diag, EXCLUDED_KEY, key)
        if bound is not None:
            key = np.where(key >= bound[:, None], key, PAD_KEY)
        ref_idx = np.argsort(-key, axis=-1, kind="stable")[:, : min(k, full.shape[1])]
        ref_keys = np.take_along_axis(key, ref_idx, axis=-1)
        ref_idx = np.where(ref_keys == PAD_KEY, -1, ref_idx + offset)
        got_keys, got_idx = select_topk(s, k, axis=axis, bound=bound, **kw)
        np.testing.assert_array_equal(got_idx, ref_idx)
        np.testing.assert_array_equal(got_keys, ref_keys)


@contextmanager
def strip_rows(rows):
    """Set the fast path's row strips to ``rows`` (None: the default) and its tiles to
    ``rows`` x 5 float32 columns for one call."""
    saved = _select._STRIP_BYTES, _select._MIN_STRIP_ROWS, _select._GEMM_TILE_BYTES
    if rows is not None:
        _select._STRIP_BYTES, _select._MIN_STRIP_ROWS, _select._GEMM_TILE_BYTES = 1, rows, rows * 4 * 5
    try:
        yield
    finally:
        _select._STRIP_BYTES, _select._MIN_STRIP_ROWS, _select._GEMM_TILE_BYTES = saved


@pytest.mark.parametrize("strip", [None, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_topk_block_tiles_with_pivots_labels_nan_and_the_diagonal(strip, dtype, batch):
    """Pruned blocks (pivot bounds known) are computed in tiles: the same parts as the
    generic path, with NaN rows and columns, labels (2-D blocks) and the excluded diagonal
    crossing several tiles (``strip=8``: 8-row strips of 5-column tiles)."""
    gen = rng(23)
    an = gen.standard_normal((*batch, 70, 12)).astype(dtype)
    bn = gen.standard_normal((*batch, 90, 12)).astype(dtype)
    other = gen.standard_normal((*batch, 40, 12)).astype(dtype)
    for x in (an, bn, other):
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
    an[..., 5, :] = np.nan
    bn[..., [7, 33], :] = np.nan
    kw = {"k": 6, "row_offset": 10, "col_offset": 0, "exclude_self": True, "both": True}
    kw["row_pivot"] = topk_block(an, other, k=6)
    kw["col_pivot"] = topk_block(bn, other, k=6)
    if not batch:
        kw["row_labels"], kw["col_labels"] = gen.integers(0, 4, 70), gen.integers(0, 4, 90)
    with strip_rows(strip):
        fast = topk_block(an, bn, **kw)
    generic = topk_block(an, bn, fast=False, **kw)
    for f, g in zip(fast, generic, strict=True):
        np.testing.assert_array_equal(f[0], g[0])
        np.testing.assert_array_equal(f[1], g[1])
    assert (fast[0][1] >= 0).sum() > 70 * int(np.prod(batch))  # the pivots left candidates to find


def test_topk_block_fast_and_generic_agree_on_real_products():
    gen = rng(17)
    an = gen.standard_normal((3, 70, 12)).astype(np.float32)
    bn = gen.standard_normal((3, 90, 12)).astype(np.float32)
    an /= np.linalg.norm(an, axis=-1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=-1, keepdims=True)
    an[0, 5] = np.nan
    kw = {"k": 7, "row_offset": 10, "col_offset": 0, "exclude_self": True, "both": True}
    fast = topk_block(an, bn, **kw)
    generic = topk_block(an, bn, fast=False, **kw)
    s = np.clip(np.matmul(an.astype(np.float64), np.swapaxes(bn, -1, -2).astype(np.float64)), -1, 1)
    s[0, 5] = np.nan
    for f, g in zip(fast, generic, strict=True):
        # the products differ (different GEMM blockings), the scores that rank them do not
        np.testing.assert_array_equal(f[0], g[0])
        np.testing.assert_array_equal(f[1], g[1])
        assert f[1].dtype == g[1].dtype == np.int64
    # indices may only differ from the float64 ranking where float32 products round a near-tie
    for got in (fast, generic):
        (rows_keys, rows_idx), (cols_keys, cols_idx) = got
        assert_topk_indices(rows_idx, s, atol=1e-6, exclude_self=True, row_offset=10)
        assert_topk_indices(cols_idx, np.swapaxes(s, -1, -2), atol=1e-6, exclude_self=True, col_offset=10)


@FAST
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_numpy_merge_equals_generic(widths, k, seed):
    """Packed-key merge == generic merge, with ties, -0.0, NaN/excluded/padding keys."""
    gen = rng(seed)
    levels = np.array(
        [PAD_KEY, EXCLUDED_KEY, NAN_KEY, -1.0, -0.25, -1e-30, -0.0, 0.0, 0.5, 1.0], dtype=np.float32
    )
    cols = gen.permutation(200)
    parts, start = [], 0
    for w in widths:
        keys = np.sort(levels[gen.integers(0, len(levels), size=(3, w))], axis=-1)[:, ::-1]
        idx = np.broadcast_to(cols[start : start + w], (3, w)).copy()
        idx[keys == PAD_KEY] = -1
        parts.append((np.ascontiguousarray(keys), idx))
        start += w
    fast = merge_topk(parts, k)
    generic = merge_topk(parts, k, fast=False)
    assert fast[0].dtype == np.float32 and fast[1].dtype == np.int64
    np.testing.assert_array_equal(fast[1], generic[1])
    np.testing.assert_array_equal(fast[0], generic[0])


def test_merge_and_finish():
    p1 = (np.array([[0.9, 0.1, NAN_KEY]]), np.array([[3, 1, 4]]))
    p2 = (np.array([[0.9, NAN_KEY]]), np.array([[0, 2]]))
    keys, idx = merge_topk([p1, p2], 4)
    np.testing.assert_array_equal(idx, [[0, 3, 1, 2]])
    vals, idx = finish_topk(merge_topk([p1, p2], 5))
    np.testing.assert_array_equal(idx, [[0, 3, 1, 2, 4]])
    assert np.isnan(vals[0, 3:]).all()
    strict = merge_topk([tuple(xps.asarray(x) for x in p) for p in (p1, p2)], 4)
    np.testing.assert_array_equal(np.asarray(strict[1]), [[0, 3, 1, 2]])


@FAST
@given(
    shape=st.sampled_from([(5, 7), (2, 4, 6), (1, 3, 3)]),
    dtype=st.sampled_from(["float32", "float64"]),  # the similarity dtypes (array_api_strict: no float16)
    row_offset=st.integers(0, 6),
    col_offset=st.integers(0, 6),
    exclude_self=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_similarity_keys_native_equals_array_api(shape, dtype, row_offset, col_offset, exclude_self, seed):
    """NumPy's own clip/copyto path (also CuPy's) against the generic array-API path."""
    levels = np.array([-np.inf, -1.5, -1.0, -0.0, 0.0, 0.3, 1.0, 1.0000002, 7.0, np.inf, np.nan])
    s = levels[rng(seed).integers(0, len(levels), size=shape)].astype(dtype)
    kw = {"row_offset": row_offset, "col_offset": col_offset, "exclude_self": exclude_self}
    native = _select.similarity_keys(s, **kw)
    generic = np.asarray(_select.similarity_keys(xps.asarray(s), **kw))
    assert native.dtype == s.dtype and native is not s
    np.testing.assert_array_equal(native, generic)
    np.testing.assert_array_equal(np.signbit(native), np.signbit(generic))  # -0.0 kept


def test_select_above_generic_and_offsets():
    s = np.array([[[1.0, 0.5, np.nan], [0.5, 1.0, 0.9]]])
    b, i, j, score = select_above(s, 0.5, row_offset=1, col_offset=0, batch_offset=4)
    assert list(zip(b.tolist(), i.tolist(), j.tolist(), score.tolist(), strict=True)) == [
        (4, 1, 0, 1.0), (4, 1, 1, 0.5), (4, 2, 0, 0.5), (4, 2, 1, 1.0), (4, 2, 2, 0.9)
    ]  # fmt: skip
    for offset, pairs in [(1, []), (0, [(0, 1), (1, 2)])]:
        for x in (s[0], xps.asarray(s[0])):
            got = select_above(x, 0.5, row_offset=offset, upper=True, exclude_self=True)
            assert list(zip(np.asarray(got[1]).tolist(), np.asarray(got[2]).tolist(), strict=True)) == pairs
    got = select_above(s[0], 0.5, upper=True)  # the diagonal stays without exclude_self
    assert list(zip(got[1].tolist(), got[2].tolist(), strict=True)) == [(0, 0), (0, 1), (1, 1), (1, 2)]


# ------------------------------------------------------------------ pairs_above


@pytest.mark.parametrize("chunks", [(-1, -1), (7, 9), ((20, 1, 12), (5, 30, 5))])
def test_pairs_above_matches_brute_force(chunks):
    a, b = rng(18).standard_normal((33, 5)), rng(19).standard_normal((40, 5))
    df = dcs.pairs_above(a, b, threshold=0.6, chunks=chunks)
    assert isinstance(df, dd_DataFrame()) and list(df.columns) == ["batch", "i", "j", "score"]
    got = df.compute().sort_values(["batch", "i", "j"]).reset_index(drop=True)
    ref = reference_pairs(reference_similarity(a, b), 0.6)
    pd.testing.assert_frame_equal(got[["batch", "i", "j"]], ref[["batch", "i", "j"]], check_dtype=False)
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-12)
    assert got.dtypes.to_dict() == {
        "batch": np.int64, "i": np.int64, "j": np.int64, "score": np.float64
    }  # fmt: skip
    nparts = len(dcs.core.prepare(a, b, chunks=chunks).plan.rows) * len(
        dcs.core.prepare(a, b, chunks=chunks).plan.cols
    )
    assert df.npartitions == nparts


def dd_DataFrame():
    import dask.dataframe as dd

    return dd.DataFrame


def test_pairs_above_threshold_equal_to_a_score_and_empty_result():
    """A pair is in when its score (README: Scores and ties) reaches the threshold: a pair
    exactly at it is in, for every chunking and BLAS kernel."""
    a = rng(20).standard_normal((3, 25, 6)).astype(np.float32)
    b = rng(21).standard_normal((3, 30, 6)).astype(np.float32)
    an, bn = normalize_rows(a, compute_dtype="float32"), normalize_rows(b, compute_dtype="float32")
    i, j = np.meshgrid(np.arange(25), np.arange(30), indexing="ij")
    S = np.stack([pair_scores(an[k], bn[k], i.ravel(), j.ravel()).reshape(25, 30) for k in range(3)])
    t = S[1, 4, 7]  # exactly a score: that pair must be kept
    for chunks in [(2, 10, 10), (3, 25, 30), (1, 7, 13)]:
        got = dcs.pairs_above(a, b, threshold=float(t), chunks=chunks).compute()
        assert got.score.dtype == np.float32
        assert ((got.batch == 1) & (got.i == 4) & (got.j == 7)).sum() == 1
        bb, ii, jj = np.nonzero(S >= float(t))
        assert sorted(zip(got.batch, got.i, got.j, strict=True)) == sorted(zip(bb, ii, jj, strict=True))
    empty = dcs.pairs_above(a, b, threshold=1.0, chunks=(2, 10, 10)).compute()
    assert len(empty) == 0 and list(empty.columns) == ["batch", "i", "j", "score"]
    assert empty.dtypes.to_dict() == {"batch": np.int64, "i": np.int64, "j": np.int64, "score": np.float32}


def test_pairs_above_nan_never_passes_and_exclude_self():
    a = rng(22).standard_normal((20, 4))
    a[3, 1] = np.nan
    a[5] = a[1]
    for b, chunks in [(None, (6, 6)), (None, (6, 4)), (a.copy(), (6, 4))]:
        got = dcs.pairs_above(a, b, threshold=-1.0, exclude_self=True, chunks=chunks).compute()
        assert not ((got.i == 3) | (got.j == 3)).any() and not (got.i == got.j).any()
        if b is None:  # each unordered pair once, i < j
            assert (got.i < got.j).all() and len(got) == 19 * 18 // 2
        else:
            assert len(got) == 19 * 18


def test_pairs_above_rejects_bad_threshold_and_is_lazy():
    with pytest.raises(ValueError, match=r"threshold: received NaN"):
        dcs.pairs_above(np.ones((3, 2)), threshold=float("nan"))
    with pytest.raises(TypeError, match=r"threshold: expected a real number, received '0.5'"):
        dcs.pairs_above(np.ones((3, 2)), threshold="0.5")
    for bad in (1.5, 90, float("inf"), -1.01, float("-inf")):  # similarities lie in [-1, 1]
        with pytest.raises(ValueError, match=r"threshold: expected a similarity in \[-1, 1\], received"):
            dcs.pairs_above(np.ones((3, 2)), threshold=bad)

    def boom(x):
        raise AssertionError("input was read at call time")

    a = da.ones((20, 4), chunks=(10, 4)).map_blocks(boom, dtype=float)
    df = dcs.pairs_above(a, np.ones((8, 4)), threshold=0.5, chunks=(10, 4))
    assert df.npartitions == 4
    assert any(key_prefix(k) == "cosine-pairs" for k in dict(df.__dask_graph__()))


def key_prefix(key):
    from dask.utils import key_split

    return key_split(key)


@pytest.mark.parametrize("device", ["cpu", "gpu"])  # empty: nothing runs, so no GPU is needed
@pytest.mark.parametrize("n, m", [(0, 4), (4, 0), (0, 0)])
def test_pairs_above_empty_input(device, n, m):
    df = dcs.pairs_above(np.ones((n, 3)), np.ones((m, 3)), threshold=0.1, device=device)
    assert len(df.compute()) == 0


# ------------------------------------------------------------------ the benchmark stays alive


def test_topk_benchmark_quick():
    import faiss  # noqa: F401 - the benchmark's baselines (the test extra has them)
    import sklearn  # noqa: F401

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_topk.py"), "--quick"],
        capture_output=True, text=True, timeout=180, check=True,
    ).stdout  # fmt: skip
    for key in ('"bench": "topk"', '"bench": "self_similarity"', '"bench": "memory"', "ratio_to_dense_limit"):
        assert key in out, out
    (machine,) = [row for row in map(json.loads, out.splitlines()) if row["bench"] == "machine"]
    assert machine["tokenize_hash"] in ("cityhash", "xxhash", "murmurhash", "sha1"), machine
    assert machine["blas"] and all(len(lib) == 3 for lib in machine["blas"]), machine
    (anatomy,) = [row for row in map(json.loads, out.splitlines()) if row["bench"] == "self_anatomy"]
    kinds = ("diagonal", "off_diagonal", "copy_pivot", "copy_pruned")
    assert set(anatomy["gemm_calls"]) == set(kinds) and min(anatomy["gemm_calls"].values()) > 0, anatomy
    assert anatomy["tasks_ratio"] > 0 and anatomy["gemm_ratio"] > 0, anatomy


def test_topk_benchmark_takes_the_width_and_size_asked_for():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_topk.py"), "--quick", "--part", "self"]
        + ["--n", "900", "--d", "48", "--repeat", "3"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    (row,) = [row for row in map(json.loads, out.splitlines()) if row["bench"] == "self_similarity"]
    assert row["shape"] == [900, 900, 48] and row["indices_identical_rows"] == 1.0, row
    assert len(row["speedup_rounds"]) == 3 and min(row["speedup_rounds"]) > 0, row  # one per round
    assert row["speedup_paired_median"] == sorted(row["speedup_rounds"])[1], row
