"""The lazy graph: normalise each input block once, then one matrix product per output block."""

from __future__ import annotations

from typing import Literal

import dask.array as da
import numpy as np
from dask.base import tokenize

from . import _config, _provenance, _sparse
from ._backend import is_device_array
from ._compat import block_slices, from_array_named
from ._inputs import BlockSource, input_token, open_input, storage_chunks
from ._kernels import normalize_rows, similarity_block
from ._options import check_choice, check_flag
from ._plan import Operand, Plan, check_pair, compute_dtype, output_dtype, result_dtype
from ._prepared import Prepared, _meta
from ._resources import annotate_for, routed
from ._result import SimilarityArray
from ._sizing import Job, Settings, plan_job
from ._small import small_similarity
from ._triangle import similarity_triangle, use_triangle
from ._worker_memory import cluster_layout
from ._zarr_guard import guard_input

__all__ = ["cosine_similarity", "prepare"]

Device = Literal["auto", "cpu", "gpu"]
Precision = Literal["float32", "tf32", "bfloat16", "float16"]
Like = Literal["numpy", "cupy"]
ZeroVector = Literal["zero", "nan", "error"]


def prepare(
    a,
    b=None,
    *,
    chunks="auto",
    dtype=None,
    device: Device = "auto",
    zero_vector: ZeroVector = "zero",
    check_finite: bool = False,
    precision: Precision = "float32",
    like: Like | None = None,
    op: str = "similarity",
    k: int | None = None,
    scaled: bool = False,
) -> Prepared:
    """Validate the inputs, plan the blocks and build the normalised inputs (lazily).

    Nothing is read or computed here: ``check_finite=True`` makes each normalise task
    raise :class:`~dask_cosim.NonFiniteError` when its block holds NaN or inf.
    ``precision`` and ``like`` are described in :func:`cosine_similarity`.
    ``op`` (``"similarity"``, ``"topk"``, ``"pairs"``) and ``k`` tell the sizing policy
    (:mod:`dask_cosim._sizing`) what the blocks are for; it is asked once, with the
    active cluster's layout (one call to its scheduler) or this machine's.
    ``scaled``: the blocks feed dense products only, which may take them raw with their
    rows' inverse norms (:mod:`dask_cosim._scaled`) instead of normalised copies.
    """
    device = check_choice("device", device)
    zero_vector = check_choice("zero_vector", zero_vector)
    precision = check_choice("precision", precision)
    check_finite = check_flag("check_finite", check_finite)
    self_similar = b is None or b is a
    a_in = open_input(a, "a")
    b_in = a_in if self_similar else open_input(b, "b")
    like = _check_like(like, device, is_device_array(a_in) or is_device_array(b_in))
    op_a = Operand.from_shape("a", a_in.shape, a_in.dtype)
    op_b = Operand.from_shape("b", b_in.shape, b_in.dtype)
    batch = check_pair(op_a, op_b)
    sparse = _is_sparse_input(a_in) or _is_sparse_input(b_in)
    if sparse and (is_device_array(a_in) or is_device_array(b_in)):
        raise ValueError(
            "a sparse input cannot be paired with a CuPy array (sparse products run on the host); "
            "pass the dense input as a NumPy array"
        )
    if sparse:
        _check_sparse_options(op_a, op_b, device=device, precision=precision, check_finite=check_finite)
    default = result_dtype(op_a.dtype, op_b.dtype)
    out = output_dtype(dtype, default)
    work = compute_dtype(default, out)
    batched = op_a.ndim == 3 or op_b.ndim == 3
    settings, threads = current_settings()

    spec = _chunk_spec(chunks, batched)
    on_device = is_device_array(a_in) or is_device_array(b_in)
    job = Job(
        op, batch, op_a.rows, op_b.rows, op_a.dim,
        in_itemsize=max(op_a.dtype.itemsize, op_b.dtype.itemsize),
        compute_itemsize=work.itemsize,
        out_itemsize=out.itemsize,
        self_similar=self_similar,
        batched=batched,
        k=k,
        on_gpu=device == "gpu" or (device == "auto" and on_device),
        keep_on_gpu=like == "cupy",
        grains=(storage_chunks(a_in)[-2], storage_chunks(b_in)[-2]),
        cores=threads or _cores(),
        nnz_per_row=_nnz_per_row(a_in, b_in, op_a.dim) if sparse else None,
    )  # fmt: skip
    plan = plan_job(job, settings, spec)
    norm = {
        "compute_dtype": work.name,
        "zero_vector": zero_vector,
        "device": _normalize_device(device, on_device),
    }
    if check_finite:  # checked by the normalise tasks (sparse inputs refuse the option above)
        norm["check_finite"] = True
    rechunked = self_similar and plan.cols != plan.rows  # the normalised blocks are rechunked
    if scaled and precision == "float32" and not (sparse or on_device or rechunked or device == "gpu"):
        norm["scaled"] = True  # raw NumPy blocks and their inverse norms (dask_cosim._scaled)
    an, a_index = _normalized(a_in, op_a, plan, plan.rows, batch, "a", on_device, norm)
    if self_similar:
        bn, b_index = an, a_index.replace("i", "j")
        # device blocks: no rechunk tasks off the GPU workers; sparse blocks: none to concatenate
        if plan.cols != plan.rows and (device == "gpu" or sparse):
            bn, _ = _normalized(a_in, op_a, plan, plan.cols, batch, "a", on_device, norm)
        elif plan.cols != plan.rows:
            bn = an.rechunk({an.ndim - 2: plan.cols})
    else:
        bn, b_index = _normalized(b_in, op_b, plan, plan.cols, batch, "b", on_device, norm)
        b_index = b_index.replace("i", "j")
    out_index = "kij" if batched else "ij"
    out_shape = (batch, op_a.rows, op_b.rows) if batched else (op_a.rows, op_b.rows)
    return Prepared(
        an, bn, a_index, b_index, out_index, out_shape, out, work, plan, device,
        _config.blas_threads_setting(), self_similar, on_device, precision, like,
        own_graph=not (isinstance(a_in, da.Array) or isinstance(b_in, da.Array)),
    )  # fmt: skip


