"""Where a block runs: the array namespace, the GPU check, host copies and BLAS threads.

Everything here is decided inside the task, on the worker that runs it, so a cluster
that mixes GPU and CPU workers computes correctly either way.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["gpu_available", "block_namespace", "to_numpy", "blas_threads_for_task", "limit_blas"]


def _import_cupy():
    import cupy

    return cupy


def _probe_gpu(import_cupy: Callable[[], Any] = _import_cupy) -> bool:
    """True when ``cupy`` imports, sees a CUDA device and can run a kernel; never raises.

    ``import_cupy`` is injectable so tests can exercise "cupy missing" (it raises
    ``ImportError``) and "cupy present but no device" (the runtime reports 0 devices or
    fails) without touching CuPy's arithmetic.
    """
    try:
        cupy = import_cupy()
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


def gpu_fallback_allowed() -> bool:
    """``cosine.gpu-fallback`` (dask config, read on the worker; default False).

    When true, a ``device="gpu"`` block on a worker without a usable GPU runs on NumPy
    (a warning is logged once per process) instead of raising :class:`NoGPUError`.
    """
    import dask.config

    value = dask.config.get("cosine.gpu-fallback", False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def choose_backend(x, device: str, available: bool | None = None) -> str:
    """Where one block runs: ``"numpy"``, ``"cupy"`` or ``"native"`` (its own array-API namespace).

    ``available`` is this worker's GPU availability (default: :func:`gpu_available`).
    ``device="cpu"`` always runs on NumPy. CuPy blocks stay on CuPy under ``"auto"`` and
    ``"gpu"``. Host blocks run on CuPy when a GPU is usable; otherwise ``"auto"`` uses
    NumPy and ``"gpu"`` raises :class:`NoGPUError` (or falls back to NumPy when
    ``cosine.gpu-fallback`` is set). Other array-API arrays (e.g. ``array_api_strict``)
    run in their own namespace under ``"auto"``.

    Examples
    --------
    >>> choose_backend(np.ones(2), "auto", available=False)
    'numpy'
    >>> choose_backend(np.ones(2), "auto", available=True)
    'cupy'
    """
    if device == "cpu":
        return "numpy"
    if is_device_array(x):
        return "cupy"
    if device == "auto" and not _is_numpy(x):
        return "native"
    if available is None:
        available = gpu_available()
    if available:
        return "cupy"
    if device == "auto":
        return "numpy"
    if gpu_fallback_allowed():
        _warn_fallback_once()
        return "numpy"
    raise NoGPUError(
        "device='gpu' but this worker has no usable CUDA GPU (cupy missing: pip install "
        "'dask-cosim[gpu]'; no device visible; or CUDA failed to initialise); use device='auto' "
        "or 'cpu', route the tasks to GPU workers (dask worker --resources GPU=1; README: GPU workers), or "
        "set the dask config cosine.gpu-fallback=True to run such blocks on NumPy"
    )


_fallback_warned = False


def _warn_fallback_once() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        import logging

        logging.getLogger("dask_cosim").warning(
            "device='gpu' block on a worker without a usable GPU: running on NumPy "
            "(cosine.gpu-fallback is set)"
        )


def block_namespace(x, device: str):
    """Return ``(xp, x)``: the namespace a block runs with, and the block moved there.

    The decision is :func:`choose_backend`'s, taken here on the worker that runs the
    task: NumPy (device arrays are copied to host), CuPy (host blocks are copied to the
    device) or the block's own array-API namespace.
    """
    where = choose_backend(x, device)
    if where == "numpy":
        x = to_numpy(x)
    elif where == "cupy" and not is_device_array(x):
        import cupy

        x = cupy.asarray(to_numpy(x))
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
    distributed = sys.modules.get("distributed")  # a dask worker has imported it: never import it here
    if distributed is not None:
        try:
            return max(1, distributed.get_worker().nthreads)
        except (ValueError, AttributeError):
            pass
    if multiprocessing.parent_process() is not None:
        return os.cpu_count() or 1  # a process-pool worker: one task per process
    if threading.current_thread() is threading.main_thread():
        return 1  # the synchronous scheduler
    import dask.config

    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def threads_sharing_this_process() -> int:
    """Tasks that may run at once in this process's threads (sharing its GIL): a dask
    worker's or the threaded scheduler's pool size, 1 on the synchronous scheduler and in
    a process-pool worker."""
    if multiprocessing.parent_process() is not None:
        return 1
    return _dask_threads_here()


_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def _env_blas_cap() -> int | None:
    """The BLAS thread count the process environment asks for, if any.

    ``distributed``'s nanny starts workers with these set to 1 (its one-BLAS-thread-per-
    worker default); a user may set them too.
    """
    for name in _BLAS_ENV:
        value = os.environ.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def blas_threads_for_task(setting: int | None = None) -> int:
    """BLAS threads for one task so that dask threads x BLAS threads <= cores.

    ``setting`` (``cosine.blas-threads``) wins; otherwise cores // dask threads of this
    process, and never more than the environment's ``OPENBLAS_NUM_THREADS`` /
    ``MKL_NUM_THREADS`` / ``OMP_NUM_THREADS``.
    """
    if setting:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // _dask_threads_here())
    cap = _env_blas_cap()
    return min(threads, cap) if cap else threads


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list | None = None


@functools.lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    for lib in controller.select(user_api="blas").lib_controllers:
        # OpenBLAS initialises its thread settings lazily on first use; a get/set pair here
        # does it once, before any task changes them (else a first limit could be undone).
        lib.set_num_threads(lib.num_threads)
    return controller


def _set_threads(lib, n: int) -> None:
    """Set a BLAS library's thread count from whichever dask thread runs the task.

    threadpoolctl (3.7+) lets only one "controlling" Python thread change a process-wide
    OpenBLAS pool and silently ignores the others; a dask task runs on any pool thread, so
    control is taken here (every call of ours is serialised by ``_blas_lock``) and handed
    back afterwards, so users' own ``threadpool_limits`` in their thread keeps working.
    """
    clear = getattr(type(lib), "clear_controlling_thread", None)
    if clear is None:
        lib.set_num_threads(n)
        return
    clear(force=True)
    try:
        lib.set_num_threads(n)
    finally:
        clear()  # release control only if this thread holds it


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
            for lib, _ in _blas_saved:
                _set_threads(lib, threads)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_saved is not None:
                for lib, previous in _blas_saved:
                    _set_threads(lib, previous)
                _blas_saved = None


# --------------------------------------------------------------------------- CuPy products

#: cuBLAS / CUDA enum values (ABI-stable; cublas_api.h, library_types.h).
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
_CUBLAS_GEMM_DEFAULT = -1
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14


def _array_module(x):
    if is_device_array(x):
        import cupy

        return cupy
    return np


def bfloat16_bits(x):
    """float32 values as bfloat16 bit patterns (``uint16``), rounded to nearest, ties to even.

    NumPy or CuPy (the same code runs on both; the NumPy twin is what the tests check
    against :func:`dask_cosim._kernels.reduce_precision`). NaN stays NaN; values beyond
    bfloat16's range round to inf.

    Examples
    --------
    >>> bfloat16_bits(np.array([1.0, 1.00390625, -2.0], dtype=np.float32))
    array([16256, 16256, 49152], dtype=uint16)
    """
    mod = _array_module(x)
    u = mod.ascontiguousarray(x, dtype=mod.float32).view(mod.uint32)
    rounded = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
    bits = rounded.astype(mod.uint16)
    return mod.where(x != x, mod.uint16(0x7FC0), bits)


def bfloat16_bits_to_float32(bits):
    """Inverse of :func:`bfloat16_bits` (exact): ``uint16`` bit patterns to float32 values."""
    mod = _array_module(bits)
    return (bits.astype(mod.uint32) << 16).view(mod.float32)


def device_matmul(an, bn, precision: str = "float32"):
    """``an @ bn^T`` of CuPy blocks ``(..., n, D)`` and ``(..., m, D)`` in the requested precision.

    ``"float32"`` is :func:`cupy.matmul` in the inputs' dtype (float32 or float64; note
    that CuPy's own ``CUPY_TF32=1`` environment variable turns float32 matmuls into
    TF32 process-wide). The reduced modes call cuBLAS ``GemmStridedBatchedEx`` with
    float32 accumulation and float32 output: ``"tf32"`` (float32 operands, compute type
    ``CUBLAS_COMPUTE_32F_FAST_TF32``), ``"float16"`` (operands rounded to float16) and
    ``"bfloat16"`` (operands rounded to bfloat16, passed as bit patterns), all on tensor
    cores where the GPU has them.
    """
    import cupy

    if precision == "float32":
        return cupy.matmul(an, cupy.swapaxes(bn, -1, -2))
    a32 = cupy.ascontiguousarray(an, dtype=cupy.float32)
    b32 = cupy.ascontiguousarray(bn, dtype=cupy.float32)
    if precision == "tf32":
        return _gemm_nt(a32, b32, _CUDA_R_32F, _CUBLAS_COMPUTE_32F_FAST_TF32, precision)
    if precision == "float16":
        return _gemm_nt(a32.astype(cupy.float16), b32.astype(cupy.float16), _CUDA_R_16F,
                        _CUBLAS_COMPUTE_32F, precision)  # fmt: skip
    if precision == "bfloat16":
        return _gemm_nt(bfloat16_bits(a32), bfloat16_bits(b32), _CUDA_R_16BF, _CUBLAS_COMPUTE_32F, precision)
    raise ValueError(
        f"precision: expected 'float32', 'tf32', 'bfloat16' or 'float16', received {precision!r}"
    )


def _gemm_nt(a, b, operand_type: int, compute_type: int, precision: str):
    """float32 ``C[..., n, m] = a[..., n, k] @ b[..., m, k]^T`` with one strided-batched cuBLAS call.

    Row-major ``C`` is column-major ``C^T (m x n) = B (m x k) . A^T (k x n)``; a batch
    axis of length 1 (or a 2-D operand) broadcasts with stride 0.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    n, k = a.shape[-2:]
    m = b.shape[-2]
    batch_shape = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    batch = int(np.prod(batch_shape, dtype=np.int64))
    a3 = cupy.ascontiguousarray(a).reshape(-1, n, k)
    b3 = cupy.ascontiguousarray(b).reshape(-1, m, k)
    c = cupy.empty((batch, n, m), dtype=cupy.float32)
    if c.size == 0:
        return c.reshape(*batch_shape, n, m)
    one = np.ones((), dtype=np.float32)
    zero = np.zeros((), dtype=np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    try:
        cublas.gemmStridedBatchedEx(
            handle, _CUBLAS_OP_T, _CUBLAS_OP_N, m, n, k,
            one.ctypes.data,
            b3.data.ptr, operand_type, k, m * k if b3.shape[0] > 1 else 0,
            a3.data.ptr, operand_type, k, n * k if a3.shape[0] > 1 else 0,
            zero.ctypes.data,
            c.data.ptr, _CUDA_R_32F, m, n * m,
            batch, compute_type, _CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
    except Exception as err:  # cuBLAS says NOT_SUPPORTED e.g. for bfloat16 before sm_80
        cc = cupy.cuda.Device().compute_capability
        raise RuntimeError(
            f"precision={precision!r}: cuBLAS refused the product on this GPU (compute capability "
            f"{cc}): {err}; bfloat16 needs compute capability 8.0 or newer, use 'float16' or 'float32'"
        ) from err
    return c.reshape(*batch_shape, n, m)
