"""Worker preload of the embedded cluster: the worker process writes its stderr to the job's log.

The nanny starts each worker process with ``DASK_COSIM_WORKER_LOG`` set (its ``env``);
this module, given as the workers' ``preload``, points the process's file descriptor 2 at
that file, so distributed's log records (``Compute Failed`` tracebacks, heartbeat errors at
shutdown, cancelled tasks on Ctrl-C) and anything else the process prints on stderr go
to the log instead of the user's terminal. A worker the nanny restarts does the same.
"""

from __future__ import annotations

import os
import sys

ENV = "DASK_COSIM_WORKER_LOG"


def redirect_stderr(path: str) -> None:
    """Point this process's stderr (file descriptor 2) at ``path``, appending."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def dask_setup(worker) -> None:  # the preload hook distributed calls in the worker process
    path = os.environ.get(ENV)
    if path:
        redirect_stderr(path)
