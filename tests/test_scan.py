"""The bound scans of the top-k kernels find exactly the entries at or above their bounds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_cosim import _scan


@pytest.fixture(params=[1, 64, 2**40], ids=["one-pass", "default", "two-pass"])
def shared(request, monkeypatch):
    """The lowest-bound pass kept always (1), as by default, or never (unless it finds nothing)."""
    monkeypatch.setattr(_scan, "_MOST_SHARED", request.param)
    return request.param


def reference(strip, t, t_c=None):
    rows = np.flatnonzero(strip >= t[:, None])
    out = (rows, strip.reshape(-1)[rows])
    if t_c is not None:
        cols = np.flatnonzero(strip >= t_c[None, :])
        out += (cols, strip.reshape(-1)[cols])
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def case(r, m, dtype, seed, spread=0.05):
    """A strip of products of unit vectors, bounds near each row's / column's 3rd best
    (some exactly equal to an entry, some -inf)."""
    gen = np.random.default_rng(seed)
    strip = (gen.standard_normal((r, m)) * 0.2).astype(dtype)
    t = np.sort(strip, axis=1)[:, -3] if m >= 3 else np.full(r, -np.inf)
    t_c = np.sort(strip, axis=0)[-3] if r >= 3 else np.full(m, -np.inf)
    t = (t + gen.uniform(-spread, spread, r)).astype(dtype)
    t_c = (t_c + gen.uniform(-spread, spread, m)).astype(dtype)
    if r > 2 and m:
        t[1] = strip[1, m // 2]  # an entry exactly at its bound
        t[2] = -np.inf
    if m > 2 and r:
        t_c[1] = strip[r // 2, 1]
        t_c[-1] = -np.inf
    return np.ascontiguousarray(strip), t, t_c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("r", "m"), [(1, 1), (3, 31), (5, 32), (7, 33), (40, 100), (64, 257)])
def test_scans_find_exactly_the_entries_at_or_above_their_bounds(dtype, r, m, shared):
    strip, t, t_c = case(r, m, dtype, seed=r * 1000 + m)
    assert_same(_scan.row_hits(strip, t), reference(strip, t))
    assert_same(_scan.row_hits(strip, t, lowest_first=True), reference(strip, t))
    assert_same(_scan.row_col_hits(strip, t, t_c), reference(strip, t, t_c))
    mask = np.empty(strip.shape, dtype=bool)  # the scratch the kernels pass
    assert_same(_scan.row_col_hits(strip, t, t_c, mask), reference(strip, t, t_c))


def test_scans_when_every_entry_is_a_hit(shared):
    strip, t, t_c = case(50, 300, np.float32, seed=3)
    low = np.full(50, -np.inf, dtype=np.float32)
    assert_same(_scan.row_hits(strip, low), reference(strip, low))
    assert_same(_scan.row_hits(strip, low, lowest_first=True), reference(strip, low))
    assert len(_scan.row_hits(strip, low)[0]) == strip.size
    assert_same(_scan.row_col_hits(strip, low, t_c), reference(strip, low, t_c))


@given(
    r=st.integers(0, 20),
    m=st.integers(0, 80),
    dtype=st.sampled_from([np.float32, np.float64]),
    spread=st.sampled_from([0.0, 0.01, 0.3]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_scans_on_any_shape_and_bound_spread(r, m, dtype, spread, seed):
    """Any strip shape (empty, narrower than 8 bytes of mask), bounds tight or spread out,
    whichever pass finds the hits."""
    strip, t, t_c = case(r, m, dtype, seed, spread)
    want = reference(strip, t, t_c)
    saved = _scan._MOST_SHARED
    for most_shared in (1, saved, 2**40):
        _scan._MOST_SHARED = most_shared
        try:
            assert_same(_scan.row_hits(strip, t), want[:2])
            assert_same(_scan.row_hits(strip, t, lowest_first=True), want[:2])
            assert_same(_scan.row_col_hits(strip, t, t_c), want)
        finally:
            _scan._MOST_SHARED = saved


def test_the_lowest_bound_pass_is_kept_for_alike_bounds_and_dropped_for_spread_ones(monkeypatch):
    """Bounds near each row's best in a wide strip: one pass; one very low bound: two."""
    strip, t, t_c = case(64, 4096, np.float32, seed=5, spread=0.0)
    t = np.sort(strip, axis=1)[:, -3]
    t_c = np.full(4096, np.median(t), dtype=np.float32)
    passes = []
    real = np.greater_equal

    def counting(x, bound, out=None):
        passes.append(np.ndim(bound))
        return real(x, bound, out=out)

    monkeypatch.setattr(_scan.np, "greater_equal", counting)
    assert_same(_scan.row_col_hits(strip, t, t_c), reference(strip, t, t_c))
    assert passes == [0]  # one pass against a scalar
    passes.clear()
    t[7] = -0.9
    assert_same(_scan.row_col_hits(strip, t, t_c), reference(strip, t, t_c))
    assert passes == [0, 2, 2]  # too many hits: one pass per bound


@given(
    shape=st.tuples(st.integers(0, 5), st.integers(0, 70)),
    density=st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_sparse_flatnonzero_equals_numpys(shape, density, seed):
    """The NumPy scans' word-wise nonzero: NumPy's result for any size (tails of fewer
    than 8 bytes included) and any density, on whole masks and on leading-row slices."""
    mask = np.random.default_rng(seed).random(shape) < density
    np.testing.assert_array_equal(_scan.sparse_flatnonzero(mask), np.flatnonzero(mask))
    np.testing.assert_array_equal(_scan.sparse_flatnonzero(mask[:2]), np.flatnonzero(mask[:2]))


def test_sparse_flatnonzero_expands_every_byte_pattern_of_a_word():
    """All 256 patterns of true bytes in one 8-byte word (one word per pattern, then a
    3-byte tail): each word's expansion gives NumPy's positions."""
    patterns = np.arange(256)
    mask = np.zeros(256 * 8 + 3, dtype=bool)
    mask[: 256 * 8] = ((patterns[:, None] >> np.arange(8)) & 1).astype(bool).reshape(-1)
    mask[-2] = True
    np.testing.assert_array_equal(_scan.sparse_flatnonzero(mask), np.flatnonzero(mask))
