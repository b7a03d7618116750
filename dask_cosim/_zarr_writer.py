"""Writing a similarity or top-k result into a zarr v3 group, block by block and resumably.

Every output block is written by a ``cosine-write`` task, which stores the block's data
and then, right after, its own marker (one marker chunk per block, so no two tasks ever
read-modify-write a shared object). A block counts as done only when its marker exists:
zarr skips all-zero chunks (``write_empty_chunks=False``) and a crash can leave a chunk
without its marker, so "the chunk file exists" never means "the block is done".

The write tasks are one graph layer, a :func:`dask.array.blockwise` of the write over
the result (:func:`_write_tasks`); only the blocks without a marker are computed, so a
resumed run's graph holds no task of a finished block, product included. A registered
top-k result is written link by link instead (:mod:`dask_cosim._topk_store`).
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from . import _provenance, _topk_store
from ._backend import to_numpy
from ._compat import block_delayeds, block_slices
from ._execution import WriteGate, WriteReport, dim_of, execute, products
from ._out_state import ATTR, LAYOUT, MARKERS, ResumeMismatchError, describe, jsonable, open_output
from ._sizing import regular_chunks

__all__ = ["to_zarr", "ZarrPayload", "zarr_payload", "zarr_layout"]


def to_zarr(
    result,
    store,
    *,
    overwrite: bool = False,
    resume: bool = False,
    codec: str = "auto",
    storage_options: dict | None = None,
    progress: bool = False,
) -> WriteReport:
    """Compute ``result`` block by block into a zarr v3 group, resumably.

    A :func:`~dask_cosim.cosine_similarity` result becomes the array ``similarity``; a
    :func:`~dask_cosim.topk` result ``(vals, idx)`` the arrays ``values`` and ``indices``.
    Each output block is computed and written by its own task, then marked done in the
    ``_blocks_done`` array (one chunk per block), so memory stays at a few blocks per
    worker and an interrupted run can be resumed. zarr chunks equal the dask blocks
    (irregular blocks are first rechunked to regular ones, with a warning), so no two
    tasks ever write the same chunk.

    Parameters
    ----------
    result : dask.array.Array or tuple of two dask arrays
        What to write.
    store : str, os.PathLike or zarr store
        Local path, fsspec URL (``s3://…``, with ``storage_options``) or zarr store. Use a
        path or URL with a multi-process cluster (in-memory stores do not travel).
    overwrite : bool
        Replace an existing output (a zarr node, or an empty directory). Never deletes a
        non-empty directory that is not a zarr store.
    resume : bool
        Finish a half-written output: check that it was computed with the same
        parameters (else :class:`ResumeMismatchError`), delete zarr's leftover
        ``*.partial`` files, and compute only the blocks without a marker.
    codec : {"auto", "none", "zstd", "blosc-lz4"}
        Compression. ``"auto"`` stores similarities uncompressed (cosine scores barely
        compress; see the README's codec section) and top-k arrays with blosc-lz4 +
        bitshuffle (their int64 indices compress well).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    progress : bool
        Show a progress bar (``distributed.progress`` under a distributed client).

    Returns
    -------
    WriteReport

    Raises
    ------
    OutputExistsError
        The output exists and neither ``overwrite`` nor ``resume`` was given.
    ResumeMismatchError
        ``resume=True`` and the stored parameters differ.

    Examples
    --------
    >>> import numpy as np, zarr, tempfile, dask_cosim as dcs
    >>> out = tempfile.mkdtemp() + "/sim.zarr"
    >>> S = dcs.cosine_similarity(np.eye(4, 3), chunks=(2, 2))
    >>> dcs.to_zarr(S, out).blocks
    4
    >>> zarr.open_group(out)["similarity"][0, :2]
    array([1., 0.])
    """
    start = time.perf_counter()
    payload = zarr_payload(result)
    layout = zarr_layout(payload, codec)
    opened = open_output(
        store, "zarr", payload.params, layout, overwrite=overwrite, resume=resume,
        storage_options=storage_options,
    )  # fmt: skip
    where, group = opened.where, opened.handle
    if opened.stored is not None and resume:
        _clean_partial_files(group.store)
        _ensure_arrays(group, payload, layout)
    else:  # new, empty, or replaced (open_output allowed it: overwrite=True)
        group = _create(store, payload, layout, storage_options)
    done = group[MARKERS][...].astype(bool)
    gate = WriteGate()
    if payload.topk_source is not None:  # resumable link by link (see _topk_store)
        values = payload.arrays["values"]
        _topk_store.ensure_state_arrays(group, values)
        token = tokenize(values.name, describe(group.store), group.path)
        source = payload.topk_source
        linked = group[_topk_store.LINKS][...]
        products_of = {"triangle": source.triangle, "reused_parts": bool((linked[~done] > 0).any())}
        tasks, pending, computed = _topk_store.chain_tasks(
            source, values, group, done, linked, gate, MARKERS, token
        )
    else:
        tasks, pending = _write_tasks(payload, group, done, gate)
        computed, products_of = None, {}
    execute(tasks, progress, gate)
    _finish_zarr(group, payload, where)
    if payload.topk_source is not None:
        _topk_store.drop_state_arrays(group)
    seconds = time.perf_counter() - start  # the write; the counts below read the output back
    pairs = int(sum(payload.pairs_per_block[i] for i in pending))
    extra: dict[str, Any] = {}
    if payload.kind == "topk":
        shape = payload.arrays["values"].shape
        extra = {"rows": int(np.prod(shape[:-1])), "k": int(shape[-1])}
        extra["nan_rows"] = _topk_nan_rows(group["values"])
    return WriteReport(
        path=where,
        kind=payload.kind,
        shape=tuple(next(iter(payload.arrays.values())).shape),
        blocks=int(done.size),
        blocks_skipped=int(done.sum()),
        blocks_written=len(pending),
        pairs=pairs,
        dim=payload.dim,
        seconds=seconds,
        arrays=layout["arrays"],
        products=_products(result, payload, pairs, computed),
        **products_of,
        **extra,
    )


def _products(result, payload: ZarrPayload, pairs: int, computed) -> int | None:
    """Dot products this write computed: those of the product blocks a top-k chain job
    ran (``computed``: ``(*batch block, i, j)``, :func:`~dask_cosim._topk_store.computed_blocks`;
    a resumed job skips the blocks whose parts are saved), else the pending blocks' share."""
    facts = _provenance.lookup(_result_name(result))
    if computed is None or not facts.get("chunks"):
        return products(facts, pairs / max(int(payload.pairs_per_block.sum()), 1))
    chunks = payload.arrays["values"].chunks
    rows, cols = chunks[-2], facts["chunks"][-1]
    batch = chunks[0] if len(chunks) == 3 else None
    return sum(
        (1 if batch is None else int(batch[block[0]])) * int(rows[block[-2]]) * int(cols[block[-1]])
        for block in computed
    )


def _result_name(result) -> str:
    return result.name if isinstance(result, da.Array) else result[0].name


@dataclass(frozen=True)
class ZarrPayload:
    kind: str
    arrays: dict[str, da.Array]  # name in the group -> dask array (regular blocks)
    grid: tuple[int, ...]  # marker grid: blocks along the leading axes
    params: dict[str, Any]
    pairs_per_block: np.ndarray  # similarity entries each block covers
    dim: int | None
    topk_source: Any = None  # how a top-k result was reduced: written by checkpointed chains


def zarr_payload(result) -> ZarrPayload:
    if isinstance(result, da.Array):
        facts = _provenance.lookup(result.name)
        arr = _regularize(result, "to_zarr")
        kind = facts.get("kind", "array")
        params = facts or _fallback_params("array", result)
        sizes = _block_sizes(arr.chunks)
        return ZarrPayload(kind, {"similarity": arr}, arr.numblocks, params, sizes, dim_of(facts))
    if (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and all(isinstance(r, da.Array) for r in result)
    ):
        vals, idx = result
        if vals.shape != idx.shape or vals.ndim not in (2, 3):
            raise ValueError(
                f"result: expected topk's (values, indices) of equal shape (batch, N, k) or (N, k), "
                f"received shapes {vals.shape} and {idx.shape}"
            )
        facts = _provenance.lookup(vals.name)
        params = facts or _fallback_params("topk", vals, idx)
        whole_k = {vals.ndim - 1: -1}
        vals = _regularize(vals.rechunk(whole_k), "to_zarr values")
        idx = _regularize(idx.rechunk(vals.chunks), "to_zarr indices")
        # each row of a block was chosen among M columns: M = the similarity's last axis
        m = int(facts["shape"][-1]) if facts.get("shape") else 1
        sizes = _block_sizes(vals.chunks[:-1]) * m
        arrays = {"values": vals, "indices": idx}
        source = _topk_store.lookup(result[0].name)
        if source is not None and (source.parts.chunks[:-1] != vals.chunks[:-1] or vals.chunks != idx.chunks):
            source = None  # rechunked for writing: the parts no longer match the blocks
        return ZarrPayload("topk", arrays, vals.numblocks[:-1], params, sizes, dim_of(facts), source)
    raise TypeError(
        "result: expected the dask array of cosine_similarity or the (values, indices) pair of topk, "
        f"received {type(result).__name__}; write pairs_above results with to_parquet"
    )


def _block_sizes(chunks) -> np.ndarray:
    """Number of elements of every block of a chunked array (an array over the block grid)."""
    sizes = np.ones(tuple(len(c) for c in chunks), dtype=np.int64)
    for axis, c in enumerate(chunks):
        shape = [1] * len(chunks)
        shape[axis] = len(c)
        sizes = sizes * np.asarray(c, dtype=np.int64).reshape(shape)
    return sizes


def _fallback_params(kind: str, *arrays: da.Array) -> dict[str, Any]:
    """Identity of a result dask_cosim did not build: its (deterministic) dask names."""
    return {
        "kind": kind,
        "names": [a.name for a in arrays],
        "shape": list(arrays[0].shape),
        "chunks": [list(c) for c in arrays[0].chunks],
        "dtype": str(arrays[0].dtype),
    }


def _regularize(arr: da.Array, what: str) -> da.Array:
    if regular_chunks(arr.chunks):
        return arr
    sizes = tuple(max(c) if c else 0 for c in arr.chunks)
    warnings.warn(
        f"{what}: dask blocks {tuple(tuple(c) for c in arr.chunks)} are irregular and cannot equal zarr "
        f"chunks; rechunking to regular blocks {sizes} before writing (costs memory and a copy). "
        "Pass integer chunks= to the computation to avoid this.",
        stacklevel=4,
    )
    return arr.rechunk(sizes)


def _zarr_chunk_shape(chunks) -> tuple[int, ...]:
    return tuple(max(1, c[0]) if c else 1 for c in chunks)


def _codec_spec(codec: str, array: str) -> str:
    from ._options import check_choice

    if check_choice("codec", codec) == "auto":
        return "none" if array == "similarity" else "blosc-lz4"
    return codec


def _compressors(spec: str, dtype: np.dtype):
    from zarr.codecs import BloscCodec, ZstdCodec

    if spec == "none":
        return None
    if spec == "zstd":
        return [ZstdCodec(level=1)]
    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize)]


