"""Starting `python cli.py serve` as a child process on a free loopback port, and driving it
with closed-loop clients, for bench scripts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np

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
        stop(process)


def stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


#: Request number n (from 1) -> (body, the statuses expected for it, whether to time it).
Request = Callable[[int], tuple[bytes, tuple[int, ...], bool]]


@dataclass
class Traffic:
    """What `closed_loop` sent and got back."""

    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, timed expected answers
    unexpected: dict[str, int] = field(default_factory=dict)  # status code or error -> count
    seconds: float = 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies or [0.0]) * 1000, q))


async def closed_loop(url: str, concurrency: int, seconds: float, max_requests: int,
                      request: Request) -> Traffic:
    """`concurrency` clients POSTing /predict back to back until `seconds` or `max_requests`."""
    traffic = Traffic()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        async def worker() -> None:
            while traffic.sent < max_requests and time.monotonic() < deadline:
                traffic.sent += 1
                body, expected, timed = request(traffic.sent)
                began = time.perf_counter()
                try:
                    answer = await client.post("/predict", content=body,
                                               headers={"content-type": "image/jpeg"})
                    key = "" if answer.status_code in expected else str(answer.status_code)
                except httpx.HTTPError as error:
                    key = type(error).__name__
                if key:
                    traffic.unexpected[key] = traffic.unexpected.get(key, 0) + 1
                elif timed:
                    traffic.latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        traffic.seconds = time.perf_counter() - started
    return traffic
