"""Write results block by block: similarity and top-k to zarr, pairs to Parquet, resumably.

Every output block is written by its own ``cosine-write`` task, which stores the block's
data and then, right after, its own marker (one marker chunk per block, so no two tasks
ever read-modify-write a shared object). A block counts as done only when its marker
exists: zarr skips all-zero chunks (``write_empty_chunks=False``) and a crash can leave
a chunk without its marker, so "the chunk file exists" never means "the block is done".
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from . import _config, _provenance, _topk_store
from ._backend import to_numpy
from ._compat import block_delayeds, collection_name
from ._sizing import regular_chunks

__all__ = [
    "to_zarr",
    "to_parquet",
    "WriteReport",
    "OutputExistsError",
    "ResumeMismatchError",
    "check_output",
    "regular_chunks",
]

#: Group attribute under which dask_cosim records what an output holds.
ATTR = "dask_cosim"
#: Version of the on-disk layout (markers, attributes).
LAYOUT = 1
#: The marker array: one uint8 chunk per output block, 1 once the block is written.
MARKERS = "_blocks_done"
#: Facts that may differ between a run and its resumption without changing the data.
_VOLATILE = ("version", "device")
#: Parquet: data files are ``part-<block>.parquet``; bookkeeping lives under ``_dask_cosim/``
#: (pyarrow/pandas ignore names starting with "_" or ".", so readers never see it).
_PQ_META = "_dask_cosim"


class OutputExistsError(FileExistsError):
    """The output location holds data and neither ``overwrite`` nor ``resume`` allows using it."""


class ResumeMismatchError(ValueError):
    """``resume=True`` but the stored output was computed with other parameters."""


@dataclass
class WriteReport:
    """What a write did; ``summary()`` is the one-line report the CLI prints.

    ``blocks`` counts output blocks (zarr: marker grid, Parquet: partitions),
    ``blocks_skipped`` those already done by an earlier run (``resume=True``),
    ``blocks_written`` those this call computed and stored. ``pairs`` counts the
    similarity entries the written blocks cover, ``products`` the dot products actually
    computed for them (fewer for a self-similarity, which computes one triangle of blocks
    and transposes it). ``found`` is the number of pairs in a ``pairs_above`` output;
    ``rows``, ``k`` and ``nan_rows`` (rows holding a NaN score) describe a top-k output.
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
            out.append(
                f"self-similarity: {self.products:.3g} of {self.pairs:.3g} products computed "
                "(one triangle of blocks), GFLOP/s counts those"
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


def _products(facts: Mapping[str, Any], share: float) -> int | None:
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


def _topk_nan_rows(values) -> int | None:
    """Rows of a written top-k ``values`` array that hold a NaN score (read block by block)."""
    try:
        vals = da.from_array(values, chunks=values.chunks)
        return int(da.isnan(vals).any(axis=-1).sum().compute())
    except Exception:  # noqa: BLE001 - only for the report; never fail a finished write over it
        return None


def _parquet_rows(fs, root: str, nparts: int) -> int | None:
    """Rows of the whole Parquet output, from the files' footers."""
    import pyarrow.parquet as pq

    try:
        total = 0
        for i in range(nparts):
            with fs.open(f"{root}/{_pq_name(i)}", "rb") as f:
                total += pq.read_metadata(f).num_rows
        return total
    except Exception:  # noqa: BLE001 - only for the report
        return None


# --------------------------------------------------------------------------- helpers


def _regularize(arr: da.Array, what: str) -> da.Array:
    if regular_chunks(arr.chunks):
        return arr
    sizes = tuple(max(c) if c else 0 for c in arr.chunks)
    warnings.warn(
        f"{what}: dask blocks {tuple(tuple(c) for c in arr.chunks)} are irregular and cannot equal zarr "
        f"chunks; rechunking to regular blocks {sizes} before writing (costs memory and a copy). "
        "Pass integer chunks= to the computation to avoid this.",
        stacklevel=4,
    )
    return arr.rechunk(sizes)


def _zarr_chunk_shape(chunks) -> tuple[int, ...]:
    return tuple(max(1, c[0]) if c else 1 for c in chunks)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _comparable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _jsonable(dict(params)).items() if k not in _VOLATILE}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same(stored: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    old, new = _flatten(_comparable(stored)), _flatten(_comparable(wanted))
    if old == new:
        return
    diffs = [
        f"{key}: stored {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    raise ResumeMismatchError(
        f"resume: the output at {where} was computed with different parameters ("
        + "; ".join(diffs)
        + "); rerun with the same parameters, or pass overwrite=True (--overwrite) to start again"
    )


def _describe(store) -> str:
    if isinstance(store, (str, os.PathLike)):
        return os.fspath(store)
    return repr(store)


def _exists_message(where: str, partial: bool) -> str:
    if partial:
        return (
            f"output {where} holds a half-written result from an earlier run; pass resume=True "
            "(--resume) to finish it or overwrite=True (--overwrite) to start again"
        )
    return f"output {where} already exists; pass overwrite=True (--overwrite) to replace it"


def _check_flags(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ValueError(
            "overwrite=True and resume=True contradict each other: resume keeps the finished "
            "blocks, overwrite deletes them; pass only one"
        )


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


class _WriteGate:
    """Running block writes of one call in this process, so that the call raises only after
    the last of them has finished: a failed task stops dask from starting new tasks, but
    the ones already running on other threads finish (and write) afterwards otherwise.

    A copy sent to another process (a ``distributed`` worker, the processes scheduler)
    is a fresh gate there; :func:`_execute` waits for a cluster's running writes instead.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False

    def __reduce__(self):
        return (_WriteGate, ())

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


def _execute(tasks: list, progress: bool, gate: _WriteGate) -> None:
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
    from distributed import as_completed

    futures = client.compute(tasks)
    try:
        plain = progress and not _is_terminal(sys.stdout)
        if progress and not plain:
            from distributed import progress as show_progress

            show_progress(futures, notebook=False)  # clears its line when done
        interval = _config.progress_interval() if plain else 0.0
        count = lambda: sum(f.done() for f in futures)  # noqa: E731
        with _PlainProgress(count, len(futures), interval) if plain else nullcontext():
            for future in as_completed(futures):
                if future.status == "error":
                    future.result()  # raises the task's exception (fail fast)
    except BaseException as err:
        client.cancel(futures)
        if isinstance(err, Exception):  # not on Ctrl-C: the user wants out now
            _wait_until_forgotten(client, [f.key for f in futures])
        raise


# --------------------------------------------------------------------------- zarr


@dataclass(frozen=True)
class _ZarrPayload:
    kind: str
    arrays: dict[str, da.Array]  # name in the group -> dask array (regular blocks)
    grid: tuple[int, ...]  # marker grid: blocks along the leading axes
    params: dict[str, Any]
    pairs_per_block: np.ndarray  # similarity entries each block covers
    dim: int | None
    topk_source: Any = None  # how a top-k result was reduced: written by checkpointed chains


def _zarr_payload(result) -> _ZarrPayload:
    if isinstance(result, da.Array):
        facts = _provenance.lookup(result.name)
        arr = _regularize(result, "to_zarr")
        kind = facts.get("kind", "array")
        params = facts or _fallback_params("array", result)
        sizes = _block_sizes(arr.chunks)
        return _ZarrPayload(kind, {"similarity": arr}, arr.numblocks, params, sizes, _dim(facts))
    if (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and all(isinstance(r, da.Array) for r in result)
    ):
        vals, idx = result
        if vals.shape != idx.shape or vals.ndim not in (2, 3):
            raise ValueError(
                f"result: expected topk's (values, indices) of equal shape (batch, N, k) or (N, k), "
                f"received shapes {vals.shape} and {idx.shape}"
            )
        facts = _provenance.lookup(vals.name)
        params = facts or _fallback_params("topk", vals, idx)
        whole_k = {vals.ndim - 1: -1}
        vals = _regularize(vals.rechunk(whole_k), "to_zarr values")
        idx = _regularize(idx.rechunk(vals.chunks), "to_zarr indices")
        # each row of a block was chosen among M columns: M = the similarity's last axis
        m = int(facts["shape"][-1]) if facts.get("shape") else 1
        sizes = _block_sizes(vals.chunks[:-1]) * m
        arrays = {"values": vals, "indices": idx}
        source = _topk_store.lookup(result[0].name)
        if source is not None and (source.parts.chunks[:-1] != vals.chunks[:-1] or vals.chunks != idx.chunks):
            source = None  # rechunked for writing: the parts no longer match the blocks
        return _ZarrPayload("topk", arrays, vals.numblocks[:-1], params, sizes, _dim(facts), source)
    raise TypeError(
        "result: expected the dask array of cosine_similarity or the (values, indices) pair of topk, "
        f"received {type(result).__name__}; write pairs_above results with to_parquet"
    )


def _block_sizes(chunks) -> np.ndarray:
    """Number of elements of every block of a chunked array (an array over the block grid)."""
    sizes = np.ones(tuple(len(c) for c in chunks), dtype=np.int64)
    for axis, c in enumerate(chunks):
        shape = [1] * len(chunks)
        shape[axis] = len(c)
        sizes = sizes * np.asarray(c, dtype=np.int64).reshape(shape)
    return sizes


def _fallback_params(kind: str, *arrays: da.Array) -> dict[str, Any]:
    """Identity of a result dask_cosim did not build: its (deterministic) dask names."""
    return {
        "kind": kind,
        "names": [a.name for a in arrays],
        "shape": list(arrays[0].shape),
        "chunks": [list(c) for c in arrays[0].chunks],
        "dtype": str(arrays[0].dtype),
    }


def _dim(facts: Mapping[str, Any]) -> int | None:
    """D, the vector length (for GFLOP/s); read from the input's metadata if not recorded."""
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


def _local_path(store) -> str | None:
    if isinstance(store, (str, os.PathLike)):
        path = os.fspath(store)
        if "://" not in path:
            return path
        if path.startswith("file://"):
            return path[len("file://") :]
    return None


def _open_state(store, storage_options):
    """``(group_or_None, status)`` of the output location, without creating anything.

    status: "absent", "empty", "complete"/"partial" (a dask_cosim output), "foreign" (a
    zarr node written by something else) or "other" (data that is not zarr at all).
    """
    import zarr
    from zarr.errors import ContainsArrayError, NodeNotFoundError

    local = _local_path(store)
    if local is not None:
        if not os.path.exists(local):
            return None, "absent"
        if not os.path.isdir(local):
            return None, "other"
        if not os.listdir(local):
            return None, "empty"
    try:
        group = zarr.open_group(store, mode="r+", storage_options=storage_options)
    except ContainsArrayError:
        return None, "foreign"
    except (FileNotFoundError, NodeNotFoundError):
        if local is not None:
            return None, "other"
        return None, _remote_status(store, storage_options)
    info = group.attrs.get(ATTR)
    if not isinstance(info, dict):
        if not list(group.keys()) and not dict(group.attrs):
            return group, "empty"
        return group, "foreign"
    return group, "complete" if info.get("complete") else "partial"


def _remote_status(store, storage_options) -> str:
    if isinstance(store, (str, os.PathLike)):
        fs, root = _fs(store, storage_options)
        return "other" if fs.exists(root) and fs.ls(root) else "absent"
    return "absent"


def check_output(
    result,
    store,
    *,
    overwrite: bool = False,
    resume: bool = False,
    codec: str = "auto",
    storage_options: dict | None = None,
) -> str:
    """Raise now, before any cluster starts, if writing ``result`` to ``store`` would be refused.

    Checks exactly what :func:`to_zarr` (or :func:`to_parquet` for a DataFrame) checks
    before computing: that an existing output may be used (``overwrite``/``resume``) and,
    for ``resume``, that it was computed with the same parameters. Reads only metadata.

    Returns
    -------
    str
        What is there now: "absent", "empty", "partial" or "complete" (a dask_cosim output)
        or "foreign" (another zarr node / Parquet dataset, which ``overwrite`` replaces).
    """
    import dask.dataframe as dd

    _check_flags(overwrite, resume)
    where = _describe(store)
    if isinstance(result, dd.DataFrame):
        params, layout = _parquet_identity(result)
        (_, _, info), status = _parquet_state(store, storage_options)
        _refuse(status, where, overwrite, resume, parquet=True)
        if resume and info is not None:
            _check_same(info.get("params", {}), params, where)
            _check_same(info.get("layout", {}), layout, where)
        return status
    payload = _zarr_payload(result)
    layout = _layout(payload, codec)
    group, status = _open_state(store, storage_options)
    _refuse(status, where, overwrite, resume, parquet=False)
    if resume and status in ("complete", "partial"):
        stored = dict(group.attrs[ATTR])
        _check_same(stored.get("params", {}), payload.params, where)
        _check_same(stored.get("layout", {}), layout, where)
    return status


def _refuse(status: str, where: str, overwrite: bool, resume: bool, parquet: bool) -> None:
    if status in ("absent", "empty"):
        return
    if status == "other":
        kind = "Parquet" if parquet else "zarr"
        raise OutputExistsError(
            f"output {where} already exists and holds data that is not {kind}; refusing to use or "
            "delete it (even with overwrite=True): remove it yourself or choose another output"
        )
    if status == "foreign":
        kind = "a Parquet dataset written by dask_cosim" if parquet else "a zarr group written by dask_cosim"
        if not overwrite:
            raise OutputExistsError(
                f"output {where} already exists and is not {kind}; choose another output or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        return
    if status == "partial" and not (resume or overwrite):
        raise OutputExistsError(_exists_message(where, partial=True))
    if status == "complete" and not (resume or overwrite):
        raise OutputExistsError(_exists_message(where, partial=False))


def to_zarr(
    result,
    store,
    *,
    overwrite: bool = False,
    resume: bool = False,
    codec: str = "auto",
    storage_options: dict | None = None,
    progress: bool = False,
) -> WriteReport:
    """Compute ``result`` block by block into a zarr v3 group, resumably.

    A :func:`~dask_cosim.cosine_similarity` result becomes the array ``similarity``; a
    :func:`~dask_cosim.topk` result ``(vals, idx)`` the arrays ``values`` and ``indices``.
    Each output block is computed and written by its own task, then marked done in the
    ``_blocks_done`` array (one chunk per block), so memory stays at a few blocks per
    worker and an interrupted run can be resumed. zarr chunks equal the dask blocks
    (irregular blocks are first rechunked to regular ones, with a warning), so no two
    tasks ever write the same chunk.

    Parameters
    ----------
    result : dask.array.Array or tuple of two dask arrays
        What to write.
    store : str, os.PathLike or zarr store
        Local path, fsspec URL (``s3://…``, with ``storage_options``) or zarr store. Use a
        path or URL with a multi-process cluster (in-memory stores do not travel).
    overwrite : bool
        Replace an existing output (a zarr node, or an empty directory). Never deletes a
        non-empty directory that is not a zarr store.
    resume : bool
        Finish a half-written output: check that it was computed with the same
        parameters (else :class:`ResumeMismatchError`), delete zarr's leftover
        ``*.partial`` files, and compute only the blocks without a marker.
    codec : {"auto", "none", "zstd", "blosc-lz4"}
        Compression. ``"auto"`` stores similarities uncompressed (cosine scores barely
        compress; see the README's codec section) and top-k arrays with blosc-lz4 +
        bitshuffle (their int64 indices compress well).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    progress : bool
        Show a progress bar (``distributed.progress`` under a distributed client).

    Returns
    -------
    WriteReport

    Raises
    ------
    OutputExistsError
        The output exists and neither ``overwrite`` nor ``resume`` was given.
    ResumeMismatchError
        ``resume=True`` and the stored parameters differ.

    Examples
    --------
    >>> import numpy as np, zarr, tempfile, dask_cosim as dcs
    >>> out = tempfile.mkdtemp() + "/sim.zarr"
    >>> S = dcs.cosine_similarity(np.eye(4, 3), chunks=(2, 2))
    >>> dcs.to_zarr(S, out).blocks
    4
    >>> zarr.open_group(out)["similarity"][0, :2]
    array([1., 0.])
    """
    _check_flags(overwrite, resume)
    start = time.perf_counter()
    payload = _zarr_payload(result)
    where = _describe(store)
    layout = _layout(payload, codec)
    group, status = _open_state(store, storage_options)
    _refuse(status, where, overwrite, resume, parquet=False)
    if status in ("complete", "partial") and resume:
        stored = dict(group.attrs[ATTR])
        _check_same(stored.get("params", {}), payload.params, where)
        _check_same(stored.get("layout", {}), layout, where)
        _clean_partial_files(group.store)
        _ensure_arrays(group, payload, layout)
    else:  # new, empty, or replaced (_refuse allowed it: overwrite=True)
        group = _create(store, payload, layout, storage_options)
    done = group[MARKERS][...].astype(bool)
    gate = _WriteGate()
    if payload.topk_source is not None:  # resumable link by link (see _topk_store)
        values = payload.arrays["values"]
        _topk_store.ensure_state_arrays(group, values)
        token = tokenize(values.name, _describe(group.store), group.path)
        source = payload.topk_source
        tasks, pending = _topk_store.chain_tasks(source, values, group, done, gate, MARKERS, token)
    else:
        tasks, pending = _zarr_tasks(payload, group, done, gate)
    _execute(tasks, progress, gate)
    _finish_zarr(group, payload, where)
    if payload.topk_source is not None:
        _topk_store.drop_state_arrays(group)
    seconds = time.perf_counter() - start  # the write; the counts below read the output back
    pairs = int(sum(payload.pairs_per_block[i] for i in pending))
    extra: dict[str, Any] = {}
    if payload.kind == "topk":
        shape = payload.arrays["values"].shape
        extra = {"rows": int(np.prod(shape[:-1])), "k": int(shape[-1])}
        extra["nan_rows"] = _topk_nan_rows(group["values"])
    return WriteReport(
        path=where,
        kind=payload.kind,
        shape=tuple(next(iter(payload.arrays.values())).shape),
        blocks=int(done.size),
        blocks_skipped=int(done.sum()),
        blocks_written=len(pending),
        pairs=pairs,
        dim=payload.dim,
        seconds=seconds,
        arrays=layout["arrays"],
        products=_products(
            _provenance.lookup(_result_name(result)), pairs / max(int(payload.pairs_per_block.sum()), 1)
        ),
        **extra,
    )


def _result_name(result) -> str:
    return result.name if isinstance(result, da.Array) else result[0].name


def _codec_spec(codec: str, array: str) -> str:
    from ._options import check_choice

    if check_choice("codec", codec) == "auto":
        return "none" if array == "similarity" else "blosc-lz4"
    return codec


def _compressors(spec: str, dtype: np.dtype):
    from zarr.codecs import BloscCodec, ZstdCodec

    if spec == "none":
        return None
    if spec == "zstd":
        return [ZstdCodec(level=1)]
    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize)]


def _layout(payload: _ZarrPayload, codec: str) -> dict[str, Any]:
    arrays = {
        name: {
            "shape": list(arr.shape),
            "chunks": list(_zarr_chunk_shape(arr.chunks)),
            "dtype": str(arr.dtype),
            "codec": _codec_spec(codec, name),
        }
        for name, arr in payload.arrays.items()
    }
    return {"layout": LAYOUT, "arrays": arrays, "grid": list(payload.grid)}


def _create(store, payload: _ZarrPayload, layout: dict, storage_options):
    import zarr

    info = {"params": _jsonable(payload.params), "layout": layout, "complete": False}
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    group = zarr.open_group(store, mode="w", attributes={ATTR: info}, storage_options=storage_options)
    _ensure_arrays(group, payload, layout)
    return group


def _ensure_arrays(group, payload: _ZarrPayload, layout: dict) -> None:
    """Create the data and marker arrays that do not exist yet (a crash may hit between them)."""
    existing = set(group.array_keys())
    for name, spec in layout["arrays"].items():
        if name in existing:
            arr = group[name]
            if list(arr.shape) != spec["shape"] or list(arr.chunks) != spec["chunks"]:
                raise ResumeMismatchError(
                    f"resume: stored array {name!r} has shape {arr.shape} and chunks {arr.chunks}, "
                    f"this run needs {tuple(spec['shape'])} and {tuple(spec['chunks'])}; pass "
                    "overwrite=True (--overwrite) to start again"
                )
            continue
        dtype = np.dtype(spec["dtype"])
        group.create_array(
            name,
            shape=tuple(spec["shape"]),
            chunks=tuple(spec["chunks"]),
            dtype=dtype,
            compressors=_compressors(spec["codec"], dtype),
            fill_value=0,
        )
    if MARKERS not in existing:
        grid = tuple(payload.grid)
        group.create_array(
            MARKERS, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0, compressors=None
        )


def _clean_partial_files(store) -> int:
    """Delete the ``*.partial`` temporaries a killed zarr 3.1 local write leaves behind."""
    root = getattr(store, "root", None)
    if root is None or not os.path.isdir(root):
        return 0
    removed = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".partial"):
                os.unlink(os.path.join(dirpath, f))
                removed += 1
    return removed