def zarr_layout(payload: ZarrPayload, codec: str) -> dict[str, Any]:
    arrays = {
        name: {
            "shape": list(arr.shape),
            "chunks": list(_zarr_chunk_shape(arr.chunks)),
            "dtype": str(arr.dtype),
            "codec": _codec_spec(codec, name),
        }
        for name, arr in payload.arrays.items()
    }
    layout = {"layout": LAYOUT, "arrays": arrays, "grid": list(payload.grid)}
    if payload.topk_source is not None and payload.topk_source.triangle:
        # the order of each panel's links (_topk_store.links_of): a store saved in another
        # order must not be resumed in this one
        layout["topk_links"] = "diagonal-first"
    return layout


def _create(store, payload: ZarrPayload, layout: dict, storage_options):
    import zarr

    info = {"params": jsonable(payload.params), "layout": layout, "complete": False}
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    group = zarr.open_group(store, mode="w", attributes={ATTR: info}, storage_options=storage_options)
    _ensure_arrays(group, payload, layout)
    return group


def _ensure_arrays(group, payload: ZarrPayload, layout: dict) -> None:
    """Create the data and marker arrays that do not exist yet (a crash may hit between them)."""
    existing = set(group.array_keys())
    for name, spec in layout["arrays"].items():
        if name in existing:
            arr = group[name]
            if list(arr.shape) != spec["shape"] or list(arr.chunks) != spec["chunks"]:
                raise ResumeMismatchError(
                    f"resume: stored array {name!r} has shape {arr.shape} and chunks {arr.chunks}, "
                    f"this run needs {tuple(spec['shape'])} and {tuple(spec['chunks'])}; pass "
                    "overwrite=True (--overwrite) to start again"
                )
            continue
        dtype = np.dtype(spec["dtype"])
        group.create_array(
            name,
            shape=tuple(spec["shape"]),
            chunks=tuple(spec["chunks"]),
            dtype=dtype,
            compressors=_compressors(spec["codec"], dtype),
            fill_value=0,
        )
    if MARKERS not in existing:
        grid = tuple(payload.grid)
        group.create_array(
            MARKERS, shape=grid, chunks=(1,) * len(grid), dtype="uint8", fill_value=0, compressors=None
        )


