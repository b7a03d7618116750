"""A real multi-process Dask cluster for reliability tests (a pytest plugin module).

:func:`start_real_cluster` launches ``dask scheduler`` and ``dask worker`` (the
distributed command-line tools, from this interpreter's environment) as separate
processes on 127.0.0.1, waits (bounded) until every worker has registered, and always
stops them again. Each ``dask worker`` is a nanny process that runs one worker process;
killing the worker process (``SIGKILL`` by pid) makes the nanny start a new one, as on a
cluster whose machines are preempted.

Fixtures:

``real_cluster``
    A session-wide scheduler with two nanny-managed workers (two threads each), checked
    before every test to have both workers up again (after a previous test killed one),
    and settled after it (no task left processing).

The task helpers at the bottom (``gate``...) run inside worker processes; this module
is pickled *by value* so workers need not import it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])

READY_TIMEOUT = 90.0  # seconds for the scheduler + workers to come up (2 busy cores)
STOP_TIMEOUT = 15.0
REPO = Path(__file__).resolve().parents[1]

_LIVE: list[RealCluster] = []


def _dask_cli() -> list[str]:
    """The ``dask`` console script of this environment (fallback: ``python -m dask``)."""
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


#: Run a command with ``PR_SET_PDEATHSIG``: the kernel sends it SIGTERM when the test
#: process dies, even by SIGKILL, so an interrupted test run leaves no cluster behind
#: (``atexit`` does not run then). The setting survives ``execv``.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('parent already gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _dying_with_this_process(args: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    # one BLAS thread per worker thread: two workers share the two cores of CI machines
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(extra or {})
    return env


@dataclass
class RealCluster:
    """Handles on a running scheduler and its nanny-managed workers."""

    address: str
    scheduler: subprocess.Popen
    nannies: list[subprocess.Popen]
    workdir: Path
    n_workers: int
    memory_limit: str
    _client: object | None = field(default=None, repr=False)

    # -- processes -------------------------------------------------------------------------
    @property
    def scheduler_pid(self) -> int:
        return self.scheduler.pid

    @property
    def nanny_pids(self) -> list[int]:
        return [p.pid for p in self.nannies]

    def client(self, **kwargs):
        """A new :class:`distributed.Client` connected to this cluster (close it after use)."""
        from distributed import Client

        kwargs.setdefault("timeout", 30)
        return Client(self.address, **kwargs)

    def _probe(self):
        if self._client is None or self._client.status != "running":
            self._client = self.client(set_as_default=False)
        return self._client

    def workers(self) -> dict[str, dict]:
        """Scheduler's view of the workers: address -> info (``pid``, ``memory_limit``...)."""
        return dict(self._probe().scheduler_info(n_workers=-1)["workers"])

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of the worker process (not the nanny), for live workers."""
        pids = self._probe().run(os.getpid, on_error="return")
        return {addr: pid for addr, pid in pids.items() if isinstance(pid, int)}

    def wait_for_workers(self, n: int | None = None, timeout: float = READY_TIMEOUT) -> dict[str, int]:
        """Block until ``n`` workers (default: all) are registered and alive; return their pids."""
        n = self.n_workers if n is None else n
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                pids = self.worker_pids()
            except OSError:
                pids = {}
            if len(pids) >= n and all(_alive(p) for p in pids.values()):
                return pids
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(pids)} of {n} workers registered with {self.address} after {timeout:.0f}s; "
                    f"logs in {self.workdir} (kept with DCS_KEEP_CLUSTER_LOGS=1)"
                )
            time.sleep(0.1)

    def kill_worker(self, address: str | None = None) -> tuple[str, int]:
        """``SIGKILL`` one worker process (by pid); its nanny restarts it. Returns (address, pid)."""
        pids = self.worker_pids()
        if address is None:
            address = sorted(pids)[0]
        pid = pids[address]
        os.kill(pid, signal.SIGKILL)
        return address, pid

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until no task is processing; restart (SIGKILL) workers still busy after ``timeout``.

        Keeps a failed test's leftovers (a task stuck on a gate or pipe) out of the next test.
        """
        probe = self._probe()
        deadline = time.monotonic() + timeout
        while True:
            busy = [w for w, keys in probe.processing().items() if keys]
            if not busy:
                return
            if time.monotonic() > deadline:
                for address in busy:
                    with contextlib.suppress(KeyError, ProcessLookupError):
                        self.kill_worker(address)
                self.wait_for_workers()
                return
            time.sleep(0.1)

    def check_alive(self) -> None:
        """Raise if the scheduler or a nanny process has exited."""
        for what, proc in [("scheduler", self.scheduler)] + [("nanny", p) for p in self.nannies]:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{what} process {proc.pid} exited with {proc.returncode}; logs in {self.workdir} "
                    "(kept with DCS_KEEP_CLUSTER_LOGS=1)\n" + self.logs()
                )

    def logs(self) -> str:
        """The scheduler's and workers' logs (for failure messages)."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    # -- shutdown --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop workers then scheduler: SIGTERM, then SIGKILL of each process group we started."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=5)
            self._client = None
        procs = [*self.nannies, self.scheduler]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:  # the group also holds the nanny's worker process
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self in _LIVE:
            _LIVE.remove(self)
        if not os.environ.get("DCS_KEEP_CLUSTER_LOGS"):  # set it to keep logs and worker dirs
            shutil.rmtree(self.workdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group led by ``proc`` (started with ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


@contextlib.contextmanager
def start_real_cluster(
    n_workers: int = 2,
    *,
    nthreads: int = 1,
    memory_limit: str = "2GiB",
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
) -> Iterator[RealCluster]:
    """Run ``dask scheduler`` + ``n_workers`` × ``dask worker`` on 127.0.0.1 (free ports).

    ``env`` adds environment variables (e.g. ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``)
    to every process. Everything started is stopped on exit, also when the body raises.

    Examples
    --------
    >>> with start_real_cluster(1) as cluster:  # doctest: +SKIP
    ...     with cluster.client() as client:
    ...         client.submit(sum, [1, 2]).result()
    3
    """
    workdir = Path(tempfile.mkdtemp(prefix="dcs-cluster-"))
    child_env = _child_env(env)
    sched_file = workdir / "scheduler.json"
    procs: list[subprocess.Popen] = []

    def popen(args: list[str], log: str) -> subprocess.Popen:
        with open(workdir / log, "wb") as out:
            proc = subprocess.Popen(
                _dying_with_this_process([*_dask_cli(), *args]),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=child_env,
                start_new_session=True,  # own process group: stop() reaches the nanny's child too
            )
        procs.append(proc)
        return proc

    cluster = None
    try:
        scheduler = popen(
            [
                "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                "--dashboard-address", "127.0.0.1:0",
                "--scheduler-file", str(sched_file), "--idle-timeout", "3600",
            ],
            "scheduler.log",
        )  # fmt: skip
        info = _wait_for_file(sched_file, scheduler, timeout, "dask scheduler")
        address = info["address"]
        nannies = [
            popen(
                [
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    str(nthreads),
                    "--nworkers",
                    "1",
                    "--memory-limit",
                    memory_limit,
                    "--no-dashboard",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--preload",  # import the library before registering: a restarted worker is warm
                    "dask_cosim",
                    "--name",
                    f"w{i}",
                    "--death-timeout",
                    "60",
                    "--local-directory",
                    str(workdir / f"w{i}"),
                ],
                f"worker-{i}.log",
            )  # fmt: skip
            for i in range(n_workers)
        ]
        cluster = RealCluster(address, scheduler, nannies, workdir, n_workers, memory_limit)
        _LIVE.append(cluster)
        try:
            cluster.wait_for_workers(n_workers, timeout=timeout)
        except Exception as err:
            raise RuntimeError(f"{err}\n{cluster.logs()}") from err
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        else:  # failed before the handle existed
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)


@atexit.register
def _stop_leftovers() -> None:  # e.g. the test run was interrupted
    for cluster in list(_LIVE):
        cluster.stop()


@pytest.fixture(scope="session")
def _real_cluster_session() -> Iterator[RealCluster]:
    # two threads per worker: a task held back by a gate blocks one thread, and the tasks
    # the scheduler queued behind it on the same worker still run on the other
    with start_real_cluster(2, nthreads=2) as cluster:
        yield cluster


@pytest.fixture
def real_cluster(_real_cluster_session: RealCluster) -> Iterator[RealCluster]:
    """The shared real cluster with both workers up (waits for nanny restarts, bounded)."""
    cluster = _real_cluster_session
    cluster.wait_for_workers()
    yield cluster
    cluster.check_alive()
    cluster.settle()


@pytest.fixture
def gate_file(tmp_path) -> Iterator[Path]:
    """A gate for :func:`gated` that is always opened at teardown (a failed test never
    leaves a worker thread waiting on it)."""
    path = tmp_path / "gate"
    yield path
    open_gate(path)


# -- helpers that run inside tasks, and fault-injection helpers --------------------------


def gate(x: np.ndarray, gate_file: str, block: tuple, timeout: float = 60.0, block_info=None) -> np.ndarray:
    """Identity on blocks (``map_blocks``); block ``block`` first waits until ``gate_file`` exists.

    Placed on one input block, it holds back every task that needs that block, so a test
    can inject a fault while the rest of the graph is demonstrably half done. Bounded:
    raises ``TimeoutError`` after ``timeout`` seconds rather than hang.
    """
    here = tuple(block_info[None]["chunk-location"]) if block_info else None
    if here == tuple(block):
        deadline = time.monotonic() + timeout
        while not os.path.exists(gate_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate_file} was never opened")
            time.sleep(0.02)
    return x.copy()


def gated(x: np.ndarray, chunks, gate_file, block: tuple | None = None):
    """``x`` as a dask array whose ``block`` (default: the last) waits for ``gate_file``."""
    import dask.array as da

    arr = da.from_array(x, chunks=chunks)
    block = tuple(n - 1 for n in arr.numblocks) if block is None else block
    from dask_cosim._compat import map_blocks  # key prefix "gate" in both dask array modes

    return map_blocks(gate, arr, str(gate_file), block, dtype=arr.dtype, meta=x[:0], prefix="gate")


def open_gate(gate_file: str | os.PathLike) -> None:
    Path(gate_file).touch()


def held_keys(client, prefix: str) -> dict[str, int]:
    """Worker address -> number of keys starting with ``prefix`` held in its memory."""
    from dask.utils import key_split

    return {
        addr: sum(1 for key in keys if key_split(key).startswith(prefix))
        for addr, keys in client.has_what().items()
    }


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.05,
    client=None,
) -> object:
    """Poll ``predicate`` until it returns something truthy; raise ``TimeoutError`` after
    ``timeout``, with the scheduler's view when ``client`` is given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = f"; scheduler: {diagnose(client)}" if client is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{state}")
        time.sleep(interval)


