"""Benchmark: training within --memory-budget on a cache at least 4x the budget.

    python bench/memory_budget.py --budget 256MB [--heads mlp,sgd] [--store /tmp/headstart-bench]

Writes a synthetic cache (float32, 10 Gaussian classes) whose training features are at least
`--factor` (4) times the budget, then fits each head twice, each in a fresh process: streamed
within the budget, and in memory. A process measures its resident memory after its imports
(the baseline), resets the kernel's peak counter, fits, and reports the peak above the
baseline. Pass: excess <= 1.25 x budget, and streamed accuracy within 1 point of in memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = 1024
CLASSES = 10
BLOCK_ROWS = 8192
TEST_ROWS = 8192 * 2


def rss_figures() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0]) * 1024
    return figures


def make_cache(store_root: Path, train_rows: int) -> str:
    """The synthetic cache (reused if it exists); returns its fingerprint."""
    import numpy as np

    from store.arrays import write_array_cache
    from store.store import Store

    means = np.random.default_rng(0).normal(0.0, 0.08, size=(CLASSES, WIDTH)).astype(np.float32)

    def split(name: str, rows: int, seed: int):
        labels = np.random.default_rng([seed, 1]).integers(0, CLASSES, rows)

        def blocks():
            rng = np.random.default_rng([seed, 2])
            for start in range(0, rows, BLOCK_ROWS):
                y = labels[start:start + BLOCK_ROWS]
                yield means[y] + rng.standard_normal((len(y), WIDTH), dtype=np.float32)

        return [f"{name}/{i:08d}" for i in range(rows)], labels, blocks()

    cache = write_array_cache(
        Store(store_root), f"synthetic-{train_rows}x{WIDTH}", [f"c{i}" for i in range(CLASSES)],
        {"train": split("train", train_rows, 1), "test": split("test", TEST_ROWS, 2)},
        BLOCK_ROWS)
    return cache.fingerprint


def child(args: argparse.Namespace) -> None:
    """Fit one head in this process and print one JSON line of figures."""
    from classifiers.training import fit_head  # noqa: F401  (imports count in the baseline)
    from extract.runtime import load_keras
    from store.store import Store

    load_keras()
    store = Store(args.store)
    cache = store.finished(args.cache)
    baseline = rss_figures()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) := current RSS
    started = time.perf_counter()
    record, _ = fit_head(store, cache, args.head, {"epochs": str(args.epochs)},
                         f"bench-{args.head}-{args.mode}",
                         memory_budget=args.budget if args.mode == "stream" else None)
    peak = rss_figures()["VmHWM"]
    print(json.dumps({"head": args.head, "mode": record["memory"]["mode"],
                      "seconds": round(time.perf_counter() - started, 1),
                      "baseline_rss": baseline, "peak_excess": peak - baseline,
                      "test_accuracy": record["metrics"]["test"]["accuracy"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="256MB")
    parser.add_argument("--heads", default="mlp,sgd")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--store", default="/tmp/headstart-bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from store.units import format_size, parse_size

    budget = parse_size(args.budget)
    train_rows = -(-int(args.factor * budget) // (WIDTH * 4 * BLOCK_ROWS)) * BLOCK_ROWS
    started = time.perf_counter()
    fingerprint = make_cache(Path(args.store), train_rows)
    feature_bytes = train_rows * WIDTH * 4
    print(f"Cache {fingerprint[:12]} in {args.store}: {train_rows} training rows x {WIDTH} float32 "
          f"= {format_size(feature_bytes)} of features, {feature_bytes / budget:.1f}x the budget of "
          f"{format_size(budget)} (ready in {time.perf_counter() - started:.0f} s).")
    ok = True
    for head in args.heads.split(","):
        runs = {}
        for mode in ("stream", "memory"):
            command = [sys.executable, __file__, "--child", "--mode", mode, "--head", head,
                       "--cache", fingerprint, "--store", args.store, "--budget", args.budget,
                       "--epochs", str(args.epochs)]
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if result.returncode:
                sys.exit(f"{head} {mode} failed:\n{result.stderr[-3000:]}")
            runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
            run = runs[mode]
            print(f"{head:>4} {run['mode']:>6}: peak RSS above baseline "
                  f"{format_size(run['peak_excess'])} ({run['peak_excess'] / budget:.2f}x budget), "
                  f"test accuracy {run['test_accuracy']:.4f}, {run['seconds']:.0f} s "
                  f"(baseline after imports {format_size(run['baseline_rss'])})")
        gap = 100 * abs(runs["stream"]["test_accuracy"] - runs["memory"]["test_accuracy"])
        ratio = runs["stream"]["peak_excess"] / budget
        passed = ratio <= 1.25 and gap <= 1.0
        ok &= passed
        print(f"{head:>4}: streamed excess {ratio:.2f}x budget (limit 1.25x), accuracy gap "
              f"{gap:.2f} points (limit 1.00): {'PASS' if passed else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
