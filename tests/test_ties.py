"""The tie contract (README: Scores and ties): reductions decide by deterministic pair scores.

Every test here must pass on any correct BLAS: block products are only assumed to lie
within :func:`~dask_cosim._rescore.score_margin` of the scores, and several tests perturb
them on purpose (position by position, within that margin) to show the answers do not move.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import array_api_strict as xps
import dask
import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_info

import dask_cosim as dcs
from dask_cosim import _select
from dask_cosim._kernels import normalize_rows
from dask_cosim._rescore import Rescorer, pair_scores, score_margin
from dask_cosim._select import NAN_KEY, topk_block

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [np.float32, np.float64]


def rng(seed):
    return np.random.default_rng(seed)


def unit(x, dtype):
    return normalize_rows(x, compute_dtype=np.dtype(dtype).name)


def all_scores(a, b, dtype):
    """The contract's score of every pair (2-D inputs), NaN where a vector holds NaN."""
    an, bn = unit(a, dtype), unit(b, dtype)
    i, j = np.meshgrid(np.arange(len(an)), np.arange(len(bn)), indexing="ij")
    return pair_scores(an, bn, i.ravel(), j.ravel()).reshape(len(an), len(bn))


def contract_topk(s, k, exclude_self=False):
    """Top-k of a score matrix by the contract: score descending, smaller j first, NaN last."""
    key = np.where(np.isnan(s), NAN_KEY, s)
    if exclude_self:
        key = np.where(np.eye(*s.shape, dtype=bool), -np.inf, key)
    idx = np.argsort(-key, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=-1), idx


