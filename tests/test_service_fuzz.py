"""The HTTP API fuzzed from its own OpenAPI description (schemathesis): no 500s, ever; oversized
and slow-drip bodies are cut off on a real loopback server."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402

from extract.backbones import get_backbone  # noqa: E402
from service.app import ServiceSettings, create_app  # noqa: E402

CLASSES = [f"class{i}" for i in range(10)]
TOKEN = "fuzz-token"


class StubModel:
    """The service's real decoding and preprocessing, with a constant head (fast; the fuzz is
    about the HTTP layer; a shorter fuzz below runs over the real MobileNet predictor)."""

    class_names = CLASSES

    def __init__(self) -> None:
        self.preprocessing = get_backbone("mobilenet").preprocessing(32)

    def load_bytes(self, data: bytes) -> np.ndarray:
        return self.preprocessing.load_bytes(data)

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack(images)

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        return np.full((len(pixels), len(CLASSES)), 1.0 / len(CLASSES), np.float32)

    def describe(self) -> dict[str, Any]:
        return {"head": "stub", "kind": "stub", "cache": "none", "classes": CLASSES}


def make_app(**options: Any):
    return create_app(StubModel(), ServiceSettings(**{"max_body_bytes": 64_000, **options}))


APP = make_app(token=TOKEN)
# schemathesis serialises each generated case itself (multipart too) and sends it in-process
schema = schemathesis.openapi.from_asgi("/openapi.json", make_app(token=TOKEN))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(APP) as c:  # runs the lifespan: the batcher is started
        yield c


#: (model, status code) -> answers, for the figure at the end
ANSWERS: Counter[tuple[str, int]] = Counter()
EXAMPLES = int(os.environ.get("HEADSTART_FUZZ_EXAMPLES", "40"))


def call_both_ways(case, model: str) -> None:
    """The case without and with the token: never a 5xx."""
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        response = case.call(headers=headers)
        ANSWERS[model, response.status_code] += 1
        assert response.status_code < 500, (response.status_code, response.text,
                                            case.as_curl_command())


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_500(case) -> None:
    call_both_ways(case, "stub")


@pytest.fixture(scope="module")
def real_schema():
    """The same API over the real MobileNet predictor of the mini set (tests/service_support)."""
    from tests.service_support import predictor

    app = create_app(predictor("mlp"), ServiceSettings(max_body_bytes=64_000, token=TOKEN))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


real = schemathesis.pytest.from_fixture("real_schema")


@real.parametrize()
@settings(max_examples=max(5, EXAMPLES // 4), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_over_the_real_model_never_answers_500(case) -> None:
    call_both_ways(case, "mobilenet")


def test_fuzz_sent_real_images_too(client: TestClient) -> None:
    """Valid images of every mode, and junk, through both upload forms: 200/415/422, never 500."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rng = np.random.default_rng(0)
    bodies = [b"", b"\x00" * 10, b"GIF89a" + bytes(rng.integers(0, 255, 200, dtype=np.uint8))]
    for mode in ("RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1"):
        buffer = io.BytesIO()
        Image.new(mode, (17, 5)).save(buffer, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
        bodies.append(buffer.getvalue())
    codes = []
    for body in bodies:
        for kind in ("image/png", "application/octet-stream", "text/plain", ""):
            codes.append(client.post("/predict", content=body,
                                     headers={**auth, "content-type": kind}).status_code)
            codes.append(client.post("/predict", headers=auth,
                                     files={"file": ("x", body, kind or None)}).status_code)
    ANSWERS.update(("stub", code) for code in codes)
    assert set(codes) <= {200, 413, 415, 422}, codes
    assert codes.count(200) >= 16


# --- a real server on loopback ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    import uvicorn

    config = uvicorn.Config(make_app(body_timeout_s=1.0), host="127.0.0.1", port=0,
                            log_level="error")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    instance.should_exit = True
    thread.join(10)


def exchange(address: tuple[str, int], head: bytes, drip: list[bytes], pause: float,
             limit: float = 10.0) -> tuple[bytes, float, bool]:
    """Send `head`, then each piece of `drip` after `pause`; returns (answer, seconds, closed)."""
    began = time.monotonic()
    with socket.create_connection(address, timeout=limit) as connection:
        connection.sendall(head)
        answer = b""
        connection.settimeout(pause)
        for piece in drip:
            try:
                answer += connection.recv(65536)
            except socket.timeout:
                pass
            if answer:
                break
            try:
                connection.sendall(piece)
            except OSError:
                break
        connection.settimeout(limit)
        closed = False
        try:
            while True:
                chunk = connection.recv(65536)
                if not chunk:
                    closed = True
                    break
                answer += chunk
        except (socket.timeout, ConnectionResetError):
            closed = not answer or closed
    return answer, time.monotonic() - began, closed


def test_slow_drip_body_is_cut_off(server: tuple[str, int]) -> None:
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n")
    answer, seconds, closed = exchange(server, head, [b"x"] * 100, pause=0.2)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 1 seconds" in answer
    assert seconds < 5 and closed


def test_oversized_bodies_are_refused_declared_or_chunked(server: tuple[str, int]) -> None:
    declared = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000000\r\n\r\n")
    answer, _, _ = exchange(server, declared, [b"x" * 1000], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    piece = b"%x\r\n%s\r\n" % (16_000, b"y" * 16_000)
    chunked = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    answer, seconds, _ = exchange(server, chunked, [piece] * 20, pause=0.05)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 5


def test_requests_sent_figure() -> None:
    """Not a check: prints what the fuzz sent and how it was answered, from the counters."""
    for model in ("stub", "mobilenet"):
        codes = {code: n for (m, code), n in sorted(ANSWERS.items()) if m == model}
        errors = sum(n for code, n in codes.items() if code >= 500)
        print(f"\nservice fuzz ({model} model): {sum(codes.values())} requests, answers {codes}, "
              f"{errors} answered 5xx")
