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
        "assert ZeroVectorError.__module__ == 'dask_cosim._zero_vector' and to_zarr is d.to_zarr"
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


def test_checking_an_array_output_loads_no_dataframe_stack(tmp_path):
    # what ``dask-cosim run --topk`` does before its cluster starts: half a second of
    # pandas and dask.dataframe imports that a zarr job never uses
    code = (
        "import numpy as np, dask_cosim as dcs\n"
        "from dask_cosim.io import check_output\n"
        f"assert check_output(dcs.topk(np.ones((4, 3)), k=2), {str(tmp_path / 'k.zarr')!r}) == 'absent'"
    )
    assert _loaded_after(code) == []
    pairs = (  # a DataFrame result is still told apart (it imported dask.dataframe itself)
        "import numpy as np, dask_cosim as dcs\n"
        "from dask_cosim.io import check_output\n"
        "p = dcs.pairs_above(np.ones((4, 3)), threshold=0.5)\n"
        f"assert check_output(p, {str(tmp_path / 'p.parquet')!r}) == 'absent'"
    )
    assert "dask.dataframe" in _loaded_after(pairs)


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


# --------------------------------------------------------------------------- import cycles


def package_imports(sources: dict[str, str], package: str = "dask_cosim") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``"__init__"`` for the package itself).

    Every import counts: at module level, inside a function and under ``if TYPE_CHECKING``.
    An import deferred into a function (to keep ``import dask_cosim`` light) or made for
    type hints only still makes one module depend on the other, so a cycle through one
    is a cycle of the design (``_demo`` and ``cli`` calling each other, ``core`` and
    ``_result`` needing each other's classes), whether or not Python would trip on it.
    """
    import ast

    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package:
                        deps.add(parts[1] if len(parts) > 1 else "__init__")
            elif isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".") if node.module else []
                if node.level == 0 and parts[:1] == [package]:
                    parts = parts[1:]
                elif node.level != 1:
                    continue  # another package's module
                if parts:
                    deps.add(parts[0])
                else:  # ``from . import x``: the module x, or a name of the package
                    deps.update(a.name if a.name in sources else "__init__" for a in node.names)
        graph[name] = {d for d in deps if d in sources and d != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle (``[a, b, ..., a]``) through each group of modules that import each other."""
    cycles, seen = [], set()
    for start in sorted(graph):
        if start in seen or start not in _reachable(graph, start):
            continue
        seen |= {m for m in _reachable(graph, start) if start in _reachable(graph, m)}
        cycles.append(_shortest_cycle(graph, start))
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Modules ``start`` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for dep in graph[stack.pop()]:
            if dep not in seen:
                seen.add(dep)
                stack.append(dep)
    return seen


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    parents, queue = {start: None}, [start]
    while queue:
        node = queue.pop(0)
        for dep in sorted(graph[node]):
            if dep == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if dep not in parents:
                parents[dep] = node
                queue.append(dep)
    raise AssertionError(f"{start} is on no cycle")


def test_the_checker_finds_cycles_through_deferred_and_type_checking_imports():
    sources = {
        "__init__": "from .core import f\n",
        "core": "from ._result import R\ndef f():\n    from .cli import main\n",
        "_result": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .core import Prepared\n",
        "cli": "import argparse\n",
        "_demo": "def run():\n    from dask_cosim.cli import main\n",
        "planning": "def plan():\n    import dask_cosim as dcs\n",
        "_leaf": "import numpy\nfrom . import _demo\n",
    }
    graph = package_imports(sources)
    assert graph["_result"] == {"core"} and graph["_demo"] == {"cli"} and graph["planning"] == {"__init__"}
    assert graph["_leaf"] == {"_demo"}
    assert import_cycles(graph) == [["_result", "core", "_result"]]
    sources["cli"] = "def demo():\n    from . import _demo\n"
    assert import_cycles(package_imports(sources)) == [
        ["_demo", "cli", "_demo"],
        ["_result", "core", "_result"],
    ]
    sources["__init__"] += "from .planning import plan\n"
    assert ["__init__", "planning", "__init__"] in import_cycles(package_imports(sources))


def test_the_package_has_no_import_cycles():
    package = Path(dcs.__file__).parent
    sources = {p.stem: p.read_text() for p in sorted(package.glob("*.py"))}
    cycles = import_cycles(package_imports(sources))
    assert cycles == [], "modules that import each other (directly or through others):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )
