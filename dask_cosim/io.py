"""Write results block by block: similarity and top-k to zarr, pairs to Parquet, resumably.

The public face of the writers: :func:`to_zarr` (:mod:`dask_cosim._zarr_writer`),
:func:`to_parquet` (:mod:`dask_cosim._parquet_writer`), :func:`check_output` and the
errors they raise (:mod:`dask_cosim._out_state`), and the :class:`WriteReport` a write
returns (:mod:`dask_cosim._execution`, which also runs the writes).
"""

from __future__ import annotations

import sys

from ._execution import WriteReport
from ._out_state import (
    ATTR,
    LAYOUT,
    MARKERS,
    OutputExistsError,
    ResumeMismatchError,
    open_output,
)
from ._parquet_writer import parquet_identity, to_parquet
from ._sizing import regular_chunks
from ._zarr_writer import to_zarr, zarr_layout, zarr_payload

__all__ = [
    "to_zarr",
    "to_parquet",
    "WriteReport",
    "OutputExistsError",
    "ResumeMismatchError",
    "check_output",
    "regular_chunks",
    "ATTR",
    "LAYOUT",
    "MARKERS",
]


def _is_dataframe(result) -> bool:
    """Whether ``result`` is a dask DataFrame, without importing ``dask.dataframe`` (and
    pandas) for a job that has none: one that has one imported it already."""
    dd = sys.modules.get("dask.dataframe")
    return dd is not None and isinstance(result, dd.DataFrame)


def check_output(
    result,
    store,
    *,
    overwrite: bool = False,
    resume: bool = False,
    codec: str = "auto",
    storage_options: dict | None = None,
) -> str:
    """Raise now, before any cluster starts, if writing ``result`` to ``store`` would be refused.

    Checks exactly what :func:`to_zarr` (or :func:`to_parquet` for a DataFrame) checks
    before computing: that an existing output may be used (``overwrite``/``resume``) and,
    for ``resume``, that it was computed with the same parameters. Reads only metadata.

    Returns
    -------
    str
        What is there now: "absent", "empty", "partial" or "complete" (a dask_cosim output)
        or "foreign" (another zarr node / Parquet dataset, which ``overwrite`` replaces).

    Examples
    --------
    >>> import numpy as np, tempfile, dask_cosim as dcs
    >>> out = tempfile.mkdtemp() + "/sim.zarr"
    >>> S = dcs.cosine_similarity(np.eye(4, 3), chunks=(2, 2))
    >>> check_output(S, out)
    'absent'
    >>> _ = dcs.to_zarr(S, out)
    >>> check_output(S, out, resume=True)
    'complete'
    """
    if _is_dataframe(result):
        kind, (params, layout) = "parquet", parquet_identity(result)
    else:
        payload = zarr_payload(result)
        kind, params, layout = "zarr", payload.params, zarr_layout(payload, codec)
    opened = open_output(
        store, kind, params, layout, overwrite=overwrite, resume=resume, storage_options=storage_options
    )
    return opened.status
