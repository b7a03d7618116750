"""Sparse inputs (issue 15): scipy.sparse of every format, pydata sparse, dask arrays of
sparse chunks, sparse x dense mixes, the zero-vector and NaN policies, dtypes, very high D,
top-k / pairs / groups against brute force, ``.npz`` paths and the CLI, refused types.

References are scikit-learn's ``cosine_similarity`` in float64 on the same sparse matrix.
"""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import sparse
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

import dask_cosim as dcs
from dask_cosim._kernels import ZeroVectorError
from dask_cosim._plan import row_bytes, task_memory
from dask_cosim._sizing import Job, Settings, plan_job
from dask_cosim._sparse import normalize_sparse_rows, to_csr

FORMATS = ["csr", "csc", "coo", "lil", "dok", "bsr", "dia"]


def tfidf_like(n, d, nnz=6, seed=0, dtype=np.float64, empty_rows=(3,), zero_col=None):
    """Rows with ~nnz non-zeros drawn from power-law column frequencies; some rows empty,
    optionally a column that is never used."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, d + 1) ** 1.1
    if zero_col is not None:
        p[zero_col] = 0
    p /= p.sum()
    rows, cols = [], []
    for i in range(n):
        if i in empty_rows:
            continue
        c = np.unique(rng.choice(d, size=rng.integers(1, 2 * nnz), p=p))
        rows.extend([i] * len(c))
        cols.extend(c)
    vals = rng.random(len(rows)) + 0.1
    return sp.csr_matrix((vals.astype(dtype), (rows, cols)), shape=(n, d))


def dense_ref(a, b=None):
    a64 = a.astype(np.float64)
    return sk_cosine(a64, None if b is None else b.astype(np.float64))


X = tfidf_like(45, 30, zero_col=7)
Y = tfidf_like(33, 30, seed=1, empty_rows=(0, 20))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", ["matrix", "array"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_scipy_format_matches_sklearn(fmt, kind):
    cls = sp.coo_matrix if kind == "matrix" else sp.coo_array
    a, b = cls(X).asformat(fmt), cls(Y).asformat(fmt)
    assert a.format == fmt
    S = dcs.cosine_similarity(a, b, chunks=(10, 7))
    assert S.dtype == np.float64 and S.shape == (45, 33)
    np.testing.assert_allclose(S.compute(), sk_cosine(X, Y), rtol=0, atol=1e-12)
    S_self = dcs.cosine_similarity(a, chunks=(10, 10)).compute()  # the triangle layout
    np.testing.assert_allclose(S_self, sk_cosine(X), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", ["COO", "GCXS"])
def test_pydata_sparse_matches_sklearn(cls):
    a = getattr(sparse, cls).from_scipy_sparse(X)
    S = dcs.cosine_similarity(a, sparse.COO.from_scipy_sparse(Y), chunks=(16, 16)).compute()
    np.testing.assert_allclose(S, sk_cosine(X, Y), rtol=0, atol=1e-12)


def test_sparse_dense_mixes_both_ways():
    dense = np.random.default_rng(2).standard_normal((20, 30))
    dense[4] = 0
    for a, b in ((X, dense), (dense, X), (X.tocoo(), dense.astype(np.float32))):
        ref = sk_cosine(a if sp.issparse(a) else a.astype(np.float64), b if sp.issparse(b) else b)
        S = dcs.cosine_similarity(a, b, chunks=(8, 9))
        assert S.dtype == np.float64
        np.testing.assert_allclose(S.compute(), ref, rtol=0, atol=1e-12)


def test_dask_arrays_of_sparse_chunks_over_several_chunkings():
    ref = sk_cosine(X)
    for chunks in [(5, -1), (13, -1), (45, -1), (7, 10)]:
        a = da.from_array(X, chunks=chunks, asarray=False)
        S = dcs.cosine_similarity(a, chunks=(9, 9))
        np.testing.assert_allclose(S.compute(), ref, rtol=0, atol=1e-12, err_msg=str(chunks))
        vals, idx = dcs.topk(a, k=3, exclude_self=True)
        check_topk(vals.compute(), idx.compute(), ref, 3, exclude_self=True)
    a = da.from_array(sparse.COO.from_scipy_sparse(X), chunks=(11, -1), asarray=False)
    np.testing.assert_allclose(dcs.cosine_similarity(a).compute(), ref, rtol=0, atol=1e-12)


def test_input_blocks_stay_sparse_and_are_never_densified(monkeypatch):
    """No block reaches toarray/todense: normalisation and products keep CSR."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("an input block was densified")

    for cls in (sp.csr_matrix, sp.coo_matrix, sp.csc_matrix):
        monkeypatch.setattr(cls, "todense", refuse)
    an = normalize_sparse_rows(X)
    assert sp.issparse(an) and an.format == "csr" and an.nnz <= X.nnz


