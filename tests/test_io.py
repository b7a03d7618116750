"""to_zarr / to_parquet: block-by-block writes, markers, resume, overwrite rules, codecs."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from dask.callbacks import Callback
from dask.utils import key_split

import dask_cosim as dcs
from dask_cosim.io import (
    MARKERS,
    OutputExistsError,
    ResumeMismatchError,
    check_output,
    regular_chunks,
)
from dask_cosim.testing import assert_topk_indices, count_task_prefixes, reference_cosine

RTOL = {np.dtype("float32"): 2e-6, np.dtype("float64"): 1e-12}


def _data(shape, dtype="float64", seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _chunk_files(path: Path, array: str) -> dict[str, int]:
    """Data chunk files of ``array`` -> inode (a rewrite replaces the inode: zarr writes via rename)."""
    root = path / array / "c"
    return {str(p.relative_to(root)): p.stat().st_ino for p in root.rglob("*") if p.is_file()}


def _markers(path: Path) -> np.ndarray:
    return zarr.open_group(path, mode="r")[MARKERS][...]


@pytest.fixture(autouse=True)
def _threads():
    # the local threaded scheduler: these tests are about the files, not the cluster
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "chunks", "dtype"),
    [
        ((3, 50, 8), (3, 40, 8), (1, 16, 16), "float64"),
        ((3, 50, 8), (3, 40, 8), (2, 25, 40), "float32"),
        ((50, 8), (33, 8), (20, 7), "float32"),
        ((1, 50, 8), (4, 30, 8), (3, 50, 11), "float64"),  # broadcast batch
    ],
)
def test_similarity_written_block_by_block_matches_numpy(tmp_path, a_shape, b_shape, chunks, dtype):
    a, b = _data(a_shape, dtype, 1), _data(b_shape, dtype, 2)
    S = dcs.cosine_similarity(a, b, chunks=chunks)
    with count_task_prefixes() as counts:
        report = dcs.to_zarr(S, tmp_path / "out.zarr")
    g = zarr.open_group(tmp_path / "out.zarr", mode="r")
    got = g["similarity"][...]
    assert got.dtype == S.dtype
    np.testing.assert_allclose(got, reference_cosine(a, b), rtol=0, atol=10 * RTOL[S.dtype])
    # zarr chunks are the dask blocks, one write task and one marker per block
    assert g["similarity"].chunks == tuple(c[0] for c in S.chunks)
    assert report.blocks == report.blocks_written == math.prod(S.numblocks) == counts["cosine-write"]
    assert _markers(tmp_path / "out.zarr").all()
    info = g.attrs["dask_cosim"]
    assert info["complete"] is True
    assert info["params"]["kind"] == "similarity"
    assert info["params"]["shape"] == list(S.shape)
    assert info["params"]["a"]["shape"] == list(a_shape)
    assert info["params"]["version"] == dcs.__version__


def test_irregular_blocks_are_rechunked_so_no_zarr_chunk_is_shared(tmp_path):
    # blocks (25, 30, 25) cannot be zarr chunks; two blocks writing one chunk concurrently
    # would lose data, so the writer makes the blocks regular first (and says so)
    a, b = _data((2, 80, 6)), _data((2, 45, 6), seed=3)
    S = dcs.cosine_similarity(a, b, chunks=(1, (25, 30, 25), (20, 25)))
    assert not regular_chunks(S.chunks)
    with pytest.warns(UserWarning, match="irregular"):
        dcs.to_zarr(S, tmp_path / "o.zarr")
    g = zarr.open_group(tmp_path / "o.zarr", mode="r")
    assert g["similarity"].chunks == (1, 30, 25)
    with dask.config.set(scheduler="threads", num_workers=8):
        np.testing.assert_allclose(g["similarity"][...], reference_cosine(a, b), atol=1e-12)


def test_all_zero_block_writes_no_chunk_file_but_counts_as_done(tmp_path):
    # write_empty_chunks=False: an all-zero block leaves no chunk file; the marker is what counts
    a = _data((1, 40, 5))
    a[0, :20] = 0.0  # zero vectors -> similarity 0 for the whole first row block
    S = dcs.cosine_similarity(a, chunks=(1, 20, 20))
    out = tmp_path / "z.zarr"
    dcs.to_zarr(S, out)
    files = _chunk_files(out, "similarity")
    assert "0/0/0" not in files and "0/0/1" not in files and "0/1/1" in files
    assert _markers(out).all()
    again = dcs.to_zarr(S, out, resume=True)
    assert again.blocks_written == 0 and again.blocks_skipped == 4
    np.testing.assert_allclose(zarr.open_group(out)["similarity"][...], reference_cosine(a), atol=1e-12)


def test_resume_recomputes_exactly_the_unmarked_blocks(tmp_path):
    a = _data((2, 60, 7))
    S = dcs.cosine_similarity(a, chunks=(1, 20, 20))
    out = tmp_path / "r.zarr"
    dcs.to_zarr(S, out)
    g = zarr.open_group(out, mode="r+")
    # a crash: blocks whose marker never got written, one with a garbage chunk (data written,
    # marker not), plus the temporaries a killed zarr 3.1 local write leaves behind
    lost = [(0, 1, 2), (1, 0, 0), (1, 2, 1)]
    for ix in lost:
        g[MARKERS][ix] = 0
    g["similarity"][1, 0:20, 0:20] = 7.0
    info = dict(g.attrs["dask_cosim"], complete=False)
    g.attrs["dask_cosim"] = info
    # inodes of the chunk files as the crash left them: each is still in use when resume writes
    # its replacement, so a rewrite always shows (a file deleted before the snapshot could lend
    # its freed inode number to a rewritten chunk and hide the rewrite)
    before = _chunk_files(out, "similarity")
    (out / "similarity" / "c" / "0" / "0" / "0.3f2a.partial").write_bytes(b"half a chunk")
    (out / MARKERS / "c" / "1" / "1" / "1.a1b2.partial").write_bytes(b"")

    with pytest.raises(OutputExistsError, match=r"resume=True.*overwrite=True"):
        dcs.to_zarr(S, out)
    with count_task_prefixes() as counts:
        report = dcs.to_zarr(S, out, resume=True)
    assert report.blocks_written == len(lost) == counts["cosine-write"] == counts["cosine-block"]
    assert report.blocks_skipped == math.prod(S.numblocks) - len(lost)
    after = _chunk_files(out, "similarity")
    rewritten = {k for k in before if after.get(k) != before[k]}
    assert rewritten == {"/".join(map(str, ix)) for ix in lost}
    assert not list(out.rglob("*.partial"))
    np.testing.assert_allclose(zarr.open_group(out)["similarity"][...], reference_cosine(a), atol=1e-12)
    assert zarr.open_group(out).attrs["dask_cosim"]["complete"] is True


class _GraphsRun(Callback):
    """The keys of every graph the local scheduler runs (as dask culled it for the computed keys)."""

    def __init__(self):
        super().__init__()
        self.keys: list = []

    def _start(self, dsk):
        self.keys += list(dsk)

    def stage(self, prefix: str) -> set[tuple]:
        """Block indices of the tasks of one stage that ran."""
        return {tuple(k[1:]) for k in self.keys if key_split(k) == prefix}


def _spy(monkeypatch, module) -> list:
    """Record what ``module._write_tasks`` returns on each call."""
    built, real = [], module._write_tasks
    monkeypatch.setattr(module, "_write_tasks", lambda *args: built.append(real(*args)) or built[-1])
    return built


def _one_write_layer(tasks, prefix: str) -> None:
    """The write tasks share one key name (``prefix-<token>``) and one graph layer."""
    from dask.highlevelgraph import HighLevelGraph

    names = {t.key[0] for t in tasks}
    assert len(names) == 1 and key_split(names.pop()) == prefix, names
    layers = {layer for t in tasks for layer in t.__dask_layers__()}
    assert len(layers) == 1, f"{len(layers)} layers for {len(tasks)} write tasks"
    merged = HighLevelGraph.merge(*(t.__dask_graph__() for t in tasks))
    assert len([name for name in merged.layers if prefix in str(name)]) == 1


@pytest.mark.parametrize("self_similar", [False, True])
def test_writes_are_one_layer_and_a_resume_runs_nothing_of_a_finished_block(
    tmp_path, monkeypatch, self_similar
):
    """One ``blockwise`` layer writes every block; resumed, only the unmarked blocks' writes run,
    and of the products only those they read (in the triangle: the upper block a lower one
    transposes), never a finished block's."""
    from dask_cosim import _zarr_writer

    built = _spy(monkeypatch, _zarr_writer)
    a = _data((2, 60, 5))
    S = dcs.cosine_similarity(a, None if self_similar else a.copy(), chunks=(1, 20, 20))
    out = tmp_path / "s.zarr"
    dcs.to_zarr(S, out)
    tasks, pending = built[-1]
    assert len(tasks) == len(pending) == math.prod(S.numblocks) == 18
    _one_write_layer(tasks, "cosine-write")
    lost = [(0, 1, 2), (1, 0, 0), (1, 2, 1)]
    g = zarr.open_group(out, mode="r+")
    for ix in lost:
        g[MARKERS][ix] = 0
    g.attrs["dask_cosim"] = dict(g.attrs["dask_cosim"], complete=False)
    with _GraphsRun() as run, dask.config.set(scheduler="sync"):
        report = dcs.to_zarr(S, out, resume=True)
    tasks, pending = built[-1]
    assert sorted(pending) == sorted(lost) == sorted(t.key[1:] for t in tasks) and report.blocks_written == 3
    _one_write_layer(tasks, "cosine-write")
    assert run.stage("cosine-write") == set(lost)
    upper = {(kb, min(i, j), max(i, j)) for kb, i, j in lost}
    assert run.stage("cosine-block") == (upper if self_similar else set(lost))
    np.testing.assert_allclose(g["similarity"][...], reference_cosine(a), atol=1e-12)


