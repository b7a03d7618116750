"""``dask-cosim demo`` (a verified end-to-end job) and ``dask-cosim info`` (the environment)."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

__all__ = ["run_demo", "describe_environment", "make_embeddings", "verify_similarity", "verify_topk"]


def make_embeddings(path: str, batch: int, n: int, dim: int, seed: int) -> np.ndarray:
    """A reproducible ``(batch, n, dim)`` float32 embedding set stored as a zarr array at ``path``.

    The vectors share a common direction (as real sentence embeddings do), so scores are
    mostly positive and the top-k neighbours are well separated from the rest.
    """
    import zarr

    rng = np.random.default_rng(seed)
    common = rng.standard_normal((batch, 1, dim))
    x = (rng.standard_normal((batch, n, dim)) + 0.5 * common).astype(np.float32)
    z = zarr.create_array(path, shape=x.shape, chunks=(1, min(n, 1024), dim), dtype="float32")
    z[...] = x
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def verify_similarity(path: str, a: np.ndarray, b: np.ndarray, samples: int, seed: int) -> float:
    """Max abs error of ``samples`` random entries of the stored similarity vs float64 NumPy."""
    import zarr

    s = zarr.open_group(path, mode="r")["similarity"]
    rng = np.random.default_rng(seed + 1)
    k = rng.integers(0, s.shape[0], samples)
    i = rng.integers(0, s.shape[1], samples)
    j = rng.integers(0, s.shape[2], samples)
    got = s.vindex[k, i, j]
    ref = np.einsum("sd,sd->s", _unit(a[k, i]), _unit(b[k, j]))
    return float(np.max(np.abs(got - ref)))


def verify_topk(path: str, a: np.ndarray, k: int, rows: int, seed: int, exclude_self: bool) -> float:
    """Largest error of ``rows`` random stored top-k rows vs a float64 brute-force ranking.

    Checks that the stored values are the k best scores in order and that each stored
    index really has its stored score (robust to near-ties, where the order of two
    equal scores may legitimately differ).
    """
    import zarr

    g = zarr.open_group(path, mode="r")
    vals, idx = g["values"], g["indices"]
    rng = np.random.default_rng(seed + 2)
    unit = _unit(a)
    worst = 0.0
    for _ in range(rows):
        kb, i = int(rng.integers(0, a.shape[0])), int(rng.integers(0, a.shape[1]))
        ref = unit[kb] @ unit[kb, i]
        if exclude_self:
            ref[i] = -np.inf
        best = np.sort(ref)[::-1][:k]
        got_v, got_i = vals[kb, i], idx[kb, i]
        worst = max(worst, float(np.max(np.abs(got_v - best))), float(np.max(np.abs(ref[got_i] - got_v))))
        if len(set(got_i.tolist())) != k:
            return float("inf")
    return worst


def run_demo(args: argparse.Namespace) -> bool:
    """Generate data, run a similarity and a top-k job on one cluster, verify, summarise;
    ``True`` when the results match NumPy."""
    from .cluster import dask_client
    from .jobs import JobSpec, build_job, execute_job

    say = (lambda *_: None) if args.quiet else print
    root = args.keep or tempfile.mkdtemp(prefix="dask-cosim-demo-")
    os.makedirs(root, exist_ok=True)
    try:
        a_path, b_path = os.path.join(root, "a.zarr"), os.path.join(root, "b.zarr")
        say(f"demo: writing two ({args.batch}, {args.n}, {args.dim}) float32 embedding sets to {root}")
        a = make_embeddings(a_path, args.batch, args.n, args.dim, args.seed)
        b = make_embeddings(b_path, args.batch, args.n, args.dim, args.seed + 100)
        side = min(args.n, 1024)  # several blocks per batch, so the progress bar has work to show
        common = {"overwrite": True, "quiet": args.quiet, "chunks": (1, side, side)}
        jobs = [
            JobSpec(a_path, b_path, os.path.join(root, "similarity.zarr"), **common),
            JobSpec(a_path, None, os.path.join(root, "topk.zarr"), topk=args.k, exclude_self=True, **common),
        ]
        prepared = [build_job(spec) for spec in jobs]
        with dask_client(
            args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit,
            timeout=args.timeout,
            echo=say,
            quiet=args.quiet,
            log_file=getattr(args, "log_path", None),
        ):
            for job in prepared:
                say(f"demo: {job.spec.kind} job -> {job.spec.output}")
                report = execute_job(job, progress=not args.quiet)
                print(report.summary(), flush=True)
        sim_err = verify_similarity(jobs[0].output, a, b, samples=2000, seed=args.seed)
        topk_err = verify_topk(jobs[1].output, a, args.k, rows=64, seed=args.seed, exclude_self=True)
        tol = 1e-5
        ok = sim_err <= tol and topk_err <= tol
        print(
            f"demo: verified 2000 sampled similarities (max abs error {sim_err:.1e}) and 64 top-{args.k} "
            f"rows (max abs error {topk_err:.1e}) against float64 NumPy: {'OK' if ok else 'FAILED'} "
            f"(tolerance {tol:g})",
            flush=True,
        )
        return ok
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- info


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return "not installed"
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version(module.replace("_", "-"))
        except PackageNotFoundError:
            version = "unknown"
    return str(version)


def describe_environment() -> Iterator[str]:
    """Lines for ``dask-cosim info``: versions, BLAS, GPU, machine, the dask config in force."""
    import dask
    from dask.system import CPU_COUNT
    from threadpoolctl import threadpool_info

    from . import __version__
    from ._backend import gpu_available
    from ._compat import system_memory_limit
    from .cluster import machine_layout

    yield f"dask-cosim {__version__} (python {platform.python_version()}, {sys.executable})"
    names = ("numpy", "dask", "distributed", "zarr", "numcodecs", "pandas", "pyarrow", "bokeh")
    yield "versions: " + ", ".join(f"{m} {_version(m)}" for m in (*names, "prometheus_client", "cupy"))
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if blas:
        for lib in blas:
            arch = lib.get("architecture") or "?"
            yield (
                f"BLAS: {lib.get('internal_api')} {lib.get('version')} ({arch}, "
                f"{lib.get('num_threads')} threads) {lib.get('filepath')}"
            )
    else:
        yield "BLAS: none found by threadpoolctl"
    yield f"GPU: {'visible (CuPy can allocate)' if gpu_available() else 'none visible'}"
    workers, threads = machine_layout()
    memory = system_memory_limit() / 2**30
    yield (
        f"machine: {platform.platform()}, {CPU_COUNT} cores, {memory:.1f} GiB; the embedded "
        f"cluster would start {workers} workers x {threads} threads on 127.0.0.1"
    )
    yield f"dask config cosine: {dict(dask.config.get('cosine'))}"
    yield f"dask config array.chunk-size: {dask.config.get('array.chunk-size')}"
    memory = dask.config.get("distributed.worker.memory")
    yield (
        "dask config distributed.worker.memory: "
        + ", ".join(f"{k}={memory.get(k)}" for k in ("target", "spill", "pause", "terminate"))
    )
    address = dask.config.get("scheduler-address", None)
    yield f"dask config scheduler-address: {address or '(none: the embedded LocalCluster is used)'}"
