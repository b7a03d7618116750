"""Bad data and bad output locations: NaN/inf, ``check_finite``, disk full, read-only output.

Runs on the real multi-process cluster where the behaviour could differ from the local
schedulers (exceptions pickled back, writes done by worker processes) and through the
``dask-cosim`` command line.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_cosim as dcs
from dask_cosim.testing import reference_cosine

from ._real_cluster import make_failing_store

pytestmark = pytest.mark.timeout(180)

RESULT_TIMEOUT = 90
TOL64 = 1e-12


def rng(seed=0):
    return np.random.default_rng(seed)


def cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run ``dask-cosim`` (``python -m dask_cosim``) in a subprocess, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "dask_cosim", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def nan_reference(a, b):
    """Documented semantics: a vector holding NaN or inf has NaN similarity with everything;
    every other entry equals the float64 reference (rows pre-scaled: cosine is scale-free,
    and 1e300 would overflow the reference's own norm)."""
    bad_a = ~np.isfinite(a).all(axis=-1)
    bad_b = ~np.isfinite(b).all(axis=-1)

    def scaled(x, bad):
        x = np.where(bad[..., None], 1.0, x)
        return x / np.abs(x).max(axis=-1, keepdims=True)

    ref = reference_cosine(scaled(a, bad_a), scaled(b, bad_b))
    return np.where(bad_a[..., :, None] | bad_b[..., None, :], np.nan, ref)


def with_bad_values(shape, seed):
    x = rng(seed).standard_normal(shape)
    flat = x.reshape(-1, shape[-1])
    flat[3, 1] = np.nan
    flat[7, 0] = np.inf
    flat[8, 2] = -np.inf
    flat[10] = 1e300  # huge but finite: must not overflow into NaN
    return x


# ---------------------------------------------------------------- NaN / inf semantics


def test_nan_inf_semantics_on_the_cluster(real_cluster):
    a, b = with_bad_values((2, 40, 6), 1), with_bad_values((2, 30, 6), 2)
    with real_cluster.client() as client:
        got = client.compute(dcs.cosine_similarity(a, b, chunks=(1, 16, 16))).result(timeout=RESULT_TIMEOUT)
    ref = nan_reference(a, b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=TOL64)
    # the 1e300 row (batch 0, row 10) is NaN only against b's non-finite vectors
    np.testing.assert_array_equal(np.isnan(got[0, 10]), ~np.isfinite(b[0]).all(axis=-1))


def test_nan_inf_through_the_cli(real_cluster, tmp_path):
    a, b = with_bad_values((50, 6), 3), with_bad_values((45, 6), 4)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "out.zarr"
    r = cli("run", tmp_path / "a.npy", tmp_path / "b.npy", "-o", out, "--chunks", "20,20",
            "--scheduler", real_cluster.address, "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = zarr.open_group(str(out))["similarity"][...]
    ref = nan_reference(a, b)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=TOL64)


# ---------------------------------------------------------------- check_finite


@st.composite
def arrays_with_bad_rows(draw):
    batched = draw(st.booleans())
    batch = draw(st.integers(1, 3)) if batched else 1
    n, d = draw(st.integers(1, 40)), draw(st.integers(1, 5))
    x = np.ones((batch, n, d))
    for _ in range(draw(st.integers(0, 4))):
        k, i, j = draw(st.integers(0, batch - 1)), draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
        x[k, i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    x = x if batched else x[0]
    chunks = tuple(draw(st.integers(1, max(1, s))) for s in x.shape)
    return x, chunks


@given(arrays_with_bad_rows())
@settings(max_examples=60, deadline=None)
def test_check_finite_names_a_bad_vector_of_the_failing_block(case):
    """Whichever block fails first: the named vector is bad, the first bad one of its block,
    with its first bad column and kind, and the count is that block's."""
    x, chunks = case
    bad_rows = ~np.isfinite(x).all(axis=-1)
    S = dcs.cosine_similarity(da.from_array(x, chunks=chunks), check_finite=True)
    if not bad_rows.any():
        S.compute(scheduler="sync")
        return
    with pytest.raises(dcs.NonFiniteError) as info:
        S.compute(scheduler="sync")
    m = re.match(
        r"a: (\d+) vector\(s\) hold NaN or inf in (?:batch (\d+):(\d+), )?rows (\d+):(\d+); the first is at "
        r"(?:batch (\d+), )?row (\d+) \((nan|inf|-inf) in column (\d+)\); check_finite=True refuses",
        str(info.value),
    )
    assert m, str(info.value)
    count, b0, b1, r0, r1, batch, row, kind, col = m.groups()
    x3, bad3 = (x, bad_rows) if x.ndim == 3 else (x[None], bad_rows[None])
    b0, b1 = (int(b0), int(b1)) if b0 is not None else (0, 1)
    batch = int(batch) if batch is not None else 0
    r0, r1, row, col = int(r0), int(r1), int(row), int(col)
    block = bad3[b0:b1, r0:r1]
    assert int(count) == block.sum()
    first = np.argwhere(block)[0]  # C order: batch, then row
    assert (batch, row) == (b0 + first[0], r0 + first[1])
    vec = x3[batch, row]
    assert col == int(np.argmax(~np.isfinite(vec)))
    assert kind == ("nan" if np.isnan(vec[col]) else "inf" if vec[col] > 0 else "-inf")


def test_check_finite_names_the_input_block_and_first_bad_vector():
    a, b = np.ones((2, 20, 4)), np.ones((2, 10, 4))
    a[1, 7, 2], a[1, 9, 0] = np.nan, np.inf
    b[0, 3, 1] = -np.inf
    S = dcs.cosine_similarity(a, b, check_finite=True, chunks=(2, 20, 10))  # nothing is read here
    with pytest.raises(dcs.NonFiniteError) as info:
        S.compute()
    msg = str(info.value)  # whichever input's block failed first
    assert msg in (
        "a: 2 vector(s) hold NaN or inf in batch 0:2, rows 0:20; the first is at batch 1, row 7 "
        "(nan in column 2); check_finite=True refuses non-finite inputs",
        "b: 1 vector(s) hold NaN or inf in batch 0:2, rows 0:10; the first is at batch 0, row 3 "
        "(-inf in column 1); check_finite=True refuses non-finite inputs",
    ), msg
    S = dcs.cosine_similarity(np.ones((3, 2)), check_finite=True)  # finite: no error
    np.testing.assert_allclose(S.compute(), np.ones((3, 3)))


def test_check_finite_runs_on_the_cluster_over_zarr(real_cluster, tmp_path):
    a = rng(5).standard_normal((3, 200, 8)).astype("float32")
    a[2, 150, 5] = np.inf
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=a.shape, chunks=(1, 50, 8), dtype=a.dtype)
    z[...] = a
    with real_cluster.client():
        S = dcs.cosine_similarity(str(tmp_path / "a.zarr"), check_finite=True)
        with pytest.raises(
            dcs.NonFiniteError, match=r"a: 1 vector\(s\).* batch 2, row 150 \(inf in column 5\)"
        ):
            S.compute()


def test_cli_check_finite_fails_in_the_tasks_and_writes_no_block(real_cluster, tmp_path):
    a = rng(6).standard_normal((30, 4))
    a[12, 3] = np.nan
    np.save(tmp_path / "a.npy", a)
    out = tmp_path / "out.zarr"
    r = cli("run", tmp_path / "a.npy", "-o", out, "--check-finite", "--scheduler", real_cluster.address)
    assert r.returncode == 1, r.stderr
    assert "NonFiniteError" in r.stderr and "row 12 (nan in column 3)" in r.stderr, r.stderr
    assert "--check-finite refuses" in r.stderr and "Traceback" not in r.stderr
    assert not zarr.open_group(str(out))["_blocks_done"][...].any()  # the one input block is bad
    r = cli(
        "run", tmp_path / "a.npy", "-o", tmp_path / "knn.zarr", "--topk", "3", "--check-finite",
        "--scheduler", real_cluster.address,
    )  # fmt: skip
    assert r.returncode == 1 and "row 12 (nan in column 3)" in r.stderr, r.stderr
    r = cli(
        "run", tmp_path / "a.npy", "-o", out, "--scheduler", real_cluster.address, "--quiet", "--overwrite"
    )
    assert r.returncode == 0, r.stderr  # without the flag: documented NaN semantics
    assert np.isnan(zarr.open_group(str(out))["similarity"][12]).all()


# ---------------------------------------------------------------- output location failures


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_write_error_is_clear_and_markers_claim_only_written_blocks(real_cluster, tmp_path, err):
    a = rng(7).standard_normal((300, 8))
    ref = reference_cosine(a)
    path = tmp_path / "out.zarr"
    store = make_failing_store(path, ["similarity/c/1/2"], err)  # block (1, 2) cannot be written
    with real_cluster.client():
        S = dcs.cosine_similarity(a, a.copy(), chunks=(100, 100))
        with pytest.raises(OSError) as info:
            dcs.to_zarr(S, store)
    assert info.value.errno == err
    msg = str(info.value)
    assert "cannot write block (1, 2)" in msg and str(path) in msg and os.strerror(err) in msg
    group = zarr.open_group(str(path), mode="r")
    done = group["_blocks_done"][...]
    assert done[1, 2] == 0
    sim = group["similarity"]
    for i, j in np.argwhere(done == 1):  # every marker stands for a fully written block
        block = sim[i * 100 : (i + 1) * 100, j * 100 : (j + 1) * 100]
        np.testing.assert_allclose(block, ref[i * 100 : (i + 1) * 100, j * 100 : (j + 1) * 100], atol=TOL64)
    # once the location is healthy again, resume finishes only what is missing
    with real_cluster.client():
        S = dcs.cosine_similarity(a, a.copy(), chunks=(100, 100))
        report = dcs.to_zarr(S, str(path), resume=True)
    assert report.blocks_skipped == int(done.sum()) and report.blocks_written == 9 - int(done.sum())
    np.testing.assert_allclose(zarr.open_group(str(path))["similarity"][...], ref, atol=TOL64)


def _recording_failing_store(path, events: Path, fail_key: str):
    """A local zarr store whose block writes leave ``start-``/``end-`` files in ``events``.

    ``fail_key`` fails, but only once another block write is running: the first write to
    start (the "holder") then stays in flight until the caller has raised (the ``raised``
    file) or 2 s have passed. So a write is running when the block fails, whatever the
    load: a caller that raises without waiting for it is caught in the act (a start
    without an end), and a correct one waits those 2 s at most.
    """
    import asyncio

    from zarr.storage import LocalStore, WrapperStore

    async def until(flag: Path, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not flag.exists():
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def claim(flag: Path) -> bool:
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    class RecordingFailingStore(WrapperStore):
        async def set(self, key, value, *args, **kwargs):
            if not key.startswith("similarity/c/"):
                return await self._store.set(key, value, *args, **kwargs)
            if key == fail_key:
                await until(events / "holder", 60)
                (events / "failed").touch()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
            name = key.replace("/", "_")
            (events / f"start-{name}").touch()
            try:
                if claim(events / "holder"):
                    await until(events / "failed", 60)
                    await until(events / "raised", 2)
                return await self._store.set(key, value, *args, **kwargs)
            finally:
                (events / f"end-{name}").touch()

    return RecordingFailingStore(LocalStore(str(path)))


def _events(events: Path, kind: str) -> set[str]:
    return {p.name.removeprefix(kind) for p in events.glob(f"{kind}*")}


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_write_error_raises_after_the_running_writes_end(real_cluster, tmp_path, scheduler):
    """When to_zarr raises, no block is written any more: the writes that were running
    on other threads (or workers) when one failed have finished first."""
    from concurrent.futures import ThreadPoolExecutor

    import dask

    from ._real_cluster import wait_until

    a = rng(9).standard_normal((300, 8))
    path, events = tmp_path / "out.zarr", tmp_path / "events"
    events.mkdir()
    store = _recording_failing_store(path, events, "similarity/c/0/1")
    pool = ThreadPoolExecutor(2)
    ctx = (
        real_cluster.client()
        if scheduler == "distributed"
        else dask.config.set(scheduler="threads", pool=pool)
    )
    with ctx as client:
        S = dcs.cosine_similarity(a, a.copy(), chunks=(100, 100))
        with pytest.raises(OSError, match=r"cannot write block \(0, 1\)"):
            dcs.to_zarr(S, store)
        started, ended = _events(events, "start-"), _events(events, "end-")
        markers = zarr.open_group(str(path), mode="r")["_blocks_done"]
        at_raise = markers[...]
        (events / "raised").touch()
        assert (events / "holder").exists()  # a write was running when the block failed ...
        assert started == ended, f"raised while writing {started - ended}"  # ... and had ended
        # everything dask or the cluster was given has finished: a late write would be there now
        if scheduler == "distributed":
            wait_until(lambda: not any(client.processing().values()), 60, "idle workers", client=client)
        else:
            pool.shutdown(wait=True)
    assert _events(events, "start-") == started  # no block write began after the raise
    np.testing.assert_array_equal(markers[...], at_raise)
    assert at_raise[0, 1] == 0


def _make_read_only(directory: Path) -> bool:
    """chmod 555, plus the immutable attribute where permissions do not bind (root)."""
    os.chmod(directory, 0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], capture_output=True, check=False)
    try:
        (directory / "probe").mkdir()
    except PermissionError:
        return True
    (directory / "probe").rmdir()
    return False


def test_cli_read_only_output_location(real_cluster, tmp_path):
    """A real read-only directory: a clear one-line error, nothing created."""
    np.save(tmp_path / "a.npy", rng(8).standard_normal((20, 4)))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    try:
        if not _make_read_only(readonly):
            pytest.skip("cannot make a read-only directory here (root without chattr)")
        out = readonly / "out.zarr"
        r = cli("run", tmp_path / "a.npy", "-o", out, "--scheduler", real_cluster.address, "--quiet")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "PermissionError" in r.stderr and str(out) in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
    finally:
        subprocess.run(["chattr", "-i", str(readonly)], capture_output=True, check=False)
        os.chmod(readonly, 0o755)