def _is_sparse_input(x) -> bool:
    return isinstance(x, _sparse.SparseSource) or _sparse.is_sparse_dask(x)


def _check_sparse_options(op_a: Operand, op_b: Operand, **options) -> None:
    """What sparse inputs do not support (yet), refused at call time."""
    for op in (op_a, op_b):
        if op.ndim != 2:
            raise ValueError(
                f"{op.name}: with a sparse input both inputs must be 2-D (N, D); received {op.name} of "
                f"shape {op.shape}"
            )
    if options["device"] == "gpu":
        raise ValueError("device='gpu' is not supported with sparse inputs: sparse products run on the host")
    if options["precision"] != "float32":
        raise ValueError(
            f"precision={options['precision']!r} is not supported with sparse inputs (their products are "
            "exact in the work dtype); use precision='float32'"
        )
    if options["check_finite"]:
        raise ValueError(
            "check_finite=True is not supported with sparse inputs; a vector holding NaN or inf gives "
            "NaN similarities"
        )


#: Non-zeros per row assumed for a dask array of sparse chunks (its nnz is unknown until
#: computed); a plan is then an estimate (see README: Sparse inputs).
ASSUMED_NNZ_PER_ROW = 1024


def _nnz_per_row(a_in, b_in, dim: int) -> float | None:
    """Mean non-zeros per row of the sparse inputs for the sizing policy, ``None`` (dense
    estimate) when one input is dense: its blocks hold all ``D`` values per row."""
    out = 0.0
    for x in (a_in, b_in):
        if isinstance(x, _sparse.SparseSource):
            out = max(out, _sparse.nnz_of(x.x) / max(1, x.shape[0]))
        elif _sparse.is_sparse_dask(x):
            out = max(out, float(min(dim, ASSUMED_NNZ_PER_ROW)))
        else:
            return None
    return min(float(dim), out)