# --------------------------------------------------------------------------- semantics


def test_empty_rows_follow_the_zero_vector_policy():
    S = dcs.cosine_similarity(X, Y).compute()
    assert (S[3] == 0).all() and (S[:, 0] == 0).all() and (S[:, 20] == 0).all()
    S = dcs.cosine_similarity(X, Y, zero_vector="nan").compute()
    assert np.isnan(S[3]).all() and np.isnan(S[:, 0]).all() and np.isnan(S[:, 20]).all()
    assert np.isnan(S).sum() == 33 + 2 * 45 - 2
    with pytest.raises(ZeroVectorError, match="a: zero vector at row 3 "):
        dcs.cosine_similarity(X, zero_vector="error", chunks=(2, 2)).compute()
    with pytest.raises(ZeroVectorError, match="b: zero vector at row 19 "):  # Y's only other one: row 0
        dcs.cosine_similarity(X[:3], Y[1:], zero_vector="error", chunks=(3, 10)).compute()
    explicit = sp.csr_matrix((np.zeros(2), ([0, 1], [0, 1])), shape=(2, 3))  # stored zeros
    assert (dcs.cosine_similarity(explicit).compute() == 0).all()


def test_nan_and_inf_rows_give_nan_rows_and_columns_only():
    a = X.tolil()
    a[5, 2], a[9, 4] = np.nan, np.inf
    S = dcs.cosine_similarity(a.tocsr(), chunks=(10, 10)).compute()
    bad = np.zeros(45, dtype=bool)
    bad[[5, 9]] = True
    assert np.isnan(S[bad]).all() and np.isnan(S[:, bad]).all()
    assert not np.isnan(S[~bad][:, ~bad]).any()
    np.testing.assert_allclose(S[~bad][:, ~bad], sk_cosine(X)[~bad][:, ~bad], atol=1e-12)


def test_magnitudes_that_overflow_a_naive_norm():
    a = sp.csr_matrix(np.array([[1e200, 1e200, 0.0], [1e-200, 0.0, 1e-200], [3.0, 4.0, 0.0]]))
    S = dcs.cosine_similarity(a).compute()
    ref = sk_cosine(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [3.0, 4.0, 0.0]]))
    np.testing.assert_allclose(S, ref, atol=1e-12)


def test_each_row_is_normalised_on_its_own():
    """A row's normalised bits do not depend on its block: a zero, NaN or huge neighbour
    (careful path) changes no other row."""
    gen = np.random.default_rng(4)
    x = sp.random(40, 30, density=0.3, format="csr", random_state=5, dtype=np.float64).toarray()
    x[[5, 17, 33]] = x[20]
    x[6], x[21, 3], x[34] = 0.0, np.nan, x[34] * 1e305
    alone = [normalize_sparse_rows(sp.csr_matrix(x[i : i + 1])).toarray() for i in range(40)]
    alone = np.concatenate(alone)
    for _ in range(10):
        cuts = np.sort(gen.choice(np.arange(1, 40), size=4, replace=False))
        bounds = [0, *cuts.tolist(), 40]
        parts = [sp.csr_matrix(x[s:e]) for s, e in itertools.pairwise(bounds)]
        blocks = [normalize_sparse_rows(p).toarray() for p in parts]
        np.testing.assert_array_equal(np.concatenate(blocks).view(np.uint64), alone.view(np.uint64))
    assert (alone[[5, 17, 33]] == alone[20]).all()
    np.testing.assert_allclose(np.linalg.norm(alone[34]), 1.0, atol=1e-15)


