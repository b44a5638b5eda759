"""Dynamic batching: concurrent requests share one backbone pass.

Requests put their decoded image on a bounded queue and await a future. One worker takes the
first waiting image, gathers more for at most `max_wait_ms` (or until `max_batch`), runs the
whole batch in a single background thread, and answers every future. A full queue raises
`QueueFull` at once, so an overloaded server says 503 instead of piling up work.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """The batcher's queue is at its limit; the caller should answer 503."""


@dataclass(frozen=True)
class BatchSettings:
    """How requests are batched."""

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256


class DynamicBatcher:
    """Batches single images for `run_batch` (uint8 N×H×W×3 → N×C probabilities); `stack`
    makes the batch of the queued images (np.stack: all of one size)."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray],
                 settings: BatchSettings = BatchSettings(),
                 stack: Callable[[list[np.ndarray]], np.ndarray] = np.stack) -> None:
        if settings.max_batch < 1 or settings.max_queue < 1 or settings.max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0.")
        self.run_batch = run_batch
        self.stack = stack
        self.settings = settings
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headstart-model")
        self.batches = 0
        self.images = 0

    async def start(self) -> None:
        """Start the worker on the running event loop (again after `stop`, if need be)."""
        if self._pool._shutdown:  # a second lifespan of the same app (e.g. a new test client)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headstart-model")
        self._queue = asyncio.Queue(maxsize=self.settings.max_queue)
        self._worker = asyncio.create_task(self._work(), name="headstart-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued get an error."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, images: list[np.ndarray]) -> np.ndarray:
        """One batch through the model (in the model thread): stacked, then `run_batch`."""
        return self.run_batch(self.stack(images))

    @property
    def waiting(self) -> int:
        """Images queued and not yet taken into a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """Queue one uint8 image and wait for its probability row (raises QueueFull)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((pixels, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
            while len(batch) < self.settings.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(self._queue.get_nowait() if remaining <= 0 else
                                 await asyncio.wait_for(self._queue.get(), remaining))
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            live = [(pixels, future) for pixels, future in batch if not future.cancelled()]
            if not live:
                continue
            try:
                proba = await loop.run_in_executor(
                    self._pool, self._run, [pixels for pixels, _ in live])
            except Exception as error:  # answer every waiting request, keep serving
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            self.images += len(live)
            for (_, future), row in zip(live, proba):
                if not future.done():
                    future.set_result(row)
