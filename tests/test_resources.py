"""GPU routing: device="gpu" tasks carry resources={"GPU": 1} all the way to the distributed scheduler.

The real-cluster test starts a scheduler and two ``dask worker`` processes, one declaring
``--resources GPU=1`` and one plain, and checks in the task stream that every
normalise/product task ran on the GPU worker. This machine has no GPU, so the GPU
worker runs with ``cosine.gpu-fallback`` (NumPy); the plain worker does not, so a
misrouted task would also fail loudly with NoGPUError.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import subprocess
import sys
from pathlib import Path

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pytest
from dask.base import tokenize
from dask.utils import key_split

import dask_cosim as dcs
from dask_cosim._compat import graph_name
from dask_cosim._resources import (
    GPU_RESOURCES,
    GPURouting,
    GPUTask,
    NoGPUWorkerError,
    ensure_gpu_routing,
    find_gpu_task,
    needs_gpu,
    routed,
)
from dask_cosim.reductions import pairs_above, topk
from dask_cosim.testing import reference_cosine

from ._graphs import QUERY_PLANNING, graph
from ._real_cluster import wait_until

GPU_PREFIXES = ("cosine-block", "cosine-normalize")
REPO = Path(__file__).resolve().parents[1]


def _data(seed=0, n=60, m=50, d=8):
    gen = np.random.default_rng(seed)
    return gen.standard_normal((n, d)), gen.standard_normal((m, d))


def _optimized_tasks(x) -> dict:
    """The low-level graph the scheduler receives (dask's default optimisation applied),
    without the aliases an optimised array of the query-planning mode renames its keys by."""
    (dsk,) = dask.optimize(x)
    tasks = dict(dsk.__dask_graph__())

    def alias(v) -> bool:
        try:
            return isinstance(v, tuple) and v in tasks
        except TypeError:  # a tuple task holding a list
            return False

    return {k: v for k, v in tasks.items() if not alias(v)}


def _name(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


# ------------------------------------------------------------------ the graph


def test_gpu_graph_layers_carry_resource_annotations():
    """Legacy mode: the normalise and product layers carry ``resources={"GPU": 1}``. Under
    array query planning dask keeps no annotations on array expressions: the GPUTask
    marker on exactly those tasks routes them (see the tests below)."""
    a, b = _data()
    S = dcs.cosine_similarity(a, b, chunks=(20, 25), device="gpu")
    if QUERY_PLANNING:
        assert {key_split(k) for k, v in graph(S).items() if needs_gpu(v)} == set(GPU_PREFIXES)
        return
    annotated = {k.rsplit("-", 1)[0] for k, layer in S.dask.layers.items() if layer.annotations}
    assert annotated == {"cosine-block", "cosine-normalize"}
    for name, layer in S.dask.layers.items():
        if layer.annotations:
            assert layer.annotations == {"resources": GPU_RESOURCES}, name
    for device in ("auto", "cpu"):
        S = dcs.cosine_similarity(a, b, chunks=(20, 25), device=device)
        assert not any(layer.annotations for layer in S.dask.layers.values())


def test_marker_survives_default_optimisation_exactly_on_gpu_tasks():
    a, b = _data()
    S = dcs.cosine_similarity(a, b, chunks=(20, 25), device="gpu")
    tasks = _optimized_tasks(S)
    marked = {k for k, v in tasks.items() if needs_gpu(v)}
    gpu_keys = {k for k in tasks if _name(k).startswith(GPU_PREFIXES)}
    assert gpu_keys and marked == gpu_keys  # the input-array data nodes are not marked
    assert len([k for k in marked if _name(k).startswith("cosine-block")]) == 3 * 2
    # downstream ops fuse product tasks into new keys: the marker goes with them
    T = S[:30].sum(axis=1)
    tasks = _optimized_tasks(T)
    marked = {_name(k) for k, v in tasks.items() if needs_gpu(v)}
    count = sum(needs_gpu(v) for v in tasks.values())
    assert all(name.startswith(GPU_PREFIXES) for name in marked), marked  # fused keys keep the prefix
    if QUERY_PLANNING:  # no fusion, no culling before the scheduler: every product and input task
        assert count == 3 * 2 + 3 + 2
    else:
        assert count == 2 * 2 + 2 + 2  # rows 0-29 touch 2x2 product blocks, 2 blocks of a, 2 of b
        assert any(name.startswith("cosine-block-getitem-sum") for name in marked), marked  # really fused
    assert not any(
        needs_gpu(v) for v in _optimized_tasks(dcs.cosine_similarity(a, b, device="auto")).values()
    )


#: tasks that must run on a GPU worker (key prefixes, after dask's fusion renames them)
GPU_TASKS = ("cosine-block", "cosine-normalize", "cosine-topk", "cosine-pairs")
#: host-side tasks of the same graphs (merges of host results, part picking, frames)
HOST_TASKS = (
    "cosine-merge",
    "cosine-values",
    "cosine-indices",
    "cosine-pick",
    "cosine-frame",
)


def _should_be_gpu(key) -> bool:
    name = key_split(key)
    return name.startswith(GPU_TASKS) and not name.startswith(HOST_TASKS)


@pytest.mark.parametrize(
    "build",
    [
        lambda a, b: topk(a, b, k=3, chunks=(20, 25), device="gpu"),
        lambda a, b: topk(a, k=3, chunks=(20, 20), device="gpu", exclude_self=True),  # triangle
        lambda a, b: (dcs.cosine_similarity(a, chunks=(20, 20), device="gpu"),),  # triangle
        lambda a, b: (pairs_above(a, b, threshold=0.5, chunks=(20, 25), device="gpu"),),
        lambda a, b: (pairs_above(a, threshold=0.5, chunks=(20, 20), device="gpu"),),  # triangle
    ],
    ids=["topk", "topk-triangle", "similarity-triangle", "pairs", "pairs-triangle"],
)
def test_selection_tasks_are_marked_exactly(build):
    a, b = _data(5)
    tasks = {}
    for x in build(a, b):
        optimized = x.optimize() if isinstance(x, dd.DataFrame) else dask.optimize(x)[0]
        tasks.update(dict(optimized.__dask_graph__()))
    marked = {k for k, v in tasks.items() if needs_gpu(v)}
    expected = {k for k, v in tasks.items() if _should_be_gpu(k) and type(v).__name__ != "Alias"}
    assert marked == expected
    assert any(key_split(k).startswith(("cosine-topk", "cosine-pairs", "cosine-block")) for k in marked)


def test_gpu_task_is_transparent():
    def kernel(x, y=1, block_info=None):
        return x + y

    wrapped = GPUTask(kernel, timeout=5)
    assert wrapped(1, y=2) == 3
    assert "block_info" in inspect.signature(wrapped).parameters  # dask's map_blocks looks for it
    assert tokenize(wrapped) == tokenize(GPUTask(kernel, timeout=9))
    restored = pickle.loads(pickle.dumps(GPUTask(max, timeout=7)))
    assert restored(2, 5) == 5 and restored.timeout == 7.0
    assert routed(kernel, "auto") is kernel and routed(kernel, "cpu") is kernel
    assert isinstance(routed(kernel, "gpu"), GPUTask)
    assert find_gpu_task({"x": [1, (2, GPUTask(max, 1))]}).func is max


def test_timeout_from_config_is_validated():
    with dask.config.set({"cosine.gpu-worker-timeout": "2s"}):
        assert GPUTask(max).timeout == 2.0
    with (
        dask.config.set({"cosine.gpu-worker-timeout": "soon"}),
        pytest.raises(ValueError, match="gpu-worker"),
    ):
        GPUTask(max)


def test_ensure_gpu_routing_without_a_client_is_a_no_op():
    assert ensure_gpu_routing() is False


# ------------------------------------------------------------------ clusters


@contextlib.contextmanager
def _in_process_cluster(n_workers=2, resources=None):
    with (
        distributed.LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            resources=resources,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield cluster, client


def test_no_gpu_worker_fails_clearly_instead_of_hanging():
    a, b = _data(1)
    with _in_process_cluster() as (_, client):
        with dask.config.set({"cosine.gpu-worker-timeout": "0.5s"}):
            S = dcs.cosine_similarity(a, b, chunks=(20, 25), device="gpu")
        with pytest.raises(NoGPUWorkerError, match=r"resources \{'GPU': 1\}.*none of the cluster's 2") as err:
            client.compute(S).result(timeout=120)  # a hang fails here instead of at the test timeout
        assert "--resources GPU=1" in str(err.value) and "cosine.gpu-worker-timeout" in str(err.value)
        assert "waited 0.5s" in str(err.value)  # failed by the configured timeout, not the default
        # the cluster is fine afterwards: a CPU computation still runs
        np.testing.assert_allclose(
            dcs.cosine_similarity(a, b, device="cpu").compute(), reference_cosine(a, b)
        )


def test_gpu_worker_joining_within_the_timeout_picks_the_tasks_up():
    a, b = _data(2)
    with (
        _in_process_cluster(n_workers=1) as (cluster, client),
        dask.config.set({"cosine.gpu-worker-timeout": "60s", "cosine.gpu-fallback": True}),
    ):
        S = dcs.cosine_similarity(a, b, chunks=(20, 25), device="gpu")
        future = client.compute(S)
        # the scheduler holds the routed tasks for a GPU worker ("no-worker"); none ran elsewhere
        states = wait_until(
            lambda: (s := client.run_on_scheduler(_routed_states)).get("no-worker") and s,
            60, "routed tasks waiting for a GPU worker", client=client,
        )  # fmt: skip
        assert not set(states) & {"processing", "memory", "erred"}, states
        assert future.status == "pending"

        async def add_gpu_worker():
            return await distributed.Worker(
                cluster.scheduler_address, nthreads=1, resources={"GPU": 1}, host="127.0.0.1"
            )

        worker = client.sync(add_gpu_worker)
        try:
            got = future.result(timeout=60)
            np.testing.assert_allclose(got, reference_cosine(a, b), atol=1e-12)
        finally:
            client.sync(worker.close)


def test_all_gpu_workers_cluster_runs_on_numpy_without_a_device():
    a, b = _data(3)
    with _in_process_cluster(resources={"GPU": 1}) as (_, client):
        with dask.config.set({"cosine.gpu-fallback": True}):
            S = dcs.cosine_similarity(a, b, chunks=(20, 25), device="gpu", precision="bfloat16")
            got = S.compute()
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, reference_cosine(a, b), atol=8e-3)
        restrictions = client.run_on_scheduler(_gpu_plugin_state)
        assert restrictions == {"installed": True}


def _routed_states(dask_scheduler=None) -> dict[str, int]:
    """How many normalise and product tasks the scheduler has in each state."""
    from collections import Counter

    routed = ("cosine-normalize", "cosine-block")
    return dict(Counter(ts.state for ts in dask_scheduler.tasks.values() if key_split(ts.key) in routed))


def _gpu_plugin_state(dask_scheduler=None):
    return {"installed": isinstance(dask_scheduler.plugins.get("dask-cosim-gpu-routing"), GPURouting)}


# ------------------------------------------------------------------ the real cluster


def _dask_cli() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dask"]


@contextlib.contextmanager
def _mixed_real_cluster(tmp_path):
    """Scheduler (in this process) + ``dask worker --resources GPU=1`` + a plain ``dask worker``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    with (
        distributed.LocalCluster(
            n_workers=0, host="127.0.0.1", scheduler_port=0, dashboard_address="127.0.0.1:0", processes=True
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        try:
            for name, extra, worker_env in [
                ("gpu", ["--resources", "GPU=1", "--nthreads", "1"], {"DASK_COSINE__GPU_FALLBACK": "True"}),
                ("cpu", ["--nthreads", "2"], {}),
            ]:
                log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
                procs.append(
                    (
                        subprocess.Popen(
                            [
                                *_dask_cli(),
                                "worker",
                                cluster.scheduler_address,
                                "--name",
                                name,
                                "--host",
                                "127.0.0.1",
                                "--no-dashboard",
                                "--no-nanny",
                                "--memory-limit",
                                "1GiB",
                                "--local-directory",
                                str(tmp_path / name),
                                *extra,
                            ],  # fmt: skip
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**env, **worker_env},
                            start_new_session=True,
                        ),
                        log,
                    )
                )
            client.wait_for_workers(2, timeout=90)
            yield cluster, client
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, log in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
                log.close()


def test_real_cluster_routes_every_gpu_task_to_the_gpu_worker(tmp_path):
    a, b = _data(4, n=90, m=80)
    with _mixed_real_cluster(tmp_path) as (_, client):
        workers = {w: info["name"] for w, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert sorted(workers.values()) == ["cpu", "gpu"]
        S = dcs.cosine_similarity(a, b, chunks=(30, 20), device="gpu")
        with distributed.get_task_stream(client) as stream:
            got = S.compute()
        np.testing.assert_allclose(got, reference_cosine(a, b), atol=1e-12)
        ran_on = [(_name(t["key"]), workers[t["worker"]]) for t in stream.data]
        gpu_tasks = [w for name, w in ran_on if name.startswith(GPU_PREFIXES)]
        assert len(gpu_tasks) == 3 * 4 + 3 + 4  # products + normalise tasks of a and b
        assert set(gpu_tasks) == {"gpu"}, ran_on

        # selection tasks: top-k and pairs above a threshold
        with distributed.get_task_stream(client) as stream:
            vals, idx = dask.compute(*topk(a, b, k=4, chunks=(30, 20), device="gpu"))
            pairs = pairs_above(a, threshold=0.3, chunks=(30, 30), device="gpu").compute()
        ref = reference_cosine(a, b)
        np.testing.assert_allclose(vals, -np.sort(-ref, axis=1)[:, :4], atol=1e-12)
        assert len(pairs) > 0 and (pairs["i"] <= pairs["j"]).all()
        routed_tasks = [(key_split(t["key"]), workers[t["worker"]]) for t in stream.data]
        # top-k block tasks (pivot + pruned blocks; fusion may extend their key names) and
        # pair blocks of the upper triangle; merges and frame assembly run anywhere
        kinds = ("cosine-topk", "cosine-pairs")
        skip = ("merge", "values", "indices", "frame")
        selection = [
            (name, w)
            for name, w in routed_tasks
            if name.startswith(kinds) and not any(x in name for x in skip)
        ]
        assert {name.split("-")[1] for name, _ in selection} == {"topk", "pairs"}, routed_tasks
        assert len(selection) >= 3 + 3 * (3 + 1) // 2
        assert {w for _, w in selection} == {"gpu"}, routed_tasks

        # the restriction itself is on the scheduler's task states
        held = client.persist(S)
        distributed.wait(held)
        restrictions = client.run_on_scheduler(_restrictions)
        product = {k: r for k, r in restrictions.items() if k.startswith("cosine-block")}
        assert product and all(r == GPU_RESOURCES for r in product.values())
        del held

        # the same graph with device="cpu" carries no restriction
        on_cpu = dcs.cosine_similarity(a, b, chunks=(30, 20), device="cpu")
        held = client.persist(on_cpu)
        distributed.wait(held)
        name = graph_name(on_cpu)  # the product tasks' name (persist may rename the result)
        product = {k: r for k, r in client.run_on_scheduler(_restrictions).items() if k == name}
        assert product == {name: None}


def _restrictions(dask_scheduler=None):
    return {_name(k): ts.resource_restrictions for k, ts in dask_scheduler.tasks.items()}
