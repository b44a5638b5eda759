"""Export: one Keras model doing resize + preprocess + backbone + head, and TFLite variants.

The model takes RGB pixels (float32, 0..255). Its .keras and SavedModel forms accept any image
size and resize inside (bilinear with antialiasing, like Pillow's); TFLite models take the
cache's image size, already resized (e.g. by `Preprocessing.load_file`). The head becomes Keras
layers as `endtoend.keras_heads` says (heads and ensembles of one cache; others are refused).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from classifiers.saved import load_saved_head
from endtoend.keras_heads import (load_exported, mirror_layer, preprocess_layer, saved_keras_head,
                                  single_cache)
from endtoend.predict import Predictor
from extract.rebuild import cache_dataset
from extract.runtime import load_keras, load_tensorflow, quiet_stderr
from store.errors import HeadstartError
from store.store import Store

FORMATS = ("keras", "savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
REPRESENTATIVE_IMAGES = 100
KERAS_INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                       "lanczos": "lanczos3"}


# --- the end-to-end model ---------------------------------------------------------------------


def end_to_end_model(predictor: Predictor, fixed_size: bool = False) -> Any:
    """pixels (0..255 RGB) → resize → preprocess_input → backbone → head → probabilities."""
    keras = load_keras()
    pre = predictor.preprocessing
    size = pre.image_size
    head = saved_keras_head(predictor.head, predictor.cache.features("train", slice(0, 64)))
    inputs = keras.Input((size, size, 3) if fixed_size else (None, None, 3), name="pixels")
    x = inputs
    if pre.converter is not None:  # a KerasHub preset: its own converter layer (serialisable)
        from extract.kerashub import converter_layer

        x = converter_layer(pre, resize=not fixed_size)(x)
    elif not fixed_size:
        x = keras.layers.Resizing(size, size, interpolation=KERAS_INTERPOLATION[pre.interpolation],
                                  antialias=True, name="resize")(x)

    def features(images: Any) -> Any:  # a KerasHub converter has already preprocessed x
        if pre.converter is None:
            images = preprocess_layer(pre.preprocess_input)(images)
        return predictor.backbone(images)

    outputs = head(features(x), training=False)  # dropout off in every exported form
    if predictor.views:  # the head's answer averages the image and its mirror
        if predictor.head.members:
            raise HeadstartError(
                f"Ensemble {predictor.head_name!r} has members fitted with test-time views; "
                "exporting it is not supported yet (export its members, or fit them with "
                "--no-tta).")
        mirrored = head(features(mirror_layer()(x)), training=False)
        outputs = keras.layers.Average(name="views")([outputs, mirrored])
    return keras.Model(inputs, outputs, name=f"headstart_{predictor.head_name}")


# --- TFLite -----------------------------------------------------------------------------------


def tflite_bytes(model: Any, quantize: str, representative: Callable[[], Iterable[list]]) -> bytes:
    """Convert a fixed-size Keras model to TFLite with one quantization (float in and out);
    the converter's C++ log lines are kept from the user."""
    tf = load_tensorflow()
    with tempfile.TemporaryDirectory(prefix="headstart-export-") as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        try:
            with quiet_stderr(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the converter's own deprecation notices
                return converter.convert()
        except Exception as error:  # the converter raises many types, with long messages
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HeadstartError(f"TFLite conversion ({quantize}) failed: {first}") from None


class TFLiteRunner:
    """Runs a .tflite model with LiteRT (ai-edge-litert) on uint8 pixel batches, one image per
    invoke."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with quiet_stderr():  # XNNPACK's "Created TensorFlow Lite delegate" line
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def proba(self, pixels: np.ndarray) -> np.ndarray:
        rows = []
        for image in pixels:
            self.interpreter.set_tensor(self.input["index"], image[None].astype(np.float32))
            self.interpreter.invoke()
            rows.append(np.asarray(self.interpreter.get_tensor(self.output["index"])[0],
                                   dtype=np.float64))
        return np.stack(rows)


# --- the export command -----------------------------------------------------------------------


@dataclass
class Variant:
    """One exported file and how it does on the test split."""

    name: str
    path: str
    bytes: int
    accuracy: float | None = None
    agreement: float | None = None  # share of test images with the unquantized model's answer
    max_abs_diff: float | None = None  # largest probability difference to the unquantized model
    seconds_per_image: float | None = None


def split_pixels(predictor: Predictor, split: str, limit: int | None = None,
                 spread: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels and labels of a split's cached rows, read from the original images.

    `spread` picks `limit` rows evenly over the split (a representative sample); otherwise the
    first `limit` rows.
    """
    cache = predictor.cache
    dataset = cache_dataset(cache, check_contents=False)
    ids = cache.ids(split)
    labels = cache.labels(split)
    rows = np.arange(len(ids))
    if limit is not None and limit < len(ids):
        rows = np.linspace(0, len(ids) - 1, limit).astype(int) if spread else rows[:limit]
    position = {sample: i for i, sample in enumerate(dataset.splits[split].ids)}
    pixels = [dataset.load(split, position[ids[r]], predictor.preprocessing) for r in rows]
    return np.stack(pixels), labels[rows]


def export_head(store: Store, cache_selector: str | None, head: str, formats: list[str],
                quantizations: list[str], out_dir: Path | None = None,
                weights: str | None = None, evaluate: bool = True,
                test_limit: int | None = None, say: Callable[[str], None] = lambda line: None
                ) -> tuple[list[Variant], Path]:
    """Write the requested formats; returns the variants (with test figures) and the folder.
    `say` hears each step as it starts (conversions take tens of seconds)."""
    unknown = [f for f in formats if f not in FORMATS] + [q for q in quantizations
                                                          if q not in QUANTIZATIONS]
    if unknown:
        raise HeadstartError(f"Unknown export option {unknown[0]!r}; formats: {', '.join(FORMATS)}; "
                             f"quantizations: {', '.join(QUANTIZATIONS)}.")
    cache = store.find_cache(cache_selector)
    saved = load_saved_head(store, cache, head)
    single_cache(saved)  # refuse before any backbone is built
    predictor = Predictor(saved, weights, store_root=store.root)
    folder = Path(out_dir) if out_dir else store.root / "exports" / cache.fingerprint[:16] / head
    folder.mkdir(parents=True, exist_ok=True)
    model = end_to_end_model(predictor)
    variants: list[Variant] = []
    started = time.perf_counter()

    def step(text: str) -> None:
        say(f"[{time.perf_counter() - started:5.1f} s] {text}")

    if "keras" in formats:
        step("writing the .keras model")
        path = folder / f"{head}.keras"
        model.save(path)
        variants.append(Variant("keras", str(path), path.stat().st_size))
    if "savedmodel" in formats:
        step("writing the SavedModel")
        path = folder / f"{head}_savedmodel"
        model.export(path, format="tf_saved_model", verbose=False)
        variants.append(Variant("savedmodel", str(path), _tree_bytes(path)))
    if "tflite" in formats or "onnx" in formats:
        fixed = end_to_end_model(predictor, fixed_size=True)
        sample, _ = split_pixels(predictor, "train", REPRESENTATIVE_IMAGES, spread=True)
    if "onnx" in formats:  # float32 and static int8 calibrated on cache images (onnxruntime)
        from extract.onnx_runtime import export_variants

        step("converting to ONNX (float32" + (", int8)" if "int8" in quantizations else ")"))
        for name, path in export_variants(fixed, predictor.preprocessing.image_size, sample,
                                          folder, head, "int8" in quantizations):
            variants.append(Variant(name, str(path), path.stat().st_size))
    if "tflite" in formats:
        def representative() -> Iterable[list]:
            for image in sample:
                yield [image[None].astype(np.float32)]

        for quantize in quantizations:
            step(f"converting to TFLite ({'float32' if quantize == 'none' else quantize})")
            path = folder / f"{head}_{'float32' if quantize == 'none' else quantize}.tflite"
            path.write_bytes(tflite_bytes(fixed, quantize, representative))
            variants.append(Variant(f"tflite-{quantize if quantize != 'none' else 'float32'}",
                                    str(path), path.stat().st_size))
    if evaluate:
        step(f"scoring {len(variants)} variant(s) on the test split")
        _evaluate(predictor, model, variants, test_limit)
    (folder / "export.json").write_text(json.dumps(
        {"head": head, "cache": cache.name, "fingerprint": cache.fingerprint,
         "input": {"pixels": "float32 RGB 0..255", "image_size": predictor.preprocessing.image_size,
                   "keras_and_savedmodel": "any size, resized inside",
                   "tflite": "exactly image_size, resized beforehand",
                   "onnx": "exactly image_size, resized beforehand"},
         "classes": predictor.class_names, "variants": [asdict(v) for v in variants]}, indent=2))
    return variants, folder


def _evaluate(predictor: Predictor, model: Any, variants: list[Variant],
              limit: int | None) -> None:
    """Test accuracy, agreement and probability difference against the in-memory Keras model."""
    pixels, labels = split_pixels(predictor, "test", limit)
    reference = np.asarray(model.predict(pixels.astype(np.float32), batch_size=64, verbose=0))
    for variant in variants:
        started = time.perf_counter()
        if variant.name == "keras":
            proba = np.asarray(load_exported(Path(variant.path)).predict(
                pixels.astype(np.float32), batch_size=64, verbose=0))
        elif variant.name == "savedmodel":
            proba = _savedmodel_proba(Path(variant.path), pixels)
        elif variant.name.startswith("onnx"):
            from extract.onnx_runtime import run_batches

            proba = run_batches(Path(variant.path), pixels)
        else:
            proba = TFLiteRunner(Path(variant.path)).proba(pixels)
        variant.seconds_per_image = round((time.perf_counter() - started) / len(pixels), 5)
        variant.accuracy = float((proba.argmax(1) == labels).mean())
        variant.agreement = float((proba.argmax(1) == reference.argmax(1)).mean())
        variant.max_abs_diff = float(np.abs(proba - reference).max())


def _savedmodel_proba(path: Path, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # keep a reference: it owns the variables
    return np.concatenate([np.asarray(loaded.serve(tf.constant(pixels[i:i + 64].astype(np.float32))))
                           for i in range(0, len(pixels), 64)])


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
