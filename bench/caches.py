"""Benchmarks 3-5 and the storage choices: head fit times, cache reads, scaling, HDF5 settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common import MOBILENET, WORK, log, median, subset, timer, CIFAR


def make_cache(folder: Path, store_dir: Path, pooling: str = "avg", settings: dict | None = None,
               fresh: bool = True) -> tuple[Any, Any, dict[str, float]]:
    """Extract a cache of `folder`; returns (store, cache, timings)."""
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.pipeline import extract_features
    from extract.plan import ExtractionPlan
    from store.store import Store

    settings = settings or MOBILENET
    if fresh:
        shutil.rmtree(store_dir, ignore_errors=True)
    with timer() as wall:
        plan = ExtractionPlan(open_dataset(str(folder)), get_backbone(settings["backbone"]),
                              Weights.parse(settings["weights"]), settings["image_size"],
                              pooling=pooling, alpha=settings.get("alpha"))
        result = extract_features(plan, Store(store_dir), progress=False)
    return Store(store_dir), result.cache, {"end_to_end_seconds": wall["s"],
                                            "pass_seconds": result.seconds,
                                            "images": result.computed,
                                            "images_per_second": result.images_per_second}


def fit_times(store: Any, cache: Any, epochs: int = 10) -> list[dict[str, Any]]:
    """logreg and the paper's mlp (E epochs, early stopping off) on one cache, timed."""
    from classifiers.training import fit_head

    rows = []
    for kind, options in (("logreg", {}), ("mlp", {"epochs": str(epochs), "early_stopping": "false"})):
        with timer() as t:
            record, _ = fit_head(store, cache, kind, options)
        rows.append({"head": kind, "width": cache.width, "train_rows": record["rows"]["train"],
                     "fit_seconds": record["fit_seconds"], "end_to_end_seconds": t["s"],
                     "test_accuracy": record["metrics"]["test"]["accuracy"]})
        log(f"fit {kind} width {cache.width} rows {record['rows']['train']}: "
            f"{record['fit_seconds']:.1f} s, test {rows[-1]['test_accuracy']:.4f}")
    return rows


def heads(full: Path, quick: bool) -> dict[str, Any]:
    """Benchmark 3: logreg and mlp at 256 (avg) and 4,096 (flatten) features."""
    out: dict[str, Any] = {"caches": {}, "fits": []}
    for pooling in ("avg", "flatten"):
        store, cache, timing = make_cache(full, WORK / "stores" / f"heads-{pooling}", pooling)
        log(f"heads: {pooling} cache {cache.split_sizes} in {timing['end_to_end_seconds']:.1f} s")
        out["caches"][pooling] = {"path": str(cache.path), "width": cache.width,
                                  "rows": cache.split_sizes, "disk_bytes": cache.disk_bytes, **timing}
        out["fits"] += fit_times(store, cache)
    return out


def scaling(sizes: tuple[int, ...]) -> dict[str, Any]:
    """Benchmark 5: extraction and fit time against the number of images; least-squares slope."""
    points = []
    for n in sizes:
        store, cache, timing = make_cache(subset(n), WORK / "stores" / "scaling")
        fits = {f["head"]: f for f in fit_times(store, cache)}
        points.append({"images": n, **timing, "logreg_fit_seconds": fits["logreg"]["fit_seconds"],
                       "mlp_fit_seconds": fits["mlp"]["fit_seconds"]})
        log(f"scaling {n}: extract {timing['end_to_end_seconds']:.1f} s")
    n = np.array([p["images"] for p in points], dtype=float)
    lines = {}
    for key in ("end_to_end_seconds", "pass_seconds", "logreg_fit_seconds", "mlp_fit_seconds"):
        slope, intercept = np.polyfit(n, [p[key] for p in points], 1)
        lines[key] = {"seconds_per_1000_images": slope * 1000, "intercept_seconds": intercept}
    return {"points": points, "fits": lines}


def read_caches(full: Path) -> dict[str, str]:
    """Avg and flatten caches of `full`, made with the current layout defaults."""
    paths = {}
    for pooling in ("avg", "flatten"):
        _, cache, _ = make_cache(full, WORK / "stores" / f"read-{pooling}", pooling)
        paths[pooling] = str(cache.path)
    return paths