def _check_like(like, device: str, on_device: bool) -> str:
    """Where output blocks live: ``"numpy"`` (host) or ``"cupy"`` (left on the GPU)."""
    if like is None:
        return "cupy" if on_device and device != "cpu" else "numpy"
    like = check_choice("like", like)
    if like == "cupy" and not (device == "gpu" or (on_device and device == "auto")):
        raise ValueError(
            f"like='cupy' keeps output blocks on the GPU, so it needs device='gpu' (or CuPy inputs "
            f"with device='auto'); received device={device!r} with "
            f"{'CuPy' if on_device else 'host'} inputs. Use like='numpy' or device='gpu'"
        )
    return like


def _normalize_device(device: str, on_device: bool) -> str:
    """Where the normalise tasks run.

    ``"gpu"``: on the GPU workers, and the normalised block stays there as the task
    result (uploaded once, reused by every product task of that row/column block).
    ``"auto"`` with host inputs: on NumPy, because on a cluster that may mix GPU and
    CPU workers a task result must be readable by any worker (a CPU worker cannot
    unpickle a CuPy array); each product task then uploads its two blocks to the GPU
    if its worker has one. Normalising is O(rows x D) and memory-bound, the product
    O(rows x cols x D), so this costs little.
    """
    return "cpu" if device == "auto" and not on_device else device


def _cores() -> int:
    from dask.system import CPU_COUNT

    return CPU_COUNT


def current_settings() -> tuple[Settings, int | None]:
    """The sizing settings now (dask config, the workers' budget) and the cluster's threads."""
    budget, (workers, threads) = _config.max_task_memory(), cluster_layout()
    source = None
    if workers is not None and workers.budget < budget:
        budget, source = workers.budget, workers.explain()
    settings = Settings(
        chunk_bytes=_config.target_block_bytes(),
        gpu_block_bytes=_config.gpu_block_bytes(),
        budget_bytes=budget,
        task_flops=_config.task_flops(),
        max_blocks=_config.max_blocks(),
        budget_source=source,
    )
    return settings, threads


def _chunk_spec(chunks, batched: bool) -> tuple:
    if isinstance(chunks, str) and chunks == "auto":
        return ("auto", "auto", "auto")
    if isinstance(chunks, dict) or not isinstance(chunks, (tuple, list)):
        raise ValueError(
            f"chunks: expected 'auto' or a tuple of {'3' if batched else '2'} output block sizes "
            f"({'(batch, n, m)' if batched else '(n, m)'}), received {chunks!r}"
        )
    want = 3 if batched else 2
    if len(chunks) != want:
        raise ValueError(
            f"chunks: the output is {want}-D, so chunks needs {want} entries "
            f"({'(batch, n, m)' if batched else '(n, m)'}), received {chunks!r} with {len(chunks)}"
        )
    return tuple(chunks) if batched else ("auto", *chunks)


def _normalized(x, op: Operand, plan: Plan, rows, batch: int, name: str, on_device: bool, norm: dict):
    """The input as a dask array in plan-aligned blocks, each normalised by its own task."""
    broadcast = op.ndim == 3 and op.batch == 1 and batch > 1
    if op.ndim == 3 and not broadcast:
        chunks = (plan.batch, rows, (op.dim,))
    else:
        chunks = ((1,), rows, (op.dim,)) if op.ndim == 3 else (rows, (op.dim,))
    if _is_sparse_input(x):
        return _normalized_sparse(x, rows, name, norm), "id"
    if isinstance(x, da.Array):
        arr = x.rechunk(chunks)
    else:
        arr = from_array_named(
            BlockSource(guard_input(x, name)),  # a missing/corrupt zarr chunk is an error
            chunks=chunks,
            asarray=not on_device,
            name=f"cosine-in-{name}-{tokenize(input_token(x), chunks, on_device)}",  # one name per chunking
            meta=_meta(on_device, op.ndim, x.dtype),
        )
    if broadcast:
        arr = arr[0]
    index = "kid" if arr.ndim == 3 else "id"
    meta = _meta(on_device, arr.ndim, np.dtype(norm["compute_dtype"]))
    with annotate_for(norm["device"]):
        normed = da.blockwise(
            routed(_normalize_task, norm["device"]),
            index,
            arr,
            index,
            block_slices(arr.chunks),  # where the block lies, for error messages
            index,
            align_arrays=False,  # the slices are aligned with arr by construction
            dtype=meta.dtype,
            meta=meta,
            token="cosine-normalize",
            input_name=name,
            batched=arr.ndim == 3,
            **norm,
        )
    return normed, index


