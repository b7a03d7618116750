"""Cluster scale: the sizing policy's plans, ``dcs.plan`` / ``--plan``, and top-k jobs that
keep their progress across an interruption."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim import _topk_store, _triangle, reductions
from dask_cosim._compat import QUERY_PLANNING
from dask_cosim._plan import PlanError, task_memory
from dask_cosim._select import NAN_KEY
from dask_cosim._sizing import (
    MIN_TASK_FLOPS,
    MIN_TRIANGLE_BLOCKS,
    REDUCTION_TASKS_PER_CORE,
    TASKS_PER_CORE,
    Job,
    Settings,
    plan_job,
    regular_sizes,
)
from dask_cosim.io import ResumeMismatchError

from .test_reductions import assert_topk, reference_similarity

REPO = Path(__file__).resolve().parents[1]


def lazy(n, d, chunk=100_000):
    return da.zeros((n, d), dtype="float32", chunks=(chunk, d))


# ------------------------------------------------------------------ graphs that stay small


def test_known_large_jobs_have_small_graphs():
    """The issue's targets, measured on lazy inputs without computing anything."""
    knn = dcs.plan(lazy(10**6, 128), op="topk", k=10, exclude_self=True)
    assert knn.graph_tasks <= 5000 and knn.total_tasks <= 5000, knn
    assert knn.flops_per_task >= MIN_TASK_FLOPS  # tasks carry real work
    huge = dcs.plan(lazy(10**7, 256), op="topk", k=10, exclude_self=True)
    assert huge.graph_tasks <= 50_000 and huge.total_tasks <= 50_000, huge
    assert huge.plan.task_bytes <= huge.plan.budget_bytes
    pairs = dcs.plan(lazy(10**6, 128), op="pairs", threshold=0.9)
    assert pairs.tasks["cosine-pairs"] <= 5000, pairs
    full = dcs.plan(lazy(10**6, 128))
    assert full.total_tasks <= 40_000, full


def test_plan_counts_match_the_graph_and_read_well():
    a = lazy(200_000, 64, chunk=50_000)
    p = dcs.plan(a, op="topk", k=10, exclude_self=True)
    nb = len(p.plan.rows)
    assert p.self_similar and p.plan.rows == p.plan.cols
    assert p.tasks["cosine-topk"] == p.computed_blocks == nb * (nb + 1) // 2
    assert p.write_tasks == nb * nb  # one checkpointed link per part
    text = repr(p)
    for words in (
        "topk",
        "blocks: batch 1 x 1",
        f"N {nb} x {p.plan.rows[0]}",
        "per task",
        "budget",
        "scheduler",
    ):
        assert words in text, text
    rect = dcs.plan(a, lazy(100_000, 64), op="topk", k=5)
    assert rect.tasks["cosine-topk"] == len(rect.plan.rows) * len(rect.plan.cols) == rect.computed_blocks
    assert rect.write_tasks == len(rect.plan.rows) * len(rect.plan.cols)  # one link per part
    with pytest.raises(ValueError, match="op: expected"):
        dcs.plan(a, op="neighbours")


def test_max_blocks_bounds_the_task_count_and_grows_blocks():
    a = lazy(400_000, 64)
    small = dcs.plan(a, op="topk", k=5)
    with dask.config.set({"cosine.max-blocks": 100, "cosine.task-flops": 1e8}):
        capped = dcs.plan(a, op="topk", k=5)
    assert capped.computed_blocks <= 100 * 1.3 < small.computed_blocks * 4
    with dask.config.set({"cosine.task-flops": 1e8}):
        uncapped = dcs.plan(a, op="topk", k=5)
    assert uncapped.computed_blocks > capped.computed_blocks
    with pytest.raises(ValueError, match="cosine.max-blocks"), dask.config.set({"cosine.max-blocks": 0}):
        dcs.plan(a)
    with pytest.raises(ValueError, match="cosine.task-flops"), dask.config.set({"cosine.task-flops": "x"}):
        dcs.plan(a, op="topk")


