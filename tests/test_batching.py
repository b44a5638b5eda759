"""DynamicBatcher on its own (no model, no HTTP): how it groups, answers, refuses and stops.

Every test holds the worker on a gate, so what is queued while it waits is known exactly; the
batches that follow are then decided by the batcher alone, not by thread timing.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import BatchSettings, DynamicBatcher, QueueFull


class Gated:
    """A run_batch that records each batch (its first pixel of every image) and waits on a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[int]] = []
        self.fail_next = False

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.batches.append([int(p[0, 0, 0]) for p in pixels])
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_next:
            self.fail_next = False
            raise ValueError("model broke")
        # row i answers image i: its own value, so a mixed-up answer is visible
        return np.stack([[float(p[0, 0, 0]), 1.0] for p in pixels])


def image(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


async def wait_until(predicate, what: str) -> None:
    for _ in range(2000):  # an event loop turn each; the worker runs in between
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def held_then_queued(batcher: DynamicBatcher, model: Gated, count: int):
    """Submit image 0 (taken by the worker, held on the gate), then `count` more, queued."""
    first = asyncio.ensure_future(batcher.submit(image(0)))
    await wait_until(model.started.is_set, "the first batch to start")
    rest = [asyncio.ensure_future(batcher.submit(image(v))) for v in range(1, count + 1)]
    await wait_until(lambda: batcher.waiting == count, f"{count} queued images")
    return first, rest


@pytest.mark.parametrize("max_batch, queued, expected", [
    (4, 8, [[0], [1, 2, 3, 4], [5, 6, 7, 8]]),
    (4, 6, [[0], [1, 2, 3, 4], [5, 6]]),
    (32, 9, [[0], list(range(1, 10))]),
    (1, 3, [[0], [1], [2], [3]]),
])
def test_queued_images_run_as_full_batches_in_order(max_batch: int, queued: int,
                                                    expected: list[list[int]]) -> None:
    async def scenario() -> None:
        model = Gated()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=max_batch, max_wait_ms=0))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, queued)
        model.gate.set()
        rows = await asyncio.gather(first, *rest)
        await batcher.stop()
        assert model.batches == expected
        assert [row[0] for row in rows] == list(range(queued + 1))  # each got its own row
        assert batcher.batches == len(expected) and batcher.images == queued + 1
    asyncio.run(scenario())


def test_the_worker_waits_max_wait_ms_for_more_images() -> None:
    async def scenario() -> None:
        model = Gated()
        model.gate.set()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=8, max_wait_ms=2000))
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0)  # the worker takes image 1 and starts waiting for more
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(image(2)))
        await asyncio.sleep(0.05)
        assert model.batches == []  # still gathering: 2 s not over, batch not full
        more = [asyncio.ensure_future(batcher.submit(image(v))) for v in range(3, 9)]
        await asyncio.gather(first, second, *more)  # a full batch goes at once
        assert model.batches == [list(range(1, 9))]
        await batcher.stop()
    asyncio.run(scenario())


def test_a_lone_image_goes_when_max_wait_ms_is_over() -> None:
    async def scenario() -> None:
        model = Gated()
        model.gate.set()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=8, max_wait_ms=20))
        await batcher.start()
        row = await asyncio.wait_for(batcher.submit(image(7)), 5)
        assert row[0] == 7 and model.batches == [[7]]
        await batcher.stop()
    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_and_takes_more_once_drained() -> None:
    async def scenario() -> None:
        model = Gated()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=2, max_wait_ms=0, max_queue=3))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, 3)
        with pytest.raises(QueueFull):
            await batcher.submit(image(9))
        assert batcher.waiting == 3
        model.gate.set()
        await asyncio.gather(first, *rest)
        assert (await batcher.submit(image(5)))[0] == 5
        await batcher.stop()
    asyncio.run(scenario())


def test_a_failing_batch_fails_its_requests_only_and_serving_goes_on() -> None:
    async def scenario() -> None:
        model = Gated()
        model.fail_next = True
        batcher = DynamicBatcher(model, BatchSettings(max_batch=4, max_wait_ms=0))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, 2)
        model.gate.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        assert isinstance(outcomes[0], ValueError) and "model broke" in str(outcomes[0])
        assert [o[0] for o in outcomes[1:]] == [1, 2]
        assert batcher.batches == 1 and batcher.images == 2  # only batches that answered count
        await batcher.stop()
    asyncio.run(scenario())


