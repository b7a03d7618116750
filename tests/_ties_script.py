"""Tie-sensitive runs of the reductions, for ``test_ties.py`` to run under several BLAS kernels.

Run as ``python -m tests._ties_script``: computes top-k (several chunkings, float32 and
float64, self-similarity by the triangle and by a copy), pairs exactly at a threshold and
duplicate groups on data with exact duplicates, zero and NaN vectors; checks within the
run that every chunking gives the same bits, and prints one JSON line: the BLAS kernels
threadpoolctl reports and a digest of every result (equal across kernels by the contract).
"""

from __future__ import annotations

import hashlib
import json

import dask
import numpy as np
from threadpoolctl import threadpool_info

import dask_cosim as dcs
from dask_cosim import _select

TOPK_CHUNKS = [(-1, -1), (7, 13), (40, 151), (13, 64)]
PAIR_CHUNKS = [(-1, -1), (7, 13), (40, 151)]
COPIES = [3, 90, 151, 299]


def data(dtype, seed=8):
    """``a`` (40, 32) and ``b`` (300, 32): copies of one vector of ``b`` in different blocks
    (next to a zero and a NaN vector), a scaled copy and an exact copy of it in ``a``."""
    gen = np.random.default_rng(seed)
    b = gen.standard_normal((300, 32)).astype(dtype)
    b[COPIES[1:]] = b[COPIES[0]]
    b[150] = 0.0
    b[152, 5] = np.nan
    a = gen.standard_normal((40, 32)).astype(dtype)
    a[4] = b[COPIES[0]] * 3
    a[7] = b[COPIES[0]]
    return a, b


def same(results) -> bool:
    first = results[0]
    return all(
        all(
            np.array_equal(x, y, equal_nan=True) and x.dtype == y.dtype for x, y in zip(r, first, strict=True)
        )
        for r in results[1:]
    )


def frame_arrays(frame) -> tuple:
    frame = frame.sort_values(["batch", "i", "j"]) if "j" in frame else frame.sort_index()
    return tuple(frame[c].to_numpy() for c in frame.columns)


def run() -> dict:
    _select.DIAGONAL_TILE = 7  # diagonal blocks of the triangle run as tiles (the kernel's own path)
    digest = hashlib.sha256()
    facts = {}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        a, b = data(dtype)
        tops = [dask.compute(*dcs.topk(a, b, k=6, chunks=chunks)) for chunks in TOPK_CHUNKS]
        assert same(tops), f"{name}: top-k differs between chunkings"
        vals, idx = tops[0]
        assert idx[4, :4].tolist() == COPIES and idx[7, :4].tolist() == COPIES, idx[[4, 7]]
        assert (vals[7, :4] == vals[7, 0]).all() and (vals[4, :4] == vals[4, 0]).all()
        x = np.concatenate([b[:120], b[:30]])  # exact duplicates in other blocks
        tri = [dask.compute(*dcs.topk(x, k=5, exclude_self=True, chunks=c)) for c in [(25, 25), (50, 50)]]
        cp = [
            dask.compute(*dcs.topk(x, x.copy(), k=5, exclude_self=True, chunks=c))
            for c in [(25, 25), (30, 70)]
        ]
        assert same(tri + cp), (
            f"{name}: self-similarity top-k differs from the copy path or between chunkings"
        )
        # thresholds exactly at a score (the copies' own score, the 3rd best of row 0): those pairs
        # are in; membership is decided by scores, so it is identical for every chunking and BLAS
        for threshold, wanted in [
            (float(vals[7, 0]), {(7, c) for c in COPIES}),
            (float(vals[0, 2]), {(0, int(idx[0, 2]))}),
        ]:
            pairs = [frame_arrays(dcs.pairs_above(a, b, threshold, chunks=c).compute()) for c in PAIR_CHUNKS]
            assert same([p[:3] for p in pairs]), f"{name}: pairs at {threshold!r} differ between chunkings"
            assert all((p[3] >= threshold).all() for p in pairs)
            found = set(zip(pairs[0][1].tolist(), pairs[0][2].tolist(), strict=True))
            assert wanted <= found, (threshold, wanted - found)
            digest.update(b"".join(v.tobytes() for v in pairs[0][:3]))
        groups = [
            frame_arrays(dcs.duplicate_groups(x, threshold=float(vals[7, 0]), chunks=c).compute())
            for c in [(25, 25), (150, 150)]
        ]
        assert same(groups), f"{name}: duplicate groups differ between chunkings"
        for part in (vals, idx, *tri[0]):
            digest.update(part.tobytes())
        digest.update(b"".join(v.tobytes() for v in groups[0]))
        facts[name] = {"copies": idx[7, :4].tolist(), "copy_score": float(vals[7, 0])}
    kernels = sorted(
        {str(i.get("architecture")) for i in threadpool_info() if i.get("internal_api") == "openblas"}
    )
    apis = sorted({str(i.get("internal_api")) for i in threadpool_info() if i.get("user_api") == "blas"})
    return {"kernels": kernels, "blas": apis, "digest": digest.hexdigest(), "facts": facts}


if __name__ == "__main__":
    with dask.config.set(scheduler="threads"):
        print(json.dumps(run()))
