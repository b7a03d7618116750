"""A fix for the dashboard's task-group graph (``/groups``, ``/individual-groups``) in this process.

distributed's ``TaskGroupGraph.update_layout`` places each task group one column right of
its dependencies, visiting the groups in ``dask.order.order``. With dask/distributed
2026.8 that order is not topological for some group graphs (a top-k's
``cosine-merge-aggregate`` group came after the groups that depend on it), so the
page fails with a ``KeyError`` and answers HTTP 500. :func:`install` replaces the
method by the same layout over a topological order (``graphlib``), for the schedulers
this process runs (the embedded cluster's); a remote scheduler keeps its own dashboard.
"""

from __future__ import annotations

import graphlib

_INSTALLED = False


def _topological(dependencies: dict[str, set[str]]) -> list[str]:
    """Dependencies first; on a cycle (never seen, but cheap to survive) the plain key order."""
    try:
        return list(graphlib.TopologicalSorter(dependencies).static_order())
    except graphlib.CycleError:
        return list(dependencies)


def group_layout(self):
    """``TaskGroupGraph.update_layout`` of distributed 2026.8 with a topological order."""
    dependencies = {
        k: {ds.name for ds in ts.dependencies if ds.name != k and ds.name in self.scheduler.task_groups}
        for k, ts in self.scheduler.task_groups.items()
    }
    xs: dict[str, int] = {}
    ys: dict[str, int] = {}
    locations: set[tuple[int, int]] = set()
    nodes_layout, arrows_layout = {}, {}
    for tg in _topological(dependencies):
        deps = [d for d in dependencies[tg] if d in xs]
        if deps:
            x = max(xs[d] for d in deps) + 1
            y = max(ys[d] for d in deps)
            if len(deps) > 1 and len({ys[d] for d in deps}) == 1:
                y += 1
        else:
            x = 0
            y = max(ys.values()) + 1 if ys else 0
        while (x, y) in locations:  # avoid collisions by moving up
            y += 1
        locations.add((x, y))
        xs[tg], ys[tg] = x, y
        nodes_layout[tg] = {"x": x, "y": y}
        arrows_layout[tg] = {"nstart": deps, "nend": [tg] * len(deps)}
    return nodes_layout, arrows_layout


def install() -> None:
    """Use :func:`group_layout` for this process's dashboards (idempotent; no-op without bokeh)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from ._compat import task_group_graph

    TaskGroupGraph = task_group_graph()  # noqa: N806 - a class
    if TaskGroupGraph is None:  # no bokeh: no dashboard
        return
    if hasattr(TaskGroupGraph, "update_layout"):
        TaskGroupGraph.update_layout = group_layout
    _INSTALLED = True