def test_parquet_writes_are_one_layer_and_a_resume_runs_nothing_of_a_finished_partition(
    tmp_path, monkeypatch
):
    import pandas as pd

    from dask_cosim import _parquet_writer

    built = _spy(monkeypatch, _parquet_writer)
    a = _data((2, 40, 3), "float32")
    pairs = dcs.pairs_above(a, a.copy(), threshold=0.5, chunks=(1, 20, 20))
    out = tmp_path / "pairs"
    dcs.to_parquet(pairs, out)
    whole = pd.read_parquet(out).sort_values(["batch", "i", "j"]).reset_index(drop=True)
    assert len(built[-1]) == pairs.npartitions == 8
    _one_write_layer(built[-1], "cosine-parquet")
    for n in (1, 6):
        (out / "_dask_cosim" / "done" / f"{n:06d}").unlink()
    with _GraphsRun() as run, dask.config.set(scheduler="sync"):
        report = dcs.to_parquet(pairs, out, resume=True)
    assert report.blocks_written == len(built[-1]) == 2
    _one_write_layer(built[-1], "cosine-parquet")
    assert run.stage("cosine-parquet") == {(1,), (6,)}
    assert len(run.stage("cosine-pairs")) == 2  # the two partitions' blocks, no other
    got = pd.read_parquet(out).sort_values(["batch", "i", "j"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, whole)


def test_failed_run_leaves_half_written_output_that_must_be_resumed_or_overwritten(tmp_path):
    a = _data((1, 60, 4))
    a[0, 50] = 0.0  # a zero vector in the last row block: zero_vector="error" fails there
    out = tmp_path / "h.zarr"
    bad = dcs.cosine_similarity(a, chunks=(1, 20, 60), zero_vector="error")
    with pytest.raises(dcs.ZeroVectorError):
        dcs.to_zarr(bad, out)
    done = _markers(out)
    assert not done.all()
    assert zarr.open_group(out).attrs["dask_cosim"]["complete"] is False
    good = dcs.cosine_similarity(a, chunks=(1, 20, 60), zero_vector="zero")
    with pytest.raises(OutputExistsError, match=r"half-written.*resume=True.*overwrite=True"):
        dcs.to_zarr(good, out)
    with pytest.raises(ResumeMismatchError, match=r"zero_vector: stored 'error', now 'zero'"):
        dcs.to_zarr(good, out, resume=True)
    report = dcs.to_zarr(good, out, overwrite=True)
    assert report.blocks_written == report.blocks == 3
    np.testing.assert_allclose(zarr.open_group(out)["similarity"][...], reference_cosine(a), atol=1e-12)


def test_existing_outputs_are_never_overwritten_without_asking(tmp_path):
    a = _data((30, 4))
    S = dcs.cosine_similarity(a, chunks=(10, 10))
    out = tmp_path / "e.zarr"
    dcs.to_zarr(S, out)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match=r"already exists; pass overwrite=True"):
        dcs.to_zarr(S, out)
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    # resume of a complete output with the same parameters: nothing to do
    assert dcs.to_zarr(S, out, resume=True).blocks_written == 0
    assert dcs.to_zarr(S, out, overwrite=True).blocks_written == 9
    with pytest.raises(ValueError, match="overwrite=True and resume=True"):
        dcs.to_zarr(S, out, overwrite=True, resume=True)
    # someone else's zarr array: replaced only with overwrite=True
    other = tmp_path / "other.zarr"
    zarr.create_array(other, shape=(3,), dtype="f4")
    with pytest.raises(OutputExistsError, match="not a zarr group written by dask_cosim"):
        dcs.to_zarr(S, other)
    dcs.to_zarr(S, other, overwrite=True)
    # a directory of non-zarr files, or a file: never deleted, even with overwrite=True
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for target in (folder, folder / "notes.txt"):
        with pytest.raises(OutputExistsError, match="not zarr; refusing"):
            dcs.to_zarr(S, target, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    dcs.to_zarr(S, tmp_path / "empty")


def test_resume_checks_parameters_before_computing(tmp_path):
    a, b = _data((2, 30, 4)), _data((2, 20, 4), seed=1)
    out = tmp_path / "p.zarr"
    dcs.to_zarr(dcs.cosine_similarity(a, b, chunks=(1, 10, 10)), out)
    cases = {
        "chunks": dcs.cosine_similarity(a, b, chunks=(1, 15, 10)),
        "dtype": dcs.cosine_similarity(a, b, chunks=(1, 10, 10), dtype="float32"),
        "shape": dcs.cosine_similarity(a, b[:, :10], chunks=(1, 10, 10)),
    }
    for key, other in cases.items():
        with pytest.raises(ResumeMismatchError, match=rf"{key}: stored .*, now .*overwrite=True"):
            check_output(other, out, resume=True)
        with pytest.raises(ResumeMismatchError, match=key), count_task_prefixes() as counts:
            dcs.to_zarr(other, out, resume=True)
        assert not counts  # refused before computing anything
    with pytest.raises(ResumeMismatchError, match="codec: stored 'none', now 'zstd'"):
        dcs.to_zarr(dcs.cosine_similarity(a, b, chunks=(1, 10, 10)), out, resume=True, codec="zstd")


def blosc_lz4_bitshuffle(arr) -> bool:
    """The array is stored with blosc-lz4 and bitshuffle over its own item size (and nothing else)."""
    (codec,) = arr.compressors
    got = (type(codec).__name__, codec.cname.value, codec.shuffle.value, codec.typesize)
    return got == ("BloscCodec", "lz4", "bitshuffle", arr.dtype.itemsize)


def test_codec_auto_stores_similarity_uncompressed_and_topk_as_blosc_lz4_bitshuffle(tmp_path):
    a = _data((40, 6), "float32")
    dcs.to_zarr(dcs.cosine_similarity(a, chunks=(20, 20)), tmp_path / "s.zarr")  # codec="auto": the default
    dcs.to_zarr(dcs.topk(a, k=3, chunks=(20, 20)), tmp_path / "t.zarr")
    assert zarr.open_group(tmp_path / "s.zarr")["similarity"].compressors == ()
    t = zarr.open_group(tmp_path / "t.zarr")
    assert blosc_lz4_bitshuffle(t["values"]) and blosc_lz4_bitshuffle(t["indices"])
    assert t["indices"].dtype == np.int64
    # an explicit "auto" is the same choice: resuming with it finds nothing different
    report = dcs.to_zarr(dcs.topk(a, k=3, chunks=(20, 20)), tmp_path / "t.zarr", resume=True, codec="auto")
    assert report.blocks_written == 0
    with pytest.raises(ResumeMismatchError, match="codec"):
        dcs.to_zarr(dcs.topk(a, k=3, chunks=(20, 20)), tmp_path / "t.zarr", resume=True, codec="none")


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-lz4"])
def test_codecs_round_trip(tmp_path, codec):
    a = _data((40, 6), "float32")
    S = dcs.cosine_similarity(a, chunks=(20, 20))
    dcs.to_zarr(S, tmp_path / "c.zarr", codec=codec)
    arr = zarr.open_group(tmp_path / "c.zarr")["similarity"]
    assert (len(arr.compressors) == 0) == (codec == "none")
    np.testing.assert_allclose(arr[...], reference_cosine(a), atol=2e-6)
    with pytest.raises(ValueError, match="codec: expected one of"):
        dcs.to_zarr(S, tmp_path / "d.zarr", codec="lzma")


def test_wrong_result_types_are_refused(tmp_path):
    with pytest.raises(TypeError, match="result: expected the dask array"):
        dcs.to_zarr(np.ones((2, 2)), tmp_path / "x.zarr")
    with pytest.raises(TypeError, match="pairs: expected the dask DataFrame"):
        dcs.to_parquet(np.ones((2, 2)), tmp_path / "x")
    assert not (tmp_path / "x.zarr").exists()


def test_npy_and_zarr_inputs(tmp_path):
    a, b = _data((2, 30, 5), "float32"), _data((2, 25, 5), "float32", 1)
    np.save(tmp_path / "a.npy", a)
    zarr.create_array(tmp_path / "b.zarr", shape=b.shape, chunks=(1, 10, 5), dtype="float32")[...] = b
    S = dcs.cosine_similarity(str(tmp_path / "a.npy"), str(tmp_path / "b.zarr"), chunks=(1, 10, 10))
    dcs.to_zarr(S, tmp_path / "o.zarr")
    got = zarr.open_group(tmp_path / "o.zarr")["similarity"][...]
    np.testing.assert_allclose(got, reference_cosine(a, b), atol=2e-6)
    params = zarr.open_group(tmp_path / "o.zarr").attrs["dask_cosim"]["params"]
    assert params["a"]["path"].endswith("a.npy") and params["b"]["path"].endswith("b.zarr")


def test_fsspec_url_outputs(tmp_path):
    """Object-storage style outputs (an fsspec URL; the in-memory filesystem stands in for s3://)."""
    import fsspec
    import pandas as pd

    root = f"memory://{tmp_path.name}"
    a = _data((2, 40, 5))
    S = dcs.cosine_similarity(a, chunks=(1, 20, 20))
    try:
        assert dcs.to_zarr(S, f"{root}/s.zarr").blocks_written == 8
        got = zarr.open_group(f"{root}/s.zarr", mode="r")["similarity"][...]
        np.testing.assert_allclose(got, reference_cosine(a), atol=1e-12)
        with pytest.raises(OutputExistsError):
            dcs.to_zarr(S, f"{root}/s.zarr")
        assert dcs.to_zarr(S, f"{root}/s.zarr", resume=True).blocks_written == 0
        pairs = dcs.pairs_above(a, threshold=0.3, chunks=(1, 20, 20))
        dcs.to_parquet(pairs, f"{root}/pairs")
        assert len(pd.read_parquet(f"{root}/pairs")) == len(pairs.compute()) > 0
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)


