"""dask threads x BLAS threads never exceed the cores, and users' BLAS settings come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import dask
import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim import _backend, _kernels, _select
from dask_cosim._backend import blas_threads_for_task, limit_blas

CORES = len(os.sched_getaffinity(0))


def test_threads_per_task_follow_the_scheduler():
    with dask.config.set(num_workers=2):
        threaded = dask.delayed(blas_threads_for_task)().compute(scheduler="threads")
    assert threaded == max(1, CORES // 2)
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == CORES
    assert blas_threads_for_task(3) == 3  # an explicit setting (cosine.blas-threads) wins


class FakeBlas:
    """A BLAS library controller that records the thread counts it is given."""

    def __init__(self, threads):
        self.num_threads = threads
        self.history = [threads]

    def set_num_threads(self, n):
        self.num_threads = n
        self.history.append(n)


def test_limit_is_shared_by_concurrent_tasks_and_restored(monkeypatch):
    """Reference counting: the first task in sets the limit, the last one out restores it.

    Run against recording controllers, so the interleaving is forced by a barrier; the
    real libraries are checked end to end in a fresh process below.
    """
    libs = [FakeBlas(2), FakeBlas(4)]

    class Controller:
        lib_controllers = libs

        def select(self, **kw):
            return self

    monkeypatch.setattr(_backend, "_controller", lambda: Controller())
    for _ in range(100):
        inside = []
        barrier = threading.Barrier(2)

        def task(inside=inside, barrier=barrier):
            with limit_blas(1):
                barrier.wait()
                inside.append([lib.num_threads for lib in libs])
                barrier.wait()

        threads = [threading.Thread(target=task) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert inside == [[1, 1], [1, 1]]
        assert [lib.num_threads for lib in libs] == [2, 4]
        assert _backend._blas_users == 0
    # one set and one restore per round: concurrent tasks shared a single limit
    assert libs[0].history == [2] + [1, 2] * 100


def test_limit_reaches_the_real_blas_in_a_fresh_process():
    code = (
        "import numpy as np\n"
        "from threadpoolctl import ThreadpoolController\n"
        "from dask_cosim._backend import limit_blas\n"
        "libs = ThreadpoolController().select(user_api='blas').lib_controllers\n"
        "before = [l.num_threads for l in libs]\n"
        "with limit_blas(1):\n"
        "    inside = [l.num_threads for l in libs]\n"
        "print(before, inside, [l.num_threads for l in libs])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, inside, after = (json.loads(part) for part in out.strip().replace("] [", "]|[").split("|"))
    assert inside == [1] * len(before) and after == before


def test_real_blas_is_restored_after_a_threaded_compute():
    """Regression: threadpoolctl lets only one "controlling" thread change OpenBLAS.

    A dask pool thread that set the limit used to keep control, so the restore, run by
    whichever pool thread finished last, was silently ignored: BLAS stayed at 1 thread for
    the rest of the process, and the user's own ``threadpool_limits`` stopped working.
    """
    code = (
        "import dask, numpy as np\n"
        "from threadpoolctl import ThreadpoolController, threadpool_limits\n"
        "import dask_cosim as dcs\n"
        "libs = ThreadpoolController().select(user_api='blas').lib_controllers\n"
        "before = [l.num_threads for l in libs]\n"
        "a = np.random.default_rng(0).standard_normal((4, 300, 16))\n"
        "S = dcs.cosine_similarity(a, a[::-1], chunks=(1, 150, 100))\n"
        "afters = []\n"
        "for _ in range(5):\n"
        "    with dask.config.set(num_workers=2):\n"
        "        S.compute(scheduler='threads')\n"
        "    afters.append([l.num_threads for l in libs])\n"
        "with threadpool_limits(1, user_api='blas'):\n"
        "    user = [l.num_threads for l in libs]\n"
        "print(before, afters, user, [l.num_threads for l in libs])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in _backend._BLAS_ENV}
    env["OPENBLAS_NUM_THREADS"] = "2"  # a 2-thread pool even on a 1-core runner
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    before, afters, user, final = (json.loads(p) for p in out.strip().replace("] [", "]|[").split("|"))
    assert before and all(n == 2 for n in before)
    assert afters == [before] * 5
    assert user == [1] * len(before) and final == before


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


@pytest.mark.parametrize("setting", [1, 3, "2"])
def test_the_blas_threads_config_reaches_every_product_task(monkeypatch, setting):
    """``cosine.blas-threads`` set through dask's config when the graph is built is the
    limit of the similarity, top-k and pairs products (whatever dask's threads would give)."""
    seen = []

    def spying(module):
        real = module.limit_blas
        monkeypatch.setattr(module, "limit_blas", lambda n: seen.append((module.__name__, n)) or real(n))

    spying(_kernels)
    spying(_select)
    a = np.random.default_rng(0).standard_normal((2, 200, 40))  # blocks above _select's small-GEMM cut
    with dask.config.set({"cosine.blas-threads": setting}):
        S = dcs.cosine_similarity(a, a.copy(), chunks=(1, 100, 100))
        vals, idx = dcs.topk(a, a.copy(), k=3, chunks=(1, 100, 100))
        pairs = dcs.pairs_above(a, a.copy(), threshold=0.5, chunks=(1, 100, 100))
    with dask.config.set(num_workers=2):  # computed outside: the setting travels with the graph
        dask.compute(S, vals, idx, scheduler="threads")
        pairs.compute(scheduler="threads")
    assert {m for m, _ in seen} == {"dask_cosim._kernels", "dask_cosim._select"}, seen
    assert {n for _, n in seen} == {int(setting)}, seen


def test_environment_caps_blas_threads(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == CORES
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what distributed's nanny gives its workers
    assert dask.delayed(blas_threads_for_task)().compute(scheduler="sync") == 1
    assert blas_threads_for_task(2) == 2  # an explicit cosine.blas-threads still wins


def test_the_embedded_cluster_leaves_the_blas_environment_as_it_found_it(monkeypatch):
    """distributed's nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in this process before it
    spawns a worker and never undoes it; after the embedded cluster, local computations
    must not read a one-thread BLAS setting the user never made."""
    from dask_cosim.cluster import dask_client

    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting comes back as it was
    with dask_client(None, workers=1, threads_per_worker=1, echo=None, quiet=True) as client:
        assert client.run(lambda: os.environ["OPENBLAS_NUM_THREADS"]) == {
            w: "1" for w in client.scheduler_info()["workers"]
        }
        assert os.environ.get("OPENBLAS_NUM_THREADS") == "1"  # the nanny's doing, while it runs
    assert "OPENBLAS_NUM_THREADS" not in os.environ and "MKL_NUM_THREADS" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "3"
    assert blas_threads_for_task() == min(CORES, 3)  # main thread: the synchronous scheduler's
