"""The ``dask-cosim`` command: end-to-end jobs, every bad input, kill -9 + resume, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import psutil
import pytest
import zarr

import dask_cosim as dcs
from dask_cosim.cli import build_parser, main
from dask_cosim.io import MARKERS, regular_chunks
from dask_cosim.testing import assert_topk_indices, reference_cosine

from .test_io import blosc_lz4_bitshuffle

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"(?:^|\r)(?P<path>[^\s\x1b]+): (?P<kind>\w+) shape \((?P<shape>[\d, ]+)\), (?P<blocks>\d+) blocks "
    r"\((?P<written>\d+) written(, (?P<skipped>\d+) already done)?\) in [\d.]+ s, [\d.e+]+ pairs/s"
    r"(, [\d.]+ GFLOP/s)?(?P<counts>(; [^;\n]+)*)$",
    re.M,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs of every kind, good and bad."""
    d = tmp_path_factory.mktemp("cli")
    a = _rng(0).standard_normal((2, 300, 16)).astype("float32")
    b = _rng(1).standard_normal((2, 200, 16)).astype("float32")
    za = zarr.create_array(d / "a.zarr", shape=a.shape, chunks=(1, 100, 16), dtype="float32")
    za[...] = a
    np.save(d / "b.npy", b)
    np.save(d / "flat.npy", np.ones(5, dtype="float32"))
    np.save(d / "d8.npy", np.ones((2, 200, 8), dtype="float32"))
    zarr.open_group(d / "group.zarr", mode="w").create_array("x", shape=(3, 2), dtype="f4")
    (d / "notzarr").mkdir()
    (d / "notzarr" / "readme.txt").write_text("not zarr")
    return {"dir": d, "a": a, "b": b, "A": str(d / "a.zarr"), "B": str(d / "b.npy")}


def _run(capsys, *args):
    rc = main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _summary(out: str) -> re.Match:
    match = SUMMARY.search(out)
    assert match, out
    return match


def test_similarity_job_end_to_end(data, scheduler, capsys, tmp_path):
    out = tmp_path / "s.zarr"
    rc, stdout, err = _run(
        capsys,
        data["A"],
        data["B"],
        "-o",
        out,
        "--chunks",
        "1,128,128",
        "--scheduler",
        scheduler.scheduler_address,
    )
    assert rc == 0, err
    assert f"Connected to {scheduler.scheduler_address}; dashboard: http://127.0.0.1:" in stdout
    assert "\r" not in stdout and "progress: 12/12 blocks written (100%)" in stdout  # not a terminal: plain
    m = _summary(stdout)
    assert m["path"] == str(out) and m["kind"] == "similarity" and m["shape"] == "2, 300, 200"
    assert m["blocks"] == m["written"] == str(2 * 3 * 2) and "GFLOP/s" in m[0]
    got = zarr.open_group(out, mode="r")["similarity"]
    assert got.compressors == ()  # --codec auto (the default): similarities uncompressed
    np.testing.assert_allclose(got[...], reference_cosine(data["a"], data["b"]), atol=2e-6)
    params = zarr.open_group(out, mode="r").attrs["dask_cosim"]["params"]
    assert params["a"]["path"] == data["A"] and params["b"]["path"] == data["B"]
    assert scheduler.workers  # an existing cluster is never shut down by the CLI