# --------------------------------------------------------------------------- top-k and pairs


def _ref_topk(a, b, k, exclude_self=False):
    s = reference_cosine(a, b)
    if exclude_self:
        n = s.shape[-1]
        s[..., np.arange(n), np.arange(n)] = -np.inf
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, order, axis=-1), order


def test_topk_written_as_values_and_indices(tmp_path):
    a, b = _data((2, 50, 6), "float32"), _data((2, 70, 6), "float32", 5)
    vals, idx = dcs.topk(a, b, k=5, chunks=(1, 20, 30))
    out = tmp_path / "t.zarr"
    report = dcs.to_zarr((vals, idx), out)
    g = zarr.open_group(out, mode="r")
    ref_v, ref_i = _ref_topk(a, b, 5)
    np.testing.assert_allclose(g["values"][...], ref_v, atol=2e-6)
    assert_topk_indices(g["indices"][...], reference_cosine(a, b), atol=2e-6)  # float32: up to near-ties
    assert g["indices"].dtype == np.int64
    assert g["values"].chunks[:2] == (1, 20) and g["values"].chunks == g["indices"].chunks
    assert report.kind == "topk" and report.blocks == 2 * 3 == _markers(out).size
    params = g.attrs["dask_cosim"]["params"]
    assert params["kind"] == "topk" and params["k"] == 5
    # resume with another k is refused before anything runs
    with pytest.raises(ResumeMismatchError, match="k: stored 5, now 4"):
        dcs.to_zarr(dcs.topk(a, b, k=4, chunks=(1, 20, 30)), out, resume=True)


