"""top-k neighbours vs the dense limit, faiss and scikit-learn; self-similarity; peak memory.

Three kinds of measurement (``--part topk``, ``self`` and ``anatomy``, ``memory``), each
reported as JSON lines (``"bench": ...``):

1. ``topk``: 2-D, N = M = 50,000, D = 128, float32, k = 10. ``dcs.topk`` (threaded
   scheduler, auto chunks) next to ``faiss.IndexFlatIP`` on normalised inputs,
   ``sklearn.neighbors.NearestNeighbors(metric="cosine", algorithm="brute")`` and the
   *dense limit*: NumPy matmul of the normalised inputs in the same blocks as
   ``dcs.topk`` (each block into a reused buffer, so nothing but the GEMMs), run both as
   one task per core (BLAS 1 thread each) and as one BLAS call per block using every
   core; the faster counts. Throughput is GFLOP/s-equivalent ``2 N M D / t``;
   ``ratio_to_dense_limit = t_limit / t``. Variants run interleaved (drifting machine
   load hits all alike); figures are medians of ``--repeat`` runs after a warm-up.
   faiss is also run in fresh processes with ``OPENBLAS_CORETYPE`` forced (its bundled
   OpenBLAS reads it at load time), each next to its own dense limit.
2. ``self_similarity``: ``dcs.topk(a, k=10)`` vs ``dcs.topk(a, a.copy(), k=10)``, same data:
   ``speedup_self_vs_copy`` (median over median), ``speedup_rounds`` (round by round, each
   pair run back to back) and their median ``speedup_paired_median``, which drifting load
   moves less.
   ``self_anatomy``: one task of each kind those two graphs run (diagonal, off-diagonal;
   pivot, pruned), on one thread, and the same task's GEMMs replayed alone: the ratio
   the tasks allow and the ratio of the products alone (:func:`part_anatomy`).
3. ``memory``: N = M = 200,000, D = 64, float32 (S would be 160 GB), k = 10, in a fresh
   process: wall time and that process's peak RSS.

    python benchmarks/bench_topk.py                 # all parts, full size (many minutes)
    python benchmarks/bench_topk.py --part topk     # one part
    python benchmarks/bench_topk.py --quick         # tiny sizes (used by the test suite)
    python benchmarks/bench_topk.py --part self --d 384   # another width (parts 1 and 2)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import dask
import numpy as np
from _machine import tokenize_hash  # benchmarks/_machine.py (this script's folder is on sys.path)
from threadpoolctl import threadpool_info, threadpool_limits

import dask_cosim as dcs
from dask_cosim import _select  # the per-block top-k kernels (the self-similarity anatomy)
from dask_cosim.reductions import _prepare as prepare  # the blocks topk uses

CORES = len(os.sched_getaffinity(0))
CORETYPES = ("Haswell", "Zen", "SkylakeX")


def log(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


#: CPU seconds (all threads of this process) of the last ``paired_times`` call, by name.
CPU: dict[str, float] = {}
#: Every wall time of the last ``paired_times`` call, by name, in the order run.
ROUNDS: dict[str, list[float]] = {}


#: Seconds of pause before each timed run (as ``bench_core.SETTLE_S``): OpenBLAS's pool
#: threads (NumPy's, and faiss's own copy) keep spinning for a while after a multi-threaded
#: call, stealing a core from whatever runs next.
SETTLE_S = 0.3


def paired_times(fns: dict, repeat: int, slow: dict | None = None) -> dict[str, float]:
    """Median wall seconds of each function, interleaved; ``slow`` maps names to fewer repeats.

    Median CPU seconds (this process, all threads) land in :data:`CPU`: on a shared
    machine they move much less with other users' load than wall time does.
    """
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeat):
        for name, fn in fns.items():
            if slow and r >= slow.get(name, repeat):
                continue
            time.sleep(SETTLE_S)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    CPU.clear()
    CPU.update({name: statistics.median(ts) for name, ts in cpu.items()})
    ROUNDS.clear()
    ROUNDS.update(times)
    return {name: statistics.median(ts) for name, ts in times.items()}


def round_ratios(num: list[float], den: list[float]) -> list[float]:
    """``num[r] / den[r]`` for every round ``r`` of interleaved runs: each pair ran back to
    back, so a slow spell of the shared machine hits both of a round alike.

    >>> round_ratios([2.0, 3.0], [1.0, 2.0])
    [2.0, 1.5]
    """
    return [round(tn / td, 3) for tn, td in zip(num, den, strict=True)]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(x.dtype)


def data(n: int, m: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    return gen.standard_normal((n, d), dtype=np.float32), gen.standard_normal((m, d), dtype=np.float32)


# --------------------------------------------------------------------------- the dense limit


def dense_limit(an: np.ndarray, bn: np.ndarray, rows, cols, repeat: int) -> dict:
    """Seconds for the GEMMs alone, in the given blocks: per-core tasks and all-core BLAS."""
    r_edges = np.cumsum((0, *rows))
    c_edges = np.cumsum((0, *cols))
    blocks = [
        (r0, r1, c0, c1)
        for r0, r1 in zip(r_edges[:-1], r_edges[1:], strict=True)
        for c0, c1 in zip(c_edges[:-1], c_edges[1:], strict=True)
    ]
    bufs: dict[int, np.ndarray] = {}

    def one(block):
        r0, r1, c0, c1 = block
        import threading

        buf = bufs.setdefault(threading.get_ident(), np.empty((max(rows), max(cols)), dtype=an.dtype))
        out = buf[: r1 - r0, : c1 - c0] if (r1 - r0, c1 - c0) == buf.shape else None
        if out is None:
            np.matmul(an[r0:r1], bn[c0:c1].T)
        else:
            np.matmul(an[r0:r1], bn[c0:c1].T, out=out)

    def per_core():
        with threadpool_limits(1, "blas"), ThreadPoolExecutor(CORES) as pool:
            list(pool.map(one, blocks))

    def all_core_blas():
        with threadpool_limits(CORES, "blas"):
            for block in blocks:
                one(block)

    t = paired_times({"per_core": per_core, "all_core_blas": all_core_blas}, repeat)
    return {
        "t_limit_s": min(t.values()),
        "cpu_limit_s": min(CPU.values()),
        "t_limit_per_core_tasks_s": t["per_core"],
        "t_limit_all_core_blas_s": t["all_core_blas"],
    }


# --------------------------------------------------------------------------- baselines


def faiss_search(an: np.ndarray, bn: np.ndarray, k: int):
    import faiss

    index = faiss.IndexFlatIP(an.shape[1])
    index.add(bn)
    return index.search(an, k)


def sklearn_search(a: np.ndarray, b: np.ndarray, k: int):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=CORES).fit(b)
    dist, idx = nn.kneighbors(a)
    return 1.0 - dist, idx


def agreement(idx: np.ndarray, vals: np.ndarray, other_idx: np.ndarray, s_gap: np.ndarray) -> dict:
    """Share of rows with identical indices, overall and among rows without near-ties."""
    same = (idx == other_idx).all(axis=1)
    return {
        "rows_identical": round(float(same.mean()), 5),
        "rows_identical_without_ties": float(same[s_gap].mean()) if s_gap.any() else None,
    }


def tie_free_rows(
    vals: np.ndarray, an: np.ndarray, bn: np.ndarray, idx: np.ndarray, k: int, tol: float
) -> np.ndarray:
    """Rows whose top-k values and the next best are all more than ``tol`` apart (no near-ties)."""
    gaps = -np.diff(vals, axis=1)
    ok = (gaps > tol).all(axis=1)
    # the (k+1)-th best: the best value outside the top-k
    kth_next = np.empty(len(vals), dtype=np.float64)
    for start in range(0, len(an), 4096):
        s = an[start : start + 4096] @ bn.T
        np.put_along_axis(s, idx[start : start + 4096], -np.inf, axis=1)
        kth_next[start : start + 4096] = s.max(axis=1)
    return ok & (vals[:, -1] - kth_next > tol)


# --------------------------------------------------------------------------- parts


def part_topk(n: int, d: int, k: int, repeat: int, sklearn_repeat: int, coretypes) -> dict:
    """Part 1 (``sklearn_repeat=0`` leaves sklearn out)."""
    a, b = data(n, n, d)
    an, bn = unit(a), unit(b)
    vals_g, idx_g = dcs.topk(a, b, k=k)
    plan = prepare(a, b).plan
    limit = dense_limit(an, bn, plan.rows, plan.cols, repeat)
    fns = {
        "dask_cosim": lambda: dask.compute(vals_g, idx_g),
        "faiss": lambda: faiss_search(an, bn, k),
    }
    if sklearn_repeat:
        fns["sklearn"] = lambda: sklearn_search(a, b, k)
    t = paired_times(fns, repeat, slow={"sklearn": sklearn_repeat})
    cpu = dict(CPU)
    vals, idx = dask.compute(vals_g, idx_g)
    f_vals, f_idx = faiss_search(an, bn, k)
    tie_free = tie_free_rows(vals.astype(np.float64), an, bn, idx, k, tol=1e-5)
    flops = 2.0 * n * n * d
    row = {
        "bench": "topk",
        "shape": [n, n, d],
        "k": k,
        "dtype": "float32",
        "blocks": [len(plan.rows), len(plan.cols)],
        "block_shape": [max(plan.rows), max(plan.cols)],
        **{key: round(v, 3) for key, v in limit.items()},
        "gflops_dense_limit": round(flops / limit["t_limit_s"] / 1e9, 1),
    }
    for name, seconds in t.items():
        row[f"t_{name}_s"] = round(seconds, 3)
        row[f"cpu_{name}_s"] = round(cpu[name], 3)
        row[f"gflops_{name}"] = round(flops / seconds / 1e9, 1)
        row[f"ratio_to_dense_limit_{name}"] = round(limit["t_limit_s"] / seconds, 3)
        row[f"cpu_ratio_to_dense_limit_{name}"] = round(limit["cpu_limit_s"] / cpu[name], 3)
    row["ratio_to_dense_limit"] = row["ratio_to_dense_limit_dask_cosim"]
    row["load_avg_after"] = os.getloadavg()
    row["sklearn_repeats"] = min(repeat, sklearn_repeat)
    row["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE", "(not set)")
    row["faiss_openblas"] = [i.get("architecture") for i in threadpool_info() if "faiss" in i["filepath"]]
    row["tie_free_rows"] = round(float(tie_free.mean()), 5)
    row["vs_faiss"] = agreement(idx, vals, f_idx, tie_free)
    if sklearn_repeat:
        row["vs_sklearn"] = agreement(idx, vals, sklearn_search(a, b, k)[1], tie_free)
    row["max_abs_diff_values_vs_faiss"] = float(np.abs(vals - f_vals).max())
    log(row)
    for coretype in coretypes:
        log(faiss_in_fresh_process(coretype, n, d, k, repeat))
    return row


def faiss_in_fresh_process(coretype: str, n: int, d: int, k: int, repeat: int) -> dict:
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    cmd = [
        sys.executable,
        __file__,
        "--faiss-worker",
        "--n",
        str(n),
        "--d",
        str(d),
        "--k",
        str(k),
        "--repeat",
        str(repeat),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    row = {"bench": "faiss_coretype", "OPENBLAS_CORETYPE": coretype}
    if proc.returncode != 0:
        sig = -proc.returncode if proc.returncode < 0 else None
        row["failed"] = f"exit {proc.returncode}" + (f" (signal {sig})" if sig else "")
        row["stderr_tail"] = proc.stderr[-300:]
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


def faiss_worker(n: int, d: int, k: int, repeat: int) -> None:
    """Child process: faiss under this process's OPENBLAS_CORETYPE, next to its dense limit."""
    a, b = data(n, n, d)
    an, bn = unit(a), unit(b)
    plan = prepare(a, b).plan
    limit = dense_limit(an, bn, plan.rows, plan.cols, repeat)
    t = paired_times({"faiss": lambda: faiss_search(an, bn, k)}, repeat)["faiss"]
    cpu = CPU["faiss"]
    flops = 2.0 * n * n * d
    arch = {i["prefix"]: i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"}
    print(
        json.dumps(
            {
                "openblas_architectures": arch,
                "t_faiss_s": round(t, 3),
                "gflops_faiss": round(flops / t / 1e9, 1),
                "t_limit_s": round(limit["t_limit_s"], 3),
                "ratio_to_dense_limit_faiss": round(limit["t_limit_s"] / t, 3),
                "cpu_ratio_to_dense_limit_faiss": round(limit["cpu_limit_s"] / cpu, 3),
            }
        )
    )


def part_self(n: int, d: int, k: int, repeat: int) -> dict:
    a, _ = data(n, 1, d, seed=1)
    self_g = dcs.topk(a, k=k)
    copy_g = dcs.topk(a, a.copy(), k=k)
    t = paired_times({"self": lambda: dask.compute(*self_g), "copy": lambda: dask.compute(*copy_g)}, repeat)
    cpu = dict(CPU)
    rounds = round_ratios(ROUNDS["copy"], ROUNDS["self"])
    (v1, i1), (v2, i2) = dask.compute(*self_g), dask.compute(*copy_g)
    return log(
        {
            "bench": "self_similarity",
            "shape": [n, n, d],
            "k": k,
            "t_self_s": round(t["self"], 3),
            "t_copy_s": round(t["copy"], 3),
            "speedup_self_vs_copy": round(t["copy"] / t["self"], 3),
            "speedup_paired_median": round(statistics.median(rounds), 3),
            "speedup_rounds": rounds,
            "cpu_speedup_self_vs_copy": round(cpu["copy"] / cpu["self"], 3),
            "load_avg_after": os.getloadavg(),
            "indices_identical_rows": round(float((i1 == i2).all(axis=1).mean()), 5),
            "max_abs_diff_values": float(np.abs(v1 - v2).max()),
        }
    )


class _RecordingNumpy:
    """NumPy as :mod:`dask_cosim._select` sees it, with every ``matmul`` call appended to ``calls``."""

    def __init__(self, calls: list[tuple]):
        self._calls = calls

    def __getattr__(self, name: str):
        return getattr(np, name)

    def matmul(self, x, y, out=None):
        self._calls.append((x, y, out))
        return np.matmul(x, y, out=out)


class RecordedGemms:
    """While active, records the GEMMs of the top-k kernels (``np.matmul`` as
    :mod:`dask_cosim._select` calls it) so that they can be replayed alone: the cost of
    a task's products without its selection."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __enter__(self):
        self._patch = mock.patch.object(_select, "np", _RecordingNumpy(self.calls))
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()

    def replay(self) -> None:
        """The recorded GEMMs again, on one BLAS thread (as the tasks ran them)."""
        with threadpool_limits(limits=1, user_api="blas"):
            for x, y, out in self.calls:
                np.matmul(x, y, out=out)


def part_anatomy(n: int, d: int, k: int, repeat: int) -> dict:
    """One task of each kind that part 2's two graphs run, on one thread, next to its
    GEMMs alone (the same calls replayed), interleaved; medians.

    The self-similarity graph runs ``nb`` diagonal tasks and ``nb (nb - 1) / 2``
    off-diagonal ones (both directions); the ``a.copy()`` graph runs ``nb`` pivots
    (unpruned) and ``nb (nb - 1)`` pruned tasks. From these, ``tasks_ratio`` is the
    copy/self ratio the tasks allow on one thread, and ``gemm_ratio`` the ratio of the
    products alone: the ceiling that cheaper selection could approach.
    """
    a, _ = data(n, 1, d, seed=1)
    rows = dcs.topk(a, k=k)[0].chunks[-2]
    nb, r = max(2, len(rows)), min(rows[0], n // 2)
    an = unit(a)
    b0, b1 = an[:r], an[r : 2 * r]
    c0, c1 = b0.copy(), b1.copy()  # the copy graph's column blocks
    one = {"k": k, "blas_threads": 1}
    d0 = _select.topk_block(b0, b0, symmetric=True, **one)
    d1 = _select.topk_block(b1, b1, row_offset=r, col_offset=r, symmetric=True, **one)
    p0 = _select.topk_block(b0, c0, **one)
    kinds = {
        "diagonal": lambda: _select.topk_block(b0, b0, symmetric=True, **one),
        "off_diagonal": lambda: _select.topk_block(
            b0, b1, col_offset=r, both=True, row_pivot=d0, col_pivot=d1, **one
        ),
        "copy_pivot": lambda: _select.topk_block(b0, c0, **one),
        "copy_pruned": lambda: _select.topk_block(b0, c1, col_offset=r, row_pivot=p0, **one),
    }
    gemms = {}
    for name, task in kinds.items():
        with RecordedGemms() as gemms[name]:
            task()
    total: dict[str, list[float]] = {name: [] for name in kinds}
    alone: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(repeat):
        for name, task in kinds.items():
            t0 = time.perf_counter()
            task()
            t1 = time.perf_counter()
            gemms[name].replay()
            total[name].append(t1 - t0)
            alone[name].append(time.perf_counter() - t1)
    t = {name: statistics.median(ts) for name, ts in total.items()}
    g = {name: statistics.median(ts) for name, ts in alone.items()}
    pairs = nb * (nb - 1) / 2

    def ratio(x):
        copy = nb * x["copy_pivot"] + 2 * pairs * x["copy_pruned"]
        return copy / (nb * x["diagonal"] + pairs * x["off_diagonal"])

    return log(
        {
            "bench": "self_anatomy",
            "shape": [n, n, d],
            "k": k,
            "block_rows": r,
            "row_blocks": nb,
            **{f"t_{name}_s": round(v, 4) for name, v in t.items()},
            **{f"t_{name}_gemm_s": round(v, 4) for name, v in g.items()},
            **{f"t_{name}_rest_s": round(t[name] - g[name], 4) for name in kinds},
            "gemm_calls": {name: len(rec.calls) for name, rec in gemms.items()},
            "tasks_ratio": round(ratio(t), 3),
            "gemm_ratio": round(ratio(g), 3),
            "load_avg_after": os.getloadavg(),
        }
    )


def part_memory(n: int, d: int, k: int, self_similar: bool) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", "--n", str(n), "--d", str(d), "--k", str(k)]
    if self_similar:
        cmd.append("--self")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return log({"bench": "memory", **row})


def memory_worker(n: int, d: int, k: int, self_similar: bool) -> None:
    """Child process: one topk run; prints wall time and this process's peak RSS."""
    a, b = data(n, n, d, seed=2)
    if self_similar:
        b = None
    t0 = time.perf_counter()
    vals, idx = dask.compute(*dcs.topk(a, b, k=k))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s_bytes = n * n * 4
    print(
        json.dumps(
            {
                "shape": [n, n, d],
                "k": k,
                "self_similar": self_similar,
                "full_S_GB": round(s_bytes / 1e9, 1),
                "t_s": round(seconds, 1),
                "gflops": round(2.0 * n * n * d / seconds / 1e9, 1),
                "peak_rss_GiB": round(peak / 2**30, 3),
                "load_avg_after": os.getloadavg(),
                "S_over_peak_rss": round(s_bytes / peak, 1),
                "finite_rows": float(np.isfinite(vals).all(axis=1).mean()),
            }
        )
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--part", choices=["all", "topk", "self", "anatomy", "memory"], default="all")
    p.add_argument("--repeat", type=int, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--sklearn-repeat", type=int, default=5, help="repeats of the (slow) sklearn baseline")
    p.add_argument("--skip-sklearn", action="store_true", help="leave the (slow) sklearn baseline out")
    p.add_argument(
        "--coretypes", default=",".join(CORETYPES), help="OPENBLAS_CORETYPE values for fresh faiss processes"
    )
    p.add_argument("--faiss-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--self", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help="vectors of the topk, self and anatomy parts (default 50,000)")
    p.add_argument("--d", type=int, help="their dimension (default 128)")
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    if args.faiss_worker:
        return faiss_worker(args.n, args.d, args.k, args.repeat)
    if args.memory_worker:
        return memory_worker(args.n, args.d, args.k, args.self)
    blas = [(i["prefix"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    log(
        {
            "bench": "machine",
            "cpu": model,
            "cores": CORES,
            "blas": blas,
            "tokenize_hash": tokenize_hash(),
            "load_avg": os.getloadavg(),
        }
    )
    repeat = args.repeat or (2 if args.quick else 5)
    n, n_mem = (1500, 8000) if args.quick else (50_000, 200_000)
    n = args.n or n
    d = args.d or (32 if args.quick else 128)
    rows = []
    if args.part in ("all", "topk"):
        coretypes = ("Haswell",) if args.quick else [c for c in args.coretypes.split(",") if c]
        sk_repeat = 0 if args.skip_sklearn else args.sklearn_repeat
        rows.append(part_topk(n, d, args.k, repeat, sk_repeat, coretypes))
    if args.part in ("all", "self"):
        rows.append(part_self(n, d, args.k, repeat))
    if args.part in ("all", "anatomy"):
        rows.append(part_anatomy(n, d, args.k, 3 if args.quick else 2 * repeat))
    if args.part in ("all", "memory"):
        for self_similar in (True, False):
            rows.append(part_memory(n_mem, 16 if args.quick else 64, args.k, self_similar))
    log({"bench": "done", "load_avg": os.getloadavg()})
    return rows


if __name__ == "__main__":
    main()
