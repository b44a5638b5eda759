"""`serve` started through the command line as a child process: --token, HEADSTART_TOKEN, and
the 127.0.0.1 default (read from the kernel's table of listening sockets, not from our words)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from bench.server_process import stop
from tests.conftest import ROOT
from tests.service_support import cache_test_images, service_store

LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def start(extra: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start serve on a port the kernel picks; returns (process, base URL from its announcement)."""
    command = [sys.executable, str(ROOT / "cli.py"), "serve", "--head", "logreg", "--store",
               str(service_store()), "--port", "0", "--quiet", *extra]
    process = subprocess.Popen(command, cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None and lines.empty():
                raise AssertionError(f"serve exited with {process.returncode}: {seen}") from None
            continue
        seen.append(line)
        if line.startswith("Serving head logreg"):
            return process, line.split(" on ", 1)[1].split("/ ", 1)[0]
    process.kill()
    raise AssertionError(f"no announcement within 180 s: {seen}")


@pytest.fixture
def serving(request) -> Iterator[tuple[subprocess.Popen, str]]:
    extra, env = request.param
    process, url = start(extra, {**{k: v for k, v in os.environ.items()
                                    if k != "HEADSTART_TOKEN"}, **env})
    try:
        yield process, url
    finally:
        stop(process)


def post(url: str, token: str | None) -> int:
    data = cache_test_images(1)[0].read_bytes()
    headers = {"Content-Type": "image/jpeg"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/predict", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert json.load(answer)["predictions"], "no predictions"
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses (hex, as the kernel lists them) that `pid` listens on at `port`."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.parametrize("serving", [(["--token", "from-option"], {})], indirect=True)
def test_token_option_and_the_loopback_default(serving) -> None:
    process, url = serving
    assert url.startswith("http://127.0.0.1:"), url
    port = int(url.rsplit(":", 1)[1])
    assert listening_addresses(process.pid, port) == {LOOPBACK_HEX}
    assert post(url, None) == 401
    assert post(url, "wrong") == 401
    assert post(url, "from-option") == 200
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        assert json.load(answer)["token_required"] is True


@pytest.mark.parametrize("serving", [([], {"HEADSTART_TOKEN": "from-environment"})],
                         indirect=True)
def test_token_from_the_environment(serving) -> None:
    _, url = serving
    assert post(url, None) == 401
    assert post(url, "from-option") == 401
    assert post(url, "from-environment") == 200
