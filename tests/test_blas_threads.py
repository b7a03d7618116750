"""dask threads x BLAS threads never exceed the cores, and users' BLAS settings come back."""

from __future__ import annotations

import os
import threading

import dask
import numpy as np
from threadpoolctl import ThreadpoolController

import dask_cosim as dcs
from dask_cosim import _kernels
from dask_cosim._backend import blas_threads_for_task, limit_blas

CORES = len(os.sched_getaffinity(0))


_BLAS = ThreadpoolController().select(user_api="blas").lib_controllers


def blas_threads():
    return [lib.num_threads for lib in _BLAS]


def test_threads_per_task_follow_the_scheduler():
    with dask.config.set(num_workers=2):
        threaded = dask.delayed(blas_threads_for_task)().compute(scheduler="threads")
    assert threaded == max(1, CORES // 2)
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == CORES
    assert blas_threads_for_task(3) == 3  # an explicit setting (cosine.blas-threads) wins


def test_limit_is_shared_by_concurrent_tasks_and_restored():
    before = blas_threads()
    for _ in range(300):  # OpenBLAS once ignored a restore in a few hundred rounds
        inside = []
        barrier = threading.Barrier(2)

        def task(inside=inside, barrier=barrier):
            with limit_blas(1):
                barrier.wait()
                inside.append(blas_threads())
                barrier.wait()

        threads = [threading.Thread(target=task) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert inside == [[1] * len(before)] * 2
        assert blas_threads() == before


def test_product_tasks_run_under_the_limit(monkeypatch):
    seen = []
    real = _kernels.limit_blas

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(_kernels, "limit_blas", spy)
    a = np.random.default_rng(0).standard_normal((4, 50, 8))
    with dask.config.set(num_workers=2):
        dcs.cosine_similarity(a, a, chunks=(1, 25, 25)).compute(scheduler="threads")
    assert seen and set(seen) == {max(1, CORES // 2)}


def test_environment_caps_blas_threads(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == CORES
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what distributed's nanny gives its workers
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == 1
    assert blas_threads_for_task(2) == 2  # an explicit cosine.blas-threads still wins
