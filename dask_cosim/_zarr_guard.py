"""Read zarr inputs so that a lost or corrupt chunk is an error naming the array and chunk.

zarr returns the array's ``fill_value`` for a chunk that is not in the store: that is
how it stores all-fill chunks cheaply (``write_empty_chunks=False``), but for embedding
inputs a missing chunk almost always means lost data, and zeros would silently become
similarities of 0. :class:`GuardedZarr` wraps a :class:`zarr.Array` for
:func:`dask.array.from_array`: after each read, every chunk whose part of the selection
equals the fill value is looked up in the store (no extra I/O otherwise), and a missing
one raises :class:`InputChunkError`, as does a chunk zarr cannot decode. The dask
config key ``cosine.missing-input-chunks`` (``"error"``, the default, or ``"fill"``)
chooses zarr's own semantics instead.

For sharded arrays the lookup is per shard: an inner chunk absent from an existing
shard reads as the fill value, as zarr defines.
"""

from __future__ import annotations

import itertools
from typing import Any

import dask.config
import numpy as np

__all__ = ["InputChunkError", "GuardedZarr", "guard_input"]

_POLICIES = ("error", "fill")


class InputChunkError(ValueError):
    """A chunk of a zarr input is missing from its store or cannot be decoded."""


def _policy() -> str:
    value = dask.config.get("cosine.missing-input-chunks", "error")
    if value not in _POLICIES:
        raise ValueError(
            f"dask config cosine.missing-input-chunks: expected one of {_POLICIES}, received {value!r}"
        )
    return value


def guard_input(x: Any, name: str) -> Any:
    """Wrap ``x`` in :class:`GuardedZarr` if it is a zarr array, else return it unchanged."""
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        return x
    if isinstance(x, zarr.Array):
        return GuardedZarr(x, name, _policy())
    return x


class GuardedZarr:
    """A :class:`zarr.Array` read through :meth:`__getitem__` with chunk checks.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 2), chunks=(2, 2), dtype="f8")
    >>> z[:2] = 1.0  # rows 2-3 were never written: their chunk is missing
    >>> GuardedZarr(z, "a")[:2].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    >>> GuardedZarr(z, "a")[:]  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dask_cosim._zarr_guard.InputChunkError: a: chunk (1, 0) (store key 'c/1/0', rows 2:4, ...
    """

    def __init__(self, array, name: str, policy: str = "error"):
        self.array = array
        self.name = name
        self.policy = policy

    # the attributes dask.array.from_array and the planner look at
    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.array.chunks

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"GuardedZarr({self.name}: {self.where()})"

    def where(self) -> str:
        return f"zarr array {str(self.array.store_path)!r}"

    def __getitem__(self, key) -> np.ndarray:
        sel, drop = _as_slices(key, self.shape)
        try:
            data = self.array[sel]
        except Exception:  # noqa: BLE001 - codecs and stores raise many types
            self._raise_unreadable(sel)
            data = self.array[sel]  # every chunk reads on its own: a transient failure, try once more
        data = np.asarray(data)
        if self.policy == "error":
            self._check_missing(sel, data)
        return data[tuple(0 if d else slice(None) for d in drop)] if any(drop) else data

    # -- helpers ---------------------------------------------------------------------------
    def _grid(self) -> tuple[int, ...]:
        """Shape of one stored object (a shard for sharded arrays, else a chunk)."""
        return tuple(self.array.shards or self.array.chunks)

    def _chunks_of(self, sel: tuple[slice, ...]):
        """(chunk coords, chunk region in array coordinates) for every stored object ``sel`` touches."""
        grid = self._grid()
        ranges = []
        for s, g in zip(sel, grid, strict=True):
            if s.stop <= s.start:
                return
            ranges.append(range(s.start // g, (s.stop - 1) // g + 1))
        for coords in itertools.product(*ranges):
            region = tuple(
                slice(c * g, min((c + 1) * g, n)) for c, g, n in zip(coords, grid, self.shape, strict=True)
            )
            yield coords, region

    def _key(self, coords) -> str:
        return self.array.metadata.encode_chunk_key(coords)

    def _describe(self, coords, region) -> str:
        axis_names = ("batch", "rows", "columns") if len(region) == 3 else ("rows", "columns")
        span = ", ".join(f"{n} {r.start}:{r.stop}" for n, r in zip(axis_names, region, strict=True))
        return f"chunk {tuple(coords)} (store key {self._key(coords)!r}, {span}) of {self.where()}"

    def _exists(self, coords) -> bool:
        from ._compat import zarr_key_exists

        return zarr_key_exists(self.array, self._key(coords))

    def _check_missing(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        fill = self.array.fill_value
        for coords, region in self._chunks_of(sel):
            local = tuple(
                slice(max(r.start, s.start) - s.start, min(r.stop, s.stop) - s.start)
                for r, s in zip(region, sel, strict=True)
            )
            part = data[local]
            is_fill = np.isnan(part) if _isnan(fill) else part == fill
            if bool(np.all(is_fill)) and not self._exists(coords):
                raise InputChunkError(
                    f"{self.name}: {self._describe(coords, region)} is missing from the store; "
                    f"zarr would read it as the fill value {fill}. If the chunk was lost, "
                    "restore it; if it is deliberately all fill value, set the dask config "
                    "cosine.missing-input-chunks='fill'"
                )

    def _raise_unreadable(self, sel: tuple[slice, ...]) -> None:
        for coords, region in self._chunks_of(sel):
            try:
                self.array[region]
            except Exception as chunk_err:  # noqa: BLE001
                raise InputChunkError(
                    f"{self.name}: cannot read {self._describe(coords, region)}: "
                    f"{type(chunk_err).__name__}: {chunk_err}"
                ) from chunk_err


def _isnan(value) -> bool:
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return False


def _as_slices(key, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], list[bool]]:
    """A basic-indexing key (what dask passes) as one step-1 slice per axis, and which
    axes an integer index drops."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    out, drop = [], []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            out.append(slice(i, i + 1))
            drop.append(True)
            continue
        if not isinstance(k, slice):
            raise TypeError(f"GuardedZarr supports integers and slices, received {key!r}")
        start, stop, step = k.indices(n)
        if step != 1:
            raise TypeError(f"GuardedZarr supports step-1 slices only, received {key!r}")
        out.append(slice(start, max(start, stop)))
        drop.append(False)
    return tuple(out), drop