def test_duplicate_coo_entries_and_unsorted_indices_are_summed_and_sorted():
    dup = sp.coo_matrix(([1.0, 2.0, 3.0, 4.0], ([0, 0, 1, 1], [1, 1, 2, 0])), shape=(2, 3))
    before = dup.data.copy()
    S = dcs.cosine_similarity(dup).compute()
    np.testing.assert_allclose(S, sk_cosine(dup.tocsr()), atol=1e-12)
    np.testing.assert_array_equal(dup.data, before)  # the user's matrix is not modified
    uns = sp.csr_matrix((np.array([2.0, 1.0, 5.0]), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    uns.has_sorted_indices = False
    indices = uns.indices.copy()
    np.testing.assert_allclose(dcs.cosine_similarity(uns).compute(), sk_cosine(uns), atol=1e-12)
    np.testing.assert_array_equal(uns.indices, indices)
    canon = to_csr(uns)
    assert canon.has_canonical_format and canon is not uns


def test_dtypes_follow_scikit_learn():
    ints = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 1]], dtype=np.int32))
    S = dcs.cosine_similarity(ints)
    assert S.dtype == np.float64
    np.testing.assert_allclose(S.compute(), sk_cosine(ints.astype(float)), atol=1e-12)
    f32 = X.astype(np.float32)
    S = dcs.cosine_similarity(f32, Y.astype(np.float32))
    assert S.dtype == np.float32 and S.compute().dtype == np.float32
    np.testing.assert_allclose(S.compute(), sk_cosine(X, Y), atol=2e-6)
    assert dcs.cosine_similarity(f32, dtype="float64").compute().dtype == np.float64
    assert dcs.cosine_similarity(f32, Y).dtype == np.float64  # float32 x float64
    vals, _ = dcs.topk(f32, k=2)
    assert vals.dtype == np.float32


def test_very_high_dimension_plans_from_non_zeros_and_runs():
    d = 2**20
    rng = np.random.default_rng(3)
    n, nnz = 1500, 100
    cols = rng.integers(0, d, size=(n, nnz))
    cols[:, :5] = rng.integers(0, 50, size=(n, 5))  # shared terms, so similarities are not all 0
    a = sp.csr_matrix((rng.random(n * nnz), (np.repeat(np.arange(n), nnz), cols.ravel())), shape=(n, d))
    for op in ("similarity", "topk", "pairs"):
        plan = dcs.plan(a, op=op, k=5, threshold=0.5)
        assert plan.plan.task_bytes < 64 * 2**20, plan  # a dense estimate would be ~8 MiB per row
        assert "non-zeros per row" in repr(plan)
    vals, idx = dcs.topk(a, k=5, exclude_self=True)
    ref = sk_cosine(a)
    check_topk(vals.compute(), idx.compute(), ref, 5, exclude_self=True)
    pairs = dcs.pairs_above(a[:300], threshold=0.05, exclude_self=True).compute()
    check_pairs(pairs, sk_cosine(a[:300]), 0.05, upper=True, exclude_self=True)


def test_the_sizing_policy_counts_non_zeros_not_n_times_d():
    assert row_bytes(2**20, 8, nnz_per_row=100) == 100 * 16 + 8
    dense = task_memory(1, 1000, 1000, 2**20, in_itemsize=8, compute_itemsize=8, out_itemsize=8)
    sparse = task_memory(
        1, 1000, 1000, 2**20, in_itemsize=8, compute_itemsize=8, out_itemsize=8, nnz_per_row=100
    )
    assert dense > 2**34 and sparse < 64 * 2**20
    job = Job("topk", 1, 10**6, 10**6, 2**20, in_itemsize=8, compute_itemsize=8, out_itemsize=8,
              self_similar=True, batched=False, k=10, cores=2, nnz_per_row=100)  # fmt: skip
    plan = plan_job(job, Settings())
    assert plan.task_bytes <= Settings().budget_bytes and len(plan.rows) > 1
    with pytest.raises(dcs.PlanError):  # the same job, dense: even one row per block is too much
        plan_job(Job("topk", 1, 10**6, 10**6, 2**30, in_itemsize=8, compute_itemsize=8, out_itemsize=8),
                 Settings())  # fmt: skip


# --------------------------------------------------------------------------- reductions


def check_topk(vals, idx, ref, k, exclude_self=False):
    """Values equal the brute-force k best of each row; every index points at its value
    (any order among exact ties), and ties are broken by the smaller column."""
    ref = ref.copy()
    if exclude_self:
        np.fill_diagonal(ref, -np.inf)
    best = -np.sort(-ref, axis=1)[:, :k]
    np.testing.assert_allclose(vals, best, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.take_along_axis(ref, idx, axis=1), vals, rtol=0, atol=1e-12)
    if exclude_self:
        assert (idx != np.arange(len(idx))[:, None]).all()
    exact = (vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] == 0)
    assert (idx[:, 1:][exact] > idx[:, :-1][exact]).all()


