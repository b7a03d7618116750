"""The array :func:`~dask_cosim.cosine_similarity` returns: ``compute()`` writes blocks into the result.

``dask.array.Array.compute()`` computes every block into its own buffer, then concatenates
them into a newly allocated result: a serial copy of the whole output into fresh memory,
comparable to the products themselves (README: Performance).
When the scheduler runs the tasks in this process (threaded or synchronous),
:class:`SimilarityArray` instead allocates the result first and lets each product task write
its block straight into its region (``numpy.matmul(..., out=view)``); nothing is assembled
afterwards. On any other scheduler (a ``distributed`` cluster, processes), or for CuPy
output, ``compute()`` is dask's own. Everything else about the array is a plain
``dask.array.Array``: operations on it return plain dask arrays, computed by dask.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np

from ._compat import QUERY_PLANNING, block_slices, local_scheduler, meta_of, rewrap
from ._triangle import block_marker, product_into, similarity_triangle_into, use_triangle

if TYPE_CHECKING:
    from ._prepared import Prepared

__all__ = ["SimilarityArray"]


class SimilarityArray(da.Array):
    """A ``dask.array.Array`` of similarities whose ``compute()`` writes blocks in place.

    Returned by :func:`~dask_cosim.cosine_similarity`; ``isinstance(S, dask.array.Array)``
    holds and every dask operation works on it unchanged (returning plain dask arrays).

    Examples
    --------
    >>> import numpy as np, dask_cosim as dcs
    >>> S = dcs.cosine_similarity(np.eye(3), chunks=(1, 2))
    >>> type(S).__name__, S.compute().tolist()[1]
    ('SimilarityArray', [0.0, 1.0, 0.0])
    """

    @classmethod
    def wrap(cls, x: da.Array, prep: Prepared) -> SimilarityArray:
        """``x`` (the product graph built from ``prep``) as a :class:`SimilarityArray`."""
        out = rewrap(cls, x)
        out._prepared = prep
        return out

    @classmethod
    def one_task(cls, x: da.Array, run: Callable[[], np.ndarray]) -> SimilarityArray:
        """``x`` (a one-block array whose task is ``run``) as a :class:`SimilarityArray` whose
        ``compute()`` on the threaded or synchronous scheduler calls ``run`` in this thread
        (:mod:`dask_cosim._small`)."""
        out = rewrap(cls, x)
        out._run = run
        return out

    def compute(self, **kwargs: Any):
        """Compute the whole array into one NumPy (or CuPy) array.

        Takes the keywords of :meth:`dask.array.Array.compute` (``scheduler=``,
        ``optimize_graph=``, scheduler options). With the threaded or synchronous
        scheduler and NumPy output, the result is allocated first and each block is
        written into it by its own task (no assembly copy; peak memory is the result
        plus the blocks in flight, not the result twice), and without
        ``optimize_graph=`` a graph with no dask-array input skips dask's graph
        optimisation (nothing in it to fuse or cull); otherwise dask's compute.
        A small call's one-task array (:mod:`dask_cosim._small`) runs its task in this
        thread instead, when only ``scheduler=`` is given.
        """
        run = getattr(self, "_run", None)
        if run is not None and _only_scheduler(kwargs) and local_scheduler(self, kwargs.get("scheduler")):
            return run()  # one task: nothing to schedule
        if not self._writes_in_place(kwargs.get("scheduler")):
            return super().compute(**kwargs)
        result = np.empty(self.shape, dtype=self.dtype)
        dask.compute(self._written_into(result), **self._local_options(kwargs))  # one-element markers
        return result

    if QUERY_PLANNING:  # dask's expression-backed arrays have no __array__ nor store(): this one does

        def __array__(self, dtype=None, copy=None):
            """``numpy.asarray(S)`` computes ``S`` (as ``dask.array.Array.__array__`` does in the
            legacy mode)."""
            x = self.compute()
            return x if dtype is None else x.astype(dtype, copy=False)

        def store(self, target, lock: bool = False, compute: bool = True, **kwargs: Any) -> None:
            """Write every block into ``target`` (``target[region] = block``), as dask's
            ``Array.store(target, lock=False)`` does in its legacy array mode.

            Blocks are computed on the threaded or synchronous scheduler (the tasks write
            into ``target`` in this process); a C-contiguous NumPy ``target`` of the
            array's shape and dtype is written in place by the product tasks themselves.
            Takes ``scheduler=`` and scheduler options; ``lock`` and ``compute`` only
            take their default (``False``, ``True``).
            """
            if lock is not False or compute is not True:
                raise NotImplementedError(
                    "SimilarityArray.store under dask's array query planning supports only "
                    "lock=False and compute=True"
                )
            if not local_scheduler(self, kwargs.get("scheduler")):
                raise ValueError(
                    "SimilarityArray.store writes from tasks of this process: use the threaded or "
                    "synchronous scheduler (scheduler='threads'), or compute() on a cluster"
                )
            run = getattr(self, "_run", None)
            if run is not None and _only_scheduler(kwargs):
                target[...] = run()
                return
            dask.compute(self._written_into(target), **self._local_options(kwargs))

    def _local_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` for computing this array's own graph in this process: unless the
        caller says otherwise, no graph optimisation where the graph is all this package's
        (:attr:`Prepared.own_graph`): its layers are already one task per block, and
        optimising them would only delay the first task."""
        prep = getattr(self, "_prepared", None)
        if prep is not None and prep.own_graph:
            return {"optimize_graph": False, **kwargs}
        return kwargs

    def _writes_in_place(self, scheduler) -> bool:
        """Whether this compute can write into one result buffer of this process."""
        prep = getattr(self, "_prepared", None)
        if prep is None or type(meta_of(self)) is not np.ndarray or 0 in self.shape:
            return False
        return local_scheduler(self, scheduler)

    def _written_into(self, result) -> da.Array:
        """A graph whose tasks write this array's blocks into ``result``; its own blocks are
        one-element markers (one per block of this array), so computing it copies nothing.

        A NumPy ``result`` of this array's shape and dtype is written by the product tasks
        (``matmul(..., out=view)``; for a self-similarity, the blocks below the diagonal are
        then transposed region to region, :func:`~dask_cosim._triangle.similarity_triangle_into`);
        anything else gets each computed block assigned (``result[region] = block``).
        """
        prep: Prepared | None = getattr(self, "_prepared", None)
        target = _Target(result)
        index = "kij"[-self.ndim :]
        markers = {axis: 1 for axis in index}
        meta = np.empty((0,) * self.ndim, dtype=bool)
        in_place = (
            isinstance(result, np.ndarray) and result.shape == self.shape and result.dtype == self.dtype
        )
        if prep is not None and in_place and use_triangle(prep):
            return similarity_triangle_into(prep, target)
        if prep is None or not in_place:
            return da.blockwise(
                _store_into, index, self, index, block_slices(self.chunks), index,
                token="store-map", align_arrays=False, adjust_chunks=markers,
                dtype=bool, meta=meta, target=target,
            )  # fmt: skip
        return prep.pair_blockwise(
            product_into,
            block_slices(self.chunks),
            index,
            token="cosine-block",  # ``target`` (tokenised by identity) makes the name unique
            adjust_chunks=markers,
            dtype=bool,
            meta=meta,
            align_arrays=False,  # the plan aligned an and bn already
            target=target,
            **prep.product_kwargs(),
        )


def _only_scheduler(kwargs: dict[str, Any]) -> bool:
    """Whether ``compute(**kwargs)`` asks for nothing but (perhaps) a scheduler: other
    keywords (``optimize_graph``, scheduler options) go to dask's compute."""
    return kwargs.keys() <= {"scheduler"}


class _Target:
    """The result buffer in the graph: tokenised by identity (hashing its bytes would
    read, and so fault in, the whole uninitialised result before a task runs)."""

    def __init__(self, array):
        self.array = array
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token

    def __setitem__(self, region, block) -> None:
        self.array[region] = block


def _store_into(block, region, *, target: _Target) -> np.ndarray:
    """Copy one computed block into ``target`` at ``region``."""
    target[region] = block
    return block_marker(len(region))