def _normalized_sparse(x, rows, name: str, norm: dict) -> da.Array:
    """A sparse input (in memory or dask) in row blocks over all columns, each block
    converted once to CSR and normalised by its own ``cosine-normalize`` task."""
    chunks = (rows, (x.shape[1],))
    if isinstance(x, da.Array):
        arr = x.rechunk(chunks)
    else:
        arr = from_array_named(
            x,
            chunks=chunks,
            asarray=False,
            name=f"cosine-input-{name}-{tokenize(input_token(x.x), chunks)}",  # one name per chunking
            meta=_sparse.csr_meta(x.dtype),
        )
    return da.blockwise(
        _normalize_sparse_task,
        "id",
        arr,
        "id",
        block_slices(arr.chunks),
        "id",
        align_arrays=False,
        dtype=np.dtype(norm["compute_dtype"]),
        meta=_sparse.csr_meta(norm["compute_dtype"]),
        token="cosine-normalize",
        input_name=name,
        compute_dtype=norm["compute_dtype"],
        zero_vector=norm["zero_vector"],
    )


def _normalize_sparse_task(x, where: tuple[slice, ...], **kwargs):
    return _sparse.normalize_sparse_rows(x, offset=(0, where[0].start), **kwargs)


def _normalize_task(x, where: tuple[slice, ...], **kwargs):
    offset = (where[0].start, where[1].start) if len(where) == 3 else (0, where[0].start)
    return normalize_rows(x, offset=offset, **kwargs)


def similarity_from(prep: Prepared) -> da.Array:
    """The ``(batch, N, M)`` similarity array from prepared inputs: one product per block.

    Self-similarity with square blocks computes only the blocks ``j >= i`` and
    transposes them for ``j < i`` (see :mod:`dask_cosim._triangle`).
    """
    if 0 in prep.out_shape:
        chunks = tuple((max(s, 0),) for s in prep.out_shape)
        return da.zeros(prep.out_shape, dtype=prep.out_dtype, chunks=chunks, meta=prep.meta)
    if use_triangle(prep):
        return similarity_triangle(prep)
    return prep.pair_blockwise(
        similarity_block, token="cosine-block", dtype=prep.out_dtype, meta=prep.meta, **prep.product_kwargs()
    )


