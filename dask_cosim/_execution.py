"""Running a write: the write gate, progress, the scheduler or cluster, and the report.

:func:`execute` runs the write tasks a writer built (one per output block, or per top-k
link) on the active ``distributed`` client if there is one, else on dask's scheduler, with
a progress display; when a task fails, the writes already running finish before the
error propagates, so nothing is written after the call has raised (:class:`WriteGate`).
:class:`WriteReport` is what a write returns and the command prints.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from . import _config

__all__ = ["WriteReport", "WriteGate", "execute", "products", "dim_of"]


@dataclass
class WriteReport:
    """What a write did; ``summary()`` is the one-line report the CLI prints.

    ``blocks`` counts output blocks (zarr: marker grid, Parquet: partitions),
    ``blocks_skipped`` those already done by an earlier run (``resume=True``),
    ``blocks_written`` those this call computed and stored. ``pairs`` counts the
    similarity entries the written blocks cover, ``products`` the dot products actually
    computed for them (fewer for a self-similarity, which computes one triangle of blocks
    and transposes it, and for a resumed top-k, which does not compute its saved parts
    again). ``found`` is the number of pairs in a ``pairs_above`` output; ``rows``, ``k``
    and ``nan_rows`` (rows holding a NaN score) describe a top-k output.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    blocks: int
    blocks_skipped: int
    blocks_written: int
    pairs: int  # similarity entries covered by the blocks written now
    dim: int | None
    seconds: float
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: int | None = None  # dot products computed now (None: one per pair)
    found: int | None = None  # pairs_above: pairs in the whole output
    threshold: float | None = None
    rows: int | None = None  # topk: rows of the output (batch x N)
    k: int | None = None
    nan_rows: int | None = None  # topk: rows with a NaN score (a NaN/inf input vector)
    triangle: bool | None = None  # one triangle of blocks computed (None: when products < pairs)
    reused_parts: bool = False  # a resumed top-k merged parts its interrupted run had saved

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    @property
    def gflops(self) -> float | None:
        """GFLOP/s ``2 * products * D / t``: the products computed, not the pairs of the result
        (``None`` when D is unknown)."""
        if self.dim is None or self.seconds <= 0:
            return None
        products = self.pairs if self.products is None else self.products
        return 2.0 * products * self.dim / self.seconds / 1e9

    def counts(self) -> list[str]:
        """What a user checks first: pairs found, rows and NaN rows of a top-k, products computed."""
        out = []
        if self.found is not None:
            above = f" with score >= {self.threshold:g}" if self.threshold is not None else ""
            out.append(f"found {self.found} pairs{above}")
        if self.rows is not None and self.k is not None:
            nan = f", {self.nan_rows} with a NaN score" if self.nan_rows is not None else ""
            out.append(f"{self.rows} rows x {self.k} neighbours{nan}")
        if self.products is not None and self.products < self.pairs:
            triangle = not self.reused_parts if self.triangle is None else self.triangle
            why = ["one triangle of blocks"] if triangle else []
            if self.reused_parts:
                why.append("the rest saved by the interrupted run")
            lead = "self-similarity: " if triangle else ""
            detail = f" ({', '.join(why)})" if why else ""
            out.append(
                f"{lead}{self.products:.3g} of {self.pairs:.3g} products computed{detail}, "
                "GFLOP/s counts those"
            )
        return out

    def summary(self) -> str:
        resumed = f", {self.blocks_skipped} already done" if self.blocks_skipped else ""
        flops = f", {self.gflops:.1f} GFLOP/s" if self.gflops is not None else ""
        counts = "".join(f"; {c}" for c in self.counts())
        return (
            f"{self.path}: {self.kind} shape {self.shape}, {self.blocks} blocks "
            f"({self.blocks_written} written{resumed}) in {self.seconds:.2f} s, "
            f"{self.pairs_per_second:.3g} pairs/s{flops}{counts}"
        )