def check_pairs(pairs, ref, threshold, upper=False, exclude_self=False):
    mask = ref >= threshold
    if upper:
        mask &= np.triu(np.ones_like(mask), 0 if not exclude_self else 1).astype(bool)
    elif exclude_self:
        np.fill_diagonal(mask, False)
    i, j = np.nonzero(mask)
    got = pairs.sort_values(["i", "j"])
    np.testing.assert_array_equal(got["i"].to_numpy(), i)
    np.testing.assert_array_equal(got["j"].to_numpy(), j)
    np.testing.assert_allclose(got["score"].to_numpy(), ref[i, j], atol=1e-12)


@pytest.mark.parametrize("chunks", ["auto", (7, 7), (10, 6)])
def test_topk_matches_brute_force(chunks):
    vals, idx = dcs.topk(X, Y, k=4, chunks=chunks)
    check_topk(vals.compute(), idx.compute(), sk_cosine(X, Y), 4)
    vals, idx = dcs.topk(X.tocsc(), k=4, exclude_self=True, chunks=chunks)
    check_topk(vals.compute(), idx.compute(), sk_cosine(X), 4, exclude_self=True)
    dense = Y.toarray()
    vals, idx = dcs.topk(dense, X, k=3, chunks=chunks)  # dense rows, sparse columns
    check_topk(vals.compute(), idx.compute(), sk_cosine(dense, X), 3)


@pytest.mark.parametrize("chunks", ["auto", (8, 8), (11, 5)])
def test_pairs_above_matches_brute_force(chunks):
    check_pairs(dcs.pairs_above(X, Y, threshold=0.3, chunks=chunks).compute(), sk_cosine(X, Y), 0.3)
    self_pairs = dcs.pairs_above(X, threshold=0.3, chunks=chunks).compute()
    check_pairs(self_pairs, sk_cosine(X), 0.3, upper=True)
    excl = dcs.pairs_above(X, threshold=0.3, exclude_self=True, chunks=chunks).compute()
    check_pairs(excl, sk_cosine(X), 0.3, upper=True, exclude_self=True)


def test_topk_and_pairs_with_labels_on_sparse_blocks():
    labels = np.arange(45) % 3
    vals, idx = dcs.topk(X, k=3, exclude_self=True, labels=labels, chunks=(9, 9))
    ref = sk_cosine(X)
    ref[labels[:, None] == labels[None, :]] = -np.inf
    np.fill_diagonal(ref, -np.inf)
    best = -np.sort(-ref, axis=1)[:, :3]
    np.testing.assert_allclose(vals.compute(), best, atol=1e-12)
    pairs = dcs.pairs_above(X, threshold=0.2, labels=labels, label_pairs="same").compute()
    assert (labels[pairs["i"]] == labels[pairs["j"]]).all() and len(pairs)


def test_duplicate_groups_on_sparse_input():
    from scipy.sparse.csgraph import connected_components

    groups = dcs.duplicate_groups(X, threshold=0.6, chunks=(10, 10)).compute()
    adj = sk_cosine(X) >= 0.6
    _, comp = connected_components(sp.csr_matrix(adj), directed=False)
    first = pd.Series(np.arange(45)).groupby(comp).transform("min").to_numpy()
    np.testing.assert_array_equal(groups.sort_values("i")["group"].to_numpy(), first)


# --------------------------------------------------------------------------- files and the CLI


def test_npz_paths_are_inputs(tmp_path):
    path = tmp_path / "x.npz"
    sp.save_npz(path, X.tocsc())
    np.testing.assert_allclose(dcs.cosine_similarity(str(path), Y).compute(), sk_cosine(X, Y), atol=1e-12)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a sparse matrix written by scipy.sparse.save_npz"):
        dcs.cosine_similarity(str(tmp_path / "bad.npz"))


def test_cli_reads_npz_inputs(tmp_path, capsys, scheduler):
    import zarr

    from dask_cosim.cli import main

    sp.save_npz(tmp_path / "x.npz", X)
    out = tmp_path / "knn.zarr"
    rc = main(["run", str(tmp_path / "x.npz"), "-o", str(out), "--topk", "3", "--exclude-self",
               "--quiet", "--scheduler", scheduler.scheduler_address])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    group = zarr.open_group(out, mode="r")
    check_topk(group["values"][...], group["indices"][...], sk_cosine(X), 3, exclude_self=True)
    assert main(["run", str(tmp_path / "x.npz"), "-o", str(tmp_path / "p"), "--plan"]) == 0
    assert "non-zeros per row" in capsys.readouterr().out