def cache_reads(cache_paths: dict[str, str], repeats: int = 5) -> list[dict[str, Any]]:
    """Benchmark 4: full scan into memory against reading the file's bytes; random mini-batches."""
    from store.cache import FeatureCache

    rows = []
    rng = np.random.default_rng(0)
    for name, path in cache_paths.items():
        cache = FeatureCache(Path(path))
        size = os.path.getsize(path)
        raw, scan = [], []
        for _ in range(repeats):
            with timer() as t, open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
            raw.append(t["s"])
            with timer() as t:
                cache.features("train")
            scan.append(t["s"])
        n = cache.split_sizes["train"]
        feature_bytes = n * cache.width * np.dtype(cache.dtype).itemsize
        with h5py.File(path, "r") as handle:
            data = handle["train"]["features"]
            chunk = data.chunks[0]
            fancy, contiguous, chunks = [], [], []
            for _ in range(50):
                picked = np.sort(rng.choice(n, 128, replace=False))
                with timer() as t:
                    np.asarray(data[picked], dtype=np.float32)
                fancy.append(t["s"])
                start = int(rng.integers(0, n - 128))
                with timer() as t:
                    np.asarray(data[start:start + 128], dtype=np.float32)
                contiguous.append(t["s"])
                first = int(rng.integers(0, max(1, n // chunk))) * chunk
                with timer() as t:
                    block = np.asarray(data[first:first + chunk], dtype=np.float32)
                chunks.append(t["s"] / max(1, len(block)) * 128)
        rows.append({
            "cache": name, "width": cache.width, "dtype": cache.dtype, "rows": n,
            "file_bytes": size, "chunk_rows": chunk,
            "raw_read_seconds": median(raw), "raw_read_MBps": size / median(raw) / 1e6,
            "full_scan_seconds": median(scan), "full_scan_MBps": feature_bytes / median(scan) / 1e6,
            "scan_vs_raw": median(raw) / median(scan),
            "random_128_rows_ms": median(fancy) * 1e3,
            "contiguous_128_rows_ms": median(contiguous) * 1e3,
            "chunk_aligned_per_128_rows_ms": median(chunks) * 1e3,
        })
        log(f"cache read {name}: scan {median(scan):.2f} s vs raw {median(raw):.2f} s")
    return rows


def storage(sources: dict[str, tuple[str, int]], repeats: int = 3) -> list[dict[str, Any]]:
    """Chunk size x compression x dtype: write, full scan, random batch reads, file size.

    Real features (from the caches made above), written like the cache writes them (row chunks,
    Fletcher-32), in the warm page cache.
    """
    rng = np.random.default_rng(0)
    out = []
    folder = WORK / "storage"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (path, limit) in sources.items():
        with h5py.File(path, "r") as handle:
            values = np.asarray(handle["train"]["features"][:limit], dtype=np.float32)
        n, width = values.shape
        for dtype in ("float16", "float32"):
            data = values.astype(dtype)
            for chunk_kib in (64, 1024, 4096):
                chunk = max(1, min(n, chunk_kib * 1024 // (width * data.itemsize)))
                for compression, options in (("none", None), ("lzf", None), ("gzip", 4)):
                    target = folder / f"{name}-{dtype}-{chunk_kib}-{compression}.h5"
                    writes, scans, batches = [], [], []
                    for _ in range(repeats):
                        target.unlink(missing_ok=True)
                        with timer() as t, h5py.File(target, "w") as handle:
                            handle.create_dataset(
                                "features", data=data, chunks=(chunk, width), fletcher32=True,
                                compression=None if compression == "none" else compression,
                                compression_opts=options)
                        writes.append(t["s"])
                        with timer() as t, h5py.File(target, "r") as handle:
                            np.asarray(handle["features"][...], dtype=np.float32)
                        scans.append(t["s"])
                    with h5py.File(target, "r") as handle:
                        features = handle["features"]
                        for _ in range(30):
                            picked = np.sort(rng.choice(n, 128, replace=False))
                            with timer() as t:
                                np.asarray(features[picked], dtype=np.float32)
                            batches.append(t["s"])
                    out.append({"features": name, "rows": n, "width": width, "dtype": dtype,
                                "chunk_KiB": chunk_kib, "chunk_rows": chunk,
                                "compression": compression, "file_MB": target.stat().st_size / 1e6,
                                "write_seconds": median(writes), "scan_seconds": median(scans),
                                "random_128_rows_ms": median(batches) * 1e3})
                    target.unlink()
        log(f"storage {name}: {len(out)} settings")
    return out
