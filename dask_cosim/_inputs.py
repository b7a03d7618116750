"""Turn user inputs (NumPy, CuPy, dask, zarr arrays or paths, ``.npy`` files, lists) into
lazily-read arrays whose shape and dtype are known without reading any data."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["open_input", "storage_chunks", "BlockSource"]


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
            return NpyFile(path)
        except ValueError as err:
            raise ValueError(f"{name}: {path!r} is not a readable .npy file: {err}") from err
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except FileNotFoundError as err:
        if not is_url and os.path.exists(path):  # a file or folder that holds no zarr metadata
            raise ValueError(
                f"{name}: {path!r} is not a zarr array (no zarr metadata there) nor a .npy file"
            ) from err
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


class NpyFile:
    """A ``.npy`` file, memory-mapped on first access in each process and never read whole.

    Pickles as its path (not its data), so workers of a cluster that share the file system
    map the file themselves.
    """

    def __init__(self, path: str):
        self.path = path
        self._mmap = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.ndim = self._mmap.shape, self._mmap.dtype, self._mmap.ndim

    def __getitem__(self, index):
        if self._mmap is None:
            self._mmap = np.load(self.path, mmap_mode="r")
        return self._mmap[index]

    def __getstate__(self):
        return {**self.__dict__, "_mmap": None}

    def __dask_tokenize__(self):
        stat = os.stat(self.path)
        return ("npy", os.path.abspath(self.path), stat.st_mtime_ns, stat.st_size)


class BlockSource:
    """Wrap an in-memory or stored array for :func:`dask.array.from_array` without its copy.

    ``from_array`` copies any array with a ``.copy`` method (a full second copy of the
    input, and a full read of a memory map). dask_cosim reads inputs block by block
    instead; like NumPy views, inputs must not be modified until results are computed.
    """

    def __init__(self, x):
        self.x = x
        self.shape, self.dtype, self.ndim = tuple(x.shape), x.dtype, len(x.shape)

    def __getitem__(self, index):
        return self.x[index]
