"""GPU extraction benchmark (UNTESTED: written without a GPU; run by bench/gpu.sh).

For each precision (float32, mixed_float16, mixed_bfloat16), XLA off/on and batch size: the
forward-only ceiling (the compiled forward pass on preprocessed tensors already on the host,
same batch size) and the `extract_features` pass, images/s and their ratio. With more than one
GPU, also the MirroredStrategy path (`--distribute`). Writes bench/results/gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

import numpy as np

from common import MOBILENET, WORK, log, machine, save_json, subset, RESULTS
from report import _machine, _table


def measure(settings: dict, images: int, batch: int, compute: Any, workers: int) -> dict[str, Any]:
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.datasets import open_dataset
    from extract.forward import forward_function
    from extract.pipeline import extract_features
    from extract.plan import ExtractionPlan
    from store.store import Store

    folder = subset(images)
    spec = get_backbone(settings["backbone"])
    preprocessing = spec.preprocessing(settings["image_size"])
    with compute.building():
        model = build_feature_model(spec, settings.get("alpha"), Weights.parse(settings["weights"]),
                                    settings["image_size"], "avg")
    forward = forward_function(model, preprocessing, compute)
    dataset = open_dataset(str(folder))
    pool = np.stack([dataset.load("train", r, preprocessing, resized=False)
                     for r in range(min(batch, len(dataset.splits["train"])))])
    pool = np.concatenate([pool] * (-(-batch // len(pool))))[:batch]
    forward(pool)
    done, start = 0, time.perf_counter()
    while done < images:
        forward(pool)
        done += batch
    ceiling = done / (time.perf_counter() - start)
    store_dir = WORK / "stores" / "gpu"
    shutil.rmtree(store_dir, ignore_errors=True)
    plan = ExtractionPlan(dataset, spec, Weights.parse(settings["weights"]), settings["image_size"],
                          alpha=settings.get("alpha"), batch_size=batch, workers=workers,
                          compute=compute)
    result = extract_features(plan, Store(store_dir), progress=False)
    shutil.rmtree(store_dir, ignore_errors=True)
    return {"precision": compute.precision, "xla": compute.xla, "multi_gpu": compute.multi_gpu,
            "batch_size": batch, "workers": workers, "ceiling_images_per_second": ceiling,
            "pipeline_images_per_second": result.images_per_second,
            "ratio": result.images_per_second / ceiling}


def main() -> None:
    from extract.compute import ComputeOptions
    from extract.runtime import load_keras

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--backbone", default="mobilenet")
    args = parser.parse_args()
    load_keras()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    settings = MOBILENET if args.backbone == "mobilenet" else {
        "backbone": args.backbone, "weights": "none", "image_size": 224}
    rows = []
    options = [ComputeOptions(p, x) for p in ("float32", "mixed_float16", "mixed_bfloat16")
               for x in (False, True)]
    if len(gpus) > 1:
        options.append(ComputeOptions("mixed_float16", False, True))
    for compute in options:
        for batch in args.batch:
            try:
                row = measure(settings, args.images, batch, compute, args.workers)
            except Exception as error:  # report and go on: one setting must not end the run
                row = {"precision": compute.precision, "xla": compute.xla, "batch_size": batch,
                       "error": f"{type(error).__name__}: {error}"[:300]}
            rows.append(row)
            log(str(row))
    result = {"gpus": [g.name for g in gpus], "settings": {k: v for k, v in settings.items()
                                                           if k != "weights"},
              "rows": rows, "machine": machine()}
    save_json("gpu.json", result)
    table = _table(["precision", "XLA", "multi-GPU", "batch", "pipeline img/s", "ceiling img/s",
                    "ratio"],
                   [[r["precision"], r["xla"], r.get("multi_gpu", False), r["batch_size"],
                     f"{r.get('pipeline_images_per_second', 0):.0f}",
                     f"{r.get('ceiling_images_per_second', 0):.0f}",
                     f"{r['ratio']:.3f}" if "ratio" in r else r.get("error", "")] for r in rows])
    (RESULTS / "gpu.md").write_text("# GPU extraction\n\n" + _machine(result["machine"]) + "\n" + table)
    print(table)


if __name__ == "__main__":
    main()
