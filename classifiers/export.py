"""Export: one Keras model doing resize + preprocess + backbone + head, and TFLite variants.

The model takes RGB pixels (float32, 0..255). Its .keras and SavedModel forms accept any image
size and resize inside (bilinear with antialiasing, like Pillow's); TFLite models take the
cache's image size, already resized (e.g. by `Preprocessing.load_file`). Keras heads are used
as they are; linear heads (a softmax of a linear function, optionally after a StandardScaler)
become one Dense layer with the standardization folded in; other heads are refused.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from extract.predict import Predictor
from extract.rebuild import cache_dataset
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.errors import HeadstartError
from store.store import Store

FORMATS = ("keras", "savedmodel", "tflite")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
REPRESENTATIVE_IMAGES = 100
KERAS_INTERPOLATION = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
                       "lanczos": "lanczos3"}


def _preprocess_layer_class() -> type:
    """The registered Keras layer applying a backbone's `preprocess_input` by dotted name."""
    keras = load_keras()

    @keras.saving.register_keras_serializable(package="headstart", name="PreprocessInput")
    class PreprocessInput(keras.layers.Layer):
        """Applies e.g. keras.applications.mobilenet.preprocess_input to 0..255 pixels."""

        def __init__(self, function: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if not function.startswith("keras.applications."):
                raise ValueError(f"Refusing preprocess_input outside keras.applications: {function}")
            self.function = function

        def call(self, inputs: Any) -> Any:
            return Preprocessing(1, self.function).function()(inputs)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "function": self.function}

    return PreprocessInput


_PREPROCESS_LAYER: type | None = None


def preprocess_layer(function: str) -> Any:
    """A PreprocessInput layer (the class is registered once per process)."""
    global _PREPROCESS_LAYER
    if _PREPROCESS_LAYER is None:
        _PREPROCESS_LAYER = _preprocess_layer_class()
    return _PREPROCESS_LAYER(function)


def load_exported(path: Path) -> Any:
    """Load an exported .keras model (registers headstart's layer first)."""
    preprocess_layer("keras.applications.mobilenet.preprocess_input")
    from extract.kerashub import register_for_loading

    register_for_loading(path)  # KerasHub's layers, when the model holds them
    return load_keras().saving.load_model(path, safe_mode=True)


# --- heads as Keras layers --------------------------------------------------------------------


def keras_head(estimator: Any, features: np.ndarray, n_classes: int) -> Any:
    """A Keras model equal to the head, from features to class probabilities, or refuse.

    `features` (a few cached rows) are used to check that a converted head really matches.
    """
    classes = np.asarray(getattr(estimator, "classes_", []))
    if classes.tolist() != list(range(n_classes)):
        raise HeadstartError("The head was not fitted on every class of its cache; it cannot be "
                             "exported as one softmax over all classes.")
    if hasattr(estimator, "to_keras"):  # heads (e.g. ensembles) that know their Keras form
        return estimator.to_keras()
    if hasattr(estimator, "model_"):
        return estimator.model_
    head = _linear_as_dense(estimator, features.shape[1], n_classes)
    got = np.asarray(head(features.astype(np.float32), training=False))
    if not np.allclose(got, estimator.predict_proba(features), atol=1e-4):
        raise HeadstartError(
            f"The head ({type(estimator).__name__}) is linear but its probabilities are not a "
            "softmax of its decision function (e.g. calibrated or Platt-scaled), so it cannot be "
            "exported as a Dense layer.")
    return head


