"""Pure planning: validate shapes and dtypes, choose block sizes, estimate task memory.

Nothing here builds graphs or touches data: every function is integer arithmetic on
shapes, itemsizes and byte budgets (dask's own chunk normalisation included), so it
can be tested exhaustively (hypothesis) and runs before any graph exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from dask.utils import format_bytes

from ._compat import normalize_chunks
from ._options import check_axis_chunk, check_dtype

Chunks = tuple[tuple[int, ...], ...]

#: dtype kinds that have no meaningful cosine similarity.
_REJECTED_KINDS = {
    "c": "complex",
    "O": "object",
    "U": "string",
    "S": "bytes",
    "M": "datetime",
    "m": "timedelta",
    "V": "structured/void",
}


class PlanError(ValueError):
    """A block plan that would exceed the per-task memory budget."""


@dataclass(frozen=True)
class Operand:
    """Shape facts of one input, normalised to 3-D ``(batch, rows, dim)``."""

    name: str
    ndim: int
    batch: int
    rows: int
    dim: int
    dtype: np.dtype

    @classmethod
    def from_shape(cls, name: str, shape: Sequence[int], dtype) -> Operand:
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(
                f"{name}: expected a 2-D (N, D) or 3-D (batch, N, D) array, "
                f"received shape {shape} (ndim={len(shape)})"
            )
        dtype = check_input_dtype(name, dtype)
        batch = shape[0] if len(shape) == 3 else 1
        return cls(name, len(shape), batch, shape[-2], shape[-1], dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.ndim == 3:
            return (self.batch, self.rows, self.dim)
        return (self.rows, self.dim)


def _is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.name == "bfloat16"


def check_input_dtype(name: str, dtype) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype, or raise ``TypeError`` if it is not real-valued."""
    try:
        dtype = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name}: unsupported dtype {dtype!r}; expected a real numeric dtype") from err
    if _is_bfloat16(dtype):
        return dtype
    if dtype.kind in _REJECTED_KINDS:
        raise TypeError(
            f"{name}: {_REJECTED_KINDS[dtype.kind]} dtype {dtype} is not supported; "
            "expected real numbers (float, int or bool)"
        )
    return dtype


def _is_narrow_float(dtype: np.dtype) -> bool:
    return _is_bfloat16(dtype) or (dtype.kind == "f" and dtype.itemsize <= 4)


def result_dtype(a: np.dtype, b: np.dtype) -> np.dtype:
    """The similarity dtype, following scikit-learn.

    float32 when both inputs are float32 or narrower floats (float16, bfloat16),
    float64 otherwise (integers and bools convert to float64).

    >>> result_dtype(np.dtype("float16"), np.dtype("float32"))
    dtype('float32')
    >>> result_dtype(np.dtype("float32"), np.dtype("int8"))
    dtype('float64')
    """
    if _is_narrow_float(a) and _is_narrow_float(b):
        return np.dtype("float32")
    return np.dtype("float64")


def output_dtype(requested, default: np.dtype) -> np.dtype:
    """The user's ``dtype=`` (checked: :func:`~dask_cosim._options.check_dtype`), or ``default``."""
    dtype = check_dtype(requested)
    return default if dtype is None else dtype


def compute_dtype(default: np.dtype, out: np.dtype) -> np.dtype:
    """Products run in ``default`` unless the user asked for a wider output."""
    return np.dtype("float64") if out.itemsize > default.itemsize else default


def check_pair(a: Operand, b: Operand) -> int:
    """Check that ``a`` and ``b`` can be paired; return the output batch size."""
    if a.dim != b.dim:
        raise ValueError(
            f"a and b must have the same vector length D: a has shape {a.shape} (D={a.dim}), "
            f"b has shape {b.shape} (D={b.dim})"
        )
    if a.dim == 0:
        raise ValueError(f"a: vectors of length D=0 have no direction (shape {a.shape})")
    if a.ndim == 3 and b.ndim == 3 and a.batch != b.batch and 1 not in (a.batch, b.batch):
        raise ValueError(
            f"batch sizes differ: a has batch {a.batch} (shape {a.shape}), b has batch "
            f"{b.batch} (shape {b.shape}); they must be equal or one of them 1"
        )
    if a.ndim == 3 and b.ndim == 3:
        return b.batch if a.batch == 1 else a.batch
    return a.batch if a.ndim == 3 else b.batch


