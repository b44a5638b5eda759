"""The backbone on ONNX Runtime: conversion (tf2onnx, once per model, kept in the store), the
inference session (CPUExecutionProvider, threads from the machine), and a forward function
with `extract.forward.forward_function`'s contract: uint8 N×H×W×3 (any one size) in, float32
features out.

The converted graph holds the resize, the backbone's `preprocess_input` and the backbone, and
takes float32 images holding uint8 values (0..255), so uint8 batches give the numbers TensorFlow
gives. For the default preprocessing (tensorflow resizer, bilinear) the
graph takes images of any size up to the input size and enlarges them itself (ONNX's Resize,
linear with half-pixel centres, then rounded as in TensorFlow's graph), so CIFAR-sized batches
cross as they are and the resize runs inside the session's threads. It is handed only the
enlargements where it gives TensorFlow's uint8 arrays exactly (`enlarges_exactly`: a whole
factor per side, both odd or both powers of two; 32 px to 64, 96, 128, 160 or 224 px, say), so
an image is the same array whichever runtime or path resized it. Any other size is first resized
by `Preprocessing.resize_batch`, TensorFlow's own resize (tf2onnx cannot convert the
antialiased resize, ScaleAndTranslate, and at other factors the two round a few pixels in a
thousand differently).
For throughput (the extraction pass) a batch is split into slices run at once from one thread
per core on a session of one intra-op thread (`onnx_forward_function`'s `threads`): MobileNet's
small convolutions share two threads poorly, and on 2 cores this ran 1.1-1.3x the images per
second of one session on both threads (`bench/onnx_runtime.py`; the pass also keeps two
batches in flight, `extract.runtimes.concurrent_calls`); predict and serve, whose
batches are often one image, keep one session on all cores.
A second graph with the horizontal mirror between the resize and `preprocess_input` gives the
mirrored view of `--tta flip`, as `extract.multiblock.mirror_graph_inputs` does for TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from extract.plan import library_versions
from extract.preprocessing import Preprocessing
from extract.runtime import quiet_stderr, load_keras
from store.errors import HeadstartError
from store.fingerprint import fingerprint
from store.runtimes import model_path, write_model

#: ONNX opset the backbones are converted to (onnxruntime 1.17+ runs it).
OPSET = 17
#: Libraries whose versions decide the converted file (part of its key).
CONVERTER_LIBRARIES = ("tf2onnx", "onnx", "tensorflow", "keras")
#: The fingerprint inputs that decide the backbone a cache ran (its key's model part).
MODEL_INPUTS = ("backbone", "alpha", "weights", "image_size", "pooling", "preprocessing")
INPUT_NAME = "images"
#: What the converted graph holds, in the model key of graphs that resize: 2 = the resize of
#: small images inside it (earlier files, without the field, took the input size only; a store
#: may still hold them: STORE/runtimes/ files are safe to delete, they are converted again).
GRAPH_VERSION = 2


def available() -> bool:
    """Whether onnxruntime and tf2onnx are installed."""
    try:
        metadata.version("onnxruntime")
        metadata.version("tf2onnx")
    except metadata.PackageNotFoundError:
        return False
    return True


def require() -> None:
    """Refuse the ONNX runtime, in one sentence, where its libraries are missing."""
    if not available():
        raise HeadstartError("--runtime onnx needs onnxruntime and tf2onnx; install them with "
                             "pip install -e '.[onnx]'.")


def converter_versions() -> dict[str, str]:
    """Versions of the libraries that decide the converted model, and the opset."""
    return {"opset": str(OPSET), **library_versions(CONVERTER_LIBRARIES)}


def model_key(inputs: dict[str, Any], mirror: bool = False) -> str:
    """The store key of a backbone's converted model, from a cache's (or plan's) fingerprint
    inputs: the backbone settings and weights identity, the blocks above one (a multi-block
    model is another graph), the mirrored view's graph apart, plus the graph version and the
    converter versions."""
    model = {k: inputs.get(k) for k in MODEL_INPUTS}
    if inputs.get("blocks", 1) != 1:
        model["blocks"] = inputs["blocks"]
    if mirror:
        model["mirror"] = True
    key: dict[str, Any] = {"model": model, "converter": converter_versions()}
    stored = inputs.get("preprocessing")
    if isinstance(stored, dict) and resizes_in_graph(Preprocessing.from_dict(stored)):
        key["graph"] = GRAPH_VERSION  # other graphs are those converted before it (version 1)
    return fingerprint(key)


#: Largest odd and power-of-two enlargement factors handed to the graph (measured exact up to
#: them on CIFAR images, tests/test_onnx_runtime.py).
MAX_ODD_FACTOR = 15
MAX_POWER_OF_TWO_FACTOR = 16


def enlarges_exactly(height: int, width: int, size: int) -> bool:
    """Whether ONNX's Resize enlarges an H×W image to S×S with TensorFlow's rounded values.

    A whole factor per side, both powers of two (every weight and sum is then exact in float32)
    or both odd (each interpolated value is then a multiple of 1/(ky·kx), an odd denominator, so
    it never lies within float error of a rounding boundary n + 1/2); a side of factor 1 is not
    interpolated and goes with either. Mixed kinds (2 and 3, say), even factors such as 6 and
    fractional ones can put an exact value on n + 1/2, which the two runtimes may round apart.
    """
    factors = []
    for side in (height, width):
        if side < 1 or side > size or size % side:
            return False
        factors.append(size // side)
    scaled = [k for k in factors if k > 1]
    if all(k & (k - 1) == 0 and k <= MAX_POWER_OF_TWO_FACTOR for k in scaled):
        return True
    return all(k % 2 == 1 and k <= MAX_ODD_FACTOR for k in scaled)


def takes_as_is(preprocessing: Preprocessing, height: int, width: int) -> bool:
    """Whether the converted graph takes a decoded H×W batch as it is: at the input size, or
    an enlargement it makes itself exactly as TensorFlow's resize; any other is resized first."""
    size = preprocessing.image_size
    return (height, width) == (size, size) or (resizes_in_graph(preprocessing)
                                               and enlarges_exactly(height, width, size))


def resizes_in_graph(preprocessing: Preprocessing) -> bool:
    """Whether the converted graph enlarges images itself: TensorFlow's bilinear resize, which
    ONNX's Resize (linear, half-pixel centres) computes alike; other interpolations and the
    Pillow resizer get images at the input size."""
    return (preprocessing.resizer == "tensorflow" and preprocessing.converter is None
            and preprocessing.interpolation == "bilinear")


@functools.lru_cache(maxsize=1)
def _quiet_converter() -> Any:
    """tf2onnx, imported without TensorFlow's or its own chatter, with the Erfc handler."""
    load_keras()
    with quiet_stderr():
        import tf2onnx
    for name in ("tf2onnx", "onnx", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _register_erfc()
    return tf2onnx


def _register_erfc() -> None:
    """Teach tf2onnx TensorFlow's Erfc as 1 - Erf (ONNX has Erf only): the exact GELU of the
    KerasHub towers (`tf.nn.gelu`) is written with Erfc, which tf2onnx would otherwise leave as
    a node ONNX Runtime cannot load. Registered through tf2onnx's own op-handler decorator."""
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 (the decorator registers it)
        @classmethod
        def version_9(cls, ctx: Any, node: Any, **_: Any) -> None:
            dtype = ctx.get_dtype(node.input[0])
            node.type = "Erf"
            one = ctx.make_const(utils.make_name("erfc_one"),
                                 np.array(1, utils.map_onnx_to_numpy_type(dtype)))
            erf = node.output[0]
            rest = ctx.insert_new_node_on_output("Sub", erf, name=utils.make_name(node.name))
            ctx.replace_inputs(rest, [one.output[0], erf])
            ctx.set_dtype(rest.output[0], dtype)
            ctx.copy_shape(erf, rest.output[0])


def convert(model: Any, preprocessing: Preprocessing, opset: int = OPSET,
            mirror: bool = False) -> bytes:
    """The Keras feature model with its preprocessing, as serialized ONNX: float32 (0..255)
    N×H×W×3 in (H, W up to the input size where `resizes_in_graph`, else the input size),
    float32 features out (of the mirrored images with `mirror`)."""
    import tensorflow as tf

    enlarges = resizes_in_graph(preprocessing)

    def features(images: Any) -> Any:
        resized = preprocessing.enlarge_tensor(images) if enlarges else images
        if mirror:
            resized = tf.reverse(resized, axis=[2])
        return model(preprocessing.function()(resized), training=False)

    return convert_function(features, None if enlarges else preprocessing.image_size, opset)


def convert_function(function: Callable[[Any], Any], size: int | None,
                     opset: int = OPSET) -> bytes:
    """A TensorFlow-traceable function of float32 N×S×S×3 images (any height and width for
    `size` None; its output cast to float32) as serialized ONNX, converted by tf2onnx without a
    line on stderr."""
    tf2onnx = _quiet_converter()
    import tensorflow as tf

    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def traced(images: Any) -> Any:
        return tf.cast(function(images), tf.float32)

    with quiet_stderr():
        proto, _ = tf2onnx.convert.from_function(traced, input_signature=[spec], opset=opset)
    _fold_captured_constants(proto, traced.get_concrete_function())
    return proto.SerializeToString()


def _fold_captured_constants(proto: Any, concrete: Any) -> None:
    """Make the tensors a traced model captured outside its variables (DINOv3's rotary
    embedding tables, say), which tf2onnx leaves as graph inputs, constants of the graph:
    the converted model then takes the images only."""
    from onnx import numpy_helper

    captured = {inner.name: outer for outer, inner in concrete.graph.captures}
    for graph_input in [i for i in proto.graph.input if i.name != INPUT_NAME]:
        value = captured.get(graph_input.name)
        if value is None or not hasattr(value, "numpy"):
            raise ValueError(f"the converted graph takes an input besides the images "
                             f"({graph_input.name})")
        proto.graph.initializer.append(numpy_helper.from_array(value.numpy(), graph_input.name))
        proto.graph.input.remove(graph_input)


def quantize_int8(model: bytes, calibration: np.ndarray, target: Path) -> Path:
    """A static int8 variant of a converted model (QDQ; uint8 activations, per-channel int8
    weights, after onnxruntime's pre-processing folds batch norms into the convolutions), its
    activation ranges calibrated on `calibration` (float32 N×S×S×3 images as the model takes
    them). The quantizer's advice on the root logger is kept off stderr."""
    require()
    import tempfile

    import onnx

    name = onnx.load_model_from_string(model).graph.input[0].name
    with quiet_stderr(), _logging_off():
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Images(CalibrationDataReader):  # one image per calibration step
            def __init__(self) -> None:
                self.rows = iter(calibration)

            def get_next(self) -> dict[str, np.ndarray] | None:
                row = next(self.rows, None)
                return None if row is None else {name: row[None].astype(np.float32)}

        with tempfile.TemporaryDirectory(prefix="headstart-quantize-") as folder:
            source = Path(folder) / "float32.onnx"
            source.write_bytes(model)
            prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(quantized), Images(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True)
            write_model(target, quantized.read_bytes())
    return target


def converted_model(root: Path, inputs: dict[str, Any], model: Any | Callable[[], Any],
                    preprocessing: Preprocessing, mirror: bool = False) -> Path:
    """The store's converted model for these fingerprint inputs (of the mirrored view with
    `mirror`), converting it the first time. `model` is the Keras feature model, or a function
    that builds it (called only to convert)."""
    require()
    path = model_path(root, model_key(inputs, mirror))
    if not path.is_file():
        _convert(path, inputs, model, preprocessing, mirror)
    return path


def converted_session(root: Path, inputs: dict[str, Any], model: Any | Callable[[], Any],
                      preprocessing: Preprocessing, mirror: bool = False,
                      threads: int | None = None) -> Any:
    """The session (`threads` intra-op threads; all cores) of the store's converted model (see
    `converted_model`), made once: from the file, or from the conversion that writes it. A file
    onnxruntime cannot load (damaged by hand, say) is converted again once."""
    require()
    path = model_path(root, model_key(inputs, mirror))
    if path.is_file():
        try:
            return session(path, threads)
        except Exception:  # onnxruntime raises its own exception types for a bad file
            path.unlink(missing_ok=True)
    return _convert(path, inputs, model, preprocessing, mirror, threads)


def _convert(path: Path, inputs: dict[str, Any], model: Any | Callable[[], Any],
             preprocessing: Preprocessing, mirror: bool, threads: int | None = None) -> Any:
    """Convert the backbone, check that ONNX Runtime loads it (a graph it cannot run is never
    kept), write it to `path`; returns the session."""
    keras_model = model() if callable(model) and not hasattr(model, "layers") else model
    try:
        data = convert(keras_model, preprocessing, mirror=mirror)
    except Exception as error:  # tf2onnx raises many types, with long messages
        raise HeadstartError(f"Cannot convert backbone {inputs.get('backbone')} to ONNX "
                             f"({_first_line(error)}); use --runtime tf.") from None
    runner = _loadable(data, inputs, threads)
    write_model(path, data)
    return runner


def _loadable(model: bytes, inputs: dict[str, Any], threads: int | None = None) -> Any:
    """A session of a converted model, or one sentence where ONNX Runtime cannot load it."""
    try:
        return session(model, threads)
    except Exception as error:  # onnxruntime raises its own exception types
        raise HeadstartError(f"ONNX Runtime cannot run backbone {inputs.get('backbone')} as "
                             f"converted ({_first_line(error)}); use --runtime tf.") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")


@contextlib.contextmanager
def _logging_off() -> Iterator[None]:
    """No Python log record below ERROR (onnxruntime's quantizer warns on the root logger)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def cpu_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_threads(slices: int) -> int | None:
    """Intra-op threads of a session that `slices` threads run at once (`onnx_forward_function`):
    one each, else (None) all cores."""
    return 1 if slices > 1 else None


def session(model: Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU provider, `threads` intra-op threads (all cores)."""
    require()
    with quiet_stderr():
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1
        # No spin-waiting between batches: the decoding threads need those cores (measured:
        # extraction at about half speed on 2 cores with spinning on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_forward_function(runner: Any, preprocessing: Preprocessing, threads: int = 1
                          ) -> Callable[[np.ndarray], np.ndarray]:
    """`forward_function`'s contract on an onnxruntime session: a batch of decoded images
    (uint8 N×H×W×3, any one size) in, float32 features out. With `threads` > 1 each batch is
    split into two slices per thread, run on `runner` from that many threads at once and put
    back in order (two per thread, so that a thread slowed by the decoding threads takes fewer
    of them): give it a session of one intra-op thread."""
    name = runner.get_inputs()[0].name
    pool = ThreadPoolExecutor(threads, thread_name_prefix="onnx-slice") if threads > 1 else None

    def run(images: np.ndarray) -> np.ndarray:
        return runner.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    def call(batch: np.ndarray) -> np.ndarray:
        if not takes_as_is(preprocessing, *batch.shape[1:3]):
            batch = preprocessing.resize_batch(batch)
        if pool is None or len(batch) < 2:
            features = run(batch)
        else:
            parts = np.array_split(batch, min(2 * threads, len(batch)))
            features = np.concatenate(list(pool.map(run, parts)))
        return features.astype(np.float32, copy=False)

    return call


def export_variants(model: Any, size: int, calibration: np.ndarray, folder: Path, stem: str,
                    int8: bool = True) -> list[tuple[str, Path]]:
    """`export --format onnx`: a fixed-size end-to-end Keras model (float32 0..255 pixels
    N×S×S×3 → probabilities) as STEM_float32.onnx and, with `int8`, its static int8 variant
    calibrated on `calibration` images; returns (variant name, path) pairs."""
    require()
    data = convert_function(lambda images: model(images, training=False), size)
    made = [("onnx-float32", write_model(folder / f"{stem}_float32.onnx", data))]
    if int8:
        made.append(("onnx-int8", quantize_int8(data, calibration, folder / f"{stem}_int8.onnx")))
    return made


def run_batches(path: Path, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """An exported model's outputs for float32 (or uint8) images, in batches."""
    runner = session(path)
    name = runner.get_inputs()[0].name
    return np.concatenate([runner.run(None, {name: images[i:i + batch_size].astype(np.float32)})[0]
                           for i in range(0, len(images), batch_size)]).astype(np.float64)
