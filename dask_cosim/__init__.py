"""dask_cosim: lazy, blocked cosine similarity of embedding sets with Dask.

>>> import numpy as np, dask_cosim as dcs
>>> S = dcs.cosine_similarity(np.ones((2, 3, 4)), np.ones((2, 5, 4)))
>>> S.shape
(2, 3, 5)

``import dask_cosim`` loads only dask's configuration (it registers the ``cosine.*``
defaults); each public name imports its module when first used (PEP 562), so a command
line or a script that never builds an array does not pay for ``dask.array``, and nothing
loads ``dask.dataframe``, ``pyarrow``, ``distributed`` or ``bokeh`` until a feature
needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _config  # noqa: F401  (registers the cosine.* dask config defaults)
from ._version import __version__

#: Public name -> the module that defines it (imported on first use).
_HOMES = {
    "cosine_similarity": ".core",
    "topk": ".reductions",
    "pairs_above": ".reductions",
    "plan": ".planning",
    "JobPlan": ".planning",
    "duplicate_groups": ".dedup",
    "to_zarr": ".io",
    "to_parquet": ".io",
    "PlanError": "._plan",
    "ZeroVectorError": "._zero_vector",
    "NonFiniteError": "._finite",
    "InputChunkError": "._zarr_guard",
    "NoGPUError": "._backend",
    "NoGPUWorkerError": "._resources",
    "ensure_gpu_routing": "._resources",
}

__all__ = ["__version__", *_HOMES, "GPURouting"]

if TYPE_CHECKING:  # what static tools see; at run time the names load on first use
    from ._backend import NoGPUError as NoGPUError
    from ._finite import NonFiniteError as NonFiniteError
    from ._plan import PlanError as PlanError
    from ._resources import GPURouting as GPURouting
    from ._resources import NoGPUWorkerError as NoGPUWorkerError
    from ._resources import ensure_gpu_routing as ensure_gpu_routing
    from ._zarr_guard import InputChunkError as InputChunkError
    from ._zero_vector import ZeroVectorError as ZeroVectorError
    from .core import cosine_similarity as cosine_similarity
    from .dedup import duplicate_groups as duplicate_groups
    from .io import to_parquet as to_parquet
    from .io import to_zarr as to_zarr
    from .planning import JobPlan as JobPlan
    from .planning import plan as plan
    from .reductions import pairs_above as pairs_above
    from .reductions import topk as topk


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home, __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    # GPURouting is a distributed SchedulerPlugin: made when first asked for, so that
    # ``import dask_cosim`` does not import distributed
    if name == "GPURouting":
        from ._resources import plugin_class

        return plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
