"""Screenshots of the Dask dashboard during a dask_cosim job, taken with headless Chromium.

A one-shot ``chromium --headless --screenshot URL`` captures only the navigation bar: the
dashboard's panels are Bokeh documents that arrive over a websocket after the page has
loaded. So this script drives Chromium over its DevTools protocol (a websocket; the small
client below needs nothing beyond the standard library): open each page, wait until it has
loaded and its panels have drawn, then ``Page.captureScreenshot``.

    apt-get install -y chromium           # Debian's package (or pass --chromium PATH)
    python examples/dashboard_screenshots.py --out shots/

It starts an embedded cluster (127.0.0.1 only), runs a similarity and a top-k job on
generated data, keeps the top-k in the cluster's memory (so that ``/groups`` has task
groups to draw), writes one PNG per page to ``--out`` and shuts everything down.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

PAGES = ["status", "tasks", "workers", "groups", "graph", "profile", "system"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class DevTools:
    """A minimal websocket client (RFC 6455, client side) speaking Chromium's DevTools protocol."""

    def __init__(self, ws_url: str, timeout: float = 60.0):
        m = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        if not m:
            raise ValueError(f"expected a ws:// DevTools URL, received {ws_url!r}")
        host, port, path = m[1], int(m[2]), m[3]
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the websocket handshake")
            response += chunk
        head, self._buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self._id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text frame
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)  # clients must mask their frames
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def _receive(self) -> dict:
        message = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._recv_exact(8))[0]
            payload = self._recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0x9, 0xA):  # ping / pong: nothing to do for a short session
                continue
            message += payload
            if b0 & 0x80:  # FIN: the message is complete
                return json.loads(message)

    def call(self, method: str, **params) -> dict:
        """Send one command and return its result; events received meanwhile are kept."""
        self._id += 1
        self._send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = self._receive()
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                self.events.append(self._receive())
            except TimeoutError:
                break
        raise TimeoutError(f"no {method} within {timeout} s")


def start_chromium(binary: str, profile: str, width: int, height: int) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium; return the process and the websocket URL of its first page."""
    proc = subprocess.Popen(
        [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    port = None
    while port is None:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{binary} exited with code {proc.returncode} before DevTools was up")
        m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        port = m and int(m[1])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{binary}: DevTools did not come up within 60 s")
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        if pages:
            return proc, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.1)
    raise TimeoutError("Chromium opened no page")


def screenshot(tab: DevTools, url: str, path: str, settle: float) -> None:
    tab.call("Page.navigate", url=url)
    tab.wait_event("Page.loadEventFired", timeout=60)
    time.sleep(settle)  # the Bokeh panels arrive over the page's own websocket after the load event
    data = tab.call("Page.captureScreenshot", format="png")["data"]
    with open(path, "wb") as f:
        f.write(base64.b64decode(data))


def run_jobs(root: str, n: int):
    """A similarity and a top-k job on the current cluster; the top-k stays in memory."""
    import dask
    import numpy as np

    import dask_cosim as dcs

    a = np.random.default_rng(0).standard_normal((2, n, 64)).astype("float32")
    dcs.to_zarr(dcs.cosine_similarity(a, chunks=(1, n // 4, n // 4)), os.path.join(root, "s.zarr"))
    return dask.persist(*dcs.topk(a, k=10, exclude_self=True, chunks=(1, n // 4, n // 4)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="dashboard-screenshots", help="folder for the PNG files")
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated dashboard pages")
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: chromium on PATH)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds for the panels to draw")
    parser.add_argument("--size", default="1600x1000", help="window size WIDTHxHEIGHT")
    parser.add_argument("--n", type=int, default=2048, help="rows of the generated embedding set")
    args = parser.parse_args(argv)

    binary = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        print("dashboard_screenshots: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    width, height = (int(x) for x in args.size.lower().split("x"))
    os.makedirs(args.out, exist_ok=True)

    from dask_cosim.cluster import dask_client

    with tempfile.TemporaryDirectory(prefix="dask-cosim-shots-") as tmp:
        log = os.path.join(tmp, "cluster.log")
        with dask_client(
            workers=1, threads_per_worker=2, processes=False, echo=print, log_file=log
        ) as client:
            kept = run_jobs(tmp, args.n)  # noqa: F841 - held so /groups has groups to draw
            base = client.dashboard_link.rsplit("/", 1)[0]
            proc, ws_url = start_chromium(binary, os.path.join(tmp, "profile"), width, height)
            tab = None
            try:
                tab = DevTools(ws_url)
                tab.call("Page.enable")
                for page in filter(None, args.pages.split(",")):
                    path = os.path.join(args.out, f"{page.strip('/').replace('/', '-')}.png")
                    screenshot(tab, f"{base}/{page.strip('/')}", path, args.settle)
                    print(f"{base}/{page.strip('/')} -> {path}")
            finally:
                if tab is not None:
                    tab.close()
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
