"""Cap the per-task memory budget by the memory limit of the cluster's workers.

When a :class:`distributed.Client` is active while a graph is planned, one task may use
at most :data:`TASK_SHARE` of a worker thread's share of its worker's ``memory_limit``
(the smallest over all workers). ``"auto"`` blocks then stay far below the point where
the nanny pauses (80 %) or kills (95 %) the worker, and explicit ``chunks=`` that could
not fit raise :class:`~dask_cosim.PlanError` naming the memory limit before anything
runs, instead of a worker being killed and restarted until the task is given up.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._compat import cluster_state, scheduler_address

__all__ = [
    "TASK_SHARE",
    "WorkerBudget",
    "worker_budget",
    "cluster_layout",
    "budget_for",
    "assume_workers",
    "killed_worker_message",
]

#: Fraction of ``memory_limit / nthreads`` one task may use: leaves room for the
#: worker's own memory (~150 MiB), results waiting to be sent, and the spill/pause
#: thresholds (60 % / 80 %).
TASK_SHARE = 0.25


@dataclass(frozen=True)
class WorkerBudget:
    """The tightest worker: who it is ("worker ADDRESS"), ``memory_limit``, threads, per-task budget."""

    address: str
    memory_limit: int
    nthreads: int
    budget: int

    def explain(self) -> str:
        from dask.utils import format_bytes

        return (
            f"{self.address} has memory_limit={format_bytes(self.memory_limit)} for "
            f"{self.nthreads} thread(s), and one task may use at most {TASK_SHARE:g} of a thread's "
            f"share ({format_bytes(self.budget)}); give the workers a larger --memory-limit "
            "(or fewer threads) or pass smaller chunks="
        )


_ASSUMED: contextvars.ContextVar[tuple[WorkerBudget | None, int | None]] = contextvars.ContextVar(
    "dask_cosim_assumed_workers", default=(None, None)
)


def budget_for(memory_limit: int | None, nthreads: int, address: str) -> WorkerBudget | None:
    """The budget of a worker with ``memory_limit`` bytes (``None``/0: unlimited) and ``nthreads``."""
    if not memory_limit or memory_limit <= 0:
        return None
    nthreads = max(1, int(nthreads))
    return WorkerBudget(address, int(memory_limit), nthreads, int(memory_limit / nthreads * TASK_SHARE))


@contextmanager
def assume_workers(budget: WorkerBudget | None, threads: int | None = None) -> Iterator[None]:
    """Plan as if running on workers like ``budget`` (with ``threads`` threads in all)
    while no client is active yet.

    The command line plans (and checks) a job before it starts its cluster; it knows the
    memory limit and threads it will give the workers, or asks the scheduler it will use.
    """
    token = _ASSUMED.set((budget, threads))
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def worker_budget(client=None) -> WorkerBudget | None:
    """The per-task budget implied by the workers of ``client`` (default: the active client).

    Without an active client: the workers assumed by :func:`assume_workers`, if any.
    ``None`` without workers, or when no worker has a memory limit (``memory_limit=0``).
    """
    return cluster_layout(client)[0]


#: client -> (scheduler address, cluster state, layout): the layout asked for last, and the
#: state of the cluster (as the client last saw it) it was asked in.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYOUTS_LOCK = threading.Lock()


def cluster_layout(client=None) -> tuple[WorkerBudget | None, int | None]:
    """``(tightest worker budget, threads of all workers)`` of ``client`` (default: the
    active client); the assumed workers (:func:`assume_workers`) without a client;
    ``(None, None)`` when nothing is known.

    The scheduler is asked once per cluster state: the answer is kept per client and
    reused while the cluster-wide totals the client refreshes on its own (workers, threads,
    memory; :func:`dask_cosim._compat.cluster_state`) stay the same, so building many
    graphs on one cluster makes one call, and a cluster that gains or loses workers is
    asked again.
    """
    if client is None:
        try:
            import sys

            if "distributed" not in sys.modules:  # no client can be active: skip the import
                return _ASSUMED.get()
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            return _ASSUMED.get()
    if getattr(client, "asynchronous", False):
        return None, None  # a sync call would block the event loop; plan without it
    address, state = scheduler_address(client), cluster_state(client)
    with _LAYOUTS_LOCK:
        known = _LAYOUTS.get(client)
    if known is not None and state is not None and known[:2] == (address, state):
        return known[2]
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
    except Exception:  # noqa: BLE001 - a closing/unreachable client must not break planning
        return None, None
    layout = _layout_of(workers)
    state = cluster_state(client)  # the call above refreshed the client's view of the cluster
    if state is not None:
        with _LAYOUTS_LOCK:
            _LAYOUTS[client] = (address, state, layout)
    return layout


def _layout_of(workers: dict) -> tuple[WorkerBudget | None, int | None]:
    """The tightest budget and total threads of the scheduler's ``workers`` description."""
    tightest, threads = None, 0
    for address, info in workers.items():
        threads += int(info.get("nthreads") or 1)
        budget = budget_for(info.get("memory_limit"), info.get("nthreads") or 1, f"worker {address}")
        if budget is not None and (tightest is None or budget.budget < tightest.budget):
            tightest = budget
    return tightest, threads or None


def killed_worker_message(err: BaseException, budget: WorkerBudget | None = None, client=None) -> str:
    """``KilledWorker`` with what usually explains it: the workers' memory limit.

    ``budget``: the workers as known before the run (while a worker restarts, the
    scheduler may list none); else asked from ``client`` (default: the active client).
    """
    from dask.utils import format_bytes

    text = " ".join(str(err).split())
    tight = budget if budget is not None else worker_budget(client)
    if tight is None:
        return f"{text} Workers have no memory limit here, so look for the reason in their logs."
    return (
        f"{text} Workers die like this mostly when a task needs more memory than their limit: "
        f"{tight.address} has memory_limit={format_bytes(tight.memory_limit)} for "
        f"{tight.nthreads} thread(s) (its log then says 'exceeded 95% memory budget'). Pass smaller "
        "chunks (--chunks) or give the workers more memory (--memory-limit)"
    )
