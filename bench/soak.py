"""Soak test of `serve` over loopback: minutes at the measured capacity, zero errors, steady memory.

    python bench/soak.py --minutes 3                      # builds a small store if needed

Starts its own server on 127.0.0.1 (bounded: --minutes and --max-requests), first measures the
capacity (requests/s with --concurrency clients, closed loop), then keeps that many clients busy
for the whole run. One request in ten sends junk (expected 415/422), so error paths are soaked
too. The server's resident memory is sampled every few seconds; the run fails on any unexpected
answer or if memory in the last fifth of the run exceeds the first fifth's by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ROOT, SHARED, Traffic, closed_loop, running_server  # noqa: E402

MINI = SHARED / "data" / "cifar10-mini"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
IMAGE = MINI / "test" / "cat" / "4900.jpg"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ensure_store(store: Path, head: str) -> None:
    if list((store / "heads").glob(f"*/{head}.json")):
        return
    kind = head if head in ("mlp", "logreg") else "logreg"
    for args in (["extract", str(MINI), "--backbone", "mobilenet", "--alpha", "0.25", "--weights",
                  str(WEIGHTS), "--image-size", "32", "--quiet"],
                 ["fit", "--head", kind, "--name", head, "--quiet"]):
        subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--store", str(store)],
                       check=True, cwd=ROOT)


async def drive(url: str, concurrency: int, seconds: float, max_requests: int, pid: int,
                memory: list[tuple[float, float]]) -> dict:
    """Closed-loop traffic (one request in ten junk, expected 415/422) while the server's memory
    is sampled into `memory` as (seconds, MB)."""
    good, junk = IMAGE.read_bytes(), b"not an image" * 10
    began = time.monotonic()
    done = asyncio.Event()

    def request(n: int) -> tuple[bytes, tuple[int, ...], bool]:
        bad = n % 10 == 0
        return (junk, (415, 422), False) if bad else (good, (200,), True)

    async def traffic() -> Traffic:
        try:
            return await closed_loop(url, concurrency, seconds, max_requests, request)
        finally:
            done.set()

    async def sampler() -> None:
        while not done.is_set():
            memory.append((time.monotonic() - began, rss_mb(pid)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), min(5.0, max(0.5, seconds / 40)))

    sent, _ = await asyncio.gather(traffic(), sampler())
    return {"sent": sent.sent, "ok": len(sent.latencies), "unexpected": sent.unexpected,
            "seconds": sent.seconds, "rps": sent.sent / sent.seconds,
            "p50": sent.percentile_ms(50), "p99": sent.percentile_ms(99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/headstart-soak"))
    parser.add_argument("--head", default="logreg")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    args = parser.parse_args()
    ensure_store(args.store, args.head)
    pids: list[int] = []
    with running_server(str(args.store), args.head, pids=pids) as url:
        pid = pids[0]
        print(f"server {url} (pid {pid}), head {args.head}, {args.concurrency} clients")
        warm: list[tuple[float, float]] = []
        capacity = asyncio.run(drive(url, args.concurrency, 15, args.max_requests, pid, warm))
        print(f"capacity: {capacity['rps']:.1f} requests/s at concurrency {args.concurrency} "
              f"(p50 {capacity['p50']:.1f} ms, p99 {capacity['p99']:.1f} ms)")
        memory: list[tuple[float, float]] = []
        soak = asyncio.run(drive(url, args.concurrency, args.minutes * 60, args.max_requests, pid,
                                 memory))
    fifth = max(1, len(memory) // 5)
    first = float(np.median([m for _, m in memory[:fifth]]))
    last = float(np.median([m for _, m in memory[-fifth:]]))
    peak = max(m for _, m in memory)
    errors = sum(soak["unexpected"].values()) + sum(capacity["unexpected"].values())
    print(f"soak: {soak['sent']} requests in {soak['seconds']:.0f} s ({soak['rps']:.1f}/s), "
          f"{soak['ok']} images classified, p50 {soak['p50']:.1f} ms, p99 {soak['p99']:.1f} ms, "
          f"unexpected answers {errors} {soak['unexpected'] or ''}")
    print(f"server memory (RSS): first fifth {first:.0f} MB, last fifth {last:.0f} MB, "
          f"peak {peak:.0f} MB, growth {last - first:+.0f} MB over {len(memory)} samples")
    failed = errors or last - first > args.max_growth_mb
    print("FAIL" if failed else "OK")
    from common import save_json  # command, machine and commit come with the figures

    save_json("soak.json", {"capacity": {k: v for k, v in capacity.items() if k != "unexpected"},
                            "soak": soak, "unexpected_answers": errors,
                            "rss_mb": {"first_fifth": first, "last_fifth": last, "peak": peak},
                            "concurrency": args.concurrency, "passed": not failed})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
