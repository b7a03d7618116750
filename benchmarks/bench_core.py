"""Dense cosine similarity vs the hardware limit, in ONE process run.

The limit is ``numpy.matmul`` of already-normalised inputs (one BLAS call over the
whole batch). ``dcs.cosine_similarity(...).compute()`` runs with the default (threaded)
scheduler and auto chunks: ``t_dask_cosim_s`` computes a result built once,
``t_call_s`` is the whole call (the graph built each time, as a script does). The
``tiny`` row is the round trip of a ``(2, 10, 5) x (2, 12, 5)`` call next to the seed's
scikit-learn loop; the ``task_128`` and ``task_768`` rows are one product task of a
10^6-vector job on one thread (see :func:`task_kernel`); the ``self_128`` and ``self_768``
rows are a self-similarity's triangle against computing every block (:func:`self_similarity`).
Each figure is the median of ``--repeat`` runs (all variants interleaved) after a warm-up;
``ratio_to_limit = t_limit / t_ours`` (higher is better, 1.0 = the limit).

On the threaded scheduler ``S.compute()`` allocates the result and each block task writes
into its region (no assembly copy afterwards, see README: Performance);
``ratio_store_into_out`` is the same graph written by ``S.store(out)`` into a result buffer the
caller keeps and reuses (dask's ``store``: each block is computed, then copied in).
``ratio_normalised_copies`` is the graph whose normalise tasks write normalised copies of
the inputs (the products then read them back) instead of handing the products raw blocks
and inverse norms; ``copies_over_ours_paired`` is its time over ours, round by round.
``ratio_dask_optimized`` is ``S.compute(optimize_graph=True)``: dask's graph optimisation,
which a graph of in-memory inputs skips by default (nothing in it to fuse or cull);
``optimized_over_ours_paired`` is its time over ours, round by round.
Fresh memory is slow to fault in on some Linux machines: the ``fresh_memory`` row times
faulting in a W1-sized result right after freeing as much and after 3 s idle (on a VM with
free page reporting, the host takes back memory freed for about 2 s, and faulting it in
again costs several times more). ``--primed`` faults in and frees twice a run's result
size right before each timed run, so that every variant's fresh output lands on memory
freed a moment ago; without it, which variant pays the host's faults depends on how long
ago its memory was freed. NumPy requests transparent huge pages for large arrays:
compare a run with ``NUMPY_MADVISE_HUGEPAGE=0``. ``ratio_kept_buffers`` leaves that cost
out of both sides: the limit writes into an output it keeps across runs
(``matmul(..., out=)``) and so do our product tasks (the in-place graph of
``S.compute()``, into a buffer kept across runs); ``t_limit_s - t_limit_kept_s`` is what
the limit's fresh output cost it.

    python benchmarks/bench_core.py            # W1 and W2 as in the core issue
    python benchmarks/bench_core.py --primed   # every fresh output on memory freed a moment ago
    python benchmarks/bench_core.py --quick    # tiny sizes (used by the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import dask
import numpy as np
from _machine import fault_in, fresh_memory, tokenize_hash  # benchmarks/_machine.py, on sys.path
from threadpoolctl import threadpool_info

import dask_cosim as dcs
from dask_cosim._result import SimilarityArray
from dask_cosim.core import prepare, similarity_from

CORES = len(os.sched_getaffinity(0))


#: Seconds of pause before each timed run. OpenBLAS's pool threads keep spinning for a
#: while after a multi-threaded call, stealing a core from whatever runs next; without the
#: pause the variant timed right after the limit paid for it (W1 up to 40 % slower here).
SETTLE_S = 0.3


#: With ``--primed``: before each timed run, fault in and free this many times the bytes
#: of the run's result (:func:`_machine.fault_in`), so that every variant's fresh output
#: lands on memory freed a moment ago, not on memory the host took back (see
#: :func:`_machine.fresh_memory`). 0: off (the default), the memory as the runs leave it.
PRIME_FACTOR = 0.0


def paired_times(fns, repeat: int, out_bytes: int = 0) -> list[list[float]]:
    """Every time of each function, run interleaved so drifting machine load hits all alike.

    ``out_bytes``: the size of the largest result the functions allocate (for ``--primed``).
    """
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times, strict=True):
            if PRIME_FACTOR and out_bytes:
                fault_in(int(PRIME_FACTOR * out_bytes))
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the round-by-round ratios ``num[r] / den[r]`` of interleaved runs."""
    return round(statistics.median(tn / td for tn, td in zip(num, den, strict=True)), 3)


