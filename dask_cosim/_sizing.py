"""The one sizing policy: every automatic block-size decision, from one description of the job.

:func:`plan_job` takes a :class:`Job` (shapes, dtypes, operation, k, where the products
run, the threads that will run them, the inputs' storage chunks) and :class:`Settings`
(the dask config values and the workers' memory budget) and returns one
:class:`~dask_cosim._plan.Plan`: the block sizes, the per-task memory estimate, the task
count by stage and the reasons for the choice. Like :mod:`dask_cosim._plan` it is pure
integer arithmetic: no graphs, no data, no cluster (the caller asks the cluster once).

The rules, in the order they apply to ``chunks="auto"`` axes:

1. **What one task should carry.** ``cosine_similarity`` keeps each block of S (it is
   stored or returned), so its blocks aim at ``array.chunk-size`` bytes. ``topk`` and
   ``pairs_above`` never hold a block of S (the kernels tile it), so their blocks aim at
   ``cosine.task-flops`` multiply-adds x 2: each task carries about a second or more of
   work whatever the job size, and the scheduler's per-task cost stays a small share.
   On a GPU known when the graph is built, blocks kept there (``like="cupy"``) or reduced
   there aim at ``cosine.gpu-block-bytes`` instead, and a reduction takes whole rows of S
   when :data:`MIN_GPU_ROWS` of them fit.
2. **Every core busy.** A job too small to give each thread :data:`TASKS_PER_CORE`
   (:data:`REDUCTION_TASKS_PER_CORE` for reductions) such blocks is split further (never
   below 256 x 256); the threads are those of the active cluster, else this machine's.
3. **Graphs that stay small.** A job whose blocks would number more than
   ``cosine.max-blocks`` product tasks gets larger blocks instead, so that the task count
   is bounded whatever N (10^7 vectors stay near ``max-blocks`` tasks per stage).
4. **Self-similarity** keeps square blocks and, for reductions on the host, at least
   :data:`MIN_TRIANGLE_BLOCKS` of them per axis while tasks keep :data:`MIN_TASK_FLOPS`,
   so that the block triangle saves close to half (GPU-sized blocks stay GPU-sized).
5. **Aligned with the inputs.** Block rows snap to a multiple or a divisor of the input's
   storage chunk (zarr/dask), whichever is nearest, so each input chunk is read whole.
6. **Memory.** Every plan is checked against ``cosine.max-task-memory`` (tightened by the
   workers' ``memory_limit`` under a client); "auto" plans always fit, explicit ones are
   refused with chunks that would.
7. **Stored output.** A writer needs regular blocks (zarr chunks = blocks):
   :func:`regular_sizes` turns an irregular explicit plan into regular sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dask.utils import format_bytes

from ._plan import Plan, PlanError, plan_blocks

__all__ = [
    "Job",
    "Settings",
    "plan_job",
    "regular_sizes",
    "TASKS_PER_CORE",
    "REDUCTION_TASKS_PER_CORE",
    "MIN_GPU_ROWS",
    "MIN_TRIANGLE_BLOCKS",
    "SPLIT_EVERY",
]

#: ``cosine_similarity``: at least this many output blocks per thread when the output is
#: small enough that blocks of ``array.chunk-size`` would leave threads idle (the last
#: normalisations overlap the first products, no thread idles at the end).
TASKS_PER_CORE = 4
#: ``topk`` / ``pairs_above``: tasks per thread for small jobs (their tasks vary more in
#: cost: pruned blocks finish early, the pivot blocks later).
REDUCTION_TASKS_PER_CORE = 8
#: Fewest rows a whole-row block of a reduction on a GPU may have.
MIN_GPU_ROWS = 1024
#: Self-similarity reductions: blocks per axis, as long as each task keeps
#: :data:`MIN_TASK_FLOPS`. The off-diagonal blocks of the triangle are one product each and
#: a diagonal block computes the upper triangle of its own tiles, so the triangle runs about
#: half the products whatever the count; fewer blocks mean fewer parts per row to select,
#: score and merge, while every thread still has a block to run after the diagonal ones
#: (``benchmarks/bench_topk.py --part self``; the README's performance section).
MIN_TRIANGLE_BLOCKS = 4
#: Floating-point operations below which a task is mostly per-task overhead.
MIN_TASK_FLOPS = 1e9
#: Parts merged by one ``cosine-merge`` task (dask's tree reduction).
SPLIT_EVERY = 8

_OPS = ("similarity", "topk", "pairs")


@dataclass(frozen=True)
class Settings:
    """The configuration a plan is made under (dask config values and the workers' budget)."""

    chunk_bytes: int = 128 * 2**20  # array.chunk-size
    gpu_block_bytes: int = 2**30  # cosine.gpu-block-bytes
    budget_bytes: int = 4 * 2**30  # cosine.max-task-memory, tightened by the workers' memory
    task_flops: float = 1e11  # cosine.task-flops
    max_blocks: int = 8192  # cosine.max-blocks
    budget_source: str | None = None  # who set the budget when the workers did (for errors)


@dataclass(frozen=True)
class Job:
    """One description of a job: everything the sizing policy looks at.

    ``cores``: threads that will run the tasks (the active cluster's, else this
    machine's). ``on_gpu``: the products are known to run on a GPU when the graph is
    built (``device="gpu"`` or CuPy inputs); ``keep_on_gpu``: S stays there (``like="cupy"``).
    ``grains``: the inputs' storage chunk along N and M (``None``: none).
    ``nnz_per_row``: sparse inputs' mean stored values per row (``None``: dense); memory
    and work are then estimated from the non-zeros, never from ``N x D``.
    """

    op: str
    batch: int
    n: int
    m: int
    dim: int
    in_itemsize: int = 4
    compute_itemsize: int = 4
    out_itemsize: int = 4
    self_similar: bool = False
    batched: bool = True
    k: int | None = None
    on_gpu: bool = False
    keep_on_gpu: bool = False
    grains: tuple[int | None, int | None] = (None, None)
    cores: int = 1
    nnz_per_row: float | None = None

    @property
    def work_dim(self) -> int:
        """Entries per input row a task stores and multiplies: ``dim``, or for sparse
        inputs (``nnz_per_row`` given: mean stored values per row) at most that."""
        if self.nnz_per_row is None:
            return max(1, self.dim)
        return max(1, min(self.dim, math.ceil(self.nnz_per_row)))

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"op: expected one of {', '.join(map(repr, _OPS))}, received {self.op!r}")

    @property
    def reduced(self) -> bool:
        return self.op in ("topk", "pairs")


