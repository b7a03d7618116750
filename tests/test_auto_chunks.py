"""``chunks="auto"``: output blocks near dask's ``array.chunk-size``, regular, enough for the cores.

Checked through the public API (the graph's chunks, nothing computed) for a grid of
shapes, dtypes, targets and core counts, plus one computed run against scikit-learn.
"""

from __future__ import annotations

import math

import dask
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

import dask_cosim as dcs
from dask_cosim import core
from dask_cosim._sizing import TASKS_PER_CORE
from dask_cosim.core import prepare

from ._graphs import copy_of, npartitions

MiB = 2**20


def lazy(shape, dtype="float32"):
    """A dask input of that shape: nothing is generated, only the graph is planned."""
    import dask.array as da

    return da.zeros(shape, dtype=dtype, chunks=shape)


def regular(blocks: tuple[int, ...]) -> bool:
    """All blocks equal but a smaller last one (what zarr can store as one chunk size)."""
    return all(c == blocks[0] for c in blocks[:-1]) and blocks[-1] <= blocks[0]


SHAPES = [
    # (batch, N, M, D)
    (16, 2048, 2048, 256),
    (100, 400, 500, 200),
    (1, 50_000, 50_000, 128),
    (1, 16_384, 6000, 64),
    (3, 100_000, 700, 32),
    (7, 300, 90_000, 16),
    (1, 1_000_000, 1_000_000, 768),
]


@pytest.mark.parametrize("cores", [2, 8])
@pytest.mark.parametrize("target_mib", [1, 16, 128])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_auto_blocks_follow_chunk_size(monkeypatch, shape, dtype, target_mib, cores):
    monkeypatch.setattr(core, "_cores", lambda: cores)
    batch, n, m, d = shape
    item = np.dtype(dtype).itemsize
    target = target_mib * MiB
    # the task-count cap (cosine.max-blocks) is tested on its own: out of the way here
    config = {"array.chunk-size": f"{target_mib}MiB", "cosine.max-task-memory": "64GiB"}
    config["cosine.max-blocks"] = 2**40
    with dask.config.set(config):
        S = dcs.cosine_similarity(lazy((batch, n, d), dtype), lazy((batch, m, d), dtype))
        p = prepare(lazy((batch, n, d), dtype), lazy((batch, m, d), dtype))
    bc, nc, mc = (max(c) for c in S.chunks)
    block_bytes = bc * nc * mc * item
    total_bytes = batch * n * m * item

    # covers the output, regular blocks on every axis
    assert tuple(sum(c) for c in S.chunks) == (batch, n, m)
    assert all(regular(c) for c in S.chunks), S.chunks
    # D is never split: one chunk over D for both normalised inputs
    assert p.an.chunks[-1] == (d,) and p.bn.chunks[-1] == (d,)
    # never above the target (an input block of rows x D must fit it too)
    assert block_bytes <= target, (S.chunks, block_bytes)
    assert nc * d * item <= target and mc * d * item <= target
    # and not needlessly small: near the target when the output is big; when it is smaller,
    # split into TASKS_PER_CORE blocks per core, but never into blocks below 256 x 256
    input_cap = target // (d * item)  # rows of one input block that fit the target
    min_blocks = TASKS_PER_CORE * cores
    if total_bytes >= min_blocks * target:
        assert block_bytes >= target / 4 or max(nc, mc) > input_cap // 2, (S.chunks, block_bytes)
        assert npartitions(S) >= min_blocks
    else:
        assert bc * nc * mc <= max(math.ceil(batch * n * m / min_blocks), 256 * 256), S.chunks
        floor = min(target, total_bytes / min_blocks, 256 * 256 * item)
        assert block_bytes >= floor / 4, (S.chunks, block_bytes)


@pytest.mark.parametrize("cores", [2, 8])
@pytest.mark.parametrize("n, d", [(2048, 256), (50_000, 128), (7, 3), (100_001, 64)])
def test_self_similarity_auto_blocks_are_square(monkeypatch, cores, n, d):
    monkeypatch.setattr(core, "_cores", lambda: cores)
    with dask.config.set({"array.chunk-size": "8MiB"}):
        S = dcs.cosine_similarity(lazy((n, d)))
    assert S.chunks[0] == S.chunks[1] and regular(S.chunks[0])
    assert max(S.chunks[0]) ** 2 * 4 <= 8 * MiB


def test_auto_blocks_grow_with_chunk_size(monkeypatch):
    monkeypatch.setattr(core, "_cores", lambda: 2)
    a, b = lazy((1, 40_000, 64)), lazy((1, 30_000, 64))
    sizes = []
    for target in ("1MiB", "16MiB", "256MiB"):
        with dask.config.set({"array.chunk-size": target}):
            S = dcs.cosine_similarity(a, b)
        sizes.append((npartitions(S), max(S.chunks[1]) * max(S.chunks[2])))
    blocks, elems = zip(*sizes, strict=True)
    assert blocks[0] > blocks[1] > blocks[2] and elems[0] < elems[1] < elems[2]


