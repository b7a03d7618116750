"""Where jobs run: an embedded LocalCluster on 127.0.0.1, or an existing scheduler."""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "SchedulerUnreachable",
    "dask_client",
    "machine_layout",
    "embedded_blas_threads",
    "cluster_logs",
    "default_log_file",
]

DEFAULT_DASHBOARD_PORT = 8787
# this process's loggers whose records belong to the cluster, not to the user's terminal
CLUSTER_LOGGERS = ("distributed", "bokeh", "tornado", "asyncio")


class SchedulerUnreachable(ConnectionError):
    """No scheduler answered at the given address within the timeout."""


def machine_layout(workers: int | None = None, threads_per_worker: int | None = None) -> tuple[int, int]:
    """Workers and threads per worker that fill this machine's cores (distributed's own rule)."""
    from dask.system import CPU_COUNT

    from ._compat import nprocesses_nthreads

    if workers and threads_per_worker:
        return workers, threads_per_worker
    if workers:
        return workers, max(1, CPU_COUNT // workers)
    if threads_per_worker:
        return max(1, CPU_COUNT // threads_per_worker), threads_per_worker
    return nprocesses_nthreads(CPU_COUNT)


@contextmanager
def embedded_blas_threads(
    scheduler: str | None, workers: int | None = None, threads_per_worker: int | None = None
) -> Iterator[None]:
    """Build graphs for the embedded cluster with BLAS threads that fit the machine.

    ``cosine.blas-threads: auto`` gives each task ``cores // threads of its worker`` BLAS
    threads, which oversubscribes the cores when several worker processes share a machine
    (README: "No oversubscription"). For the embedded
    cluster the layout is known, so each task gets ``cores // (workers x threads)``. An
    explicit setting, or an external ``--scheduler``, is left alone.
    """
    import dask
    from dask.system import CPU_COUNT

    if scheduler or dask.config.get("cosine.blas-threads", "auto") not in (None, "auto"):
        yield
        return
    n, t = machine_layout(workers, threads_per_worker)
    with dask.config.set({"cosine.blas-threads": max(1, CPU_COUNT // (n * t))}):
        yield


def default_log_file() -> str:
    """Where a run's cluster log goes unless ``--log-file``/``--verbose``: a new file under
    ``$TMPDIR/dask-cosim/`` named after the time and process id (deleted when left empty)."""
    import os
    import tempfile
    import time

    folder = os.path.join(tempfile.gettempdir(), "dask-cosim")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def _cluster_loggers() -> list[logging.Logger]:
    """The loggers of :data:`CLUSTER_LOGGERS` and every logger below them with handlers of its
    own (distributed's logging config gives e.g. ``tornado.application`` its own stderr handler)."""
    names = set(CLUSTER_LOGGERS)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.handlers and name.split(".")[0] in CLUSTER_LOGGERS:
            names.add(name)
    return [logging.getLogger(name) for name in sorted(names)]


@contextmanager
def cluster_logs(path: str | None) -> Iterator[None]:
    """Send this process's ``distributed``, ``bokeh``, ``tornado`` and ``asyncio`` log records
    to the file ``path`` (created at the first record) instead of stderr, for the duration
    of the block; ``None`` leaves logging alone (``--verbose``).

    Examples
    --------
    >>> import logging, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "cluster.log")
    >>> with cluster_logs(path):
    ...     logging.getLogger("distributed.worker").error("Compute Failed")
    >>> "Compute Failed" in open(path).read()
    True
    """
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    saved = []
    for logger in _cluster_loggers():
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()


@contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = "auto",
    processes: bool = True,
    timeout: float = 10.0,
    echo: Callable[[str], None] | None = print,
    quiet: bool = False,
    log_file: str | None = None,
) -> Iterator:
    """A distributed ``Client`` for the duration of a ``with`` block.

    With ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``) it connects to that
    cluster, raising :class:`SchedulerUnreachable` after ``timeout`` seconds, and only
    closes its own client at the end. Without, it starts a ``LocalCluster`` sized to
    this machine with scheduler, workers and dashboard bound to 127.0.0.1, and shuts it
    down when the block ends, also on error and on Ctrl-C.

    ``log_file``: the cluster's log records (this process's ``distributed``, ``bokeh`` and
    ``tornado`` loggers, and everything the embedded cluster's worker processes write on
    stderr) go to this file instead of stderr; ``None`` leaves them on stderr.

    Examples
    --------
    >>> from dask_cosim.cluster import dask_client
    >>> with dask_client(processes=False, workers=1, echo=None) as client:
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    with cluster_logs(log_file), _environment_kept():
        yield from _dask_client(
            scheduler, workers, threads_per_worker, memory_limit, processes, timeout, echo, quiet, log_file
        )


@contextmanager
def _environment_kept() -> Iterator[None]:
    """Leave this process's environment as the embedded cluster found it.

    distributed's nanny sets ``distributed.nanny.pre-spawn-environ`` (``OMP_NUM_THREADS=1``,
    ``OPENBLAS_NUM_THREADS=1``, ...) in *this* process's ``os.environ`` before it spawns a
    worker, and never undoes it: afterwards, local computations would read a one-thread
    BLAS setting the user never made (:func:`~dask_cosim._backend.blas_threads_for_task`).
    Each such variable (and each of :data:`WORKER_MALLOC`) the nanny left at its value goes
    back to what it was.
    """
    import os

    import dask

    before = dict(os.environ)
    try:
        yield
    finally:  # distributed (and its config) is loaded by now
        spawned = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
        for key, value in WORKER_MALLOC.items():  # ours, in the config only while the cluster started
            spawned.setdefault(key, value)
        for key, value in ((str(k), str(v)) for k, v in spawned.items()):
            if os.environ.get(key) == value and before.get(key) != value:
                if key in before:
                    os.environ[key] = before[key]
                else:
                    del os.environ[key]


def _dask_client(
    scheduler, workers, threads_per_worker, memory_limit, processes, timeout, echo, quiet, log_file
):
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout, set_as_default=True)
        except (OSError, TimeoutError) as err:
            raise SchedulerUnreachable(
                f"scheduler: cannot reach a Dask scheduler at {scheduler!r} within {timeout:g} s "
                f"({type(err).__name__}); is it running and is the address right?"
            ) from err
        except TypeError as err:  # distributed's way of saying "tls:// without TLS settings"
            if "TLS" not in str(err):
                raise
            raise SchedulerUnreachable(
                f"scheduler: {scheduler!r} requires TLS, and no client certificate is configured: set "
                "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .client.key in the "
                "dask config (e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE=ca.pem); see the README's "
                "security section"
            ) from err
        try:
            if echo:
                echo(f"Connected to {scheduler}; dashboard: {client.dashboard_link}")
            yield client
        finally:
            client.close()
        return

    n, t = machine_layout(workers, threads_per_worker)
    cluster = None
    try:
        with _stops_held_while_workers_start(processes):  # a Ctrl-C meanwhile is raised on leaving
            cluster = _local_cluster(n, t, processes, memory_limit, quiet, log_file)
        client = Client(cluster, set_as_default=True)
        try:
            if echo:
                echo(f"Dask dashboard: {_dashboard_link(client)} ({n} workers x {t} threads)")
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _dashboard_link(client) -> str:
    """The embedded cluster's dashboard link, or why there is none (distributed serves only
    a page asking for bokeh without it)."""
    from ._extras import available, install_hint

    if available("bokeh"):
        return client.dashboard_link
    return f"not served (it needs bokeh: {install_hint('bokeh')})"


def _local_cluster(n: int, t: int, processes: bool, memory_limit, quiet: bool, log_file: str | None = None):
    from distributed import LocalCluster

    from ._dashboard import install as fix_group_graph
    from ._worker_logs import ENV

    fix_group_graph()  # /groups answers 500 in distributed 2026.8 otherwise (see _dashboard)

    extra: dict = {}
    if log_file is not None:
        if processes:  # each worker process (also one the nanny restarts) writes its stderr to the log
            extra = {"preload": ["dask_cosim._worker_logs"], "env": {ENV: log_file}}
        level = logging.WARNING  # (lower would print the workers' start-up records before the preload)
    else:
        level = logging.ERROR if quiet else logging.WARNING
    import dask

    with dask.config.set({**_calmer_polling(), **_worker_malloc()}), warnings.catch_warnings():
        # distributed moves the dashboard to a free port when 8787 is taken, and warns on stderr
        # (the link printed says where it is)
        warnings.filterwarnings("ignore", message=f"Port {DEFAULT_DASHBOARD_PORT} is already in use")
        return LocalCluster(
            n_workers=n,
            threads_per_worker=t,
            processes=processes,
            memory_limit=memory_limit,
            host="127.0.0.1",
            protocol="tcp://",  # also for processes=False, so the address is reachable and bound to 127.0.0.1
            dashboard_address=f"127.0.0.1:{DEFAULT_DASHBOARD_PORT}",
            silence_logs=level,
            **extra,
        )


#: The embedded cluster polls less often than distributed's defaults: the event loop's
#: health tick (20 ms), the system monitor (500 ms) and the memory monitor of each worker
#: and of its nanny (100 ms; the nannies share this process's event loop with the
#: scheduler). A job runner needs none of them that often, and their cost is fixed per
#: second of wall time, whatever the job: on few cores it can outweigh the scheduling of a
#: job's tasks (figures: README "Cluster scale"). Memory limits still hold: a worker checks its
#: memory twice a second. Settings the user changed are left as they are.
CALMER_POLLING = {
    "distributed.admin.tick.interval": ("20ms", "1s"),
    "distributed.admin.system-monitor.interval": ("500ms", "2s"),
    "distributed.worker.memory.monitor-interval": ("100ms", "500ms"),
}


#: glibc malloc settings the embedded cluster's worker processes start with (added to
#: ``distributed.nanny.pre-spawn-environ``). distributed sets ``MALLOC_TRIM_THRESHOLD_=65536``
#: there so that workers give freed memory back to the OS; setting any such variable turns
#: off glibc's adaptive mmap threshold, so every temporary over 128 KiB (a top-k task's
#: selection passes make many) was mapped and faulted in afresh, and a top-k task took up
#: to 1.8x as long in a worker as in a plain process (README "Cluster scale"). These two
#: restore the threshold the adaptive rule reaches (glibc's 32 MiB maximum) and keep 32 MiB
#: of freed heap for reuse; above that the heap is trimmed as distributed asks. Left out
#: where the user set the variable or its config key.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TOP_PAD_": str(32 * 2**20)}


def _worker_malloc() -> dict[str, str]:
    import os

    import dask

    spawned = dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}
    return {
        f"distributed.nanny.pre-spawn-environ.{key}": value
        for key, value in WORKER_MALLOC.items()
        if key not in spawned and key not in os.environ
    }


def _calmer_polling() -> dict[str, str]:
    import dask

    return {
        key: ours for key, (default, ours) in CALMER_POLLING.items() if dask.config.get(key, None) == default
    }


@contextmanager
def _stops_held_while_workers_start(processes: bool) -> Iterator[None]:
    """Start worker processes immune to Ctrl-C, and hold a Ctrl-C or SIGTERM meanwhile
    until the cluster stands.

    Ctrl-C in a terminal signals the whole process group; the workers should not die
    with tracebacks of their own but be shut down by this process, which catches it.
    While the cluster starts, SIGINT is blocked in this thread, and so in every thread
    started meanwhile, which start the workers: a blocked signal stays blocked across
    fork and exec, and the workers never take it. A Ctrl-C meanwhile (taken by a thread
    that ran before, or pending until the block ends) is only recorded, and so is a
    SIGTERM where this process has a handler for it (the command's); each is raised
    again, to its own handler, once the cluster can be shut down: acting on it mid-start
    would leave a half-started cluster behind. (Ignoring SIGINT instead, which the
    workers would inherit too, lost it: the job ran on to its end.) SIGTERM is not
    blocked: the workers' nannies stop them with it.

    multiprocessing's resource tracker unblocks SIGINT in the thread that starts it
    (after starting it with SIGINT blocked): it is started here first, so that no thread
    that starts a worker does that.
    """
    if not processes or threading.current_thread() is not threading.main_thread():
        yield
        return
    masks = hasattr(signal, "pthread_sigmask")  # POSIX
    if masks:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # what the first spawned worker would do
    held = [signal.SIGINT]
    if hasattr(signal, "SIGTERM") and callable(signal.getsignal(signal.SIGTERM)):
        held.append(signal.SIGTERM)
    caught: list[int] = []

    def record(signum, frame):
        caught.append(signum)

    # without signal masks (not POSIX) the workers can only inherit SIGINT ignored: a Ctrl-C is lost
    handlers = {signal.SIGINT: record if masks else signal.SIG_IGN}
    previous = {sig: signal.signal(sig, handlers.get(sig, record)) for sig in held}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masks else None
    try:
        yield
    finally:
        if masks:  # a Ctrl-C pending on this thread is recorded here
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    for sig in dict.fromkeys(caught):  # KeyboardInterrupt; the command's SIGTERM exit
        signal.raise_signal(sig)