class _BlockWrite:
    """Where one block goes: target arrays, regions, marker and block index.

    A plain object (not a dataclass or container) so that dask does not traverse the zarr
    arrays inside it when building the graph.
    """

    __slots__ = ("targets", "regions", "marker", "index", "gate")

    def __init__(self, targets, regions, marker, index, gate: _WriteGate):
        self.targets, self.regions, self.marker, self.index = targets, regions, marker, index
        self.gate = gate


def _zarr_tasks(payload: _ZarrPayload, group, done: np.ndarray, gate: _WriteGate):
    from dask.delayed import delayed

    names = list(payload.arrays)
    targets = [group[name] for name in names]
    marker = group[MARKERS]
    blocks = {name: block_delayeds(arr) for name, arr in payload.arrays.items()}
    offsets = {
        name: [np.concatenate([[0], np.cumsum(c)]) for c in arr.chunks]
        for name, arr in payload.arrays.items()
    }
    token = tokenize(*(a.name for a in payload.arrays.values()), _describe(group.store), group.path)
    key = f"cosine-write-{token}"
    pending = [tuple(int(i) for i in ix) for ix in np.argwhere(~done)]
    write = delayed(_write_block, pure=True)
    tasks = []
    for ix in pending:
        regions, inputs = [], []
        for name in names:
            full = ix + (0,) * (payload.arrays[name].ndim - len(ix))
            regions.append(
                tuple(slice(int(off[b]), int(off[b + 1])) for off, b in zip(offsets[name], full, strict=True))
            )
            inputs.append(blocks[name][full])
        where = _BlockWrite(targets, regions, marker, ix, gate)
        tasks.append(write(where, *inputs, dask_key_name=(key, *ix)))
    return tasks, pending


