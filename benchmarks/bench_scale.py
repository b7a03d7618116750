"""Cluster scale: graph size at 10^6-10^7 vectors, the scheduler's share, top-k resume.

Three parts, each printing JSON lines (``"bench": ...``):

1. ``graph``: lazy inputs (``da.zeros`` chunked by 100,000 rows), nothing computed. For
   each job: tasks in the graph (and, with ``dcs.plan`` where this version has it, the
   tasks of the job as a writer runs it), the time to build the graph and to run
   ``dask.optimize`` on it, and the peak RSS of a fresh process that only does that
   (the client's memory for the graph). Uses only the public API, so it also runs
   against older versions of the package (``PYTHONPATH=<old checkout>``).
2. ``scheduler``: ``topk`` self, N = 200,000, D = 64, k = 10, of a ``.npy`` file (as the
   command reads it), written with ``to_zarr`` on the embedded cluster of ``dask-cosim
   run`` (a ``LocalCluster``: worker processes; the scheduler runs on this process's
   event-loop thread). The scheduler's CPU seconds (that thread and distributed's offload
   thread) and, as an upper bound, this whole process's, against the worker processes'
   CPU seconds; the task count, wall time, and the GFLOP/s-equivalent ``2 N^2 D / t`` next
   to the dense limit (NumPy matmul of the pre-normalised input, all of S, one BLAS call
   per row block).
3. ``resume``: ``dask-cosim run A.npy -o knn.zarr --topk 10 --exclude-self`` run
   uninterrupted (time T), then again interrupted with SIGINT at T / 2 and rerun with
   ``--resume`` (time R), then uninterrupted once more (time T2): ``R / T``, and
   ``R / ((T + T2) / 2)``, the rerun against the two uninterrupted runs that bracket it;
   the resumed result must equal the uninterrupted ones.
   Both runs pay the command's fixed cost F (imports, the embedded cluster's start and
   shutdown), measured as the same command on 2,000 vectors; ``(R - F) / (T - F)`` is
   the ratio of the jobs' work alone, what a larger N or a cluster already running tends to.
   F depends on what is installed besides the package (the ``machine`` row says: the
   dashboard's ``bokeh``, and ``scipy``/``sparse``/``numba``, which ``dask.array`` imports
   when present): run it with the interpreter of the install to judge.
   ``--resume-rounds R`` repeats the four runs R times and adds the median ratios: on a
   host whose speed drifts, the uninterrupted and the resumed run of one round can see
   different machines.

    python benchmarks/bench_scale.py                  # all parts (several minutes)
    python benchmarks/bench_scale.py --part graph     # one part
    python benchmarks/bench_scale.py --quick          # tiny sizes (used by the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
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


def machine() -> dict:
    from threadpoolctl import threadpool_info

    blas = [
        (i.get("internal_api"), i.get("architecture")) for i in threadpool_info() if i["user_api"] == "blas"
    ]
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "blas": blas,
        "load": os.getloadavg(),
        "python": platform.python_version(),
        **fixed_cost_environment(),
    }


#: Installed packages that change the command's fixed cost: ``bokeh`` makes the embedded
#: cluster serve its dashboard (set up while the cluster starts); ``dask.array`` imports
#: ``scipy`` and ``sparse`` (which imports ``numba``) when they are there, in the command
#: and again in each worker process. The Quickstart's install (``pip install -e .``) has none.
FIXED_COST_PACKAGES = ("bokeh", "scipy", "sparse", "numba")


def fixed_cost_environment() -> dict:
    """Which of :data:`FIXED_COST_PACKAGES` are installed, and the seconds a fresh
    process takes to import ``dask.array`` (median of three)."""
    import importlib.util

    code = "import time; t = time.perf_counter(); import dask.array; print(time.perf_counter() - t)"
    seconds = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(3)]
    return {
        "installed": {name: importlib.util.find_spec(name) is not None for name in FIXED_COST_PACKAGES},
        "import_dask_array_s": round(statistics.median(seconds), 3),
    }


# --------------------------------------------------------------------------- graph


GRAPH_JOBS = {
    "topk_self_1e6x128": ("topk", 10**6, 128),
    "topk_self_1e7x256": ("topk", 10**7, 256),
    "pairs_self_1e6x128": ("pairs", 10**6, 128),
    "similarity_self_1e6x128": ("similarity", 10**6, 128),
}


def graph_job(name: str, scale: float) -> dict:
    """One job's graph: build, count, optimize (run in a fresh process for its peak RSS)."""
    import dask
    import dask.array as da

    import dask_cosim as dcs

    op, n, d = GRAPH_JOBS[name]
    n = max(1000, int(n * scale))
    a = da.zeros((n, d), dtype="float32", chunks=(max(100, min(100_000, n // 10)), d))
    fn, kwargs = {  # looked up before timing: the package imports each module on first use
        "topk": (dcs.topk, {"k": 10, "exclude_self": True}),
        "pairs": (dcs.pairs_above, {"threshold": 0.9, "exclude_self": True}),
        "similarity": (dcs.cosine_similarity, {}),
    }[op]
    t0 = time.perf_counter()
    result = fn(a, **kwargs)
    build = time.perf_counter() - t0
    collections = list(result) if isinstance(result, tuple) else [result]
    keys: set = set()
    for c in collections:
        keys.update(c.__dask_graph__().keys())
    t0 = time.perf_counter()
    optimized = dask.optimize(*collections)
    n_optimized = len(set().union(*(c.__dask_graph__().keys() for c in optimized)))
    optimize = time.perf_counter() - t0
    row = {
        "job": name,
        "n": n,
        "d": d,
        "graph_tasks": len(keys),
        "optimized_tasks": n_optimized,
        "build_s": round(build, 3),
        "optimize_s": round(optimize, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if hasattr(dcs, "plan"):
        kwargs = {"op": op, "k": 10, "exclude_self": op != "similarity"} if op != "similarity" else {}
        if op == "pairs":
            kwargs = {"op": op, "threshold": 0.9, "exclude_self": True}
        p = dcs.plan(a, **kwargs)
        row.update(job_tasks=p.total_tasks, blocks_per_axis=len(p.plan.rows), block_rows=p.plan.rows[0])
        if op == "pairs":
            row["partitions"] = p.tasks.get("cosine-pairs")
    return row


def part_graph(args) -> None:
    scale = 0.01 if args.quick else 1.0
    for name in args.jobs or GRAPH_JOBS:
        if args.quick and "1e7" in name:
            continue
        out = subprocess.run(
            [sys.executable, __file__, "--graph-job", name, "--scale", str(scale)],
            capture_output=True, text=True, check=True, timeout=1800,
        ).stdout  # fmt: skip
        row = json.loads(out.strip().splitlines()[-1])
        log({"bench": "graph", "label": args.label, **row})


# --------------------------------------------------------------------------- scheduler


def _tree_cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001 - a process that ended
            pass
    return total


def _scheduler_threads_cpu() -> float:
    """CPU seconds of this process's threads that run the scheduler: the event loop that
    ``LocalCluster`` runs it on and distributed's offload thread(s)."""
    import threading

    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name.startswith(("IO loop", "Dask-Offload"))}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def part_scheduler(args) -> None:
    import psutil

    import dask_cosim as dcs
    from dask_cosim.cluster import dask_client

    n, d, k = (20_000, 64, 10) if args.quick else (200_000, 64, 10)
    a = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    limit = dense_limit(a)
    with tempfile.TemporaryDirectory() as tmp, dask_client(None, echo=None, quiet=True) as client:
        path = os.path.join(tmp, "a.npy")
        np.save(path, a)
        workers = [psutil.Process(p) for p in client.run(os.getpid).values()]
        me = psutil.Process()
        result = dcs.topk(path, k=k, exclude_self=True)
        tasks = None
        if hasattr(dcs, "plan"):
            tasks = dcs.plan(path, op="topk", k=k, exclude_self=True).total_tasks
        c0, w0, s0, t0 = _tree_cpu([me]), _tree_cpu(workers), _scheduler_threads_cpu(), time.perf_counter()
        dcs.to_zarr(result, os.path.join(tmp, "knn.zarr"))
        wall = time.perf_counter() - t0
        c1, w1, s1 = _tree_cpu([me]), _tree_cpu(workers), _scheduler_threads_cpu()
        log(
            {
                "bench": "scheduler",
                "label": args.label,
                "n": n,
                "d": d,
                "k": k,
                "job_tasks": tasks,
                "wall_s": round(wall, 2),
                "scheduler_cpu_s": round(s1 - s0, 2),
                "this_process_cpu_s": round(c1 - c0, 2),
                "workers_cpu_s": round(w1 - w0, 2),
                "scheduler_share": round((s1 - s0) / max(w1 - w0, 1e-9), 4),
                "this_process_share": round((c1 - c0) / max(w1 - w0, 1e-9), 4),
                "gflops_equivalent": round(2 * n * n * d / wall / 1e9, 1),
                "dense_limit_gflops": round(limit, 1),
                "ratio_to_dense_limit": round(2 * n * n * d / wall / 1e9 / limit, 3),
                "load": os.getloadavg(),
            }
        )


def dense_limit(a: np.ndarray) -> float:
    """GFLOP/s of NumPy's matmul of the pre-normalised ``a`` with itself (all of S), in
    row blocks into one reused buffer: the product and nothing else."""
    u = a / np.linalg.norm(a, axis=1, keepdims=True)
    ut = np.ascontiguousarray(u.T)
    rows = max(1, min(len(u), 2**27 // (4 * len(u))))
    buf = np.empty((rows, len(u)), dtype=u.dtype)
    best = np.inf
    for _ in range(2):
        t0 = time.perf_counter()
        for r0 in range(0, len(u), rows):
            block = u[r0 : r0 + rows]
            np.matmul(block, ut, out=buf[: len(block)])
        best = min(best, time.perf_counter() - t0)
    return 2 * len(u) ** 2 * u.shape[1] / best / 1e9


# --------------------------------------------------------------------------- resume


def run_small(cmd: list[str], inputs: tuple[str, str], out, env) -> float:
    """Seconds for ``cmd`` (the resume part's command, without ``-o``) with its input
    ``inputs[0]`` replaced by the small ``inputs[1]``."""
    small = [inputs[1] if arg == inputs[0] else arg for arg in cmd]
    t0 = time.perf_counter()
    subprocess.run([*small, "-o", str(out)], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def resume_round(run, where: Path) -> dict:
    """One uninterrupted run (T), one interrupted with SIGINT at T / 2, its ``--resume``
    rerun (R), then the uninterrupted run again (T2), in ``where``: the figures of
    :func:`part_resume`'s row.

    ``resume_ratio`` is R / T. A host whose speed drifts by a fifth within minutes moves
    it far both ways (a slow spell during the interrupted and the resumed runs saves
    fewer links and slows the rerun), so the row also gives R over the mean of the two
    uninterrupted runs that bracket it (``resume_ratio_bracketed``) and T2 / T.
    """
    import zarr

    where.mkdir()
    full, _ = run(str(where / "full.zarr"))
    _, code = run(str(where / "knn.zarr"), interrupt_after=full / 2)
    if code != 130:
        raise RuntimeError(f"the run to interrupt at {full / 2:.1f} s ended with exit {code}, not 130")
    # a run interrupted while its cluster starts (a quick run) has created no markers yet
    arrays = set(zarr.open_group(where / "knn.zarr").array_keys()) if (where / "knn.zarr").exists() else set()
    group = zarr.open_group(where / "knn.zarr") if arrays else None
    done = int(group["_blocks_done"][...].sum()) if "_blocks_done" in arrays else 0
    linked = int(group["_topk_links"][...].sum()) if "_topk_links" in arrays else None
    resumed, code2 = run(str(where / "knn.zarr"), "--resume")
    full2, _ = run(str(where / "full2.zarr"))
    names = ("full.zarr", "knn.zarr", "full2.zarr")
    indices = [zarr.open_group(where / name)["indices"][...] for name in names]
    same = all(np.array_equal(indices[0], x) for x in indices[1:])
    return {
        "uninterrupted_s": round(full, 2),
        "interrupted_exit": code,
        "panels_done_at_interrupt": done,
        "links_saved_at_interrupt": linked,
        "resumed_s": round(resumed, 2),
        "resume_ratio": round(resumed / full, 3),
        "uninterrupted_again_s": round(full2, 2),
        "drift_t2_over_t": round(full2 / full, 3),
        "resume_ratio_bracketed": round(resumed / ((full + full2) / 2), 3),
        "resumed_exit": code2,
        "same_result": same,
    }


def part_resume(args) -> None:
    n, d = (30_000, 32) if args.quick else (args.resume_n, 64)
    tmp = Path(tempfile.mkdtemp())
    try:
        np.save(tmp / "a.npy", np.random.default_rng(1).standard_normal((n, d), dtype=np.float32))
        cmd = [
            sys.executable,
            "-m",
            "dask_cosim",
            "run",
            str(tmp / "a.npy"),
            "--topk",
            "10",
            "--exclude-self",
        ]
        cmd += ["--quiet"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        }

        def run(out: str, *extra: str, interrupt_after: float | None = None) -> tuple[float, int]:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [*cmd, "-o", out, *extra],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
                # a shell without job control starts background jobs with SIGINT ignored, and the
                # child would inherit that: give it the default handler (Ctrl-C interrupts it)
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            if interrupt_after is not None:
                try:
                    proc.wait(interrupt_after)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=3600)[1]
            if proc.returncode not in (0, 130):
                raise RuntimeError(f"dask-cosim exited {proc.returncode}: {err}")
            return time.perf_counter() - t0, proc.returncode

        np.save(tmp / "small.npy", np.random.default_rng(2).standard_normal((2_000, d), dtype=np.float32))
        fixed = statistics.median(
            run_small(cmd, (str(tmp / "a.npy"), str(tmp / "small.npy")), tmp / f"small{i}.zarr", env)
            for i in range(3)
        )  # the command's fixed cost, paid by each run
        ratios, bracketed = [], []
        for r in range(args.resume_rounds):  # rounds: a drifting host moves single ratios far
            row = resume_round(run, tmp / f"round{r}")
            ratios.append(row["resume_ratio"])
            bracketed.append(row["resume_ratio_bracketed"])
            log({"bench": "resume", "label": args.label, "round": r, "n": n, "d": d, **row,
                 "fixed_cost_s": round(fixed, 2),
                 "resume_ratio_without_fixed_cost": round(
                     (row["resumed_s"] - fixed) / (row["uninterrupted_s"] - fixed), 3),
                 "load": os.getloadavg()})  # fmt: skip
            assert row["same_result"], "the resumed result differs from the uninterrupted one"
        if len(ratios) > 1:
            log({"bench": "resume_rounds", "label": args.label, "n": n, "ratios": ratios,
                 "median_resume_ratio": round(statistics.median(ratios), 3),
                 "rounds_at_most_0.6": sum(x <= 0.6 for x in ratios), "bracketed_ratios": bracketed,
                 "median_bracketed_ratio": round(statistics.median(bracketed), 3),
                 "bracketed_at_most_0.6": sum(x <= 0.6 for x in bracketed),
                 "load": os.getloadavg()})  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("graph", "scheduler", "resume"), action="append")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    p.add_argument("--label", default="current", help="a name for this code version in the output")
    p.add_argument("--resume-n", type=int, default=200_000, help="N of the resume part (200,000)")
    p.add_argument(
        "--resume-rounds", type=int, default=1, help="resume part: rounds, each ratio and their median (1)"
    )
    p.add_argument("--jobs", nargs="*", choices=sorted(GRAPH_JOBS), help="graph part: only these jobs")
    p.add_argument("--graph-job", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.graph_job:
        print(json.dumps(graph_job(args.graph_job, args.scale)))
        return
    log({"bench": "machine", **machine()})
    for part in args.part or ("graph", "scheduler", "resume"):
        {"graph": part_graph, "scheduler": part_scheduler, "resume": part_resume}[part](args)


if __name__ == "__main__":
    main()