def ratio_figures(t_limit: list[float], t_ours: list[float]) -> dict[str, float]:
    """``ratio_to_limit`` (median over median) plus two noise-robust views of the same runs.

    ``ratio_paired_median`` is the median of the per-round ratios (each limit run is paired with
    the run right after it, so a slow spell of the shared machine hits both); ``ratio_best`` is
    best time over best time.
    """
    return {
        "ratio_to_limit": round(statistics.median(t_limit) / statistics.median(t_ours), 3),
        "ratio_paired_median": paired_ratio(t_limit, t_ours),
        "ratio_best": round(min(t_limit) / min(t_ours), 3),
    }


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sklearn_loop(a, b):
    from sklearn.metrics.pairwise import cosine_similarity

    out = np.empty((a.shape[0], a.shape[1], b.shape[1]))
    for k in range(a.shape[0]):
        out[k] = cosine_similarity(a[k], b[k])
    return out


def workload(name, a, b, repeat, with_sklearn=False):
    an, bnt = unit(a), np.swapaxes(unit(b), -1, -2)
    S = dcs.cosine_similarity(a, b)
    with dask.config.set({"cosine.blas-threads": CORES}):
        S_over = dcs.cosine_similarity(a, b)  # every dask thread with all-core BLAS
    out = np.empty(S.shape, S.dtype)  # a result buffer the caller keeps and reuses
    kept_limit, kept_ours = np.empty(S.shape, S.dtype), np.empty(S.shape, S.dtype)
    in_place = S._written_into(kept_ours)  # our product tasks, writing into a buffer kept across runs
    fns = [
        lambda: np.matmul(an, bnt),
        S.compute,
        lambda: dcs.cosine_similarity(a, b).compute(),  # the whole call: graph built each time
        S_over.compute,
        lambda: S.store(out, lock=False),
        normalised_copies_graph(a, b).compute,
        lambda: S.compute(optimize_graph=True),  # dask's graph optimisation, which ours skips
        lambda: np.matmul(an, bnt, out=kept_limit),  # the limit without faulting in fresh output
        lambda: dask.compute(in_place, **S._local_options({})),  # ours likewise
    ]
    if with_sklearn:
        fns.append(lambda: sklearn_loop(a, b))
    times = paired_times(fns, repeat, S.size * S.dtype.itemsize)  # no .nbytes under query planning
    t_limit, t_ours, t_call, t_over, t_store, t_copies, t_optimized, t_limit_kept, t_ours_kept, *t_sk = (
        statistics.median(ts) for ts in times
    )
    got = S.compute()
    ref = np.matmul(an, bnt)
    err = float(max(np.max(np.abs(x - ref)) for x in (got, out, kept_ours)))
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] * a.shape[2]
    row = {
        "workload": name,
        "shape": [list(a.shape), list(b.shape)],
        "dtype": str(a.dtype),
        "chunks": [len(c) for c in S.chunks],
        "t_limit_s": round(t_limit, 4),
        "t_dask_cosim_s": round(t_ours, 4),
        **ratio_figures(times[0], times[1]),
        "t_call_s": round(t_call, 4),
        "ratio_call_to_limit": round(t_limit / t_call, 3),
        "gflops_dask_cosim": round(flops / t_ours / 1e9, 1),
        "ratio_oversubscribed_blas": round(t_limit / t_over, 3),
        "ratio_store_into_out": round(t_limit / t_store, 3),
        "ratio_normalised_copies": round(t_limit / t_copies, 3),
        "copies_over_ours_paired": paired_ratio(times[5], times[1]),
        "ratio_dask_optimized": round(t_limit / t_optimized, 3),
        "optimized_over_ours_paired": paired_ratio(times[6], times[1]),
        "t_limit_kept_s": round(t_limit_kept, 4),
        "t_dask_cosim_kept_s": round(t_ours_kept, 4),
        "ratio_kept_buffers": round(t_limit_kept / t_ours_kept, 3),
        "ratio_kept_paired_median": paired_ratio(times[7], times[8]),
        "max_abs_err_vs_limit": err,
    }
    if with_sklearn:
        row["t_sklearn_loop_s"] = round(t_sk[0], 4)
        row["speedup_vs_sklearn_loop"] = round(t_sk[0] / t_ours, 2)
        row["call_speedup_vs_sklearn_loop"] = round(t_sk[0] / t_call, 2)
    print(json.dumps(row), flush=True)
    return row


