"""The HTTP service: POST /predict, GET /health, GET /models, POST and GET /similar (when the
server has a similarity search), a web page at /, OpenAPI at /docs.

Requests carry image bytes only (multipart upload or raw body); nothing in a request can name a
file on the server. The model is loaded once; requests are batched by `DynamicBatcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from extract.images import BadImage, UnsupportedImage
from endtoend.predict import top_k
from service.batching import BatchSettings, DynamicBatcher, QueueFull
from store.errors import HeadstartError

PAGE = Path(__file__).with_name("page.html")
RAW_TYPES = ("image/", "application/octet-stream")
MAX_TOP = 20
#: Most training images one /similar answer lists.
MAX_SIMILAR = 100


class Model(Protocol):
    """What the service needs from a predictor (see endtoend.predict.Predictor)."""

    class_names: list[str]

    def load_bytes(self, data: bytes) -> np.ndarray:
        """An uploaded image as `proba` takes it (raises BadImage)."""
        ...

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """`load_bytes` images as one batch for `proba`."""
        ...

    def proba(self, pixels: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class SimilarSearch(Protocol):
    """What /similar needs (see classifiers.similar.SimilarFinder): the nearest cached training
    images of new images, and of an image already in the cache by its sample id."""

    def similar(self, pixels: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """uint8 batch of decoded images -> each one's k nearest training images."""
        ...

    def similar_to_id(self, sample_id: str, k: int) -> list[dict[str, Any]]:
        """The k nearest training images of a cached image (itself left out); an id the cache
        does not hold is a HeadstartError."""
        ...


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and access control of one server."""

    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout_s: float = 30.0  # the whole body must arrive within this (slow-drip guard)
    token: str | None = None
    batching: BatchSettings = BatchSettings()

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise HeadstartError("The token is empty; give a non-blank --token (or "
                                 "HEADSTART_TOKEN), or none to serve without one.")


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of a bearer token as sent (HTTP headers arrive as latin-1
    text, each character one byte) with the expected token's UTF-8 bytes."""
    try:
        sent = given.encode("latin-1")
    except UnicodeEncodeError:
        sent = given.encode("utf-8")
    return secrets.compare_digest(sent, expected.encode("utf-8"))


class AccessLog:
    """ASGI middleware: one line per request (method, path, status, milliseconds) to `say`."""

    def __init__(self, app: ASGIApp, say: Callable[[str], None]) -> None:
        self.app = app
        self.say = say

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = [500]

        async def noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            self.say(f"{scope['method']} {scope['path']} {status[0]} "
                     f"{1000 * (time.perf_counter() - began):.1f} ms")


