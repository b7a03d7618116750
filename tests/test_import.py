"""``import dask_cosim`` stays light; optional dependencies name their extra when missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dask_cosim as dcs
from dask_cosim import _extras, cluster

ROOT = Path(__file__).resolve().parents[1]
#: Loaded only by the features that need them (DataFrames, Parquet, the cluster, the dashboard).
HEAVY = ("dask.dataframe", "pandas", "pyarrow", "distributed", "bokeh")


def _loaded_after(code: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_loads_no_dataframe_arrow_or_cluster_stack():
    assert _loaded_after("import dask_cosim") == []


def test_import_loads_no_array_module_until_a_name_is_used():
    light = "import sys, dask_cosim\nassert not {'dask.array', 'dask_cosim.core'} & set(sys.modules)"
    _loaded_after(light)  # raises (check=True) if the assertion fails
    _loaded_after("import sys, dask_cosim\ndask_cosim.cosine_similarity\nassert 'dask.array' in sys.modules")


def test_every_public_name_resolves_and_is_listed():
    code = (  # a fresh interpreter: every name goes through the package's lazy lookup once
        "import dask_cosim as d\n"
        "for name in d.__all__:\n"
        "    assert getattr(d, name) is not None and name in dir(d), name\n"
        "assert d.cosine_similarity.__module__ == 'dask_cosim.core'\n"
        "assert d.topk.__module__ == 'dask_cosim.reductions' and d.plan.__module__ == 'dask_cosim.planning'\n"
        "from dask_cosim import ZeroVectorError, to_zarr\n"
        "assert ZeroVectorError.__module__ == 'dask_cosim._kernels' and to_zarr is d.to_zarr"
    )
    _loaded_after(code)
    with pytest.raises(AttributeError, match="no attribute 'cosine'"):
        dcs.cosine  # noqa: B018


def test_the_cli_module_and_building_array_graphs_stay_light_too():
    # (computing them imports distributed: dask's get_scheduler looks for a client)
    code = (
        "import numpy as np, dask_cosim as dcs, dask_cosim.cli\n"
        "a = np.ones((4, 3))\n"
        "dcs.cosine_similarity(a), dcs.topk(a, k=2), dcs.plan(a, op='topk', k=2)"
    )
    assert _loaded_after(code) == []


def test_features_load_what_they_need():
    loaded = _loaded_after(
        "import numpy as np, dask_cosim as dcs\ndcs.pairs_above(np.ones((4, 3)), threshold=0.5)"
    )
    assert {"dask.dataframe", "pandas"} <= set(loaded), loaded
    assert "distributed" in _loaded_after("import dask_cosim as dcs\ndcs.GPURouting")


def test_gpu_routing_is_a_scheduler_plugin_found_by_its_name():
    import pickle

    from distributed.diagnostics.plugin import SchedulerPlugin

    from dask_cosim._resources import GPURouting

    assert dcs.GPURouting is GPURouting and issubclass(GPURouting, SchedulerPlugin)
    assert GPURouting.__module__ == "dask_cosim._resources" and GPURouting.__qualname__ == "GPURouting"
    plugin = pickle.loads(pickle.dumps(GPURouting(interval=0.5)))  # as the scheduler receives it
    assert type(plugin) is GPURouting and plugin.interval == 0.5
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dcs.Nope  # noqa: B018


def test_missing_scipy_names_the_sparse_extra(monkeypatch, tmp_path):
    import scipy.sparse

    path = tmp_path / "x.npz"
    scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(np.eye(3)))
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import scipy.sparse now fails
    with pytest.raises(ImportError, match=r"a: reading the sparse matrix .*x\.npz.* needs scipy, which is "
                       r"not installed: pip install 'dask-cosim\[sparse\]'"):  # fmt: skip
        dcs.cosine_similarity(str(path))


def test_missing_bokeh_says_so_instead_of_a_dead_dashboard_link(monkeypatch):
    class Client:
        dashboard_link = "http://127.0.0.1:8787/status"

    assert cluster._dashboard_link(Client()) == Client.dashboard_link or not _extras.available("bokeh")
    monkeypatch.setattr(_extras, "available", lambda module: module != "bokeh")
    assert cluster._dashboard_link(Client()) == (
        "not served (it needs bokeh: pip install 'dask-cosim[dashboard]')"
    )


def test_every_extra_named_in_messages_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    for extra, _ in _extras.EXTRAS.values():
        assert f"\n{extra} = [" in text, extra
