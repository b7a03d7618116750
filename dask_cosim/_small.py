"""Small calls: a similarity that fits one block is one task, run without a scheduler.

A call on in-memory NumPy inputs whose whole product is at most :data:`SMALL_FLOPS`
floating-point operations (and whose inputs and output together hold at most
:data:`SMALL_BYTES`) cannot gain from blocks: splitting it across threads saves less than
dask's per-call cost of building, optimising and scheduling a graph. Such a call returns
a one-block :class:`~dask_cosim._result.SimilarityArray` whose single task normalises both
inputs and multiplies them with the same kernels as the blocked graph (so results are
bitwise the same as a one-block plan), and whose ``compute()`` on the threaded or
synchronous scheduler calls that task in the calling thread: no graph optimisation, no
thread pool. On a ``distributed`` cluster the same one-task graph runs on a worker, where
``device="auto"`` still decides NumPy or CuPy. Everything else (dask, zarr, CuPy or sparse
inputs, explicit ``chunks``, ``device="gpu"``, reduced precision, ``like="cupy"``) takes
the blocked path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dask.base import tokenize

from . import _config
from ._compat import array_from_graph
from ._inputs import input_token
from ._kernels import normalize_rows, similarity_block
from ._options import check_choice, check_flag
from ._plan import Operand, Plan, check_pair, compute_dtype, output_dtype, result_dtype
from ._scaled import ScaledBlock
from ._sizing import Job

__all__ = ["SMALL_FLOPS", "SMALL_BYTES", "small_similarity"]

#: Largest product (floating-point operations, 2 x batch x N x M x D) computed as one task.
SMALL_FLOPS = 2**24
#: Largest inputs plus output (bytes) computed as one task.
SMALL_BYTES = 2**22


def small_similarity(
    a, b, *, chunks, dtype, device, zero_vector, check_finite, precision, like
) -> tuple[Any, Plan, dict[str, Any]] | None:
    """``(array, plan, facts)`` for a call that takes the one-task path, else ``None``.

    ``array`` is a plain one-block dask array, ``plan`` its one-block
    :class:`~dask_cosim._plan.Plan` and ``facts`` what provenance records; ``run`` (in
    ``facts``) computes the block. Arguments are those of
    :func:`~dask_cosim.cosine_similarity`; they are validated by the same checks as the
    blocked path, so errors are the same.
    """
    self_similar = b is None or b is a
    if not (
        type(a) is np.ndarray
        and (self_similar or type(b) is np.ndarray)
        and isinstance(chunks, str)
        and chunks == "auto"
        and device in ("auto", "cpu")
        and precision == "float32"
        and like in (None, "numpy")
    ):
        return None
    b = a if self_similar else b
    if a.ndim not in (2, 3) or b.ndim not in (2, 3) or not {a.dtype.kind, b.dtype.kind} <= set("fiub"):
        return None  # the blocked path explains what is wrong
    op_a = Operand.from_shape("a", a.shape, a.dtype)
    op_b = Operand.from_shape("b", b.shape, b.dtype)
    batch = check_pair(op_a, op_b)
    out_bytes = batch * op_a.rows * op_b.rows * 8
    held = a.nbytes + (0 if self_similar else b.nbytes) + out_bytes
    if (
        0 in (batch, op_a.rows, op_b.rows, op_a.dim)
        or 2 * batch * op_a.rows * op_b.rows * op_a.dim > SMALL_FLOPS
        or held > SMALL_BYTES
        or out_bytes > _config.target_block_bytes()  # array.chunk-size asks for smaller blocks
    ):
        return None
    zero_vector = check_choice("zero_vector", zero_vector)
    check_finite = check_flag("check_finite", check_finite)
    default = result_dtype(op_a.dtype, op_b.dtype)
    out = output_dtype(dtype, default)
    work = compute_dtype(default, out)
    batched = a.ndim == 3 or b.ndim == 3
    norm = {"compute_dtype": work.name, "zero_vector": zero_vector}
    if check_finite:
        norm["check_finite"] = True
    product = {
        "out_dtype": out.name,
        "device": device,
        "blas_threads": _config.blas_threads_setting(),
        "like": "numpy",
        "precision": precision,
    }
    task = _OneBlock(_operand(a, batch), None if self_similar else _operand(b, batch), norm, product)
    token = tokenize(input_token(a), None if self_similar else input_token(b), norm, product, "small")
    name = f"cosine-similarity-{token}"
    out_shape = (batch, op_a.rows, op_b.rows) if batched else (op_a.rows, op_b.rows)
    chunks = tuple((s,) for s in out_shape)
    key = (name,) + (0,) * len(out_shape)
    meta = np.empty((0,) * len(out_shape), dtype=out)
    array = array_from_graph(name, {name: ({key: (task,)}, set())}, [], chunks, meta)
    job = Job(
        "similarity", batch, op_a.rows, op_b.rows, op_a.dim,
        in_itemsize=max(op_a.dtype.itemsize, op_b.dtype.itemsize), compute_itemsize=work.itemsize,
        out_itemsize=out.itemsize, self_similar=self_similar, batched=batched,
    )  # fmt: skip
    plan = Plan(
        (batch,), (op_a.rows,), (op_b.rows,), held, job=job,
        notes=(f"one task: a small call (at most {SMALL_FLOPS:.3g} FLOP and {SMALL_BYTES} bytes)",),
    )  # fmt: skip
    facts = {"run": task, "self_similar": self_similar, "out_shape": out_shape, "out_dtype": out}
    return array, plan, facts


def _operand(x: np.ndarray, batch: int) -> np.ndarray:
    """A 3-D input with a batch of 1 pairs with every batch of the other (as the blocked
    path, which hands the product its one 2-D batch)."""
    return x[0] if x.ndim == 3 and x.shape[0] == 1 and batch > 1 else x


class _OneBlock:
    """The one task: normalise both inputs and multiply them (the blocked path's kernels)."""

    def __init__(self, a: np.ndarray, b: np.ndarray | None, norm: dict, product: dict):
        self.a, self.b, self.norm, self.product = a, b, norm, product

    def __call__(self) -> np.ndarray:
        an = self._normalized(self.a, "a")
        bn = an if self.b is None else self._normalized(self.b, "b")
        return similarity_block(an, bn, **self.product)

    def _normalized(self, x: np.ndarray, name: str) -> np.ndarray | ScaledBlock:
        return normalize_rows(
            x, **self.norm, device="cpu", input_name=name, offset=(0, 0), batched=x.ndim == 3, scaled=True
        )

    def __dask_tokenize__(self) -> tuple:
        return ("cosine-one-block", id(self))
