"""Sparse inputs (issue 15): TF-IDF-like documents against scikit-learn, in the same process.

Data: synthetic TF-IDF-like rows, as a vectoriser makes them: about ``--nnz`` (100)
distinct terms per document from power-law (Zipf, exponent 1.1) column frequencies over ``--dim``
(2**18) columns, counts turned into ``(1 + log tf) * idf``, float64 CSR, **not**
L2-normalised (the library does that). Generation is not timed. Two parts, each printing
JSON lines (``"bench": ...``):

1. ``similarity``: ``dcs.cosine_similarity(X).compute()`` on ``--n-sim`` (20,000)
   documents against ``sklearn.metrics.pairwise.cosine_similarity(X)``, both in this
   process (threaded scheduler): times, their ratio (target >= 1.5 on 2 cores) and the
   largest absolute difference (target <= 1e-12). Median of ``--repeat`` runs.
2. ``topk``: ``dcs.topk(X, k=10, exclude_self=True)`` on ``--n-topk`` (200,000)
   documents against ``NearestNeighbors(metric="cosine", algorithm="brute").fit(X)
   .kneighbors(X, 11)``; each side runs in a fresh child process, so its peak RSS is its
   own (targets: >= 3 x faster, peak RSS <= 2 GiB). Neighbours must agree except among
   exact ties (equal similarity to 1e-12, or the self match of duplicate documents).
   ``--sklearn-queries Q`` lets scikit-learn answer only the first Q rows (against all N
   documents) and scales its time by N / Q: brute force is linear in the queries, and at
   200,000 documents the full scikit-learn run takes hours here. The output says which.

    python benchmarks/bench_sparse.py                    # both parts at full size (minutes)
    python benchmarks/bench_sparse.py --part topk        # one part
    python benchmarks/bench_sparse.py --quick            # tiny sizes (used by the test suite)
    python benchmarks/bench_sparse.py --n 5000           # both parts at 5,000 documents
    python benchmarks/bench_sparse.py --part topk --sklearn-queries 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def tfidf(n: int, dim: int, nnz: int, seed: int = 0):
    """``n`` TF-IDF-like documents (CSR float64, rows not normalised)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, dim + 1) ** 1.1
    p /= p.sum()
    pilot = [len(np.unique(rng.choice(dim, size=nnz, p=p))) for _ in range(50)]
    draws = nnz * nnz / max(1.0, float(np.mean(pilot)))  # frequent terms repeat: ~nnz distinct per row
    lengths = np.maximum(1, rng.poisson(draws, size=n))
    cols = rng.choice(dim, size=int(lengths.sum()), p=p)
    cols = rng.permutation(dim)[cols]  # frequent terms spread over the columns
    rows = np.repeat(np.arange(n), lengths)
    tf = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(n, dim))  # duplicates summed
    df = np.bincount(tf.indices, minlength=dim)
    idf = np.log((1 + n) / (1 + df)) + 1
    tf.data = (1 + np.log(tf.data)) * idf[tf.indices]
    return tf


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def median_time(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def part_similarity(args) -> dict:
    import dask
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    import dask_cosim as dcs

    X = tfidf(args.n_sim, args.dim, args.nnz, seed=1)
    with dask.config.set(scheduler="threads"):
        t_ours, ours = median_time(lambda: dcs.cosine_similarity(X).compute(), args.repeat)
    t_sk, ref = median_time(lambda: sk_cosine(X), args.repeat)
    diff = 0.0
    for r0 in range(0, X.shape[0], 2048):  # no third N x N array
        diff = max(diff, float(np.abs(ours[r0 : r0 + 2048] - ref[r0 : r0 + 2048]).max()))
    return log(
        {
            "bench": "similarity",
            "n": args.n_sim,
            "dim": args.dim,
            "nnz_per_row": round(X.nnz / X.shape[0], 1),
            "dask_cosim_s": round(t_ours, 3),
            "sklearn_s": round(t_sk, 3),
            "speedup": round(t_sk / t_ours, 2),
            "max_abs_diff": diff,
            "peak_rss_gib": round(peak_rss_gib(), 2),
        }
    )


def child_topk(args) -> None:
    """One side of the top-k part, in a fresh process: writes its neighbours and timings."""
    import dask
    from sklearn.neighbors import NearestNeighbors

    import dask_cosim as dcs
    import dask_cosim.reductions  # noqa: F401  (the package imports it on first use: not timed)

    X = tfidf(args.n_topk, args.dim, args.nnz, seed=2)
    rss0 = peak_rss_gib()
    t0 = time.perf_counter()  # imports and data are not timed
    if args.child == "ours":
        with dask.config.set(scheduler="threads"):
            vals, idx = dask.compute(*dcs.topk(X, k=10, exclude_self=True))
    else:  # the first --sklearn-queries rows (all by default) as queries against all documents
        queries = X[: args.sklearn_queries] if args.sklearn_queries else X
        dist, nbr = NearestNeighbors(metric="cosine", algorithm="brute").fit(X).kneighbors(queries, 11)
        vals, idx = _drop_self(1.0 - dist, nbr)
    seconds = time.perf_counter() - t0
    if args.child == "sklearn" and args.sklearn_queries:  # brute force: time linear in the queries
        seconds *= X.shape[0] / min(args.sklearn_queries, X.shape[0])
    np.save(Path(args.out) / f"{args.child}_vals.npy", vals)
    np.save(Path(args.out) / f"{args.child}_idx.npy", idx)
    info = {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "rss_after_data_gib": rss0}
    (Path(args.out) / f"{args.child}.json").write_text(json.dumps(info))


def _drop_self(sims, nbr):
    """The 10 neighbours of each row other than itself (the 11th when the row is absent,
    which happens only when duplicates of the row fill the first places)."""
    n = len(nbr)
    self_at = nbr == np.arange(n)[:, None]
    keep = ~self_at
    keep[~self_at.any(axis=1), -1] = False
    return sims[keep].reshape(n, -1), nbr[keep].reshape(n, -1)


def agreement(vals, idx, ref_vals, ref_idx, tol=1e-12) -> dict:
    """Rows whose neighbour sets agree, and the differences that are not exact ties."""
    same = np.array([set(a) == set(b) for a, b in zip(idx.tolist(), ref_idx.tolist(), strict=True)])
    bad = 0
    for r in np.flatnonzero(~same):  # a difference is a tie if it sits at the k-th value
        kth = min(vals[r, -1], ref_vals[r, -1])
        ours_only = [v for i, v in zip(idx[r], vals[r], strict=True) if i not in set(ref_idx[r])]
        theirs_only = [v for i, v in zip(ref_idx[r], ref_vals[r], strict=True) if i not in set(idx[r])]
        if any(abs(v - kth) > tol for v in ours_only + theirs_only):
            bad += 1
    return {
        "rows_identical": float(same.mean()),
        "rows_differing_not_ties": int(bad),
        "max_abs_value_diff": float(np.abs(vals - ref_vals).max()),
    }


def part_topk(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("ours", "sklearn"):
            cmd = [sys.executable, __file__, "--child", side, "--out", tmp, "--n-topk", str(args.n_topk),
                   "--dim", str(args.dim), "--nnz", str(args.nnz),
                   "--sklearn-queries", str(args.sklearn_queries or 0)]  # fmt: skip
            subprocess.run(cmd, check=True)
            results[side] = json.loads((Path(tmp) / f"{side}.json").read_text())
            results[side]["vals"] = np.load(Path(tmp) / f"{side}_vals.npy")
            results[side]["idx"] = np.load(Path(tmp) / f"{side}_idx.npy")
    ours, sk = results["ours"], results["sklearn"]
    rows = len(sk["idx"])  # the rows scikit-learn answered (all, or the first --sklearn-queries)
    return log(
        {
            "bench": "topk",
            "n": args.n_topk,
            "dim": args.dim,
            "k": 10,
            "dask_cosim_s": round(ours["seconds"], 3),
            "sklearn_s": round(sk["seconds"], 3),
            "sklearn_queries": rows,
            "sklearn_s_is": "measured" if rows == args.n_topk else f"extrapolated from {rows} query rows",
            "speedup": round(sk["seconds"] / ours["seconds"], 2),
            "dask_cosim_peak_rss_gib": round(ours["peak_rss_gib"], 3),
            "sklearn_peak_rss_gib": round(sk["peak_rss_gib"], 3),
            "data_rss_gib": round(ours["rss_after_data_gib"], 3),
            **agreement(ours["vals"][:rows], ours["idx"][:rows], sk["vals"], sk["idx"]),
        }
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("similarity", "topk", "all"), default="all")
    parser.add_argument("--n", type=int, help="documents of both parts")
    parser.add_argument("--n-sim", type=int, default=20_000)
    parser.add_argument("--n-topk", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2**18)
    parser.add_argument("--nnz", type=int, default=100, help="distinct terms per document (about)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--sklearn-queries",
        type=int,
        default=None,
        help="scikit-learn answers only the first Q rows (against all N) and its time is scaled by N/Q "
        "(brute force is linear in the queries); the agreement is checked on those rows",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the tests)")
    parser.add_argument("--child", choices=("ours", "sklearn"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_sim, args.n_topk, args.dim, args.nnz, args.repeat = 300, 400, 2**12, 20, 1
        args.sklearn_queries = args.sklearn_queries or 200  # the extrapolated timing path too
    if args.n:
        args.n_sim = args.n_topk = args.n
    if args.child:
        child_topk(args)
        return 0
    log(
        {
            "bench": "machine",
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "load_avg": os.getloadavg(),
        }
    )
    if args.part in ("similarity", "all"):
        part_similarity(args)
    if args.part in ("topk", "all"):
        part_topk(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
