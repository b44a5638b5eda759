"""The forward function of a runtime: one seam for extraction, predict and serve.

`tf` is `extract.forward.forward_function` (the traced TensorFlow pass); `onnx` is the same
feature model converted once to ONNX, kept in the store, and run on ONNX Runtime's CPU provider
(`extract.onnx_runtime`). Both take uint8 N×H×W×3 batches (any one size) and give float32
features. A cache records its runtime in its fingerprint inputs only when it is not tf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from extract.compute import ComputeOptions, check_runtime
from extract.preprocessing import Preprocessing
from store.errors import HeadstartError

DEFAULT_RUNTIME = "tf"


def cache_runtime(inputs: dict[str, Any]) -> str:
    """The runtime that made a cache, from its fingerprint inputs (tf when not recorded)."""
    return str(inputs.get("runtime", DEFAULT_RUNTIME))


def checked_runtime(cache_name: str, inputs: dict[str, Any], asked: str | None) -> str:
    """The runtime a head of this cache answers with: the cache's own. Another one is refused:
    its features differ in the last bits from those the head was fitted on."""
    own = cache_runtime(inputs)
    if asked is not None:
        check_runtime(asked)
    if asked is not None and asked != own:
        raise HeadstartError(
            f"Cache {cache_name} was extracted with --runtime {own}, so its heads answer with "
            f"{own} only (other runtimes' features differ in the last bits); drop --runtime, or "
            f"extract a cache with --runtime {asked} and fit the head on it.")
    return own


def runtime_forward(runtime: str, model: Any, preprocessing: Preprocessing,
                    compute: ComputeOptions | None = None, *, store_root: Path | None = None,
                    inputs: dict[str, Any] | None = None, mirror: bool = False,
                    throughput: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The forward function of `runtime` for a Keras feature model (of the mirrored images
    with `mirror`). For onnx, `store_root` and the cache's (or plan's) fingerprint
    `inputs` locate the converted model in the store; `throughput` (large batches, as the
    extraction pass's) runs slices of each batch from one thread per core on a single-threaded
    session, rather than the whole batch on one session of all cores' threads (the lower
    latency for the one-image batches of predict and serve)."""
    if check_runtime(runtime) == "tf":
        from extract.forward import forward_function

        return forward_function(model, preprocessing, compute, mirror=mirror)
    if store_root is None or inputs is None:
        raise ValueError("the onnx runtime needs the store and the fingerprint inputs")
    from extract import onnx_runtime

    threads = onnx_runtime.cpu_threads() if throughput else 1
    runner = onnx_runtime.converted_session(store_root, inputs, model, preprocessing, mirror,
                                            threads=onnx_runtime.session_threads(threads))
    return onnx_runtime.onnx_forward_function(runner, preprocessing, threads)


def concurrent_calls(runtime: str) -> bool:
    """Whether the extraction pass calls `runtime`'s forward function on two batches at once:
    onnx, whose slices of one batch then keep every core busy while the last slice of the
    other finishes (1.14x the images per second of one call at a time on 2 cores,
    MobileNet at 128 px); tf runs one traced call at a time, as it always has."""
    return runtime == "onnx"


def takes_decoded_images(runtime: str, preprocessing: Preprocessing) -> bool:
    """Whether `runtime`'s forward function takes decoded images of any size at no extra cost
    (those it cannot enlarge itself it resizes first, as the extraction pass hands them), so
    one-image paths (predict, serve) need not resize them first: onnx where its graph enlarges
    images itself. TensorFlow traces one graph per image size, so its callers hand it images
    at the input size."""
    if runtime != "onnx":
        return False
    from extract.onnx_runtime import resizes_in_graph

    return resizes_in_graph(preprocessing)
