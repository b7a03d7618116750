"""Shared pytest configuration."""

import tempfile

import pytest

pytest_plugins = ["tests._real_cluster"]  # the real multi-process cluster fixture


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_stay_in_the_test_folder(tmp_path_factory):
    """Temporary files of the tests and of the commands they start (the cluster's default log
    under $TMPDIR/dask-cosim/, kept after a failure or a kill) go to pytest's own folder."""
    folder = str(tmp_path_factory.mktemp("tmpdir"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", folder)
        mp.setattr(tempfile, "tempdir", folder)
        yield