def test_pairs_to_parquet_one_file_per_block_and_resume(tmp_path):
    import pandas as pd

    a = _data((2, 40, 3), "float32")
    pairs = dcs.pairs_above(a, a.copy(), threshold=0.5, chunks=(1, 20, 20))
    out = tmp_path / "pairs"
    report = dcs.to_parquet(pairs, out)
    assert report.blocks == pairs.npartitions
    assert len(list(out.glob("part-*.parquet"))) == pairs.npartitions
    got = pd.read_parquet(out).sort_values(["batch", "i", "j"]).reset_index(drop=True)
    s = reference_cosine(a, a)
    kb, i, j = np.nonzero(s >= 0.5)
    assert list(got.columns) == ["batch", "i", "j", "score"]
    np.testing.assert_array_equal(got[["batch", "i", "j"]].to_numpy(), np.stack([kb, i, j], axis=1))
    np.testing.assert_allclose(got["score"], s[kb, i, j], atol=2e-6)
    with pytest.raises(OutputExistsError, match="already exists"):
        dcs.to_parquet(pairs, out)
    # crash simulation: two partitions lost their marker, one left a temporary file
    for n in (1, 3):
        (out / "_dask_cosim" / "done" / f"{n:06d}").unlink()
    (out / ".part-000001.999.tmp").write_bytes(b"partial")
    attrs = out / "_dask_cosim" / "attrs.json"
    attrs.write_text(attrs.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(OutputExistsError, match=r"resume=True.*overwrite=True"):
        dcs.to_parquet(pairs, out)
    again = dcs.to_parquet(pairs, out, resume=True)
    assert again.blocks_written == 2 and again.blocks_skipped == pairs.npartitions - 2
    assert not list(out.glob(".part-*"))
    pd.testing.assert_frame_equal(
        pd.read_parquet(out).sort_values(["batch", "i", "j"]).reset_index(drop=True), got
    )
    other = dcs.pairs_above(a, a.copy(), threshold=0.6, chunks=(1, 20, 20))
    with pytest.raises(ResumeMismatchError, match="threshold"):
        dcs.to_parquet(other, out, resume=True)


# --------------------------------------------------------------------------- on a distributed cluster


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with dask.config.set(scheduler=None):
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=2,
                processes=False,
                dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster) as c,
        ):
            yield c


