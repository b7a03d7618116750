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


def _bytes(key: str) -> int:
    value = dask.config.get(key)
    try:
        size = parse_bytes(value) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"dask config {key}: expected bytes like '4GiB', received {value!r}") from err
    if size <= 0:
        raise ValueError(f"dask config {key}: expected a positive size like '4GiB', received {value!r}")
    return size


def max_task_memory() -> int:
    """The per-task memory budget in bytes (``cosine.max-task-memory``)."""
    return _bytes("cosine.max-task-memory")


def gpu_block_bytes() -> int:
    """Target size of a block of S computed and kept or reduced on a GPU (``cosine.gpu-block-bytes``)."""
    return _bytes("cosine.gpu-block-bytes")


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


def task_flops() -> float:
    """Floating-point operations one reduction task aims at (``cosine.task-flops``)."""
    value = dask.config.get("cosine.task-flops")
    try:
        flops = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"dask config cosine.task-flops: expected a number like 1e11, received {value!r}"
        ) from err
    if not flops > 0 or flops == float("inf"):
        raise ValueError(f"dask config cosine.task-flops: expected a positive number, received {value!r}")
    return flops


def max_blocks() -> int:
    """Most product tasks an automatic plan may have (``cosine.max-blocks``)."""
    value = dask.config.get("cosine.max-blocks")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1 or value != int(value):
        raise ValueError(f"dask config cosine.max-blocks: expected a positive integer, received {value!r}")
    return int(value)


def progress_interval() -> float:
    """Seconds between two plain progress lines off a terminal (``cosine.progress-interval``)."""
    from dask.utils import parse_timedelta

    value = dask.config.get("cosine.progress-interval", "15s")
    try:
        seconds = parse_timedelta(value, default="s")
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"dask config cosine.progress-interval: expected a duration like '15s', received {value!r}"
        ) from err
    if not seconds or seconds <= 0:
        raise ValueError(
            f"dask config cosine.progress-interval: expected a positive duration, received {value!r}"
        )
    return float(seconds)
