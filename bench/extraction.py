"""Benchmark 2: extraction throughput against its ceiling.

The ceiling is the same Keras model's forward pass alone, on preprocessed float32 tensors
already in memory, at the same batch size: the faster of `model.predict_on_batch` and one traced
`tf.function`. The pipeline is `extract_features` into a fresh store: decode, resize,
preprocess, forward, segment writes (`result.seconds`); the end-to-end time (dataset digest,
model build and HDF5 assembly included) is reported beside it. Ceiling and pipeline runs
alternate, and the ratio is the median of the per-pair ratios. The target is judged by `verdict`:
the median over all runs at the default batch size, with the end-to-end ratio (the same images
over the whole command's wall time) reported beside the pass-only one.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import MOBILENET, WORK, log, machine, median, save_json, subset, timer
from figures import verdict  # target 2: the median over all runs at the default batch size


def preprocessed_pool(dataset: Any, preprocessing: Any, count: int) -> np.ndarray:
    """`count` real training images, decoded and preprocessed (float32) in memory."""
    rows = range(min(count, len(dataset.splits["train"])))
    images = np.stack([dataset.load("train", r, preprocessing) for r in rows])
    return preprocessing.apply(images)


def ceiling(model: Any, pool: np.ndarray, images: int, batch: int) -> dict[str, float]:
    """Forward-only images/s over `images` images (cycling through the pool), two ways."""
    import tensorflow as tf

    batches = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    out = {}
    for name, run in (("predict_on_batch", lambda x: np.asarray(model.predict_on_batch(x))),
                      ("tf_function", lambda x: np.asarray(call(tf.constant(x))))):
        run(batches[0])  # trace / warm up
        done = 0
        start, cpu = time.perf_counter(), time.process_time()
        while done < images:
            run(batches[(done // batch) % len(batches)])
            done += batch
        out[name] = done / (time.perf_counter() - start)
        out[f"{name}_cpu_ms_per_image"] = (time.process_time() - cpu) / done * 1e3
    best = max(("predict_on_batch", "tf_function"), key=out.__getitem__)
    out["ceiling"] = out[best]
    out["cpu_ms_per_image"] = out[f"{best}_cpu_ms_per_image"]
    return out


def pipeline(folder: Any, batch: int, workers: int, store_dir: Any, settings: dict) -> dict[str, float]:
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.pipeline import extract_features
    from extract.plan import ExtractionPlan
    from store.store import Store

    shutil.rmtree(store_dir, ignore_errors=True)
    with timer() as wall:
        spec = get_backbone(settings["backbone"])
        plan = ExtractionPlan(open_dataset(str(folder)), spec, Weights.parse(settings["weights"]),
                              settings["image_size"], pooling=settings.get("pooling", "avg"),
                              alpha=settings.get("alpha"), batch_size=batch, workers=workers)
        result = extract_features(plan, Store(store_dir), progress=False)
    shutil.rmtree(store_dir, ignore_errors=True)
    return {"images": result.computed, "pass_seconds": result.seconds,
            "images_per_second": result.images_per_second, "end_to_end_seconds": wall["s"],
            "cpu_ms_per_image": getattr(result, "cpu_seconds", float("nan")) / max(1, result.computed) * 1e3}


def decomposition(folder: Any, settings: dict, sample: int = 320) -> dict[str, float]:
    """CPU milliseconds per image of each step outside the forward pass: decoding (one thread,
    as a worker does it), and resizing + preprocessing as the graph does them (batches of 64,
    traced, all threads)."""
    import tensorflow as tf

    from extract.backbones import get_backbone
    from extract.datasets import open_dataset

    dataset = open_dataset(str(folder))
    preprocessing = get_backbone(settings["backbone"]).preprocessing(settings["image_size"])
    paths = [Path(folder) / i for i in dataset.splits["train"].ids[:sample]]
    native = preprocessing.stack([preprocessing.decode_file(p) for p in paths[:64]])
    graph = tf.function(preprocessing.graph_inputs, input_signature=[
        tf.TensorSpec([None, *native.shape[1:]], tf.uint8)])
    graph(native)
    repeats = len(paths) // 64 or 1
    steps = {
        "decode_ms": (lambda: [preprocessing.decode_file(p) for p in paths], len(paths)),
        "resize_preprocess_ms": (lambda: [np.asarray(graph(native)) for _ in range(repeats)],
                                 64 * repeats),
    }
    out = {}
    for name, (step, count) in steps.items():
        times = []
        for _ in range(3):
            start = time.process_time()
            step()
            times.append(time.process_time() - start)
        out[name] = min(times) / count * 1e3
    return out


def run(images: int = 5000, batches: tuple[int, ...] = (64, 128, 256), workers: int = 4,
        repeats: int = 3, settings: dict | None = None,
        worker_counts: tuple[int, ...] | None = None, ceiling_images: int | None = None,
        pipeline_images: int | None = None) -> dict[str, Any]:
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.datasets import open_dataset

    settings = settings or MOBILENET
    folder = subset(pipeline_images or images)
    spec = get_backbone(settings["backbone"])
    preprocessing = spec.preprocessing(settings["image_size"])
    model = build_feature_model(spec, settings.get("alpha"), Weights.parse(settings["weights"]),
                                settings["image_size"], settings.get("pooling", "avg"))
    pool = preprocessed_pool(open_dataset(str(folder)), preprocessing, max(batches) * 4)
    rows = []
    for batch, workers in [(b, w) for b in batches for w in (worker_counts or (workers,))]:
        pairs = []
        for r in range(repeats):
            c = ceiling(model, pool, ceiling_images or images, batch)
            p = pipeline(folder, batch, workers, WORK / "stores" / "extraction", settings)
            pairs.append({"ceiling": c, "pipeline": p,
                          "ratio": p["images_per_second"] / c["ceiling"],
                          # the whole command: digest, model build and assembly included
                          "end_to_end_ratio": p["images"] / p["end_to_end_seconds"] / c["ceiling"],
                          "cpu_ratio": c["cpu_ms_per_image"] / p["cpu_ms_per_image"]})
            log(f"extraction b={batch} w={workers} rep {r}: pipeline {p['images_per_second']:.0f} img/s, "
                f"ceiling {c['ceiling']:.0f} img/s, ratio {pairs[-1]['ratio']:.3f}; CPU ms/img "
                f"{p['cpu_ms_per_image']:.3f} vs {c['cpu_ms_per_image']:.3f}")
        rows.append({
            "batch_size": batch, "workers": workers, "images": pipeline_images or images,
            "pipeline_images_per_second": median([x["pipeline"]["images_per_second"] for x in pairs]),
            "end_to_end_seconds": median([x["pipeline"]["end_to_end_seconds"] for x in pairs]),
            "ceiling_images_per_second": median([x["ceiling"]["ceiling"] for x in pairs]),
            "ceiling_predict_on_batch": median([x["ceiling"]["predict_on_batch"] for x in pairs]),
            "ceiling_tf_function": median([x["ceiling"]["tf_function"] for x in pairs]),
            "ratio_median": median([x["ratio"] for x in pairs]),
            "ratios": [round(x["ratio"], 3) for x in pairs],
            "end_to_end_ratio_median": median([x["end_to_end_ratio"] for x in pairs]),
            "end_to_end_ratios": [round(x["end_to_end_ratio"], 3) for x in pairs],
            "pipeline_cpu_ms_per_image": median([x["pipeline"]["cpu_ms_per_image"] for x in pairs]),
            "ceiling_cpu_ms_per_image": median([x["ceiling"]["cpu_ms_per_image"] for x in pairs]),
            "cpu_ratio_median": median([x["cpu_ratio"] for x in pairs]),
        })
    steps = decomposition(folder, settings)
    forward = median([r["ceiling_cpu_ms_per_image"] for r in rows])
    steps["forward_ms"] = forward
    steps["cpu_bound_ratio"] = forward / (forward + steps["decode_ms"]
                                          + steps["resize_preprocess_ms"])
    return {"settings": {k: v for k, v in settings.items() if k != "weights"}, "rows": rows,
            "cpu_steps": steps, "verdict": verdict(rows), "machine": machine()}



def run_elsewhere(code: Path, images: int, repeats: int) -> dict[str, Any]:
    """This benchmark (batch 64) on the headstart code in `code`, in a subprocess."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "before.json"
        subprocess.run([sys.executable, __file__, "--images", str(images), "--batch", "64",
                        "--repeats", str(repeats), "--out", str(out)], check=True,
                       env={**os.environ, "HEADSTART_CODE": str(Path(code).resolve())})
        result = json.loads(out.read_text())
    result["code"] = str(code)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="extraction.json")
    args = parser.parse_args()
    result = run(args.images, tuple(args.batch), repeats=args.repeats,
                 worker_counts=tuple(args.workers))
    for row in result["rows"]:
        print(row)
    save_json(args.out, result)
