"""The extraction pass's backbone calls: two batches at once where the runtime allows it
(onnx), their features in row order; one at a time in the pass's own thread otherwise (tf)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from extract.pipeline import _in_order
from extract.runtimes import concurrent_calls


def test_two_calls_run_at_once_and_come_back_in_order() -> None:
    meet = threading.Barrier(2, timeout=10)  # passed only by two calls running together

    def call(i: int):
        def run() -> int:
            if i < 4:
                meet.wait()
            time.sleep(0.02 if i % 2 == 0 else 0)  # the first of each pair finishes last
            return i
        return run

    with ThreadPoolExecutor(2) as pool:
        assert list(_in_order((call(i) for i in range(5)), pool)) == [0, 1, 2, 3, 4]


def test_without_a_pool_each_call_runs_in_the_callers_thread_one_by_one() -> None:
    threads: list[int] = []
    running = [0]

    def call(i: int):
        def run() -> int:
            running[0] += 1
            assert running[0] == 1
            threads.append(threading.get_ident())
            running[0] -= 1
            return i
        return run

    assert list(_in_order((call(i) for i in range(3)), None)) == [0, 1, 2]
    assert threads == [threading.get_ident()] * 3


def test_only_onnx_is_called_on_two_batches_at_once() -> None:
    assert concurrent_calls("onnx") and not concurrent_calls("tf")
