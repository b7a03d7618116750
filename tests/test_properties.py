"""Property tests: any shapes, broadcasting and chunkings match the float64 reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim._plan import PlanError, plan_blocks, row_bytes, task_memory
from dask_cosim.testing import reference_cosine

from .strategies import axis_chunks, problems


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["float32", "float64"]), st.integers(0, 2**32 - 1))
def test_any_shape_and_chunking_matches_reference(problem, dtype, seed):
    shape_a, shape_b, chunks = problem
    gen = np.random.default_rng(seed)
    a = gen.standard_normal(shape_a).astype(dtype)
    b = gen.standard_normal(shape_b).astype(dtype)
    if gen.random() < 0.3:  # sprinkle zero vectors
        a[..., gen.integers(shape_a[-2]), :] = 0
    S = dcs.cosine_similarity(a, b, chunks=chunks)
    got = S.compute(scheduler="sync")
    ref = reference_cosine(a, b)
    assert got.shape == ref.shape == S.shape
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-6 if dtype == "float32" else 1e-12)
    assert np.nanmax(np.abs(got), initial=0) <= 1.0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 50),
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.integers(1, 2048),
    st.data(),
    st.sampled_from([2**16, 2**20, 2**27]),
    st.booleans(),
)
def test_planner_covers_axes_and_respects_budget(batch, n, m, dim, data, target, square):
    if square:
        m = n
    chunks = tuple(data.draw(axis_chunks(size)) for size in (batch, n, m))
    budget = 2**28
    try:
        plan = plan_blocks(
            batch, n, m, dim, chunks=chunks, target_bytes=target, budget_bytes=budget,
            in_itemsize=4, compute_itemsize=4, out_itemsize=4, min_blocks=2, square=square,
        )  # fmt: skip
    except PlanError as err:
        assert "chunks that fit" in str(err)
        return
    assert sum(plan.batch) == batch and sum(plan.rows) == n and sum(plan.cols) == m
    assert all(c > 0 for c in plan.rows + plan.cols if n and m)
    assert plan.task_bytes <= budget
    if square and chunks[1] == chunks[2] == "auto":
        assert plan.rows == plan.cols
    if chunks == ("auto", "auto", "auto") and batch * n * m:
        # auto blocks stay near the target and never outgrow it by more than one row/column
        out = max(plan.batch) * max(plan.rows) * max(plan.cols) * 4
        assert out <= max(target, 4 * (max(plan.rows) + max(plan.cols)) * dim) * 2


def test_task_memory_counts_inputs_output_and_cast():
    same = task_memory(1, 100, 200, 10, in_itemsize=4, compute_itemsize=4, out_itemsize=4)
    cast = task_memory(1, 100, 200, 10, in_itemsize=4, compute_itemsize=4, out_itemsize=2)
    assert same == 2 * (100 + 200) * 10 * 4 + 100 * 200 * 4  # inputs and one batch element of unit rows
    assert cast == same + 100 * 200 * 2
    sizes = {"in_itemsize": 4, "compute_itemsize": 4, "out_itemsize": 4}
    sparse = task_memory(1, 100, 200, 1000, **sizes, nnz_per_row=5.0)
    # sparse blocks are never scaled: no unit rows; each stored value carries an int64 index
    assert sparse == (100 + 200) * row_bytes(1000, 4, 5.0) + 100 * 200 * (4 + 4 + 8)


@settings(max_examples=300, deadline=None)
@given(
    batch=st.integers(0, 64),
    n=st.integers(0, 10**6),
    m=st.integers(0, 10**6),
    dim=st.integers(1, 2**17),
    target=st.sampled_from([2**20, 2**27, 2**30]),
    budget=st.sampled_from([2**26, 2**30, 2**32]),
    in_itemsize=st.sampled_from([2, 4, 8]),
    compute_itemsize=st.sampled_from([4, 8]),
    out_itemsize=st.sampled_from([2, 4, 8]),
    min_blocks=st.sampled_from([1, 8, 64]),
    square=st.booleans(),
)
def test_auto_blocks_always_fit_the_budget_and_suggestions_fit_too(
    batch, n, m, dim, target, budget, in_itemsize, compute_itemsize, out_itemsize, min_blocks, square
):
    """chunks="auto" never yields a plan over the budget (large D included: a normalise task
    holds its block ~3 times), unless one vector alone is over it; a refused explicit plan
    names chunks that are accepted."""
    m = n if square else m
    sizes = {"in_itemsize": in_itemsize, "compute_itemsize": compute_itemsize, "out_itemsize": out_itemsize}
    kw = {"target_bytes": min(target, budget // 4), "budget_bytes": budget, "square": square, **sizes}
    one_vector = task_memory(min(batch, 1), min(n, 1), min(m, 1), dim, **sizes)
    if one_vector > budget:
        with pytest.raises(PlanError, match="chunks that fit: none: one vector per block needs"):
            plan_blocks(batch, n, m, dim, min_blocks=min_blocks, **kw)
        return
    plan = plan_blocks(batch, n, m, dim, min_blocks=min_blocks, **kw)
    assert plan.task_bytes <= budget
    try:
        plan_blocks(batch, n, m, dim, chunks=(max(batch, 1), max(n, 1), max(m, 1)), **kw)
    except PlanError as err:
        fits = re.search(r"chunks that fit: \((\d+), (\d+), (\d+)\)", str(err))
        assert fits, str(err)
        suggested = tuple(int(v) for v in fits.groups())
        assert plan_blocks(batch, n, m, dim, chunks=suggested, **kw).task_bytes <= budget