# --------------------------------------------------------------------------- refused


class LooksLikeAnArray:
    shape, dtype = (3, 2), np.dtype("float64")

    def __getitem__(self, index):
        return np.ones(self.shape)[index]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ma.masked_array(np.ones((3, 2)), mask=[[0, 1], [0, 0], [0, 0]]), "masked arrays"),
        (da.from_array(np.ma.masked_equal(np.ones((3, 2)), 0), chunks=2), "masked arrays"),
        (LooksLikeAnArray(), "LooksLikeAnArray, which has shape/dtype but is not an array"),
        ([[1.0, 2.0], [3.0]], "cannot convert list"),
        ([[1.0, 2.0], "ab"], "cannot convert list|object array"),
        (sp.csr_matrix(np.ones((2, 2), dtype=complex)), "complex dtype"),
    ],
)
def test_refused_inputs_are_type_errors_at_call_time(bad, match):
    for call in (dcs.cosine_similarity, lambda x: dcs.topk(x, k=1), lambda x: dcs.pairs_above(x)):
        with pytest.raises(TypeError, match=match):
            call(bad)
    with pytest.raises(TypeError, match="b: "):
        dcs.cosine_similarity(np.ones((3, 2)), bad)


def test_sparse_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="sparse inputs must be 2-D"):
        dcs.cosine_similarity(sparse.COO.from_numpy(np.ones((2, 3, 4))))
    with pytest.raises(ValueError, match="both inputs must be 2-D"):
        dcs.cosine_similarity(X, np.ones((2, 5, 30)))
    with pytest.raises(ValueError, match="device='gpu'"):
        dcs.cosine_similarity(X, device="gpu")
    with pytest.raises(ValueError, match="precision='bfloat16'"):
        dcs.cosine_similarity(X, precision="bfloat16")
    with pytest.raises(ValueError, match="check_finite"):
        dcs.cosine_similarity(X, check_finite=True)
    with pytest.raises(ValueError, match="same vector length"):
        dcs.cosine_similarity(X, Y[:, :10])


def test_building_the_graph_reads_nothing_and_converts_once(monkeypatch):
    """A COO input is converted to CSR once, on the first block read, never at call time."""
    import dask_cosim._sparse as sparse_mod

    calls = []
    original = sparse_mod.to_csr

    def counting(x):
        calls.append(getattr(x, "format", type(x).__name__))
        return original(x)

    monkeypatch.setattr(sparse_mod, "to_csr", counting)
    S = dcs.cosine_similarity(X.tocoo(), Y, chunks=(9, 11))
    assert calls == []
    with dask.config.set(scheduler="sync"):
        np.testing.assert_allclose(S.compute(), sk_cosine(X, Y), atol=1e-12)
    assert calls.count("coo") == 1, calls


def test_sparse_benchmark_quick():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sparse.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    rows = {r["bench"]: r for r in map(json.loads, out.splitlines())}
    assert rows["similarity"]["max_abs_diff"] <= 1e-12
    assert rows["topk"]["rows_differing_not_ties"] == 0 and rows["topk"]["max_abs_value_diff"] <= 1e-12


def test_array_likes_that_convert_themselves_are_still_accepted():
    class ConvertsItself(LooksLikeAnArray):
        def __array__(self, dtype=None, copy=None):
            return np.ones(self.shape, dtype=dtype)

    np.testing.assert_allclose(dcs.cosine_similarity(ConvertsItself()).compute(), np.ones((3, 3)))


# --------------------------------------------------------------------------- products


