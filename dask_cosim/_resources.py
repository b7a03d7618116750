"""Route GPU tasks to GPU workers: Dask worker resources ``{"GPU": 1}`` that reach the scheduler.

``device="gpu"`` graphs mark their normalise, product and selection tasks in two ways:

1. the layers carry ``dask.annotate(resources={"GPU": 1})`` annotations, the standard
   Dask way. They survive blockwise fusion, but dask's default low-level optimisation
   (``optimization.fuse.active``) flattens the graph into a plain dict and drops every
   layer annotation before the graph reaches the scheduler (dask/dask#7036, #9541,
   #10325), so on their own they are not enough;
2. the task functions are wrapped in :class:`GPUTask`, a transparent marker that is part
   of the task itself and therefore survives every optimisation (fusion only nests the
   task inside another). The :class:`GPURouting` scheduler plugin finds the marker in
   each new task's run-spec and sets ``resource_restrictions = {"GPU": 1}`` on that
   task before it is scheduled.

:func:`ensure_gpu_routing` installs the plugin on a ``distributed`` client (done
automatically for the default client when a ``device="gpu"`` graph is built).

No GPU worker: a marked task that waits in the scheduler's ``no-worker`` state for
``cosine.gpu-worker-timeout`` (default 60 s) while *no* connected worker declares a
``GPU`` resource is failed with :class:`NoGPUWorkerError`; ``compute()`` raises it
instead of waiting forever. Workers that join within the timeout pick the tasks up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import dask

from ._compat import DataNode as _DataNode  # None on older dask: tasks are tuples, walked as containers

__all__ = [
    "GPU_RESOURCES",
    "GPUTask",
    "GPURouting",  # noqa: F822 - made on first use (module __getattr__)
    "NoGPUWorkerError",
    "annotate_for",
    "ensure_gpu_routing",
    "needs_gpu",
    "routed",
]

logger = logging.getLogger("dask_cosim")

#: The worker resources a ``device="gpu"`` task asks for.
GPU_RESOURCES: dict[str, float] = {"GPU": 1}
PLUGIN_NAME = "dask-cosim-gpu-routing"
DEFAULT_TIMEOUT = "60s"


class NoGPUWorkerError(RuntimeError):
    """``device="gpu"`` tasks cannot run: no worker of the cluster declares GPU resources."""


class GPUTask:
    """A task function that must run on a worker with ``GPU`` resources (transparent wrapper).

    Calls, signature (``inspect.signature`` follows ``__wrapped__``, so dask still sees
    ``block_info``) and token are those of ``func``. ``timeout`` is how long the task may
    wait for a GPU worker to exist (``cosine.gpu-worker-timeout`` when it was built).

    Examples
    --------
    >>> GPUTask(max, timeout=60.0)(2, 3)
    3
    """

    def __init__(self, func: Callable, timeout: float | None = None):
        self.func = func
        self.timeout = gpu_worker_timeout() if timeout is None else float(timeout)
        functools.update_wrapper(self, func)

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs)

    def __reduce__(self):
        return (GPUTask, (self.func, self.timeout))

    def __dask_tokenize__(self):
        from dask.base import tokenize

        return ("dask-cosim-gpu-task", tokenize(self.func))

    def __repr__(self) -> str:
        return f"GPUTask({getattr(self.func, '__name__', self.func)!r})"


def routed(func: Callable, device: str) -> Callable:
    """``func`` marked for GPU workers when ``device == "gpu"``, unchanged otherwise."""
    if device != "gpu" or isinstance(func, GPUTask):
        return func
    return GPUTask(func)


@contextlib.contextmanager
def annotate_for(device: str) -> Iterator[None]:
    """``dask.annotate(resources={"GPU": 1})`` around graph construction when ``device == "gpu"``.

    Also installs the :class:`GPURouting` plugin on the default ``distributed`` client,
    if there is one (see :func:`ensure_gpu_routing`).
    """
    if device != "gpu":
        yield
        return
    _ensure_on_default_client()
    with dask.annotate(resources=dict(GPU_RESOURCES)):
        yield


# --------------------------------------------------------------------------- finding marked tasks

_MAX_DEPTH = 64
_MAX_CONTAINER = 256  # data containers longer than this are not searched


def needs_gpu(node: Any) -> bool:
    """Whether a task (run-spec, possibly fused or nested) calls a :class:`GPUTask`."""
    return find_gpu_task(node) is not None


def find_gpu_task(node: Any, _depth: int = 0) -> GPUTask | None:
    """The first :class:`GPUTask` inside a task's run-spec, or ``None``.

    Walks dask task-spec nodes (``Task`` function, args and kwargs; a fused task's
    subgraph is a dict among its args), ``functools.partial`` objects and plain
    containers, and the values of ``DataNode`` (blockwise passes its function that way)
    up to small containers; array data is never walked.
    """
    if isinstance(node, GPUTask):
        return node
    if _depth > _MAX_DEPTH:
        return None
    d = _depth + 1
    if isinstance(node, dict):
        children = node.values()
    elif isinstance(node, (list, tuple, set, frozenset)):
        children = node
    elif isinstance(node, functools.partial):
        children = (node.func, node.args, node.keywords)
    elif getattr(node, "func", None) is not None and hasattr(node, "args"):  # dask Task
        children = (node.func, node.args, getattr(node, "kwargs", None) or {})
    elif _DataNode is not None and isinstance(node, _DataNode):  # blockwise passes its function as data
        value = node.value
        if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > _MAX_CONTAINER:
            return None
        children = (value,)
    else:
        return None
    for child in children:
        found = find_gpu_task(child, d)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- scheduler plugin


class _GPURouting:
    """Scheduler plugin: ``{"GPU": 1}`` restrictions for :class:`GPUTask` tasks; fail when unroutable.

    A marked task that waits in ``no-worker`` for longer than its :class:`GPUTask`'s
    ``timeout`` while no worker declares a ``GPU`` resource is failed with
    :class:`NoGPUWorkerError`. Checked every ``interval`` seconds.

    The class is ``GPURouting``, a ``distributed`` ``SchedulerPlugin`` made on first use
    (:func:`plugin_class`) so that importing this module does not import ``distributed``.

    Examples
    --------
    >>> client.register_plugin(GPURouting())  # doctest: +SKIP
    """

    name = PLUGIN_NAME
    idempotent = True  # one per scheduler; the timeouts travel with the tasks

    def __init__(self, interval: float = 0.25):
        self.interval = float(interval)
        self._routed: dict = {}  # key -> timeout (s)
        self._waiting_since: dict = {}
        self._callback = None
        self.scheduler = None

    # -- lifecycle
    async def start(self, scheduler) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        self._callback = PeriodicCallback(self._check_unroutable, self.interval * 1000)
        self._callback.start()

    async def close(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None

    def __getstate__(self):
        return {"interval": self.interval}

    def __setstate__(self, state):
        self.__init__(state["interval"])

    # -- marking
    def update_graph(self, scheduler, *, tasks=None, **kwargs) -> None:
        for key in tasks or ():
            ts = scheduler.tasks.get(key)
            marker = None if ts is None or ts.run_spec is None else find_gpu_task(ts.run_spec)
            if marker is None:
                continue
            restrictions = dict(ts.resource_restrictions or {})
            for name, amount in GPU_RESOURCES.items():
                restrictions[name] = max(amount, restrictions.get(name, 0))
            ts.resource_restrictions = restrictions
            ts.annotations = {**(ts.annotations or {}), "resources": restrictions}
            self._routed[key] = marker.timeout

    # -- detecting "no GPU worker"
    @staticmethod
    def gpu_workers(scheduler) -> list[str]:
        return [
            addr
            for addr, ws in scheduler.workers.items()
            if (ws.resources or {}).get("GPU", 0) >= GPU_RESOURCES["GPU"]
        ]

    def _check_unroutable(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        if scheduler.plugins.get(self.name) is not self:  # removed or replaced
            self._callback.stop()
            return
        if not self._routed:
            return
        now = time.monotonic()
        expired = []
        for key, timeout in list(self._routed.items()):
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state in ("memory", "erred", "forgotten"):
                self._routed.pop(key, None)
                self._waiting_since.pop(key, None)
            elif ts.state == "no-worker":
                since = self._waiting_since.setdefault(key, now)
                if now - since >= timeout:
                    expired.append(ts)
            else:
                self._waiting_since.pop(key, None)
        if not expired or self.gpu_workers(scheduler):
            return
        self._fail(scheduler, expired)

    def _fail(self, scheduler, expired) -> None:
        from ._compat import fail_tasks

        n_workers = len(scheduler.workers)
        stimulus_id = f"dask-cosim-no-gpu-worker-{time.time()}"
        err = None
        for ts in expired:
            if ts.state != "no-worker":
                continue
            err = NoGPUWorkerError(
                f"dask_cosim: task {ts.key!r} needs a worker with resources {GPU_RESOURCES} "
                f"(device='gpu'), but none of the cluster's {n_workers} worker(s) declares a GPU "
                f"resource; waited {self._routed.get(ts.key, 0):g}s (dask config "
                "cosine.gpu-worker-timeout). Start "
                "GPU workers with `dask worker <scheduler> --resources GPU=1` (one per GPU), or use "
                "device='auto' (CuPy where a worker has a GPU, NumPy elsewhere) or device='cpu'."
            )
            fail_tasks(scheduler, [ts.key], err, stimulus_id)
            self._routed.pop(ts.key, None)
            self._waiting_since.pop(ts.key, None)
        logger.error("%d task(s) failed: %s", len(expired), err)


@functools.cache
def plugin_class() -> type:
    """``GPURouting``: :class:`_GPURouting` as a ``distributed`` ``SchedulerPlugin``
    (``Client.register_plugin`` dispatches on that base class)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    namespace = {"__module__": __name__, "__qualname__": "GPURouting", "__doc__": _GPURouting.__doc__}
    return type("GPURouting", (_GPURouting, SchedulerPlugin), namespace)


