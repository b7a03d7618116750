"""Writing a ``pairs_above`` (or ``duplicate_groups``) result as a Parquet dataset, resumably.

One file ``part-NNNNNN.parquet`` per partition (= output block), written by a
``cosine-parquet`` task under a temporary name and renamed, then marked done by an empty
file under ``_dask_cosim/done/``. The write tasks are one graph layer, a
``map_partitions`` of the write over the result (:func:`_write_tasks`); only the
partitions not marked done are computed, so a resumed run's graph holds no task of a
finished partition.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import numpy as np

from . import _provenance
from ._compat import collection_name, map_partitions
from ._execution import WriteGate, WriteReport, dim_of, execute, products
from ._out_state import LAYOUT, PQ_META, jsonable, open_output

__all__ = ["to_parquet", "parquet_identity"]


def parquet_identity(pairs) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a resumed output must match: the result's parameters and the dataset's layout."""
    facts = _provenance.lookup(collection_name(pairs))
    params = facts or {
        "kind": "pairs",
        "names": [collection_name(pairs)],
        "columns": list(map(str, pairs.columns)),
    }
    layout = {"layout": LAYOUT, "partitions": pairs.npartitions, "columns": list(map(str, pairs.columns))}
    return params, layout


def _pq_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def to_parquet(
    pairs,
    path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
    progress: bool = False,
) -> WriteReport:
    """Compute a :func:`~dask_cosim.pairs_above` result into a Parquet dataset directory.

    One file ``part-NNNNNN.parquet`` per partition (= output block), written under a
    temporary name and renamed, then marked done under ``_dask_cosim/done/``; the
    bookkeeping directory and temporaries start with "_" or "." so
    ``pandas.read_parquet(path)`` reads only the data. ``overwrite`` and ``resume``
    follow :func:`~dask_cosim.to_zarr`.

    Examples
    --------
    >>> import numpy as np, pandas as pd, tempfile, dask_cosim as dcs
    >>> out = tempfile.mkdtemp() + "/pairs"
    >>> pairs = dcs.pairs_above(np.eye(3), threshold=0.5)
    >>> dcs.to_parquet(pairs, out).blocks >= 1
    True
    >>> len(pd.read_parquet(out))
    3
    """
    import dask.dataframe as dd

    if not isinstance(pairs, dd.DataFrame):
        raise TypeError(
            f"pairs: expected the dask DataFrame of pairs_above, received {type(pairs).__name__}; "
            "write arrays with to_zarr"
        )
    start = time.perf_counter()
    facts = _provenance.lookup(collection_name(pairs))
    params, layout = parquet_identity(pairs)
    opened = open_output(
        path, "parquet", params, layout, overwrite=overwrite, resume=resume, storage_options=storage_options
    )
    where, (fs, root), info = opened.where, opened.handle, opened.stored
    nparts = pairs.npartitions
    done_dir = f"{root}/{PQ_META}/done"
    if info is not None and resume:
        for leftover in fs.glob(f"{root}/.part-*"):
            fs.rm(leftover)
        done = _parquet_done(fs, done_dir)
    else:  # new, empty, or replaced (open_output allowed it: overwrite=True)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.makedirs(done_dir, exist_ok=True)
        info = {"params": jsonable(params), "layout": layout, "complete": False}
        _write_json(fs, f"{root}/{PQ_META}/attrs.json", info)
        done = set()
    pending = [i for i in range(nparts) if i not in done]
    gate = WriteGate()
    execute(_write_tasks(pairs, fs, root, pending, gate), progress, gate)
    finished = _parquet_done(fs, done_dir)
    missing = sorted(set(range(nparts)) - finished)
    if missing:
        raise RuntimeError(
            f"to_parquet: partitions {missing[:5]} of {where} have no marker after the run; "
            "rerun with resume=True"
        )
    info["complete"] = True
    _write_json(fs, f"{root}/{PQ_META}/attrs.json", info)
    total = int(np.prod(facts.get("shape", [0]))) if facts.get("shape") else 0
    share = len(pending) / max(nparts, 1)
    return WriteReport(
        path=where,
        kind=facts.get("kind", "pairs"),
        shape=tuple(facts.get("shape", ())),
        blocks=nparts,
        blocks_skipped=len(done),
        blocks_written=len(pending),
        pairs=int(round(total * share)),
        dim=dim_of(facts),
        seconds=time.perf_counter() - start,
        products=products(facts, share),
        found=_parquet_rows(fs, root, nparts),
        threshold=facts.get("threshold"),
    )


class _Target:
    """Where the partitions of one call go (filesystem, directory) and the call's write gate;
    handed to every write task. Its token is new for every call, so two calls never share
    write tasks."""

    __slots__ = ("fs", "root", "gate", "token")

    def __init__(self, fs, root: str, gate: WriteGate):
        self.fs, self.root, self.gate = fs, root, gate
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token


def _write_tasks(pairs, fs, root: str, pending: list[int], gate: WriteGate) -> list:
    """The write tasks of the pending partitions, all in one graph layer (``cosine-parquet-*``):
    one ``map_partitions`` of :func:`_write_partition` over ``pairs``, of whose tasks only the
    pending ones are returned (computing them runs nothing a finished partition needs)."""
    written = map_partitions(
        pairs,
        _write_partition,
        prefix="cosine-parquet",
        target=_Target(fs, root, gate),
        meta=("rows", "i8"),
    )
    tasks = written.to_delayed(optimize_graph=False)
    return [tasks[i] for i in pending]


def _write_partition(part, target: _Target, partition_info=None) -> int:
    """Write partition ``i`` under a temporary name, rename it, then mark it done.

    Returns its row count, or 0 when the call has already failed elsewhere and writes nothing more.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    i, fs, root = partition_info["number"], target.fs, target.root
    with target.gate.entered() as wanted:
        if not wanted:
            return 0
        table = pa.Table.from_pandas(part, preserve_index=False)
        tmp = f"{root}/.part-{i:06d}.{os.getpid()}.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, f"{root}/{_pq_name(i)}")
        fs.pipe_file(f"{root}/{PQ_META}/done/{i:06d}", b"")
    return len(part)


def _parquet_done(fs, done_dir: str) -> set[int]:
    if not fs.exists(done_dir):
        return set()
    return {int(os.path.basename(p)) for p in fs.ls(done_dir, detail=False)}


def _write_json(fs, path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    fs.mv(tmp, path)


def _parquet_rows(fs, root: str, nparts: int) -> int | None:
    """Rows of the whole Parquet output, from the files' footers."""
    import pyarrow.parquet as pq

    try:
        total = 0
        for i in range(nparts):
            with fs.open(f"{root}/{_pq_name(i)}", "rb") as f:
                total += pq.read_metadata(f).num_rows
        return total
    except Exception:  # noqa: BLE001 - only for the report
        return None
