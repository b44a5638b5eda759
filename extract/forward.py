"""The compiled forward function: decoded images in, features out (the pass, predict, export)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from extract import multiblock
from extract.compute import ComputeOptions
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras

#: Image sizes the forward function is traced for; batches of further sizes are resized first.
MAX_TRACED_SHAPES = 4


def forward_function(model: Any, preprocessing: Preprocessing,
                     compute: ComputeOptions | None = None, mirror: bool = False
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """Resize, preprocess and the model's inference pass as one compiled function: a batch of
    decoded images (uint8 N×H×W×3, any one size; see `Preprocessing.stack`) in, float32
    features out. With `mirror`, those of the mirrored view: resize, mirror, preprocess
    (`extract.multiblock.mirror_graph_inputs`).

    One traced `tf.function` per image size and dtype (XLA-compiled with `compute.xla`) costs
    less per batch than `model.predict_on_batch`, and resizing in the graph runs vectorized on
    every core. Under a multi-GPU strategy each batch is split across the replicas in order.
    """
    keras = load_keras()
    if keras.backend.backend() != "tensorflow":
        flip = multiblock.mirror if mirror else (lambda images: images)
        return lambda batch: np.asarray(model.predict_on_batch(
            preprocessing.apply(flip(preprocessing.resize_batch(batch)))))
    import tensorflow as tf

    compute = compute or ComputeOptions()
    # XLA compiles the backbone only: resizing stays the op that one-image paths run eagerly.
    backbone = tf.function(lambda x: model(x, training=False), jit_compile=True) \
        if compute.xla else (lambda x: model(x, training=False))

    def infer(batch: Any) -> Any:
        inputs = (multiblock.mirror_graph_inputs(preprocessing, batch) if mirror
                  else preprocessing.graph_inputs(batch))
        return tf.cast(backbone(inputs), tf.float32)

    traced: dict[tuple[str, tuple[int, ...]], Any] = {}

    def call(batch: np.ndarray) -> np.ndarray:
        key = (batch.dtype.str, batch.shape[1:])  # one trace per image size, any batch size
        if key not in traced and len(traced) >= MAX_TRACED_SHAPES:  # images of many sizes:
            batch = preprocessing.resize_batch(batch)  # the same numbers, one more trace at most
            key = (batch.dtype.str, batch.shape[1:])
        if key not in traced:
            spec = tf.TensorSpec([None, *batch.shape[1:]], tf.as_dtype(batch.dtype))
            traced[key] = tf.function(infer, input_signature=[spec])
        return np.asarray(traced[key](tf.constant(batch)))

    strategy = compute.strategy()
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return call

    # strategy.run hands a traced function PerReplica values, which an input signature refuses.
    step = tf.function(infer)

    def distributed(batch: np.ndarray) -> np.ndarray:
        parts = np.array_split(batch, strategy.num_replicas_in_sync)
        values = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(parts[context.replica_id_in_sync_group]))
        outputs = strategy.experimental_local_results(strategy.run(step, args=(values,)))
        return np.concatenate([np.asarray(o) for o in outputs])

    return distributed


#: A batch of decoded images -> (features, features of the mirrored view or None).
ViewsForward = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


def views_forward(model: Any, preprocessing: Preprocessing, compute: ComputeOptions | None = None,
                  tta: str | None = None, make: Callable[..., Any] = forward_function
                  ) -> ViewsForward:
    """The extraction pass's forward: `forward_function` for the original view and, with
    `tta` "flip", a second compiled call for the mirrored one (so the original view's numbers
    are those of a cache without test-time views, bit for bit). `make` builds each function."""
    original = make(model, preprocessing, compute)
    mirrored = make(model, preprocessing, compute, mirror=True) if tta == "flip" else None

    def call(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return original(batch), None if mirrored is None else mirrored(batch)

    return call
