"""Optional dependencies, and the extra of ``pip install 'dask-cosim[EXTRA]'`` that brings each.

The core (``cosine_similarity``, ``topk``, ``pairs_above``, ``duplicate_groups``, the zarr
and Parquet writers, the ``dask-cosim`` command) needs only the package's own
dependencies; these features need more, and say which extra when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: module -> (extra, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "bokeh": ("dashboard", "the Dask dashboard"),
    "prometheus_client": ("dashboard", "the dashboard's /metrics page"),
    "scipy": ("sparse", "sparse inputs"),
    "cupy": ("gpu", "GPU blocks"),
}


def install_hint(module: str) -> str:
    """``pip install 'dask-cosim[EXTRA]'`` for the extra that brings ``module``.

    >>> install_hint("bokeh")
    "pip install 'dask-cosim[dashboard]'"
    """
    return f"pip install 'dask-cosim[{EXTRAS[module.split('.')[0]][0]}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an ``ImportError`` naming the extra to install.

    >>> require("numpy", "anything").__name__
    'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        raise ImportError(f"{feature} needs {top}, which is not installed: {install_hint(top)}") from err