def test_distributed_write_with_progress_bar(tmp_path, client, capsys, monkeypatch):
    monkeypatch.setattr("dask_cosim._execution._is_terminal", lambda stream: True)  # as in a terminal
    a = _data((2, 64, 8), "float32")
    S = dcs.cosine_similarity(a, chunks=(1, 32, 32))
    with dask.config.set(scheduler=None):
        report = dcs.to_zarr(S, tmp_path / "d.zarr", progress=True)
    out = capsys.readouterr().out
    assert "100% Completed" in out  # distributed.progress's text bar
    assert report.blocks_written == 8
    np.testing.assert_allclose(
        zarr.open_group(tmp_path / "d.zarr")["similarity"][...], reference_cosine(a), atol=2e-6
    )


def test_output_larger_than_worker_memory_completes(tmp_path):
    """512 MiB of output through one worker limited to 320 MiB (no spilling allowed).

    Measured: the worker peaks at its baseline (~170 MiB) + about 6 blocks of 8 MiB; a
    plain ``compute()``/``persist()`` of the same array gets the worker killed.
    """
    from distributed import Client, LocalCluster

    a = _data((2, 8192, 16), "float32")
    np.save(tmp_path / "a.npy", a)
    S = dcs.cosine_similarity(str(tmp_path / "a.npy"), chunks=(1, 2048, 1024))
    assert S.size * S.dtype.itemsize == 2 * 8192 * 8192 * 4
    memory = {f"distributed.worker.memory.{k}": v for k, v in [("target", False), ("spill", False)]}
    memory.update({"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": 0.98})
    limit = 320 * 2**20
    with dask.config.set({**memory, "scheduler": None}):
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=2,
                processes=True,
                memory_limit=limit,
                dashboard_address="127.0.0.1:0",
                host="127.0.0.1",
            ) as cluster,
            Client(cluster) as c,
        ):
            pid = c.run(os.getpid)
            report = dcs.to_zarr(S, tmp_path / "big.zarr")
            assert c.run(os.getpid) == pid  # the worker was never restarted
    assert S.size * S.dtype.itemsize > limit
    assert report.blocks_written == 2 * 4 * 8
    g = zarr.open_group(tmp_path / "big.zarr", mode="r")["similarity"]
    for kb, i, j in [(0, 0, 7), (1, 2, 1), (1, 3, 6)]:  # whole blocks, upper and lower triangle
        rows, cols = slice(2048 * i, 2048 * (i + 1)), slice(1024 * j, 1024 * (j + 1))
        ref = reference_cosine(a[kb, rows], a[kb, cols])
        np.testing.assert_allclose(g[kb, rows, cols], ref, atol=2e-6)