def zipf_docs(n, d=512, nnz=20, seed=0, dtype=np.float64):
    """Rows whose columns follow a power law: a few columns most rows share, many rare."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, d + 1) ** 1.2
    rows = np.repeat(np.arange(n), nnz)
    cols = rng.choice(d, size=n * nnz, p=p / p.sum())
    x = sp.csr_matrix((rng.random(n * nnz) + 0.1, (rows, cols)), shape=(n, d))
    x.sum_duplicates()
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_kernel", [True, False])
@pytest.mark.parametrize("share", [1.0, 1 / 64, 1e-9])  # no panel, some columns, every shared column
def test_sparse_product_with_dense_panels_of_shared_columns(monkeypatch, dtype, with_kernel, share):
    from dask_cosim import _sparse

    monkeypatch.setattr(_sparse, "DENSE_COLUMN_SHARE", share)
    if not with_kernel:
        monkeypatch.setattr(_sparse, "_to_dense_kernel", lambda *a: None)
    a = zipf_docs(70, dtype=dtype)
    b = zipf_docs(50, seed=1, dtype=dtype)
    a = a.tolil()
    a[5] = 0  # an empty row
    a = a.tocsr()
    a.eliminate_zeros()
    an, bn = (
        normalize_sparse_rows(a, compute_dtype=dtype.__name__),
        normalize_sparse_rows(b, compute_dtype=dtype.__name__),
    )
    product = _sparse.SparseProduct(an, bn)
    assert (product.columns is not None) == (share < 1.0)
    ref = dense_ref(a.toarray(), b.toarray())
    out = np.full((30, 50), np.nan, dtype=dtype)
    got = np.concatenate(
        [product(r0, r0 + 30, out).copy() for r0 in (0, 30)] + [product(60, 70, out[:10]).copy()]
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6)
    assert got.dtype == dtype


def test_dense_panels_stay_within_their_byte_budget(monkeypatch):
    from dask_cosim import _sparse

    monkeypatch.setattr(_sparse, "DENSE_COLUMN_SHARE", 1e-9)
    monkeypatch.setattr(_sparse, "DENSE_PANEL_BYTES", 50 * 8 * 7)  # 7 columns of b's 50 rows
    a, b = zipf_docs(40), zipf_docs(50, seed=1)
    an, bn = normalize_sparse_rows(a), normalize_sparse_rows(b)
    product = _sparse.SparseProduct(an, bn)
    assert product.b_panel_t.shape == (7, 50)
    work = np.bincount(an.indices, minlength=512) * np.bincount(bn.indices, minlength=512)
    kept = np.flatnonzero(product.columns >= 0)
    assert work[kept].min() >= np.sort(work)[-7]  # the columns that save the most
    out = np.empty((40, 50))
    np.testing.assert_allclose(product(0, 40, out), dense_ref(a.toarray(), b.toarray()), rtol=0, atol=1e-12)
    tall = zipf_docs(100, seed=3)  # a's panel (100 rows) is the larger one: it sets the budget
    tall_product = _sparse.SparseProduct(normalize_sparse_rows(tall), bn)
    assert tall_product.b_panel_t.shape[0] == 50 * 8 * 7 // (100 * 8)
    out = np.empty((100, 50))
    np.testing.assert_allclose(
        tall_product(0, 100, out), dense_ref(tall.toarray(), b.toarray()), rtol=0, atol=1e-12
    )


def test_sparse_products_with_nan_rows_and_mixed_dtypes():
    a = zipf_docs(30).tolil()
    a[3, 0] = np.nan
    a = a.tocsr()
    b = zipf_docs(20, seed=2, dtype=np.float32)
    S = dcs.cosine_similarity(a, b, chunks=(8, 7)).compute()
    ref = dense_ref(np.nan_to_num(a.toarray()), b.toarray())
    assert np.isnan(S[3]).all() and not np.isnan(np.delete(S, 3, axis=0)).any()
    np.testing.assert_allclose(np.delete(S, 3, axis=0), np.delete(ref, 3, axis=0), rtol=0, atol=2e-7)


def test_reductions_on_sparse_blocks_score_without_dense_panels(monkeypatch):
    """The panels' GEMM rounds by position and BLAS; top-k and pairs sum each pair exactly."""
    from dask_cosim import _sparse

    x = zipf_docs(300, d=256, nnz=30, seed=7)
    runs = []
    for share in (1.0, 1e-9):  # never a panel; every shared column in one (if the reductions used them)
        monkeypatch.setattr(_sparse, "DENSE_COLUMN_SHARE", share)
        vals, idx = dcs.topk(x, k=5, exclude_self=True, chunks=(70, 90))
        pairs = dcs.pairs_above(x, threshold=0.3, chunks=(70, 90)).compute().sort_values(["i", "j"])
        runs.append((vals.compute(), idx.compute(), pairs["score"].to_numpy()))
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_write_reports_give_no_dense_equivalent_gflops_for_sparse_inputs(tmp_path):
    """A sparse product costs per stored value, not 2 D per pair: the summary says pairs/s only."""
    X = tfidf_like(60, 2**16, seed=21)
    report = dcs.to_zarr(dcs.cosine_similarity(X), tmp_path / "sparse.zarr")
    assert report.gflops is None and "GFLOP/s" not in report.summary()
    dense = dcs.to_zarr(dcs.cosine_similarity(X.toarray()[:, :64]), tmp_path / "dense.zarr")
    assert dense.gflops is not None and "GFLOP/s" in dense.summary()
    assert "pairs/s" in report.summary()


