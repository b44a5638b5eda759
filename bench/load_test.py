"""Load test of `serve` over loopback: requests/s and p50/p99 latency at several concurrencies.

    python bench/load_test.py --store /tmp/svc-load --head mlp

Bounded: at most --requests requests and --seconds seconds per concurrency level. Starts and
stops its own server on 127.0.0.1 (or uses --url of one already running on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import SHARED, closed_loop, running_server  # noqa: E402

IMAGE = SHARED / "data" / "cifar10-mini" / "test" / "cat" / "4900.jpg"


async def level(url: str, body: bytes, concurrency: int, requests: int, seconds: float
                ) -> dict[str, float]:
    """Run one concurrency level; returns throughput, latency percentiles and error count."""
    traffic = await closed_loop(url, concurrency, seconds, requests, lambda n: (body, (200,), True))
    return {"concurrency": concurrency, "requests": traffic.sent, "ok": len(traffic.latencies),
            "errors": sum(traffic.unexpected.values()), "error_kinds": traffic.unexpected,
            "rps": len(traffic.latencies) / traffic.seconds, "p50": traffic.percentile_ms(50),
            "p99": traffic.percentile_ms(99)}


async def run(url: str, levels: list[int], requests: int, seconds: float) -> list[dict]:
    body = IMAGE.read_bytes()
    async with httpx.AsyncClient(base_url=url) as client:  # warm-up
        for _ in range(5):
            (await client.post("/predict", content=body,
                               headers={"content-type": "image/jpeg"})).raise_for_status()
        health = (await client.get("/health")).json()
    results = [await level(url, body, c, requests, seconds) for c in levels]
    async with httpx.AsyncClient(base_url=url) as client:
        after = (await client.get("/health")).json()
    images = after["images"] - health["images"]
    batches = after["batches"] - health["batches"]
    print(f"server batched {images} images into {batches} backbone batches "
          f"(mean {images / max(1, batches):.1f} per batch)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/svc-load")
    parser.add_argument("--head", default="mlp")
    parser.add_argument("--url", help="An already running server on loopback.")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="Most requests per level.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Most seconds per level.")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load_test.py only targets loopback servers.")
    if args.url:
        results = asyncio.run(run(args.url, levels, args.requests, args.seconds))
    else:
        with running_server(args.store, args.head) as url:
            print(f"server {url}, head {args.head}, store {args.store}, image {IMAGE.name}")
            results = asyncio.run(run(url, levels, args.requests, args.seconds))
    print(f"{'concurrency':>11} {'requests':>8} {'ok':>5} {'errors':>6} {'req/s':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['ok']:>5} {r['errors']:>6} "
              f"{r['rps']:>7.1f} {r['p50']:>7.1f} {r['p99']:>7.1f}"
              + (f"  {r['error_kinds']}" if r["errors"] else ""))
    sys.exit(1 if any(r["errors"] for r in results) else 0)


if __name__ == "__main__":
    main()
