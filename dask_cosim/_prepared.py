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
from ._plan import Plan
from ._resources import annotate_for, routed

__all__ = ["Prepared"]


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

    @property
    def meta(self):
        """Output meta: NumPy unless ``like="cupy"`` and this process can build CuPy meta."""
        cupy_meta = self.like == "cupy" and (self.on_device or gpu_available())
        return _meta(cupy_meta, len(self.out_index), self.out_dtype)

    def pair_blockwise(self, func, *extra, bn: da.Array | None = None, **kwargs) -> da.Array:
        """:func:`dask.array.blockwise` of ``func(an_block, bn_block, *extra_blocks, **kwargs)``
        over every pair of normalised blocks, one task per output block (``out_index``).

        Tasks are marked for GPU workers when ``device="gpu"``; ``bn`` replaces the
        normalised ``b`` (for instance some of its column blocks).
        """
        with warnings.catch_warnings(), annotate_for(self.device):
            # an outer product has more output blocks than input blocks by design
            warnings.simplefilter("ignore", da.PerformanceWarning)
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


def _meta(on_device: bool, ndim: int, dtype):
    if on_device:
        import cupy

        return cupy.empty((0,) * ndim, dtype=dtype)
    return np.empty((0,) * ndim, dtype=dtype)
