"""duplicate_groups vs pairs_above at the same threshold; sentence-transformers for scale.

Data: N vectors of D = 64 float32 dimensions, a quarter of them in planted near-duplicate
groups (``--group-size`` members around a random centre, cosine >= ~0.99 within a group),
the rest random (random 64-d vectors stay far below the threshold). Each variant runs in
a fresh process (threaded scheduler, auto chunks) so its peak RSS is its own:

* ``pairs``: ``dcs.pairs_above(x, threshold, exclude_self=True)``, the number of pairs
  counted per partition (finding the pairs, nothing collected);
* ``groups``: ``dcs.duplicate_groups(x, threshold)``, groups of size > 1 counted per
  partition (finding the pairs, their union-find forests and the tree merge);
* ``community``: ``sentence_transformers.util.community_detection`` (in memory), if it
  imports (skipped with a message otherwise).

Reported as JSON lines: wall seconds (median of ``--repeat`` runs, each in its own
process), the peak RSS of each process tree (psutil, sampled every 10 ms), and
``groups_over_pairs`` = t_groups / t_pairs (the issue asks for <= 1.3 at N = 200,000 with
peak RSS <= 2 GiB).

    python benchmarks/bench_dedup.py                # N = 200,000 (minutes; run on a quiet machine)
    python benchmarks/bench_dedup.py --n 2000 --repeat 1   # tiny (used by the test suite)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from _rss import TreePeakRSS  # benchmarks/_rss.py (this script's folder is on sys.path)

GIB = 2**30


def log(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def planted(n: int, d: int, group_size: int, seed: int = 0) -> np.ndarray:
    """A quarter of the rows in groups of ``group_size`` near-copies, the rest random, shuffled."""
    gen = np.random.default_rng(seed)
    n_groups = max(1, n // (4 * group_size))
    centres = gen.standard_normal((n_groups, d), dtype=np.float32)
    members = np.repeat(centres, group_size, axis=0)
    members += 0.05 * gen.standard_normal(members.shape, dtype=np.float32)
    rest = gen.standard_normal((n - len(members), d), dtype=np.float32)
    x = np.concatenate([members, rest])
    return x[gen.permutation(n)]


# --------------------------------------------------------------------------- one variant


def _count_pairs(part):
    import pandas as pd

    return pd.DataFrame({"pairs": [len(part)]})


def _count_groups(part):
    import pandas as pd

    big = part["size"].to_numpy() > 1
    first = part["i"].to_numpy() == part["group"].to_numpy()
    return pd.DataFrame({"groups": [int((big & first).sum())], "rows": [int(big.sum())]})


def worker(variant: str, n: int, d: int, group_size: int, threshold: float) -> dict:
    """Runs in its own process: build the data, time one variant, print one JSON line."""
    import dask_cosim as dcs

    x = planted(n, d, group_size)
    t0 = time.perf_counter()
    if variant == "pairs":
        pairs = dcs.pairs_above(x, threshold=threshold, exclude_self=True)
        out = {"pairs": int(pairs.map_partitions(_count_pairs).compute()["pairs"].sum())}
    elif variant == "groups":
        counts = dcs.duplicate_groups(x, threshold=threshold).map_partitions(_count_groups).compute()
        out = {"groups": int(counts["groups"].sum()), "rows_in_groups": int(counts["rows"].sum())}
    else:
        import torch
        from sentence_transformers import util

        found = util.community_detection(torch.from_numpy(x), threshold=threshold, min_community_size=2)
        out = {"groups": len(found), "rows_in_groups": sum(len(c) for c in found)}
    return {"variant": variant, "seconds": time.perf_counter() - t0, **out}


def run_variant(variant: str, args) -> dict:
    """Run one variant in a fresh process, with the peak RSS of its process tree."""
    cmd = [sys.executable, __file__, "--worker", variant, "--n", str(args.n), "--d", str(args.d),
           "--group-size", str(args.group_size), "--threshold", str(args.threshold)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreePeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_GiB"] = round(rss.peak / GIB, 3)
    return row


def community_available() -> str | None:
    """None if sentence-transformers (and torch) import, else why not."""
    try:
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: skip
        return f"{type(err).__name__}: {err}"
    return None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="vectors (200,000)")
    p.add_argument("--d", type=int, default=64, help="dimensions (64)")
    p.add_argument("--group-size", type=int, default=5, help="members of a planted group (5)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--repeat", type=int, default=3, help="runs of each variant (fresh processes)")
    p.add_argument("--skip-community", action="store_true", help="leave sentence-transformers out")
    p.add_argument("--worker", choices=["pairs", "groups", "community"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return [log(worker(args.worker, args.n, args.d, args.group_size, args.threshold))]

    rows = []
    runs: dict[str, list[dict]] = {"pairs": [], "groups": []}
    for _ in range(args.repeat):  # interleaved: drifting machine load hits both alike
        for variant in runs:
            runs[variant].append(
                log({"bench": "dedup", "n": args.n, "d": args.d, **run_variant(variant, args)})
            )
    summary = {
        "bench": "dedup-summary",
        "n": args.n,
        "d": args.d,
        "threshold": args.threshold,
        **{f"{v}_seconds": round(statistics.median(r["seconds"] for r in rs), 3) for v, rs in runs.items()},
        **{f"{v}_peak_rss_GiB": max(r["peak_rss_GiB"] for r in rs) for v, rs in runs.items()},
        "groups": runs["groups"][0]["groups"],
        "rows_in_groups": runs["groups"][0]["rows_in_groups"],
        "pairs": runs["pairs"][0]["pairs"],
    }
    summary["groups_over_pairs"] = round(summary["groups_seconds"] / summary["pairs_seconds"], 3)
    why = "--skip-community" if args.skip_community else community_available()
    if why is None:
        row = run_variant("community", args)
        summary.update(
            community_seconds=round(row["seconds"], 3),
            community_peak_rss_GiB=row["peak_rss_GiB"],
            community_groups=row["groups"],
            community_rows_in_groups=row["rows_in_groups"],
        )
    else:
        summary["community"] = f"skipped: sentence-transformers not usable ({why})"
    rows.append(log(summary))
    return rows


if __name__ == "__main__":
    main()
