"""What the product and reduction graphs share: :class:`Prepared`, built by :func:`dask_cosim.core.prepare`.

Its own module so that the graph builders (:mod:`dask_cosim._result`,
:mod:`dask_cosim._triangle`, the reductions) depend on it and not on the public API module
:mod:`dask_cosim.core`, which imports them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import dask.array as da
import numpy as np

from ._backend import gpu_available
from ._compat import block_slices
from ._plan import Plan
from ._resources import annotate_for, routed
from ._scaled import RawBlock

__all__ = ["Prepared", "RawInputs"]


@dataclass(frozen=True)
class RawInputs:
    """The raw input blocks (plan-aligned dask arrays, indexed as ``an``/``bn``) that the
    products of a graph where every input block feeds one product normalise themselves,
    with the keywords of :func:`~dask_cosim._kernels.normalize_rows` for each."""

    a: da.Array
    b: da.Array
    norm_a: dict
    norm_b: dict


@dataclass(frozen=True)
class Prepared:
    """Everything the product and reduction graphs share.

    ``an``/``bn`` are the normalised inputs as dask arrays (each block normalised by its
    own ``cosine-normalize`` task), indexed by ``a_index``/``b_index`` in
    :func:`dask.array.blockwise` notation (``k`` batch, ``i`` rows of a, ``j`` rows of b,
    ``d`` vector axis); the output is indexed by ``out_index``.
    """

    an: da.Array
    bn: da.Array
    a_index: str
    b_index: str
    out_index: str
    out_shape: tuple[int, ...]
    out_dtype: np.dtype
    compute_dtype: np.dtype
    plan: Plan
    device: str
    blas_threads: int | None
    self_similar: bool
    on_device: bool  # inputs are CuPy arrays: keep CuPy chunks
    precision: str = "float32"  # product precision (see similarity_block)
    like: str = "numpy"  # output blocks on the host ("numpy") or left on the device ("cupy")
    #: No input is a dask array: every layer of the graph is this package's own (inputs
    #: read block by block, normalise and product tasks), which dask's graph optimisation
    #: has nothing to fuse or cull in.
    own_graph: bool = False
    #: Set when every input block feeds exactly one product: :meth:`pair_blockwise` then
    #: reads the raw blocks and each product normalises its own (no normalise tasks, each
    #: input read from memory once; :class:`~dask_cosim._scaled.RawBlock`).
    raw: RawInputs | None = None

    @property
    def meta(self):
        """Output meta: NumPy unless ``like="cupy"`` and this process can build CuPy meta."""
        cupy_meta = self.like == "cupy" and (self.on_device or gpu_available())
        return _meta(cupy_meta, len(self.out_index), self.out_dtype)

    def pair_blockwise(self, func, *extra, bn: da.Array | None = None, **kwargs) -> da.Array:
        """:func:`dask.array.blockwise` of ``func(an_block, bn_block, *extra_blocks, **kwargs)``
        over every pair of normalised blocks, one task per output block (``out_index``).

        Tasks are marked for GPU workers when ``device="gpu"``; ``bn`` replaces the
        normalised ``b`` (for instance some of its column blocks). With :attr:`raw`
        (and no ``bn``) ``func`` gets the raw blocks as
        :class:`~dask_cosim._scaled.RawBlock` instead.
        """
        with warnings.catch_warnings(), annotate_for(self.device):
            # an outer product has more output blocks than input blocks by design
            warnings.simplefilter("ignore", da.PerformanceWarning)
            if self.raw is not None and bn is None:
                raw = self.raw
                return da.blockwise(
                    routed(partial(_on_raw_blocks, func, raw.norm_a, raw.norm_b), self.device),
                    self.out_index,
                    raw.a,
                    self.a_index,
                    raw.b,
                    self.b_index,
                    # where each block lies (batch, rows), for error messages
                    block_slices(raw.a.chunks[:-1]),
                    self.a_index[:-1],
                    block_slices(raw.b.chunks[:-1]),
                    self.b_index[:-1],
                    *extra,
                    concatenate=False,
                    **{"align_arrays": False, **kwargs},  # the plan aligned both inputs
                )
            return da.blockwise(
                routed(partial(_on_whole_vectors, func), self.device),
                self.out_index,
                self.an,
                self.a_index,
                self.bn if bn is None else bn,
                self.b_index,
                *extra,
                concatenate=False,  # True would copy both blocks in every task (see below)
                **kwargs,
            )

    def product_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`similarity_block` for this graph."""
        return {
            "out_dtype": self.out_dtype.name,
            "device": self.device,
            "blas_threads": self.blas_threads,
            "like": "input" if self.like == "cupy" else "numpy",
            "precision": self.precision,
        }


def _on_whole_vectors(func, an_blocks: list, bn_blocks: list, *extra, **kwargs):
    """``func(an, bn, *extra, **kwargs)`` on the single block of each input along D.

    Blockwise hands a task the blocks along the contracted vector axis as a list; D is
    never split, so each list holds one block. (``concatenate=True`` would unwrap it too,
    but through ``concatenate3``, which copies even a single block into fresh memory:
    both inputs once more per product task; README: Performance.)
    """
    (an,), (bn,) = an_blocks, bn_blocks
    return func(an, bn, *extra, **kwargs)


def _on_raw_blocks(func, norm_a: dict, norm_b: dict, a_blocks, b_blocks, a_where, b_where, *extra, **kwargs):
    """``func(RawBlock(a), RawBlock(b), *extra, **kwargs)`` on the single block of each raw
    input along D, each with its normalise keywords and where it lies (as
    ``core._normalize_task`` gets them)."""
    (a,), (b,) = a_blocks, b_blocks
    return func(
        RawBlock(a, _placed(norm_a, a_where)), RawBlock(b, _placed(norm_b, b_where)), *extra, **kwargs
    )


def _placed(norm: dict, where: tuple[slice, ...]) -> dict:
    """``norm`` with ``offset`` (the global batch and row of the block's first vector, from
    its ``(batch, rows)`` or ``(rows,)`` slices) and ``batched``."""
    batched = len(where) == 2
    offset = (where[0].start, where[1].start) if batched else (0, where[0].start)
    return {**norm, "offset": offset, "batched": batched}


def _meta(on_device: bool, ndim: int, dtype):
    if on_device:
        import cupy

        return cupy.empty((0,) * ndim, dtype=dtype)
    return np.empty((0,) * ndim, dtype=dtype)
