#!/usr/bin/env python
"""One-command check of dask_cosim on a CUDA GPU: tests, precision errors, throughput vs the limit.

Run from a checkout, in an environment where ``pip install -e '.[gpu,test]'`` worked
(this script installs nothing)::

    python benchmarks/gpu_check.py            # ~2-3 minutes on one data-center GPU
    python benchmarks/gpu_check.py --json out.json --size 8192

It prints, in one run:

1. the GPU tests (``pytest -m gpu``, in a subprocess): passed / failed / errors / skipped;
2. for each ``precision``: the max abs error of ``dcs.cosine_similarity(..., device="gpu")``
   against a float64 NumPy reference, next to the NumPy emulation's error and bound;
3. throughput, each as a ratio to the limit measured here, in the same process:

   - limit: ``cupy.matmul`` of pre-normalised float32 device arrays (TFLOP/s, ``2 N M D`` flops);
   - ``dcs.cosine_similarity`` on device-resident CuPy data (``like="cupy"``; target >= 0.8);
   - host -> device -> host end to end (NumPy in, NumPy S out; also as a ratio to the
     host<->device transfer bound = bytes moved / measured copy bandwidth; target >= 0.7);
   - ``dcs.topk`` on device-resident data (target >= 0.5).

Timings are the median of ``--repeats`` (>= 5) runs after a warm-up. Without a usable
GPU (no CuPy, no device, CUDA fails) it says so and exits 0 without running anything.
Exit status 1 means a GPU test failed or a precision error exceeded its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Worst-case error bounds (unit vectors, D <= 1024): 2u + u^2 + D * 2^-24, u the operand rounding.
#: tf32 uses u = 2^-10 because the GPU's float32 -> tf32 conversion need not round to nearest.
BOUNDS = {"float32": 1e-5, "tf32": 2 * 2.0**-10 + 2.0**-20 + 1024 * 2.0**-24}
BOUNDS["float16"] = 2 * 2.0**-11 + 2.0**-22 + 2 * 1024 * 2.0**-24
BOUNDS["bfloat16"] = 2 * 2.0**-8 + 2.0**-16 + 1024 * 2.0**-24


def gpu_status() -> tuple[bool, str]:
    """(usable, description) of this process's CUDA GPU; never raises."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return False, "CuPy sees no CUDA device"
        cupy.zeros(1).sum().item()
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = dev.mem_info
        return True, (
            f"{name} (compute capability {dev.compute_capability}, {total / 2**30:.0f} GiB, "
            f"{count} device(s) visible), CuPy {cupy.__version__}, "
            f"CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
        )
    except Exception as err:  # noqa: BLE001 - any failure means "no usable GPU"
        return False, f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- 1. GPU tests


def run_gpu_tests(timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", "-o", "junit_family=xunit2"]  # fmt: skip
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"pytest -m gpu did not finish within {timeout:.0f}s"}
        counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": time.monotonic() - start}
        if report.exists():
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            tests = int(suite.get("tests", 0))
            counts["failed"] = int(suite.get("failures", 0))
            counts["errors"] = int(suite.get("errors", 0))
            counts["skipped"] = int(suite.get("skipped", 0))
            counts["passed"] = tests - counts["failed"] - counts["errors"] - counts["skipped"]
        else:
            counts["error"] = f"pytest exited {proc.returncode} without a report"
        counts["tail"] = (proc.stdout + proc.stderr)[-3000:] if proc.returncode not in (0, 5) else ""
        return counts


