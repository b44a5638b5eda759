"""Starting `python cli.py serve` as a child process on a free loopback port, for bench scripts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(store: str, head: str, *extra: str, timeout: float = 180.0,
                   pids: list[int] | None = None) -> Iterator[str]:
    """Serve `head` from `store` on 127.0.0.1; yields the base URL; stops the server after.

    The server's process id is appended to `pids` when given (e.g. to watch its memory)."""
    port = free_port()
    command = [sys.executable, str(ROOT / "cli.py"), "serve", "--head", head, "--store", store,
               "--host", HOST, "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://{HOST}:{port}"
    if pids is not None:
        pids.append(process.pid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health in time")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