# --------------------------------------------------------------------------- chunks


def normalize_axis_chunks(spec, size: int, *, axis: str) -> tuple[int, ...] | None:
    """One axis of a ``chunks=`` spec as explicit block sizes; ``None`` means "auto".

    Accepts a positive int (regular blocks), ``-1`` or ``None`` (one block),
    ``"auto"``, or an explicit tuple of block sizes that sum to ``size``.
    """
    spec = check_axis_chunk(spec, axis)
    if spec == "auto":
        return None
    if isinstance(spec, tuple) and (any(c < 0 for c in spec) or sum(spec) != size):
        raise ValueError(
            f"chunks: {axis} block sizes {spec} must be non-negative and sum to the axis length {size}"
        )
    return normalize_chunks((spec,), (size,))[0]  # dask's rules: -1/None one block, int regular blocks


def _balanced(size: int, block: int) -> tuple[int, ...]:
    """Split ``size`` into as few blocks of at most ``block`` as possible, all equal but a
    smaller last one (regular chunks, as zarr stores them), the equal ones as small as that
    count allows so the last block is as large as regular blocks permit: 16384 by 6000 gives
    (5462, 5462, 5460); 100 by 12 still ends in a 4 (no regular split into 9 does better).
    """
    if size == 0:
        return (0,)
    block = max(1, min(block, size))
    step = math.ceil(size / math.ceil(size / block))
    return (step,) * (size // step) + ((size % step,) if size % step else ())


def _makespan(blocks: Sequence[int], repeat: int, parallel: int) -> int:
    """Finish time of ``blocks`` (each ``repeat`` times, cost = size) handed in order to
    whichever of ``parallel`` workers is free first, as dask's schedulers do."""
    loads = [0] * parallel
    for size in blocks:
        for _ in range(repeat):
            loads[loads.index(min(loads))] += size
    return max(loads)


def _even_rounds(size: int, blocks: tuple[int, ...], repeat: int, parallel: int) -> tuple[int, ...]:
    """``blocks`` (an auto split of the batch axis), or a split into regular blocks down to
    half that size if it lets ``parallel`` workers finish together: 100 batches by 12 on 2
    workers end with one worker alone on the last 4 (52 vs 48); ten blocks of 10 finish at 50.
    Only for small block counts, where the last round is a noticeable share of the run.
    """
    if parallel <= 1 or len(blocks) * repeat > 16 * parallel:
        return blocks
    step = max(blocks)
    candidates = [_balanced(size, s) for s in range(step, (step + 1) // 2 - 1, -1)]
    return min(candidates, key=lambda c: (_makespan(c, repeat, parallel), len(c)))


def _snap(block: int, size: int, grain: int | None, limit: int | None = None) -> int:
    """``block`` rounded to the nearest (in ratio) multiple or divisor of an input's storage
    chunk ``grain``, so that every input chunk is read whole by one or by a few tasks;
    never above ``limit`` (the rows memory allows).

    >>> _snap(14_000, 10**6, 100_000), _snap(78_000, 10**6, 100_000), _snap(260_000, 10**6, 100_000)
    (14285, 100000, 300000)
    """
    if not grain or grain >= size or block >= size:
        return block
    limit = size if limit is None else limit
    lower = block // grain * grain if block >= grain else grain // math.ceil(grain / block)
    upper = lower + grain if block >= grain else grain // max(1, grain // block)
    fits = [c for c in (lower, upper) if 0 < c <= limit]
    best = min(fits, key=lambda c: abs(math.log(c / block)), default=0)
    return best or block


@dataclass(frozen=True)
class Plan:
    """Block sizes of the output ``(batch, N, M)`` and what one task needs in memory.

    :func:`dask_cosim._sizing.plan_job` also records the operation, the budget, the job
    it planned for and why it chose these sizes (``notes``).
    """

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    task_bytes: int
    op: str = "similarity"
    budget_bytes: int | None = None
    notes: tuple[str, ...] = ()
    job: Any = None

    @property
    def chunks(self) -> Chunks:
        return (self.batch, self.rows, self.cols)


def task_memory(
    bc: int,
    nc: int,
    mc: int,
    dim: int,
    *,
    in_itemsize: int,
    compute_itemsize: int,
    out_itemsize: int,
    reduce: bool = False,
    nnz_per_row: float | None = None,
) -> int:
    """Peak bytes one task holds: the worst of a normalise task and a product task.

    A normalise task holds its raw input block, a float64 working copy, its scale
    temporaries and the normalised result. A product task holds two normalised blocks
    (or two raw ones and the unit rows of one batch element of each, written in cache:
    :mod:`dask_cosim._scaled`), the product in the compute dtype and, if the output dtype
    differs, its cast.
    With ``reduce=True`` (top-k and pairs on the CPU) the product is never held whole:
    the kernels compute it in tiles of at most :data:`REDUCE_TILE_BYTES` (plus their
    masks and candidates), and keep a transposed copy of the column block.

    ``nnz_per_row`` (sparse inputs): a stored row is that many values, each with an int64
    index (:func:`row_bytes`), instead of ``dim`` values, and a product task also holds
    the sparse product (value and index per entry) before it is written into the dense
    block or tile.
    """
    rows = bc * max(nc, mc)
    normalize = rows * (
        row_bytes(dim, in_itemsize, nnz_per_row)
        + 2 * row_bytes(dim, 8, nnz_per_row)
        + row_bytes(dim, compute_itemsize, nnz_per_row)
    )
    unit_row = row_bytes(dim, compute_itemsize, nnz_per_row)
    sparse_entry = 0 if nnz_per_row is None else compute_itemsize + 8
    block = bc * nc * mc
    if reduce:
        tile = min(block, REDUCE_TILE_BYTES // compute_itemsize)
        product = bc * (nc + 2 * mc) * unit_row + tile * (compute_itemsize + 2 + sparse_entry)
        return max(normalize, product + bc * nc * _CANDIDATE_BYTES)
    scratch = (nc + mc) * unit_row if nnz_per_row is None else 0  # dense: one batch element's unit rows
    product = (bc * (nc + mc) * unit_row + scratch) + block * (compute_itemsize + sparse_entry)
    if out_itemsize != compute_itemsize:
        product += block * out_itemsize
    return max(normalize, product)


def row_bytes(dim: int, itemsize: int, nnz_per_row: float | None = None) -> int:
    """Bytes of one stored vector: ``dim`` values, or for a sparse row (CSR) its non-zeros
    with an int64 index each plus its row pointer.

    >>> row_bytes(2**20, 8), row_bytes(2**20, 8, nnz_per_row=100)
    (8388608, 1608)
    """
    if nnz_per_row is None:
        return dim * itemsize
    return math.ceil(min(dim, nnz_per_row) * (itemsize + 8)) + 8


#: Largest tile of S a reduction kernel computes at once on the CPU (see ``_select``).
REDUCE_TILE_BYTES = 64 * 2**20
#: Per row of a reduction block: its candidates and its part (a generous allowance).
_CANDIDATE_BYTES = 2048


def plan_blocks(
    batch: int,
    n: int,
    m: int,
    dim: int,
    *,
    chunks=("auto", "auto", "auto"),
    target_bytes: int = 128 * 2**20,
    budget_bytes: int = 4 * 2**30,
    in_itemsize: int = 8,
    compute_itemsize: int = 8,
    out_itemsize: int = 8,
    min_blocks: int = 1,
    parallel: int = 1,
    square: bool = False,
    grains: tuple[int | None, int | None] = (None, None),
    batched: bool = True,
    reduce: bool = False,
    max_blocks: int | None = None,
    min_square_blocks: int = 1,
    min_square_rows: int = 256,
    nnz_per_row: float | None = None,
) -> Plan:
    """Choose output block sizes and check them against the per-task memory budget.

    Parameters
    ----------
    batch, n, m, dim
        Output shape ``(batch, n, m)`` and vector length.
    chunks
        ``(batch, n, m)`` per-axis specs (see :func:`normalize_axis_chunks`).
    target_bytes
        Desired size of one output block ("auto" axes aim for it).
    budget_bytes
        Largest per-task memory estimate that is accepted.
    min_blocks
        Split "auto" axes further until there are at least this many blocks (keeps
        every core busy), as long as blocks stay reasonably large.
    parallel
        How many tasks run at once; an "auto" batch axis split into few blocks takes a
        few more if that lets all of them finish together (see :func:`_even_rounds`).
    square
        Rows and columns must use the same blocks (self-similarity).
    grains
        Storage chunk sizes of the inputs along N and M; "auto" rounds to the nearest
        multiple or divisor (see :func:`_snap`).
    batched
        Whether the output has a batch axis: a refusal suggests ``(batch, n, m)`` chunks,
        else ``(n, m)``, as ``cosine_similarity(chunks=)`` takes them.
    reduce
        The tasks reduce their block without holding it (top-k, pairs on the CPU): the
        memory estimate counts tiles, not the block (see :func:`task_memory`), and input
        blocks are not capped by ``target_bytes``.
    max_blocks
        Most blocks an "auto" plan may have (output blocks; a reduction's upper-triangle
        blocks when ``square``); larger jobs get larger blocks, within the budget.
    min_square_blocks, min_square_rows
        With ``square``: at least ``min_square_blocks`` blocks per axis, as long as
        blocks keep ``min_square_rows`` rows.
    nnz_per_row
        Sparse inputs: mean stored values per row. Input rows are then sized by their
        non-zeros (see :func:`task_memory`), so ``dim`` may be 2**20 or more.

    Examples
    --------
    >>> p = plan_blocks(16, 2048, 2048, 256, in_itemsize=4, compute_itemsize=4, out_itemsize=4)
    >>> p.chunks
    ((8, 8), (2048,), (2048,))
    """
    b_spec = normalize_axis_chunks(chunks[0], batch, axis="batch")
    n_spec = normalize_axis_chunks(chunks[1], n, axis="N")
    m_spec = normalize_axis_chunks(chunks[2], m, axis="M")
    if square and n_spec is None and m_spec is not None:
        n_spec = m_spec
    if square and m_spec is None and n_spec is not None:
        m_spec = n_spec

    item = max(compute_itemsize, out_itemsize)
    elems = max(1, target_bytes // item)
    total = batch * n * m
    if total and min_blocks > 1:
        # enough blocks for every core, but never blocks under ~256x256
        elems = max(min(elems, math.ceil(total / min_blocks)), min(elems, 256 * 256))
    # a held block of S (not reduce) stays within a quarter of the budget, whatever the rest wants
    max_elems = budget_bytes // (4 * item) if not reduce else total or 1
    capped = False
    if total and max_blocks:  # a bounded graph: larger blocks rather than more of them
        computed = total // 2 if square and reduce else total  # a reduction's triangle: its products
        need = min(math.ceil(computed / max_blocks), max_elems)
        capped = need > elems
        elems = max(elems, need)
    # the normalise task of an input block (raw block, float64 working copies, result: see
    # task_memory) must fit the budget; a stored block's input rows x dim should not outgrow
    # the target either, and a reduction's inputs (both blocks, a transposed copy) the budget
    unit_row = row_bytes(dim, compute_itemsize, nnz_per_row)
    raw_rows = row_bytes(dim, in_itemsize, nnz_per_row) + 2 * row_bytes(dim, 8, nnz_per_row) + unit_row
    normalise_rows = budget_bytes // max(1, raw_rows)
    if reduce:
        room = max(budget_bytes // 2, budget_bytes - 2 * REDUCE_TILE_BYTES)
        input_rows = room // max(1, 3 * unit_row + _CANDIDATE_BYTES)
    else:
        input_rows = target_bytes // max(1, unit_row)
        if capped:  # the task-count cap outranks the target size of input blocks (not the budget)
            input_rows = max(input_rows, math.isqrt(elems))
        if nnz_per_row is None:
            # a dense product's inputs and its batch element of unit rows, (bc + 1) (nc + mc)
            # unit rows, stay within half the budget: with bc * max(nc, mc) and max(nc, mc)
            # both at most budget / (8 unit_row), below (the output and its cast: a quarter each)
            input_rows = min(input_rows, budget_bytes // max(1, 8 * unit_row))
    max_rows = max(1, min(normalise_rows, input_rows))

    nc = max(n_spec) if n_spec else None
    mc = max(m_spec) if m_spec else None
    if nc is None or mc is None:
        side = max(1, math.isqrt(elems))
        if nc is None and mc is None:
            if square:
                nc = mc = min(n, side, max_rows, max(min_square_rows, math.ceil(n / min_square_blocks)))
                if max_blocks and n:  # ... but no more upper blocks than max_blocks
                    per_batch = max(1, max_blocks // max(1, batch))
                    triangle = (math.isqrt(8 * per_batch + 1) - 1) // 2  # nb (nb + 1) / 2 <= per_batch
                    nb_max = max(1, triangle if reduce else math.isqrt(per_batch))
                    nc = mc = min(max(nc, math.ceil(n / nb_max)), max_rows, max(1, math.isqrt(max_elems)))
            elif n <= side:
                nc, mc = n, min(m, max(1, elems // max(n, 1)))
            elif m <= side:
                nc, mc = min(n, max(1, elems // max(m, 1))), m
            else:
                nc = mc = side
        elif nc is None:
            nc = min(n, max(1, elems // max(mc, 1)))
        else:
            mc = min(m, max(1, elems // max(nc, 1)))
        nc, mc = min(nc, max_rows), min(mc, max_rows)
    rows = n_spec or _balanced(n, _snap(nc, n, grains[0], max_rows))
    cols = m_spec or _balanced(m, _snap(mc, m, grains[1], max_rows))
    if square and n_spec is None and m_spec is None:
        cols = rows
    nc, mc = max(rows), max(cols)
    if b_spec is None:
        per_batch = max(1, nc * mc)
        per_task = max(1, min(elems // per_batch, max_rows // max(nc, mc, 1)))  # normalise rows too
        b_spec = _even_rounds(batch, _balanced(batch, per_task), len(rows) * len(cols), parallel)
    bc = max(b_spec) if batch else 0

    need = task_memory(
        bc, nc, mc, dim,
        in_itemsize=in_itemsize, compute_itemsize=compute_itemsize, out_itemsize=out_itemsize, reduce=reduce,
        nnz_per_row=nnz_per_row,
    )  # fmt: skip
    if need > budget_bytes:
        sizes = dict(in_itemsize=in_itemsize, compute_itemsize=compute_itemsize, out_itemsize=out_itemsize)
        sizes["reduce"] = reduce
        sizes["nnz_per_row"] = nnz_per_row
        one_row = task_memory(min(batch, 1), min(n, 1), min(m, 1), dim, **sizes)
        if chunks == ("auto", "auto", "auto") or one_row > budget_bytes:
            fits = "none: one vector per block needs " + format_bytes(one_row)
        else:
            auto = plan_blocks(
                batch, n, m, dim, target_bytes=min(target_bytes, budget_bytes // 4),
                budget_bytes=budget_bytes, square=square, **sizes,
            )  # fmt: skip
            axes = (auto.batch, auto.rows, auto.cols) if batched else (auto.rows, auto.cols)
            fits = str(tuple(max(1, *c) for c in axes))  # 1 on empty axes
        raise PlanError(
            f"chunks: blocks of (batch={bc}, N={nc}, M={mc}) with D={dim} need about "
            f"{format_bytes(need)} per task, above the budget cosine.max-task-memory="
            f"{format_bytes(budget_bytes)}; chunks that fit: {fits}. Pass smaller chunks= or "
            "raise the budget with dask.config.set({'cosine.max-task-memory': ...})"
        )
    return Plan(b_spec, rows, cols, need)
