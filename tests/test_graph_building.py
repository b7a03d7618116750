"""Building a graph never runs anything or talks to a cluster more than once.

Every entry point is called under a dask scheduler that fails on use and with inputs
whose blocks count how often they are computed; ``check_finite=True`` is checked by the
tasks when they run. With a ``distributed`` client, the workers' memory budget is asked
once per cluster state, not once per call.
"""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import dask_cosim as dcs
from dask_cosim import _worker_memory
from dask_cosim._compat import cluster_state
from dask_cosim.cli import main
from dask_cosim.testing import reference_cosine


def _refuse(dsk, keys, **kwargs):
    raise AssertionError(f"a graph was computed while building: {len(dsk)} tasks")


class BlockReads:
    """A dask input whose blocks count how often they are computed."""

    def __init__(self, x: np.ndarray, chunks):
        self.x, self.count, self.lock = x, 0, threading.Lock()
        meta = np.empty((0,) * x.ndim, dtype=x.dtype)
        self.array = da.from_array(x, chunks=chunks).map_blocks(self.read, dtype=x.dtype, meta=meta)

    def read(self, block):
        with self.lock:
            self.count += 1
        return block

    def __dask_tokenize__(self):
        return ("BlockReads", id(self))


def _build_everything(a, b, **options):
    out = [
        dcs.cosine_similarity(a, b, **options),
        dcs.cosine_similarity(a, **options),
        dcs.topk(a, b, k=2, **options),
        dcs.topk(a, k=2, exclude_self=True, **options),
        dcs.pairs_above(a, b, threshold=0.5, **options),
        dcs.pairs_above(a, threshold=0.5, **options),
        dcs.plan(a, b, op="topk", k=2, **options),
    ]
    out.append(dcs.duplicate_groups(a, threshold=0.9, chunks=options.get("chunks", "auto")))
    return out


def test_building_runs_no_task_even_with_check_finite(tmp_path):
    gen = np.random.default_rng(0)
    a = BlockReads(gen.standard_normal((40, 6)), chunks=(10, 6))
    b_np = gen.standard_normal((30, 6))
    z = zarr.create_array(str(tmp_path / "b.zarr"), shape=b_np.shape, chunks=(10, 6), dtype=b_np.dtype)
    z[...] = b_np
    with dask.config.set(scheduler=_refuse):
        built = _build_everything(a.array, str(tmp_path / "b.zarr"), chunks=(20, 10), check_finite=True)
        built += _build_everything(a.array, z, chunks=(20, 10))
    assert a.count == 0
    S = built[0]
    np.testing.assert_allclose(S.compute(), reference_cosine(a.x, b_np), rtol=0, atol=1e-12)
    assert a.count == 4  # each input block read once, when computed


def test_the_cli_builds_its_plan_without_reading_the_inputs(tmp_path, capsys):
    a = np.random.default_rng(1).standard_normal((30, 4))
    a[12, 3] = np.nan
    np.save(tmp_path / "a.npy", a)
    with dask.config.set(scheduler=_refuse):
        rc = main(["run", str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.zarr"), "--topk", "3"]
                  + ["--check-finite", "--plan"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "dask_cosim plan: topk" in out.out
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("op", ["similarity", "topk", "pairs"])
def test_check_finite_fails_in_the_task_naming_input_block_and_vector(op):
    a, b = np.ones((2, 20, 4)), np.ones((2, 10, 4))
    a[1, 7, 2], a[1, 9, 0] = np.nan, np.inf
    b[0, 3, 1] = -np.inf
    build = {
        "similarity": lambda x, y: dcs.cosine_similarity(x, y, check_finite=True, chunks=(1, 10, 5)),
        "topk": lambda x, y: dcs.topk(x, y, k=2, check_finite=True, chunks=(1, 10, 5))[0],
        "pairs": lambda x, y: dcs.pairs_above(x, y, threshold=0.5, check_finite=True, chunks=(1, 10, 5)),
    }[op]
    with dask.config.set(scheduler=_refuse):
        only_a, only_b = build(a, np.ones((2, 10, 4))), build(np.ones((2, 20, 4)), b)
    with pytest.raises(dcs.NonFiniteError) as info:
        only_a.compute(scheduler="sync")
    assert str(info.value).startswith(
        "a: 2 vector(s) hold NaN or inf in batch 1:2, rows 0:10; the first is at batch 1, row 7 "
        "(nan in column 2); check_finite=True refuses non-finite inputs"
    )
    with pytest.raises(dcs.NonFiniteError, match=r"^b: 1 vector\(s\) .* batch 0, row 3 \(-inf in column 1\)"):
        only_b.compute(scheduler="sync")
    finite = build(np.ones((2, 20, 4)), np.ones((2, 10, 4))).compute()
    assert len(finite) > 0


def test_check_finite_costs_nothing_for_finite_blocks_and_keeps_large_values():
    a = np.full((5, 3), 1e300)  # finite, but squared norms overflow: the careful path
    S = dcs.cosine_similarity(a, check_finite=True).compute()
    np.testing.assert_allclose(S, np.ones((5, 5)), rtol=0, atol=1e-12)


def test_the_workers_budget_is_asked_once_per_cluster_state():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        calls = []
        real = client.scheduler_info

        def counted(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        client.scheduler_info = counted
        a = np.ones((10, 3))
        with dask.config.set(scheduler=_refuse):
            for _ in range(3):
                dcs.cosine_similarity(a)
                dcs.topk(a, k=2)
                dcs.pairs_above(a, threshold=0.5)
            dcs.plan(a, op="topk", k=2)
        assert len(calls) == 1
        assert _worker_memory.cluster_layout(client)[1] == 2
        before = cluster_state(client)
        cluster.scale(2)
        client.wait_for_workers(2)
        deadline = threading.Event()
        timer = threading.Timer(60, deadline.set)
        timer.start()
        try:  # the client refreshes its view of the cluster on its own schedule
            while cluster_state(client) == before and not deadline.wait(0.05):
                pass
        finally:
            timer.cancel()
        assert cluster_state(client) != before
        assert _worker_memory.cluster_layout(client)[1] == 4  # asked again: two workers now
        assert len(calls) == 2
        dcs.cosine_similarity(a)
        assert len(calls) == 2
