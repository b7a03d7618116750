"""The embedded cluster's dashboard: up on 127.0.0.1, and it saw each stage as its own task prefix."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from contextlib import closing
from pathlib import Path

import numpy as np
import psutil
import pytest

import dask_cosim as dcs
from dask_cosim.cluster import DEFAULT_DASHBOARD_PORT, dask_client

STAGES = {
    "cosine-normalize",  # each input block normalised once
    "cosine-block",  # one product per output block
    "cosine-write",  # one write (+ marker) per output block
    "cosine-topk",  # local top-k per block
    "cosine-link",  # a written top-k merges each panel's parts in checkpointed links
    "cosine-pairs",  # pairs above the threshold per block
    "cosine-parquet",  # one Parquet file per block
}


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read().decode()


def _finished_by_prefix(metrics: str) -> dict[str, float]:
    """Tasks per prefix that reached "memory", from the Prometheus prefix-state totals."""
    out: dict[str, float] = {}
    for labels, value in re.findall(
        r"^dask_scheduler_prefix_state_totals_total\{([^}]*)\} (\S+)$", metrics, re.M
    ):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("state") == "memory":
            out[fields["task_prefix_name"]] = float(value)
    return out


@pytest.fixture
def port_8787_taken():
    """Occupy 8787 (if nobody else does) so the cluster must find another port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", DEFAULT_DASHBOARD_PORT))
        s.listen(1)
    except OSError:
        pass  # already taken by something else: just as good
    with closing(s):
        yield


def test_taken_dashboard_port_moves_without_a_warning(port_8787_taken):
    """distributed finds the free port; the embedded cluster keeps its warning off stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dask_client(workers=1, threads_per_worker=1, processes=False) as client:
            port = int(client.dashboard_link.split(":")[2].split("/")[0])
    assert port != DEFAULT_DASHBOARD_PORT
    assert not [w for w in caught if "already in use" in str(w.message)], [str(w.message) for w in caught]


def test_dashboard_is_up_and_shows_every_stage(port_8787_taken, tmp_path):
    lines: list[str] = []
    a = np.random.default_rng(0).standard_normal((2, 96, 8)).astype("float32")
    b = np.random.default_rng(1).standard_normal((2, 64, 8)).astype("float32")
    with dask_client(workers=1, threads_per_worker=2, processes=False, echo=lines.append) as client:
        link = client.dashboard_link
        assert re.fullmatch(r"http://127\.0\.0\.1:(\d+)/status", link)
        assert int(link.split(":")[2].split("/")[0]) != DEFAULT_DASHBOARD_PORT
        assert lines and link in lines[0]  # the link is printed for the user
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")

        dcs.to_zarr(dcs.cosine_similarity(a, b, chunks=(1, 32, 32)), tmp_path / "s.zarr")
        dcs.to_zarr(dcs.topk(a, b, k=3, chunks=(1, 32, 32)), tmp_path / "t.zarr")
        dcs.to_parquet(dcs.pairs_above(a, b, threshold=0.5, chunks=(1, 32, 32)), tmp_path / "p")

        base = link.rsplit("/", 1)[0]
        status, page = _get(link)
        assert status == 200 and "Dask" in page
        status, metrics = _get(f"{base}/metrics")
        assert status == 200
        finished = _finished_by_prefix(metrics)
        assert STAGES <= set(finished), " ".join(sorted(finished))
        assert all(finished[stage] > 0 for stage in STAGES), finished
    # the embedded cluster is gone: its dashboard no longer answers
    with pytest.raises(OSError):
        _get(link)


def _readme_pages() -> list[str]:
    """The dashboard pages the README's dashboard section names (`/status`, `/groups`, ...)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Watching it on the dashboard", 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"`(/[\w./-]*)`", section)))


def test_every_dashboard_page_answers_during_a_real_run_and_stderr_stays_empty(tmp_path):
    pages = _readme_pages()
    assert {"/status", "/tasks", "/workers", "/groups", "/metrics"} <= set(pages), pages
    a = np.random.default_rng(0).standard_normal((2, 512, 16)).astype("float32")
    np.save(tmp_path / "a.npy", a)
    out = tmp_path / "knn.zarr"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TMPDIR=str(tmp_path))
    p = subprocess.Popen(
        [sys.executable, "-m", "dask_cosim", "run", str(tmp_path / "a.npy"), "-o", str(out), "--topk", "5",
         "--chunks", "1,64,64", "--workers", "1", "--threads-per-worker", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    stopped: list[psutil.Process] = []
    try:
        link = re.search(r"Dask dashboard: (http://127\.0\.0\.1:\d+)/status", p.stdout.readline())
        assert link, "no dashboard link"
        deadline = time.monotonic() + 120
        while not list((out / "_blocks_done" / "c").rglob("*")) if (out / "_blocks_done").exists() else True:
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before a block was done"
            time.sleep(0.02)
        # the job is running: hold it there (stop the worker processes) while the pages are fetched
        stopped = psutil.Process(p.pid).children(recursive=True)
        for proc in stopped:
            proc.send_signal(signal.SIGSTOP)
        for page in pages:
            status, body = _get(link[1] + page)
            assert status == 200 and body, page
        assert p.poll() is None  # still the same run
    finally:
        for proc in stopped:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
        try:
            stdout, stderr = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, stderr
    assert stderr == ""  # no dashboard, worker or shutdown noise reached the terminal
    assert "; 1024 rows x 5 neighbours, 0 with a NaN score" in stdout
    assert not list((tmp_path / "dask-cosim").glob("*.log"))  # the default log is gone after success


def test_stage_prefixes_differ_where_the_progress_panel_cuts_them_and_are_documented():
    """The Progress panel cuts labels after about 11 characters: stages (README table rows)
    must differ there, and every prefix our graphs use must be in that table."""
    from dask.utils import key_split

    from .test_scale import lazy

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Watching it on the dashboard", 1)[1].split("\n### ", 1)[0]
    rows = [
        re.findall(r"`(cosine-[a-z-]+)`", line) for line in section.splitlines() if line.startswith("| `")
    ]
    documented = {p: n for n, row in enumerate(rows) for p in row}
    cut = {}
    for prefix, row in documented.items():
        assert cut.setdefault(prefix[:11], row) == row, f"{prefix} reads like another stage when cut"
    a = np.random.default_rng(0).standard_normal((600, 8))
    graphs = [
        dcs.cosine_similarity(a, chunks=(200, 200)),
        dcs.cosine_similarity(a, a.copy(), chunks=(200, 200)),
        *dcs.topk(a, k=3, chunks=(200, 200)),
        *dcs.topk(a, a.copy(), k=3, chunks=(200, 200)),
        dcs.pairs_above(a, threshold=0.5, chunks=(200, 200)),
        dcs.duplicate_groups(a, threshold=0.9, chunks=(200, 200)),
        dcs.cosine_similarity(lazy(1000, 8, chunk=100)),
    ]
    used = {key_split(k) for g in graphs for k in dict(g.__dask_graph__())}
    ours = {p for p in used if p.startswith("cosine-")}
    assert ours - set(documented) == set(), ours - set(documented)