def products(facts: Mapping[str, Any], share: float) -> int | None:
    """Dot products computed for ``share`` of the output: a self-similarity with square
    blocks and more than one block row computes only the upper triangle of blocks."""
    shape, chunks = facts.get("shape"), facts.get("chunks")
    if not shape or not chunks:
        return None
    total = int(np.prod(shape))
    rows, cols = list(chunks[-2]), list(chunks[-1])
    if facts.get("self_similar") and not facts.get("labels") and rows == cols and len(rows) > 1 and total:
        r = np.asarray(rows, dtype=np.int64)
        total = int(np.prod(shape[:-2], dtype=np.int64)) * int(np.triu(np.outer(r, r)).sum())
    return int(round(total * share))


def dim_of(facts: Mapping[str, Any]) -> int | None:
    """D, the vector length (for GFLOP/s); read from the input's metadata if not recorded.
    ``None`` (no GFLOP/s) for sparse inputs: their products cost per stored value, not
    ``2 D`` per pair."""
    if any((facts.get(x) or {}).get("sparse") for x in ("a", "b")):
        return None
    return _input_shape(facts.get("a") or {}, -1)


def _input_shape(info: Mapping[str, Any], axis: int) -> int | None:
    """One axis of an input's shape, from the recorded facts or the input's metadata."""
    shape = info.get("shape")
    if not shape and info.get("path"):
        from ._inputs import open_input

        try:
            shape = open_input(info["path"], "a").shape
        except Exception:  # noqa: BLE001 - only for the report; never fail a write over it
            return None
    return int(shape[axis]) if shape else None


# --------------------------------------------------------------------------- execution


def _distributed_client():
    """The distributed client dask would use now, or ``None`` for local schedulers."""
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    try:
        from distributed import Client

        return Client.current()  # the `as_current` client, else the default one
    except (ImportError, ValueError):
        return None


class WriteGate:
    """Running block writes of one call in this process, so that the call raises only after
    the last of them has finished: a failed task stops dask from starting new tasks, but
    the ones already running on other threads finish (and write) afterwards otherwise.

    A copy sent to another process (a ``distributed`` worker, the processes scheduler)
    is a fresh gate there; :func:`execute` waits for a cluster's running writes instead.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False

    def __reduce__(self):
        return (WriteGate, ())

    @contextmanager
    def entered(self) -> Iterator[bool]:
        """``True`` while the call still wants writes (the write runs inside the block)."""
        with self._cond:
            wanted = not self._closed
            if wanted:
                self._running += 1
        if not wanted:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def close_and_wait(self, timeout: float = 600.0) -> None:
        """Refuse new writes and wait until the running ones have finished."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._running == 0, timeout)


def _keys_known(keys, dask_worker=None) -> int:
    """How many of ``keys`` a worker still knows (running, queued, or held in memory)."""
    from ._compat import worker_knows

    return worker_knows(dask_worker, keys)


def _wait_until_forgotten(client, keys: list, timeout: float = 600.0) -> None:
    """After a cancel: wait until no worker knows ``keys``. A task already running when it
    was cancelled runs to its end (a worker cannot stop a thread), so without this a block
    could still be written after the call has raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not any(client.run(_keys_known, keys).values()):
                return
        except Exception:  # noqa: BLE001 - a worker or the client is gone: nothing left to wait for
            return
        time.sleep(0.05)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _PlainProgress:
    """Progress for a log: one plain line every ``interval`` seconds, and one at the end,
    instead of a bar redrawn with ``\\r`` ten times a second (used when stdout is not a terminal).

    ``done`` returns how many of ``total`` blocks are finished; it is called from a thread.
    """

    def __init__(self, done, total: int, interval: float):
        self.done, self.total, self.interval = done, total, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dask-cosim-progress", daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> _PlainProgress:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.line()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.line()

    def line(self) -> None:
        n = self.done()
        percent = 100 * n // self.total if self.total else 100
        elapsed = time.perf_counter() - self._start
        print(
            f"progress: {n}/{self.total} blocks written ({percent}%), {elapsed:.1f} s",
            file=sys.stdout,
            flush=True,
        )


def _local_progress(tasks: list):
    """A progress display for dask's local schedulers: the bar on a terminal, plain lines off one."""
    from dask.callbacks import Callback
    from dask.diagnostics import ProgressBar

    if _is_terminal(sys.stdout):
        return ProgressBar()
    keys = {t.key for t in tasks}
    finished: list = []

    class _Count(Callback):
        def _posttask(self, key, result, dsk, state, id):
            if key in keys:
                finished.append(key)

    stack = ExitStack()
    stack.enter_context(_Count())
    stack.enter_context(_PlainProgress(lambda: len(finished), len(tasks), _config.progress_interval()))
    return stack


