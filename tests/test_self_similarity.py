"""Self-similarity (b=None): only the block upper triangle runs a product; results equal b=a.copy()."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from dask.utils import key_split

import dask_cosim as dcs
from dask_cosim._compat import QUERY_PLANNING
from dask_cosim._triangle import transpose_block, upper_blocks, use_triangle
from dask_cosim.core import prepare
from dask_cosim.testing import count_task_prefixes, reference_cosine


def rng(seed):
    return np.random.default_rng(seed)


def tasks_by_prefix(*collections) -> dict[str, int]:
    """Tasks of the (unoptimised) graph by key prefix."""
    keys = set().union(*(dict(x.__dask_graph__()) for x in collections))
    counts: dict[str, int] = {}
    for key in keys:
        counts[key_split(key)] = counts.get(key_split(key), 0) + 1
    return counts


CASES = [
    ((45, 6), (10, 10)),  # 5 x 5 blocks, last one short
    ((3, 32, 5), (2, 8, 8)),  # batched: 2 batch blocks of 4 x 4
    ((40, 4), ((5, 15, 20), (5, 15, 20))),  # irregular square blocks
]


@pytest.mark.parametrize(("shape", "chunks"), CASES)
def test_similarity_triangle_equals_the_copy_path_with_half_the_products(shape, chunks):
    a = rng(0).standard_normal(shape)
    S_self = dcs.cosine_similarity(a, chunks=chunks)
    S_copy = dcs.cosine_similarity(a, a.copy(), chunks=chunks)
    assert S_self.chunks == S_copy.chunks and S_self.dtype == S_copy.dtype
    nb = len(S_self.chunks[-1])
    batches = len(S_self.chunks[0]) if len(shape) == 3 else 1
    assert tasks_by_prefix(S_copy)["cosine-block"] == batches * nb * nb
    assert tasks_by_prefix(S_self)["cosine-block"] == batches * nb * (nb + 1) // 2
    got, want = S_self.compute(), S_copy.compute()
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(got, reference_cosine(a), atol=1e-12)
    # symmetric: within rounding (a diagonal block's product need not be), exactly off the diagonal
    np.testing.assert_allclose(got, np.swapaxes(got, -1, -2), atol=1e-14, rtol=0)
    _assert_lower_blocks_are_transposes(got, S_self.chunks[-1])
    assert got.flags.c_contiguous


def _assert_lower_blocks_are_transposes(s, blocks) -> None:
    """Each block below the diagonal is bit for bit the transpose of its mirror (one product)."""
    edges = np.cumsum((0, *blocks))
    for i in range(len(blocks)):
        for j in range(i):
            rows, cols = slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1])
            np.testing.assert_array_equal(s[..., rows, cols], np.swapaxes(s[..., cols, rows], -1, -2))


@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-13), ("float32", 2e-6)])
def test_large_diagonal_blocks_are_symmetric_within_rounding(dtype, atol):
    """1500 x 1500 blocks: BLAS multiplies a diagonal block in panels, so S and S.T may differ
    in the last bits there (not off the diagonal: those blocks are transposes)."""
    a = rng(5).standard_normal((3000, 64)).astype(dtype)
    S = dcs.cosine_similarity(a, chunks=(1500, 1500))
    got = S.compute()
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, reference_cosine(a), atol=atol, rtol=0)
    np.testing.assert_allclose(got, got.T, atol=atol, rtol=0)
    _assert_lower_blocks_are_transposes(got, S.chunks[-1])


def test_similarity_triangle_blocks_below_the_diagonal_are_transposes():
    a = rng(1).standard_normal((30, 3)).astype(np.float32)
    S = dcs.cosine_similarity(a, chunks=(10, 10))
    with count_task_prefixes() as counts:
        # product (0, 2), transposed (query planning has no .blocks: the same block by slicing)
        block = (S[20:30, 0:10] if QUERY_PLANNING else S.blocks[2, 0]).compute(optimize_graph=False)
    assert counts["cosine-block"] == 1
    np.testing.assert_allclose(block, reference_cosine(a)[20:30, 0:10], atol=2e-6)
    assert block.dtype == np.float32


def test_triangle_only_for_square_self_similar_plans():
    a = rng(2).standard_normal((30, 3))
    assert use_triangle(prepare(a, chunks=(10, 10)))
    assert use_triangle(prepare(a, a, chunks=(10, 10)))  # b is a
    assert not use_triangle(prepare(a, a.copy(), chunks=(10, 10)))
    assert not use_triangle(prepare(a, chunks=(10, 15)))  # non-square blocks: full grid
    assert not use_triangle(prepare(a, chunks=(-1, -1)))  # a single block
    S = dcs.cosine_similarity(a, chunks=(10, 15))
    np.testing.assert_allclose(S.compute(), reference_cosine(a), atol=1e-12)


def test_upper_blocks_and_transpose_block():
    assert list(upper_blocks(1)) == [(0, 0)]
    assert len(list(upper_blocks(7))) == 28
    x = np.arange(24.0).reshape(2, 3, 4)
    t = transpose_block(x)
    assert t.shape == (2, 4, 3) and t.flags.c_contiguous
    np.testing.assert_array_equal(t, np.swapaxes(x, -1, -2))
    import array_api_strict as xps

    np.testing.assert_array_equal(np.asarray(transpose_block(xps.asarray(x))), np.swapaxes(x, -1, -2))


@pytest.fixture(params=["whole", "tiles"])
def diagonal_tiles(request, monkeypatch):
    """Diagonal blocks of the triangle as one product ("whole") or as the upper triangle of
    3-row tiles ("tiles", the path of blocks wider than ``DIAGONAL_TILE``)."""
    from dask_cosim import _select

    if request.param == "tiles":
        monkeypatch.setattr(_select, "DIAGONAL_TILE", 3)
    return request.param


@pytest.mark.parametrize(("shape", "chunks"), CASES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_triangle_equals_the_copy_path_with_half_the_products(
    shape, chunks, exclude_self, diagonal_tiles
):
    a = rng(3).standard_normal(shape)
    k = 7
    self_graph = dcs.topk(a, k=k, exclude_self=exclude_self, chunks=chunks)
    copy_graph = dcs.topk(a, a.copy(), k=k, exclude_self=exclude_self, chunks=chunks)
    nb = len(self_graph[0].chunks[-2])
    batches = len(self_graph[0].chunks[0]) if len(shape) == 3 else 1
    assert tasks_by_prefix(*copy_graph)["cosine-topk"] == batches * nb * nb
    assert tasks_by_prefix(*self_graph)["cosine-topk"] == batches * nb * (nb + 1) // 2
    vals, idx = dask.compute(*self_graph)
    vals_c, idx_c = dask.compute(*copy_graph)
    np.testing.assert_allclose(vals, vals_c, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(idx, idx_c)
    s = reference_cosine(a)
    if exclude_self:
        s = np.where(np.eye(s.shape[-1], dtype=bool), -np.inf, s)
    ref_idx = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(vals, np.take_along_axis(s, ref_idx, axis=-1), atol=1e-12)


def test_topk_triangle_with_ties_nan_and_zero_vectors(diagonal_tiles):
    a = rng(4).standard_normal((26, 4))
    a[[3, 17, 22]] = a[9]  # four identical vectors
    a[5] = 0.0
    a[11, 2] = np.nan
    for chunks in [(6, 6), (13, 13), (5, 5)]:
        vals, idx = dask.compute(*dcs.topk(a, k=6, exclude_self=True, chunks=chunks))
        assert list(idx[9, :3]) == [3, 17, 22] and list(idx[22, :3]) == [3, 9, 17]
        np.testing.assert_allclose(vals[9, :3], 1.0, atol=1e-12)
        assert np.isnan(vals[11]).all() and list(idx[11]) == [0, 1, 2, 3, 4, 5]
        assert (vals[5] == 0).all() and list(idx[5]) == [0, 1, 2, 3, 4, 6]
        assert 11 not in idx[np.arange(26) != 11]
        assert (vals[9, :3] == vals[9, 0]).all()  # exact duplicates tie exactly
        vals_c, idx_c = dask.compute(*dcs.topk(a, a.copy(), k=6, exclude_self=True, chunks=chunks))
        np.testing.assert_array_equal(idx, idx_c)  # the same bits as the copy path (any BLAS)
        np.testing.assert_array_equal(vals, vals_c)


def test_topk_triangle_runs_every_diagonal_block_before_any_other():
    """The diagonal parts prune every other block: on the threaded scheduler no off-diagonal
    task starts before the last diagonal one has finished (a barrier task, not dask.order)."""
    from dask.callbacks import Callback

    events = []

    class Record(Callback):
        def _pretask(self, key, dsk, state):
            events.append(("start", key))

        def _posttask(self, key, result, dsk, state, worker_id):
            events.append(("end", key))

    a = rng(6).standard_normal((60, 5))
    vals, idx = dcs.topk(a, k=4, chunks=(10, 10))
    with Record():
        dask.compute(vals, idx, scheduler="threads", num_workers=2)
    blocks = [(ev, key) for ev, key in events if isinstance(key, tuple) and key_split(key) == "cosine-topk"]
    last_diagonal_end = max(n for n, (ev, key) in enumerate(blocks) if ev == "end" and key[-1] == key[-2])
    first_other_start = min(n for n, (ev, key) in enumerate(blocks) if ev == "start" and key[-1] != key[-2])
    assert len(blocks) == 2 * 21 and last_diagonal_end < first_other_start


@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairs_above_self_similarity_reports_each_pair_once(exclude_self):
    a = rng(5).standard_normal((2, 30, 3))
    df = dcs.pairs_above(a, threshold=0.5, exclude_self=exclude_self, chunks=(1, 10, 10))
    assert df.npartitions == 2 * 6  # upper blocks only
    got = df.compute().sort_values(["batch", "i", "j"]).reset_index(drop=True)
    s = reference_cosine(a)
    n = a.shape[1]
    keep = (s >= 0.5) & (np.arange(n)[None, :] > np.arange(n)[:, None] - (0 if exclude_self else 1))
    b, i, j = np.nonzero(keep)
    assert got.batch.tolist() == b.tolist() and got.i.tolist() == i.tolist() and got.j.tolist() == j.tolist()
    np.testing.assert_allclose(got.score, s[keep], atol=1e-12)
    assert (got.i <= got.j).all() and ((got.i == got.j).any() != exclude_self)
    # the rectangular fallback (non-square blocks) reports the same pairs
    rect = dcs.pairs_above(a, threshold=0.5, exclude_self=exclude_self, chunks=(1, 10, 15)).compute()
    rect = rect.sort_values(["batch", "i", "j"]).reset_index(drop=True)
    assert rect[["batch", "i", "j"]].equals(got[["batch", "i", "j"]])