def cosine_similarity(
    a,
    b=None,
    *,
    chunks="auto",
    dtype=None,
    device: Device = "auto",
    zero_vector: ZeroVector = "zero",
    check_finite: bool = False,
    precision: Precision = "float32",
    like: Like | None = None,
) -> da.Array:
    """Lazy cosine similarity of every vector of ``a`` with every vector of ``b``.

    ``S[k, i, j] = a[k, i] . b[k, j] / (||a[k, i]|| ||b[k, j]||)``, clipped to [-1, 1].

    Parameters
    ----------
    a : array-like, shape ``(batch, N, D)`` or ``(N, D)``
        NumPy, CuPy, dask or zarr array, a zarr path/URL, a ``.npy`` path, or anything
        :func:`numpy.asarray` accepts.
    b : array-like, shape ``(batch, M, D)`` or ``(M, D)``, optional
        Same kinds as ``a``; ``None`` (or ``a`` itself) means self-similarity.
        Batches broadcast like :func:`numpy.matmul`: a 2-D input or a batch of 1 pairs
        with every batch of the other.
    chunks : "auto" or tuple
        Output block sizes ``(batch, n, m)`` (``(n, m)`` for 2-D output); each entry an
        int, ``-1`` (whole axis), ``"auto"`` or explicit block sizes. ``"auto"`` aims at
        dask's ``array.chunk-size`` per output block (``cosine.gpu-block-bytes`` for
        blocks left on the GPU, ``like="cupy"``). D is never split. A plan whose
        per-task memory exceeds ``cosine.max-task-memory`` raises
        :class:`~dask_cosim.PlanError` before anything runs.
    dtype : float dtype, optional
        Output dtype. Default as scikit-learn: float32 when both inputs are float32 or
        narrower floats, float64 otherwise.
    device : {"auto", "cpu", "gpu"}
        Where each block runs, decided on the worker: ``"auto"`` uses CuPy when that
        worker has a usable GPU (NumPy otherwise), ``"gpu"`` requires one and, on a
        ``distributed`` cluster, sends the normalise and product tasks only to workers
        that declare ``GPU`` resources (``dask worker --resources GPU=1``). See README:
        GPU workers.
    zero_vector : {"zero", "nan", "error"}
        Similarity of a zero vector: 0 (scikit-learn's choice), NaN, or raise at compute
        time naming the input, batch and row.
    check_finite : bool
        Refuse NaN and inf: the task that normalises an input block holding one raises
        :class:`~dask_cosim.NonFiniteError` (at compute time, like ``zero_vector="error"``)
        naming the input, the block, how many of its vectors hold NaN/inf and the first
        (batch, row, column). Nothing is read when the graph is built. Default False: a
        vector with NaN/inf gives NaN similarities.
    precision : {"float32", "tf32", "bfloat16", "float16"}
        Product precision. ``"float32"`` (default): exact products in the work dtype
        (float64 inputs stay float64). The others round the unit vectors to that format
        and accumulate in float32 (tensor cores on a GPU; emulated on NumPy), for speed
        when errors around 1e-3 (tf32, float16) or 1e-2 (bfloat16) are acceptable;
        float64 inputs then also take the reduced path.
    like : {"numpy", "cupy"}, optional
        Where output blocks live: ``"numpy"`` copies each block to host memory in its
        task, ``"cupy"`` leaves it on the GPU (needs ``device="gpu"``, or CuPy inputs).
        Default: ``"cupy"`` for CuPy inputs, ``"numpy"`` otherwise.

    Returns
    -------
    dask.array.Array
        Shape ``(batch, N, M)``, or ``(N, M)`` when both inputs are 2-D. Nothing is
        computed until asked; a slice computes only the blocks it touches. Its
        ``compute()`` on the threaded or synchronous scheduler writes each block straight
        into the result (no final assembly copy; see :class:`~dask_cosim._result.SimilarityArray`).

    Examples
    --------
    >>> import numpy as np, dask_cosim as dcs
    >>> a = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> S = dcs.cosine_similarity(a)
    >>> S.compute().round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    """
    options = dict(
        chunks=chunks, dtype=dtype, device=device, zero_vector=zero_vector, check_finite=check_finite,
        precision=precision, like=like,
    )  # fmt: skip
    small = small_similarity(a, b, **options)
    if small is not None:  # one task, computed without a scheduler (dask_cosim._small)
        array, plan, facts = small
        result = SimilarityArray.one_task(array, facts["run"])
        _record(
            result.name, "similarity", plan, facts["self_similar"], facts["out_shape"], facts["out_dtype"],
            device, a, b, zero_vector=zero_vector, precision=precision,
        )  # fmt: skip
        return result
    prep = prepare(a, b, **options, scaled=True)
    result = SimilarityArray.wrap(similarity_from(prep), prep)
    record_result(result.name, "similarity", prep, a, b, zero_vector=zero_vector, precision=precision)
    return result


def record_result(name: str, kind: str, prep: Prepared, a, b, **params) -> None:
    """Register what ``name`` was computed from (for the attributes writers store)."""
    plan, shape, dtype = prep.plan, prep.out_shape, prep.out_dtype
    _record(name, kind, plan, prep.self_similar, shape, dtype, prep.device, a, b, **params)


def _record(name: str, kind: str, plan: Plan, self_similar: bool, shape, dtype, device, a, b, **params):
    from ._version import __version__

    _provenance.record(
        name,
        plan=plan,
        kind=kind,
        a=_provenance.describe_input(a),
        b=None if self_similar else _provenance.describe_input(b),
        self_similar=self_similar,
        shape=list(shape),
        chunks=[list(c) for c in plan.chunks],
        dtype=np.dtype(dtype).name,
        device=device,
        version=__version__,
        **params,
    )
