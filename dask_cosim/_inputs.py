"""Turn user inputs (NumPy, CuPy, dask, zarr arrays or paths, ``.npy`` files, lists) into
lazily-read arrays whose shape and dtype are known without reading any data."""

from __future__ import annotations

import os
import uuid
import weakref
from typing import Any

import numpy as np
from dask.base import tokenize

from . import _sparse

__all__ = ["open_input", "storage_chunks", "BlockSource", "input_token"]


def open_input(x: Any, name: str) -> Any:
    """Return an array-like with ``.shape``/``.dtype`` for input ``name`` ("a" or "b").

    Strings and paths open a zarr array (local path or fsspec URL), memory-map a
    ``.npy`` file or open a ``.npz`` sparse matrix (:func:`scipy.sparse.save_npz`);
    nothing is read but the ``.npz`` arrays. dask, NumPy, CuPy, zarr and other array-API
    arrays pass through; sparse inputs (scipy.sparse of any format, pydata ``sparse``,
    ``cupyx.scipy.sparse``) become a :class:`~dask_cosim._sparse.SparseSource` and dask
    arrays of sparse chunks pass through. Lists and scalars go through
    :func:`numpy.asarray`. Anything else is a ``TypeError`` naming its type: masked
    arrays (their raw data would be computed, mask ignored) and objects that only look
    like arrays (``shape``, ``dtype``, ``__getitem__``).
    """
    if isinstance(x, (str, os.PathLike)):
        return _open_path(os.fspath(x), name)
    if _sparse.is_sparse(x):
        return _open_sparse(x, name)
    if isinstance(x, np.ma.MaskedArray) or _is_masked_dask(x):
        raise TypeError(
            f"{name}: masked arrays ({type(x).__module__}.{type(x).__name__}) are not supported: the "
            "masked entries would be computed from their raw data. Pass x.filled(0) to treat masked "
            "entries as zeros, or drop the masked vectors"
        )
    if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"):
        if not _is_known_array(x):
            raise TypeError(
                f"{name}: received {type(x).__module__}.{type(x).__name__}, which has shape/dtype but is "
                f"not an array dask_cosim reads; {ACCEPTED}"
            )
        if _sparse.is_sparse_dask(x) and len(x.shape) != 2:
            raise ValueError(f"{name}: sparse inputs must be 2-D (N, D), received shape {tuple(x.shape)}")
        return x
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({err}); {ACCEPTED}") from err
    if arr.dtype == object:
        raise TypeError(
            f"{name}: {type(x).__name__} converts to an object array (ragged or mixed elements); {ACCEPTED}"
        )
    return arr


#: What a refused input is told.
ACCEPTED = (
    "expected a NumPy, CuPy, dask, zarr or other array-API array, a scipy.sparse matrix or array, "
    "a pydata sparse array, a dask array of sparse chunks, a nested list of numbers, or a path "
    "(zarr, .npy, .npz)"
)


def _is_known_array(x) -> bool:
    """Arrays whose blocks dask_cosim can read: array-API arrays (NumPy, CuPy, dask, ...),
    objects that define ``__array__``, zarr and h5py arrays, and the package's own readers."""
    import array_api_compat

    if isinstance(x, (NpyFile, BlockSource, _sparse.SparseSource)):
        return True
    module = type(x).__module__ or ""
    if module.split(".")[0] in ("zarr", "h5py"):
        return True
    # array-API arrays, and array-likes that convert themselves (xarray, pandas)
    return bool(array_api_compat.is_array_api_obj(x)) or hasattr(type(x), "__array__")


def _is_masked_dask(x) -> bool:
    from ._compat import dask_meta

    return isinstance(dask_meta(x), np.ma.MaskedArray)


def _open_sparse(x, name: str):
    if len(x.shape) != 2:
        raise ValueError(
            f"{name}: sparse inputs must be 2-D (N, D), received {_sparse.describe(x)} of shape "
            f"{tuple(x.shape)}"
        )
    return _sparse.SparseSource(x)


def _open_path(path: str, name: str):
    is_url = "://" in path
    if not is_url and not os.path.exists(path):
        raise FileNotFoundError(f"{name}: no such file or zarr store: {path!r}")
    if path.endswith(".npz"):
        return _open_npz(path, name)
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


def _open_npz(path: str, name: str):
    """A sparse matrix saved by :func:`scipy.sparse.save_npz`, read whole into memory (the
    format is a zip of arrays, which cannot be memory-mapped) and sliced per block."""
    from ._extras import require

    scipy_sparse = require("scipy.sparse", f"{name}: reading the sparse matrix {path!r}")

    try:
        x = scipy_sparse.load_npz(path)
    except Exception as err:  # noqa: BLE001 - a zip, pickle or key error: not a sparse .npz
        raise ValueError(
            f"{name}: {path!r} is not a sparse matrix written by scipy.sparse.save_npz "
            f"({type(err).__name__}: {err})"
        ) from err
    return _open_sparse(x, name)


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


#: id(array) -> (weak reference to it, its token); an entry leaves with its array.
_MEMORY_TOKENS: dict[int, tuple[weakref.ref, str]] = {}


def input_token(x: Any) -> str:
    """A name for input ``x`` that costs nothing in proportion to its data.

    Inputs that know their identity (``.npy`` files, sources with ``__dask_tokenize__``,
    zarr arrays by store and metadata) are tokenised by dask. An array in memory (NumPy,
    memory maps, CuPy, ...) is named by its identity: the same object gets the same name
    for as long as it lives, and no two live objects share one, without reading (hashing)
    its bytes. Like a NumPy view, an input must not be modified until its results are
    computed; results name what they were computed from, not when.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 3))
    >>> input_token(x) == input_token(x), input_token(x) == input_token(x.copy())
    (True, False)
    """
    if hasattr(x, "__dask_tokenize__") or not _in_memory(x):
        return tokenize(x)
    key = id(x)
    entry = _MEMORY_TOKENS.get(key)
    if entry is not None and entry[0]() is x:
        return entry[1]
    token = uuid.uuid4().hex
    try:
        ref = weakref.ref(x, lambda _, key=key: _MEMORY_TOKENS.pop(key, None))
    except TypeError:  # not weakly referenceable: a fresh name per call is still correct
        return token
    _MEMORY_TOKENS[key] = (ref, token)
    return token


def _in_memory(x: Any) -> bool:
    """Whether ``x`` holds its data in this process (hashing it would read all of it)."""
    return isinstance(x, np.ndarray) or hasattr(x, "__cuda_array_interface__") or _sparse.is_sparse(x)
