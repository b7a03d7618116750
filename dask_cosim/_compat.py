"""Every private or undocumented dask / distributed / zarr API the package uses, in one place.

The rest of the package uses public APIs only (``tests/test_compat.py`` checks it): what
dask, distributed or zarr do not offer publicly is wrapped here, each wrapper naming the
upstream API it relies on, with a version or mode gate where the API differs.

**Two dask array modes.** dask's ``array.query-planning`` config (default False in dask
2026.8, "will eventually flip to True") makes ``dask.array.Array`` an expression-backed
collection (``dask.array._array_expr._collection.Array``, built from an expression,
lowered to a task graph when computed). The mode is fixed when ``dask.array`` is first
imported (:data:`QUERY_PLANNING`). What differs under query planning, as of dask 2026.8:

- array expressions carry no layer annotations (``dask.annotate``): the GPU routing keeps
  working through the :class:`~dask_cosim._resources.GPUTask` marker, and the priorities
  of a written top-k (:mod:`dask_cosim._topk_store`) are set by task key on the graph
  :func:`graph_from_collections` builds; a plain ``compute`` of ``topk`` runs in dask's order;
- array expressions are singletons by name: two arrays given the same name are one
  expression, so every name the package gives must change whenever the tasks would;
- ``from_array(name=)`` is ignored (:func:`from_array_named` keeps the key prefix), the
  ``token=`` of ``map_blocks`` is deprecated in favour of ``name=`` (a prefix there, a full
  key name in the legacy mode: :func:`map_blocks`), and ``.blocks``, ``to_delayed``,
  ``store`` and ``__array__`` do not exist (:func:`column_blocks`, :func:`block_delayeds`;
  :class:`~dask_cosim._result.SimilarityArray` has its own ``store`` and ``__array__``);
- a hand-built graph becomes an array through :func:`array_from_graph` (a leaf expression
  that owns the tasks, keeping the key names the dashboard shows);
- a ``blockwise`` given an explicit ``name=`` is never lowered below itself (``Expr.lower_once``
  detects a lowered child by its changed name, and an explicit name does not change), so an
  input that still needs lowering (a ``rechunk``) fails at compute time with "'Rechunk' object
  has no attribute 'npartitions'". The package therefore names blockwise layers by ``token=``
  (a key prefix) in both modes, never by ``name=``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

__all__ = [
    "QUERY_PLANNING",
    "normalize_chunks",
    "DataNode",
    "array_from_graph",
    "block_delayeds",
    "block_slices",
    "check_scheduler_address",
    "cluster_state",
    "collection_name",
    "column_blocks",
    "dask_meta",
    "delayed_from_graph",
    "fail_tasks",
    "frame_from_graph",
    "from_array_named",
    "graph_from_collections",
    "graph_name",
    "local_scheduler",
    "map_blocks",
    "map_partitions",
    "meta_of",
    "nprocesses_nthreads",
    "parse_memory_limit",
    "rewrap",
    "scheduler_address",
    "system_memory_limit",
    "task_group_graph",
    "tree_reduce",
    "worker_knows",
    "zarr_key_exists",
]


def _query_planning() -> bool:
    """Whether dask arrays are expression-backed (``array.query-planning``)."""
    # dask.array.array_expr_enabled (public); releases without it have no such mode
    enabled = getattr(da, "array_expr_enabled", None)
    return bool(enabled()) if enabled is not None else False


#: ``array.query-planning`` as dask applied it when ``dask.array`` was first imported.
QUERY_PLANNING: bool = _query_planning()


# --------------------------------------------------------------------------- arrays


def dask_meta(x) -> Any:
    """The meta of ``x`` if it is a dask array, else ``None``."""
    return meta_of(x) if isinstance(x, da.Array) else None


def collection_name(x) -> str:
    """The name of a dask collection's output keys: ``Array.name``; for a DataFrame its
    ``_name`` (the expression's name; dask DataFrames have no public accessor)."""
    return x.name if isinstance(x, da.Array) else x._name


def meta_of(x) -> Any:
    """A dask array's meta (an empty array of its block type). dask has no public accessor:
    ``Array._meta`` in both modes (``dask.array.utils.meta_from_array`` would build a new one)."""
    return x._meta


def rewrap(cls: type, x):
    """``x`` as an instance of ``cls``, a subclass of ``dask.array.Array`` (same graph/expression).

    Legacy mode: ``Array(dask, name, chunks, meta=)`` (the constructor of
    ``dask.array.core.Array``). Query planning: ``Array(expr)`` (the constructor of
    ``dask.array._array_expr._collection.Array``).
    """
    if QUERY_PLANNING:
        return cls(x.expr)
    return cls(x.dask, x.name, x.chunks, meta=meta_of(x))


def graph_name(x) -> str:
    """The name of ``x``'s blocks in the graph it computes (``(name, *block)`` keys).

    Equal to ``x.name`` in the legacy mode; under query planning the name of the lowered
    expression (lowering can replace an expression by its input, e.g. a no-op rechunk).
    """
    if QUERY_PLANNING:
        return x.expr.lower_completely()._name
    return x.name


def from_array_named(x, *, chunks, name: str, meta, asarray: bool | None = None):
    """:func:`dask.array.from_array` with the key name ``name`` (one task per block reads it).

    Under query planning ``from_array`` ignores ``name=`` (its ``FromArray`` expression
    names itself by hashing the array); a subclass that takes the name keeps the
    ``cosine-in-*`` prefix the dashboard shows, and never hashes the data. Array
    expressions are singletons by name there, so ``name`` must differ whenever ``x``,
    ``chunks`` or ``meta`` do.
    """
    if not QUERY_PLANNING:
        return da.from_array(x, chunks=chunks, asarray=asarray, name=name, meta=meta)
    from dask._collections import new_collection

    return new_collection(_named_from_array()(x, chunks, meta=meta, asarray=asarray, name=name))


# The expression classes below subclass private classes of dask's query-planning module,
# imported only when first used; they are module attributes (found by pickle through the
# module's ``__getattr__``) because a distributed scheduler unpickles the expressions it
# is sent and lowers them itself.


def _expr_class(name: str) -> Callable[[Callable[[], type]], Callable[[], type]]:
    """Cache the decorated factory's class and make it picklable as ``dask_cosim._compat.<name>``
    (``name`` must not be a real attribute of the module: its ``__getattr__`` builds it)."""

    def register(func: Callable[[], type]) -> Callable[[], type]:
        @functools.cache
        def make() -> type:
            cls = func()
            cls.__module__, cls.__name__, cls.__qualname__ = __name__, name, name
            return cls

        _EXPR_CLASSES[name] = make
        return make

    return register


_EXPR_CLASSES: dict[str, Callable[[], type]] = {}


def __getattr__(name: str):
    if name in _EXPR_CLASSES:
        return _EXPR_CLASSES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@_expr_class("NamedFromArray")
def _named_from_array() -> type:
    from dask.array._array_expr._io import FromArray  # query planning only

    class NamedFromArray(FromArray):
        _parameters = [*FromArray._parameters, "name"]
        _defaults = {**FromArray._defaults, "name": None}

        @functools.cached_property
        def _name(self) -> str:
            return self.operand("name")

        def __dask_tokenize__(self) -> str:
            return self.operand("name")

    return NamedFromArray


def normalize_chunks(chunks, shape):
    """dask's chunk normalisation (``-1``/``None`` one block, an int regular blocks, tuples checked).

    Upstream: ``dask.array.core.normalize_chunks``, documented in dask's array API reference
    but not re-exported by ``dask.array``; the same in both planning modes.
    """
    from dask.array.core import normalize_chunks as normalize

    return normalize(chunks, shape)


def block_slices(chunks):
    """A blockwise argument that hands each task the tuple of slices its block covers.

    ``dask.layers.ArraySliceDep`` (undocumented; both modes accept it in ``blockwise``):
    cheaper than ``block_info``, which builds a dictionary per block at graph time.
    """
    from dask.layers import ArraySliceDep

    return ArraySliceDep(chunks)


def map_blocks(func: Callable, *args, prefix: str, **kwargs):
    """:func:`dask.array.map_blocks` whose keys start with ``prefix`` (then a token).

    Legacy mode: ``token=prefix`` (there ``name=`` is the whole key name). Query planning:
    ``name=prefix`` (``token=`` warns "moved to name=" and ``name`` is the prefix).
    """
    if QUERY_PLANNING:
        return da.map_blocks(func, *args, name=prefix, **kwargs)
    return da.map_blocks(func, *args, token=prefix, **kwargs)


def column_blocks(x, axis: int, blocks: slice):
    """The blocks ``blocks`` (a slice of block numbers) of ``x`` along ``axis``.

    ``Array.blocks`` in the legacy mode (aliases, no tasks); under query planning, which
    has no ``.blocks``, the equivalent element slice.
    """
    index = [slice(None)] * x.ndim
    if not QUERY_PLANNING:
        index[axis] = blocks
        return x.blocks[tuple(index)]
    starts = np.concatenate([[0], np.cumsum(x.chunks[axis])]).astype(int)
    first, stop, _ = blocks.indices(len(x.chunks[axis]))
    index[axis] = slice(int(starts[first]), int(starts[stop]))
    return x[tuple(index)]


def tree_reduce(x, aggregate, axis, keepdims, dtype, *, split_every, combine, name: str, concatenate: bool):
    """dask's tree reduction of ``x``'s blocks without a chunk step of its own.

    ``dask.array.reductions._tree_reduce`` (positional ``x, aggregate, axis, keepdims,
    dtype``; the query-planning module re-exports its own with the same signature).
    ``dask.array.reduction`` would add a ``chunk`` layer per block, which the legacy
    optimiser fuses into the input's tasks and renames them after the reduction.
    """
    from dask.array.reductions import _tree_reduce

    return _tree_reduce(
        x, aggregate, axis, keepdims, dtype, split_every=split_every, combine=combine, name=name,
        concatenate=concatenate,
    )  # fmt: skip


def array_from_graph(
    name: str,
    layers: Mapping[str, tuple[dict, set[str]]],
    collections: Sequence,
    chunks: tuple[tuple[int, ...], ...],
    meta,
    described: Mapping[str, tuple[tuple[tuple[int, ...], ...], Any]] | None = None,
):
    """An array whose blocks are the tasks ``(name, *block)`` of hand-built layers.

    ``layers`` maps a layer name to ``(tasks, names of the layers those tasks read)``;
    ``collections`` are the dask collections the tasks read (by :func:`graph_name` keys).
    ``described`` gives ``(chunks, dtype)`` of layers whose blocks are arrays, shown as
    block metadata by graph inspection (legacy ``Layer.collection_annotations``).

    Legacy mode: a ``HighLevelGraph`` of ``MaterializedLayer`` s (annotations set by
    ``dask.annotate`` around the call are kept) and ``dask.array.Array(graph, name,
    chunks, meta=)``. Query planning: a leaf expression holding the merged graph
    (``dask.array._array_expr._expr.ArrayExpr`` subclass, the role of its ``FromGraph``,
    which would add a renamed alias per output block and hash the whole graph).
    """
    if QUERY_PLANNING:
        graph: dict = {}
        for collection in collections:
            graph.update(collection.__dask_graph__())
        for tasks, _ in layers.values():
            graph.update(tasks)
        from dask._collections import new_collection

        blocks = {
            layer: (tuple(map(tuple, c)), np.dtype(dtype)) for layer, (c, dtype) in (described or {}).items()
        }
        return new_collection(_graph_array()(name, graph, tuple(map(tuple, chunks)), meta, blocks))
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    all_layers: dict = {}
    deps: dict = {}
    for collection in collections:
        graph = collection.__dask_graph__()
        all_layers.update(graph.layers)
        deps.update({k: set(v) for k, v in graph.dependencies.items()})
    for layer, (tasks, needs) in layers.items():
        all_layers[layer] = MaterializedLayer(tasks)
        deps[layer] = set(needs)
    hlg = HighLevelGraph(all_layers, deps)
    for layer, (layer_chunks, dtype) in (described or {}).items():
        hlg.layers[layer].collection_annotations = {
            "type": "dask.array.core.Array",
            "chunks": tuple(tuple(c) for c in layer_chunks),
            "chunksize": tuple(max(c) for c in layer_chunks),
            "dtype": np.dtype(dtype),
        }
    return da.Array(hlg, name, chunks, meta=meta)


@_expr_class("GraphArray")
def _graph_array() -> type:
    from dask.array._array_expr._expr import ArrayExpr  # query planning only

    class GraphArray(ArrayExpr):
        """A leaf array expression that owns its tasks (no inputs to optimise through)."""

        _parameters = ["name", "graph", "block_chunks", "meta", "described"]
        _defaults = {"described": None}

        @functools.cached_property
        def _name(self) -> str:
            return self.operand("name")

        def __dask_tokenize__(self) -> str:
            return self.operand("name")

        @functools.cached_property
        def _meta(self):
            return self.operand("meta")

        @functools.cached_property
        def chunks(self):
            return self.operand("block_chunks")

        def dependencies(self) -> list:
            return []

        @property
        def layer_blocks(self) -> dict:
            """``(chunks, dtype)`` of the layers whose blocks are arrays (for graph inspection)."""
            return dict(self.operand("described") or {})

        def _layer(self) -> dict:
            return dict(self.operand("graph"))

        def __str__(self) -> str:
            return f"GraphArray({self._name})"

    return GraphArray


# --------------------------------------------------------------------------- graphs and delayed


def graph_from_collections(name: str, tasks: dict, dependencies: Iterable, priority=None):
    """A ``HighLevelGraph`` of ``tasks`` (layer ``name``) over the graphs of ``dependencies``.

    ``HighLevelGraph.from_collections`` (documented, but array collections of the
    query-planning mode hand it a plain dict without their annotations). ``priority``:
    a function ``key -> priority`` applied under query planning to the tasks of
    ``dependencies`` (their own ``dask.annotate`` priorities are lost there).
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    dependencies = list(dependencies)
    if QUERY_PLANNING and priority is not None and dependencies:
        merged: dict = {}
        for collection in dependencies:
            merged.update(collection.__dask_graph__())
        inputs = f"{name}-inputs"
        layers = {
            inputs: MaterializedLayer(merged, annotations={"priority": priority}),
            name: MaterializedLayer(tasks),
        }
        return HighLevelGraph(layers, {inputs: set(), name: {inputs}})
    return HighLevelGraph.from_collections(name, tasks, dependencies=dependencies)


def delayed_from_graph(key, graph, layer: str | None = None):
    """A ``Delayed`` for ``key`` of ``graph``: the constructor ``dask.delayed.Delayed(key,
    dsk, layer=)`` (undocumented; ``dask.delayed`` only wraps functions and values)."""
    from dask.delayed import Delayed

    return Delayed(key, graph, layer=layer)


def map_partitions(frame, func: Callable, *args, prefix: str, meta, **kwargs):
    """``frame.map_partitions(func, *args, **kwargs)``, one task per partition, keys named
    ``prefix-<token>``; ``meta`` describes the result (``func`` is never called on it) and
    the tasks return what ``func`` returns (no metadata enforcement).

    ``token=``: an undocumented keyword of dask-expr's ``map_partitions``, the head of the
    result's name (the documented API names the keys after the function).
    """
    return frame.map_partitions(
        func, *args, meta=meta, token=prefix, enforce_metadata=False, transform_divisions=False,
        clear_divisions=True, **kwargs,
    )  # fmt: skip


def frame_from_graph(graph, meta, divisions, keys, prefix: str):
    """A dask DataFrame whose partitions are ``keys`` of ``graph``, renamed ``prefix-<token>``.

    ``dask.dataframe.from_graph`` (undocumented; exported since dask-expr became the
    default). ``from_delayed`` would cull the whole graph once per partition.
    """
    import dask.dataframe as dd

    return dd.from_graph(dict(graph), meta, divisions, keys, prefix)


# --------------------------------------------------------------------------- schedulers


def local_scheduler(collection, scheduler=None) -> bool:
    """Whether computing ``collection`` now runs its tasks in this process's threads (the
    threaded or synchronous scheduler), as ``compute(scheduler=scheduler)`` would choose.

    ``dask.base.get_scheduler`` (undocumented) decides it from ``scheduler=``, the dask
    config, a default ``distributed`` client and the collection's default.
    """
    import dask.local
    import dask.threaded
    from dask.base import get_scheduler

    schedule = get_scheduler(scheduler=scheduler, collections=[collection])
    return schedule in (dask.threaded.get, dask.local.get_sync)


def _data_node() -> type | None:
    try:  # dask >= 2024.12: tasks are dask._task_spec objects; blockwise passes functions as DataNode
        from dask._task_spec import DataNode as node
    except ImportError:  # pragma: no cover - older dask: tasks are tuples, walked as containers
        return None
    return node


#: ``dask._task_spec.DataNode`` (a literal inside a task), ``None`` on dask without it.
DataNode = _data_node()


def fail_tasks(scheduler, keys: Iterable, exception: BaseException, stimulus_id: str) -> None:
    """Move the tasks ``keys`` to ``erred`` with ``exception`` (what ``compute`` then raises).

    ``Scheduler.transition`` / ``Scheduler.transitions`` of distributed's scheduler state
    machine (documented as internals, no public API fails a task from a plugin).
    """
    import pickle

    payload = pickle.dumps(exception)
    recommendations: dict = {}
    for key in keys:
        recommendations.update(
            scheduler.transition(key, "erred", exception=payload, cause=key, stimulus_id=stimulus_id)
        )
    scheduler.transitions(recommendations, stimulus_id)


def worker_knows(dask_worker, keys) -> int:
    """How many of ``keys`` a worker still holds or runs: its ``state.tasks`` (the worker
    state machine's table, no public accessor)."""
    tasks = dask_worker.state.tasks
    return sum(1 for key in keys if key in tasks)


def scheduler_address(client) -> str | None:
    """The address of the scheduler a ``distributed.Client`` talks to (``client.scheduler``
    is the client's connection object, its ``address`` undocumented), without a call."""
    try:
        return client.scheduler.address
    except AttributeError:
        return None


def cluster_state(client) -> tuple | None:
    """The cluster-wide totals (workers, threads, memory) a synchronous ``distributed.Client``
    last heard from its scheduler, ``None`` when it has none; reading them sends nothing.

    The client refreshes them itself (``distributed.client.scheduler-info-interval``)
    into ``Client._scheduler_identity`` (private); ``Client.scheduler_info()`` would ask
    the scheduler.
    """
    info = getattr(client, "_scheduler_identity", None)
    if not info:
        return None
    totals = (info.get("n_workers"), info.get("total_threads"), info.get("total_memory"))
    if all(v is None for v in totals):
        return None
    return (info.get("id"), *totals)


def nprocesses_nthreads(cores: int) -> tuple[int, int]:
    """distributed's split of ``cores`` into worker processes and threads (``LocalCluster``'s
    default): ``distributed.deploy.utils.nprocesses_nthreads`` (undocumented)."""
    from distributed.deploy.utils import nprocesses_nthreads as split

    return split(cores)


def parse_memory_limit(limit, nthreads: int, total_cores: int) -> int | None:
    """A worker ``memory_limit`` ("auto", "4 GiB", a fraction, bytes) in bytes, as distributed
    reads it: ``distributed.worker_memory.parse_memory_limit`` (undocumented)."""
    import logging

    from distributed.worker_memory import parse_memory_limit as parse

    return parse(limit, nthreads, total_cores=total_cores, logger=logging.getLogger("dask_cosim"))


def system_memory_limit() -> int:
    """The memory this process may use (cgroups/rlimit aware): ``distributed.system.MEMORY_LIMIT``."""
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def check_scheduler_address(address: str) -> None:
    """Raise ``ValueError``/``TypeError`` unless distributed can connect to ``address``
    (scheme known, host and port well formed): ``distributed.comm.registry.get_backend``
    and the backend's ``get_address_host_port`` (undocumented)."""
    from distributed.comm import parse_address, registry

    scheme, location = parse_address(address)
    backend = registry.get_backend(scheme)
    if scheme != "inproc":
        host, port = backend.get_address_host_port(location)
        if not host or not 0 < int(port) < 65536:
            raise ValueError(f"port {port} out of range" if host else "no host")


def task_group_graph() -> type | None:
    """The dashboard's ``/groups`` component, ``distributed.dashboard.components.scheduler.
    TaskGroupGraph`` (internal; :mod:`dask_cosim._dashboard` fixes its layout), or ``None``
    without bokeh."""
    try:
        from distributed.dashboard.components.scheduler import TaskGroupGraph
    except ImportError:
        return None
    return TaskGroupGraph


# --------------------------------------------------------------------------- zarr


def zarr_key_exists(array, key: str) -> bool:
    """Whether the store of a ``zarr.Array`` holds ``key`` (a chunk or shard key).

    zarr 3 stores are asynchronous; ``zarr.core.sync.sync`` runs a coroutine on zarr's own
    event loop (internal; no public synchronous ``exists``).
    """
    from zarr.core.sync import sync

    return bool(sync((array.store_path / key).exists()))


def block_delayeds(x) -> np.ndarray:
    """An object array of one ``Delayed`` per block of ``x`` (unoptimised graph).

    ``Array.to_delayed(optimize_graph=False)`` in the legacy mode; query planning has no
    ``to_delayed``: ``Delayed(key, graph, layer=)`` over the lowered graph as one
    ``HighLevelGraph`` layer, all blocks sharing it (merging the blocks' graphs merges it once).
    Computing some of the blocks runs only what they need (dask culls the graph to them).
    """
    if not QUERY_PLANNING:
        return x.to_delayed(optimize_graph=False)
    from dask.highlevelgraph import HighLevelGraph

    name = graph_name(x)
    # one layer shared by all blocks: computing many of them merges it once, where a plain
    # dict would be copied once per block (dask wraps each Delayed's dict in a layer of its own)
    graph = HighLevelGraph.from_collections(name, dict(x.__dask_graph__()), dependencies=())
    out = np.empty(x.numblocks, dtype=object)
    for index in np.ndindex(*x.numblocks):
        out[index] = delayed_from_graph((name, *index), graph, layer=name)
    return out