def _scheduler_state(dask_scheduler) -> dict:
    from collections import Counter

    from dask.utils import key_split

    states = Counter(f"{key_split(ts.key)}:{ts.state}" for ts in dask_scheduler.tasks.values())
    workers = {
        addr: (ws.status.name, ws.memory.process >> 20, [str(ts.key)[:60] for ts in ws.processing])
        for addr, ws in dask_scheduler.workers.items()
    }
    return {"workers": workers, "tasks": dict(states), "queued": len(dask_scheduler.queued)}


def diagnose(client) -> dict:
    """Workers (status, MiB, processing keys) and task states by prefix, from the scheduler."""
    try:
        return client.run_on_scheduler(_scheduler_state)
    except Exception as err:  # noqa: BLE001 - diagnostics only
        return {"error": repr(err)}


def _failing_store_class():
    from zarr.storage import WrapperStore

    class FailingStore(WrapperStore):
        """A zarr store that raises ``OSError(errno)`` when writing the given keys.

        Simulates a full disk (``ENOSPC``) or a location that turned read-only
        (``EROFS``/``EACCES``) for chosen chunks, in whichever process writes them.
        """

        def __init__(self, store, fail_keys, err: int):
            super().__init__(store)
            self.fail_keys = tuple(fail_keys)
            self.err = err

        def __reduce__(self):
            return (make_failing_store, (self._store, self.fail_keys, self.err))

        async def set(self, key, value, *args, **kwargs):
            if key in self.fail_keys:
                raise OSError(self.err, os.strerror(self.err), key)
            return await self._store.set(key, value, *args, **kwargs)

    return FailingStore


def make_failing_store(store, fail_keys, err: int):
    """``store`` (a zarr store or local path) whose writes of ``fail_keys`` raise ``OSError(err)``."""
    if isinstance(store, (str, os.PathLike)):
        from zarr.storage import LocalStore

        store = LocalStore(os.fspath(store))
    return _failing_store_class()(store, fail_keys, err)
