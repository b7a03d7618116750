"""Out-of-core similarity to a local zarr store through the CLI's library path, in ONE process run.

Workload (the cluster-jobs issue): A, B of shape (4, 16384, 128) float32 stored as zarr,
S = cos(A, B) of 4 GiB written to a local zarr group by ``dask_cosim.cli.run_job`` (what
``dask-cosim run A B -o OUT`` does: embedded LocalCluster sized to the machine, block-by-block
writes with markers). Reported, each the median of ``--repeat`` runs after a warm-up:

* ``t_job_s``: wall time of the write (``WriteReport.seconds``; cluster start-up excluded,
  reported separately as ``t_job_with_cluster_start_s``);
* ``peak_rss_tree_gib``: peak RSS summed over this process and all its children (the
  embedded scheduler/workers), sampled every 10 ms during the job;
* ``t_compute_only_s``: the same graph on the same kind of cluster, every block computed
  and discarded;
* ``t_plain_zarr_write_s``: writing the same bytes (an in-memory S) with ``zarr`` directly,
  same chunks and codec;
* ``ratio = t_job / (t_compute_only + t_plain_zarr_write)`` (target <= 1.3);
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
import threading
import time

import numpy as np
import psutil
import zarr

from dask_cosim.cli import JobSpec, build_job, execute_job, run_job
from dask_cosim.cluster import dask_client

GIB = 2**30


class TreePeakRSS:
    """Peak of the summed RSS of this process and all of its descendants."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


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


def compute_only(spec: JobSpec, repeat: int) -> float:
    job = build_job(spec)  # the graph run_job builds for the embedded cluster
    result = job.result
    tiny = result.map_blocks(_discard, chunks=(1,) * result.ndim, dtype=np.uint8, name="discard")
    with dask_client(echo=None, quiet=True):
        tiny.compute()  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            tiny.compute()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_zarr_write(s: np.ndarray, chunks, path: str, repeat: int, codec: str = "none") -> float:
    from dask_cosim.io import _compressors

    times = []
    for _ in range(repeat + 1):
        shutil.rmtree(path, ignore_errors=True)
        flush()
        z = zarr.create_array(
            path, shape=s.shape, chunks=chunks, dtype=s.dtype, compressors=_compressors(codec, s.dtype)
        )
        t0 = time.perf_counter()
        z[...] = s
        times.append(time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    return statistics.median(times[1:])


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

        job_times, total_times, peaks, report = [], [], [], None
        for i in range(args.repeat + 1):
            flush()
            with TreePeakRSS() as rss:
                t0 = time.perf_counter()
                report = run_job(spec, echo=lambda *_: None)
                total = time.perf_counter() - t0
            if i:  # the first run is the warm-up
                job_times.append(report.seconds)
                total_times.append(total)
                peaks.append(rss.peak / GIB)
            print(
                json.dumps(
                    {
                        "run": i,
                        "t_job_s": round(report.seconds, 2),
                        "peak_rss_tree_gib": round(rss.peak / GIB, 2),
                    }
                ),
                flush=True,
            )
        got = zarr.open_group(out, mode="r")["similarity"]
        chunks = got.chunks
        t_compute = compute_only(spec, args.repeat)
        # last, so that the 4 GiB in-memory S never counts in the job's process-tree RSS
        t_np, rss_np, s = numpy_in_memory(a_path, b_path)
        numpy_row = {"t_numpy_in_memory_s": round(t_np, 2), "peak_rss_numpy_gib": round(rss_np, 2)}
        print(json.dumps(numpy_row), flush=True)
        sample = np.random.default_rng(1).integers(0, args.n, (64, 3)) % [args.batch, args.n, args.n]
        err = float(np.max(np.abs(got.vindex[tuple(sample.T)] - s[tuple(sample.T)])))
        t_plain = plain_zarr_write(s, chunks, os.path.join(root, "plain.zarr"), args.repeat)
        t_job = statistics.median(job_times)
        result = {
            "blocks": report.blocks,
            "zarr_chunks": list(chunks),
            "t_job_s": round(t_job, 2),
            "t_job_with_cluster_start_s": round(statistics.median(total_times), 2),
            "peak_rss_tree_gib": round(max(peaks), 2),
            "t_compute_only_s": round(t_compute, 2),
            "t_plain_zarr_write_s": round(t_plain, 2),
            "ratio_job_to_compute_plus_write": round(t_job / (t_compute + t_plain), 3),
            "gflops_job": round(2 * args.batch * args.n * args.n * args.dim / t_job / 1e9, 1),
            "max_abs_err_sample_vs_numpy": err,
        }
        print(json.dumps(result), flush=True)
        del s
        if args.codecs:
            codec_table(spec, max(1, args.repeat // 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
