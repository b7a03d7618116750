"""Peak resident memory of a process tree, sampled while a benchmark runs (shared by the benchmarks)."""

from __future__ import annotations

import os
import threading
import time

import psutil


class TreePeakRSS:
    """Peak of the summed RSS of a process (default: this one) and all of its descendants.

    >>> with TreePeakRSS() as rss:
    ...     pass
    >>> rss.peak > 0
    True
    """

    def __init__(self, pid: int | None = None, interval: float = 0.01):
        self.proc = psutil.Process(os.getpid() if pid is None else pid)
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
