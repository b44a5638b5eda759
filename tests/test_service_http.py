"""The HTTP service in-process: happy path, limits (413/415/422/503), bearer token, OpenAPI."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from extract.preprocessing import Preprocessing  # noqa: E402
from service.app import ServiceSettings, create_app  # noqa: E402
from service.batching import BatchSettings  # noqa: E402
from tests.service_support import cache_test_images, predictor  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(predictor("mlp"), ServiceSettings(max_body_bytes=64_000))) as c:
        yield c


def png_bytes(size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_predict_multipart_and_raw_agree_with_predictor(client: TestClient) -> None:
    path = cache_test_images(1)[0]
    data = path.read_bytes()
    multipart = client.post("/predict?top=3", files={"file": (path.name, data, "image/jpeg")})
    raw = client.post("/predict?top=3", content=data, headers={"content-type": "image/jpeg"})
    assert multipart.status_code == 200, multipart.text
    assert raw.status_code == 200, raw.text
    body = multipart.json()
    assert body["model"] == "mlp" and len(body["predictions"]) == 3
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in raw.json()["predictions"]]
    model = predictor("mlp")
    expected = model.proba(model.preprocessing.load_file(path)[None])[0]
    assert body["predictions"][0]["label"] == model.class_names[int(expected.argmax())]
    assert body["predictions"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_health_models_page_and_openapi(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/models").json()["models"]
    assert models[0]["head"] == "mlp" and len(models[0]["classes"]) == 10
    assert "<input" in client.get("/").text
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_too_large_body_is_413(client: TestClient) -> None:
    big = b"\xff" * 70_000
    assert client.post("/predict", content=big, headers={"content-type": "image/png"}).status_code == 413
    answer = client.post("/predict", files={"file": ("x.png", big, "image/png")})
    assert answer.status_code == 413, answer.text


def test_unsupported_and_undecodable_images(client: TestClient) -> None:
    text = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    not_image = client.post("/predict", content=b"hello, not an image",
                            headers={"content-type": "image/png"})
    assert not_image.status_code == 415 and "not an image" in not_image.json()["detail"]
    truncated = client.post("/predict", content=png_bytes()[:60], headers={"content-type": "image/png"})
    assert truncated.status_code == 422 and truncated.json()["detail"]
    empty = client.post("/predict", content=b"", headers={"content-type": "image/png"})
    assert empty.status_code == 422
    wrong_field = client.post("/predict", files={"image": ("x.png", png_bytes(), "image/png")})
    assert wrong_field.status_code == 422
    assert client.post("/predict?top=0", content=png_bytes(),
                       headers={"content-type": "image/png"}).status_code == 422


def test_bearer_token() -> None:
    settings = ServiceSettings(token="s3cret")
    with TestClient(create_app(predictor("mlp"), settings)) as c:
        headers = {"content-type": "image/png"}
        assert c.post("/predict", content=png_bytes(), headers=headers).status_code == 401
        wrong = {**headers, "Authorization": "Bearer nope"}
        assert c.post("/predict", content=png_bytes(), headers=wrong).status_code == 401
        right = {**headers, "Authorization": "Bearer s3cret"}
        assert c.post("/predict", content=png_bytes(), headers=right).status_code == 200
        assert c.get("/models").status_code == 401
        assert c.get("/health").json()["token_required"] is True


class BlockingModel:
    """A model whose batches wait for a gate: lets a test fill the queue deterministically."""

    class_names = ["a", "b"]
    preprocessing = Preprocessing(image_size=8, preprocess_input="keras.applications.mobilenet.preprocess_input")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.sizes: list[int] = []

    def load_bytes(self, data: bytes) -> np.ndarray:
        return self.preprocessing.load_bytes(data)

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack(images)

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.sizes.append(len(pixels))
        self.started.set()
        self.gate.wait(10)
        return np.tile([0.25, 0.75], (len(pixels), 1))

    def describe(self) -> dict[str, Any]:
        return {"head": "blocking", "kind": "test", "cache": "none", "classes": self.class_names}


def test_full_queue_answers_503_and_recovers() -> None:
    model = BlockingModel()
    settings = ServiceSettings(batching=BatchSettings(max_batch=1, max_wait_ms=0, max_queue=2))
    with TestClient(create_app(model, settings)) as c, ThreadPoolExecutor(8) as pool:
        post = lambda: c.post("/predict", content=png_bytes(8), headers={"content-type": "image/png"})  # noqa: E731
        first = pool.submit(post)  # taken by the worker, blocks on the gate
        assert model.started.wait(10)
        deadline = time.monotonic() + 10
        queued = [pool.submit(post) for _ in range(2)]  # fill the queue
        while c.app.state.batcher.waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = post()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        model.gate.set()
        answers = [first.result(10), *[f.result(10) for f in queued]]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["predictions"][0]["label"] == "b"


def test_concurrent_requests_are_batched() -> None:
    """Hold the worker on one request, queue N more, release: they run as ceil(N / max_batch)
    batches (a server that ran one image per batch would need N)."""
    model = BlockingModel()
    queued, max_batch = 10, 4
    settings = ServiceSettings(batching=BatchSettings(max_batch=max_batch, max_wait_ms=0))
    with TestClient(create_app(model, settings)) as c, ThreadPoolExecutor(queued + 1) as pool:
        batcher = c.app.state.batcher
        post = lambda: c.post("/predict", content=png_bytes(8), headers={"content-type": "image/png"})  # noqa: E731
        first = pool.submit(post)
        assert model.started.wait(10), "the first request never reached the model"
        rest = [pool.submit(post) for _ in range(queued)]
        deadline = time.monotonic() + 10
        while batcher.waiting < queued and time.monotonic() < deadline:
            time.sleep(0.01)  # polls a counter; nothing else signals a queued request
        assert batcher.waiting == queued
        model.gate.set()
        answers = [first.result(10), *[f.result(10) for f in rest]]
    assert [a.status_code for a in answers] == [200] * (queued + 1)
    assert model.sizes == [1, 4, 4, 2]  # ceil(10 / 4) = 3 batches after the held one
    assert batcher.batches == 1 + -(-queued // max_batch) and batcher.images == queued + 1


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_token_is_refused_at_start_up(blank: str) -> None:
    from store.errors import HeadstartError

    with pytest.raises(HeadstartError, match="token is empty"):
        ServiceSettings(token=blank)


def test_a_non_ascii_token_authenticates_as_utf8_bytes() -> None:
    token = "schlüssel-密钥"
    with TestClient(create_app(predictor("mlp"), ServiceSettings(token=token))) as c:
        raw = {"content-type": "image/png",
               "Authorization": ("Bearer " + token).encode("utf-8")}  # as a client sends it
        assert c.post("/predict", content=png_bytes(), headers=raw).status_code == 200
        near = {**raw, "Authorization": "Bearer schlussel-"}
        assert c.post("/predict", content=png_bytes(), headers=near).status_code == 401


def test_one_access_line_per_request() -> None:
    lines: list[str] = []
    with TestClient(create_app(predictor("mlp"), ServiceSettings(), access_log=lines.append)) as c:
        c.get("/health")
        c.post("/predict", content=b"", headers={"content-type": "image/png"})
    assert len(lines) == 2, lines
    method, path, status, ms, unit = lines[0].split()
    assert (method, path, status, unit) == ("GET", "/health", "200", "ms") and float(ms) >= 0
    assert lines[1].startswith("POST /predict 422 ")