def _write_block(where: _BlockWrite, *blocks) -> int:
    """Store one output block (every array), then its marker: data first, marker after.

    Returns 1, or 0 when the call has already failed elsewhere and writes nothing more.
    """
    index = where.index
    with where.gate.entered() as wanted:
        if not wanted:
            return 0
        for target, region, block in zip(where.targets, where.regions, blocks, strict=True):
            try:
                target[region] = to_numpy(block)
            except OSError as err:  # disk full, read-only location...: say which output and block
                raise OSError(
                    err.errno,
                    f"to_zarr: cannot write block {tuple(index)} of {str(target.store_path)!r}: "
                    f"{err.strerror or err}; that block is not marked done, so resume=True (--resume) "
                    "writes it once the problem is fixed",
                ) from err
        where.marker[tuple(slice(i, i + 1) for i in index)] = np.ones((1,) * len(index), dtype=np.uint8)
    return 1


def _finish_zarr(group, payload: _ZarrPayload, where: str) -> None:
    done = group[MARKERS][...]
    if not done.all():
        missing = np.argwhere(done == 0)[:5].tolist()
        raise RuntimeError(
            f"to_zarr: {int((done == 0).sum())} blocks of {where} have no marker after the run "
            f"(first: {missing}); rerun with resume=True"
        )
    info = dict(group.attrs[ATTR])
    info["complete"] = True
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    group.attrs.update({ATTR: info})


