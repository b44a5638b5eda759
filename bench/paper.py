"""Benchmark 1: the paper's recipe against headstart, same data, backbone, image size and head.

(a) The paper's way: decode the images once into memory (uint8, at the input size, as headstart
    resizes them), a Keras model of preprocess_input -> frozen backbone -> Dense(256, relu)
    -> Dropout(0.5) -> Dense(classes, softmax), Adam 1e-3, categorical cross-entropy, batch 128,
    `model.fit` for E epochs with the test split as validation data every epoch (so the backbone
    runs over the training and test images in every epoch), then the test accuracy.
(b) headstart: `extract` once (fresh store), then `fit --head mlp --validation-fraction 0` with
    the same head, optimiser, batch size and E epochs on the same training rows (no rows held
    out, no early stopping), test accuracy from the fitted head.
Then further heads on the same cache (logreg; an mlp with 512 hidden units), each timed end to
end. Two settings: the paper's own (VGG16 at 32x32 px, Flatten: 512 features; random weights,
as ImageNet weights cannot be downloaded here) and MobileNet alpha 0.25 (ImageNet weights from
../shared) at 128 px, avg pooling. (a) and (b) alternate; the speed-up is the median of the
per-pair ratios. Run r seeds both with r: the same initial head weights, dropout masks and
batch order (common random numbers), so their accuracies differ only through the features
(live float32 against the cache's float16) and the paired difference is measured, not drowned
in seed noise.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from common import MOBILENET, WORK, log, machine, median, subset, timer

#: The paper's setting: VGG16 without top at 32x32 inputs, Flatten (1x1x512).
PAPER_VGG16 = {"backbone": "vgg16", "weights": "none", "image_size": 32, "pooling": "flatten"}
SETTINGS = {"vgg16-32": PAPER_VGG16, "mobilenet-128": {**MOBILENET, "pooling": "avg"}}
FURTHER = (("logreg", {}), ("mlp", {"hidden": "512"}))
#: "Equal" accuracy: at most half a point of test accuracy below, at 95 % confidence.
MARGIN = 0.005
#: The batch size of both sides: (a)'s model.fit batches and (b)'s backbone pass (extract).
PAPER_BATCH = 128


def head_order(images: np.ndarray, targets: np.ndarray, batch_size: int, seed: int) -> Any:
    """(a)'s training batches, reshuffled every epoch in the order headstart's mlp head draws
    for the same seed (after `keras.utils.set_random_seed(seed)`): with the same initial
    weights and dropout masks too, (a) and (b) differ only in where the features come from."""
    import tensorflow as tf

    from classifiers.mlp import index_batches

    images, targets = tf.constant(images), tf.constant(targets, dtype=tf.float32)
    return index_batches(len(images), batch_size, seed).map(
        lambda index: (tf.gather(images, index), tf.gather(targets, index))).prefetch(1)


def paper_recipe(folder: Any, settings: dict, epochs: int, seed: int = 0) -> dict[str, Any]:
    """(a): frozen base inside the model, the backbone recomputed in every epoch; `seed` draws
    the head's initial weights, dropout and batch order, as it does for (b)."""
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
        base = build_feature_model(spec, settings.get("alpha"), Weights.parse(settings["weights"]),
                                   settings["image_size"], settings["pooling"])
        keras.utils.set_random_seed(seed)
        function = preprocessing.function()
        inputs = keras.Input(arrays["train"].shape[1:])
        x = keras.layers.Lambda(lambda t: function(t))(inputs)
        x = base(x)
        x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
        outputs = keras.layers.Dense(len(dataset.class_names), activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
        train = head_order(arrays["train"], y["train"], PAPER_BATCH, seed)
        with timer() as fit:
            history = model.fit(train, epochs=epochs, validation_data=(arrays["test"], y["test"]),
                                validation_batch_size=PAPER_BATCH, shuffle=False, verbose=0)
        accuracy = float(history.history["val_accuracy"][-1])
    with timer() as validation:  # one more pass over the test split, as each epoch ends with
        model.evaluate(arrays["test"], y["test"], batch_size=PAPER_BATCH, verbose=0)
    return {"seconds": total["s"], "decode_seconds": decode["s"], "fit_seconds": fit["s"],
            "validation_pass_seconds": validation["s"],
            # the same run with its test figures computed once, at the end, instead of after
            # every epoch: minus E - 1 of the timed validation passes
            "seconds_validated_once": total["s"] - (epochs - 1) * validation["s"],
            "test_accuracy": accuracy, "train_rows": len(arrays["train"]),
            "test_rows": len(arrays["test"]), "epochs": epochs, "seed": seed}


def paper_head_options(epochs: int, seed: int) -> dict[str, str]:
    """`fit --head mlp` options of the paper's head: E epochs, no early stopping, seeded."""
    return {"epochs": str(epochs), "early_stopping": "false", "random_state": str(seed)}


def extract_cache(folder: Any, settings: dict, store: Any, dtype: str = "float16") -> Any:
    """The cache of `settings` over `folder` in `store` (extracted, or reused)."""
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.pipeline import extract_features
    from extract.plan import ExtractionPlan

    plan = ExtractionPlan(open_dataset(str(folder)), get_backbone(settings["backbone"]),
                          Weights.parse(settings["weights"]), settings["image_size"],
                          pooling=settings["pooling"], alpha=settings.get("alpha"), dtype=dtype,
                          batch_size=PAPER_BATCH)
    return extract_features(plan, store, progress=False).cache


def storage_effect(folder: Any, settings: dict, epochs: int, seeds: int, name: str,
                   a_runs: list[dict[str, Any]], float16_store: Any) -> dict[str, Any]:
    """What the cache's float16 storage costs the paper's head, over many seeds.

    The head fitted on a float32 cache of the same features must give (a)'s accuracy for each
    of (a)'s seeds (the same number of correct test images; `reproduces_a`): then float32-cached
    heads stand in for (a), and `seeds` paired fits (float16 - float32, each a second or two)
    measure the difference that (a) could only afford a handful of seeds for. The float16
    cache is (b)'s, reused from `float16_store`.
    """
    from classifiers.training import fit_head
    from store.store import Store

    float32_store = WORK / "stores" / f"paper-{name}-float32"
    shutil.rmtree(float32_store, ignore_errors=True)
    accuracies: dict[str, list[float]] = {}
    for dtype, store_dir in (("float32", float32_store), ("float16", float16_store)):
        store = Store(store_dir)
        cache = extract_cache(folder, settings, store, dtype)
        accuracies[dtype] = []
        for seed in range(seeds):
            record, _ = fit_head(store, cache, "mlp", paper_head_options(epochs, seed),
                                 name=f"seed-{seed}", validation_fraction=0.0)
            accuracies[dtype].append(record["metrics"]["test"]["accuracy"])
        log(f"paper {name}: {seeds} seeds on a {dtype} cache, mean test accuracy "
            f"{np.mean(accuracies[dtype]):.4f}")
    test_rows = a_runs[0]["test_rows"]
    reproduces = [round(a["test_accuracy"] * test_rows) == round(accuracies["float32"][a["seed"]]
                                                               * test_rows) for a in a_runs]
    differences = np.subtract(accuracies["float16"], accuracies["float32"]).tolist()
    return {"seeds": seeds, "accuracies": accuracies, "reproduces_a": reproduces,
            "paired": paired_difference(differences)}


def headstart(folder: Any, settings: dict, epochs: int, store_dir: Any, seed: int = 0
              ) -> dict[str, Any]:
    """(b): one backbone pass into a cache, then the paper's head (seeded by `seed`) on the
    cached features."""
    from classifiers.training import fit_head
    from store.store import Store

    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store(store_dir)
    paper_head = paper_head_options(epochs, seed)
    with timer() as total:
        with timer() as extract:
            cache = extract_cache(folder, settings, store)
        with timer() as fit:
            record, _ = fit_head(store, cache, "mlp", paper_head, validation_fraction=0.0)
    further = []
    for kind, options in FURTHER:
        if kind == "mlp":
            options = {**paper_head, **options}
        with timer() as t:
            rec, _ = fit_head(store, cache, kind, options, name=f"further-{kind}",
                              validation_fraction=0.0)
        further.append({"head": kind, "options": options, "seconds": t["s"],
                        "test_accuracy": rec["metrics"]["test"]["accuracy"]})
    return {"seconds": total["s"], "extract_seconds": extract["s"], "fit_seconds": fit["s"],
            "test_accuracy": record["metrics"]["test"]["accuracy"],
            "train_rows": record["rows"]["train"], "validation_rows": record["rows"]["validation"],
            "further_heads": further, "store": str(store_dir)}


def compare(name: str, settings: dict, images: int, epochs: int, repeats: int,
            seeds: int = 40) -> dict[str, Any]:
    """(b) and (a) alternately, `repeats` times each, on the same images; run r seeds both
    heads with r. Then `storage_effect` over `seeds` seeds (0 skips it); when its float32 heads
    reproduce (a) seed for seed, its paired float16 - float32 difference judges the accuracy,
    else the (b) - (a) differences of the `repeats` runs do."""
    folder = subset(images)
    store_dir = WORK / "stores" / f"paper-{name}"
    runs = []
    for r in range(repeats):
        log(f"paper {name} rep {r}: (b) headstart on {images} images")
        b = headstart(folder, settings, epochs, store_dir, seed=r)
        log(f"paper {name} rep {r}: (b) {b['seconds']:.1f} s, test {b['test_accuracy']:.4f}; "
            "(a) the paper's recipe")
        a = paper_recipe(folder, settings, epochs, seed=r)
        log(f"paper {name} rep {r}: (a) {a['seconds']:.1f} s, test {a['test_accuracy']:.4f}")
        runs.append({"a": a, "b": b, "speedup": a["seconds"] / b["seconds"],
                     "speedup_validated_once": a["seconds_validated_once"] / b["seconds"]})
    a_seconds = median([x["a"]["seconds"] for x in runs])
    further = []
    for i, (kind, _) in enumerate(FURTHER):
        seconds = median([x["b"]["further_heads"][i]["seconds"] for x in runs])
        further.append({**runs[-1]["b"]["further_heads"][i], "seconds": seconds,
                        "speedup_vs_a": a_seconds / seconds})
    speedup = median([x["speedup"] for x in runs])
    a_accuracy = median([x["a"]["test_accuracy"] for x in runs])
    b_accuracy = median([x["b"]["test_accuracy"] for x in runs])
    paired = paired_difference([x["b"]["test_accuracy"] - x["a"]["test_accuracy"] for x in runs])
    storage = (storage_effect(folder, settings, epochs, max(seeds, repeats), name,
                              [x["a"] for x in runs], store_dir) if seeds else None)
    judged = storage["paired"] if storage and all(storage["reproduces_a"]) else paired
    return {
        "images": images, "epochs": epochs, "repeats": repeats,
        "settings": {k: v for k, v in settings.items() if k != "weights"},
        "weights": "ImageNet (../shared)" if settings["weights"] != "none" else "random (none)",
        "a_paper": {**runs[-1]["a"], "seconds": a_seconds, "test_accuracy": a_accuracy},
        "b_headstart": {**runs[-1]["b"], "seconds": median([x["b"]["seconds"] for x in runs]),
                        "test_accuracy": b_accuracy, "further_heads": further},
        "speedups": [round(x["speedup"], 2) for x in runs],
        "accuracies": [[x["a"]["test_accuracy"], x["b"]["test_accuracy"]] for x in runs],
        "speedup": speedup,
        "speedup_validated_once": median([x["speedup_validated_once"] for x in runs]),
        "batch_size": PAPER_BATCH,
        "paired_accuracy": paired,
        "storage_effect": storage,
        "target_speedup_met": bool(speedup >= 8 and judged["equal_or_better"] is True),
        "target_further_met": bool(all(h["speedup_vs_a"] >= 100 for h in further)),
        "machine": machine(),
    }


def paired_difference(differences: list[float]) -> dict[str, Any]:
    """Mean per-seed accuracy difference (headstart - reference) and its 95 % t interval.

    Equal or better when the interval's lower end is above -MARGIN (non-inferiority by at most
    half a point, at 95 % confidence); with fewer than 3 seeds it is not tested (None).
    """
    from scipy import stats

    values = np.asarray(differences, dtype=float)
    mean, runs = float(values.mean()), len(values)
    result: dict[str, Any] = {"mean": mean, "runs": runs, "margin": MARGIN,
                              "standard_error": None, "lower": None, "upper": None,
                              "equal_or_better": None}
    if runs >= 3:
        error = float(values.std(ddof=1) / np.sqrt(runs))
        half = float(stats.t.ppf(0.975, runs - 1)) * error
        result.update(standard_error=error, lower=mean - half, upper=mean + half,
                      equal_or_better=bool(mean - half >= -MARGIN))
    return result


def run(images: int = 10000, epochs: int = 10, repeats: int = 2,
        names: tuple[str, ...] = tuple(SETTINGS), seeds: int = 40) -> dict[str, Any]:
    return {name: compare(name, SETTINGS[name], images, epochs, repeats, seeds) for name in names}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=tuple(SETTINGS))
    parser.add_argument("--seeds", type=int, default=40,
                        help="seeds of the float16 - float32 cache comparison (0: skip it)")
    args = parser.parse_args()
    print(json.dumps(run(args.images, args.epochs, args.repeats, tuple(args.settings), args.seeds),
                     indent=2, default=str))
