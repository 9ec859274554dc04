"""Start `cthub serve` in a subprocess and stop it again: what the tests and the load benchmark share.

The server runs in its own process session (so stopping it ends BentoML's worker processes too), with its
stdout and stderr in one log file, and is ready once the CLI has printed "cthub is ready".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "cthub is ready"
QUIET = {
    "BENTOML_DO_NOT_TRACK": "True",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `cthub serve`: its base URL, process and log file."""

    base: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (the CLI and BentoML's workers), SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)


def start_server(
    model_dir: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 300.0,
) -> Server:
    """`cthub serve --model DIR` on a free port; RuntimeError with the log's tail if it does not come up."""
    port = free_port()
    full_env = dict(os.environ) | QUIET | {"PYTHONPATH": str(ROOT)} | dict(env or {})
    cmd = [sys.executable, "-m", "cthub", "serve", "--model", str(model_dir), "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603 -- this Python, arguments built here
            cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while READY_LINE not in server.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not start:\n{server.text()[-3000:]}")
        time.sleep(0.5)
    return server


@contextmanager
def running_server(
    model_dir: Path,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 300.0,
) -> Iterator[Server]:
    """`start_server` as a context manager that always stops the server."""
    server = start_server(model_dir, log, env=env, args=args, timeout=timeout)
    try:
        yield server
    finally:
        server.stop()
