"""``dask-cosim dedup``: Parquet groups, counts printed, labels, resume, one-line errors (exit 2)."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest

import dask_cosim as dcs
from dask_cosim.cli import main

COUNTS = re.compile(r"^(\d+) groups of size > 1 holding (\d+) rows$", re.M)


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://", host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    r = np.random.default_rng(0)
    centres = r.standard_normal((8, 12))
    x = np.concatenate([np.repeat(centres, 4, axis=0) + 0.01 * r.standard_normal((32, 12)),
                        r.standard_normal((48, 12))]).astype("float32")  # fmt: skip
    x = x[r.permutation(len(x))]
    np.save(d / "x.npy", x)
    np.save(d / "x3.npy", np.stack([x, x[::-1]]))
    np.save(d / "labels.npy", np.arange(len(x)) % 3)
    np.save(d / "short.npy", np.arange(5))
    np.save(d / "float.npy", np.zeros(len(x)))
    return d, x


def dedup(capsys, *args):
    rc = main(["dedup", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def counts(frame: pd.DataFrame) -> tuple[int, int]:
    big = frame["size"] > 1
    return int((big & (frame["i"] == frame["group"])).sum()), int(big.sum())


def test_dedup_writes_the_groups_and_prints_the_counts(data, scheduler, capsys, tmp_path):
    d, x = data
    rc, out, err = dedup(capsys, d / "x.npy", "-o", tmp_path / "g", "--threshold", "0.95",
                         "--chunks", "16,16", "--quiet", "--scheduler", scheduler)  # fmt: skip
    assert rc == 0, err
    got = pd.read_parquet(tmp_path / "g").sort_values("i").reset_index(drop=True)
    want = dcs.duplicate_groups(x, threshold=0.95).compute().reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert "groups shape" in out
    groups, rows = map(int, COUNTS.search(out).groups())
    assert (groups, rows) == counts(want) and groups >= 8 and rows >= 32


def test_dedup_with_labels_and_3d(data, scheduler, capsys, tmp_path):
    d, x = data
    labels = np.load(d / "labels.npy")
    rc, out, err = dedup(capsys, d / "x.npy", "-o", tmp_path / "g", "--threshold", "0.95",
                         "--labels", d / "labels.npy", "--label-pairs", "same", "--quiet",
                         "--scheduler", scheduler)  # fmt: skip
    assert rc == 0, err
    got = pd.read_parquet(tmp_path / "g").sort_values("i").reset_index(drop=True)
    want = dcs.duplicate_groups(x, threshold=0.95, labels=labels, label_pairs="same").compute()
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True))
    assert tuple(map(int, COUNTS.search(out).groups())) == counts(want)
    rc, out, err = dedup(capsys, d / "x3.npy", "-o", tmp_path / "g3", "--threshold", "0.95", "--quiet",
                         "--scheduler", scheduler)  # fmt: skip
    assert rc == 0, err
    got = pd.read_parquet(tmp_path / "g3").sort_values(["batch", "i"]).reset_index(drop=True)
    assert list(got.columns) == ["batch", "i", "group", "size"] and len(got) == 2 * len(x)
    assert tuple(map(int, COUNTS.search(out).groups())) == tuple(2 * c for c in counts(got[got.batch == 0]))


def test_dedup_resumes_only_the_missing_partitions_and_forests(
    data, scheduler, capsys, tmp_path, monkeypatch
):
    from dask_cosim import dedup as dedup_module

    d, x = data
    args = [d / "x.npy", "-o", tmp_path / "g", "--threshold", "0.95", "--chunks", "20,20", "--quiet",
            "--scheduler", scheduler]  # fmt: skip
    assert dedup(capsys, *args)[0] == 0
    want = pd.read_parquet(tmp_path / "g")
    forests = sorted((tmp_path / "g" / "_dask_cosim" / "forests").glob("forest-*.npy"))
    assert len(forests) == 4 * 5 // 2  # one per upper block of 4 x 4
    os.remove(tmp_path / "g" / "part-000002.parquet")  # as if the run had died before these
    os.remove(tmp_path / "g" / "_dask_cosim" / "done" / "000002")
    for f in forests[:3]:
        os.remove(f)
    rc, out, err = dedup(capsys, *args)
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    calls = []
    real = dedup_module.pairs_block
    monkeypatch.setattr(dedup_module, "pairs_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, out, err = dedup(capsys, *args, "--resume")
    assert rc == 0, err
    assert "(1 written, 3 already done)" in out
    assert len(calls) == 3  # only the blocks whose forest was lost ran a product
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "g"), want)
    rc, out, err = dedup(capsys, *args[:4], "0.9", *args[5:], "--resume")  # another threshold
    assert rc == 2 and "different parameters" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "1.5"], r"threshold: expected a similarity in \[-1, 1\]"),
        (["--threshold", "nan"], r"threshold: received NaN"),
        (["--labels", "{d}/short.npy"], r"labels: expected 80 labels \(one per vector\), received 5"),
        (["--labels", "{d}/float.npy"], r"labels: expected integer labels"),
        (["--labels", "{d}/missing.npy"], r"--labels: cannot read"),
    ],
)
def test_dedup_bad_input_is_one_line_exit_2(data, capsys, tmp_path, extra, message):
    d, _ = data
    rc, out, err = dedup(capsys, d / "x.npy", "-o", tmp_path / "g", *(e.format(d=d) for e in extra))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dask-cosim: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "g").exists()


def test_dedup_usage_errors(data, capsys, tmp_path):
    d, _ = data
    assert dedup(capsys, d / "x.npy", "-o", tmp_path / "g", "--label-pairs", "all")[0] == 2
    assert dedup(capsys, d / "x.npy")[0] == 2
