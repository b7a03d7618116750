"""dask_cosim: lazy, blocked cosine similarity of embedding sets with Dask.

>>> import numpy as np, dask_cosim as dcs
>>> S = dcs.cosine_similarity(np.ones((2, 3, 4)), np.ones((2, 5, 4)))
>>> S.shape
(2, 3, 5)
"""

from . import _config  # noqa: F401  (registers the cosine.* dask config defaults)
from ._backend import NoGPUError
from ._finite import NonFiniteError
from ._plan import PlanError
from ._resources import NoGPUWorkerError, ensure_gpu_routing
from ._version import __version__
from ._zarr_guard import InputChunkError
from ._zero_vector import ZeroVectorError
from .core import cosine_similarity
from .dedup import duplicate_groups
from .io import to_parquet, to_zarr
from .planning import JobPlan, plan
from .reductions import pairs_above, topk

__all__ = [
    "__version__",
    "cosine_similarity",
    "topk",
    "pairs_above",
    "plan",
    "JobPlan",
    "duplicate_groups",
    "to_zarr",
    "to_parquet",
    "PlanError",
    "ZeroVectorError",
    "NonFiniteError",
    "InputChunkError",
    "NoGPUError",
    "NoGPUWorkerError",
    "GPURouting",
    "ensure_gpu_routing",
]


def __getattr__(name: str):
    # GPURouting is a distributed SchedulerPlugin: made when first asked for, so that
    # ``import dask_cosim`` does not import distributed
    if name == "GPURouting":
        from ._resources import plugin_class

        return plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
