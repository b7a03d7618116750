"""Per-block kernels of :func:`dask_cosim.duplicate_groups`: connected components in NumPy.

A *forest* is a pair of int64 arrays ``(nodes, roots)``: ``nodes`` sorted and unique,
``roots[x]`` the smallest node of the component that ``nodes[x]`` belongs to, as far as
the edges seen so far tell. Forests of different blocks merge by treating every
``(node, root)`` as an edge (:func:`merge_forests`), so the merge is associative and
commutative and its result depends only on the union of the edges: the same for every
chunking, tree shape and scheduler. Nothing here knows of dask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["components", "merge_forests", "finish_forest", "group_rows", "empty_forest"]


def empty_forest() -> tuple[np.ndarray, np.ndarray]:
    """A forest without nodes."""
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)


def components(u, v) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges ``u[e] -- v[e]``: a forest.

    Union-find in whole-array steps: every edge whose endpoints have different roots
    hooks the larger root under the smaller one (``np.minimum.at``), then pointers are
    jumped until every node points at its root; repeated until no edge joins two roots.
    Roots only ever point to smaller nodes, so the root of a component is its smallest node.

    Examples
    --------
    >>> components(np.array([5, 2, 9]), np.array([7, 7, 11]))
    (array([ 2,  5,  7,  9, 11]), array([2, 2, 2, 9, 9]))
    """
    u = np.asarray(u, dtype=np.int64).ravel()
    v = np.asarray(v, dtype=np.int64).ravel()
    if u.size == 0:
        return empty_forest()
    nodes, inverse = _compact(np.concatenate([u, v]))
    lu, lv = inverse[: u.size], inverse[u.size :]
    parent = np.arange(nodes.size, dtype=np.int64)
    while True:
        ru, rv = parent[lu], parent[lv]
        open_ = ru != rv
        if not open_.any():
            break
        lu, lv, ru, rv = lu[open_], lv[open_], ru[open_], rv[open_]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:  # pointer jumping: parent[x] becomes x's root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return nodes, nodes[parent]


def _compact(x):
    """``(nodes, inverse)`` as ``np.unique(x, return_inverse=True)``, faster.

    Ids of one block's pairs lie in its few rows and columns: when their span is small
    next to ``x``, a presence table and a running count replace the sort (for a dense
    block at a low threshold, millions of pairs, this is most of the work).
    """
    lo, hi = int(x.min()), int(x.max())
    span = hi - lo + 1
    if span <= 2 * x.size + 4096:
        present = np.zeros(span, dtype=bool)
        present[x - lo] = True
        nodes = np.flatnonzero(present) + lo
        return nodes, (np.cumsum(present) - 1)[x - lo]
    nodes = np.unique(x)
    return nodes, np.searchsorted(nodes, x)


def merge_forests(forests) -> tuple[np.ndarray, np.ndarray]:
    """One forest from several (of any blocks): the components of all their ``(node, root)`` edges.

    Examples
    --------
    >>> f1 = (np.array([0, 3]), np.array([0, 0]))
    >>> f2 = (np.array([3, 4, 8]), np.array([3, 3, 8]))
    >>> merge_forests([f1, f2])
    (array([0, 3, 4, 8]), array([0, 0, 0, 8]))
    """
    if isinstance(forests, tuple):
        forests = [forests]
    forests = [f for f in forests if len(f[0])]
    if not forests:
        return empty_forest()
    nodes = np.concatenate([f[0] for f in forests])
    roots = np.concatenate([f[1] for f in forests])
    return components(nodes, roots)


def finish_forest(forest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(nodes, roots, sizes)``: each node's component size, from the final forest.

    >>> finish_forest((np.array([1, 4, 6]), np.array([1, 1, 1])))[2]
    array([3, 3, 3])
    """
    nodes, roots = forest
    if not len(nodes):
        return nodes, roots, np.empty(0, dtype=np.int64)
    unique, counts = np.unique(roots, return_counts=True)
    return nodes, roots, counts[np.searchsorted(unique, roots)].astype(np.int64)


def group_rows(final, batches: range, rows: range, n: int, batched: bool):
    """Columns ``batch`` (when ``batched``), ``i``, ``group``, ``size`` for a block of rows.

    ``final`` is :func:`finish_forest`'s result over node ids ``batch * n + i``; rows that
    are in no edge are singletons (``group == i``, ``size == 1``).

    Examples
    --------
    >>> final = finish_forest((np.array([1, 3]), np.array([1, 1])))
    >>> cols = group_rows(final, range(1), range(0, 4), 4, False)
    >>> cols["group"], cols["size"]
    (array([0, 1, 2, 1]), array([1, 2, 1, 2]))
    """
    nodes, roots, sizes = final
    b = np.repeat(np.arange(batches.start, batches.stop, dtype=np.int64), len(rows))
    i = np.tile(np.arange(rows.start, rows.stop, dtype=np.int64), len(batches))
    ids = b * n + i
    group, size = i.copy(), np.ones_like(i)
    if len(nodes) and len(ids):
        pos = np.minimum(np.searchsorted(nodes, ids), len(nodes) - 1)
        hit = nodes[pos] == ids
        group[hit] = roots[pos[hit]] - b[hit] * n
        size[hit] = sizes[pos[hit]]
    cols = {"batch": b} if batched else {}
    return {**cols, "i": i, "group": group, "size": size}
