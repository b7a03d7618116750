"""dask.config defaults for dask_cosim (keys under ``cosine.``), read from ``cosine.yaml``."""

from __future__ import annotations

import os

import dask.config
import yaml
from dask.utils import parse_bytes

_fn = os.path.join(os.path.dirname(__file__), "cosine.yaml")
with open(_fn) as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)


def max_task_memory() -> int:
    """The per-task memory budget in bytes (``cosine.max-task-memory``)."""
    value = dask.config.get("cosine.max-task-memory")
    try:
        return parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"dask config cosine.max-task-memory: expected bytes like '4GiB', received {value!r}"
        ) from err


def target_block_bytes() -> int:
    """Desired output block size in bytes (dask's ``array.chunk-size``)."""
    value = dask.config.get("array.chunk-size")
    return parse_bytes(value) if isinstance(value, str) else int(value)


def blas_threads_setting() -> int | None:
    """``cosine.blas-threads`` as an int, or ``None`` for "auto"."""
    value = dask.config.get("cosine.blas-threads", "auto")
    if value in (None, "auto"):
        return None
    return max(1, int(value))
