"""duplicate_groups against brute force: the dense threshold graph and scipy's connected_components."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

import dask_cosim as dcs
from dask_cosim._components import components, merge_forests

CHUNKINGS = [(10**6, 10**6), (16, 16), (7, 7), (5, 11), "auto"]


def rng(seed):
    return np.random.default_rng(seed)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # zero vectors stay zero
    return np.where(np.isnan(norms), np.nan, out)  # NaN vectors stay NaN


def reference_groups(x, threshold, labels=None, label_pairs="different"):
    """(group, size) per row: the dense graph ``S >= threshold`` (no self loops), scipy components."""
    s = unit(x) @ unit(x).T  # NaN rows: NaN scores, never linked
    with np.errstate(invalid="ignore"):
        adj = s >= threshold
    np.fill_diagonal(adj, False)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        adj &= ~same if label_pairs == "different" else same
    _, comp = connected_components(csr_matrix(adj), directed=False)
    first = pd.Series(np.arange(len(x))).groupby(comp).transform("min").to_numpy()
    return first, np.bincount(comp)[comp]


def assert_groups(got: pd.DataFrame, x, threshold, **kwargs):
    got = got.sort_values("i", kind="stable")
    group, size = reference_groups(x, threshold, **kwargs)
    np.testing.assert_array_equal(got["i"].to_numpy(), np.arange(len(x)))
    np.testing.assert_array_equal(got["group"].to_numpy(), group)
    np.testing.assert_array_equal(got["size"].to_numpy(), size)


def planted(seed, n_groups=12, per_group=5, singles=40, d=16, noise=0.02):
    """Clustered data: tight groups around random centres plus random singletons, shuffled."""
    r = rng(seed)
    centres = r.standard_normal((n_groups, d))
    members = np.repeat(centres, per_group, axis=0) + noise * r.standard_normal((n_groups * per_group, d))
    x = np.concatenate([members, r.standard_normal((singles, d))])
    return x[r.permutation(len(x))]


def safe_threshold(x, threshold, gap=1e-4):
    """Moves ``threshold`` away from every score, so float rounding cannot flip a link."""
    s = (unit(x) @ unit(x).T).ravel()
    while np.any(np.abs(s - threshold) < gap):
        threshold += gap
    return threshold


# ------------------------------------------------------------------ kernels


def test_components_smallest_node_is_the_root_whatever_the_edge_order():
    r = rng(0)
    u, v = r.integers(0, 300, 400), r.integers(0, 300, 400)
    nodes, roots = components(u, v)
    adj = csr_matrix((np.ones(len(u)), (u, v)), shape=(300, 300))
    _, comp = connected_components(adj, directed=False)
    first = pd.Series(np.arange(300)).groupby(comp).transform("min").to_numpy()
    np.testing.assert_array_equal(nodes, np.unique(np.r_[u, v]))
    np.testing.assert_array_equal(roots, first[nodes])
    perm = r.permutation(len(u))
    for got in (components(v[perm], u[perm]), merge_forests([components(u[:200], v[:200]), (nodes, roots)])):
        np.testing.assert_array_equal(got[0], nodes)
        np.testing.assert_array_equal(got[1], roots)


def test_components_of_a_long_chain_in_reverse_order():
    n = 5000
    nodes, roots = components(np.arange(n - 1, 0, -1), np.arange(n - 2, -1, -1))
    assert (roots == 0).all() and len(nodes) == n
    assert components([], [])[0].size == 0


# ------------------------------------------------------------------ against brute force


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_planted_groups_match_brute_force(chunks):
    x = planted(1)
    t = safe_threshold(x, 0.95)
    got = dcs.duplicate_groups(x, threshold=t, chunks=chunks).compute()
    assert list(got.columns) == ["i", "group", "size"]
    assert all(got[c].dtype == np.int64 for c in got.columns)
    assert_groups(got, x, t)
    assert (got["size"] > 1).sum() >= 12 * 5  # the planted groups were found


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("chunks", [(9, 9), (4, 13)])
def test_random_data_match_brute_force(threshold, chunks):
    x = rng(2).standard_normal((45, 4)).astype(np.float32)
    t = safe_threshold(x, threshold)
    assert_groups(dcs.duplicate_groups(x, threshold=t, chunks=chunks).compute(), x, t)


def test_chain_links_rows_below_the_threshold():
    angles = np.deg2rad([0.0, 20.0, 40.0, 120.0])  # A~B~C, A and C at cos(40) < 0.9 < cos(20)
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    s = unit(x) @ unit(x).T
    assert s[0, 2] < 0.9 <= s[0, 1] and s[1, 2] >= 0.9
    for chunks in [(4, 4), (1, 1), (2, 2)]:
        got = dcs.duplicate_groups(x[[2, 3, 0, 1]], threshold=0.9, chunks=chunks).compute()
        assert got["group"].tolist() == [0, 1, 0, 0] and got["size"].tolist() == [3, 1, 3, 3]


def four_hot(seed, n, d=8):
    """Vectors with four ones: scores are multiples of 1/4, exact in float32 and float64."""
    r = rng(seed)
    x = np.zeros((n, d))
    for row in x:
        row[r.choice(d, 4, replace=False)] = 1.0
    return x


@pytest.mark.parametrize("threshold", [1.0, 0.75, 0.5])
@pytest.mark.parametrize("chunks", [(40, 40), (6, 6), (3, 17)])
def test_threshold_exactly_at_score_values(threshold, chunks):
    x = four_hot(3, 40)
    s = unit(x) @ unit(x).T
    assert np.any(s == threshold)  # pairs right at the threshold link (>=)
    got = dcs.duplicate_groups(x.astype(np.float32), threshold=threshold, chunks=chunks).compute()
    assert_groups(got, x, threshold)


@given(
    n=st.integers(1, 30),
    threshold=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    block=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_chunking_gives_the_brute_force_groups(n, threshold, block, seed):
    x = four_hot(seed, n)
    assert_groups(dcs.duplicate_groups(x, threshold=threshold, chunks=(block, block)).compute(), x, threshold)


def test_zero_and_nan_vectors():
    x = planted(4, n_groups=3, singles=5, d=6)
    x[[0, 7]] = 0.0  # zero vectors: similarity 0 with everything ("zero_vector" default)
    x[[3, 11]] = np.nan  # NaN vectors: never linked
    x[12] = x[11]  # even a copy of a NaN vector is no duplicate
    for t, chunks in [(0.9, (5, 5)), (0.0, (4, 4)), (-0.5, (30, 30))]:
        got = dcs.duplicate_groups(x, threshold=t, chunks=chunks).compute()
        assert_groups(got, x, t)
        got = got.set_index("i")
        assert (got.loc[[3, 11, 12], "size"] == 1).all()
        if t > 0:
            assert (got.loc[[0, 7], "size"] == 1).all()
        else:  # score 0 >= t: zero vectors link to every finite vector
            assert got.loc[0, "size"] == len(x) - 3


def test_batches_are_deduplicated_on_their_own():
    x = np.stack([planted(5, n_groups=4, singles=6, d=8), planted(6, n_groups=4, singles=6, d=8)])
    x[1, :5] = x[0, :5]  # the same rows in another batch link nothing across batches
    t = safe_threshold(x.reshape(-1, 8), 0.9)
    for chunks in [(1, 7, 7), (2, 7, 7), (2, 26, 26), (1, 26, 26), "auto"]:
        got = dcs.duplicate_groups(x, threshold=t, chunks=chunks).compute()
        assert list(got.columns) == ["batch", "i", "group", "size"]
        assert got["batch"].tolist() == [0] * 26 + [1] * 26  # in (batch, i) order
        assert got["i"].tolist() == list(range(26)) * 2 and got.index.tolist() == list(range(52))
        for b in range(2):
            assert_groups(got[got["batch"] == b], x[b], t)
    labels = np.arange(26) % 4
    for mode in ("different", "same"):
        got = dcs.duplicate_groups(
            x, threshold=t, labels=labels, label_pairs=mode, chunks=(1, 7, 7)
        ).compute()
        for b in range(2):
            assert_groups(got[got["batch"] == b], x[b], t, labels=labels, label_pairs=mode)


@pytest.mark.parametrize("mode", ["different", "same"])
@pytest.mark.parametrize("chunks", [(60, 60), (8, 8), (7, 19)])
def test_labels_match_brute_force(mode, chunks):
    x = planted(7, n_groups=6, per_group=6, singles=24, d=8, noise=0.05)
    labels = rng(8).integers(0, 3, len(x))
    t = safe_threshold(x, 0.9)
    for lab in (labels, da.from_array(labels, chunks=13)):
        got = dcs.duplicate_groups(x, threshold=t, labels=lab, label_pairs=mode, chunks=chunks).compute()
        assert_groups(got, x, t, labels=labels, label_pairs=mode)


def test_same_groups_on_every_scheduler_and_a_distributed_cluster():
    from distributed import Client, LocalCluster

    x = planted(9)
    t = safe_threshold(x, 0.95)
    groups = dcs.duplicate_groups(x, threshold=t, chunks=(9, 9))
    want = groups.compute(scheduler="sync")
    assert_groups(want, x, t)
    pd.testing.assert_frame_equal(groups.compute(scheduler="threads"), want)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster),
    ):
        pd.testing.assert_frame_equal(groups.compute(), want)


# ------------------------------------------------------------------ API and graph


def test_is_lazy_merges_as_a_tree_and_partitions_by_row_blocks():
    def boom(x):
        raise AssertionError("input was read at call time")

    a = da.ones((64, 4), chunks=(8, 4)).map_blocks(boom, dtype=np.dtype(float), meta=np.empty((0, 0)))
    groups = dcs.duplicate_groups(a, threshold=0.9, chunks=(4, 4))  # 16 row blocks, 136 upper blocks
    assert groups.npartitions == 16
    graph = dict(groups.__dask_graph__())
    names = [k[0] if isinstance(k, tuple) else k for k in graph]
    assert sum(n.startswith("cosine-forest") for n in names) == 16 * 17 // 2
    merges = [k for k in graph if isinstance(k, tuple) and k[0].startswith("cosine-union")]
    assert len(merges) == 17 + 3 + 1  # 136 forests -> 17 -> 3 -> 1, eight at a time
    assert sum(isinstance(n, str) and n.startswith("cosine-roots") for n in names) == 1


def test_empty_and_single_row_inputs():
    assert len(dcs.duplicate_groups(np.ones((0, 3))).compute()) == 0
    got = dcs.duplicate_groups(np.ones((1, 3))).compute()
    assert got[["i", "group", "size"]].values.tolist() == [[0, 0, 1]]


def test_result_does_not_depend_on_chunking():
    x = planted(10).astype(np.float32)
    t = safe_threshold(x, 0.97)
    results = [dcs.duplicate_groups(x, threshold=t, chunks=c).compute() for c in CHUNKINGS]
    for r in results[1:]:
        pd.testing.assert_frame_equal(r, results[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": 1.5}, ValueError, r"threshold: expected a similarity in \[-1, 1\].*received 1.5"),
        ({"threshold": -1.01}, ValueError, r"threshold: expected a similarity in \[-1, 1\]"),
        ({"threshold": float("nan")}, ValueError, r"threshold: received NaN"),
        ({"threshold": "0.9"}, TypeError, r"threshold: expected a real number, received '0.9'"),
        ({"label_pairs": "all"}, ValueError, r"label_pairs: expected one of 'different', 'same'.*'all'"),
        ({"labels": np.arange(3)}, ValueError, r"labels: expected 10 labels"),
        ({"labels": np.full(10, np.nan)}, ValueError, r"labels: received NaN labels"),
        ({"labels": np.zeros(10, dtype=np.float32)}, ValueError, r"labels: expected integer labels"),
        ({"chunks": (1, 2, 3)}, ValueError, r"chunks: the output is 2-D"),
        ({"device": "tpu"}, ValueError, r"device"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        dcs.duplicate_groups(np.ones((10, 3)), **kwargs)


def test_records_provenance_and_writes_with_to_parquet(tmp_path):
    from dask_cosim import _provenance

    x = planted(11, n_groups=3, singles=4, d=4)
    groups = dcs.duplicate_groups(x, threshold=0.9, chunks=(5, 5))
    facts = _provenance.lookup(groups._name)
    assert facts["kind"] == "groups" and facts["threshold"] == 0.9
    report = dcs.to_parquet(groups, tmp_path / "g")
    assert report.blocks == groups.npartitions
    back = pd.read_parquet(tmp_path / "g").sort_values("i").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, groups.compute().reset_index(drop=True))
    labelled = dcs.duplicate_groups(x, threshold=0.9, chunks=(5, 5), labels=np.arange(len(x)) % 2)
    assert labelled._name != groups._name and _provenance.lookup(labelled._name)["label_pairs"] == "different"
    assert dask.compute(labelled)[0]["size"].max() <= groups.compute()["size"].max()


def test_benchmark_runs_tiny():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dedup.py"
    out = subprocess.run(
        [sys.executable, str(script), "--n", "1200", "--repeat", "1", "--skip-community"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bench"] == "dedup-summary" and summary["groups_over_pairs"] > 0
    assert (
        summary["rows_in_groups"] == 5 * summary["groups"] and summary["pairs"] == 10 * summary["groups"] > 0
    )
    assert summary["community"].startswith("skipped")


@pytest.mark.timeout(180)
def test_worker_killed_mid_run_gives_the_same_groups(real_cluster, gate_file):
    """SIGKILL the worker holding the most finished forests; dask recomputes what it lost."""
    from ._real_cluster import gated, held_keys, open_gate, wait_until

    x = planted(12, n_groups=40, per_group=6, singles=240, d=16)  # 480 rows, 6 row blocks
    t = safe_threshold(x, 0.95)
    groups = dcs.duplicate_groups(gated(x, (80, 16), gate_file), threshold=t, chunks=(80, 80))
    with real_cluster.client() as client:
        future = client.compute(groups)
        held = wait_until(
            lambda: (h := held_keys(client, "cosine-forest")) and sum(h.values()) >= 4 and h,
            timeout=60,
            what="finished forests in worker memory",
            client=client,
        )
        victim = max(held, key=held.get)
        real_cluster.kill_worker(victim)
        open_gate(gate_file)
        got = future.result(timeout=90)
    assert held[victim] >= 1
    assert_groups(got, x, t)