def _clean_partial_files(store) -> int:
    """Delete the ``*.partial`` temporaries a killed zarr 3.1 local write leaves behind."""
    root = getattr(store, "root", None)
    if root is None or not os.path.isdir(root):
        return 0
    removed = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".partial"):
                os.unlink(os.path.join(dirpath, f))
                removed += 1
    return removed


class _Target:
    """Where the blocks of one call go: the zarr arrays, the marker array, the (regular)
    block sizes and the call's write gate; handed to every write task.

    A plain object (not a dataclass or container) so that dask does not traverse the zarr
    arrays inside it when building the graph. Its token is new for every call, so two
    calls (a run and its resumption) never share write tasks.
    """

    __slots__ = ("arrays", "marker", "sizes", "gate", "token")

    def __init__(self, arrays, marker, sizes: tuple[int, ...], gate: WriteGate):
        self.arrays, self.marker, self.sizes, self.gate = arrays, marker, sizes, gate
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token

    def block_of(self, region: tuple[slice, ...]) -> tuple[int, ...]:
        """The marker block of a region: blocks are regular, so the start says which."""
        return tuple(s.start // n if n else 0 for s, n in zip(region, self.sizes, strict=False))


def _write_tasks(payload: ZarrPayload, group, done: np.ndarray, gate: WriteGate):
    """The write tasks of the blocks not done yet, all in one graph layer (``cosine-write-*``).

    One :func:`dask.array.blockwise` of :func:`_write_block` over the result's arrays
    (values and indices of a top-k share their blocks), each task reading the block it
    writes; of its tasks only those of pending blocks are returned, and computing them
    runs nothing a finished block needs (dask culls the rest).

    Returns ``(one Delayed per pending block, the pending block indices)``.
    """
    arrays = list(payload.arrays.values())
    first = arrays[0]
    index = "abcdefgh"[: first.ndim]
    sizes = tuple(c[0] if c else 0 for c in first.chunks[: done.ndim])  # regular: see _regularize
    target = _Target([group[name] for name in payload.arrays], group[MARKERS], sizes, gate)
    written = da.blockwise(
        _write_block,
        index,
        *(x for arr in arrays for x in (arr, index)),
        block_slices(first.chunks),  # the region each task writes
        index,
        token="cosine-write",  # a key prefix in both array modes (see _compat)
        target=target,
        adjust_chunks=dict.fromkeys(index, 1),  # one count per block
        align_arrays=False,  # the arrays share their blocks by construction
        dtype=np.int64,
        meta=np.empty((0,) * first.ndim, dtype=np.int64),
    )
    tasks = block_delayeds(written)
    pending = [tuple(int(i) for i in ix) for ix in np.argwhere(~done)]
    tail = (0,) * (first.ndim - done.ndim)  # a top-k block spans all k columns
    return [tasks[ix + tail] for ix in pending], pending


def _write_block(*args, target: _Target):
    """Store one output block (every array), then its marker: data first, marker after.

    ``args``: the block of each array, then the region they cover. Returns the count of
    blocks written (1), or 0 when the call has already failed elsewhere and writes nothing
    more, as a block of the ``blockwise`` result.
    """
    *blocks, region = args
    index = target.block_of(region)
    count = np.zeros((1,) * len(region), dtype=np.int64)
    with target.gate.entered() as wanted:
        if not wanted:
            return count
        for array, block in zip(target.arrays, blocks, strict=True):
            try:
                array[region] = to_numpy(block)
            except OSError as err:  # disk full, read-only location...: say which output and block
                raise OSError(
                    err.errno,
                    f"to_zarr: cannot write block {index} of {str(array.store_path)!r}: "
                    f"{err.strerror or err}; that block is not marked done, so resume=True (--resume) "
                    "writes it once the problem is fixed",
                ) from err
        target.marker[tuple(slice(i, i + 1) for i in index)] = np.ones((1,) * len(index), dtype=np.uint8)
    return count + 1


def _finish_zarr(group, payload: ZarrPayload, where: str) -> None:
    done = group[MARKERS][...]
    if not done.all():
        missing = np.argwhere(done == 0)[:5].tolist()
        raise RuntimeError(
            f"to_zarr: {int((done == 0).sum())} blocks of {where} have no marker after the run "
            f"(first: {missing}); rerun with resume=True"
        )
    info = dict(group.attrs[ATTR])
    info["complete"] = True
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    group.attrs.update({ATTR: info})


def _topk_nan_rows(values) -> int | None:
    """Rows of a written top-k ``values`` array that hold a NaN score (read block by block)."""
    try:
        vals = da.from_array(values, chunks=values.chunks)
        return int(da.isnan(vals).any(axis=-1).sum().compute())
    except Exception:  # noqa: BLE001 - only for the report; never fail a finished write over it
        return None
