"""Output locations: what is there, whether a write may use it, and the identity a resume checks.

:func:`open_output` is the one opening check of :func:`~dask_cosim.to_zarr`,
:func:`~dask_cosim.to_parquet` and :func:`~dask_cosim.check_output`: ``overwrite`` and
``resume`` must not both be set; the location is read (metadata only, nothing created);
data that is not a dask_cosim output is never used, and one is used only with
``overwrite`` or ``resume``; a resumed output must have been computed with the same
parameters and layout.

On disk, a zarr output is a group whose attribute :data:`ATTR` records the parameters,
the layout and whether it is complete, and whose :data:`MARKERS` array holds one chunk
per output block; a Parquet output is a directory of ``part-*.parquet`` files with the
same record in ``_dask_cosim/attrs.json`` and one empty file per finished partition under
``_dask_cosim/done/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ATTR",
    "LAYOUT",
    "MARKERS",
    "PQ_META",
    "OutputExistsError",
    "ResumeMismatchError",
    "Opened",
    "open_output",
    "check_flags",
    "describe",
    "jsonable",
    "filesystem",
]

#: Group attribute under which dask_cosim records what an output holds.
ATTR = "dask_cosim"
#: Version of the on-disk layout (markers, attributes).
LAYOUT = 1
#: The marker array: one uint8 chunk per output block, 1 once the block is written.
MARKERS = "_blocks_done"
#: Facts that may differ between a run and its resumption without changing the data.
_VOLATILE = ("version", "device")
#: Parquet: data files are ``part-<block>.parquet``; bookkeeping lives under ``_dask_cosim/``
#: (pyarrow/pandas ignore names starting with "_" or ".", so readers never see it).
PQ_META = "_dask_cosim"


class OutputExistsError(FileExistsError):
    """The output location holds data and neither ``overwrite`` nor ``resume`` allows using it."""


class ResumeMismatchError(ValueError):
    """``resume=True`` but the stored output was computed with other parameters."""


@dataclass(frozen=True)
class Opened:
    """An output location that a write may use (:func:`open_output` checked it).

    ``status``: "absent", "empty", "partial"/"complete" (a dask_cosim output), "foreign" (a
    zarr node or Parquet dataset written by something else, replaced with ``overwrite``).
    ``stored``: the record of a dask_cosim output there (``None`` otherwise). ``handle``:
    the zarr group (``None`` unless one exists) or the Parquet ``(filesystem, root)``.
    """

    where: str
    status: str
    stored: dict[str, Any] | None
    handle: Any


def open_output(
    store,
    kind: str,
    params: Mapping[str, Any],
    layout: Mapping[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    storage_options: dict | None,
) -> Opened:
    """Check that a ``kind`` ("zarr" or "parquet") output of ``params``/``layout`` may be
    written to ``store``, reading only metadata; raise otherwise.

    >>> import tempfile
    >>> opened = open_output(tempfile.mkdtemp() + "/new", "zarr", {}, {}, overwrite=False,
    ...                      resume=False, storage_options=None)
    >>> opened.status, opened.stored
    ('absent', None)
    """
    check_flags(overwrite, resume)
    where = describe(store)
    if kind == "parquet":
        (fs, root, stored), status = _parquet_state(store, storage_options)
        handle: Any = (fs, root)
    else:
        handle, status = _zarr_state(store, storage_options)
        stored = dict(handle.attrs[ATTR]) if status in ("complete", "partial") else None
    _refuse(status, where, overwrite, resume, parquet=kind == "parquet")
    if resume and stored is not None:
        _check_same(stored.get("params", {}), params, where)
        _check_same(stored.get("layout", {}), layout, where)
    return Opened(where, status, stored, handle)


def check_flags(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ValueError(
            "overwrite=True and resume=True contradict each other: resume keeps the finished "
            "blocks, overwrite deletes them; pass only one"
        )


def describe(store) -> str:
    """How messages name an output location."""
    if isinstance(store, (str, os.PathLike)):
        return os.fspath(store)
    return repr(store)


def jsonable(x: Any) -> Any:
    """``x`` as the JSON it is stored as (what a later run compares against)."""
    return json.loads(json.dumps(x, default=str))


def filesystem(path, storage_options):
    """``(fsspec filesystem, root path)`` of a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(path), **(storage_options or {}))