class ApiError(Exception):
    """An HTTP error answered as {"detail": reason}."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (by Content-Length, or while reading),
    and bodies that do not arrive within `timeout` seconds (408: a slow drip holds no worker)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # after the body: e.g. waiting for a disconnect, no deadline
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"The request body did not arrive within {self.timeout:g} "
                               "seconds.") from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, _too_large_text(self.limit))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, counted, send)


def _too_large_text(limit: int) -> str:
    return f"The request body is larger than the limit of {limit:,} bytes."


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_text(limit)}, status_code=413,
                        headers={"Connection": "close"})


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "401": {"description": "Missing or wrong bearer token"},
        "408": {"description": "The body did not arrive in time (slow client)"},
        "413": {"description": "Body larger than the limit"},
        "415": {"description": "Not an image type or format this server decodes"},
        "422": {"description": "An image that cannot be decoded (the reason is given)"},
        "503": {"description": "The queue is full or the model is not loaded; retry later"},
    },
}


def create_app(model: Model, settings: ServiceSettings = ServiceSettings(),
               access_log: Callable[[str], None] | None = None,
               similar: SimilarSearch | None = None) -> FastAPI:
    """The FastAPI application serving `model` (already loaded) with `settings`; `access_log`
    hears one line per request; with `similar`, POST /similar (an image's nearest training
    images) and GET /similar?id= (those of a cached image) too."""
    batcher = DynamicBatcher(model.proba, settings.batching, stack=model.stack)
    info = model.describe()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="headstart", version="0.1.0", lifespan=lifespan,
                  description="Classify images with a frozen backbone and a fitted head.")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout_s)
    if access_log is not None:
        app.add_middleware(AccessLog, say=access_log)
    bearer = HTTPBearer(auto_error=False)

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials else ""
        if not token_matches(given, settings.token):
            raise ApiError(401, "A valid 'Authorization: Bearer <token>' header is required.")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if error.status == 503:
            headers = {"Retry-After": "1"}
        if error.status in (408, 413):  # the rest of the body is unread: drop the connection
            headers = {"Connection": "close"}
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: the model is loaded; queue length; batches run so far."""
        return {"status": "ok", "model": info["head"], "queued": batcher.waiting,
                "queue_limit": settings.batching.max_queue, "batches": batcher.batches,
                "images": batcher.images, "uptime_s": round(time.time() - started, 1),
                "token_required": settings.token is not None}

    @app.get("/models", dependencies=[Depends(check_token)])
    async def models() -> dict[str, Any]:
        """The loaded model: head, kind, cache, backbone, input size and class names."""
        return {"models": [info]}

    @app.post("/predict", dependencies=[Depends(check_token)], openapi_extra=PREDICT_BODY)
    async def predict(request: Request,
                      top: int = Query(3, ge=1, le=MAX_TOP, description="Classes to return")
                      ) -> dict[str, Any]:
        """Classify one image sent as a multipart upload (field 'file') or as the raw body."""
        pixels = await _pixels(model, request)
        began = time.perf_counter()
        try:
            proba = await batcher.submit(pixels)
        except QueueFull:
            raise ApiError(503, "The server is busy (request queue full); retry shortly.") from None
        return {"model": info["head"], "kind": info["kind"], "cache": info["cache"],
                "predictions": top_k(np.asarray(proba), model.class_names, top),
                "seconds": round(time.perf_counter() - began, 4)}

    if similar is not None:
        @app.post("/similar", dependencies=[Depends(check_token)], openapi_extra=PREDICT_BODY)
        async def similar_images(request: Request,
                                 k: int = Query(8, ge=1, le=MAX_SIMILAR, description="Training "
                                                "images to return")) -> dict[str, Any]:
            """The nearest cached training images of one image (as for /predict), with labels."""
            pixels = await _pixels(model, request)
            began = time.perf_counter()
            found = await run_in_threadpool(similar.similar, pixels[None], k)
            return {"cache": info["cache"], "similar": found[0],
                    "seconds": round(time.perf_counter() - began, 4)}

        @app.get("/similar", dependencies=[Depends(check_token)], responses={
            "401": {"description": "Missing or wrong bearer token"},
            "404": {"description": "The cache holds no image with this id"}})
        async def similar_to_id(
                sample_id: str = Query(..., alias="id", description="A training or test sample "
                                       "id of the cache"),
                k: int = Query(8, ge=1, le=MAX_SIMILAR, description="Training images to return")
                ) -> dict[str, Any]:
            """The nearest cached training images of an image already in the cache, from its
            stored features (a training image is left out of its own answer)."""
            began = time.perf_counter()
            try:
                found = await run_in_threadpool(similar.similar_to_id, sample_id, k)
            except HeadstartError as error:
                raise ApiError(404, str(error)) from None
            return {"cache": info["cache"], "id": sample_id, "similar": found,
                    "seconds": round(time.perf_counter() - began, 4)}

    return app


async def _pixels(model: Model, request: Request) -> np.ndarray:
    """The request's image as the model takes it (`Model.load_bytes`; 415 or 422 when it
    cannot be decoded)."""
    data = await _image_bytes(request)
    try:
        return await run_in_threadpool(model.load_bytes, data)
    except UnsupportedImage as error:
        raise ApiError(415, f"Unsupported image: {error}.") from None
    except BadImage as error:
        raise ApiError(422, f"Cannot decode the image: {error}.") from None


async def _image_bytes(request: Request) -> bytes:
    """The uploaded image's bytes from a multipart form or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "The multipart form needs the image in a file field named 'file'.")
        part_type = (upload.content_type or "").lower()
        if part_type and not part_type.startswith(RAW_TYPES):
            raise ApiError(415, f"Unsupported upload type {part_type!r}; send an image.")
        data = await upload.read()
    elif content_type.startswith(RAW_TYPES):
        data = await request.body()
    else:
        raise ApiError(415, f"Unsupported content type {content_type or 'none'!r}; send an image "
                       "as multipart/form-data (field 'file') or as an image/* body.")
    if not data:
        raise ApiError(422, "The image is empty (0 bytes).")
    return data
