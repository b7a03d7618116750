"""Resumable top-k jobs: each row panel merges its parts in a chain that checkpoints as it goes.

A top-k result is a tree reduction of per-block parts; written as such, nothing reaches
the store until every column block of a row panel is done, and with the self-similarity
triangle (block ``(x, j)`` also feeds panel ``j``) an interrupted job kept almost nothing.
So :func:`dask_cosim.to_zarr` writes a registered top-k result (:func:`register`) through
this module instead:

- **Links.** Panel ``j`` (a row block, per batch block) merges its parts in order, one
  *link* per column block ``x``: the part of block ``(j, x)`` (in the triangle, the half
  of upper block ``(min(j, x), max(j, x))`` that belongs to panel ``j``, its own diagonal
  block first: those all run first). Merging is the same exact top-k with ties by the
  smaller index as the tree's, so the result does not change.
- **Checkpoints.** After link ``L`` the merged state is written to slot ``L % 2`` of
  ``_topk_state_*`` (two slots: a crash while writing one leaves the other intact), then
  ``_topk_links[panel] = L + 1``. The last link writes ``values``/``indices`` and the
  panel's ``_blocks_done`` marker instead. A resumed job starts each panel at its marker,
  from the stored state, and computes only the blocks whose parts some panel still needs;
  in the triangle, a panel that saved anything prunes its blocks by its stored state
  instead of its diagonal block's part, so its diagonal block does not run again.
- **Order.** The input tasks go first (:data:`INPUT_PRIORITY`), then the block tasks by
  upper row and column, the order the links merge them (:func:`priority_of`; ``topk``
  sets both when it builds the graph), and a ready link before any block, so on a
  ``distributed`` cluster panels finish in order and every finished link is saved within
  a task's time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._backend import to_numpy
from ._compat import delayed_from_graph, graph_from_collections, graph_name
from ._out_state import describe
from ._select import NAN_KEY, PAD_KEY, finish_topk, merge_topk

__all__ = ["TopkSource", "register", "lookup", "priority_of", "links_of", "STATE", "LINKS", "INPUT_PRIORITY"]

#: Priority of the input and normalise tasks of a top-k graph: above every block task, so
#: that no block waits for an input while a later row's block runs (every normalised block
#: is held until its last block anyway).
INPUT_PRIORITY = 2

#: Group arrays of the checkpointed state (slot, *values shape) and the per-panel link count.
STATE = ("_topk_state_values", "_topk_state_indices")
LINKS = "_topk_links"


@dataclass(frozen=True)
class TopkSource:
    """What a top-k result was reduced from: the parts array (an object dask array whose
    block ``(..., i, j)`` is the part of row block ``i`` from column block ``j``), ``k``,
    whether the parts come from the self-similarity triangle, and where merges run."""

    parts: Any
    k: int
    triangle: bool
    where: str
    upper: str | None = None  # the triangle's block layer: links take its halves directly
    #: the triangle's ``(parts, upper)`` again, with a barrier over only the given diagonal
    #: blocks, the other panels' blocks pruned by the given stored pivots
    #: (:func:`~dask_cosim._triangle.topk_triangle_parts`): what a resumed job runs
    rebuild: Callable[[frozenset, dict], tuple[Any, str]] | None = None
    #: outside the triangle: the column block whose part prunes every other part of its
    #: row (computed for any of them), ``None`` when the parts are not pruned
    pivot: int | None = None

    def part(self, panel: tuple[int, ...], j: int, parts_name: str | None = None):
        """The task argument of part ``(*panel, j)``: a key, or a getitem on an upper block
        (``parts_name``: the name of the parts' blocks in their graph, default theirs)."""
        if self.upper is None:
            return (parts_name or graph_name(self.parts), *panel, j)
        *kb, i = panel
        if i == j:
            return (self.upper, *kb, i, i)
        return (operator.getitem, (self.upper, *kb, min(i, j), max(i, j)), 0 if i < j else 1)


_SOURCES: dict[str, TopkSource] = {}


def register(name: str, source: TopkSource) -> None:
    """Remember how the top-k result whose values array is named ``name`` was built."""
    _SOURCES[name] = source


def lookup(name: str) -> TopkSource | None:
    return _SOURCES.get(name)


def priority_of(triangle: bool, nrows: int):
    """Priority of a block task by its key ``(name, [kb,] i, j)``: the order in which the
    panels' links merge the blocks (:func:`links_of`).

    In the triangle, every off-diagonal block waits for the two diagonal blocks that prune
    it, so the diagonal blocks of a batch block go first (priority 0), then the upper rows
    in order, and each row by column: panel ``i`` is complete once upper row ``i`` is, and
    each finished block ``(i, j)`` is the next link of both its panels (``i``'s row side
    and ``j``'s column side). Without the column order, dask breaks the tie within a row
    its own way (last column first, as it happens), and a panel's row-side links wait
    for the row's first block while the others are already done. Outside the triangle,
    rows first and each row by column.
    """
    span = _ORDER_SPAN

    def priority(key) -> int:
        if not isinstance(key, tuple) or len(key) < 3:
            return 0
        i, j = key[-2], key[-1]
        batch = key[-3] if len(key) >= 4 else 0
        if not triangle:
            return -((batch * nrows + i) * span + j)
        if i == j:
            return -batch * (nrows + 1) * span
        return -batch * (nrows + 1) * span - (1 + min(i, j)) * span - max(i, j)

    return priority


#: Priorities order blocks by ``(batch, row, column)`` as ``row * span + column``: more
#: column blocks than any graph a scheduler holds, and small enough that the priorities
#: stay within the 64-bit integers that distributed's messages carry.
_ORDER_SPAN = 2**20


def links_of(ncols: int, diagonal: int | None = None) -> list[list[int]]:
    """Column blocks whose parts each link of panel ``i`` merges, in order: one part per
    link, by column block. Blocks finish roughly in that order whether a cluster runs the
    triangle by rows or (waiting for inputs) by columns, so each finished block is saved
    by the next link, and a resumed job recomputes only blocks that were not merged.

    ``diagonal``: the panel's own column block in a self-similarity triangle, whose
    diagonal blocks all run first (they prune the others): its link comes first, so every
    panel saves its diagonal part as soon as it exists. Merging in any order gives the
    same exact top-k.

    >>> links_of(4), links_of(4, diagonal=2)
    ([[0], [1], [2], [3]], [[2], [0], [1], [3]])
    """
    order = list(range(ncols))
    if diagonal is not None:
        order.remove(diagonal)
        order.insert(0, diagonal)
    return [[x] for x in order]


def _chain(source: TopkSource, panel: tuple[int, ...], ncols: int) -> list[list[int]]:
    """The links of ``panel`` (``(*batch block, row block)``): diagonal first in a triangle."""
    return links_of(ncols, panel[-1] if source.triangle else None)


class LinkWrite:
    """Where one link writes: the state and output arrays, the panel, its regions.

    A plain object (not a container) so that dask does not traverse the zarr arrays.
    """

    __slots__ = ("state", "links", "outputs", "marker", "panel", "regions", "link", "last", "k", "gate")

    def __init__(self, state, links, outputs, marker, panel, regions, link, last, k, gate):
        self.state, self.links, self.outputs, self.marker = state, links, outputs, marker
        self.panel, self.regions, self.link, self.last, self.k, self.gate = (
            panel,
            regions,
            link,
            last,
            k,
            gate,
        )


def _slot_region(where: LinkWrite, slot: int) -> tuple:
    return (slice(slot, slot + 1), *where.regions)


def _read_state(where: LinkWrite):
    slot = (where.link - 1) % 2
    keys = where.state[0][_slot_region(where, slot)][0]
    idx = where.state[1][_slot_region(where, slot)][0]
    return keys, idx


def _padded(part, k: int):
    """A part widened to ``k`` columns with padding (the state arrays hold ``k``)."""
    keys, idx = (to_numpy(v) for v in part)
    short = k - keys.shape[-1]
    if short <= 0:
        return keys, idx
    pad_k = np.full((*keys.shape[:-1], short), PAD_KEY, dtype=keys.dtype)
    pad_i = np.full((*idx.shape[:-1], short), -1, dtype=idx.dtype)
    return np.concatenate([keys, pad_k], axis=-1), np.concatenate([idx, pad_i], axis=-1)


def run_link(where: LinkWrite, prev, *parts):
    """Merge ``parts`` into the panel's state (``prev``, or the stored one), then save it.

    Returns the merged state for the next link, or 1 after the last link wrote the output.
    """
    with where.gate.entered() as wanted:
        if not wanted:
            return 0
        state = prev if prev is not None else (_read_state(where) if where.link > 0 else None)
        pieces = [tuple(to_numpy(v) for v in p) for p in parts]
        merged = merge_topk(pieces if state is None else [state, *pieces], where.k)
        if where.last:
            vals, idx = finish_topk(merged)
            for target, block in zip(where.outputs, (vals, idx), strict=True):
                target[where.regions] = block
            where.marker[tuple(slice(i, i + 1) for i in where.panel)] = np.ones((1,) * len(where.panel), "u1")
            return 1
        merged = _padded(merged, where.k)
        slot = where.link % 2
        for target, block in zip(where.state, merged, strict=True):
            target[_slot_region(where, slot)] = block[None]
        where.links[tuple(slice(i, i + 1) for i in where.panel)] = np.full(
            (1,) * len(where.panel), where.link + 1, dtype="i4"
        )
        return merged


def chain_tasks(
    source: TopkSource,
    values,
    group,
    done: np.ndarray,
    linked: np.ndarray,
    gate,
    marker_name: str,
    token: str,
):
    """The link tasks of every panel not yet done, as one graph layer over ``source.parts``;
    ``done`` and ``linked``: the store's markers and its ``LINKS`` array, as read.

    Returns ``(final link of each pending panel as a Delayed, the pending panels, the
    blocks they compute)`` (:func:`computed_blocks`).
    """
    import dask

    state = (group[STATE[0]], group[STATE[1]])
    outputs = (group["values"], group["indices"])
    source = _resumed_source(
        source, values, done, linked, (state, outputs, (describe(group.store), group.path))
    )
    parts, k = source.parts, source.k
    parts_name = None if source.upper is not None else graph_name(parts)
    grid = values.numblocks[:-1]
    ncols = parts.numblocks[-1]
    computed = computed_blocks(source, done, linked, ncols)
    marker, links = group[marker_name], group[LINKS]
    name = f"cosine-link-{token}"
    dsk: dict = {}
    finals, pending = [], []
    for panel in np.ndindex(*grid):
        if done[panel]:
            continue
        chain = _chain(source, panel, ncols)
        regions = _regions(values, panel, k)
        prev = None
        for link in range(min(int(linked[panel]), len(chain) - 1), len(chain)):
            last = link == len(chain) - 1
            where = LinkWrite(state, links, outputs, marker, panel, regions, link, last, k, gate)
            key = (name, *panel, link)
            dsk[key] = (run_link, where, prev, *(source.part(panel, j, parts_name) for j in chain[link]))
            prev = key
        finals.append(prev)
        pending.append(panel)
    priority = _block_priority(source.triangle, len(values.chunks[-2]))
    with dask.annotate(priority=1):  # a ready link runs before any block: progress is saved early
        graph = graph_from_collections(name, dsk, [parts], priority=priority)
    return [delayed_from_graph(key, graph, layer=name) for key in finals], pending, computed


def computed_blocks(source: TopkSource, done, linked, ncols: int) -> set[tuple[int, ...]]:
    """The product blocks ``(*batch block, i, j)`` a (resumed) chain job computes: each
    pending panel's parts from its first unsaved link on, for the triangle as upper
    blocks ``(i, j)``, ``j >= i`` (one product gives both halves; a panel that saved
    anything needs no diagonal block, :func:`_resumed_source`), and outside it with the
    row's pivot block wherever another of its parts runs.

    >>> source = TopkSource(None, 10, triangle=True, where="cpu")
    >>> sorted(computed_blocks(source, np.array([True, False, False]), np.array([3, 2, 0]), 3))
    [(0, 2), (1, 2), (2, 2)]
    >>> source = TopkSource(None, 10, triangle=False, where="cpu", pivot=0)
    >>> sorted(computed_blocks(source, np.array([False, False]), np.array([2, 0]), 3))
    [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)]
    """
    out: set[tuple[int, ...]] = set()
    for panel in np.ndindex(*done.shape):
        if done[panel]:
            continue
        *kb, i = panel
        chain = _chain(source, panel, ncols)
        js = [j for link in chain[min(int(linked[panel]), len(chain) - 1) :] for j in link]
        for j in js:
            out.add((*kb, min(i, j), max(i, j)) if source.triangle else (*panel, j))
        if not source.triangle and source.pivot is not None and any(j != source.pivot for j in js):
            out.add((*panel, source.pivot))
    return out


def _regions(values, panel: tuple[int, ...], k: int) -> tuple[slice, ...]:
    """The region of ``panel`` (``(*batch block, row block)``) in the values array."""
    out = []
    for sizes, b in zip(values.chunks[:-1], panel, strict=True):
        start = int(sum(sizes[:b]))
        out.append(slice(start, start + int(sizes[b])))
    return (*out, slice(0, k))


def _resumed_source(source: TopkSource, values, done, linked, stored_in) -> TopkSource:
    """``source``, or (a resumed triangle job) its parts rebuilt around what is stored.

    Every panel's chain merges its diagonal part first (:func:`links_of`), so a panel with
    a saved link, or a finished one, needs its diagonal block no more: its blocks are
    pruned by its stored top-k so far instead (:func:`stored_pivot`, at least as tight
    as the diagonal part), and only the diagonal blocks of panels that saved nothing run
    again (the barrier waits only for those). ``stored_in``: ``(state arrays, output
    arrays, where)``, ``where`` naming the store in the tasks' tokens.
    """
    if not (source.triangle and source.rebuild is not None):
        return source
    panels = list(np.ndindex(*done.shape))
    stored = [p for p in panels if done[p] or linked[p] > 0]
    if not stored:
        return source
    state, outputs, where = stored_in
    pivots = {
        p: (
            stored_pivot,
            StoredPivot(state, outputs, _regions(values, p, source.k), int(linked[p]), bool(done[p]), where),
        )
        for p in stored
    }
    parts, upper = source.rebuild(frozenset(p for p in panels if p not in pivots), pivots)
    return replace(source, parts=parts, upper=upper)


class StoredPivot:
    """Where a panel's top-k so far is stored: its last saved link's state slot or, for a
    finished panel, its output. A plain object, so that dask does not traverse the zarr
    arrays; tokenised by the store, the region and the link count."""

    __slots__ = ("state", "outputs", "regions", "linked", "final", "token")

    def __init__(self, state, outputs, regions, linked: int, final: bool, where):
        self.state, self.outputs, self.regions = state, outputs, regions
        self.linked, self.final = linked, final
        self.token = (where, [(r.start, r.stop) for r in regions], linked, final)

    def __dask_tokenize__(self):
        return self.token


def stored_pivot(where: StoredPivot):
    """A stored panel's top-k so far as a part ``(keys, idx)``: a pivot for its blocks.

    A finished panel's output values are its final keys, NaN where the key was NaN or
    invalid (read as :data:`~dask_cosim._select.NAN_KEY`, a bound at least that high only
    prunes that panel's own side of a block, which its finished output no longer needs).
    """
    if where.final:
        vals, idx = (a[where.regions] for a in where.outputs)
        return np.where(np.isnan(vals), np.asarray(NAN_KEY, dtype=vals.dtype), vals), idx
    slot = (where.linked - 1) % 2
    at = (slice(slot, slot + 1), *where.regions)
    return where.state[0][at][0], where.state[1][at][0]


#: Key prefixes of a top-k graph's input tasks (read, rechunk and normalise the inputs).
_INPUT_PREFIXES = ("cosine-in-", "cosine-input-", "cosine-normalize", "rechunk-", "fromarray", "getitem")


def _block_priority(triangle: bool, nrows: int):
    """Priority of a task of the parts' graph by its key (what :func:`~dask_cosim.topk` sets
    with ``dask.annotate``; used where dask drops those annotations, see
    :func:`dask_cosim._compat.graph_from_collections`): inputs first, then the blocks by
    :func:`priority_of`."""
    from dask.utils import key_split

    blocks = priority_of(triangle, nrows)

    def priority(key) -> int:
        prefix = key_split(key)
        if prefix.startswith(_INPUT_PREFIXES):
            return INPUT_PRIORITY
        if prefix in ("cosine-topk", "cosine-pick"):
            return blocks(key)
        return 0

    return priority


def ensure_state_arrays(group, values) -> None:
    """Create the checkpoint arrays (two state slots, link counts) if they do not exist yet."""
    existing = set(group.array_keys())
    chunks = tuple(max(1, c[0]) for c in values.chunks)
    for name, dtype in zip(STATE, (values.dtype, np.int64), strict=True):
        if name not in existing:
            shape, slots = (2, *values.shape), (1, *chunks)
            group.create_array(name, shape=shape, chunks=slots, dtype=dtype, fill_value=0, compressors=None)
    if LINKS not in existing:
        grid = values.numblocks[:-1]
        ones = (1,) * len(grid)
        group.create_array(LINKS, shape=grid, chunks=ones, dtype="i4", fill_value=0, compressors=None)


def drop_state_arrays(group) -> None:
    """Delete the checkpoint arrays of a finished job (the markers say it is complete)."""
    for name in (*STATE, LINKS):
        if name in set(group.array_keys()):
            del group[name]