@settings(max_examples=150, deadline=None)
@given(
    op=st.sampled_from(["similarity", "topk", "pairs"]),
    batch=st.integers(1, 8),
    n=st.integers(1, 10**7),
    m=st.integers(1, 10**7),
    dim=st.integers(1, 4096),
    itemsize=st.sampled_from([4, 8]),
    square=st.booleans(),
    cores=st.sampled_from([1, 2, 16, 512]),
    budget=st.sampled_from([2**28, 2**30, 2**32]),
    grain=st.sampled_from([None, 1000, 100_000]),
)
def test_auto_plans_fit_stay_bounded_and_keep_cores_busy(
    op, batch, n, m, dim, itemsize, square, cores, budget, grain
):
    """For any job: the plan fits the budget (or it is refused only when one vector cannot
    fit), blocks are regular, large jobs stay near cosine.max-blocks product tasks unless
    memory binds, and a job big enough to split gives every thread several tasks."""
    if square:
        m = n
    job = Job(
        op, batch, n, m, dim, in_itemsize=itemsize, compute_itemsize=itemsize, out_itemsize=itemsize,
        self_similar=square, k=10 if op == "topk" else None, grains=(grain, grain), cores=cores,
    )  # fmt: skip
    cfg = Settings(budget_bytes=budget, max_blocks=8192)
    try:
        plan = plan_job(job, cfg)
    except PlanError:
        one = task_memory(
            1, 1, 1, dim, in_itemsize=itemsize, compute_itemsize=itemsize, out_itemsize=itemsize
        )
        assert one > budget // 64  # only absurd D for the budget is refused
        return
    assert plan.task_bytes <= budget
    assert sum(plan.batch) == batch and sum(plan.rows) == n and sum(plan.cols) == m
    assert regular_sizes(plan, batched=True) is None
    nb_r, nb_c, nb_b = len(plan.rows), len(plan.cols), len(plan.batch)
    products = nb_b * (nb_r * (nb_r + 1) // 2 if square and op != "similarity" else nb_r * nb_c)
    if products > 8192 * 4 + nb_b * (nb_r + nb_c):  # more tasks than the cap only when memory binds
        held = max(plan.batch) * max(plan.rows) * max(plan.cols) * itemsize * 4  # a stored block of S
        assert plan.task_bytes >= budget / 8 or (op == "similarity" and held >= budget / 2), plan.chunks
    total = batch * n * m
    per_core = REDUCTION_TASKS_PER_CORE if op != "similarity" else TASKS_PER_CORE
    if total >= per_core * cores * 4096**2 and n >= 4096 and m >= 4096 and 2 <= cores <= 16 and not square:
        assert nb_b * nb_r * nb_c >= min(per_core * cores, 8192) / 4, plan.chunks


def test_small_jobs_split_across_cores_and_big_jobs_grow_tasks(monkeypatch):
    import dask_cosim.core as core

    monkeypatch.setattr(core, "_cores", lambda: 2)
    w3 = dcs.plan(np.zeros((50_000, 128), "f4"), np.zeros((50_000, 128), "f4"), op="topk")
    assert w3.computed_blocks >= 2 * REDUCTION_TASKS_PER_CORE
    tiny = dcs.plan(np.zeros((20_000, 64), "f4"), op="topk", k=10)
    assert tiny.flops_per_task >= MIN_TASK_FLOPS / 4  # no splitting into pure overhead
    big = dcs.plan(lazy(10**6, 128), op="topk", k=10)
    assert big.flops_per_task >= 0.5 * dask.config.get("cosine.task-flops")


def test_rows_snap_to_the_input_chunks():
    from dask_cosim._plan import _snap

    assert _snap(14_000, 10**6, 100_000) == 14285  # a divisor of the chunk
    assert _snap(78_000, 10**6, 100_000) == 100_000  # one chunk
    assert _snap(260_000, 10**6, 100_000) == 300_000  # three chunks
    assert _snap(260_000, 10**6, 100_000, limit=250_000) == 200_000  # never above what memory allows
    assert dcs.plan(lazy(10**6, 128), op="topk").plan.rows[0] in (20_000, 25_000, 100_000 // 3)


# ------------------------------------------------------------------ --plan on the command line


def test_cli_plan_prints_the_plan_and_computes_nothing(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3000, 16), dtype="float32"))
    out = tmp_path / "knn.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dask_cosim", "run", str(tmp_path / "a.npy"), "-o", str(out)]
    done = subprocess.run(
        [*cmd, "--topk", "5", "--exclude-self", "--plan"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "dask_cosim plan: topk" in done.stdout and "per task" in done.stdout
    assert done.stderr == "" and not out.exists()
    bad = subprocess.run(
        [*cmd, "--topk", "5000", "--plan"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "k:" in bad.stderr  # the plan is checked like a run


# ------------------------------------------------------------------ top-k jobs keep their progress


class Interrupt(Exception):
    pass


_REAL_RUN_LINK = _topk_store.run_link
_LINK_CALLS: list = []
_LINK_LIMIT = [0]


def _failing_link(where, prev, *parts):
    """``run_link`` until ``_LINK_LIMIT`` links have run, then fail (as if killed there).

    Module-level so that an in-process cluster unpickles it by reference (one counter)."""
    _LINK_CALLS.append(where.panel)
    if len(_LINK_CALLS) > _LINK_LIMIT[0]:
        raise Interrupt("stopped")
    return _REAL_RUN_LINK(where, prev, *parts)


def _chunk_mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("c/*") if p.is_file()}


def _blocks_still_needed(done, links, nb_rows, nb_cols, triangle) -> int:
    """Block tasks a resumed job must run, from the stored markers (2-D output)."""
    need = set()
    for j in range(nb_rows):
        if not done[j]:  # panel j still merges the parts of its chain's columns from links[j] on
            chain = [j, *(x for x in range(nb_cols) if x != j)] if triangle else range(nb_cols)
            need.update((min(j, x), max(j, x)) if triangle else (j, x) for x in chain[int(links[j]) :])
    # in the triangle, an off-diagonal block is pruned by the stored state of a panel that
    # saved anything (its diagonal part is merged first), else by that panel's diagonal
    # block, which the panel's own chain then still needs: nothing more to run
    if not triangle:  # the other column blocks are pruned by the first one
        need |= {(i, 0) for i, j in need}
    return len(need)


@pytest.mark.parametrize("self_similar", [True, False])
def test_interrupted_topk_job_resumes_from_its_checkpoints(tmp_path, monkeypatch, self_similar):
    """Interrupted on a cluster (priorities: panels finish in order), the resumed job runs
    only the blocks whose parts some panel still needs, leaves finished panels untouched,
    and equals brute force."""
    from distributed import Client, LocalCluster

    gen = np.random.default_rng(7)
    a = gen.standard_normal((1200, 12))
    b = None if self_similar else gen.standard_normal((900, 12))
    out, k, chunks = tmp_path / "knn.zarr", 4, (150, 150)

    def result():
        return dcs.topk(a, b, k=k, exclude_self=self_similar, chunks=chunks)

    want_vals, want_idx = dask.compute(*result(), scheduler="sync")
    _LINK_CALLS.clear()
    _LINK_LIMIT[0] = 30
    monkeypatch.setattr(_topk_store, "run_link", _failing_link)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster),
        pytest.raises(Interrupt),
    ):
        dcs.to_zarr(result(), out)
    monkeypatch.setattr(_topk_store, "run_link", _REAL_RUN_LINK)
    group = zarr.open_group(out)
    done_before = group["_blocks_done"][...].astype(bool)
    links_before = group[_topk_store.LINKS][...]
    assert links_before.sum() + done_before.sum() >= _LINK_LIMIT[0]  # every merged part was saved
    kept = _chunk_mtimes(out / "values")
    nb_rows, nb_cols = len(result()[0].chunks[0]), math.ceil((900 if b is not None else 1200) / 150)
    needed = _blocks_still_needed(done_before, links_before, nb_rows, nb_cols, self_similar)
    blocks = []  # the block kernels the resumed job runs
    for module in (_triangle, reductions):
        real_block = module.topk_block
        monkeypatch.setattr(
            module, "topk_block", lambda *a, _f=real_block, **kw: blocks.append(1) or _f(*a, **kw)
        )
    with dask.config.set(scheduler="sync"):
        report = dcs.to_zarr(result(), out, resume=True)
    assert report.blocks_skipped == done_before.sum() and report.blocks_written == (~done_before).sum()
    full = nb_rows * (nb_rows + 1) // 2 if self_similar else nb_rows * nb_cols
    assert len(blocks) == needed < full
    # the summary counts the products of the blocks that ran (150 x 150 each), not the panels'
    assert report.products == len(blocks) * 150 * 150 <= report.pairs
    reused = bool((links_before[~done_before] > 0).any())  # parts of unfinished panels saved
    fewer = report.products < report.pairs  # the triangle, or saved parts not computed again
    said = "(one triangle of blocks, the rest" if self_similar else "(the rest"
    assert (f"{said} saved by the interrupted run)" in report.summary()) == (reused and fewer)
    assert fewer if self_similar else fewer <= reused
    assert report.summary().count("self-similarity") == self_similar
    after = _chunk_mtimes(out / "values")  # finished panels were not written again
    for name, t in kept.items():
        if done_before[int(name.split("/")[1])]:
            assert after[name] == t, name
    group = zarr.open_group(out)
    assert group.attrs["dask_cosim"]["complete"]
    assert _topk_store.LINKS not in set(group.array_keys())  # checkpoints dropped once complete
    assert_topk(group["values"][...], group["indices"][...], reference_similarity(a, b), k,
                exclude_self=self_similar, atol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(group["indices"][...], want_idx)
    np.testing.assert_array_equal(group["values"][...], want_vals)


def _interrupted_self_topk(result, out, limit: int, monkeypatch):
    """The uninterrupted ``(values, indices)`` of ``result()``, then ``to_zarr`` of it into
    ``out`` on the synchronous scheduler, interrupted after ``limit`` links."""
    want = dask.compute(*result(), scheduler="sync")
    _LINK_CALLS.clear()
    _LINK_LIMIT[0] = limit
    monkeypatch.setattr(_topk_store, "run_link", _failing_link)
    with dask.config.set(scheduler="sync"), pytest.raises(Interrupt):
        dcs.to_zarr(result(), out)
    monkeypatch.setattr(_topk_store, "run_link", _REAL_RUN_LINK)
    return want


@pytest.mark.parametrize("limit", [3, 9, 20])
def test_resumed_triangle_prunes_by_stored_state_with_nan_and_zero_vectors(tmp_path, monkeypatch, limit):
    """Interrupted after ``limit`` links (the diagonal parts saved; then some off-diagonal
    links, then whole panels), a resumed self-similarity runs no diagonal block of a panel
    that saved anything, prunes by the stored state (NaN rows and a zero vector included),
    and gives the uninterrupted result bit for bit."""
    gen = np.random.default_rng(11)
    a = gen.standard_normal((600, 6))
    a[450] = np.nan  # a NaN row and a zero vector in panels that finish before the
    a[330] = 0.0  # interruption at limit=20 (their outputs then prune the others)
    a[400:404] = a[10]  # exact copies: ties broken by the smaller index
    out, k = tmp_path / "knn.zarr", 5

    def result():
        return dcs.topk(a, k=k, exclude_self=True, chunks=(100, 100))

    want_vals, want_idx = _interrupted_self_topk(result, out, limit, monkeypatch)
    group = zarr.open_group(out)
    done, links = group["_blocks_done"][...].astype(bool), group[_topk_store.LINKS][...]
    saved = done | (links > 0)
    diagonals = []
    real_block = _triangle.topk_block
    monkeypatch.setattr(
        _triangle,
        "topk_block",
        lambda an, bn, *, _f=real_block, **kw: (
            (kw.get("symmetric") and diagonals.append(kw["row_offset"] // 100)) or _f(an, bn, **kw)
        ),
    )
    with dask.config.set(scheduler="sync"):
        dcs.to_zarr(result(), out, resume=True)
    assert sorted(diagonals) == [i for i in range(6) if not saved[i]]
    group = zarr.open_group(out)
    np.testing.assert_array_equal(group["indices"][...], want_idx)
    np.testing.assert_array_equal(group["values"][...], want_vals)


@pytest.mark.parametrize("limit", [7, 15])
def test_resumed_batched_triangle_equals_uninterrupted(tmp_path, monkeypatch, limit):
    """The same for a batch of self-similarities: panels are (batch block, row block)."""
    a = np.random.default_rng(13).standard_normal((3, 300, 5))
    a[1, 150] = np.nan
    a[2, 10:13] = a[2, 200]
    out = tmp_path / "knn.zarr"

    def result():
        return dcs.topk(a, k=4, exclude_self=True, chunks=(1, 100, 100))

    want_vals, want_idx = _interrupted_self_topk(result, out, limit, monkeypatch)
    assert zarr.open_group(out)[_topk_store.LINKS][...].sum() > 0
    blocks = []  # the upper blocks the resumed job runs, one batch element each
    real_block = _triangle.topk_block
    monkeypatch.setattr(
        _triangle, "topk_block", lambda *a, _f=real_block, **kw: blocks.append(1) or _f(*a, **kw)
    )
    with dask.config.set(scheduler="sync"):
        report = dcs.to_zarr(result(), out, resume=True)
    assert report.products == len(blocks) * 100 * 100 < report.pairs
    group = zarr.open_group(out)
    np.testing.assert_array_equal(group["indices"][...], want_idx)
    np.testing.assert_array_equal(group["values"][...], want_vals)


def test_resume_refuses_a_store_whose_links_were_saved_in_another_order(tmp_path):
    """A triangle top-k store records its links' order: one saved without it (an earlier
    release merged each panel's diagonal part in column order) is not resumed in this one."""
    a = np.random.default_rng(12).standard_normal((300, 4))
    out = tmp_path / "knn.zarr"
    dcs.to_zarr(dcs.topk(a, k=3, chunks=(100, 100)), out)
    group = zarr.open_group(out)
    info = dict(group.attrs["dask_cosim"])
    assert info["layout"]["topk_links"] == "diagonal-first"
    del info["layout"]["topk_links"]
    group.attrs["dask_cosim"] = info
    with pytest.raises(ResumeMismatchError, match="topk_links: stored None, now 'diagonal-first'"):
        dcs.to_zarr(dcs.topk(a, k=3, chunks=(100, 100)), out, resume=True)


def test_stored_pivot_reads_the_last_slot_or_the_final_output():
    state = (np.zeros((2, 4, 3), np.float32), np.zeros((2, 4, 3), np.int64))
    state[0][1, 2:4] = [[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]]
    state[1][1, 2:4] = [[1, 2, 3], [4, 5, 6]]
    outputs = (
        np.array([[0.9, np.nan, np.nan], [0.3, 0.2, 0.1]], np.float32),
        np.array([[7, 0, -1], [1, 2, 3]]),
    )
    regions = (slice(2, 4), slice(0, 3))
    keys, idx = _topk_store.stored_pivot(_topk_store.StoredPivot(state, outputs, regions, 2, False, "x"))
    np.testing.assert_array_equal(keys, state[0][1, 2:4])  # link count 2: slot (2 - 1) % 2
    np.testing.assert_array_equal(idx, state[1][1, 2:4])
    finished = _topk_store.StoredPivot(state, outputs, (slice(0, 2), slice(0, 3)), 0, True, "x")
    keys, idx = _topk_store.stored_pivot(finished)
    np.testing.assert_array_equal(keys, np.array([[0.9, NAN_KEY, NAN_KEY], [0.3, 0.2, 0.1]], np.float32))
    assert keys.dtype == np.float32
    np.testing.assert_array_equal(idx, outputs[1])


def test_link_checkpoints_survive_a_crash_between_state_and_marker(tmp_path, monkeypatch):
    """A link that wrote its state slot but not its link count is merged again from the
    previous slot (two slots): no part is merged twice, none lost."""
    gen = np.random.default_rng(3)
    a = gen.standard_normal((600, 8))
    out = tmp_path / "knn.zarr"

    def result():
        return dcs.topk(a, k=3, chunks=(100, 100))

    real = _topk_store.run_link
    crashed = []

    class HalfWritten:  # wraps the link-count array: the state is written, the count is not
        def __init__(self, arr):
            self.arr = arr

        def __setitem__(self, region, value):
            crashed.append(region)
            raise Interrupt("killed between the state slot and the link count")

    def crash_on_third(where, prev, *parts):
        if where.link == 2 and not crashed:
            where.links = HalfWritten(where.links)
        return real(where, prev, *parts)

    monkeypatch.setattr(_topk_store, "run_link", crash_on_third)
    with pytest.raises(Interrupt), dask.config.set(scheduler="sync"):
        dcs.to_zarr(result(), out)
    monkeypatch.setattr(_topk_store, "run_link", real)
    with dask.config.set(scheduler="sync"):
        dcs.to_zarr(result(), out, resume=True)
    group = zarr.open_group(out)
    assert_topk(group["values"][...], group["indices"][...], reference_similarity(a), 3, atol=1e-12)


def test_topk_block_tasks_are_prioritised_by_upper_row_then_column():
    from dask_cosim._topk_store import links_of, priority_of

    tri, rect = priority_of(True, 10), priority_of(False, 10)
    assert tri(("cosine-topk-x", 2, 5)) == tri(("cosine-topk-x", 5, 2))  # one block, either key
    assert tri(("cosine-topk-x", 7, 7)) == 0 > tri(("cosine-topk-x", 0, 1))  # pivots first
    upper = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    by_priority = sorted(upper, key=lambda b: -tri(("cosine-topk-x", *b)))
    assert by_priority == upper  # row by row, each row by column, no ties left to dask:
    assert len({tri(("cosine-topk-x", *b)) for b in upper}) == len(upper)
    for panel in range(10):  # so each panel's links come in the order its blocks finish
        blocks = [tuple(sorted((panel, j))) for [j] in links_of(10, diagonal=panel)[1:]]
        assert blocks == sorted(blocks, key=by_priority.index)
    batched = [tri(("cosine-topk-x", b, i, j)) for b in (0, 1) for i, j in [(0, 0), (0, 1), (8, 9)]]
    assert batched == sorted(batched, reverse=True)  # batch blocks in turn, each diagonal first
    assert rect(("cosine-topk-x", 5, 0)) > rect(("cosine-topk-x", 5, 1)) > rect(("cosine-topk-x", 6, 0))
    assert rect(("cosine-topk-x", 0, 9, 3)) > rect(("cosine-topk-x", 1, 0, 0))
    huge = priority_of(True, 100_000)  # 10^4 batch blocks of 10^5 panels: still an int64
    assert -(2**63) < huge(("cosine-topk-x", 9_999, 99_998, 99_999)) < huge(("cosine-topk-x", 9_999, 0, 1))
    assert tri(("cosine-normalize-x", 0)) == 0
    vals, _ = dcs.topk(np.ones((600, 4)), k=2, chunks=(100, 100))
    if not QUERY_PLANNING:
        layer = next(
            v
            for name, v in vals.dask.layers.items()
            if name.startswith("cosine-topk-") and "merge" not in name
        )
        assert callable(layer.annotations["priority"])
        return
    # array expressions carry no annotations: a written top-k's graph sets them by key
    from dask_cosim._compat import graph_from_collections
    from dask_cosim._topk_store import INPUT_PRIORITY, _block_priority

    priority, t = _block_priority(True, 10), "0123456789abcdef0123456789abcdef"  # keys as dask names them
    blocks = priority_of(True, 10)
    assert priority((f"cosine-topk-{t}", 2, 5)) == blocks(("cosine-topk-x", 2, 5)) < 0
    assert priority((f"cosine-pick-{t}", 7, 7)) == 0
    assert priority((f"cosine-normalize-{t}", 3, 0)) == priority((f"cosine-in-a-{t}", 3, 0)) == INPUT_PRIORITY
    assert priority((f"cosine-merge-aggregate-{t}", 0, 0)) == 0
    hlg = graph_from_collections("cosine-link-x", {}, [vals], priority=priority)
    inputs = hlg.layers["cosine-link-x-inputs"]
    assert inputs.annotations["priority"] is priority and set(inputs) == set(dict(vals.__dask_graph__()))


def test_tiled_kernels_equal_the_untiled_ones(monkeypatch):
    """Column-tiled top-k and row/column-tiled pairs give the same results as one tile."""
    from dask_cosim import _select

    gen = np.random.default_rng(5)
    an = gen.standard_normal((700, 10)).astype("float32")
    bn = gen.standard_normal((1900, 10)).astype("float32")
    an /= np.linalg.norm(an, axis=1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=1, keepdims=True)
    kw = {"k": 6, "row_offset": 40, "col_offset": 0, "exclude_self": True}
    whole = _select.topk_block(an, bn, both=True, **kw)
    whole_pairs = _select.pairs_block(an, bn, threshold=0.6, row_offset=40, upper=True)
    monkeypatch.setattr(_select, "TILE_COLS", 300)
    monkeypatch.setattr(_select, "_PAIRS_TILE_BYTES", 50_000)
    tiled = _select.topk_block(an, bn, both=True, **kw)
    tiled_pairs = _select.pairs_block(an, bn, threshold=0.6, row_offset=40, upper=True)
    for w, t in zip((*whole[0], *whole[1]), (*tiled[0], *tiled[1]), strict=True):
        assert w.shape == t.shape
        np.testing.assert_allclose(w, t, atol=1e-6) if w.dtype.kind == "f" else None
    s = an.astype(np.float64) @ bn.T.astype(np.float64)
    ref_vals = np.sort(np.where(np.arange(1900)[None] == np.arange(40, 740)[:, None], -3, s), axis=1)[
        :, ::-1
    ][:, :6]
    np.testing.assert_allclose(tiled[0][0], ref_vals, atol=1e-5)
    assert len(whole_pairs[0]) == len(tiled_pairs[0]) > 0
    for w, t in zip(whole_pairs, tiled_pairs, strict=True):
        np.testing.assert_allclose(w, t, atol=1e-6)
    order = np.lexsort((tiled_pairs[2], tiled_pairs[1]))
    np.testing.assert_array_equal(order, np.arange(len(order)))  # row-major order kept
    assert math.isclose(_select._even_tiles(10, 4)[-1][1], 10)


def test_tiled_pairs_keep_batch_row_column_order_for_batched_blocks(monkeypatch):
    from dask_cosim import _select

    gen = np.random.default_rng(9)
    an = gen.standard_normal((3, 300, 6))
    bn = gen.standard_normal((3, 500, 6))
    an /= np.linalg.norm(an, axis=-1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=-1, keepdims=True)
    whole = _select.pairs_block(an, bn, threshold=0.5, batch_offset=4)
    monkeypatch.setattr(_select, "TILE_COLS", 128)
    monkeypatch.setattr(_select, "_PAIRS_TILE_BYTES", 20_000)
    tiled = _select.pairs_block(an, bn, threshold=0.5, batch_offset=4)
    for w, t in zip(whole, tiled, strict=True):
        np.testing.assert_array_equal(w, t) if w.dtype.kind == "i" else np.testing.assert_allclose(
            w, t, atol=1e-12
        )
    s = np.einsum("bnd,bmd->bnm", an, bn)
    assert len(tiled[0]) == int((s >= 0.5).sum()) > 0


@pytest.mark.parametrize("label_pairs", ["different", "same"])
def test_tiled_kernels_slice_the_label_mask_per_tile(monkeypatch, label_pairs):
    from dask_cosim import _select

    gen = np.random.default_rng(11)
    an = gen.standard_normal((500, 8))
    bn = gen.standard_normal((1500, 8))
    an /= np.linalg.norm(an, axis=1, keepdims=True)
    bn /= np.linalg.norm(bn, axis=1, keepdims=True)
    lab = {
        "row_labels": gen.integers(0, 3, 500),
        "col_labels": gen.integers(0, 3, 1500),
        "label_pairs": label_pairs,
    }
    whole = _select.topk_block(an, bn, k=5, **lab)
    whole_pairs = _select.pairs_block(an, bn, threshold=0.7, **lab)
    monkeypatch.setattr(_select, "TILE_COLS", 256)
    monkeypatch.setattr(_select, "_PAIRS_TILE_BYTES", 40_000)
    tiled = _select.topk_block(an, bn, k=5, **lab)
    tiled_pairs = _select.pairs_block(an, bn, threshold=0.7, **lab)
    np.testing.assert_allclose(tiled[0], whole[0], atol=1e-12)
    np.testing.assert_array_equal(tiled[1], whole[1])
    for w, t in zip(whole_pairs, tiled_pairs, strict=True):
        np.testing.assert_allclose(w, t, atol=1e-12)
    keep = _select.label_excluded(lab["row_labels"], lab["col_labels"], label_pairs)
    s = np.where(keep, -np.inf, an @ bn.T)
    assert len(tiled_pairs[0]) == int((s >= 0.7).sum()) > 0
    np.testing.assert_allclose(tiled[0], -np.sort(-s, axis=1)[:, :5], atol=1e-12)


def test_gpu_sized_self_similarity_blocks_are_not_split_for_the_triangle():
    """On a GPU known at graph time a reduction's blocks stay near cosine.gpu-block-bytes:
    the host's triangle rule (MIN_TRIANGLE_BLOCKS per axis) would make them per-task overhead."""
    a = da.zeros((32_768, 1024), dtype="float32", chunks=(32_768, 1024))
    gpu = dcs.plan(a, op="topk", k=10, device="gpu")
    assert len(gpu.plan.rows) == 2 and gpu.plan.rows == gpu.plan.cols  # 16384^2 x 4 B = 1 GiB
    host = dcs.plan(a, op="topk", k=10, device="cpu")
    assert len(host.plan.rows) >= MIN_TRIANGLE_BLOCKS


def test_embedded_cluster_polls_less_often_unless_the_user_said_otherwise():
    import distributed  # noqa: F401  (its config defaults, as the cluster's start has them)

    from dask_cosim.cluster import CALMER_POLLING, _calmer_polling

    assert _calmer_polling() == {key: ours for key, (_, ours) in CALMER_POLLING.items()}
    with dask.config.set({"distributed.admin.tick.interval": "50ms"}):
        assert "distributed.admin.tick.interval" not in _calmer_polling()


def test_embedded_cluster_malloc_settings_unless_the_user_set_them(monkeypatch):
    import distributed  # noqa: F401  (its config defaults, as the cluster's start has them)

    from dask_cosim.cluster import WORKER_MALLOC, _worker_malloc

    key = "distributed.nanny.pre-spawn-environ."
    assert _worker_malloc() == {key + name: value for name, value in WORKER_MALLOC.items()}
    assert int(WORKER_MALLOC["MALLOC_MMAP_THRESHOLD_"]) <= 32 * 2**20  # glibc's adaptive maximum
    with dask.config.set({key + "MALLOC_TOP_PAD_": "0"}):
        assert key + "MALLOC_TOP_PAD_" not in _worker_malloc()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert set(_worker_malloc()) == {key + "MALLOC_TOP_PAD_"}


def test_embedded_cluster_workers_start_with_the_malloc_settings_and_this_process_is_left_alone():
    """The workers see distributed's trim threshold and our two settings; the nanny puts
    them in this process's environment to spawn, and they are gone after the block."""
    from dask_cosim.cluster import WORKER_MALLOC, dask_client

    before = {name: os.environ.get(name) for name in WORKER_MALLOC}
    names = ("MALLOC_TRIM_THRESHOLD_", *WORKER_MALLOC)
    with dask_client(None, echo=None, quiet=True) as client:
        seen = client.run(lambda: {name: os.environ.get(name) for name in names})
    expected = {"MALLOC_TRIM_THRESHOLD_": "65536", **WORKER_MALLOC}
    assert list(seen.values()) == [expected] * len(seen)
    assert {name: os.environ.get(name) for name in WORKER_MALLOC} == before


def test_the_embedded_clusters_workers_and_scheduler_poll_at_the_calmer_intervals():
    from dask_cosim.cluster import dask_client

    with dask_client(None, echo=None, quiet=True) as client:
        seen = client.run(lambda: dask.config.get("distributed.worker.memory.monitor-interval"))
        assert set(seen.values()) == {"500ms"}
        tick = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.periodic_callbacks["tick"].callback_time
        )
        assert tick == 1000