def test_parquet_write_error_raises_after_the_running_writes_end(tmp_path, monkeypatch):
    """A failed partition write: to_parquet raises only after the writes running on other
    threads have ended, so no partition or marker lands after the error.

    Partition 1 fails once another write is running; that write (the first to start)
    stays in flight until the call has raised or 2 s have passed, so a call that raised
    without waiting for it is caught with a write started and not ended.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    real_write = pq.write_table
    lock, started, ended = threading.Lock(), [], []
    holder, failed, raised = threading.Event(), threading.Event(), threading.Event()

    def recording_or_failing(table, where, *args, **kwargs):
        name = str(getattr(where, "path", where))
        if ".part-000001." in name:
            holder.wait(60)
            failed.set()
            raise OSError(28, "No space left on device")
        with lock:
            started.append(name)
            hold = not holder.is_set()
            holder.set()
        try:
            if hold:
                failed.wait(60)
                raised.wait(2)
            return real_write(table, where, *args, **kwargs)
        finally:
            with lock:
                ended.append(name)

    monkeypatch.setattr(pq, "write_table", recording_or_failing)
    a = _data((1, 40, 3), "float32")
    pairs = dcs.pairs_above(a, a.copy(), threshold=-1.0, chunks=(1, 20, 20))  # 4 partitions
    out = tmp_path / "pairs"
    pool = ThreadPoolExecutor(2)
    with dask.config.set(scheduler="threads", pool=pool), pytest.raises(OSError, match="No space"):
        dcs.to_parquet(pairs, out)
    with lock:
        at_raise = sorted(started), sorted(ended)
    done = out / "_dask_cosim" / "done"
    before = sorted(p.name for p in done.iterdir())
    raised.set()
    assert holder.is_set()  # a write was running when partition 1 failed ...
    assert at_raise[0] == at_raise[1]  # ... and had ended when to_parquet raised
    pool.shutdown(wait=True)  # every task dask handed the pool has ended: a late write would be here
    assert sorted(started) == at_raise[0]  # no write began after the raise
    assert sorted(p.name for p in done.iterdir()) == before
    assert "000001" not in before


def test_summary_counts_the_products_computed_and_what_was_found(tmp_path):
    a = np.random.default_rng(7).standard_normal((2, 300, 16)).astype("float32")
    a[1, 5] = np.nan  # a NaN vector: its own top-k row is NaN
    # self-similarity, 3 x 3 blocks of 100 per batch: only the 6 upper blocks are multiplied
    report = dcs.to_zarr(dcs.cosine_similarity(a, chunks=(1, 100, 100)), tmp_path / "s.zarr")
    assert report.pairs == 2 * 300 * 300 and report.products == 2 * 6 * 100 * 100
    assert report.gflops == pytest.approx(2 * report.products * 16 / report.seconds / 1e9)
    assert "; self-similarity: 1.2e+05 of 1.8e+05 products computed" in report.summary()
    # two inputs: every pair is a product, and the summary says nothing more
    report = dcs.to_zarr(dcs.cosine_similarity(a, a[:, :200], chunks=(1, 100, 100)), tmp_path / "ab.zarr")
    assert report.products == report.pairs == 2 * 300 * 200 and ";" not in report.summary()
    report = dcs.to_zarr(dcs.topk(a, k=3, chunks=(1, 100, 100)), tmp_path / "t.zarr")
    assert (report.rows, report.k, report.nan_rows) == (600, 3, 1)
    assert "; 600 rows x 3 neighbours, 1 with a NaN score" in report.summary()
    pairs = dcs.pairs_above(a, threshold=0.5, chunks=(1, 100, 100))
    report = dcs.to_parquet(pairs, tmp_path / "p")
    n = len(pairs.compute())
    assert report.found == n > 0 and f"; found {n} pairs with score >= 0.5" in report.summary()
    assert report.products == 2 * 6 * 100 * 100


def test_plain_progress_prints_a_line_every_interval_and_at_the_end(capsys):
    from dask_cosim._execution import _PlainProgress

    done, seen = [3], []
    with _PlainProgress(lambda: done[0], 12, interval=0.01) as bar:
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:  # poll until two periodic lines came
            seen += capsys.readouterr().out.splitlines()
            time.sleep(0.01)
        done[0] = 12
    assert len(seen) >= 2 and all(line.startswith("progress: 3/12 blocks written (25%), ") for line in seen)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("progress: 12/12 blocks written (100%), ") and lines[-1].endswith(" s")
    assert not bar._thread.is_alive()


@pytest.mark.parametrize("where", ["distributed", "threads"])
def test_progress_off_a_terminal_is_plain_lines(tmp_path, client, capsys, where):
    """stdout is not a terminal (pytest captures it, as a batch job's log would): no \\r frames,
    plain lines every ``cosine.progress-interval`` and one at the end."""
    a = _data((2, 64, 8), "float32")
    S = dcs.cosine_similarity(a, a[:, :48], chunks=(1, 32, 16))
    scheduler = None if where == "distributed" else "threads"
    with dask.config.set({"scheduler": scheduler, "cosine.progress-interval": "10ms"}):
        report = dcs.to_zarr(S, tmp_path / "d.zarr", progress=True)
    out = capsys.readouterr().out
    assert "\r" not in out and "Completed" not in out
    assert out.splitlines()[-1].startswith("progress: 12/12 blocks written (100%), ")
    assert report.blocks_written == 12
    with (
        dask.config.set({"cosine.progress-interval": "0s"}),
        pytest.raises(ValueError, match="progress-interval"),
    ):
        dcs.to_zarr(S, tmp_path / "e.zarr", progress=True)


_RELEASE = threading.Event()


def _held_until_released():
    """A task that runs until the test releases it (module level: the cluster pickles it)."""
    _RELEASE.wait(60)


def test_a_ctrl_c_while_a_cluster_job_runs_is_noted_and_raised_between_two_looks():
    """SIGINT is only noted while a job waits on a distributed client, and raised by the
    wait loop itself: never inside a lock that distributed's event loop also takes (a
    KeyboardInterrupt there can leave it held, and the cluster's shutdown then hangs)."""
    import signal
    import traceback

    from distributed import Client, LocalCluster

    from dask_cosim._execution import WriteGate, execute

    before = signal.getsignal(signal.SIGINT)
    _RELEASE.clear()
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        tasks = [dask.delayed(_held_until_released)(dask_key_name=f"held-{i}") for i in range(2)]
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            with pytest.raises(KeyboardInterrupt) as raised:
                execute(tasks, progress=False, gate=WriteGate())  # the tasks are still held here
        finally:
            _RELEASE.set()  # the cluster's threads can end
        where = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
        assert where[-2:] == ["_wait_for", "stop_if_asked"], where  # raised there, by its handler
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored_while_a_cluster_job_runs():
    """A process that ignores SIGINT (started in the background of a script, or told to
    ignore it) is not made interruptible by a job: nothing is noted, nothing raised, and
    the signal is still ignored afterwards."""
    import signal

    from dask_cosim._execution import _stops_noted

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        steps = []
        with _stops_noted() as stop_if_asked:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            stop_if_asked()
            steps.append("went on")
        assert steps == ["went on"] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_stops_noted_until_asked_or_until_the_block_ends():
    import signal

    from dask_cosim._execution import _stops_noted

    class Stopped(Exception):
        pass

    def on_term(signum, frame):
        raise Stopped()

    before_int, before_term = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, on_term)
    try:
        steps = []
        with pytest.raises(Stopped):  # a SIGTERM with a Python handler: noted, raised when asked
            with _stops_noted() as stop_if_asked:
                signal.raise_signal(signal.SIGTERM)
                steps.append("noted")
                stop_if_asked()
                steps.append("not reached")
        assert steps == ["noted"]
        with pytest.raises(KeyboardInterrupt):  # noted during the last steps: raised at the end
            with _stops_noted():
                signal.raise_signal(signal.SIGINT)
                steps.append("finished")
        assert steps == ["noted", "finished"]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (before_int, on_term)
        seen = []  # another thread receives no signals: nothing is changed there
        thread = threading.Thread(target=lambda: seen.append(_stops_noted().__enter__()()))
        thread.start()
        thread.join()
        assert seen == [None] and signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, before_term)