def normalised_copies_graph(a, b):
    """The same graph with normalise tasks that write normalised copies of their blocks
    (dask_cosim before its products normalised in cache: README, Performance)."""
    prep = prepare(a, b, scaled=False)
    return SimilarityArray.wrap(similarity_from(prep), prep)


def tiny_call(repeat: int, calls: int = 200) -> dict:
    """The round trip of one tiny call, ``(2, 10, 5) x (2, 12, 5)``, against the seed's loop."""
    gen = np.random.default_rng(3)
    a, b = gen.random((2, 10, 5)), gen.random((2, 12, 5))
    fns = [lambda: dcs.cosine_similarity(a, b).compute(), lambda: sklearn_loop(a, b)]
    for fn in fns:
        fn()
    runs = [[], []]
    for _ in range(repeat):  # each figure: the median of `calls` calls, interleaved in rounds
        for fn, ts in zip(fns, runs, strict=True):
            one = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                one.append(time.perf_counter() - t0)
            ts.append(statistics.median(one))
    t_ours, t_sk = statistics.median(runs[0]), statistics.median(runs[1])
    np.testing.assert_allclose(fns[0](), fns[1](), rtol=0, atol=1e-12)
    row = {
        "workload": "tiny",
        "shape": [list(a.shape), list(b.shape)],
        "t_call_ms": round(t_ours * 1e3, 3),
        "t_sklearn_loop_ms": round(t_sk * 1e3, 3),
        "call_over_sklearn_loop": round(t_ours / t_sk, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def task_kernel(dim: int, repeat: int, quick: bool = False) -> dict:
    """One product task of a cluster job, on one thread, next to the limit on that thread.

    The block is the planner's for the self-similarity of ``(10^6, dim)`` float32 (what each
    worker thread of such a job computes, one task at a time): ``t_limit_s`` is NumPy's
    matmul of the pre-normalised blocks into a kept buffer, ``t_task_s`` the product task's
    kernel (:func:`dask_cosim._kernels.similarity_block` on raw blocks with their inverse
    norms, into a kept buffer), ``t_thin_panels_s`` the same kernel in panels of
    ``PANEL_BYTES`` only, however few rows that leaves a wide block (``MIN_PANEL_ROWS = 1``:
    this package before the panels kept a floor of rows).
    """
    import dask.array as da
    from threadpoolctl import threadpool_limits

    from dask_cosim import _kernels

    n = 1000 if quick else 1_000_000
    a = da.zeros((n, dim), dtype="float32", chunks=(max(1, n // 10), dim))
    side = dcs.plan(a, op="similarity").plan.rows[0]
    gen = np.random.default_rng(4)
    x, y = (gen.standard_normal((side, dim), dtype=np.float32) for _ in range(2))
    xs, ys = (_kernels.normalize_rows(v, compute_dtype="float32", scaled=True) for v in (x, y))
    xn, ynt = unit(x), np.ascontiguousarray(unit(y).T)
    out = np.empty((side, side), np.float32)
    floor = _kernels.MIN_PANEL_ROWS

    def task(min_rows: int):
        _kernels.MIN_PANEL_ROWS = min_rows
        try:
            _kernels.similarity_block(xs, ys, out=out, blas_threads=1)
        finally:
            _kernels.MIN_PANEL_ROWS = floor

    with threadpool_limits(1):
        limit = lambda: np.matmul(xn, ynt, out=out)  # noqa: E731
        times = paired_times([limit, lambda: task(floor), lambda: task(1)], repeat)
    t_limit, t_task, t_thin = (statistics.median(ts) for ts in times)
    row = {
        "workload": f"task_{dim}",
        "block": [side, side, dim],
        "dtype": "float32",
        "panel_rows": _kernels.panel_rows(side, 4),
        "t_limit_s": round(t_limit, 4),
        "t_task_s": round(t_task, 4),
        "t_thin_panels_s": round(t_thin, 4),
        "ratio_to_limit": round(t_limit / t_task, 3),
        "ratio_thin_panels": round(t_limit / t_thin, 3),
        "thin_over_task_paired": paired_ratio(times[2], times[1]),
    }
    print(json.dumps(row), flush=True)
    return row


def self_similarity(dim: int, repeat: int, quick: bool = False) -> dict:
    """``cosine_similarity(a)`` (one input: the upper triangle of blocks is computed, the
    blocks below the diagonal are its transposes) against ``cosine_similarity(a, a.copy())``
    (every block computed) and the limit ``matmul(an, an.T)``, each a fresh result.

    ``copy_over_self_paired`` is the time of the copy over the triangle, round by round:
    what mirroring saves (the triangle computes (nb + 1) / (2 nb) of the products and
    transposes the rest, which costs about as much as a product where ``dim`` is small).
    """
    n = 2048 if quick else 16384
    a = np.random.default_rng(5).standard_normal((n, dim), dtype=np.float32)
    an = unit(a)
    S_self, S_copy = dcs.cosine_similarity(a), dcs.cosine_similarity(a, a.copy())
    fns = [lambda: np.matmul(an, an.T), S_self.compute, S_copy.compute]
    times = paired_times(fns, repeat, an.shape[0] ** 2 * an.itemsize)
    t_limit, t_self, t_copy = (statistics.median(ts) for ts in times)
    got = S_self.compute()
    err = float(np.max(np.abs(got - np.matmul(an, an.T))))
    row = {
        "workload": f"self_{dim}",
        "shape": [n, n, dim],
        "dtype": "float32",
        "row_blocks": len(S_self.chunks[0]),
        "t_limit_s": round(t_limit, 4),
        "t_self_s": round(t_self, 4),
        "t_copy_s": round(t_copy, 4),
        "ratio_self_to_limit": round(t_limit / t_self, 3),
        "ratio_copy_to_limit": round(t_limit / t_copy, 3),
        "copy_over_self_paired": paired_ratio(times[2], times[1]),
        "max_abs_err_vs_limit": err,
        "symmetric": bool(np.array_equal(got, got.T)),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument(
        "--primed",
        action="store_true",
        help="before each timed run, fault in and free twice its result's size, so that every fresh "
        "output lands on memory freed a moment ago (see the fresh_memory row)",
    )
    args = p.parse_args(argv)
    global PRIME_FACTOR
    PRIME_FACTOR = 2.0 if args.primed else 0.0
    blas = [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    thp_file = Path("/sys/kernel/mm/transparent_hugepage/defrag")
    thp = thp_file.read_text().strip() if thp_file.exists() else "n/a"
    madvise = os.environ.get("NUMPY_MADVISE_HUGEPAGE", "default")
    print(
        f"# machine: {platform.processor() or platform.machine()}, BLAS {blas}, cores {CORES}, "
        f"THP defrag {thp}, NUMPY_MADVISE_HUGEPAGE={madvise}, dask tokenize hash {tokenize_hash()}, "
        f"load {os.getloadavg()[0]:.2f}, primed {args.primed}",
        flush=True,
    )
    # what a fresh W1-sized result costs to fault in here, reused and after an idle spell
    fresh = fresh_memory(100 * 400 * 500 * 8 // (64 if args.quick else 1), idle_s=0.2 if args.quick else 3.0)
    print(json.dumps({"workload": "fresh_memory", **fresh}), flush=True)
    gen = np.random.default_rng(0)
    scale = 8 if args.quick else 1
    rows = []
    w2 = (16 // scale, 2048 // scale, 256 // scale)
    a = gen.standard_normal((w2[0], w2[1], w2[2]), dtype=np.float32)
    b = gen.standard_normal((w2[0], w2[1], w2[2]), dtype=np.float32)
    rows.append(workload("W2", a, b, args.repeat))
    n_batch = 100 // scale
    a = np.random.default_rng(1).random((n_batch, 400 // scale, 200 // scale))
    b = np.random.default_rng(2).random((n_batch, 500 // scale, 200 // scale))
    rows.append(workload("W1", a, b, args.repeat, with_sklearn=True))
    rows.append(tiny_call(args.repeat, calls=10 if args.quick else 200))
    for dim in (128, 768):
        rows.append(task_kernel(dim // scale, args.repeat, quick=args.quick))
    for dim in (128, 768):
        rows.append(self_similarity(dim // scale, args.repeat, quick=args.quick))
    return rows


if __name__ == "__main__":
    main()
