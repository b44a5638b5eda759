"""Merging shards: a copy (what `merge` does) against an HDF5 virtual dataset, measured.

    python bench/merge_shards.py [--rows 50000] [--width 256] [--shards 16] [--out DIR]

Writes N synthetic shard files of the cache layout (random float16 features, ids hashed into
shards exactly as `extract --shard` does), then times: the copy merge (store.shards.write_merged)
and reading the merged file; building a virtual dataset over the same shards (one mapping per
run of consecutive rows from one shard: with hash-chosen shards that is about one per row) and
reading through it. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.cache import FeatureCache  # noqa: E402
from store.format import CacheAttributes  # noqa: E402
from store.shards import ShardSelection, ShardSpec, write_merged  # noqa: E402
from store.writer import write_cache  # noqa: E402


def make_shards(folder: Path, rows: int, width: int, count: int) -> list[FeatureCache]:
    ids = [f"class{i % 10}/{i:07d}.jpg" for i in range(rows)]
    features = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float16)
    labels = np.arange(rows, dtype=np.int32) % 10
    shards = []
    for k in range(count):
        selection = ShardSelection.select(ShardSpec(k, count), {"train": ids})
        mine = selection.rows["train"]
        path = folder / f"{'0' * 64}.{ShardSpec(k, count).suffix}.h5"
        attributes = CacheAttributes(
            fingerprint="0" * 64, inputs={"backbone": "x", "weights": "random:", "image_size": 1,
                                          "pooling": "avg"},
            preprocessing={}, dataset="bench", created="", libraries={}, kind="shard",
            shard=selection.info())
        with write_cache(path, attributes, [str(c) for c in range(10)]) as out:
            out.split("train", [features[mine]], rows=len(mine), width=width, dtype="float16",
                      labels=labels[mine], ids=[ids[i] for i in mine], source_rows=mine)
            out.skipped([], source_rows=[])
        shards.append(FeatureCache(path))
    return shards


def virtual(target: Path, shards: list[FeatureCache], width: int) -> int:
    """A virtual features dataset over the shards, in full-split order; returns mappings."""
    owners, locals_, sources = [], [], []
    for k, shard in enumerate(shards):
        with h5py.File(shard.path, "r") as handle:
            rows = handle["train/rows"][...]
        sources.append(rows)
        owners.append(np.full(len(rows), k))
        locals_.append(np.arange(len(rows)))
    order = np.argsort(np.concatenate(sources), kind="stable")
    owner, local = np.concatenate(owners)[order], np.concatenate(locals_)[order]
    vlayout = h5py.VirtualLayout(shape=(len(owner), width), dtype="float16")
    vsources = [h5py.VirtualSource(s.path, "train/features", shape=(s.split_sizes["train"], width))
                for s in shards]
    breaks = np.flatnonzero((np.diff(owner) != 0) | (np.diff(local) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(owner)]])
    for a, b in zip(starts.tolist(), ends.tolist()):
        lo = int(local[a])
        vlayout[a:b] = vsources[int(owner[a])][lo:lo + (b - a)]
    with h5py.File(target, "w") as handle:
        handle.create_virtual_dataset("features", vlayout)
    return len(starts)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def read_all(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle[name][...]


def read_batches(path: Path, name: str, batches: int = 200, size: int = 128) -> None:
    rng = np.random.default_rng(1)
    with h5py.File(path, "r") as handle:
        data = handle[name]
        for _ in range(batches):
            start = int(rng.integers(0, data.shape[0] - size))
            data[start:start + size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.out))
    try:
        shards = make_shards(folder, args.rows, args.width, args.shards)
        merged, vds = folder / "merged.h5", folder / "virtual.h5"
        copy_s, _ = timed(lambda: write_merged(merged, shards))
        vds_s, mappings = timed(lambda: virtual(vds, shards, args.width))
        for path, name in ((merged, "train/features"), (vds, "features")):  # warm the page cache
            read_all(path, name)
        copy_read, a = timed(lambda: read_all(merged, "train/features"))
        vds_read, b = timed(lambda: read_all(vds, "features"))
        assert np.array_equal(a, b)
        copy_rand, _ = timed(lambda: read_batches(merged, "train/features"))
        vds_rand, _ = timed(lambda: read_batches(vds, "features"))
        mib = lambda p: os.path.getsize(p) / 2**20  # noqa: E731
        print(f"{args.rows} rows x {args.width} float16 in {args.shards} shards "
              f"({sum(mib(s.path) for s in shards):.1f} MiB of shard files)\n")
        print("| merge as | build | file | full read | 200 random batches of 128 |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| copy (headstart's choice) | {copy_s:.2f} s | {mib(merged):.1f} MiB | "
              f"{copy_read:.3f} s | {copy_rand:.3f} s |")
        print(f"| virtual dataset ({mappings} mappings) | {vds_s:.2f} s | {mib(vds):.1f} MiB "
              f"(+ the shards) | {vds_read:.3f} s | {vds_rand:.3f} s |")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import save_json  # command, machine and commit come with the figures

        save_json(f"merge_shards-{args.shards}x{args.rows}x{args.width}.json", {
            "rows": args.rows, "width": args.width, "shards": args.shards, "mappings": mappings,
            "copy": {"build_s": copy_s, "file_MiB": mib(merged), "full_read_s": copy_read,
                     "random_batches_s": copy_rand},
            "virtual": {"build_s": vds_s, "file_MiB": mib(vds), "full_read_s": vds_read,
                        "random_batches_s": vds_rand}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
