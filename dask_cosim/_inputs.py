"""Turn user inputs (NumPy, CuPy, dask, zarr arrays or paths, ``.npy`` files, lists) into
lazily-read arrays whose shape and dtype are known without reading any data."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["open_input", "storage_chunks"]


def open_input(x: Any, name: str) -> Any:
    """Return an array-like with ``.shape``/``.dtype`` for input ``name`` ("a" or "b").

    Strings and paths open a zarr array (local path or fsspec URL) or memory-map a
    ``.npy`` file; nothing is read. dask, NumPy, CuPy and zarr arrays pass through;
    anything else goes through :func:`numpy.asarray`.
    """
    if isinstance(x, (str, os.PathLike)):
        return _open_path(os.fspath(x), name)
    if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"):
        return x
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array: {err}") from err
    return arr


def _open_path(path: str, name: str):
    is_url = "://" in path
    if not is_url and not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file or zarr store: {path!r}")
    if path.endswith(".npy"):
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"{name}: {path!r} is not a readable .npy file: {err}") from err
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: no zarr array at {path!r}") from err
    except Exception as err:  # noqa: BLE001 - zarr raises many types for "not zarr"
        raise ValueError(f"{name}: {path!r} is not a zarr array ({type(err).__name__}: {err})") from err
    if not isinstance(node, zarr.Array):
        keys = sorted(getattr(node, "array_keys", lambda: [])())
        hint = f"; it holds the arrays {keys}, pass e.g. {path.rstrip('/')}/{keys[0]}" if keys else ""
        raise ValueError(f"{name}: {path!r} is a zarr group, not an array{hint}")
    return node


def storage_chunks(x: Any) -> tuple[int | None, ...]:
    """The input's own chunk size along each axis (dask or zarr), ``None`` where it has none."""
    chunks = getattr(x, "chunks", None)
    if chunks is None or isinstance(x, np.ndarray):
        return (None,) * len(x.shape)
    out = []
    for c in chunks:
        if isinstance(c, tuple):  # dask: per-axis block sizes
            out.append(max(c) if c else None)
        else:  # zarr: one int per axis
            out.append(int(c))
    return tuple(out)