def __getattr__(name: str):
    if name == "GPURouting":  # pickled plugins are found by this name
        return plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- installing the plugin

_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_install_lock = threading.Lock()


def gpu_worker_timeout() -> float:
    """``cosine.gpu-worker-timeout`` in seconds (default 60 s)."""
    from dask.utils import parse_timedelta

    value = dask.config.get("cosine.gpu-worker-timeout", DEFAULT_TIMEOUT)
    try:
        seconds = parse_timedelta(value, default="s")
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"dask config cosine.gpu-worker-timeout: expected a duration like '60s', received {value!r}"
        ) from err
    if seconds is None or seconds < 0:
        raise ValueError(f"dask config cosine.gpu-worker-timeout: expected >= 0 seconds, received {value!r}")
    return float(seconds)


def ensure_gpu_routing(client=None) -> bool:
    """Install :class:`GPURouting` on ``client``'s scheduler (the default client if ``None``).

    Done automatically for the default client whenever a ``device="gpu"`` graph is
    built; call it yourself when the graph was built before the client existed or is
    computed on another client. Idempotent. Returns ``True`` when installed, ``False``
    when there is no client. An asynchronous client needs
    ``await client.register_plugin(dask_cosim.GPURouting())`` instead.

    Examples
    --------
    >>> from distributed import Client  # doctest: +SKIP
    >>> client = Client(scheduler_address)  # doctest: +SKIP
    >>> dcs.ensure_gpu_routing(client)  # doctest: +SKIP
    True
    """
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            return False
    marker = (getattr(client, "id", None), _scheduler_address(client))
    with _install_lock:
        if _installed.get(client) == marker:
            return True
        if getattr(client, "asynchronous", False):
            raise RuntimeError(
                "dask_cosim: cannot install the GPU routing plugin from an asynchronous client; "
                "run `await client.register_plugin(dask_cosim.GPURouting())` first"
            )
        client.register_plugin(plugin_class()(), name=PLUGIN_NAME)
        _installed[client] = marker
    return True


def _scheduler_address(client) -> str | None:
    from ._compat import scheduler_address

    return scheduler_address(client)


def _ensure_on_default_client() -> None:
    """Best effort: building a graph must not fail because the default client is unusable."""
    try:
        ensure_gpu_routing()
    except Exception as err:  # noqa: BLE001 - async or closed client: say so, keep building
        logger.warning("dask_cosim: GPU routing plugin not installed on the default client: %s", err)