# --------------------------------------------------------------------------- helpers


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (device synchronised) after one warm-up run."""
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unit_rows(x):
    import cupy

    return x / cupy.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- 2. precision


def precision_errors(n: int, d: int) -> list[dict]:
    import dask
    import numpy as np

    import dask_cosim as dcs
    from dask_cosim.testing import reference_cosine

    gen = np.random.default_rng(0)
    a = gen.standard_normal((n, d), dtype=np.float32)
    b = gen.standard_normal((n, d), dtype=np.float32)
    ref = reference_cosine(a, b)
    rows = []
    with dask.config.set(scheduler="threads"):
        for precision in ("float32", "tf32", "bfloat16", "float16"):
            gpu = dcs.cosine_similarity(a, b, device="gpu", precision=precision).compute()
            cpu = dcs.cosine_similarity(a, b, device="cpu", precision=precision).compute()
            rows.append(
                {
                    "precision": precision,
                    "gpu_max_abs_err": float(np.abs(gpu - ref).max()),
                    "numpy_emulation_max_abs_err": float(np.abs(cpu - ref).max()),
                    "gpu_vs_emulation": float(np.abs(gpu - cpu).max()),
                    "bound": BOUNDS[precision],
                }
            )
    return rows


# --------------------------------------------------------------------------- 3. throughput


def copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, float]:
    """Host->device and device->host bytes/s, copying as the library does (pageable NumPy)."""
    import cupy
    import numpy as np

    host = np.ones(nbytes // 4, dtype=np.float32)
    dev = cupy.asarray(host)
    h2d = timed(lambda: cupy.asarray(host), repeats)
    d2h = timed(lambda: dev.get(), repeats)
    return nbytes / h2d, nbytes / d2h


def throughput(n: int, d: int, k: int, repeats: int) -> dict:
    import cupy
    import dask
    import dask.array as da
    import numpy as np

    import dask_cosim as dcs

    flops = 2.0 * n * n * d
    gen = cupy.random.default_rng(1)
    a_dev = gen.standard_normal((n, d), dtype=cupy.float32)
    b_dev = gen.standard_normal((n, d), dtype=cupy.float32)
    an, bn = unit_rows(a_dev), unit_rows(b_dev)
    out = {"n": n, "m": n, "d": d, "k": k}

    limit_s = timed(lambda: cupy.matmul(an, bn.T), repeats)
    out["limit_tflops"] = flops / limit_s / 1e12

    with dask.config.set(scheduler="threads"):
        S_dev = dcs.cosine_similarity(a_dev, b_dev, device="gpu", like="cupy")
        out["device_resident_s"] = timed(lambda: S_dev.compute(), repeats)
        result = S_dev.compute()
        out["device_resident_result_type"] = type(result).__module__.split(".")[0]
        del result

        a_host, b_host = cupy.asnumpy(a_dev), cupy.asnumpy(b_dev)
        S_host = dcs.cosine_similarity(a_host, b_host, device="gpu")
        out["end_to_end_s"] = timed(lambda: S_host.compute(), repeats)
        host_out = np.empty(S_host.shape, dtype=S_host.dtype)
        out["end_to_end_store_s"] = timed(lambda: da.store(S_host, host_out, lock=False), repeats)

        vals, idx = dcs.topk(a_dev, b_dev, k=k, device="gpu")
        out["topk_s"] = timed(lambda: dask.compute(vals, idx), repeats)

    h2d, d2h = copy_bandwidth(256 * 2**20, repeats)
    moved_in, moved_out = 2 * n * d * 4, n * n * 4
    out["h2d_GBps"], out["d2h_GBps"] = h2d / 1e9, d2h / 1e9
    out["transfer_bound_s"] = moved_in / h2d + moved_out / d2h
    for name in ("device_resident", "end_to_end", "end_to_end_store", "topk"):
        out[f"{name}_tflops"] = flops / out[f"{name}_s"] / 1e12
        out[f"{name}_vs_limit"] = out[f"{name}_tflops"] / out["limit_tflops"]
    out["end_to_end_vs_transfer_bound"] = out["transfer_bound_s"] / out["end_to_end_s"]
    out["end_to_end_store_vs_transfer_bound"] = out["transfer_bound_s"] / out["end_to_end_store_s"]
    return out


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="N = M for the throughput runs")
    parser.add_argument("--dim", type=int, default=1024, help="D for the throughput runs")
    parser.add_argument("--k", type=int, default=10, help="k for the top-k run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (>= 5)")
    parser.add_argument("--precision-size", type=int, default=4096, help="N = M of the precision check")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--test-timeout", type=float, default=150.0)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    args.repeats = max(5, args.repeats)

    usable, about = gpu_status()
    if not usable:
        print(f"gpu_check: no usable CUDA GPU visible ({about}).")
        print("gpu_check: nothing to check here; run it on a machine with a CUDA GPU, in an environment")
        print("gpu_check: where `pip install -e '.[gpu,test]'` worked.")
        return 0
    sys.path.insert(0, str(REPO))
    import dask_cosim

    start = time.monotonic()
    report: dict = {"device": about, "dask_cosim": dask_cosim.__version__}
    print(f"gpu_check: {about}; dask_cosim {dask_cosim.__version__}")
    status = 0

    if not args.skip_tests:
        tests = run_gpu_tests(args.test_timeout)
        report["gpu_tests"] = tests
        if "error" in tests and "passed" not in tests:
            print(f"GPU tests: {tests['error']}")
            status = 1
        else:
            print(
                f"GPU tests (pytest -m gpu): {tests['passed']} passed, {tests['failed']} failed, "
                f"{tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']:.0f}s)"
            )
            if tests["failed"] or tests["errors"] or tests.get("error"):
                status = 1
                print(tests.get("error", ""), tests["tail"])

    rows = precision_errors(args.precision_size, 256)
    report["precision"] = rows
    print(f"\nmax abs error vs float64 NumPy (N = M = {args.precision_size}, D = 256, float32 inputs)")
    print(f"{'precision':>10} {'GPU':>10} {'NumPy emul.':>12} {'GPU-emul.':>10} {'bound':>9}")
    for r in rows:
        ok = r["gpu_max_abs_err"] <= r["bound"]
        status |= 0 if ok else 1
        print(
            f"{r['precision']:>10} {r['gpu_max_abs_err']:10.2e} {r['numpy_emulation_max_abs_err']:12.2e} "
            f"{r['gpu_vs_emulation']:10.2e} {r['bound']:9.2e} {'ok' if ok else 'ABOVE BOUND'}"
        )

    t = throughput(args.size, args.dim, args.k, args.repeats)
    report["throughput"] = t
    print(f"\nthroughput, N = M = {t['n']}, D = {t['d']}, float32, median of {args.repeats}")
    print(f"{'':52} {'TFLOP/s':>8} {'x limit':>8} {'target':>7}")
    lines = [
        ("limit: cupy.matmul, pre-normalised, on device", "limit", 1.0, None),
        ("dcs.cosine_similarity, device-resident (like=cupy)", "device_resident", None, 0.8),
        ("end to end host->device->host, compute() to NumPy", "end_to_end", None, None),
        ("end to end, da.store into a NumPy array", "end_to_end_store", None, None),
        (f"dcs.topk k={t['k']}, device-resident", "topk", None, 0.5),
    ]
    for label, name, ratio, target in lines:
        tflops = t[f"{name}_tflops"]
        ratio = ratio if ratio is not None else t[f"{name}_vs_limit"]
        mark = "" if target is None else f">= {target} {'met' if ratio >= target else 'MISSED'}"
        print(f"{label:52} {tflops:8.1f} {ratio:8.2f} {mark}")
    print(
        f"transfer bound: {t['transfer_bound_s'] * 1e3:.1f} ms (H2D {t['h2d_GBps']:.1f} GB/s, "
        f"D2H {t['d2h_GBps']:.1f} GB/s, pageable); end to end reaches "
        f"{t['end_to_end_vs_transfer_bound']:.2f} (compute) / {t['end_to_end_store_vs_transfer_bound']:.2f} "
        f"(store) of it (target >= 0.7)"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    report["peak_rss_MiB"] = peak
    report["seconds"] = time.monotonic() - start
    print(f"\npeak RSS {peak:.0f} MiB; {report['seconds']:.0f}s in all; exit status {status}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
