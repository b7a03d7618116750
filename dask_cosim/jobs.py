"""The job API behind ``dask-cosim run``, ``dedup`` and ``demo``: describe a job, build it, write it.

A :class:`JobSpec` says what to compute (similarity, top-k, pairs above a threshold or
duplicate groups), from which inputs, into which output and on which cluster.
:func:`build_job` builds the lazy result with blocks planned for that cluster's workers
and checks the output location (:func:`prepare_job` does it for this process's own
budget); :func:`execute_job` writes a built job on the current dask scheduler;
:func:`run_job` does all of it, starting or connecting the cluster in between. Every
problem with the options, inputs or output found before anything runs is a
:class:`BadInput`, which the command reports as a usage error.

Examples
--------
>>> import os, tempfile, numpy as np
>>> from dask_cosim.jobs import JobSpec, execute_job, prepare_job
>>> root = tempfile.mkdtemp()
>>> np.save(os.path.join(root, "a.npy"), np.eye(4, 3))
>>> spec = JobSpec(os.path.join(root, "a.npy"), None, os.path.join(root, "s.zarr"), chunks=(2, 2))
>>> job = prepare_job(spec)  # the lazy result; the output location is checked
>>> execute_job(job, progress=False).blocks_written
4
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BadInput",
    "JobSpec",
    "Job",
    "prepare_job",
    "build_job",
    "execute_job",
    "run_job",
    "count_groups",
]


class BadInput(Exception):
    """A problem with a job's options, inputs or output, found before anything runs (the
    command exits 2 with one line, no traceback)."""


@dataclass
class JobSpec:
    """One ``dask-cosim run``: inputs, what to compute, where to write, where to run."""

    a: str
    b: str | None
    output: str
    topk: int | None = None
    threshold: float | None = None
    exclude_self: bool = False
    chunks: Any = "auto"
    dtype: str | None = None
    device: str = "auto"
    zero_vector: str | None = None
    check_finite: bool = False
    codec: str = "auto"
    resume: bool = False
    overwrite: bool = False
    scheduler: str | None = None
    timeout: float = 10.0
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = "auto"
    processes: bool = True
    quiet: bool = False
    storage_options: dict = field(default_factory=dict)
    plan_only: bool = False  # --plan: print the plan, compute nothing
    dedup: bool = False  # ``dask-cosim dedup``: duplicate_groups at ``threshold``
    labels: str | None = None  # .npy file of integer labels (label mask)
    label_pairs: str = "different"
    log_file: str | None = None  # the cluster's log records go here; None: on stderr (--verbose)

    @property
    def kind(self) -> str:
        if self.dedup:
            return "groups"
        if self.topk is not None:
            return "topk"
        return "pairs" if self.threshold is not None else "similarity"


@dataclass
class Job:
    spec: JobSpec
    result: Any  # dask array, (vals, idx) or dask DataFrame
    workers: Any = None  # the worker budget "auto" blocks were planned for


def _location(path: str | None) -> str | None:
    """Local paths become absolute (workers and resumed runs see the same path); URLs stay."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


JOB_WORDS = {"similarity": "similarity", "topk": "--topk", "pairs": "--threshold", "groups": "dedup"}


def _given_options(spec: JobSpec) -> dict[str, Any]:
    """The optional settings the user gave, each refused where the job's function (or its
    writer) does not take it, as the option table says."""
    from ._options import JOB_OPTIONS, WRITER_OPTIONS

    given = {
        "dtype": spec.dtype,
        "zero_vector": spec.zero_vector,
        "check_finite": spec.check_finite or None,
        "exclude_self": spec.exclude_self or None,
        "codec": None if spec.codec == "auto" else spec.codec,
    }
    given = {opt: value for opt, value in given.items() if value is not None}
    if spec.b is not None and spec.kind == "groups":
        raise BadInput("dedup jobs take one input (self-similarity), received B")
    for opt in given:
        if opt not in JOB_OPTIONS[spec.kind] | WRITER_OPTIONS[spec.kind]:
            takers = [JOB_WORDS[k] for k in JOB_WORDS if opt in JOB_OPTIONS[k] | WRITER_OPTIONS[k]]
            raise BadInput(
                f"--{opt.replace('_', '-')} does not apply to {JOB_WORDS[spec.kind]} jobs "
                f"(only to {' and '.join(takers)} jobs)"
            )
    given.pop("codec", None)  # the writer's (execute_job)
    return given


def _build(spec: JobSpec, chunks) -> Any:
    import dask_cosim as dcs

    a, b = _location(spec.a), _location(spec.b)
    options = {"chunks": chunks, "device": spec.device, **_given_options(spec)}
    if spec.kind == "groups":
        return _build_groups(spec, a, options)
    if spec.kind == "topk":
        return dcs.topk(a, b, spec.topk, **options)
    if spec.kind == "pairs":
        return dcs.pairs_above(a, b, spec.threshold, **options)
    return dcs.cosine_similarity(a, b, **options)


