"""What a lazy result was computed from, so writers can record it next to the data.

Results are plain dask arrays/dataframes, so the facts live in a registry keyed by the
result's dask name (a deterministic token of the whole computation).
"""

from __future__ import annotations

import os
from typing import Any

_REGISTRY: dict[str, dict[str, Any]] = {}


def describe_input(x: Any) -> dict[str, Any]:
    """Shape, dtype and, for paths/zarr arrays, where the input lives."""
    info: dict[str, Any] = {}
    if isinstance(x, (str, os.PathLike)):
        info["path"] = os.fspath(x)
    else:
        store = getattr(getattr(x, "store", None), "root", None)
        if store is not None:
            info["path"] = os.fspath(store) + ("/" + x.path if getattr(x, "path", "") else "")
    for key in ("shape", "dtype"):
        if hasattr(x, key):
            info[key] = list(x.shape) if key == "shape" else str(x.dtype)
    if _is_sparse(x):
        info["sparse"] = True  # its work is not 2 N M D (no dense-equivalent GFLOP/s)
    return info


def _is_sparse(x: Any) -> bool:
    from ._sparse import is_sparse, is_sparse_dask

    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x).endswith(".npz")
    return is_sparse(x) or is_sparse_dask(x)


_PLANS: dict[str, Any] = {}


def record(name: str, plan: Any = None, **facts: Any) -> None:
    """Remember ``facts`` (and the block plan) for the result whose dask name is ``name``."""
    _REGISTRY[name] = facts
    if plan is not None:
        _PLANS[name] = plan


def plan_of(name: str) -> Any:
    """The :class:`~dask_cosim._plan.Plan` the result ``name`` was built with, if known."""
    return _PLANS.get(name)


def lookup(name: str) -> dict[str, Any]:
    """Facts recorded for ``name`` (empty if the result was built elsewhere)."""
    return dict(_REGISTRY.get(name, {}))
