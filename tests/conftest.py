"""Shared pytest configuration."""

import signal
import tempfile

import pytest

pytest_plugins = ["tests._real_cluster"]  # the real multi-process cluster fixture


def pytest_report_header(config):
    """Which dask array mode this run tests (``DASK_ARRAY__QUERY_PLANNING``, see .ci/run)."""
    import dask

    from dask_cosim._compat import QUERY_PLANNING

    return f"dask {dask.__version__}, array query planning: {QUERY_PLANNING}"


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_reaches_python():
    """The Ctrl-C tests need SIGINT to reach Python, here and in the commands they start.

    A suite started in the background of a non-interactive shell (``pytest &`` in a
    script) inherits SIGINT ignored; Python then installs no KeyboardInterrupt handler,
    and every process it starts inherits the ignored signal too. For the run, SIGINT gets
    the handler an interactive start gives (the library leaves an ignored SIGINT alone:
    ``tests/test_io.py``).
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_stay_in_the_test_folder(tmp_path_factory):
    """Temporary files of the tests and of the commands they start (the cluster's default log
    under $TMPDIR/dask-cosim/, kept after a failure or a kill) go to pytest's own folder."""
    folder = str(tmp_path_factory.mktemp("tmpdir"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", folder)
        mp.setattr(tempfile, "tempdir", folder)
        yield


@pytest.fixture(scope="module")
def blocked_path():
    """Small calls take the blocked path in this module (no one-task short path,
    :mod:`dask_cosim._small`), for tests of the graph and its in-place compute."""
    from dask_cosim import _small

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_small, "SMALL_FLOPS", 0)
        yield


@pytest.fixture(scope="module")
def scheduler():
    """An in-process cluster reachable over TCP on 127.0.0.1, for ``--scheduler`` runs."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster
