"""Self-similarity graphs: compute only the block upper triangle, derive the rest by transposing.

With ``b=None`` (or ``b is a``) and square blocks, output block ``(i, j)`` with ``j < i``
is the transpose of block ``(j, i)``, so only the ``nb (nb + 1) / 2`` blocks with
``j >= i`` run a product; the others are a transpose (:func:`similarity_triangle`), the
column half of an off-diagonal top-k task (:func:`topk_triangle_parts`), or are not
needed at all (:func:`pairs_triangle_graph`: each unordered pair once). dask has no
triangle primitive, so these functions lay out the graph layers themselves, one task
per upper block, and hand them to dask as ordinary collections.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import array_api_compat
import dask.array as da
import numpy as np
from dask.base import tokenize

from ._compat import array_from_graph, graph_from_collections, graph_name
from ._kernels import similarity_block, transposed_numpy
from ._resources import annotate_for, routed
from ._select import topk_block

if TYPE_CHECKING:
    from ._prepared import Prepared

__all__ = [
    "use_triangle",
    "upper_blocks",
    "similarity_triangle",
    "topk_triangle_parts",
    "pairs_triangle_graph",
    "transpose_block",
]


def use_triangle(prep: Prepared) -> bool:
    """Whether ``prep`` is a self-similarity with square blocks and more than one block row."""
    return (
        prep.self_similar
        and prep.plan.rows == prep.plan.cols
        and len(prep.plan.rows) > 1
        and 0 not in prep.out_shape
    )


def upper_blocks(nb: int) -> Iterator[tuple[int, int]]:
    """Block pairs ``(i, j)`` with ``j >= i``, row by row.

    >>> list(upper_blocks(3))
    [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    """
    for i in range(nb):
        for j in range(i, nb):
            yield i, j


def transpose_block(x):
    """A contiguous copy of a block with its last two axes swapped (any array namespace).

    >>> transpose_block(np.arange(6).reshape(2, 3))
    array([[0, 3],
           [1, 4],
           [2, 5]])
    """
    if isinstance(x, np.ndarray):
        return transposed_numpy(x)
    if array_api_compat.is_cupy_array(x):
        import cupy

        return cupy.ascontiguousarray(cupy.swapaxes(x, -1, -2))
    xp = array_api_compat.array_namespace(x)
    return xp.asarray(xp.permute_dims(x, (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2)), copy=True)


# --------------------------------------------------------------------------- layout helpers


def _batch_blocks(prep: Prepared) -> list[int | None]:
    """Batch block numbers of the output, ``[None]`` for a 2-D output."""
    return list(range(len(prep.plan.batch))) if len(prep.out_index) == 3 else [None]


def _key(name: str, kb: int | None, i: int, j: int) -> tuple:
    return (name, i, j) if kb is None else (name, kb, i, j)


def _input_key(an: str, kb: int | None, i: int) -> tuple:
    return (an, i, 0) if kb is None else (an, kb, i, 0)


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    return [int(v) for v in np.cumsum((0, *sizes))[:-1]]


def _upper_layer(
    prep: Prepared, an: str, name: str, task_for: Callable[[int | None, int, int], Callable]
) -> dict:
    """One task ``task_for(kb, i, j)(an[kb, i], an[kb, j])`` per upper block ``j >= i``
    (``an``: the name of the normalised input's blocks)."""
    nb = len(prep.plan.rows)
    return {
        _key(name, kb, i, j): (task_for(kb, i, j), _input_key(an, kb, i), _input_key(an, kb, j))
        for kb in _batch_blocks(prep)
        for i, j in upper_blocks(nb)
    }


# --------------------------------------------------------------------------- cosine_similarity


def similarity_triangle(prep: Prepared) -> da.Array:
    """The ``(batch, N, M)`` self-similarity: products for ``j >= i``, transposes below.

    Task names: ``cosine-block-*`` (the products) and ``cosine-similarity-*`` (the
    assembled output: an alias of the product above the diagonal, a transpose below).
    """
    kwargs = prep.product_kwargs()
    token = tokenize(prep.an.name, prep.plan.chunks, kwargs, "triangle")
    prod, out = f"cosine-block-{token}", f"cosine-similarity-{token}"
    product = routed(partial(similarity_block, **kwargs), prep.device)
    # a block left on the GPU (like="cupy") is transposed there too
    transpose = routed(transpose_block, prep.device if prep.like == "cupy" else "cpu")
    an = graph_name(prep.an)
    upper = _upper_layer(prep, an, prod, lambda kb, i, j: product)
    nb = len(prep.plan.rows)
    assembled = {
        _key(out, kb, i, j): (_key(prod, kb, i, j) if j >= i else (transpose, _key(prod, kb, j, i)))
        for kb in _batch_blocks(prep)
        for i in range(nb)
        for j in range(nb)
    }
    chunks = prep.plan.chunks if len(prep.out_index) == 3 else prep.plan.chunks[1:]
    with annotate_for(prep.device):
        return array_from_graph(
            out, {prod: (upper, {an}), out: (assembled, {prod})}, [prep.an], chunks, prep.meta,
            described={prod: (chunks, prep.out_dtype)},
        )  # fmt: skip


def similarity_triangle_into(prep: Prepared, target: Any) -> da.Array:
    """The tasks of :func:`similarity_triangle` writing into ``target.array`` (a NumPy
    array of the output's shape and dtype, this process's scheduler) in place.

    Each upper product writes its block straight into its region; each block below the
    diagonal is the transpose of the region above it, written region to region once that
    product ran. Nothing is allocated per block and nothing copied twice. The blocks of
    the returned array are one-element markers (``True``). ``target`` is tokenised (by
    identity, see :class:`dask_cosim._result._Target`) into the tasks' names.
    """
    kwargs = prep.product_kwargs()
    token = tokenize(prep.an.name, prep.plan.chunks, kwargs, target, "triangle-into")
    prod, out = f"cosine-block-{token}", f"cosine-similarity-{token}"
    batch_blocks = _batch_blocks(prep)
    batch_starts = _offsets(prep.plan.batch)
    starts = _offsets(prep.plan.rows)

    def region(kb: int | None, i: int, j: int) -> tuple[slice, ...]:
        rows = slice(starts[i], starts[i] + prep.plan.rows[i])
        cols = slice(starts[j], starts[j] + prep.plan.rows[j])
        if kb is None:
            return rows, cols
        return slice(batch_starts[kb], batch_starts[kb] + prep.plan.batch[kb]), rows, cols

    an = graph_name(prep.an)
    upper = {
        _key(prod, kb, i, j): (
            partial(product_into, region=region(kb, i, j), target=target, **kwargs),
            _input_key(an, kb, i),
            _input_key(an, kb, j),
        )
        for kb in batch_blocks
        for i, j in upper_blocks(len(prep.plan.rows))
    }
    nb = len(prep.plan.rows)
    markers = {
        _key(out, kb, i, j): (
            _key(prod, kb, i, j)
            if j >= i
            else (
                partial(_mirror_into, target=target, src=region(kb, j, i), dst=region(kb, i, j)),
                _key(prod, kb, j, i),
            )
        )
        for kb in batch_blocks
        for i in range(nb)
        for j in range(nb)
    }
    chunks = tuple(
        (1,) * len(c) for c in (prep.plan.chunks if len(prep.out_index) == 3 else prep.plan.chunks[1:])
    )
    meta = np.empty((0,) * len(chunks), dtype=bool)
    return array_from_graph(out, {prod: (upper, {an}), out: (markers, {prod})}, [prep.an], chunks, meta)


def product_into(an, bn, region: tuple[slice, ...], *, target: Any, **kwargs) -> np.ndarray:
    """One product task writing its block into ``target.array[region]``; a one-element marker."""
    similarity_block(an, bn, out=target.array[region], **kwargs)
    return block_marker(len(region))


def _mirror_into(_ran, *, target: Any, src: tuple[slice, ...], dst: tuple[slice, ...]) -> np.ndarray:
    """The transpose of ``target.array[src]`` (an upper block already written, ``_ran`` its
    marker) written into ``target.array[dst]``; a one-element marker."""
    transposed_numpy(target.array[src], out=target.array[dst])
    return block_marker(len(dst))


def block_marker(ndim: int) -> np.ndarray:
    """What a task that wrote its block in place returns: one ``True`` per block."""
    return np.ones((1,) * ndim, dtype=bool)


# --------------------------------------------------------------------------- top-k


def topk_triangle_parts(
    prep: Prepared,
    k: int,
    exclude_self: bool,
    diagonals: Collection[tuple[int, ...]] | None = None,
    pivots: Mapping[tuple[int, ...], tuple] | None = None,
) -> tuple[da.Array, str]:
    """Local top-k parts ``(keys, idx)`` for every output block, from the upper blocks only.

    Upper block ``(i, j)`` runs one product and selects both the best columns of its
    rows (part ``(i, j)``) and, when ``i < j``, the best rows of its columns (part
    ``(j, i)``). The diagonal blocks run first: their parts bound the k-th best values of
    rows ``i`` and ``j``, which prunes the off-diagonal tasks, and the off-diagonal tasks
    of a batch block wait for all of them (a barrier, so that no scheduler runs a
    diagonal block late and leaves its row's tasks for the end). ``diagonals``: the
    barrier waits only for these diagonal blocks ``(*batch block, i)`` (a resumed job
    that needs no other). ``pivots``: for these row blocks ``(*batch block, i)``, a task
    (a tuple ``(callable, argument)``) that returns a top-k part of their rows, which
    prunes their off-diagonal blocks in place of their diagonal block's part (a resumed
    job's stored state). Returns an object array
    indexed like the output whose block ``(i, j)`` is that part; its chunks along the
    last axis are the parts' widths ``min(k, m_j)``. Also returns the name of the upper
    blocks' layer (``cosine-topk-*``), whose tasks return both halves.
    """
    kwargs = prep.product_kwargs()
    waits = None if diagonals is None else sorted(diagonals)
    pivots = dict(pivots or {})
    stored = sorted(pivots.items())
    token = tokenize(prep.an.name, prep.plan.chunks, kwargs, k, exclude_self, waits, stored, "topk-triangle")
    up, parts = f"cosine-topk-{token}", f"cosine-pick-{token}"
    held = f"cosine-stored-pivot-{token}"
    starts = _offsets(prep.plan.rows)

    def task_for(kb: int | None, i: int, j: int) -> Callable:
        task = partial(
            _diagonal_topk_block if i == j else _pivoted_topk_block,
            k=k,
            row_offset=starts[i],
            col_offset=starts[j],
            exclude_self=exclude_self,
            both=i < j,
            **kwargs,
        )
        return routed(task, prep.device)

    an = graph_name(prep.an)
    upper = _upper_layer(prep, an, up, task_for)
    nb = len(prep.plan.rows)

    def pivot(kb: int | None, i: int) -> tuple:
        """The key of the part that prunes row block ``i``'s off-diagonal blocks."""
        panel = (i,) if kb is None else (kb, i)
        return _key(held if panel in pivots else up, kb, i, i)

    for panel, task in stored:
        *batch, i = panel
        upper[_key(held, batch[0] if batch else None, i, i)] = task
    for kb in _batch_blocks(prep):  # off-diagonal tasks are pruned by both diagonal parts
        # ... and start once every diagonal task has run (see _ran): the parts are the
        # best they can be, and no thread waits at the end for a late diagonal's row
        ran, barrier = f"cosine-diagonals-done-{token}", _key(f"cosine-diagonals-{token}", kb, 0, 0)
        batch = () if kb is None else (kb,)
        wait = [i for i in range(nb) if waits is None or (*batch, i) in diagonals]
        for i in wait:
            upper[_key(ran, kb, i, i)] = (_ran, _key(up, kb, i, i))
        upper[barrier] = (_ran, *(_key(ran, kb, i, i) for i in wait))
        for i, j in upper_blocks(nb):
            if i < j:
                upper[_key(up, kb, i, j)] += (pivot(kb, i), pivot(kb, j), barrier)
    get = routed(operator.getitem, prep.device if prep.like == "cupy" else "cpu")
    pick: dict[Any, Any] = {}
    for kb in _batch_blocks(prep):
        for i in range(nb):
            for j in range(nb):
                if i == j:
                    pick[_key(parts, kb, i, j)] = _key(up, kb, i, i)
                elif i < j:
                    pick[_key(parts, kb, i, j)] = (get, _key(up, kb, i, j), 0)
                else:
                    pick[_key(parts, kb, i, j)] = (get, _key(up, kb, j, i), 1)
    out_chunks = prep.plan.chunks if len(prep.out_index) == 3 else prep.plan.chunks[1:]
    chunks = (*out_chunks[:-1], tuple(min(k, c) for c in out_chunks[-1]))
    meta = np.empty((0,) * len(chunks), dtype=object)
    with annotate_for(prep.device):
        array = array_from_graph(
            parts, {up: (upper, {an}), parts: (pick, {up})}, [prep.an], chunks, meta,
            described={up: (chunks, object)},
        )  # fmt: skip
    return array, up


def _diagonal_topk_block(an, bn, **kwargs):
    """:func:`~dask_cosim._select.topk_block` of a diagonal block (looked up when the task runs)."""
    return topk_block(an, bn, symmetric=True, **kwargs)


def _ran(*results) -> None:
    """``None`` once ``results`` exist: the barrier after the diagonal tasks.

    One such task per diagonal block runs where its part is (its only input), and the
    barrier takes those, so a cluster moves no part to build the barrier.
    """


def _pivoted_topk_block(an, bn, row_pivot, col_pivot, *after, **kwargs):
    """:func:`~dask_cosim._select.topk_block` pruned by the diagonal blocks' parts."""
    return topk_block(an, bn, row_pivot=row_pivot, col_pivot=col_pivot, **kwargs)


# --------------------------------------------------------------------------- pairs


def pairs_triangle_graph(
    prep: Prepared,
    name: str,
    task_for: Callable[[int | None, int, int, dict], Callable],
    extras: tuple[da.Array, ...] = (),
) -> tuple[Any, list[tuple]]:
    """One ``pairs`` task per upper block; returns the graph (a ``HighLevelGraph``) and the
    keys in block order.

    ``task_for(kb, i, j, offsets)`` returns the callable applied to ``(an[i], an[j])``;
    ``offsets`` holds ``row_offset``, ``col_offset``, ``batch_offset`` and ``upper``
    (True on diagonal blocks, where only ``j >= i`` is kept). ``extras``: 1-D dask arrays
    chunked like the rows (e.g. labels) whose blocks ``i`` and ``j`` are passed too, as
    ``(an[i], an[j], extra[i], extra[j], ...)``.
    """
    starts = _offsets(prep.plan.rows)
    batch_starts = _offsets(prep.plan.batch)

    def task(kb: int | None, i: int, j: int) -> Callable:
        offsets = {
            "row_offset": starts[i],
            "col_offset": starts[j],
            "batch_offset": 0 if kb is None else batch_starts[kb],
            "upper": i == j,
        }
        return task_for(kb, i, j, offsets)

    tasks = _upper_layer(prep, graph_name(prep.an), name, task)
    extra_names = [graph_name(x) for x in extras]
    for key in tasks:
        i, j = key[-2:]
        tasks[key] += tuple(k for x in extra_names for k in ((x, i), (x, j)))
    with annotate_for(prep.device):
        graph = graph_from_collections(name, tasks, [prep.an, *extras])
    return graph, list(tasks)