def test_many_threads_take_the_gil_free_sparse_product_with_the_same_bits(monkeypatch):
    """With GIL_FREE_THREADS or more tasks sharing a process, sparse products go through
    SciPy (which releases the GIL), not scikit-learn's kernel (which holds it); both sum
    each pair in index order, so top-k and pairs are bitwise the same."""
    from dask_cosim import _backend, _sparse

    X = tfidf_like(300, 2**12, nnz=12, seed=23).tolil()
    X[40] = X[7]  # an exact copy: its tie order must not change
    X = X.tocsr()
    with dask.config.set(scheduler="sync"):
        want = dask.compute(*dcs.topk(X, k=5, exclude_self=True, chunks=(100, 100)))
        want_pairs = dcs.pairs_above(X, threshold=0.3, chunks=(100, 100)).compute()
    calls = []
    import sklearn.utils.sparsefuncs as skf

    real = skf.sparse_matmul_to_dense
    monkeypatch.setattr(skf, "sparse_matmul_to_dense", lambda *a, **k: calls.append(1) or real(*a, **k))
    with dask.config.set(scheduler="sync"):
        dask.compute(*dcs.topk(X, k=5, exclude_self=True, chunks=(100, 100)))
    assert calls  # one task at a time: scikit-learn's kernel
    calls.clear()
    monkeypatch.setattr(_backend, "threads_sharing_this_process", lambda: _sparse.GIL_FREE_THREADS)
    with dask.config.set(scheduler="sync"):
        got = dask.compute(*dcs.topk(X, k=5, exclude_self=True, chunks=(100, 100)))
        got_pairs = dcs.pairs_above(X, threshold=0.3, chunks=(100, 100)).compute()
    assert not calls
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    pd.testing.assert_frame_equal(got_pairs.reset_index(drop=True), want_pairs.reset_index(drop=True))
    ref = dense_ref(X.toarray())
    np.fill_diagonal(ref, -np.inf)
    np.testing.assert_allclose(got[0], -np.sort(-ref, axis=1)[:, :5], rtol=0, atol=1e-12)


class _DeviceCSR:
    """Stands in for a ``cupyx.scipy.sparse.csr_matrix`` (no GPU on the test host): the
    type's module is cupyx's, slicing stays "on the device", ``get()`` copies to the host."""

    copies: list[tuple[int, int]] = []  # shapes copied to the host

    def __init__(self, m):
        self.m = m

    shape = property(lambda self: self.m.shape)
    dtype = property(lambda self: self.m.dtype)
    nnz = property(lambda self: self.m.nnz)
    ndim = 2
    format = "csr"

    def __getitem__(self, key):
        return _DeviceCSR(self.m[key])

    def get(self):
        _DeviceCSR.copies.append(self.m.shape)
        return self.m.copy()


_DeviceCSR.__module__ = "cupyx.scipy.sparse._csr"


def test_cupyx_sparse_inputs_are_copied_to_the_host_once_when_computed():
    host = tfidf_like(80, 2**10, nnz=8, seed=31)
    x = _DeviceCSR(host)
    _DeviceCSR.copies.clear()
    S = dcs.cosine_similarity(x, chunks=(30, 30))
    assert _DeviceCSR.copies == []  # nothing is copied when the graph is built
    np.testing.assert_allclose(S.compute(), dense_ref(host.toarray()), rtol=0, atol=1e-12)
    assert _DeviceCSR.copies == [host.shape]  # once, on the first block read (then sliced on the host)
    vals, idx = dask.compute(*dcs.topk(x, k=3, exclude_self=True, chunks=(30, 30)))
    want_vals, want_idx = dask.compute(*dcs.topk(host, k=3, exclude_self=True, chunks=(30, 30)))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(vals, want_vals)
    with pytest.raises(ValueError, match="gpu"):
        dcs.cosine_similarity(x, device="gpu")