# --------------------------------------------------------------------------- parquet


def _fs(path, storage_options):
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))


def _parquet_state(path, storage_options):
    fs, root = _fs(path, storage_options)
    if not fs.exists(root):
        return (fs, root, None), "absent"
    if not fs.isdir(root):
        return (fs, root, None), "foreign"
    attrs_path = f"{root}/{_PQ_META}/attrs.json"
    if fs.exists(attrs_path):
        with fs.open(attrs_path, "r") as f:
            info = json.load(f)
        return (fs, root, info), "complete" if info.get("complete") else "partial"
    if not fs.ls(root):
        return (fs, root, None), "empty"
    return (fs, root, None), "foreign" if _only_parquet_files(fs, root) else "other"


def _parquet_identity(pairs) -> tuple[dict[str, Any], dict[str, Any]]:
    facts = _provenance.lookup(collection_name(pairs))
    params = facts or {
        "kind": "pairs",
        "names": [collection_name(pairs)],
        "columns": list(map(str, pairs.columns)),
    }
    layout = {"layout": LAYOUT, "partitions": pairs.npartitions, "columns": list(map(str, pairs.columns))}
    return params, layout


def _pq_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def to_parquet(
    pairs,
    path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
    progress: bool = False,
) -> WriteReport:
    """Compute a :func:`~dask_cosim.pairs_above` result into a Parquet dataset directory.

    One file ``part-NNNNNN.parquet`` per partition (= output block), written under a
    temporary name and renamed, then marked done under ``_dask_cosim/done/``; the
    bookkeeping directory and temporaries start with "_" or "." so
    ``pandas.read_parquet(path)`` reads only the data. ``overwrite`` and ``resume``
    follow :func:`to_zarr`.

    Examples
    --------
    >>> import numpy as np, pandas as pd, tempfile, dask_cosim as dcs
    >>> out = tempfile.mkdtemp() + "/pairs"
    >>> pairs = dcs.pairs_above(np.eye(3), threshold=0.5)
    >>> dcs.to_parquet(pairs, out).blocks >= 1
    True
    >>> len(pd.read_parquet(out))
    3
    """
    import dask.dataframe as dd

    _check_flags(overwrite, resume)
    if not isinstance(pairs, dd.DataFrame):
        raise TypeError(
            f"pairs: expected the dask DataFrame of pairs_above, received {type(pairs).__name__}; "
            "write arrays with to_zarr"
        )
    start = time.perf_counter()
    where = _describe(path)
    facts = _provenance.lookup(collection_name(pairs))
    params, layout = _parquet_identity(pairs)
    nparts = pairs.npartitions
    (fs, root, info), status = _parquet_state(path, storage_options)
    _refuse(status, where, overwrite, resume, parquet=True)
    done_dir = f"{root}/{_PQ_META}/done"
    if status in ("complete", "partial") and resume:
        _check_same(info.get("params", {}), params, where)
        _check_same(info.get("layout", {}), layout, where)
        for leftover in fs.glob(f"{root}/.part-*"):
            fs.rm(leftover)
        done = (
            {int(os.path.basename(p)) for p in fs.ls(done_dir, detail=False)}
            if fs.exists(done_dir)
            else set()
        )
    else:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.makedirs(done_dir, exist_ok=True)
        info = {"params": _jsonable(params), "layout": layout, "complete": False}
        _write_json(fs, f"{root}/{_PQ_META}/attrs.json", info)
        done = set()
    pending = [i for i in range(nparts) if i not in done]
    parts = pairs.to_delayed(optimize_graph=False)
    token = tokenize(collection_name(pairs), where)
    from dask.delayed import delayed

    gate = _WriteGate()
    tasks = [
        delayed(_write_partition, pure=True)(
            fs, root, i, parts[i], gate, dask_key_name=(f"cosine-parquet-{token}", i)
        )
        for i in pending
    ]
    _execute(tasks, progress, gate)
    finished = _parquet_done(fs, done_dir)
    missing = sorted(set(range(nparts)) - finished)
    if missing:
        raise RuntimeError(
            f"to_parquet: partitions {missing[:5]} of {where} have no marker after the run; "
            "rerun with resume=True"
        )
    info["complete"] = True
    _write_json(fs, f"{root}/{_PQ_META}/attrs.json", info)
    total = int(np.prod(facts.get("shape", [0]))) if facts.get("shape") else 0
    share = len(pending) / max(nparts, 1)
    return WriteReport(
        path=where,
        kind=facts.get("kind", "pairs"),
        shape=tuple(facts.get("shape", ())),
        blocks=nparts,
        blocks_skipped=len(done),
        blocks_written=len(pending),
        pairs=int(round(total * share)),
        dim=_dim(facts),
        seconds=time.perf_counter() - start,
        products=_products(facts, share),
        found=_parquet_rows(fs, root, nparts),
        threshold=facts.get("threshold"),
    )


def _parquet_done(fs, done_dir: str) -> set[int]:
    if not fs.exists(done_dir):
        return set()
    return {int(os.path.basename(p)) for p in fs.ls(done_dir, detail=False)}


def _only_parquet_files(fs, root) -> bool:
    for p in fs.find(root):
        name = os.path.basename(p)
        if not (name.endswith(".parquet") or name.startswith((".", "_"))):
            return False
    return True


def _write_json(fs, path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    fs.mv(tmp, path)


def _write_partition(fs, root: str, i: int, part, gate: _WriteGate) -> int:
    """Write partition ``i`` under a temporary name, rename it, then mark it done.

    Returns its row count, or 0 when the call has already failed elsewhere and writes nothing more.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with gate.entered() as wanted:
        if not wanted:
            return 0
        table = pa.Table.from_pandas(part, preserve_index=False)
        tmp = f"{root}/.part-{i:06d}.{os.getpid()}.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, f"{root}/{_pq_name(i)}")
        fs.pipe_file(f"{root}/{_PQ_META}/done/{i:06d}", b"")
    return len(part)