def _build_groups(spec: JobSpec, a, common: dict):
    """``dask-cosim dedup``: :func:`~dask_cosim.duplicate_groups` of A with the labels file."""
    import numpy as np

    labels = None
    if spec.labels is not None:
        try:
            labels = np.load(_location(spec.labels), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise BadInput(f"--labels: cannot read {spec.labels!r} as a .npy array ({err})") from err
    from ._out_state import PQ_META, filesystem
    from .dedup import _duplicate_groups

    # each block's forest is kept under OUT/_dask_cosim/forests: --resume computes only the
    # blocks whose forest is missing (to_parquet clears OUT first on a fresh run)
    fs, root = filesystem(_location(spec.output), spec.storage_options or None)
    return _duplicate_groups(
        a, spec.threshold, labels=labels, label_pairs=spec.label_pairs,
        checkpoint=(fs, f"{root}/{PQ_META}/forests"), **common,
    )  # fmt: skip


def _regular_sizes(result, spec: JobSpec):
    """Integer block sizes that make the output blocks regular (zarr chunks = dask blocks),
    as the sizing policy decides (:func:`dask_cosim._sizing.regular_sizes`)."""
    from . import _provenance
    from ._sizing import regular_sizes

    if spec.kind in ("pairs", "groups"):
        return None
    arr = result[0] if isinstance(result, tuple) else result
    return regular_sizes(_provenance.plan_of(arr.name), batched=arr.ndim == 3)


def prepare_job(spec: JobSpec) -> Job:
    """Build the lazy result and check the output location; every problem here is :class:`BadInput`."""
    from .io import OutputExistsError, ResumeMismatchError, check_output

    if spec.resume and spec.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    try:
        result = _build(spec, spec.chunks)
        regular = _regular_sizes(result, spec)
        if regular is not None:
            result = _build(spec, regular)
        if spec.plan_only:
            return Job(spec, result)
        check_output(
            result,
            _location(spec.output),
            overwrite=spec.overwrite,
            resume=spec.resume,
            codec=spec.codec,
            storage_options=spec.storage_options or None,
        )
    except (OutputExistsError, ResumeMismatchError, FileNotFoundError, ValueError, TypeError) as err:
        raise BadInput(str(err)) from err
    return Job(spec, result)


def execute_job(job: Job, *, progress: bool) -> Any:
    """Compute and write a prepared job on the current dask scheduler; returns the WriteReport."""
    from .io import to_parquet, to_zarr

    spec = job.spec
    kwargs = {
        "overwrite": spec.overwrite,
        "resume": spec.resume,
        "storage_options": spec.storage_options or None,
        "progress": progress,
    }
    if spec.kind in ("pairs", "groups"):
        return to_parquet(job.result, _location(spec.output), **kwargs)
    return to_zarr(job.result, _location(spec.output), codec=spec.codec, **kwargs)


def build_job(spec: JobSpec) -> Job:
    """:func:`prepare_job` for the cluster the run will use: "auto" blocks that fit its
    workers' memory, BLAS threads that fit the embedded cluster's layout."""
    from ._worker_memory import assume_workers
    from .cluster import SchedulerUnreachable, embedded_blas_threads

    try:
        workers, threads = _planned_workers(spec)
        with (
            assume_workers(workers, threads),
            embedded_blas_threads(spec.scheduler, spec.workers, spec.threads_per_worker),
        ):
            job = prepare_job(spec)
    except SchedulerUnreachable as err:
        raise BadInput(str(err)) from err
    job.workers = workers
    return job


def run_job(spec: JobSpec, echo: Callable[[str], None] = print) -> Any:
    """What ``dask-cosim run`` does: check everything, start/connect the cluster, write.

    Returns the :class:`~dask_cosim.io.WriteReport`; the CLI prints its ``summary()``.
    """
    from distributed import KilledWorker

    from ._worker_memory import killed_worker_message
    from .cluster import SchedulerUnreachable, dask_client

    job = build_job(spec)
    if spec.plan_only:
        return job
    cluster = dask_client(
        spec.scheduler,
        workers=spec.workers,
        threads_per_worker=spec.threads_per_worker,
        memory_limit=spec.memory_limit,
        processes=spec.processes,
        timeout=spec.timeout,
        echo=None if spec.quiet else echo,
        quiet=spec.quiet,
        log_file=spec.log_file,
    )
    try:
        with cluster as client:
            try:
                return execute_job(job, progress=not spec.quiet)
            except KilledWorker as err:  # name the memory limit, the usual reason
                raise RuntimeError(killed_worker_message(err, job.workers, client)) from err
    except SchedulerUnreachable as err:
        raise BadInput(str(err)) from err


def _planned_workers(spec: JobSpec):
    """The tightest worker this run will use (memory limit, threads) and the threads of
    all workers, to plan blocks for them (the scheduler is asked once)."""
    from ._worker_memory import budget_for, cluster_layout
    from .cluster import dask_client, machine_layout

    if spec.scheduler:
        with dask_client(spec.scheduler, timeout=spec.timeout, echo=None, log_file=spec.log_file) as client:
            return cluster_layout(client)
    n, t = machine_layout(spec.workers, spec.threads_per_worker)
    if spec.memory_limit is None:
        return None, n * t
    from ._compat import parse_memory_limit

    limit = parse_memory_limit(spec.memory_limit, t, total_cores=n * t)
    return budget_for(limit, t, "each embedded worker"), n * t


def count_groups(path, storage_options: dict | None = None) -> tuple[int, int]:
    """Groups of size > 1 and the rows they hold, in a written ``duplicate_groups`` dataset.

    Reads the ``i``, ``group`` and ``size`` columns one file at a time.
    """
    import pyarrow.parquet as pq

    from ._out_state import filesystem

    fs, root = filesystem(_location(path), storage_options)
    groups = rows = 0
    for name in sorted(fs.glob(f"{root}/part-*.parquet")):
        with fs.open(name, "rb") as f:
            t = pq.read_table(f, columns=["i", "group", "size"]).to_pandas()
        big = t["size"].to_numpy() > 1
        rows += int(big.sum())
        groups += int((big & (t["i"].to_numpy() == t["group"].to_numpy())).sum())
    return groups, rows