def test_auto_chunks_become_regular_zarr_chunks(data, scheduler, capsys, tmp_path):
    # 301 rows: auto blocks must be regular (e.g. (76, 76, 76, 73)) so zarr chunks can match them
    x = _rng(5).standard_normal((301, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "auto.zarr"
    with dask.config.set({"array.chunk-size": "64KiB"}):
        planned = dcs.cosine_similarity(x, dtype="float64").chunks
    assert regular_chunks(planned) and len(planned[0]) > 1
    with dask.config.set({"array.chunk-size": "64KiB"}), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*irregular")  # no silent rechunk
        rc, stdout, err = _run(
            capsys, tmp_path / "x.npy", "-o", out, "--quiet", "--dtype", "float64",
            "--scheduler", scheduler.scheduler_address,
        )  # fmt: skip
    assert rc == 0, err
    assert stdout.count("\n") == 1 and "Completed" not in stdout  # --quiet: the summary line only
    s = zarr.open_group(out, mode="r")["similarity"]
    assert s.dtype == np.float64 and s.chunks == (max(planned[0]), max(planned[1]))
    blocks = zarr.open_group(out, mode="r")[MARKERS]
    assert blocks.shape == tuple(-(-301 // c) for c in s.chunks) and blocks[...].all()
    np.testing.assert_allclose(s[...], reference_cosine(x), atol=1e-6)


def test_topk_job_end_to_end(data, scheduler, capsys, tmp_path):
    out = tmp_path / "t.zarr"
    rc, stdout, err = _run(
        capsys, data["A"], "-o", out, "--topk", "7", "--exclude-self", "--chunks", "1,64,64",
        "--quiet", "--scheduler", scheduler.scheduler_address,
    )  # fmt: skip
    assert rc == 0, err
    m = _summary(stdout)
    assert m["kind"] == "topk" and m["counts"].startswith("; 600 rows x 7 neighbours, 0 with a NaN score; ")
    upper = (300**2 + 4 * 64**2 + 44**2) // 2  # blocks of 64, 64, 64, 64, 44 rows: one triangle + diagonal
    assert f"self-similarity: {2 * upper:.3g} of {2 * 300**2:.3g} products computed" in m["counts"]
    s = reference_cosine(data["a"])
    g = zarr.open_group(out, mode="r")
    assert_topk_indices(g["indices"][...], s, atol=2e-6, exclude_self=True)
    np.testing.assert_allclose(g["values"][...], np.take_along_axis(s, g["indices"][...], -1), atol=2e-6)
    order = np.argsort(-np.where(np.eye(300, dtype=bool), -np.inf, s), axis=-1, kind="stable")[..., :7]
    np.testing.assert_allclose(g["values"][...], np.take_along_axis(s, order, -1), atol=2e-6)
    # --codec auto (the default): top-k arrays with blosc-lz4 + bitshuffle
    assert blosc_lz4_bitshuffle(g["values"]) and blosc_lz4_bitshuffle(g["indices"])
    assert g.attrs["dask_cosim"]["params"]["k"] == 7


def test_threshold_job_end_to_end(data, scheduler, capsys, tmp_path):
    out = tmp_path / "pairs"
    rc, stdout, err = _run(
        capsys, data["A"], data["B"], "-o", out, "--threshold", "0.45", "--chunks", "1,100,100",
        "--quiet", "--scheduler", scheduler.scheduler_address,
    )  # fmt: skip
    assert rc == 0, err
    m = _summary(stdout)
    assert m["blocks"] == str(2 * 3 * 2)
    got = pd.read_parquet(out).sort_values(["batch", "i", "j"]).reset_index(drop=True)
    s = reference_cosine(data["a"], data["b"])
    kb, i, j = np.nonzero(s >= 0.45)
    assert len(got) == len(kb) > 0
    assert m["counts"] == f"; found {len(kb)} pairs with score >= 0.45"  # the count a user checks first
    np.testing.assert_array_equal(got[["batch", "i", "j"]].to_numpy(), np.stack([kb, i, j], 1))
    np.testing.assert_allclose(got["score"], s[kb, i, j], atol=2e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "missing input": (
        ["run", "{dir}/nope.zarr", "-o", "{out}"],
        r"a: no such file or zarr store: .*nope\.zarr",
    ),
    "missing second input": (["run", "{A}", "{dir}/nope.npy", "-o", "{out}"], r"b: no such file"),
    "not a zarr array (group)": (
        ["run", "{dir}/group.zarr", "-o", "{out}"],
        r"is a zarr group, not an array",
    ),
    "not a zarr array (folder)": (["run", "{dir}/notzarr", "-o", "{out}"], r"not a zarr array"),
    "wrong ndim": (["run", "{dir}/flat.npy", "-o", "{out}"], r"a: expected a 2-D \(N, D\) or 3-D"),
    "D mismatch": (["run", "{A}", "{dir}/d8.npy", "-o", "{out}"], r"same vector length D.*D=16.*D=8"),
    "k > M": (["run", "{A}", "{B}", "-o", "{out}", "--topk", "201"], r"k.*201.*200"),
    "exclude-self without a reduction": (["run", "{A}", "-o", "{out}", "--exclude-self"], r"--exclude-self"),
    "codec with threshold": (
        ["run", "{A}", "-o", "{out}", "--threshold", "0.5", "--codec", "zstd"],
        r"--codec does not apply to --threshold jobs \(only to similarity and --topk jobs\)",
    ),
    "bad memory limit": (["run", "{A}", "-o", "{out}", "--memory-limit", "lots"], r"--memory-limit"),
    "output exists": (
        ["run", "{A}", "-o", "{existing}"],
        r"already exists; pass --overwrite to replace it",
    ),
    "output is not zarr": (
        ["run", "{A}", "-o", "{dir}/notzarr", "--overwrite"],
        r"refusing to use or delete",
    ),
    "params differ on resume": (
        ["run", "{A}", "-o", "{existing}", "--chunks", "1,50,50", "--resume"],
        r"resume: .* different parameters \(chunks: stored",
    ),
    "scheduler unreachable": (
        ["run", "{A}", "-o", "{out}", "--scheduler", "tcp://127.0.0.1:{port}", "--timeout", "1"],
        r"cannot reach a Dask scheduler at 'tcp://127\.0\.0\.1:\d+' within 1 s",
    ),
}
USAGE = {  # every bad option: exit 2, one line naming the option (no argparse usage block)
    "topk and threshold": (
        ["run", "{A}", "-o", "{out}", "--topk", "3", "--threshold", "0.5"],
        r"--threshold",
    ),
    "resume and overwrite": (["run", "{A}", "-o", "{out}", "--resume", "--overwrite"], r"--overwrite"),
    "k = 0": (["run", "{A}", "-o", "{out}", "--topk", "0"], r"--topk: expected a positive.*received 0"),
    "k = 2.5": (["run", "{A}", "-o", "{out}", "--topk", "2.5"], r"--topk: .*'2\.5'"),
    "bad chunks": (["run", "{A}", "-o", "{out}", "--chunks", "1,x,3"], r"--chunks"),
    "zero chunk": (
        ["run", "{A}", "-o", "{out}", "--chunks", "1,0,100"],
        r"--chunks: N chunk must be a positive int, received 0",
    ),
    "negative timeout": (["run", "{A}", "-o", "{out}", "--timeout", "-1"], r"--timeout: expected a positive"),
    "nan timeout": (["run", "{A}", "-o", "{out}", "--timeout", "nan"], r"--timeout: expected a finite"),
    "port not a number": (
        ["run", "{A}", "-o", "{out}", "--scheduler", "tcp://127.0.0.1:notaport"],
        r"--scheduler: expected an address like tcp://.*'tcp://127\.0\.0\.1:notaport'",
    ),
    "unknown protocol": (
        ["run", "{A}", "-o", "{out}", "--scheduler", "udp://127.0.0.1:8786"],
        r"--scheduler: .*unknown address scheme 'udp'",
    ),
    "threshold above 1": (["run", "{A}", "-o", "{out}", "--threshold", "1.5"], r"--threshold: .*\[-1, 1\]"),
    "threshold as a percentage": (
        ["run", "{A}", "-o", "{out}", "--threshold", "90"],
        r"percentage\? use 0\.9",
    ),
    "threshold inf": (["run", "{A}", "-o", "{out}", "--threshold", "inf"], r"--threshold: .*received inf"),
    "threshold nan": (["run", "{A}", "-o", "{out}", "--threshold", "nan"], r"--threshold: received NaN"),
    "bad workers": (["run", "{A}", "-o", "{out}", "--workers", "0"], r"--workers"),
    "bad storage options": (["run", "{A}", "-o", "{out}", "--storage-options", "[1]"], r"--storage-options"),
    "bad codec": (["run", "{A}", "-o", "{out}", "--codec", "lzma"], r"--codec: expected one of .*'lzma'"),
    "unknown option": (
        ["run", "{A}", "-o", "{out}", "--frobnicate"],
        r"unrecognized arguments: --frobnicate \(see dask-cosim run --help\)",
    ),
    "demo bad n": (["demo", "--n", "-3"], r"--n: expected a positive integer"),
    "no output": (["run", "{A}"], r"required: -o/--output"),
    "no command": ([], r"required"),
}


@pytest.fixture(scope="module")
def existing(data, scheduler):
    out = data["dir"] / "existing.zarr"
    assert main(["run", data["A"], "-o", str(out), "--chunks", "1,100,100", "--quiet",
                 "--scheduler", scheduler.scheduler_address]) == 0  # fmt: skip
    return out


def _fill(args, data, existing, tmp_path):
    values = {"dir": data["dir"], "A": data["A"], "B": data["B"], "out": tmp_path / "o.zarr"}
    values.update(existing=existing, port=_free_port())
    return [a.format(**values) for a in args]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_code_2_and_one_line(case, data, existing, capsys, tmp_path):
    args, message = BAD[case]
    rc = main(_fill(args, data, existing, tmp_path))
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dask-cosim: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o.zarr").exists()  # nothing was written


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_exit_code_2_and_one_line(case, data, existing, capsys, tmp_path):
    args, message = USAGE[case]
    rc = main(_fill(args, data, existing, tmp_path))
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dask-cosim: error: "), err  # no usage block
    assert re.search(message, lines[0]), lines[0]
    assert "--help" in lines[0] and "Traceback" not in err and not out
    assert not (tmp_path / "o.zarr").exists()


def test_version_and_run_help_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"dask-cosim {dcs.__version__}"
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"dask-cosim {dcs.__version__}"
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert (
        "examples:" in out and "dask-cosim run A.zarr -o knn.zarr --topk 10" in out and "exit codes:" in out
    )


#: A bad value through the API and through the command: (option, API call, command line).
SAME_ERROR = {
    "zero_vector": ("zero_vector", lambda a, o: dcs.topk(a, k=2, zero_vector="skip"),
                    ["run", "{A}", "-o", "{out}", "--topk", "2", "--zero-vector", "skip"]),
    "device": ("device", lambda a, o: dcs.cosine_similarity(a, device="tpu"),
               ["run", "{A}", "-o", "{out}", "--device", "tpu"]),
    "dtype": ("dtype", lambda a, o: dcs.pairs_above(a, dtype="int32"),
              ["run", "{A}", "-o", "{out}", "--threshold", "0.5", "--dtype", "int32"]),
    "dtype name": ("dtype", lambda a, o: dcs.topk(a, dtype="f4x"),
                   ["run", "{A}", "-o", "{out}", "--topk", "2", "--dtype", "f4x"]),
    "k": ("k", lambda a, o: dcs.topk(a, k=0), ["run", "{A}", "-o", "{out}", "--topk", "0"]),
    "threshold": ("threshold", lambda a, o: dcs.pairs_above(a, threshold=1.5),
                  ["run", "{A}", "-o", "{out}", "--threshold", "1.5"]),
    "threshold nan": ("threshold", lambda a, o: dcs.pairs_above(a, threshold=float("nan")),
                      ["run", "{A}", "-o", "{out}", "--threshold", "nan"]),
    "dedup threshold": ("threshold", lambda a, o: dcs.duplicate_groups(a, threshold=-2.0),
                        ["dedup", "{A}", "-o", "{out}", "--threshold", "-2"]),
    "label_pairs": ("label_pairs", lambda a, o: dcs.duplicate_groups(a, label_pairs="other"),
                    ["dedup", "{A}", "-o", "{out}", "--label-pairs", "other"]),
    "chunks": ("chunks", lambda a, o: dcs.cosine_similarity(a, chunks=(1, 0, 5)),
               ["run", "{A}", "-o", "{out}", "--chunks", "1,0,5"]),
    "codec": ("codec", lambda a, o: dcs.to_zarr(dcs.cosine_similarity(a), o, codec="lzma"),
              ["run", "{A}", "-o", "{out}", "--codec", "lzma"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SAME_ERROR))
def test_a_bad_value_gets_the_same_message_from_the_api_and_the_command(case, data, capsys, tmp_path):
    option, call, args = SAME_ERROR[case]
    with pytest.raises((ValueError, TypeError)) as api:
        call(data["A"], tmp_path / "api.zarr")
    prefix = f"{option}: "
    assert str(api.value).startswith(prefix), str(api.value)
    rc = main(_fill(args, data, None, tmp_path))
    err = capsys.readouterr().err.strip()
    flag = "--" + {"k": "topk"}.get(option, option).replace("_", "-")
    assert rc == 2 and err.startswith(f"dask-cosim: error: argument {flag}: "), err
    cli_text = err.removeprefix(f"dask-cosim: error: argument {flag}: ").rsplit(" (see dask-cosim ", 1)[0]
    assert cli_text == str(api.value).removeprefix(prefix)


def test_option_table_matches_the_signatures():
    """The option table the command reads is the API's: every keyword of each entry point."""
    import inspect

    from dask_cosim._options import JOB_OPTIONS

    funcs = {"similarity": dcs.cosine_similarity, "topk": dcs.topk, "pairs": dcs.pairs_above,
             "groups": dcs.duplicate_groups}  # fmt: skip
    for kind, func in funcs.items():
        params = inspect.signature(func).parameters
        keywords = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
        positional = set(list(params)[1:]) - keywords - {"b"}  # k, threshold
        assert JOB_OPTIONS[kind] == keywords | positional, kind


def test_messages_speak_cli_not_api(data, existing, capsys, tmp_path):
    rc = main(["run", data["A"], "-o", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --overwrite to replace it" in err and "=True" not in err


def test_failure_during_compute_exit_code_1(data, scheduler, capsys, tmp_path):
    a = np.ones((40, 4), dtype="float32")
    a[33] = 0.0
    np.save(tmp_path / "z.npy", a)
    rc, out, err = _run(
        capsys, tmp_path / "z.npy", "-o", tmp_path / "z.zarr", "--zero-vector", "error", "--quiet",
        "--chunks", "10,40", "--scheduler", scheduler.scheduler_address,
    )  # fmt: skip
    assert rc == 1
    assert err.splitlines()[0].startswith("dask-cosim: error: ZeroVectorError: ")
    assert "--traceback" in err and "Traceback" not in err


def _cli(*args, env=None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "dask_cosim", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@contextlib.contextmanager
def _killed_if_left(p: subprocess.Popen):
    """``p``, killed and reaped at the end of the block if it is still running (an
    assertion failed before it ended)."""
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_embedded_cluster_failure_is_one_line_and_logs_go_to_a_file(tmp_path):
    """A task failing on the embedded cluster's worker processes: no "Compute Failed" traceback
    on stderr, only the error and the hint, which names the cluster's log (kept on failure)."""
    a = np.ones((40, 4), dtype="float32")
    a[33] = 0.0
    np.save(tmp_path / "z.npy", a)
    p = _cli(
        "run", tmp_path / "z.npy", "-o", tmp_path / "z.zarr", "--zero-vector", "error", "--quiet",
        "--chunks", "10,40", "--workers", "1", "--threads-per-worker", "1",
        env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("dask-cosim: error: ZeroVectorError: ") and "--zero-vector error" in lines[0]
    log = re.fullmatch(
        r"dask-cosim: \(rerun with --traceback for details; the cluster's log: (.+)\)", lines[1]
    )
    assert log and Path(log[1]).parent == tmp_path / "dask-cosim", lines[1]
    assert "Compute Failed" in Path(log[1]).read_text()  # the worker process's record, in the log


def test_cluster_logs_leave_stderr_alone_and_verbose_keeps_them(tmp_path, capfd, monkeypatch):
    import logging

    from dask_cosim.cli import _log_path, build_parser
    from dask_cosim.cluster import cluster_logs

    path = tmp_path / "c.log"
    names = ("distributed", "distributed.worker", "tornado", "tornado.application", "bokeh")
    # as distributed's logging config does: a child logger with a stderr handler of its own
    monkeypatch.setattr(logging.getLogger("tornado.application"), "handlers", [logging.StreamHandler()])
    monkeypatch.setattr(logging.getLogger("tornado.application"), "propagate", False)
    before = {name: logging.getLogger(name).handlers[:] for name in names}
    capfd.readouterr()
    with cluster_logs(str(path)):
        logging.getLogger("distributed.worker").error("Compute Failed")
        logging.getLogger("tornado.application").error("Uncaught exception GET /status/ws")
        logging.getLogger("bokeh.server").error("AssertionError")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
    assert capfd.readouterr().err == ""  # nothing reached the process's stderr (file descriptor 2)
    assert path.read_text().count("\n") == 4
    assert before == {name: logging.getLogger(name).handlers for name in before}  # restored afterwards
    parser = build_parser()
    assert _log_path(parser.parse_args(["run", "A", "-o", "O", "--verbose"])) is None
    assert _log_path(parser.parse_args(["run", "A", "-o", "O", "--log-file", str(path)])) == str(path)
    assert main(["run", "A", "-o", "O", "--log-file", str(tmp_path / "no" / "dir.log")]) == 2
    assert "--log-file: cannot write" in capfd.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^dask-cosim \d", out) and "BLAS:" in out and "GPU:" in out
    assert "dask config cosine:" in out and "127.0.0.1" in out


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("dask-cosim")
    p = subprocess.run([str(script), "run", tmp_path / "missing.zarr", "-o", tmp_path / "o.zarr"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no such file" in p.stderr


def _count_markers(out: Path) -> int:
    root = out / MARKERS / "c"
    return (
        sum(1 for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
        if root.exists()
        else 0
    )


def _done_blocks(out: Path) -> set[tuple[int, ...]]:
    """Blocks with a marker; a ``.partial`` file is a marker write that a kill cut short."""
    root = out / MARKERS / "c"
    return {
        tuple(int(x) for x in p.relative_to(root).parts)
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".partial")
    }


def _wait_for_markers(p: subprocess.Popen, out: Path, at_least: int, timeout: float = 150.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _count_markers(out)
        if n >= at_least:
            return n
        if p.poll() is not None:
            pytest.fail(f"the run ended before {at_least} blocks were done: {p.communicate()}")
        time.sleep(0.02)
    pytest.fail("no progress")


def _reap(procs: list[psutil.Process], timeout: float = 30.0) -> list[int]:
    """Wait for the given processes to exit; kill (by pid) and report any that do not."""
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        proc.kill()
    return [proc.pid for proc in alive]


def _assert_stopped_cleanly(p: subprocess.Popen, err: str, children, timeout: float) -> None:
    """An interrupted run: exit 130, one line on stderr (no tracebacks from the workers),
    and every process of its embedded cluster gone."""
    assert p.returncode == 130, err
    assert err.strip().splitlines() == [
        line for line in err.strip().splitlines() if line.startswith("dask-cosim: interrupted")
    ], err
    assert _reap(children, timeout=timeout) == []


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    a = _rng(3).standard_normal((2, 1024, 32)).astype("float32")
    b = _rng(4).standard_normal((2, 768, 32)).astype("float32")
    zarr.create_array(d / "a.zarr", shape=a.shape, chunks=(1, 512, 32), dtype="float32")[...] = a
    np.save(d / "b.npy", b)
    return d, a, b


def test_kill_9_mid_run_then_resume_recomputes_only_missing_blocks(big, scheduler, capsys, tmp_path):
    d, a, b = big
    out = tmp_path / "k.zarr"
    args = [d / "a.zarr", d / "b.npy", "-o", out, "--chunks", "1,128,128"]
    with _killed_if_left(_cli("run", *args, "--workers", "1", "--threads-per-worker", "1", "--quiet")) as p:
        _wait_for_markers(p, out, at_least=12)
        children = psutil.Process(p.pid).children(recursive=True)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
    # the embedded cluster's worker processes notice their parent died and exit
    assert _reap(children) == []
    total = 2 * 8 * 6
    done = _done_blocks(out)
    assert 12 <= len(done) < total
    data_files = {ix: out / "similarity" / "c" / "/".join(map(str, ix)) for ix in done}
    inodes = {ix: f.stat().st_ino for ix, f in data_files.items()}
    marker_inodes = {ix: (out / MARKERS / "c" / "/".join(map(str, ix))).stat().st_ino for ix in done}
    (out / "similarity" / "c" / "1" / "0" / "0.dead.partial").parent.mkdir(parents=True, exist_ok=True)
    (out / "similarity" / "c" / "1" / "0" / "0.dead.partial").write_bytes(b"cut short")

    # without --resume/--overwrite: refused, naming both options
    rc, _, err = _run(capsys, *args, "--scheduler", scheduler.scheduler_address)
    assert rc == 2 and "--resume" in err and "--overwrite" in err

    prefixes = scheduler.scheduler.task_prefixes

    def finished(prefix):
        return prefixes[prefix].state_counts["memory"] if prefix in prefixes else 0

    before = {k: finished(k) for k in ("cosine-block", "cosine-write")}
    rc, stdout, err = _run(capsys, *args, "--resume", "--quiet", "--scheduler", scheduler.scheduler_address)
    assert rc == 0, err
    m = _summary(stdout)
    assert int(m["blocks"]) == total
    assert int(m["skipped"]) == len(done) and int(m["written"]) == total - len(done)
    # the scheduler computed exactly the missing blocks: no product of a finished block ran again
    assert finished("cosine-block") - before["cosine-block"] == total - len(done)
    assert finished("cosine-write") - before["cosine-write"] == total - len(done)
    for ix in done:  # finished blocks were not rewritten (zarr writes by rename: new inode)
        assert data_files[ix].stat().st_ino == inodes[ix]
        assert (out / MARKERS / "c" / "/".join(map(str, ix))).stat().st_ino == marker_inodes[ix]
    assert not list(out.rglob("*.partial"))
    got = zarr.open_group(out, mode="r")["similarity"][...]
    np.testing.assert_allclose(got, reference_cosine(a, b), atol=2e-6)


def test_ctrl_c_shuts_the_embedded_cluster_down(big, tmp_path):
    d, _, _ = big
    out = tmp_path / "c.zarr"
    p = _cli(
        "run", d / "a.zarr", d / "b.npy", "-o", out, "--chunks", "1,128,128",
        "--workers", "1", "--threads-per-worker", "1", "--quiet",
        start_new_session=True,
    )  # fmt: skip
    with _killed_if_left(p):
        _wait_for_markers(p, out, at_least=5)
        children = psutil.Process(p.pid).children(recursive=True)
        assert children  # the embedded cluster's worker process(es)
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        _, err = p.communicate(timeout=60)
    _assert_stopped_cleanly(p, err, children, timeout=10)
    assert zarr.open_group(out, mode="r").attrs["dask_cosim"]["complete"] is False


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_stop_while_the_embedded_cluster_starts_stops_the_run(tmp_path, stop):
    """Ctrl-C (the whole process group) or SIGTERM (the command's process) while the
    workers start: held until the cluster stands, then the run stops and the cluster is
    shut down (a Ctrl-C used to be ignored there, and the job ran on to its end)."""
    np.save(tmp_path / "a.npy", _rng(5).standard_normal((3000, 16)).astype("float32"))
    out = tmp_path / "knn.zarr"
    p = _cli(
        "run", tmp_path / "a.npy", "-o", out, "--topk", "5", "--workers", "2", "--threads-per-worker", "1",
        "--quiet", start_new_session=True,
    )  # fmt: skip
    with _killed_if_left(p):
        deadline = time.monotonic() + 120
        while not psutil.Process(p.pid).children(recursive=True):  # the first process of the start
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.005)
        children = psutil.Process(p.pid).children(recursive=True)
        if stop == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        else:
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    _assert_stopped_cleanly(p, err, children, timeout=30)
    if out.exists():  # whatever was laid out is not marked complete
        assert not zarr.open_group(out, mode="r").attrs.get("dask_cosim", {}).get("complete")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's signal mask in /proc")
@pytest.mark.parametrize("interrupted", [True, False])
def test_sigint_is_held_while_workers_start_and_blocked_in_what_they_spawn(interrupted):
    from dask_cosim.cluster import _stops_held_while_workers_start

    handler = signal.getsignal(signal.SIGINT)
    raised = False
    try:
        with _stops_held_while_workers_start(True):
            child = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
            if interrupted:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # nothing raised meanwhile: held
            status = Path(f"/proc/{child.pid}/status").read_text()
    except KeyboardInterrupt:
        raised = True
    finally:
        child.communicate(b"\n", timeout=30)
    blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk")).split()[1], 16)
    assert blocked & (1 << (signal.SIGINT - 1))  # the spawned process never takes a Ctrl-C
    assert raised == interrupted  # raised once, on leaving
    assert signal.getsignal(signal.SIGINT) is handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_an_error_wrapping_a_ctrl_c_reads_as_interrupted():
    from dask_cosim.cli import _interrupt_behind

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as inner:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from inner
    except RuntimeError as err:
        assert _interrupt_behind(err)
    assert not _interrupt_behind(RuntimeError("plain"))


def test_demo_verifies_against_numpy(scheduler, capsys):
    rc = main(["demo", "--n", "600", "--dim", "16", "--scheduler", scheduler.scheduler_address])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "demo: verified 2000 sampled similarities" in out and ": OK" in out
    assert len(SUMMARY.findall(out)) == 2
