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
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ROOT, SHARED, running_server  # noqa: E402

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
    good, junk = IMAGE.read_bytes(), b"not an image" * 10
    latencies: list[float] = []
    unexpected: dict[str, int] = {}
    sent = 0
    began = time.monotonic()
    deadline = began + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.monotonic() < deadline:
                sent += 1
                bad = sent % 10 == 0
                start = time.perf_counter()
                try:
                    answer = await client.post("/predict", content=junk if bad else good,
                                               headers={"content-type": "image/jpeg"})
                    ok = answer.status_code in ((415, 422) if bad else (200,))
                    key = "" if ok else str(answer.status_code)
                except httpx.HTTPError as error:
                    key = type(error).__name__
                if key:
                    unexpected[key] = unexpected.get(key, 0) + 1
                elif not bad:
                    latencies.append(time.perf_counter() - start)

        async def sampler() -> None:
            while time.monotonic() < deadline and sent < max_requests:
                memory.append((time.monotonic() - began, rss_mb(pid)))
                await asyncio.sleep(min(5.0, max(0.5, seconds / 40)))

        await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    wall = time.monotonic() - began
    ms = np.asarray(latencies or [0.0]) * 1000
    return {"sent": sent, "ok": len(latencies), "unexpected": unexpected, "seconds": wall,
            "rps": sent / wall, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99))}


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
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
