"""Faults on a real multi-process cluster (``dask scheduler`` + ``dask worker`` processes).

Each fault is injected at a point where the job is demonstrably half done: one input
block is held back by a gate file (see ``tests/_real_cluster.py``), the test polls the
scheduler until enough results sit in worker memory, injects the fault, opens the gate
and checks the output against a float64 NumPy reference. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import psutil
import pytest
import zarr
from distributed.scheduler import KilledWorker

import dask_cosim as dcs
from dask_cosim._worker_memory import TASK_SHARE, killed_worker_message, worker_budget
from dask_cosim.testing import reference_cosine

from ._real_cluster import diagnose, gated, held_keys, open_gate, start_real_cluster, wait_until

pytestmark = pytest.mark.timeout(180)

TOL64 = 1e-12
RESULT_TIMEOUT = 90  # seconds for a job to finish after the fault


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- fault 1: worker killed mid-compute


@pytest.mark.parametrize("batched", [False, True])
def test_worker_sigkill_during_compute(real_cluster, gate_file, batched):
    """SIGKILL the worker holding the most finished blocks; dask recomputes what it lost."""
    shape = (2, 480, 24) if batched else (480, 24)
    a, b = rng(1).standard_normal(shape), rng(2).standard_normal(shape)
    in_chunks = (1, 80, 24) if batched else (80, 24)
    A = da.from_array(a, chunks=in_chunks)
    B = gated(b, in_chunks, gate_file)  # the last block of b waits for the gate
    S = dcs.cosine_similarity(A, B, chunks=(1, 80, 80) if batched else (80, 80))
    n_free = math.prod(S.numblocks) - S.numblocks[-2]  # blocks that do not need the gated block
    with real_cluster.client() as client:
        future = client.compute(S)
        held = wait_until(
            lambda: (h := held_keys(client, "cosine-block")) and sum(h.values()) >= n_free // 2 and h,
            timeout=60,
            what="finished product blocks in worker memory",
            client=client,
        )
        victim = max(held, key=held.get)
        lost = held[victim]
        _, pid = real_cluster.kill_worker(victim)
        open_gate(gate_file)
        got = future.result(timeout=RESULT_TIMEOUT)
    assert lost >= 1  # the kill destroyed finished results that had to be recomputed
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=TOL64)
    assert pid not in real_cluster.wait_for_workers().values()  # the nanny started a new process


# ---------------------------------------------------------------- fault 4: memory limits


@pytest.fixture(scope="module")
def tight_cluster():
    """One nanny-managed worker with 300 MiB; a task is given up after its 2nd worker death."""
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    with start_real_cluster(1, memory_limit="300MiB", env=env) as cluster:
        yield cluster


def test_auto_blocks_fit_a_tight_worker(tight_cluster):
    """ "auto" plans blocks from the workers' memory limit: the job finishes without a restart."""
    a, b = rng(3).standard_normal((7000, 16)), rng(4).standard_normal((7000, 16))
    limit = 300 * 2**20
    (pid_before,) = tight_cluster.wait_for_workers().values()
    with tight_cluster.client() as client:
        S = dcs.cosine_similarity(a, b)  # planned while the client is active
        # without the worker limit, "auto" would plan 128 MiB output blocks (about half the limit)
        assert max(S.chunks[0]) * max(S.chunks[1]) * 8 <= limit * TASK_SHARE / 4
        got = client.compute(S.sum(axis=1)).result(timeout=RESULT_TIMEOUT)
    np.testing.assert_allclose(got, reference_cosine(a, b).sum(axis=1), rtol=1e-10, atol=1e-9)
    assert list(tight_cluster.wait_for_workers().values()) == [pid_before]  # never restarted


def test_oversized_blocks_are_refused_naming_the_memory_limit(tight_cluster):
    a = rng(5).standard_normal((7000, 16))
    with tight_cluster.client():
        with pytest.raises(
            dcs.PlanError, match=r"worker tcp://127\.0\.0\.1:\d+ has memory_limit=300\.00 MiB for 1 thread"
        ):
            dcs.cosine_similarity(a, a, chunks=(7000, 7000))


