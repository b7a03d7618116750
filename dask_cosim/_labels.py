"""Label masks: validate ``labels=`` / ``label_pairs=`` and cut the labels into blocks.

The kernels (:func:`dask_cosim._select.label_excluded`) only ever see the 1-D label
slices of their block's rows and columns; this module checks the user's labels at call
time and hands them to the graphs as dask arrays chunked like the rows / columns of the
output, so each product task reads only its two slices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import dask.array as da
import numpy as np
from dask.base import tokenize

from ._compat import from_array_named
from ._options import check_choice

if TYPE_CHECKING:
    from ._prepared import Prepared

__all__ = ["LabelPairs", "check_label_pairs", "check_labels", "block_labels", "labels_token"]

LabelPairs = Literal["different", "same"]


def check_label_pairs(label_pairs) -> str:
    """``"different"`` or ``"same"``, else a ValueError naming ``label_pairs``.

    >>> check_label_pairs("same")
    'same'
    """
    return check_choice("label_pairs", label_pairs)


def _one(labels, name: str, length: int):
    """One label vector: a 1-D integer NumPy or dask array of ``length`` entries."""
    if isinstance(labels, da.Array):
        arr = labels
    else:
        try:
            arr = np.asarray(labels)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: expected a 1-D integer array, received {labels!r} ({err})") from None
    if arr.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D integer array of length {length}, received shape {arr.shape}"
        )
    if arr.dtype.kind == "f" and not isinstance(arr, da.Array) and np.isnan(arr).any():
        raise ValueError(f"{name}: received NaN labels; expected integers (e.g. from pandas.factorize)")
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"{name}: expected integer labels, received dtype {arr.dtype} "
            "(map other labels to integers first, e.g. with pandas.factorize)"
        )
    if np.isnan(arr.shape[0]) or arr.shape[0] != length:
        raise ValueError(f"{name}: expected {length} labels (one per vector), received {arr.shape[0]}")
    return arr.astype(np.int64)


def check_labels(labels, prep: Prepared):
    """Validated ``(labels_a, labels_b)`` for the prepared inputs, or ``None``.

    Self-similarity takes one 1-D integer array of length N; with ``b`` a pair
    ``(labels_a, labels_b)`` of lengths N and M. NumPy labels are copied as int64.
    """
    if labels is None:
        return None
    n, m = prep.out_shape[-2:]
    if prep.self_similar:
        if isinstance(labels, tuple) and len(labels) == 2 and all(np.ndim(x) == 1 for x in labels):
            raise ValueError(
                "labels: for self-similarity (b=None) expected one 1-D integer array of length "
                f"N = {n}, received a tuple of {len(labels)}"
            )
        la = _one(labels, "labels", n)
        return la, la
    if not isinstance(labels, (tuple, list)) or len(labels) != 2:
        raise ValueError(
            "labels: with b given expected a tuple (labels_a, labels_b) of 1-D integer arrays, "
            f"received {type(labels).__name__}"
        )
    return _one(labels[0], "labels[0] (labels of a)", n), _one(labels[1], "labels[1] (labels of b)", m)


def block_labels(labels, prep: Prepared) -> tuple[da.Array, da.Array]:
    """The labels as dask arrays chunked like the output's rows and columns."""
    la, lb = labels

    def chunked(x, sizes, what):
        if isinstance(x, da.Array):
            return x.rechunk((sizes,))
        name = f"cosine-labels-{what}-{tokenize(x, sizes)}"
        return from_array_named(x, chunks=(sizes,), name=name, meta=np.empty((0,), dtype=x.dtype))

    return chunked(la, prep.plan.rows, "a"), chunked(lb, prep.plan.cols, "b")


def labels_token(labels) -> str | None:
    """A deterministic identity of the labels (for provenance and resumed writes)."""
    if labels is None:
        return None
    la, lb = labels
    return tokenize(la) if la is lb else tokenize(la, lb)
