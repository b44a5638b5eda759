"""Benchmark 1: the paper's recipe against headstart, same data, backbone, image size and head.

(a) The paper's way: decode the images once into memory (uint8, resized as headstart resizes
    them), a Keras model of preprocess_input -> frozen backbone (avg pooling) -> Dense(256, relu)
    -> Dropout(0.5) -> Dense(classes, softmax), Adam 1e-3, categorical cross-entropy, batch 128,
    `model.fit` for E epochs with the test split as validation data every epoch (so the backbone
    runs over the training and test images in every epoch), then the test accuracy.
(b) headstart: `extract` once (fresh store), then `fit --head mlp` with the same head, optimiser,
    batch size and E epochs (early stopping off, so it runs all E epochs), test accuracy from
    the fitted head. headstart holds 10 % of the training rows out for validation, so it trains
    on fewer rows than (a).
Then further heads on the same cache (logreg, another mlp), each timed end to end.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from common import MOBILENET, WORK, log, machine, subset, timer


def paper_recipe(folder: Any, settings: dict, epochs: int) -> dict[str, Any]:
    """(a): frozen base inside the model, the backbone recomputed in every epoch."""
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.datasets import open_dataset
    from extract.runtime import load_keras

    keras = load_keras()
    with timer() as total:
        dataset = open_dataset(str(folder))
        spec = get_backbone(settings["backbone"])
        preprocessing = spec.preprocessing(settings["image_size"])
        arrays = {}
        with timer() as decode, ThreadPoolExecutor(4) as pool:
            for split in ("train", "test"):
                rows = range(len(dataset.splits[split]))
                arrays[split] = np.stack(list(pool.map(
                    lambda r, s=split: dataset.load(s, r, preprocessing), rows)))
        y = {s: keras.utils.to_categorical(dataset.splits[s].labels, len(dataset.class_names))
             for s in ("train", "test")}
        keras.utils.set_random_seed(0)
        base = build_feature_model(spec, settings.get("alpha"), Weights.parse(settings["weights"]),
                                   settings["image_size"], "avg")
        function = preprocessing.function()
        inputs = keras.Input(arrays["train"].shape[1:])
        x = keras.layers.Lambda(lambda t: function(t))(inputs)
        x = base(x)
        x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
        outputs = keras.layers.Dense(len(dataset.class_names), activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
        with timer() as fit:
            history = model.fit(arrays["train"], y["train"], batch_size=128, epochs=epochs,
                                validation_data=(arrays["test"], y["test"]), verbose=0)
        accuracy = float(history.history["val_accuracy"][-1])
    return {"seconds": total["s"], "decode_seconds": decode["s"], "fit_seconds": fit["s"],
            "test_accuracy": accuracy, "train_rows": len(arrays["train"]),
            "test_rows": len(arrays["test"]), "epochs": epochs}


def headstart(folder: Any, settings: dict, epochs: int, store_dir: Any) -> dict[str, Any]:
    """(b): one backbone pass into a cache, then the paper's head on the cached features."""
    from classifiers.training import fit_head
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.pipeline import ExtractionPlan, extract_features
    from store.store import Store

    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store(store_dir)
    with timer() as total:
        with timer() as extract:
            spec = get_backbone(settings["backbone"])
            plan = ExtractionPlan(open_dataset(str(folder)), spec, Weights.parse(settings["weights"]),
                                  settings["image_size"], alpha=settings.get("alpha"))
            cache = extract_features(plan, store, progress=False).cache
        with timer() as fit:
            record, _ = fit_head(store, cache, "mlp", {"epochs": str(epochs),
                                                       "early_stopping": "false"})
    further = []
    for kind, options in (("logreg", {}), ("mlp", {"epochs": str(epochs), "hidden": "512",
                                                   "early_stopping": "false"})):
        with timer() as t:
            rec, _ = fit_head(store, cache, kind, options, name=f"further-{kind}")
        further.append({"head": kind, "options": options, "seconds": t["s"],
                        "test_accuracy": rec["metrics"]["test"]["accuracy"]})
    return {"seconds": total["s"], "extract_seconds": extract["s"], "fit_seconds": fit["s"],
            "test_accuracy": record["metrics"]["test"]["accuracy"],
            "train_rows": record["rows"]["train"], "validation_rows": record["rows"]["validation"],
            "further_heads": further, "store": str(store_dir)}


def run(images: int = 10000, epochs: int = 10, settings: dict | None = None) -> dict[str, Any]:
    settings = settings or MOBILENET
    folder = subset(images)
    log(f"paper: (b) headstart on {images} images")
    b = headstart(folder, settings, epochs, WORK / "stores" / "paper")
    log(f"paper: (b) {b['seconds']:.1f} s, test {b['test_accuracy']:.4f}; (a) paper's recipe")
    a = paper_recipe(folder, settings, epochs)
    log(f"paper: (a) {a['seconds']:.1f} s, test {a['test_accuracy']:.4f}")
    speedup = a["seconds"] / b["seconds"]
    further = [{**h, "speedup_vs_a": a["seconds"] / h["seconds"]} for h in b["further_heads"]]
    return {
        "images": images, "epochs": epochs,
        "settings": {k: v for k, v in settings.items() if k != "weights"},
        "a_paper": a, "b_headstart": {**b, "further_heads": further},
        "speedup": speedup,
        "target_speedup_met": bool(speedup >= 8 and b["test_accuracy"] >= a["test_accuracy"]),
        "target_further_met": bool(all(h["speedup_vs_a"] >= 100 for h in further)),
        "machine": machine(),
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.epochs), indent=2, default=str))