def test_cli_refuses_blocks_too_big_for_the_workers(tight_cluster, tmp_path):
    """The CLI plans for the --scheduler's workers: exit 2, naming their memory limit, nothing written."""
    np.save(tmp_path / "a.npy", rng(5).standard_normal((7000, 16)))
    out = tmp_path / "out.zarr"
    cmd = [sys.executable, "-m", "dask_cosim", "run", tmp_path / "a.npy", "-o", out, "--chunks", "7000,7000",
           "--scheduler", tight_cluster.address, "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "has memory_limit=300.00 MiB for 1 thread(s)" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_worker_out_of_memory_is_restarted_and_the_job_fails_not_hangs(tight_cluster):
    """A graph planned without the cluster (no client yet) whose block cannot fit: the nanny
    kills and restarts the worker; the task is given up with KilledWorker, bounded in time."""
    a = rng(6).standard_normal((7000, 16))
    S = dcs.cosine_similarity(a, a.copy(), chunks=(7000, 7000))  # 392 MB block > 300 MiB worker
    (pid_before,) = tight_cluster.wait_for_workers().values()
    with tight_cluster.client() as client:
        budget = worker_budget(client)
        future = client.compute(S.sum())
        with pytest.raises(KilledWorker) as info:
            future.result(timeout=RESULT_TIMEOUT)
        # what the CLI prints for it: the memory limit, the usual reason
        msg = killed_worker_message(info.value, budget)
        assert "has memory_limit=300.00 MiB for 1 thread(s)" in msg and "--memory-limit" in msg
        # the worker is back and usable: a job that fits completes on the same cluster
        (pid_after,) = tight_cluster.wait_for_workers().values()
        assert pid_after != pid_before
        small = dcs.cosine_similarity(a[:500], a[:300])
        np.testing.assert_allclose(
            client.compute(small).result(timeout=RESULT_TIMEOUT),
            reference_cosine(a[:500], a[:300]),
            atol=TOL64,
        )
    log = (tight_cluster.workdir / "worker-0.log").read_text()
    assert "exceeded 95% memory budget" in log or "Restarting" in log


# ---------------------------------------------------------------- fault 5: missing / corrupt input chunks


def _write_zarr(path, x, chunks, **kw):
    z = zarr.create_array(str(path), shape=x.shape, chunks=chunks, dtype=x.dtype, **kw)
    z[...] = x
    return z


def test_missing_input_chunk_is_an_error_naming_array_and_chunk(real_cluster, tmp_path):
    a = rng(7).standard_normal((300, 8))
    path = tmp_path / "a.zarr"
    _write_zarr(path, a, (100, 8))
    os.remove(path / "c" / "1" / "0")  # rows 100:200 lost
    S = dcs.cosine_similarity(str(path), chunks=(100, 100))
    with real_cluster.client() as client:
        with pytest.raises(dcs.InputChunkError) as info:
            client.compute(S).result(timeout=RESULT_TIMEOUT)
    msg = str(info.value)
    assert "chunk (1, 0)" in msg and "'c/1/0'" in msg and "rows 100:200" in msg
    assert str(path) in msg and "missing from the store" in msg and "fill value 0.0" in msg


def test_missing_chunk_with_fill_policy_follows_zarr_semantics(real_cluster, tmp_path):
    """cosine.missing-input-chunks='fill': the chunk reads as fill_value (zeros → similarity 0)."""
    a = rng(8).standard_normal((300, 8))
    path = tmp_path / "a.zarr"
    _write_zarr(path, a, (100, 8))
    os.remove(path / "c" / "2" / "0")
    with dask.config.set({"cosine.missing-input-chunks": "fill"}):
        S = dcs.cosine_similarity(str(path), chunks=(100, 100))
    with real_cluster.client() as client:
        got = client.compute(S).result(timeout=RESULT_TIMEOUT)
    filled = a.copy()
    filled[200:] = 0.0
    np.testing.assert_allclose(got, reference_cosine(filled), atol=TOL64)
    assert not got[200:].any()


@pytest.mark.parametrize("compressed", [True, False])
def test_corrupt_input_chunk_is_an_error_naming_array_and_chunk(real_cluster, tmp_path, compressed):
    a = rng(9).standard_normal((2, 200, 8)).astype("float32")
    path = tmp_path / "a.zarr"
    _write_zarr(path, a, (1, 100, 8), **({} if compressed else {"compressors": None}))
    (path / "c" / "1" / "1" / "0").write_bytes(b"\x00garbage, not a chunk\xff" * 3)
    S = dcs.cosine_similarity(str(path), a[:, :50], chunks=(1, 100, 50))
    with real_cluster.client() as client:
        with pytest.raises(dcs.InputChunkError) as info:
            client.compute(S).result(timeout=RESULT_TIMEOUT)
    msg = str(info.value)
    assert msg.startswith("a: cannot read chunk (1, 1, 0)") and "'c/1/1/0'" in msg and str(path) in msg
    assert "batch 1:2, rows 100:200" in msg


def test_all_fill_chunk_that_exists_is_data_not_an_error(tmp_path):
    """An all-zero chunk that zarr did store (write_empty_chunks=True) is legitimate data."""
    a = rng(10).standard_normal((300, 8))
    a[100:200] = 0.0
    path = tmp_path / "a.zarr"
    _write_zarr(path, a, (100, 8), config={"write_empty_chunks": True})
    assert (path / "c" / "1" / "0").exists()
    got = dcs.cosine_similarity(str(path), chunks=(150, 150)).compute(scheduler="sync")
    np.testing.assert_allclose(got, reference_cosine(a), atol=TOL64)


def test_guard_checks_each_shard_and_nan_fill(tmp_path):
    from dask_cosim._zarr_guard import GuardedZarr

    a = rng(11).standard_normal((16, 4)).astype("float32")
    z = _write_zarr(tmp_path / "s.zarr", a, (2, 4), shards=(8, 4), fill_value=np.nan)
    guarded = GuardedZarr(z, "b")
    np.testing.assert_array_equal(guarded[3:13], a[3:13])
    np.testing.assert_array_equal(guarded[5], a[5])  # integer index (dask may fuse getitems)
    os.remove(tmp_path / "s.zarr" / "c" / "1" / "0")  # the shard of rows 8:16
    np.testing.assert_array_equal(guarded[:8], a[:8])
    with pytest.raises(dcs.InputChunkError, match=r"b: chunk \(1, 0\) .*rows 8:16.*fill value nan"):
        guarded[6:9]


# ---------------------------------------------------------------- safe defaults


def test_real_cluster_fixture_listens_on_localhost_only(real_cluster):
    pids = [real_cluster.scheduler_pid, *real_cluster.nanny_pids, *real_cluster.worker_pids().values()]
    addrs = _listening(psutil, pids)
    assert addrs and all(ip == "127.0.0.1" for ip, _ in addrs), addrs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_cluster_processes_die_with_a_killed_test_process():
    """A test run killed with SIGKILL (no atexit, no fixture teardown) leaves no cluster behind."""
    code = (
        "import json, os, signal, sys\n"
        "from tests._real_cluster import start_real_cluster\n"
        "with start_real_cluster(1) as c:\n"
        "    pids = [c.scheduler_pid, *c.nanny_pids, *c.worker_pids().values()]\n"
        "    print(json.dumps(pids), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pids = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(pids) == 3
    try:
        gone = wait_until(lambda: not any(_running(psutil, p) for p in pids), 30, "the cluster to exit")
    except TimeoutError:
        gone = False
    for pid in pids:  # never leave them running, even when the check fails
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert gone, f"still running after the test process died: {[p for p in pids if _running(psutil, p)]}"


def _running(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listening(psutil, pids):
    out = []
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                out.append((conn.laddr.ip, conn.laddr.port))
    return out


# ---------------------------------------------------------------- fault 2: worker killed mid-write


def marker_grid(out) -> np.ndarray:
    """The output's block markers (all zero while the group is being created)."""
    try:
        return zarr.open_group(str(out), mode="r")["_blocks_done"][...]
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return np.zeros(1, dtype=np.uint8)


def _check_marked_blocks(group, ref, chunks, array="similarity"):
    """Every block with a marker holds exactly the reference data; returns the marker grid."""
    done = group["_blocks_done"][...]
    data = group[array]
    for ix in np.argwhere(done == 1):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(ix, chunks, strict=False))
        np.testing.assert_allclose(data[region], ref[region], rtol=0, atol=TOL64)
    return done


def test_worker_sigkill_during_to_zarr(real_cluster, tmp_path, gate_file):
    a, b = rng(12).standard_normal((480, 16)), rng(13).standard_normal((480, 16))
    ref = reference_cosine(a, b)
    out = tmp_path / "out.zarr"
    S = dcs.cosine_similarity(
        da.from_array(a, chunks=(80, 16)), gated(b, (80, 16), gate_file), chunks=(80, 80)
    )
    n_free = math.prod(S.numblocks) - S.numblocks[0]
    markers = partial(marker_grid, out)

    with real_cluster.client() as client:
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(dcs.to_zarr, S, str(out))
            enough = lambda: markers().sum() >= n_free // 2  # noqa: E731
            wait_until(enough, timeout=60, what="written blocks", client=client)
            busy = {w: keys for w, keys in client.processing().items() if keys}
            writing = [w for w, keys in busy.items() if any("cosine-write" in str(k) for k in keys)]
            victim = (
                writing or [w for w in busy if not any("gate" in str(k) for k in busy[w])] or list(busy)
            )[0]
            _, pid = real_cluster.kill_worker(victim)
            # right after the kill: every marker stands for a fully written block
            at_kill = _check_marked_blocks(zarr.open_group(str(out), mode="r"), ref, (80, 80))
            open_gate(gate_file)
            report = job.result(timeout=RESULT_TIMEOUT)
    assert 0 < at_kill.sum() < math.prod(S.numblocks)
    group = zarr.open_group(str(out), mode="r")
    assert _check_marked_blocks(group, ref, (80, 80)).all()
    np.testing.assert_allclose(group["similarity"][...], ref, rtol=0, atol=TOL64)
    assert report.blocks_written == math.prod(S.numblocks)
    assert pid not in real_cluster.wait_for_workers().values()


def brute_topk(a, b, k):
    """float64 top-k by argsort of the full S (descending, ties to the smaller j)."""
    s = reference_cosine(a, b)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, order, axis=-1), order


def test_worker_sigkill_during_topk_tree_reduction(real_cluster, gate_file):
    """Kill the worker holding the partial merges of the tree reduction: the parts they were
    merged from are gone too, so dask recomputes products, parts and merges."""
    from dask_cosim import reductions

    a, b = rng(14).standard_normal((240, 16)), rng(15).standard_normal((720, 16))
    vals, idx = dcs.topk(
        da.from_array(a, chunks=(80, 16)), gated(b, (80, 16), gate_file), k=7, chunks=(80, 80)
    )
    assert reductions.SPLIT_EVERY < 720 // 80  # so partial merges exist before the gated column
    with real_cluster.client() as client:
        futures = client.compute([vals, idx])
        # every row block (3) merges its columns before the gated last one
        held = wait_until(
            lambda: (h := held_keys(client, "cosine-merge")) and sum(h.values()) >= 3 and h,
            timeout=60,
            what="partial top-k merges in worker memory",
            client=client,
        )
        victim = max(held, key=held.get)
        lost = held[victim]
        _, pid = real_cluster.kill_worker(victim)
        open_gate(gate_file)
        got_vals, got_idx = client.gather(futures)
    assert lost >= 1
    ref_vals, ref_idx = brute_topk(a, b, 7)
    np.testing.assert_array_equal(got_idx, ref_idx)  # float64: no near-ties in random data
    np.testing.assert_allclose(got_vals, ref_vals, rtol=0, atol=TOL64)
    assert pid not in real_cluster.wait_for_workers().values()


# ---------------------------------------------------------------- fault 3: the CLI client killed


class FifoChunk:
    """Turn a zarr chunk file into a named pipe: a task reading it blocks (in ``open``) until
    :meth:`release` hands it the chunk's bytes and puts the regular file back."""

    def __init__(self, path):
        self.path = path
        self.payload = path.read_bytes()
        path.unlink()
        os.mkfifo(path)

    def release(self):
        if not stat.S_ISFIFO(os.lstat(self.path).st_mode):
            return
        spare = self.path.with_name(self.path.name + ".restore")
        spare.write_bytes(self.payload)
        try:  # a reader blocked in open() gets the bytes, then end of file
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:  # ENXIO: nobody is reading
                raise
        else:
            os.set_blocking(fd, True)
            try:
                os.write(fd, self.payload)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
        os.replace(spare, self.path)  # later reads see the regular file


def test_cli_client_sigkill_then_resume(real_cluster, tmp_path):
    a, b = rng(16).standard_normal((400, 16)), rng(17).standard_normal((600, 16))
    _write_zarr(tmp_path / "a.zarr", a, (100, 16))
    _write_zarr(tmp_path / "b.zarr", b, (100, 16))
    gate = FifoChunk(tmp_path / "b.zarr" / "c" / "5" / "0")  # the last column of blocks waits on it
    out = tmp_path / "out.zarr"
    cmd = [sys.executable, "-m", "dask_cosim", "run", tmp_path / "a.zarr", tmp_path / "b.zarr", "-o", out,
           "--chunks", "100,100", "--scheduler", real_cluster.address, "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_until(
                lambda: marker_grid(out).sum() >= 20 or proc.poll() is not None, timeout=90, what="20 blocks"
            )
        except TimeoutError as err:
            with real_cluster.client() as client:
                state = diagnose(client)
            proc.kill()
            raise TimeoutError(f"{err}; markers {marker_grid(out)}; {state}; {proc.communicate()}") from None
        assert proc.poll() is None, proc.communicate()
        at_kill = marker_grid(out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with real_cluster.client() as client:  # the scheduler drops the dead client's tasks
            wait_until(lambda: not any(client.processing().values()), timeout=30, what="tasks released")
        gate.release()
        assert proc.returncode == -signal.SIGKILL
        assert at_kill.sum() == 20 and not at_kill[:, 5].any()
        _check_marked_blocks(zarr.open_group(str(out), mode="r"), reference_cosine(a, b), (100, 100))
        r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        gate.release()
    assert r.returncode == 0, r.stderr
    assert "24 blocks (4 written, 20 already done)" in r.stdout  # finished blocks were not recomputed
    got = zarr.open_group(str(out), mode="r")["similarity"][...]
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=TOL64)


def test_embedded_cluster_binds_localhost_only():
    """The CLI's embedded LocalCluster: scheduler, nannies, workers and dashboard on 127.0.0.1."""
    from urllib.parse import urlparse

    from dask_cosim.cluster import dask_client

    with dask_client(workers=1, threads_per_worker=1, echo=None, quiet=True) as client:
        info = client.scheduler_info(n_workers=-1)
        assert urlparse(info["address"]).hostname == "127.0.0.1"
        assert all(urlparse(addr).hostname == "127.0.0.1" for addr in info["workers"])
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        pids = [os.getpid(), *client.run(os.getpid).values(), *client.run(os.getpid, nanny=True).values()]
        addrs = _listening(psutil, pids)
    dashboard_port = urlparse(client.dashboard_link).port
    assert ("127.0.0.1", dashboard_port) in addrs
    assert len(addrs) >= 4 and all(ip == "127.0.0.1" for ip, _ in addrs), addrs
