"""What the benchmarks report about the machine they ran on (shared by the bench scripts)."""

from __future__ import annotations

import statistics
import time

#: Names of the hashers dask's ``tokenize`` picks from, fastest first (``dask.hashing``).
TOKENIZE_HASHES = ("cityhash", "xxhash", "murmurhash", "sha1")


def tokenize_hash() -> str:
    """The hash dask's ``tokenize`` uses on this machine: the first of its fast hashers
    installed, else SHA-1 (it sets the cost of any graph name that hashes input data).

    >>> tokenize_hash() in TOKENIZE_HASHES
    True
    """
    from dask import hashing

    hasher = hashing.hashers[0] if hashing.hashers else None
    return getattr(hasher, "__name__", str(hasher)).removeprefix("_hash_")


def fault_in(nbytes: int) -> float:
    """Seconds to allocate ``nbytes`` of fresh memory, write every byte and free it again.

    Run right before a timed call, it also leaves that much memory freed a moment ago, and
    so backed by the host (see :func:`fresh_memory`), for the call's own fresh output.

    >>> fault_in(2**20) >= 0
    True
    """
    import numpy as np

    t0 = time.perf_counter()
    x = np.empty(nbytes, dtype=np.uint8)
    x[...] = 0
    del x
    return time.perf_counter() - t0


def fresh_memory(nbytes: int, idle_s: float = 3.0, repeat: int = 2) -> dict:
    """What faulting in ``nbytes`` of fresh memory costs here: right after freeing as much
    (``t_reused_ms``), and after ``idle_s`` seconds with it freed (``t_idle_ms``); medians.

    On a VM with free page reporting (Linux ``page_reporting``, e.g. Firecracker guests),
    memory freed for about 2 s is handed back to the host, and faulting it in again costs
    the host's faults too: several times the reused figure. Every fresh result a benchmark
    times pays one of the two, depending on how long ago that memory was freed.

    >>> sorted(fresh_memory(2**20, idle_s=0.0, repeat=1))
    ['bytes', 'idle_s', 't_idle_ms', 't_reused_ms']
    """
    reused, idle = [], []
    for _ in range(repeat):
        fault_in(nbytes)
        reused.append(fault_in(nbytes))
        time.sleep(idle_s)
        idle.append(fault_in(nbytes))
    return {
        "bytes": nbytes,
        "idle_s": idle_s,
        "t_reused_ms": round(statistics.median(reused) * 1e3, 3),
        "t_idle_ms": round(statistics.median(idle) * 1e3, 3),
    }
