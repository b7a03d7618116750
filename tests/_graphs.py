"""Looking into task graphs the same way in both dask array modes.

In the legacy mode a collection's graph is a ``HighLevelGraph`` of named layers; under
array query planning (``array.query-planning``) it is an expression lowered to a plain
dict of tasks. The tests read both through these helpers: task keys and their prefixes,
the keys of one stage, dependencies, and the block metadata of each stage.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from dask.core import get_dependencies
from dask.utils import key_split

from dask_cosim._compat import QUERY_PLANNING

__all__ = [
    "QUERY_PLANNING",
    "block_metadata",
    "copy_of",
    "dependencies",
    "graph",
    "npartitions",
    "stage_names",
    "task_prefixes",
]


def copy_of(x):
    """Another dask array with ``x``'s blocks (``b is a`` is then false: not a self-similarity).

    ``Array.copy()`` exists only in the legacy mode.
    """
    return x.copy() if hasattr(x, "copy") else x.map_blocks(np.copy, dtype=x.dtype, meta=x._meta)


def npartitions(x) -> int:
    """Blocks of a dask array (``Array.npartitions`` exists only in the legacy mode)."""
    return int(np.prod(x.numblocks))


def graph(*collections) -> dict:
    """The tasks of ``collections`` (merged), as one dict."""
    out: dict = {}
    for c in collections:
        out.update(dict(c.__dask_graph__()))
    return out


def task_prefixes(*collections) -> set[str]:
    """Key prefixes (``cosine-block``...) of the tasks of ``collections``."""
    return {key_split(k) for k in graph(*collections)}


def stage_names(*collections) -> dict[str, list]:
    """The names of the task groups (a key's first element) of each prefix, e.g. one name
    per level of a tree reduction."""
    out: dict[str, set] = defaultdict(set)
    for key in graph(*collections):
        name = key[0] if isinstance(key, tuple) else key
        out[key_split(key)].add(name)
    return {prefix: sorted(names) for prefix, names in out.items()}


def dependencies(*collections) -> dict:
    """Key -> the keys its task reads."""
    dsk = graph(*collections)
    return {k: set(get_dependencies(dsk, k)) for k in dsk}


def block_metadata(*collections) -> dict[str, tuple[tuple, np.dtype]]:
    """``(chunks, dtype)`` of every stage whose blocks are arrays, without computing.

    Legacy mode: the layers' ``collection_annotations``. Query planning: every array
    expression of the lowered trees (and the layers a hand-built graph describes).
    """
    out: dict = {}
    for c in collections:
        if not QUERY_PLANNING:
            for name, layer in c.__dask_graph__().layers.items():
                info = layer.collection_annotations
                assert info and "chunks" in info, f"layer {name} carries no block metadata"
                out[name] = (tuple(info["chunks"]), np.dtype(info["dtype"]))
            continue
        stack, seen = [c.expr.lower_completely()], set()
        while stack:
            expr = stack.pop()
            if expr._name in seen:
                continue
            seen.add(expr._name)
            out[expr._name] = (tuple(expr.chunks), np.dtype(expr.dtype))
            out.update(getattr(expr, "layer_blocks", {}))
            stack.extend(expr.dependencies())
    return out
