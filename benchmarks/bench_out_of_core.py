"""Out-of-core similarity to a local zarr store through the CLI's library path, in ONE process run.

Workload (the cluster-jobs issue): A, B of shape (4, 16384, 128) float32 stored as zarr,
S = cos(A, B) of 4 GiB written to a local zarr group by ``dask_cosim.jobs.run_job`` (what
``dask-cosim run A B -o OUT`` does: embedded LocalCluster sized to the machine, block-by-block
writes with markers). Reported:

* ``run_job_with_cluster_start``: one full run of the command's path (cluster start-up,
  write, shut-down) with its peak RSS;
* then, on one embedded cluster, ``--repeat`` repetitions each interleaving (so that the
  machine's drifting load hits all three alike): ``t_job_s``, the write
  (``execute_job``, ``WriteReport.seconds``); ``t_compute_only_s``, the same graph with
  every block computed and discarded; ``t_plain_zarr_write_s``, the same bytes (read back
  into memory, untimed) written with ``zarr`` directly, same chunks, no compression;
* ``peak_rss_tree_gib_max``: peak RSS summed over this process and all its children (the
  embedded scheduler/workers), sampled every 10 ms during each job;
* ``ratio = t_job / (t_compute_only + t_plain_zarr_write)``, median over repetitions
  (target <= 1.3);
* for scale: NumPy in memory (time, peak RSS) and, with ``--codecs``, output size and
  write time per codec (none, zstd, blosc-lz4+bitshuffle, and float16 output).

    python benchmarks/bench_out_of_core.py                 # the issue's workload
    python benchmarks/bench_out_of_core.py --codecs        # plus the codec table
    python benchmarks/bench_out_of_core.py --quick         # tiny sizes (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import psutil
import zarr
from _rss import TreePeakRSS  # benchmarks/_rss.py (this script's folder is on sys.path)

from dask_cosim.cluster import dask_client
from dask_cosim.jobs import JobSpec, build_job, execute_job, run_job

GIB = 2**30


def make_inputs(root: str, batch: int, n: int, dim: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        x = (rng.standard_normal((batch, n, dim)) + 0.5 * rng.standard_normal((batch, 1, dim))).astype(
            "float32"
        )
        path = os.path.join(root, f"{name}.zarr")
        zarr.create_array(path, shape=x.shape, chunks=(1, min(n, 4096), dim), dtype="float32")[...] = x
        paths.append(path)
    return paths[0], paths[1]


def flush():
    os.sync()  # dirty pages of the previous run must not slow the next one
    time.sleep(0.5)


def _discard(block):
    return np.zeros((1,) * block.ndim, dtype=np.uint8)


def timed(fn) -> float:
    flush()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_write(s: np.ndarray, chunks, path: str) -> float:
    """Write ``s`` with zarr directly (same chunks, no compression, zarr's own concurrency)."""
    shutil.rmtree(path, ignore_errors=True)
    z = zarr.create_array(path, shape=s.shape, chunks=chunks, dtype=s.dtype, compressors=None)

    def write():
        z[...] = s

    t = timed(write)
    shutil.rmtree(path, ignore_errors=True)
    return t


def interleaved(spec: JobSpec, root: str, repeat: int) -> dict:
    """Job, compute-only and plain write, interleaved per repetition on one embedded cluster."""
    job = build_job(spec)  # the graph run_job builds for the embedded cluster
    tiny = job.result.map_blocks(_discard, chunks=(1,) * job.result.ndim, dtype=np.uint8, name="discard")
    rows = {"job": [], "compute": [], "plain": [], "peak": []}
    with dask_client(echo=None, quiet=True):
        tiny.compute()  # warm-up
        for i in range(repeat):
            flush()
            with TreePeakRSS() as rss:
                report = execute_job(job, progress=False)
            rows["job"].append(report.seconds)
            rows["peak"].append(rss.peak / GIB)
            rows["compute"].append(timed(tiny.compute))
            arr = zarr.open_group(spec.output, mode="r")["similarity"]
            s = arr[...]  # the real bytes, read back (not timed); freed before the next job
            rows["plain"].append(plain_write(s, arr.chunks, os.path.join(root, "plain.zarr")))
            del s
            print(json.dumps({"rep": i, **{k: round(v[-1], 2) for k, v in rows.items()}}), flush=True)
    return {"rows": rows, "blocks": report.blocks, "chunks": list(arr.chunks)}


def numpy_in_memory(a_path: str, b_path: str) -> tuple[float, float, np.ndarray]:
    a, b = zarr.open_array(a_path)[...], zarr.open_array(b_path)[...]
    with TreePeakRSS() as rss:
        t0 = time.perf_counter()
        an = a / np.linalg.norm(a, axis=-1, keepdims=True)
        bn = b / np.linalg.norm(b, axis=-1, keepdims=True)
        s = np.matmul(an, np.swapaxes(bn, -1, -2))
        t = time.perf_counter() - t0
    return t, rss.peak / GIB, s


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def codec_table(spec: JobSpec, repeat: int) -> list[dict]:
    rows = []
    variants = [
        ("none", None),
        ("zstd", None),
        ("blosc-lz4", None),
        ("none", "float16"),
        ("blosc-lz4", "float16"),
    ]
    with dask_client(echo=None, quiet=True):
        for codec, dtype in variants:
            s = JobSpec(**{**spec.__dict__, "codec": codec, "dtype": dtype, "overwrite": True})
            job = build_job(s)
            times = []
            for _ in range(repeat):
                flush()
                times.append(execute_job(job, progress=False).seconds)
            size = du(os.path.join(spec.output, "similarity"))
            rows.append(
                {
                    "codec": codec,
                    "dtype": dtype or "float32",
                    "t_write_s": round(statistics.median(times), 2),
                    "size_gib": round(size / GIB, 3),
                    "ratio": round(np.prod(job.result.shape) * (2 if dtype else 4) / size, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to put inputs/outputs (default: a temp dir)")
    p.add_argument("--codecs", action="store_true", help="also measure size/speed per codec")
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    args = p.parse_args()
    if args.quick:
        args.batch, args.n, args.dim, args.repeat = 2, 1024, 32, 2
    root = tempfile.mkdtemp(prefix="bench-ooc-", dir=args.dir)
    try:
        a_path, b_path = make_inputs(root, args.batch, args.n, args.dim)
        out = os.path.join(root, "out.zarr")
        spec = JobSpec(a_path, b_path, out, overwrite=True, quiet=True)
        info = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / GIB:.0f} GiB",
            "shape": [args.batch, args.n, args.n],
            "dim": args.dim,
            "output_gib": round(args.batch * args.n * args.n * 4 / GIB, 2),
        }
        print(json.dumps(info), flush=True)

        # the command's whole path once, cluster start-up included
        flush()
        with TreePeakRSS() as rss:
            t0 = time.perf_counter()
            report = run_job(spec, echo=lambda *_: None)
            total = time.perf_counter() - t0
        full = {"t_run_job_s": round(total, 2), "t_write_s": round(report.seconds, 2)}
        full["peak_rss_tree_gib"] = round(rss.peak / GIB, 2)
        print(json.dumps({"run_job_with_cluster_start": full}), flush=True)

        m = interleaved(spec, root, args.repeat)
        med = {k: statistics.median(v) for k, v in m["rows"].items()}
        rows = m["rows"]
        ratios = [j / (c + w) for j, c, w in zip(rows["job"], rows["compute"], rows["plain"], strict=True)]
        result = {
            "blocks": m["blocks"],
            "zarr_chunks": m["chunks"],
            "t_job_s": round(med["job"], 2),
            "peak_rss_tree_gib_max": round(max(m["rows"]["peak"] + [full["peak_rss_tree_gib"]]), 2),
            "t_compute_only_s": round(med["compute"], 2),
            "t_plain_zarr_write_s": round(med["plain"], 2),
            "ratio_job_to_compute_plus_write": round(statistics.median(ratios), 3),
            "gflops_job": round(2 * args.batch * args.n * args.n * args.dim / med["job"] / 1e9, 1),
        }
        print(json.dumps(result), flush=True)

        # for scale, last (its 4 GiB S must not count in the job's RSS)
        t_np, rss_np, s = numpy_in_memory(a_path, b_path)
        got = zarr.open_group(out, mode="r")["similarity"]
        sample = np.random.default_rng(1).integers(0, args.n, (64, 3)) % [args.batch, args.n, args.n]
        err = float(np.max(np.abs(got.vindex[tuple(sample.T)] - s[tuple(sample.T)])))
        del s
        numpy_row = {"t_numpy_in_memory_s": round(t_np, 2), "peak_rss_numpy_gib": round(rss_np, 2)}
        print(json.dumps({**numpy_row, "max_abs_err_sample_vs_numpy": err}), flush=True)
        if args.codecs:
            codec_table(spec, max(1, args.repeat // 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
