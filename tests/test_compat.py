"""Private dask / distributed / zarr APIs are used only through ``dask_cosim/_compat.py``.

What counts as private: a module or name that starts with an underscore in those packages
(``dask._task_spec``, ``dask.array._array_expr``, ``from dask.array.reductions import
_tree_reduce``), attributes that start with one on their objects (``x._meta``,
``client._scheduler_identity``), and the undocumented APIs listed below (hand-built
graph layers, the scheduler's state machine, internal modules of distributed and zarr).
The checker reads the package's syntax tree, so comments and docstrings never count; it
is itself tested on snippets that hold each kind of use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dask
import pytest

import dask_cosim

PACKAGE = Path(dask_cosim.__file__).parent
EXTERNAL = ("dask", "distributed", "zarr")

#: Modules that are not (or not fully) public API.
UNDOCUMENTED_MODULES = (
    "dask.layers",
    "dask.highlevelgraph",
    "dask.local",
    "dask.threaded",
    "dask.blockwise",
    "dask.array.core",
    "dask.array.reductions",
    "dask.dataframe.dask_expr",
    "distributed.comm",
    "distributed.worker_memory",
    "distributed.deploy.utils",
    "distributed.system",
    "distributed.dashboard",
    "distributed.scheduler",
    "distributed.worker_state_machine",
    "zarr.core",
)
#: Names that are undocumented wherever they are imported from or called.
UNDOCUMENTED_NAMES = {
    "get_scheduler",
    "from_graph",
    "ArraySliceDep",
    "MaterializedLayer",
    "HighLevelGraph",
    "sync",  # zarr.core.sync.sync
}
#: Attributes of dask / distributed objects that are internals.
UNDOCUMENTED_ATTRIBUTES = {"collection_annotations", "transition", "transitions"}


def own_attributes(sources) -> set[str]:
    """Names of the underscore attributes the package itself sets (``obj._x = ...``)."""
    names = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and node.attr.startswith("_")
            ):
                names.add(node.attr)
    return names


def private_uses(source: str, filename: str = "<snippet>", own: set[str] = frozenset()) -> list[str]:
    """Every private or undocumented dask/distributed/zarr API ``source`` uses, as ``file:line: what``.

    ``own``: underscore attributes the package defines itself (not dask's).
    """
    found = []
    tree = ast.parse(source, filename)

    def flag(node, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    def external(module: str) -> bool:
        return module.split(".")[0] in EXTERNAL

    def private_module(module: str) -> bool:
        return any(part.startswith("_") for part in module.split(".")) or any(
            module == m or module.startswith(m + ".") for m in UNDOCUMENTED_MODULES
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if external(alias.name) and private_module(alias.name):
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and external(node.module):
            if private_module(node.module):
                flag(node, f"from {node.module} import ...")
            for alias in node.names:
                if alias.name.startswith("_") or alias.name in UNDOCUMENTED_NAMES:
                    flag(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if not (isinstance(base, ast.Name) and base.id in ("self", "cls")) and node.attr not in own:
                    flag(node, f".{node.attr}")
            elif node.attr in UNDOCUMENTED_ATTRIBUTES or node.attr in UNDOCUMENTED_NAMES:
                flag(node, f".{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2:
                name = node.args[1]
                if (
                    isinstance(name, ast.Constant)
                    and isinstance(name.value, str)
                    and name.value.startswith("_")
                ):
                    if not name.value.startswith("__") and name.value not in own:
                        flag(node, f"getattr(..., {name.value!r})")
            if isinstance(func, ast.Name) and func.id == "Delayed":
                flag(node, "Delayed(key, graph) constructor")
            if isinstance(func, ast.Attribute) and func.attr == "Array":
                if isinstance(func.value, ast.Name) and func.value.id in ("da", "dask"):
                    flag(node, "dask.array.Array(...) constructor")
    return found


def test_the_package_uses_private_apis_only_through_compat():
    paths = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_compat.py"]
    own = own_attributes(p.read_text() for p in paths)
    assert not own & {"_meta", "_name", "_expr", "_scheduler_identity", "_chunks"}, own  # dask's, not ours
    problems = []
    for path in paths:
        problems += private_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)), own)
    assert not problems, "private dask/distributed/zarr APIs outside dask_cosim/_compat.py:\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize(
    "snippet",
    [
        "from dask.array.reductions import _tree_reduce",
        "from dask._task_spec import DataNode",
        "import dask.array._array_expr._expr",
        "from dask.layers import ArraySliceDep",
        "from dask.highlevelgraph import HighLevelGraph, MaterializedLayer",
        "from dask.base import get_scheduler",
        "import dask.threaded",
        "from zarr.core.sync import sync",
        "from distributed.worker_memory import parse_memory_limit",
        "from distributed.comm import registry",
        "d = Delayed(key, graph, layer=name)",
        "meta = x._meta",
        "meta = getattr(x, '_meta', None)",
        "info = client._scheduler_identity",
        "df = dd.from_graph(graph, meta, divisions, keys, 'p')",
        "layer.collection_annotations = {}",
        "scheduler.transitions(recommendations, 'x')",
        "y = da.Array(graph, name, chunks, meta=meta)",
    ],
)
def test_the_checker_finds_each_kind_of_private_use(snippet):
    assert private_uses(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import dask.array as da",
        "from dask.base import tokenize",
        "from dask.utils import key_split, parse_bytes",
        "from distributed import Client, default_client",
        "from distributed.diagnostics.plugin import SchedulerPlugin",
        "from ._compat import meta_of",
        "self._prepared = prep",
        "x = da.blockwise(f, 'ij', y, 'ij', token='t')",
        '"""x._meta in a docstring"""',
        "# from dask.layers import ArraySliceDep",
    ],
)
def test_the_checker_passes_public_uses(snippet):
    assert private_uses(snippet) == []


def test_compat_knows_the_planning_mode_dask_applied():
    from dask_cosim import _compat

    assert _compat.QUERY_PLANNING is dask.array.array_expr_enabled()
    assert _compat.QUERY_PLANNING == (type(dask.array.ones(1)).__module__ != "dask.array.core")