def _linear_as_dense(estimator: Any, n_features: int, n_classes: int) -> Any:
    """StandardScaler (optional) + linear model → one Dense(softmax) with the scaler folded in."""
    steps = [s for _, s in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    *transforms, last = steps
    coef = getattr(last, "coef_", None)
    if coef is None or not hasattr(last, "intercept_") or hasattr(coef, "toarray"):
        raise HeadstartError(
            f"A {type(last).__name__} head cannot be expressed in Keras; only Keras heads and "
            "linear heads (logreg, linear svm with softmax probabilities) can be exported.")
    weight = np.asarray(coef, dtype=np.float64).T  # F × K
    bias = np.asarray(last.intercept_, dtype=np.float64).reshape(-1)
    for transform in reversed(transforms):
        mean = np.asarray(getattr(transform, "mean_", None) if transform.with_mean else 0.0)
        scale = getattr(transform, "scale_", None) if transform.with_std else None
        if type(transform).__name__ != "StandardScaler":
            raise HeadstartError(f"Cannot fold a {type(transform).__name__} step into a Dense "
                                 "layer; only StandardScaler is supported.")
        scale = np.ones(n_features) if scale is None else np.asarray(scale, dtype=np.float64)
        weight = weight / scale[:, None]
        bias = bias - (np.broadcast_to(mean, (n_features,)) @ weight)
    if weight.shape[1] == 1 and n_classes == 2:  # binary: sigmoid(z) = softmax([-z/2, z/2])
        weight = np.hstack([-weight / 2, weight / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    keras = load_keras()
    dense = keras.layers.Dense(n_classes, activation="softmax", name="linear_head")
    model = keras.Sequential([keras.Input((n_features,)), dense], name="linear_head")
    dense.set_weights([weight.astype(np.float32), bias.astype(np.float32)])
    return model


# --- the end-to-end model ---------------------------------------------------------------------


def end_to_end_model(predictor: Predictor, fixed_size: bool = False) -> Any:
    """pixels (0..255 RGB) → resize → preprocess_input → backbone → head → probabilities."""
    keras = load_keras()
    pre = predictor.preprocessing
    size = pre.image_size
    head = keras_head(predictor.estimator, predictor.cache.features("train", slice(0, 64)),
                      len(predictor.class_names))
    inputs = keras.Input((size, size, 3) if fixed_size else (None, None, 3), name="pixels")
    x = inputs
    if pre.converter is not None:  # a KerasHub preset: its own converter layer (serialisable)
        from extract.kerashub import converter_layer

        x = converter_layer(pre, resize=not fixed_size)(x)
    elif not fixed_size:
        x = keras.layers.Resizing(size, size, interpolation=KERAS_INTERPOLATION[pre.interpolation],
                                  antialias=True, name="resize")(x)
    if pre.converter is None:
        x = preprocess_layer(pre.preprocess_input)(x)
    x = predictor.backbone(x)
    outputs = head(x, training=False)  # dropout off in every exported form
    return keras.Model(inputs, outputs, name=f"headstart_{predictor.head_name}")


# --- TFLite -----------------------------------------------------------------------------------


def tflite_bytes(model: Any, quantize: str, representative: Callable[[], Iterable[list]]) -> bytes:
    """Convert a fixed-size Keras model to TFLite with one quantization (float in and out)."""
    import tensorflow as tf

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
            return converter.convert()
        except Exception as error:  # the converter raises many types, with long messages
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HeadstartError(f"TFLite conversion ({quantize}) failed: {first}") from None


class TFLiteRunner:
    """Runs a .tflite model on uint8 pixel batches, one image per invoke."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
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
                test_limit: int | None = None) -> tuple[list[Variant], Path]:
    """Write the requested formats; returns the variants (with test figures) and the folder."""
    unknown = [f for f in formats if f not in FORMATS] + [q for q in quantizations
                                                          if q not in QUANTIZATIONS]
    if unknown:
        raise HeadstartError(f"Unknown export option {unknown[0]!r}; formats: {', '.join(FORMATS)}; "
                             f"quantizations: {', '.join(QUANTIZATIONS)}.")
    cache = store.find_cache(cache_selector)
    predictor = Predictor(store, cache, head, weights)
    folder = Path(out_dir) if out_dir else store.root / "exports" / cache.fingerprint[:16] / head
    folder.mkdir(parents=True, exist_ok=True)
    model = end_to_end_model(predictor)
    variants: list[Variant] = []
    if "keras" in formats:
        path = folder / f"{head}.keras"
        model.save(path)
        variants.append(Variant("keras", str(path), path.stat().st_size))
    if "savedmodel" in formats:
        path = folder / f"{head}_savedmodel"
        model.export(path, format="tf_saved_model", verbose=False)
        variants.append(Variant("savedmodel", str(path), _tree_bytes(path)))
    if "tflite" in formats:
        fixed = end_to_end_model(predictor, fixed_size=True)
        sample, _ = split_pixels(predictor, "train", REPRESENTATIVE_IMAGES, spread=True)

        def representative() -> Iterable[list]:
            for image in sample:
                yield [image[None].astype(np.float32)]

        for quantize in quantizations:
            path = folder / f"{head}_{'float32' if quantize == 'none' else quantize}.tflite"
            path.write_bytes(tflite_bytes(fixed, quantize, representative))
            variants.append(Variant(f"tflite-{quantize if quantize != 'none' else 'float32'}",
                                    str(path), path.stat().st_size))
    if evaluate:
        _evaluate(predictor, model, variants, test_limit)
    (folder / "export.json").write_text(json.dumps(
        {"head": head, "cache": cache.name, "fingerprint": cache.fingerprint,
         "input": {"pixels": "float32 RGB 0..255", "image_size": predictor.preprocessing.image_size,
                   "keras_and_savedmodel": "any size, resized inside",
                   "tflite": "exactly image_size, resized beforehand"},
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
