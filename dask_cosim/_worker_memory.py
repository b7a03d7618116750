"""Cap the per-task memory budget by the memory limit of the cluster's workers.

When a :class:`distributed.Client` is active while a graph is planned, one task may use
at most :data:`TASK_SHARE` of a worker thread's share of its worker's ``memory_limit``
(the smallest over all workers). ``"auto"`` blocks then stay far below the point where
the nanny pauses (80 %) or kills (95 %) the worker, and explicit ``chunks=`` that could
not fit raise :class:`~dask_cosim.PlanError` naming the memory limit before anything
runs, instead of a worker being killed and restarted until the task is given up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASK_SHARE", "WorkerBudget", "worker_budget"]

#: Fraction of ``memory_limit / nthreads`` one task may use: leaves room for the
#: worker's own memory (~150 MiB), results waiting to be sent, and the spill/pause
#: thresholds (60 % / 80 %).
TASK_SHARE = 0.25


@dataclass(frozen=True)
class WorkerBudget:
    """The tightest worker: its address, ``memory_limit``, threads and the per-task budget."""

    address: str
    memory_limit: int
    nthreads: int
    budget: int

    def explain(self) -> str:
        from ._plan import format_bytes

        return (
            f"worker {self.address} has memory_limit={format_bytes(self.memory_limit)} for "
            f"{self.nthreads} thread(s), and one task may use at most {TASK_SHARE:g} of a thread's "
            f"share ({format_bytes(self.budget)}); give the workers a larger --memory-limit "
            "(or fewer threads) or pass smaller chunks="
        )


def worker_budget(client=None) -> WorkerBudget | None:
    """The per-task budget implied by the workers of ``client`` (default: the active client).

    ``None`` without an active client, without workers, or when no worker has a memory
    limit (``memory_limit=0``).
    """
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            return None
    try:
        if getattr(client, "asynchronous", False):
            return None  # a sync call would block the event loop; plan without it
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except Exception:  # noqa: BLE001 - a closing/unreachable client must not break planning
        return None
    tightest = None
    for address, info in workers.items():
        limit = int(info.get("memory_limit") or 0)
        threads = max(1, int(info.get("nthreads") or 1))
        if limit <= 0:
            continue
        budget = int(limit / threads * TASK_SHARE)
        if tightest is None or budget < tightest.budget:
            tightest = WorkerBudget(address, limit, threads, budget)
    return tightest