# --------------------------------------------------------------------------- refusals and resume checks


def _refuse(status: str, where: str, overwrite: bool, resume: bool, parquet: bool) -> None:
    if status in ("absent", "empty"):
        return
    if status == "other":
        kind = "Parquet" if parquet else "zarr"
        raise OutputExistsError(
            f"output {where} already exists and holds data that is not {kind}; refusing to use or "
            "delete it (even with overwrite=True): remove it yourself or choose another output"
        )
    if status == "foreign":
        kind = "a Parquet dataset written by dask_cosim" if parquet else "a zarr group written by dask_cosim"
        if not overwrite:
            raise OutputExistsError(
                f"output {where} already exists and is not {kind}; choose another output or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        return
    if status == "partial" and not (resume or overwrite):
        raise OutputExistsError(_exists_message(where, partial=True))
    if status == "complete" and not (resume or overwrite):
        raise OutputExistsError(_exists_message(where, partial=False))


def _exists_message(where: str, partial: bool) -> str:
    if partial:
        return (
            f"output {where} holds a half-written result from an earlier run; pass resume=True "
            "(--resume) to finish it or overwrite=True (--overwrite) to start again"
        )
    return f"output {where} already exists; pass overwrite=True (--overwrite) to replace it"


def _comparable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jsonable(dict(params)).items() if k not in _VOLATILE}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same(stored: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    old, new = _flatten(_comparable(stored)), _flatten(_comparable(wanted))
    if old == new:
        return
    diffs = [
        f"{key}: stored {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    raise ResumeMismatchError(
        f"resume: the output at {where} was computed with different parameters ("
        + "; ".join(diffs)
        + "); rerun with the same parameters, or pass overwrite=True (--overwrite) to start again"
    )


# --------------------------------------------------------------------------- what is there


def _local_path(store) -> str | None:
    if isinstance(store, (str, os.PathLike)):
        path = os.fspath(store)
        if "://" not in path:
            return path
        if path.startswith("file://"):
            return path[len("file://") :]
    return None


def _zarr_state(store, storage_options):
    """``(group_or_None, status)`` of a zarr output location, without creating anything.

    status: "absent", "empty", "complete"/"partial" (a dask_cosim output), "foreign" (a
    zarr node written by something else) or "other" (data that is not zarr at all).
    """
    import zarr
    from zarr.errors import ContainsArrayError, NodeNotFoundError

    local = _local_path(store)
    if local is not None:
        if not os.path.exists(local):
            return None, "absent"
        if not os.path.isdir(local):
            return None, "other"
        if not os.listdir(local):
            return None, "empty"
    try:
        group = zarr.open_group(store, mode="r+", storage_options=storage_options)
    except ContainsArrayError:
        return None, "foreign"
    except (FileNotFoundError, NodeNotFoundError):
        if local is not None:
            return None, "other"
        return None, _remote_status(store, storage_options)
    info = group.attrs.get(ATTR)
    if not isinstance(info, dict):
        if not list(group.keys()) and not dict(group.attrs):
            return group, "empty"
        return group, "foreign"
    return group, "complete" if info.get("complete") else "partial"


def _remote_status(store, storage_options) -> str:
    if isinstance(store, (str, os.PathLike)):
        fs, root = filesystem(store, storage_options)
        return "other" if fs.exists(root) and fs.ls(root) else "absent"
    return "absent"


def _parquet_state(path, storage_options):
    """``((fs, root, stored record or None), status)`` of a Parquet output directory."""
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        return (fs, root, None), "absent"
    if not fs.isdir(root):
        return (fs, root, None), "foreign"
    attrs_path = f"{root}/{PQ_META}/attrs.json"
    if fs.exists(attrs_path):
        with fs.open(attrs_path, "r") as f:
            info = json.load(f)
        return (fs, root, info), "complete" if info.get("complete") else "partial"
    if not fs.ls(root):
        return (fs, root, None), "empty"
    return (fs, root, None), "foreign" if _only_parquet_files(fs, root) else "other"


def _only_parquet_files(fs, root) -> bool:
    for p in fs.find(root):
        name = os.path.basename(p)
        if not (name.endswith(".parquet") or name.startswith((".", "_"))):
            return False
    return True
