"""Soak: consecutive jobs on a real multi-process cluster, one random worker SIGKILL each.

Starts ``dask scheduler`` + two ``dask worker`` processes (nanny-managed, 2 threads each,
127.0.0.1, the same launcher as the test suite) and runs ``--jobs`` jobs (default 20),
cycling through four kinds: ``cosine_similarity(...).compute()``, ``to_zarr`` (markers
checked), ``topk`` (tree reduction) and ``pairs_above``. Each job gets random shapes,
dimensions and block sizes. The last input block of ``b`` is held back by a gate file, so
the kill always lands mid-job: the script waits until a random number of the blocks that
do not need the gated one have finished (counted on the scheduler), SIGKILLs a randomly
chosen worker process by pid, opens the gate and verifies the whole output against a
float64 NumPy brute force. The nanny restarts the killed worker before the next job.

    python benchmarks/soak.py               # 20 jobs, prints a table and a summary line
    python benchmarks/soak.py --jobs 8 --seed 3 --json soak.json

Exit code 0 only if every job's output matched the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cluster launcher

import dask_cosim as dcs  # noqa: E402
from dask_cosim.testing import reference_cosine  # noqa: E402
from tests._real_cluster import gated, open_gate, start_real_cluster, wait_until  # noqa: E402

KINDS = ("compute", "to_zarr", "topk", "pairs")
# task prefixes whose finished count measures progress, per job kind
PROGRESS = {
    "compute": ("cosine-block",),
    "to_zarr": ("cosine-write",),
    "topk": ("cosine-topk",),
    "pairs": ("cosine-pairs",),
}


def finished(dask_scheduler, prefixes) -> int:
    """Tasks of the given prefixes that have run (in memory, or released after use)."""
    from dask.utils import key_split

    return sum(
        1
        for ts in dask_scheduler.tasks.values()
        if ts.state in ("memory", "released")
        and ts.run_id is not None
        and key_split(ts.key).startswith(prefixes)
    )


def make_job(kind: str, rng: random.Random, nprng: np.random.Generator, workdir: Path):
    n_blocks, m_blocks = rng.randint(2, 5), rng.randint(3, 6)
    rows, cols, dim = rng.choice((40, 64, 96)), rng.choice((40, 64, 96)), rng.choice((8, 16, 32))
    n, m = n_blocks * rows - rng.randint(0, rows - 1), m_blocks * cols
    a, b = nprng.standard_normal((n, dim)), nprng.standard_normal((m, dim))
    gate = workdir / "gate"
    A = da.from_array(a, chunks=(rows, dim))
    B = gated(b, (cols, dim), gate)
    spec = {"kind": kind, "shape": f"{n}x{m}x{dim}", "blocks": f"{rows}x{cols}"}
    if kind == "compute":
        result = dcs.cosine_similarity(A, B, chunks=(rows, cols))
    elif kind == "to_zarr":
        result = dcs.cosine_similarity(A, B, chunks=(rows, cols))
    elif kind == "topk":
        k = rng.randint(1, min(12, m))
        spec["k"] = k
        result = dcs.topk(A, B, k=k, chunks=(rows, cols))
    else:
        threshold = rng.choice((0.3, 0.5, 0.6))
        spec["threshold"] = threshold
        result = dcs.pairs_above(A, B, threshold=threshold, chunks=(rows, cols))
    total = -(-n // rows) * m_blocks
    free = total - -(-n // rows)  # blocks that do not need b's gated last block
    return spec, a, b, gate, result, free


def verify(kind: str, spec: dict, a, b, got) -> tuple[bool, str]:
    ref = reference_cosine(a, b)
    if kind in ("compute", "to_zarr"):
        err = float(np.nanmax(np.abs(got - ref)))
        return err <= 1e-12, f"max abs error {err:.1e}"
    if kind == "topk":
        vals, idx = got
        order = np.argsort(-ref, axis=-1, kind="stable")[:, : spec["k"]]
        ok = np.array_equal(idx, order) and np.allclose(vals, np.take_along_axis(ref, order, -1), atol=1e-12)
        return ok, "indices equal brute force" if ok else "top-k differs"
    t = spec["threshold"]
    want = {(int(i), int(j)) for i, j in np.argwhere(ref >= t) if abs(ref[i, j] - t) > 1e-9}
    have = {(int(i), int(j)) for i, j in zip(got["i"], got["j"], strict=True) if abs(ref[i, j] - t) > 1e-9}
    ok = want == have
    return ok, f"{len(have)} pairs equal brute force" if ok else f"pairs differ ({len(want ^ have)})"


def run_one(cluster, client, number: int, kind: str, rng, nprng) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"soak-{number}-"))
    spec, a, b, gate, result, free = make_job(kind, rng, nprng, workdir)
    target = rng.randint(1, max(1, free))
    start = time.perf_counter()
    out = workdir / "out.zarr"
    if kind == "to_zarr":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        job = pool.submit(dcs.to_zarr, result, str(out))
    elif kind == "pairs":
        job = client.compute(result)
    else:
        job = client.compute(list(result) if isinstance(result, tuple) else result)
    try:
        wait_until(
            lambda: client.run_on_scheduler(finished, prefixes=PROGRESS[kind]) >= target,
            timeout=120,
            what=f"{target} finished tasks",
            interval=0.02,
            client=client,
        )
        done_at_kill = client.run_on_scheduler(finished, prefixes=PROGRESS[kind])
        pids = cluster.worker_pids()
        victim = rng.choice(sorted(pids))
        held = sum(1 for key in client.has_what().get(victim, ()) if "cosine" in str(key))
        os.kill(pids[victim], 9)
    finally:
        open_gate(gate)
    got = client.gather(job) if isinstance(job, list) else job.result(timeout=300)
    if kind == "to_zarr":
        pool.shutdown()
        group = zarr.open_group(str(out), mode="r")
        markers_ok = bool(group["_blocks_done"][...].all())
        got = group["similarity"][...]
    elif kind == "topk":
        got = tuple(got)
    seconds = time.perf_counter() - start
    ok, detail = verify(kind, spec, a, b, got)
    if kind == "to_zarr":
        ok = ok and markers_ok
        detail += ", all markers set" if markers_ok else ", MARKERS MISSING"
    new_pids = cluster.wait_for_workers()
    restarted = pids[victim] not in new_pids.values()
    return {
        "job": number,
        **spec,
        "injection": f"SIGKILL of a random worker (pid {pids[victim]}, holding {held} results) after "
        f"{done_at_kill} {PROGRESS[kind][0]} tasks had run",
        "what_happened": f"lost tasks rescheduled, job finished in {seconds:.1f}s; nanny restarted the "
        f"worker: {'yes' if restarted else 'NO'}",
        "matched": ok,
        "detail": detail,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rng, nprng = random.Random(args.seed), np.random.default_rng(args.seed)
    rows = []
    t0 = time.perf_counter()
    with start_real_cluster(2, nthreads=2) as cluster, cluster.client() as client:
        for number in range(1, args.jobs + 1):
            row = run_one(cluster, client, number, KINDS[(number - 1) % len(KINDS)], rng, nprng)
            rows.append(row)
            print(
                f"{row['job']:>3} {row['kind']:<8} {row['shape']:<12} {row['injection']}; "
                f"{row['what_happened']}; matched={row['matched']} ({row['detail']})",
                flush=True,
            )
    matched = sum(r["matched"] for r in rows)
    print(
        f"\nsoak: {len(rows)} jobs, {len(rows)} worker SIGKILLs, {matched}/{len(rows)} outputs matched "
        f"the NumPy reference, {time.perf_counter() - t0:.0f}s total"
    )
    print("\n| job | kind | shape | injection | what happened | output matched? |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['job']} | {r['kind']} | {r['shape']} (blocks {r['blocks']}) | {r['injection']} | "
            f"{r['what_happened']} | {'yes' if r['matched'] else 'NO'}: {r['detail']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if matched == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