def test_a_cancelled_request_is_left_out_of_its_batch() -> None:
    async def scenario() -> None:
        model = Gated()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=4, max_wait_ms=0))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, 3)
        rest[1].cancel()  # the client of image 2 went away
        await asyncio.sleep(0)
        model.gate.set()
        rows = await asyncio.gather(first, rest[0], rest[2])
        assert model.batches == [[0], [1, 3]] and [r[0] for r in rows] == [0, 1, 3]
        assert batcher.images == 3
        await batcher.stop()
    asyncio.run(scenario())


def test_stop_fails_what_is_queued_and_start_serves_again() -> None:
    async def scenario() -> None:
        model = Gated()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=1, max_wait_ms=0))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, 2)
        await batcher.stop()
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and str(o) == "the server is shutting down"
                   for o in outcomes)
        assert batcher.waiting == 0
        model.gate.set()
        first.cancel()
        await batcher.start()  # a second lifespan of the same app
        model.started.clear()
        assert (await asyncio.wait_for(batcher.submit(image(4)), 5))[0] == 4
        await batcher.stop()
    asyncio.run(scenario())


def test_submit_before_start_is_an_error() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(Gated())
        assert batcher.waiting == 0
        with pytest.raises(RuntimeError, match="^the batcher is not running$"):
            await batcher.submit(image(1))
    asyncio.run(scenario())


@pytest.mark.parametrize("settings", [BatchSettings(max_batch=0), BatchSettings(max_queue=0),
                                      BatchSettings(max_wait_ms=-1)])
def test_impossible_settings_are_refused(settings: BatchSettings) -> None:
    with pytest.raises(ValueError, match=r"^max_batch and max_queue must be >= 1 and max_wait_ms >= 0\.$"):
        DynamicBatcher(Gated(), settings)


def test_the_edges_of_the_settings_are_allowed() -> None:
    DynamicBatcher(Gated(), BatchSettings(max_batch=1, max_queue=1, max_wait_ms=0))


def test_a_batch_whose_requests_all_went_away_does_not_stop_the_worker() -> None:
    async def scenario() -> None:
        model = Gated()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=4, max_wait_ms=0))
        await batcher.start()
        first, rest = await held_then_queued(batcher, model, 2)
        for request in rest:
            request.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        await first
        assert (await asyncio.wait_for(batcher.submit(image(6)), 5))[0] == 6
        assert model.batches == [[0], [6]]
        await batcher.stop()
    asyncio.run(scenario())


def test_batches_run_one_at_a_time_on_the_model_thread_and_stop_ends_the_worker() -> None:
    names, running, overlap = [], [0], [False]

    def run_batch(pixels: np.ndarray) -> np.ndarray:
        running[0] += 1
        overlap[0] |= running[0] > 1
        names.append(threading.current_thread().name)
        threading.Event().wait(0.01)
        running[0] -= 1
        return np.zeros((len(pixels), 2))

    async def scenario() -> None:
        batcher = DynamicBatcher(run_batch, BatchSettings(max_batch=2, max_wait_ms=0))
        await batcher.start()
        await asyncio.gather(*[batcher.submit(image(v)) for v in range(6)])
        workers = [t for t in asyncio.all_tasks() if t.get_name() == "headstart-batcher"]
        assert len(workers) == 1 and not workers[0].done()
        await batcher.stop()
        assert workers[0].done()  # stop ends the worker task, it does not leave it waiting
        await batcher.start()
        await batcher.submit(image(1))
        await batcher.stop()
    asyncio.run(scenario())
    assert not overlap[0] and len(set(names)) == 1
    assert names[0].startswith("headstart-model")


def test_an_image_that_comes_within_max_wait_ms_joins_the_batch() -> None:
    async def scenario() -> None:
        model = Gated()
        model.gate.set()
        batcher = DynamicBatcher(model, BatchSettings(max_batch=8, max_wait_ms=300))
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(image(1)))
        await asyncio.sleep(0.05)  # well inside the 300 ms the worker gathers for
        second = asyncio.ensure_future(batcher.submit(image(2)))
        await asyncio.gather(first, second)
        assert model.batches == [[1, 2]]
        await batcher.stop()
    asyncio.run(scenario())


def test_stop_before_start_is_harmless() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(Gated())
        await batcher.stop()
        assert batcher.waiting == 0
    asyncio.run(scenario())
