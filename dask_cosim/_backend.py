"""Where a block runs: the array namespace, the GPU check, host copies and BLAS threads.

Everything here is decided inside the task, on the worker that runs it, so a cluster
that mixes GPU and CPU workers computes correctly either way.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["gpu_available", "block_namespace", "to_numpy", "blas_threads_for_task", "limit_blas"]


def _probe_gpu() -> bool:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        cupy.zeros(1).sum().item()  # a real allocation and kernel launch
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return False


@functools.lru_cache(maxsize=1)
def _cached_probe() -> bool:
    return _probe_gpu()


#: The availability check; tests replace it (``monkeypatch.setattr``) to simulate
#: "cupy missing", "cupy without device" and "device present".
gpu_check: Callable[[], bool] = _cached_probe


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device is usable in this process (cached, never raises)."""
    try:
        return bool(gpu_check())
    except Exception:  # noqa: BLE001
        return False


class NoGPUError(RuntimeError):
    """``device="gpu"`` was requested on a worker that has no usable GPU."""


def is_device_array(x) -> bool:
    return array_api_compat.is_cupy_array(x)


def block_namespace(x, device: str):
    """Return ``(xp, x)``: the namespace a block runs with, and the block moved there.

    ``device="cpu"`` always runs on NumPy (device arrays are copied to host),
    ``"gpu"`` on CuPy (raising :class:`NoGPUError` without a GPU), ``"auto"`` on CuPy
    when the input already is a CuPy array or this worker has a usable GPU. Any other
    array-API array (e.g. ``array_api_strict``) runs in its own namespace.
    """
    if device == "cpu":
        x = to_numpy(x)
    elif device == "gpu" or (
        device == "auto" and not is_device_array(x) and _is_numpy(x) and gpu_available()
    ):
        if not is_device_array(x):
            if not gpu_available():
                raise NoGPUError(
                    "device='gpu' but this worker has no usable CUDA GPU (cupy missing, no "
                    "device visible, or CUDA failed to initialise); use device='auto' or 'cpu', "
                    "or route the tasks to GPU workers (see README: GPU workers)"
                )
            import cupy

            x = cupy.asarray(x)
    return array_api_compat.array_namespace(x), x


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def to_numpy(x) -> np.ndarray:
    """Host copy of any supported array (NumPy, CuPy, array-API arrays); NumPy is returned as is."""
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        return x.get()
    return np.asarray(x)


def to_host_like(x, like: str):
    """Return ``x`` as NumPy (``like="numpy"``) or leave it where it is (``"input"``)."""
    return to_numpy(x) if like == "numpy" else x


# --------------------------------------------------------------------------- BLAS threads


def _dask_threads_here() -> int:
    """How many dask tasks may run at once in this process."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        pass
    if multiprocessing.parent_process() is not None:
        return os.cpu_count() or 1  # a process-pool worker: one task per process
    if threading.current_thread() is threading.main_thread():
        return 1  # the synchronous scheduler
    import dask.config

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def blas_threads_for_task(setting: int | None = None) -> int:
    """BLAS threads for one task so that dask threads x BLAS threads <= cores."""
    if setting:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // _dask_threads_here())


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list | None = None


@functools.lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def limit_blas(threads: int) -> Iterator[None]:
    """Limit BLAS to ``threads`` while any block task of this process runs.

    BLAS thread counts are process-global, so concurrent tasks share one reference-
    counted limit: the first task in sets it, the last task out restores the
    previous setting. Users' own NumPy code after ``compute()`` is unaffected.
    """
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            ctl = _controller().select(user_api="blas")
            _blas_saved = [(lib, lib.num_threads) for lib in ctl.lib_controllers]
            for lib, current in _blas_saved:
                if current != threads:
                    lib.set_num_threads(threads)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved is not None:
                for lib, previous in _blas_saved:
                    if lib.num_threads != previous:
                        lib.set_num_threads(previous)
                _blas_saved = None


def array_module_name(x: Any) -> str:
    """'numpy', 'cupy' or the array-API namespace's name, for messages and tests."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_device_array(x):
        return "cupy"
    return array_api_compat.array_namespace(x).__name__