def plan_job(job: Job, settings: Settings, chunks=("auto", "auto", "auto")) -> Plan:
    """Block sizes for ``job`` under ``settings``; ``chunks``: the ``(batch, n, m)`` spec.

    Examples
    --------
    >>> job = Job("topk", 1, 1_000_000, 1_000_000, 128, self_similar=True, batched=False,
    ...           k=10, grains=(100_000, 100_000), cores=2)
    >>> plan = plan_job(job, Settings())
    >>> plan.rows[:2], len(plan.rows)
    ((20000, 20000), 50)
    """
    gpu_sized = job.keep_on_gpu or (job.reduced and job.on_gpu)
    item = max(job.compute_itemsize, job.out_itemsize)
    budget = settings.budget_bytes
    why: list[str] = []
    if gpu_sized:
        target, spread = settings.gpu_block_bytes, 1
        why.append(f"blocks of S on the GPU aim at cosine.gpu-block-bytes={format_bytes(int(target))}")
    elif job.reduced:
        flops_per_entry = 2 * job.work_dim
        target = int(settings.task_flops // flops_per_entry) * item
        spread = job.cores
        why.append(f"reduction tasks aim at cosine.task-flops={settings.task_flops:.3g} each")
    else:
        target, spread = settings.chunk_bytes, job.cores
        why.append(f"stored blocks of S aim at array.chunk-size={format_bytes(int(target))}")
    per_core = REDUCTION_TASKS_PER_CORE if job.reduced else TASKS_PER_CORE
    kwargs = dict(
        target_bytes=target if (job.reduced and not gpu_sized) else min(target, budget // 4),
        budget_bytes=budget,
        in_itemsize=job.in_itemsize,
        compute_itemsize=job.compute_itemsize,
        out_itemsize=job.out_itemsize,
        min_blocks=per_core * spread if spread > 1 else 1,
        parallel=spread,
        square=job.self_similar,
        grains=job.grains,
        batched=job.batched,
        reduce=job.reduced and not job.on_gpu,
        max_blocks=settings.max_blocks,
        min_square_blocks=MIN_TRIANGLE_BLOCKS if job.reduced and not gpu_sized else 1,
        min_square_rows=max(256, math.isqrt(int(MIN_TASK_FLOPS // (2 * job.work_dim)))),
        nnz_per_row=job.nnz_per_row,
    )
    try:
        plan = None
        whole_rows = isinstance(chunks[2], str) and chunks[2] == "auto"
        if job.reduced and job.on_gpu and not job.self_similar and whole_rows and job.m:
            plan = _whole_rows_plan(job, kwargs, chunks)
            if plan is not None:
                why.append(f"whole rows of S per block (>= {MIN_GPU_ROWS} rows fit)")
        plan = plan or plan_blocks(job.batch, job.n, job.m, job.dim, chunks=chunks, **kwargs)
    except PlanError as err:
        if settings.budget_source is None:
            raise
        source = settings.budget_source
        raise PlanError(f"{err}. The binding budget is the workers' memory: {source}") from None
    if spread > 1:
        why.append(f"planned for {job.cores} thread(s)")
    return replace(plan, op=job.op, budget_bytes=budget, notes=(*plan.notes, *why), job=job)


def _whole_rows_plan(job: Job, kwargs: dict, chunks) -> Plan | None:
    """A plan whose blocks span whole rows of S (one block along M) for a reduction on a
    GPU, or ``None`` when blocks of ``min(n, MIN_GPU_ROWS)`` whole rows would not fit the
    target size and the memory budget. A row block spanning every column needs no pivot,
    no pruned blocks and no merge of parts (measured in the README's GPU section)."""
    try:
        plan = plan_blocks(job.batch, job.n, job.m, job.dim, chunks=(*chunks[:2], job.m), **kwargs)
    except PlanError:
        return None
    return plan if max(plan.rows) >= min(job.n, MIN_GPU_ROWS) else None


def regular_sizes(plan: Plan, batched: bool) -> tuple[int, ...] | None:
    """Integer block sizes that make a plan's blocks regular (zarr chunks = blocks), or
    ``None`` when they already are.

    >>> regular_sizes(Plan((1,), (4, 4, 2), (3, 2), 0), batched=False) is None
    True
    >>> regular_sizes(Plan((1,), (3, 4), (5,), 0), batched=False)
    (4, 5)
    """
    axes = plan.chunks if batched else plan.chunks[1:]
    if regular_chunks(axes):
        return None
    return tuple(max(max(c), 1) for c in axes)


def regular_chunks(chunks) -> bool:
    """True when every axis has equal blocks except possibly a smaller last one.

    Only then can zarr chunks (a regular grid) equal the dask blocks.

    >>> regular_chunks(((4, 4, 2), (3,)))
    True
    >>> regular_chunks(((4, 3, 3),))
    False
    """
    for axis in chunks:
        axis = tuple(axis)
        if len(axis) > 1 and (len(set(axis[:-1])) != 1 or axis[-1] > axis[0]):
            return False
    return True