def test_known_plans(monkeypatch):
    """The plans quoted in the docs and benchmarks (2 cores, dask's default 128 MiB)."""
    monkeypatch.setattr(core, "_cores", lambda: 2)
    with dask.config.set({"array.chunk-size": "128MiB"}):
        w2 = dcs.cosine_similarity(lazy((16, 2048, 256)), lazy((16, 2048, 256)))
        w1 = dcs.cosine_similarity(lazy((100, 400, 200), "float64"), lazy((100, 500, 200), "float64"))
        big = dcs.cosine_similarity(lazy((16_384, 64)), lazy((16_384, 64)))
    # small outputs: TASKS_PER_CORE blocks per core
    assert w2.chunks == ((2,) * 8, (2048,), (2048,))
    assert w1.chunks == ((10,) * 10, (400,), (500,))  # 10 x 10: both cores finish together (not 12 x 8 + 4)
    assert big.chunks == ((5462, 5462, 5460),) * 2  # 16384 evened out, no sliver


@pytest.mark.parametrize("cores", [2, 3, 8])
def test_auto_batch_blocks_let_the_cores_finish_together(cores):
    """Few batch blocks: a split whose last round leaves cores idle takes a few more blocks."""
    from dask_cosim._plan import _makespan, plan_blocks

    improved = 0
    for batch in range(1, 130):
        kw = {"min_blocks": TASKS_PER_CORE * cores}
        plain = plan_blocks(batch, 400, 500, 200, **kw)
        even = plan_blocks(batch, 400, 500, 200, parallel=cores, **kw)
        assert sum(even.batch) == batch and regular(even.batch), even.batch
        assert (max(plain.batch) + 1) // 2 <= max(even.batch) <= max(plain.batch)  # at most halved
        before, after = _makespan(plain.batch, 1, cores), _makespan(even.batch, 1, cores)
        assert after <= before, (batch, plain.batch, even.batch)
        improved += after < before
    assert improved > 10


@pytest.mark.parametrize("cores", [2, 16])
def test_blocks_left_on_the_gpu_are_gpu_sized_and_not_split_for_the_host_cores(monkeypatch, cores):
    """like="cupy": blocks near cosine.gpu-block-bytes (not array.chunk-size), however many
    host cores there are; host output (like="numpy", also on a GPU) keeps several blocks per core."""
    monkeypatch.setattr(core, "_cores", lambda: cores)
    big, w2 = lazy((16_384, 1024)), lazy((16, 2048, 256))
    with dask.config.set({"array.chunk-size": "128MiB"}):
        on_gpu = dcs.cosine_similarity(big, copy_of(big), device="gpu", like="cupy")
        to_host = dcs.cosine_similarity(big, copy_of(big), device="gpu")
        w2_on_gpu = dcs.cosine_similarity(w2, copy_of(w2), device="gpu", like="cupy")
        with dask.config.set({"cosine.gpu-block-bytes": "256MiB"}):
            quarter = dcs.cosine_similarity(big, copy_of(big), device="gpu", like="cupy")
    assert npartitions(on_gpu) == 1 and npartitions(w2_on_gpu) == 1  # 1 GiB and 268 MB
    block = max(quarter.chunks[0]) * max(quarter.chunks[1]) * 4
    assert 128 * MiB < block <= 256 * MiB and npartitions(quarter) == 4, quarter.chunks
    assert npartitions(to_host) >= min(TASKS_PER_CORE * cores, 16)
    assert max(to_host.chunks[0]) * max(to_host.chunks[1]) * 4 <= 128 * MiB


def test_explicit_axes_are_kept_and_auto_fills_the_rest(monkeypatch):
    monkeypatch.setattr(core, "_cores", lambda: 2)
    with dask.config.set({"array.chunk-size": "4MiB"}):
        S = dcs.cosine_similarity(lazy((4, 10_000, 32)), lazy((4, 9_000, 32)), chunks=(1, 1000, "auto"))
    assert S.chunks[:2] == ((1,) * 4, (1000,) * 10)
    assert regular(S.chunks[2]) and 1000 * max(S.chunks[2]) * 4 <= 4 * MiB


@pytest.mark.parametrize("dtype, atol", [("float32", 3e-6), ("float64", 1e-12)])
def test_auto_blocks_compute_the_right_values(dtype, atol):
    """Many auto blocks (tiny chunk-size), ragged last ones, compared with scikit-learn."""
    gen = np.random.default_rng(3)
    a = gen.standard_normal((3, 301, 17)).astype(dtype)
    b = gen.standard_normal((3, 257, 17)).astype(dtype)
    with dask.config.set({"array.chunk-size": "64KiB"}):
        S = dcs.cosine_similarity(a, b)
    assert npartitions(S) >= 6 and all(regular(c) for c in S.chunks)
    ref = np.stack([sk_cosine(a[k].astype(np.float64), b[k].astype(np.float64)) for k in range(3)])
    np.testing.assert_allclose(S.compute(), ref, rtol=0, atol=atol)