def with_copies(dtype, seed=0, n=40, m=300, d=32):
    """``a``, ``b`` and the rows of ``b`` that are exact copies of one vector (in different
    blocks, next to a zero and a NaN vector); ``a`` holds that vector, once scaled by 3."""
    gen = rng(seed)
    b = gen.standard_normal((m, d)).astype(dtype)
    copies = [3, m // 3, m // 2, m - 1]
    b[copies[1:]] = b[copies[0]]
    b[m // 2 - 1] = 0.0
    b[m // 2 + 1, 5] = np.nan
    a = gen.standard_normal((n, d)).astype(dtype)
    a[4], a[7] = b[copies[0]] * 3, b[copies[0]]
    return a, b, copies


def perturbed(s, margin, seed):
    """Block values moved by up to half the margin, differently at every position."""
    noise = rng(seed).uniform(-0.5, 0.5, size=s.shape) * margin
    return (s + noise.astype(s.dtype)).astype(s.dtype)


def bits_equal(x, y) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)


# ------------------------------------------------------------------ the score


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_scores_depend_only_on_the_pair(dtype):
    gen = rng(1)
    an = unit(gen.standard_normal((50, 37)), dtype)
    bn = unit(gen.standard_normal((60, 37)), dtype)
    bn[7] = an[3]
    an[9] = np.nan
    ia, ib = gen.integers(0, 50, 5000), gen.integers(0, 60, 5000)
    ia[:10], ib[:10] = 3, 7
    ia[10:20] = 9
    whole = pair_scores(an, bn, ia, ib)
    assert whole.dtype == dtype
    for order in (gen.permutation(5000), np.arange(5000)[::-1], np.arange(5000)[::7]):
        np.testing.assert_array_equal(pair_scores(an, bn, ia[order], ib[order]), whole[order])
    singles = np.array([pair_scores(an, bn, ia[p : p + 1], ib[p : p + 1])[0] for p in range(0, 5000, 97)])
    np.testing.assert_array_equal(singles, whole[::97])
    strict = pair_scores(xps.asarray(an), xps.asarray(bn), xps.asarray(ia), xps.asarray(ib))
    assert type(strict).__module__.startswith("array_api_strict")
    np.testing.assert_array_equal(np.asarray(strict), whole)  # generic == NumPy, bit for bit
    assert np.isnan(whole[10:20]).all() and not np.isnan(whole[20:][ia[20:] != 9]).any()
    assert (whole[:10] == whole[0]).all() and abs(whole[0] - 1) <= 4 * np.finfo(dtype).eps
    assert np.nanmax(whole) <= 1
    minus_zero = pair_scores(np.array([[-0.0, -0.0]], dtype), np.ones((1, 2), dtype), [0], [0])
    assert minus_zero[0] == 0 and not np.signbit(minus_zero[0])  # -0.0 ties with 0.0
    ref = np.einsum("pd,pd->p", an[ia].astype(np.float64), bn[ib].astype(np.float64))
    np.testing.assert_allclose(whole, np.clip(ref, -1, 1), rtol=0, atol=8 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 64, 700])
def test_score_margin_bounds_products_summed_in_any_order(dtype, d):
    """Products summed in any order (BLAS, sequentially, backwards, pairwise) stay within the margin
    of the score, also for vectors whose dot product cancels heavily."""
    gen = rng(d)
    x = gen.standard_normal((200, d)) * np.exp(gen.uniform(-6, 6, size=(200, d)))  # mixed magnitudes
    x[100:] = x[:100] * np.where(gen.random((100, d)) < 0.5, 1, -1)  # near-cancelling partners
    xn = unit(x, dtype)
    ia, ib = np.repeat(np.arange(200), 200), np.tile(np.arange(200), 200)
    score = pair_scores(xn, xn, ia, ib).reshape(200, 200)
    products = xn[:, None, :] * xn[None, :, :]  # in dtype, as a block product rounds them
    sums = [
        np.clip(xn @ xn.T, -1, 1),
        np.clip(np.cumsum(products, axis=-1, dtype=dtype)[..., -1], -1, 1),
        np.clip(np.cumsum(products[..., ::-1], axis=-1, dtype=dtype)[..., -1], -1, 1),
        np.clip(products.sum(axis=-1, dtype=np.float64), -1, 1),
    ]
    margin = score_margin(d, dtype)
    for s in sums:
        assert np.abs(s.astype(np.float64) - score).max() <= margin


# ------------------------------------------------------------------ top-k


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_values_are_scores_and_the_same_bits_for_every_chunking(dtype):
    a, b, copies = with_copies(dtype)
    s = all_scores(a, b, dtype)
    want_vals, want_idx = contract_topk(s, 6)
    gen = rng(2)
    chunkings = [(-1, -1), (7, 13), (40, 100), (13, 151), (5, 1), (40, 299)]
    chunkings += [(int(gen.integers(1, 41)), int(gen.integers(1, 301))) for _ in range(6)]
    for chunks in chunkings:
        vals, idx = dask.compute(*dcs.topk(a, b, k=6, chunks=chunks))
        assert bits_equal(vals, want_vals) and bits_equal(idx, want_idx), chunks
        assert idx[7, :4].tolist() == copies and (vals[7, :4] == vals[7, 0]).all()
        assert idx[4, :4].tolist() == copies and (vals[4, :4] == vals[4, 0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_self_similarity_triangle_and_copy_paths_give_the_same_bits(dtype, exclude_self):
    a, b, copies = with_copies(dtype, seed=3)
    x = np.concatenate([b[:150], b[:40]])  # every vector of the first 40 twice, in other blocks
    want = contract_topk(all_scores(x, x, dtype), 5, exclude_self)
    for chunks in [(19, 19), (38, 38), (50, 50), (190, 190)]:
        tri = dask.compute(*dcs.topk(x, k=5, exclude_self=exclude_self, chunks=chunks))
        cp = dask.compute(*dcs.topk(x, x.copy(), k=5, exclude_self=exclude_self, chunks=chunks))
        for got in (tri, cp):
            assert bits_equal(got[0], want[0]) and bits_equal(got[1], want[1]), chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fast", [True, False])
def test_topk_block_ignores_how_the_product_rounds(monkeypatch, dtype, fast):
    """Block values moved within the margin, differently at every position (as another BLAS
    kernel might round them), change neither the order nor the values."""
    a, b, _ = with_copies(dtype, seed=4, n=60, m=90)
    an, bn = unit(a, dtype), unit(b, dtype)
    kw = {"k": 7, "row_offset": 20, "col_offset": 0, "exclude_self": True, "both": True}
    want = topk_block(an, bn, fast=fast, **kw)
    margin = score_margin(an.shape[-1], dtype)
    if fast:

        def noisy_product(b_, r0, r1, out):
            np.matmul(an[r0:r1], bn.T, out=out)
            out[...] = perturbed(out, margin, seed=r0)

        got = _select._topk_block_numpy(
            an, bn, 7, both=True, row_offset=20, col_offset=0, exclude_self=True, product=noisy_product,
            margin=margin,
        )  # fmt: skip
    else:
        real = _select.similarity_block
        monkeypatch.setattr(_select, "similarity_block", lambda *x, **k: perturbed(real(*x, **k), margin, 5))
        got = topk_block(an, bn, fast=False, **kw)
    for g, w in zip(got, want, strict=True):
        assert bits_equal(g[0], w[0]) and bits_equal(g[1], w[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pivot", [False, True])
def test_column_tiles_score_each_row_once_and_give_the_same_bits(monkeypatch, dtype, pivot):
    """A block split into column tiles ranks its rows by the same scores as one tile, the
    copies spread over several tiles, and scores each row's candidates once per task (a
    band carried over the tiles), not once per tile."""
    a, b, copies = with_copies(dtype, seed=8, n=50, m=1000)
    an, bn = unit(a, dtype), unit(b, dtype)
    kw = {"k": 6, "row_offset": 0, "col_offset": 17, "exclude_self": True, "both": True}
    if pivot:
        kw["row_pivot"] = topk_block(an, bn[:200], k=6)  # another block's part bounds these rows
    want = topk_block(an, bn, **kw)
    scored = []
    real = Rescorer.scores
    monkeypatch.setattr(Rescorer, "scores", lambda self, ia, ib: scored.append(len(ia)) or real(self, ia, ib))
    for width in (128, 300, 999):
        monkeypatch.setattr(_select, "TILE_COLS", width)
        scored.clear()
        got = topk_block(an, bn, **kw)
        for g, w in zip(got, want, strict=True):
            assert bits_equal(g[0], w[0]) and bits_equal(g[1], w[1]), width
        rows_scored = scored[-1]  # the rows part is scored once, after every tile's column part
        assert rows_scored <= 3 * 6 * len(an), (width, scored)
    ref_vals, ref_idx = contract_topk(all_scores(a, b, dtype), 6)
    assert bits_equal(want[0][0][7], ref_vals[7]) and list(want[0][1][7, :4]) == [c + 17 for c in copies]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_diagonal_tiles_give_the_whole_blocks_bits_and_score_each_row_once(monkeypatch, dtype, exclude_self):
    """A self-similarity's diagonal block computed as the upper triangle of its tiles gives
    the bits of the whole block (copies, a zero and a NaN vector spread over the tiles,
    tiles narrower than k too), and scores each row's candidates once per task."""
    _, b, copies = with_copies(dtype, seed=9, m=400)
    x = unit(b, dtype)
    kw = {"k": 6, "row_offset": 30, "col_offset": 30, "exclude_self": exclude_self}
    want = topk_block(x, x, **kw)
    scored = []
    real = Rescorer.scores
    monkeypatch.setattr(Rescorer, "scores", lambda self, ia, ib: scored.append(len(ia)) or real(self, ia, ib))
    for tile in (4, 7, 64, 150, 399):
        monkeypatch.setattr(_select, "DIAGONAL_TILE", tile)
        scored.clear()
        got = topk_block(x, x, symmetric=True, **kw)
        assert bits_equal(got[0], want[0]) and bits_equal(got[1], want[1]), tile
        assert 0 < sum(scored) <= 3 * 6 * len(x), (tile, sum(scored))
    ref_vals, ref_idx = contract_topk(all_scores(b, b, dtype), 6, exclude_self)
    row = copies[1]  # its best are the other copies (and itself unless excluded)
    assert bits_equal(want[0][row], ref_vals[row]) and list(want[1][row] - 30) == list(ref_idx[row])


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_block_fast_and_generic_paths_give_the_same_bits(dtype):
    gen = rng(17)
    an = unit(gen.standard_normal((3, 70, 12)), dtype)
    bn = unit(gen.standard_normal((3, 90, 12)), dtype)
    bn[1, 40:50] = bn[1, 3]
    an[0, 5] = np.nan
    kw = {"k": 7, "row_offset": 10, "col_offset": 0, "exclude_self": True, "both": True}
    fast, generic = topk_block(an, bn, **kw), topk_block(an, bn, fast=False, **kw)
    for f, g in zip(fast, generic, strict=True):
        assert bits_equal(f[0], g[0]) and bits_equal(f[1], g[1])


# ------------------------------------------------------------------ thresholds


@pytest.mark.parametrize("dtype", DTYPES)
def test_pairs_above_membership_is_decided_by_scores(dtype):
    a, b, copies = with_copies(dtype, seed=5)
    s = all_scores(a, b, dtype)
    vals, idx = dask.compute(*dcs.topk(a, b, k=3, chunks=(13, 100)))
    for threshold in (float(vals[0, 2]), float(vals[7, 0]), float(np.nextafter(vals[9, 1], dtype(2)))):
        with np.errstate(invalid="ignore"):
            want = set(zip(*np.nonzero(s >= threshold), strict=True))
        for chunks in [(-1, -1), (7, 13), (40, 151), (16, 64)]:
            got = dcs.pairs_above(a, b, threshold, chunks=chunks).compute()
            assert set(zip(got.i, got.j, strict=True)) == want, (threshold, chunks)
            assert (got.score >= threshold).all()
            np.testing.assert_allclose(got.score, s[got.i, got.j], rtol=0, atol=score_margin(32, dtype))
            near = np.abs(s[got.i, got.j] - threshold) <= score_margin(32, dtype)
            np.testing.assert_array_equal(got.score[near], s[got.i, got.j][near])  # decided pairs: scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_pairs_block_ignores_how_the_product_rounds(monkeypatch, dtype):
    a, b, _ = with_copies(dtype, seed=6, n=30, m=80)
    an, bn = unit(a, dtype), unit(b, dtype)
    s = all_scores(a, b, dtype)
    threshold = float(np.sort(s[np.isfinite(s)])[-150])  # exactly a score
    want = _select.pairs_block(an, bn, threshold=threshold, row_offset=5, col_offset=9)
    margin = Rescorer.for_block(an, bn, dtype=np.dtype(dtype)).margin
    real = _select.matmul_clip_numpy
    monkeypatch.setattr(_select, "matmul_clip_numpy", lambda *x, **k: perturbed(real(*x, **k), margin, 7))
    got = _select.pairs_block(an, bn, threshold=threshold, row_offset=5, col_offset=9)
    for g, w in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got[1] - 5, np.nonzero(s >= threshold)[0])
    np.testing.assert_array_equal(got[2] - 9, np.nonzero(s >= threshold)[1])


def test_duplicate_groups_at_a_threshold_equal_to_a_score():
    gen = rng(9)
    centre = gen.standard_normal(24).astype(np.float32)
    x = gen.standard_normal((90, 24)).astype(np.float32)
    x[[5, 40, 77]] = centre
    x[[12, 60]] = centre + np.float32(1e-3) * gen.standard_normal((2, 24)).astype(np.float32)
    s = all_scores(x, x, np.float32)
    threshold = float(s[5, 12])  # 12 links to the copies exactly at the threshold
    results = [
        dcs.duplicate_groups(x, threshold=threshold, chunks=c).compute().sort_values("i")
        for c in [(10**6, 10**6), (16, 16), (7, 7), (45, 45)]
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r.to_numpy(), results[0].to_numpy())
    adj = s >= threshold
    np.fill_diagonal(adj, False)
    _, comp = connected_components(csr_matrix(adj), directed=False)
    first = np.array([np.flatnonzero(comp == c)[0] for c in comp])
    np.testing.assert_array_equal(results[0]["group"].to_numpy(), first)
    assert first[[5, 40, 77, 12]].tolist() == [5, 5, 5, 5]


# ------------------------------------------------------------------ BLAS kernels

#: OpenBLAS kernels (``OPENBLAS_CORETYPE``) and the CPU flags each needs (Linux names: SSE3 is
#: "pni"); the names
#: threadpoolctl may report for them (OpenBLAS reports an aliased kernel by its first name).
KERNELS = {
    "Haswell": ({"avx2", "fma"}, {"haswell"}),
    "Sandybridge": ({"avx"}, {"sandybridge"}),
    "Nehalem": ({"sse4_2"}, {"nehalem"}),
    "Prescott": ({"pni"}, {"prescott", "katmai", "coppermine", "northwood"}),
    "SkylakeX": ({"avx512f", "avx512bw", "avx512vl"}, {"skylakex"}),
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.slow
def test_every_openblas_kernel_gives_identical_answers():
    """The tie-sensitive script (top-k with exact duplicates over chunkings, self-similarity by
    the triangle and by a copy, pairs exactly at a threshold, duplicate groups) gives the same
    bits under every OpenBLAS kernel this CPU can run."""
    if not any(i.get("internal_api") == "openblas" for i in threadpool_info() if i.get("user_api") == "blas"):
        pytest.skip("NumPy's BLAS is not OpenBLAS: OPENBLAS_CORETYPE does not apply")
    flags = _cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or not flags:
        pytest.skip("the kernels compared here are x86-64 OpenBLAS kernels (CPU flags from /proc/cpuinfo)")
    runnable = {name: names for name, (needs, names) in KERNELS.items() if needs <= flags}
    assert {"Nehalem", "Prescott"} <= set(runnable)  # every x86-64 CPU since 2008
    runs = {}
    for name in runnable:  # all at once: most of each run is importing dask
        env = {**os.environ, "OPENBLAS_CORETYPE": name, "PYTHONPATH": str(ROOT)}
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "tests._ties_script"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    outputs = {}
    try:
        for name, proc in runs.items():
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
            out = json.loads(stdout.strip().splitlines()[-1])
            applied = {k.lower() for k in out["kernels"]}
            assert applied and applied <= runnable[name], f"{name}: threadpoolctl reports {out['kernels']}"
            outputs[name] = out
    finally:
        for proc in runs.values():  # the runs this test started, also after a failure
            proc.kill()
            proc.communicate()
    digests = {name: out["digest"] for name, out in outputs.items()}
    assert len(set(digests.values())) == 1, digests
    assert len({json.dumps(out["facts"], sort_keys=True) for out in outputs.values()}) == 1
