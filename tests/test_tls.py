"""Who may connect: a TLS-only scheduler and workers run jobs for clients holding the
certificates (API and ``dask-cosim run --scheduler tls://...``) and refuse the others."""

from __future__ import annotations

import cryptography  # noqa: F401 - distributed's Security.temporary needs it (the test extra has it)
import dask
import numpy as np
import pytest
import zarr

import dask_cosim as dcs
from dask_cosim.cli import main
from dask_cosim.testing import reference_cosine


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """One self-signed key pair for every role (distributed's Security.temporary), also as files."""
    from distributed.security import Security

    sec = Security.temporary()
    d = tmp_path_factory.mktemp("tls")
    (d / "ca.pem").write_text(sec.tls_ca_file)
    (d / "node.pem").write_text(sec.tls_client_cert)
    (d / "node.key").write_text(sec.tls_client_key)
    return sec, d


@pytest.fixture(scope="module")
def tls_cluster(certs):
    from distributed import LocalCluster

    sec, _ = certs
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tls://",
        host="127.0.0.1",
        security=sec,
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert all(w.address.startswith("tls://") for w in cluster.workers.values())
        yield cluster


@pytest.fixture
def data(tmp_path):
    a = np.random.default_rng(0).standard_normal((2, 120, 8)).astype("float32")
    np.save(tmp_path / "a.npy", a)
    return a, tmp_path / "a.npy"


def _client_config(d):
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": str(d / "ca.pem"),
        "distributed.comm.tls.client.cert": str(d / "node.pem"),
        "distributed.comm.tls.client.key": str(d / "node.key"),
    }


def test_api_job_on_a_tls_only_cluster(certs, tls_cluster, data, tmp_path):
    from distributed import Client

    sec, _ = certs
    a, _ = data
    with Client(tls_cluster.scheduler_address, security=sec) as client:
        vals, idx = dcs.topk(a, k=4, exclude_self=True, chunks=(1, 40, 40))
        report = dcs.to_zarr((vals, idx), tmp_path / "t.zarr")
        S = dcs.cosine_similarity(a, chunks=(1, 40, 40))
        np.testing.assert_allclose(client.compute(S).result(), reference_cosine(a), atol=2e-6)
    s = reference_cosine(a)
    s[:, np.arange(120), np.arange(120)] = -np.inf
    assert report.blocks_written == report.blocks == 6
    got = zarr.open_group(tmp_path / "t.zarr", mode="r")["values"][...]
    np.testing.assert_allclose(got, -np.sort(-s, axis=-1)[..., :4], atol=2e-6)


def test_cli_job_on_a_tls_only_cluster(certs, tls_cluster, data, tmp_path, capsys):
    _, d = certs
    a, path = data
    out = tmp_path / "s.zarr"
    with dask.config.set(_client_config(d)):
        rc = main(["run", str(path), "-o", str(out), "--chunks", "1,40,40", "--quiet",
                   "--scheduler", tls_cluster.scheduler_address])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == "" and captured.out.count("\n") == 1
    np.testing.assert_allclose(
        zarr.open_group(out, mode="r")["similarity"][...], reference_cosine(a), atol=2e-6
    )


def test_client_without_the_certificates_is_refused_in_one_line(tls_cluster, data, tmp_path, capsys):
    _, path = data
    rc = main(
        ["run", str(path), "-o", str(tmp_path / "x.zarr"), "--scheduler", tls_cluster.scheduler_address]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dask-cosim: error: scheduler: "), err
    assert "requires TLS, and no client certificate is configured" in err and "Traceback" not in err
    assert not (tmp_path / "x.zarr").exists()


def test_client_with_another_certificate_is_refused_in_one_line(tls_cluster, data, tmp_path, capsys):
    from distributed.security import Security

    other = Security.temporary()  # a valid key pair, but not signed by the cluster's CA
    d = tmp_path / "other"
    d.mkdir()
    (d / "ca.pem").write_text(other.tls_ca_file)
    (d / "node.pem").write_text(other.tls_client_cert)
    (d / "node.key").write_text(other.tls_client_key)
    _, path = data
    with dask.config.set(_client_config(d)):
        rc = main(["run", str(path), "-o", str(tmp_path / "x.zarr"), "--timeout", "2",
                   "--scheduler", tls_cluster.scheduler_address])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "cannot reach a Dask scheduler at 'tls://127.0.0.1:" in err, err
    assert "Traceback" not in err and not (tmp_path / "x.zarr").exists()