def execute(tasks: list, progress: bool, gate: WriteGate) -> None:
    """Run the write tasks: on the active distributed client if any, else dask's scheduler.

    On failure, every write that is already running finishes before the error propagates
    (``gate`` tracks them in this process; on a cluster the workers are asked), so nothing
    is written after this call has raised.
    """
    if not tasks:
        return
    client = _distributed_client()
    if client is None:
        try:
            with _local_progress(tasks) if progress else nullcontext():
                dask.compute(*tasks)
        except Exception:
            gate.close_and_wait()
            raise
        return
    with _stops_noted() as stop_if_asked:
        futures = client.compute(tasks)
        try:
            plain = progress and not _is_terminal(sys.stdout)
            interval = _config.progress_interval() if plain else 0.0
            count = lambda: sum(f.done() for f in futures)  # noqa: E731
            with (
                _PlainProgress(count, len(futures), interval)
                if plain
                else _terminal_progress(futures)
                if progress
                else nullcontext()
            ):
                _wait_for(futures, stop_if_asked)
        except BaseException as err:
            client.cancel(futures)
            if isinstance(err, Exception):  # not on Ctrl-C: the user wants out now
                _wait_until_forgotten(client, [f.key for f in futures])
            raise


#: Seconds between two looks at a running job's futures (and at a noted Ctrl-C).
POLL_INTERVAL = 0.05


def _wait_for(futures: list, stop_if_asked: Callable[[], None]) -> None:
    """Until every future is done; raises the first failed task's exception (fail fast),
    and a noted Ctrl-C or SIGTERM (:func:`_stops_noted`) between two looks."""
    pending = list(futures)
    while pending:
        stop_if_asked()
        still = []
        for future in pending:
            if not future.done():  # a flag: no lock that distributed's event loop also takes
                still.append(future)
            elif future.status == "error":
                future.result()  # raises the task's exception
        pending = still
        if pending:
            time.sleep(POLL_INTERVAL)


@contextmanager
def _stops_noted() -> Iterator[Callable[[], None]]:
    """While a job runs on a distributed client, a Ctrl-C (and a SIGTERM where this
    process has a Python handler for it, as the command has) is only noted; the function
    yielded raises it to its own handler at a safe point (the wait loop calls it between
    two looks), and one noted during the last steps is raised when the block ends.

    Raised where it arrives, the ``KeyboardInterrupt`` can land inside a ``with lock:`` of
    distributed's that its event loop also takes (``as_completed``'s condition, the event
    a synchronous call waits on), right after the lock was taken: the lock is never
    released, the event loop waits for it forever, and so does the cluster's shutdown
    (an interrupted ``dask-cosim run`` hung so). Only the main thread receives signals;
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    stops = [signal.SIGINT, *([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])]
    noted: list[int] = []

    def note(signum, frame):
        noted.append(signum)

    previous = {sig: signal.getsignal(sig) for sig in stops}
    previous = {sig: handler for sig, handler in previous.items() if callable(handler)}
    for sig in previous:
        signal.signal(sig, note)

    def restore():
        for sig, handler in previous.items():
            if signal.getsignal(sig) is note:
                signal.signal(sig, handler)

    def stop_if_asked():
        if noted:  # its own handler raises here
            sig = noted.pop(0)
            previous[sig](sig, None)

    try:
        yield stop_if_asked
    finally:
        restore()
    if noted:  # only reached when the block ended normally
        signal.raise_signal(noted[0])


@contextmanager
def _terminal_progress(futures: list) -> Iterator[None]:
    """distributed's progress bar on a terminal, drawn by a thread of its own (it blocks
    until the futures are done), so that the wait loop stays in this thread."""
    from distributed import progress as show_progress

    def draw():
        with suppress(Exception):  # the bar is for show: its failure must not print over the job's
            show_progress(futures, notebook=False)

    bar = threading.Thread(target=draw, name="dask-cosim-bar", daemon=True)
    bar.start()
    yield  # on an error the bar ends with the cancelled futures (a daemon: it holds up no exit)
    bar.join()  # it clears its line when done: before the summary is printed
