"""``dcs.plan``: what a job will do, before anything runs.

The plan is the sizing policy's (:mod:`dask_cosim._sizing`) for that job, on the active
cluster if there is one; the task counts are those of the graph the operation builds
(counted by stage, nothing computed), plus the write tasks a writer adds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from dask.utils import format_bytes

from ._plan import Plan

__all__ = ["plan", "JobPlan"]

Op = Literal["similarity", "topk", "pairs"]

#: Stages of the lazy graph a writer does not run (to_zarr merges top-k parts in checkpointed links).
_REPLACED_BY_WRITER = {
    "topk": ("cosine-pick", "cosine-merge-partial", "cosine-merge-aggregate")
    + ("cosine-values", "cosine-indices"),
}
#: Scheduler and worker cost of one task, assumed for the overhead share (distributed's
#: documentation puts a task's overhead near a millisecond).
TASK_OVERHEAD_S = 1e-3
#: One thread's matrix-product speed assumed for the time estimates (an AVX2 core; float64: half).
FLOPS_PER_THREAD = 5e10


@dataclass(frozen=True)
class JobPlan:
    """The plan of one job: blocks, tasks by stage, memory and work per task.

    ``repr`` gives a few readable lines; the fields hold the numbers.
    """

    op: str
    shape: tuple[int, ...]
    dim: int
    dtype: str
    self_similar: bool
    plan: Plan
    tasks: dict[str, int] = field(default_factory=dict)  # graph tasks by stage (name prefix)
    write_tasks: int = 0  # tasks a writer (to_zarr / to_parquet) adds
    threads: int = 1

    @property
    def total_tasks(self) -> int:
        """Tasks of the job as a writer runs it: the graph's, less the stages the writer
        replaces (a top-k's tree merge and part selection), plus its write tasks."""
        replaced = _REPLACED_BY_WRITER.get(self.op, ())
        return sum(n for name, n in self.tasks.items() if name not in replaced) + self.write_tasks

    @property
    def graph_tasks(self) -> int:
        """Tasks of the lazy result's graph (what ``compute`` runs)."""
        return sum(self.tasks.values())

    @property
    def computed_blocks(self) -> int:
        """Blocks of S that run a product (the upper triangle for self-similarity)."""
        nb = len(self.plan.rows) * len(self.plan.cols)
        if self.self_similar and self.plan.rows == self.plan.cols and len(self.plan.rows) > 1:
            nb = len(self.plan.rows) * (len(self.plan.rows) + 1) // 2
        return nb * len(self.plan.batch)

    @property
    def work_dim(self) -> int:
        """``D``, or for sparse inputs the non-zeros per row the plan assumed (products
        of sparse rows are counted as dense products of that length: an estimate)."""
        job = getattr(self.plan, "job", None)
        return job.work_dim if job is not None else self.dim

    @property
    def flops_per_task(self) -> float:
        return 2.0 * self.work_dim * max(self.plan.batch) * max(self.plan.rows) * max(self.plan.cols)

    @property
    def total_flops(self) -> float:
        full = 2.0 * self.work_dim * sum(self.plan.batch) * sum(self.plan.rows) * sum(self.plan.cols)
        blocks = len(self.plan.batch) * len(self.plan.rows) * len(self.plan.cols)
        return full * self.computed_blocks / max(blocks, 1)

    @property
    def scheduler_share(self) -> float:
        """Expected scheduling cost over compute time (:data:`TASK_OVERHEAD_S` per task,
        :data:`FLOPS_PER_THREAD` per thread)."""
        rate = FLOPS_PER_THREAD / (2 if self.dtype == "float64" else 1)
        compute_s = self.total_flops / (rate * max(self.threads, 1))
        return self.total_tasks * TASK_OVERHEAD_S / max(compute_s, 1e-9)

    @property
    def _sparse(self) -> bool:
        return getattr(getattr(self.plan, "job", None), "nnz_per_row", None) is not None

    def __repr__(self) -> str:
        p = self.plan

        def axis(name: str, blocks: tuple[int, ...]) -> str:
            return f"{name} {len(blocks)} x {max(blocks) if blocks else 0}"

        rate = FLOPS_PER_THREAD / (2 if self.dtype == "float64" else 1)
        stages = ", ".join(f"{n} {name}" for name, n in sorted(self.tasks.items(), key=lambda t: -t[1]))
        what = {"similarity": "cosine_similarity", "topk": "topk", "pairs": "pairs_above"}[self.op]
        budget = format_bytes(p.budget_bytes) if p.budget_bytes else "?"
        lines = [
            f"dask_cosim plan: {what}, output {self.shape} {self.dtype}, D={self.dim}"
            + (f" (sparse: ~{self.plan.job.nnz_per_row:.3g} non-zeros per row)" if self._sparse else "")
            + (" (self-similarity: upper block triangle)" if self.self_similar else ""),
            f"  blocks: {axis('batch', p.batch)}, {axis('N', p.rows)}, {axis('M', p.cols)}"
            f" -> {self.computed_blocks} product tasks",
            f"  graph: {self.graph_tasks} tasks = {stages}",
            f"  written (to_zarr / to_parquet / dask-cosim run): {self.total_tasks} tasks, "
            f"{self.write_tasks} of them writes",
            f"  per task: ~{format_bytes(p.task_bytes)} memory (budget {budget}), "
            f"{self.flops_per_task:.2g} FLOP (~{self.flops_per_task / rate:.2g} s on one thread)",
            f"  scheduler: ~{100 * self.scheduler_share:.2g}% of the compute time on {self.threads} "
            f"thread(s) (assuming {TASK_OVERHEAD_S * 1e3:g} ms per task, {rate / 1e9:g} GFLOP/s per thread)",
        ]
        if p.notes:
            lines.append("  why: " + "; ".join(p.notes))
        return "\n".join(lines)


def plan(
    a,
    b=None,
    *,
    op: Op = "similarity",
    k: int = 10,
    threshold: float = 0.9,
    exclude_self: bool = False,
    **options,
) -> JobPlan:
    """The plan of a job, before anything runs: blocks, tasks by stage, memory, work.

    Parameters
    ----------
    a, b
        As :func:`dask_cosim.cosine_similarity`.
    op : {"similarity", "topk", "pairs"}
        The operation: :func:`~dask_cosim.cosine_similarity`, :func:`~dask_cosim.topk`
        (``k``, ``exclude_self``) or :func:`~dask_cosim.pairs_above` (``threshold``,
        ``exclude_self``).
    **options
        The operation's other options (``chunks``, ``device``, ``dtype``, ...).

    Returns
    -------
    JobPlan
        Its ``repr`` says in a few lines what the job will do; ``write_tasks`` counts the
        tasks a writer adds (one per block, per top-k merge step, or per partition).

    Examples
    --------
    >>> import dask.array as da, dask_cosim as dcs
    >>> a = da.zeros((1_000_000, 128), dtype="float32", chunks=(100_000, 128))
    >>> p = dcs.plan(a, op="topk", k=10, exclude_self=True)
    >>> p.total_tasks < 5000, p.plan.rows[0]
    (True, 20000)
    """
    from .core import cosine_similarity
    from .reductions import pairs_above, topk

    if op == "similarity":
        result = cosine_similarity(a, b, **options)
    elif op == "topk":
        result = topk(a, b, k, exclude_self=exclude_self, **options)
    elif op == "pairs":
        result = pairs_above(a, b, threshold, exclude_self=exclude_self, **options)
    else:
        raise ValueError(f"op: expected 'similarity', 'topk' or 'pairs', received {op!r}")
    return plan_of(result)


def plan_of(result) -> JobPlan:
    """The :class:`JobPlan` of a lazy result of ``cosine_similarity``, ``topk`` (the pair)
    or ``pairs_above`` built in this process."""
    from . import _provenance
    from ._compat import collection_name
    from ._topk_store import links_of
    from .core import current_settings

    arrays = list(result) if isinstance(result, tuple) else [result]
    name = collection_name(arrays[0])
    p, facts = _provenance.plan_of(name), _provenance.lookup(name)
    if p is None:
        raise ValueError("result: expected a result of cosine_similarity, topk or pairs_above built here")
    op = facts["kind"]
    tasks = count_tasks(arrays)
    triangle = bool(facts.get("self_similar")) and p.rows == p.cols and len(p.rows) > 1
    if op == "topk":
        chains = len(links_of(len(p.cols))) * len(p.rows)
        writes = chains * len(p.batch)
    elif op == "pairs":
        writes = sum(v for k_, v in tasks.items() if k_ == "cosine-pairs")
    else:
        writes = len(p.batch) * len(p.rows) * len(p.cols)
    _, threads = current_settings()
    job = p.job
    return JobPlan(
        op=op,
        shape=tuple(facts.get("shape", ())),
        dim=job.dim if job is not None else 0,
        dtype=str(facts.get("dtype")),
        self_similar=triangle,
        plan=p,
        tasks=tasks,
        write_tasks=writes,
        threads=threads or (job.cores if job is not None else 1),
    )


def count_tasks(collections) -> dict[str, int]:
    """Tasks by stage (key prefix) of the graph of ``collections``, without computing."""
    from dask.utils import key_split

    keys: set = set()
    for collection in collections:
        keys.update(collection.__dask_graph__().keys())
    return dict(Counter(key_split(key) for key in keys))
