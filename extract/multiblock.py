"""Multi-block features: the pooled outputs of a backbone's last N blocks, from one pass.

The blocks are those `extract.blocks.backbone_blocks` gives (the grouping fine-tuning unfreezes),
but a block's *output* is not simply the last layer of its group, which for several families is a
pre-activation tensor or a lone normalisation layer. For each group it is the tensor the rest of
the network takes from that block:

1. start at the group's last operation (topological order of the functional graph, so Keras-3
   op nodes such as ConvNeXt's residual ``add`` count);
2. follow the chain while the tensor has one consumer that is either weightless and in no group
   (an activation, an ``Add``, a pooling or padding layer: MobileNetV2 ``Conv_1_bn`` →
   ``out_relu``, ResNet50V2 ``post_bn`` → ``post_relu``) or a group made of normalisation layers
   only (a lone BatchNormalization, which fine-tuning lists as a block of its own);
3. if the tensor found is not a *cut* of the graph (some later operation still reads a tensor from
   before it: an Inception branch, an Xception shortcut), move on to the next cut (``mixedN``,
   the ``add`` joining the shortcut);
4. groups whose path holds no nonlinearity (ConvNeXt's LayerNorm+conv downsampling, DenseNet's
   transition conv+average pooling, an Xception shortcut conv) are not blocks of their own; groups
   that reach the same tensor are one block.

The last block's output is always the tensor the backbone's own global pooling reads, and its
columns are the backbone's output itself (``build_feature_model(..., pooling)``, the very same
graph tensor), so ``count=1`` is today's feature vector exactly; earlier blocks are reduced with a
`GlobalAveragePooling2D`/`GlobalMaxPooling2D`, as the backbone reduces its last one.

Per family this gives (top blocks first, at 128 px):
  mobilenet ``conv_pw_13_relu, conv_pw_12_relu, conv_pw_11_relu, …`` (the ReLU after each
  pointwise conv); mobilenet_v2 ``out_relu, block_16_project_BN, block_15_add, …``; vgg
  ``block5_pool, block4_pool, …``; resnet50/101 ``conv5_block3_out, …``; resnet50_v2
  ``post_relu, conv5_block2_out, …``; efficientnet_b0 ``top_activation, block7a_project_bn,
  block6d_add, …``; densenet121 ``relu, conv5_block15_concat, …``; inception_v3 ``mixed10,
  mixed9, …``; xception ``block14_sepconv2_act, block13, block12, …`` (the residual adds);
  convnext_tiny ``stage_3_block_2, stage_3_block_1, …`` (the residual adds).
Names are the output layer's name, or the group's name where Keras numbers the layer itself
(``add_17``, which depends on what else the process built).

Test-time views: `mirror_graph_inputs` is "resize, mirror, preprocess" exactly as
`Preprocessing.graph_inputs` is "resize, preprocess"; `views_forward_function` runs the original
and the mirrored batch through the model in one traced call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from extract.backbones import Backbone, Weights, build_feature_model
from extract.blocks import _block_key, backbone_blocks
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.errors import HeadstartError

BLOCK_POOLINGS = ("avg", "max")
_GLOBAL_POOLS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D")
_NORMS = ("BatchNormalization", "LayerNormalization")
_NONLINEAR = ("ReLU", "ELU", "LeakyReLU", "PReLU", "Softmax", "MaxPooling2D")
#: Names Keras gives layers it numbers itself (they change with what else the process built).
_AUTO_NAME = re.compile(r"^(add|concatenate|activation|batch_normalization|conv2d|multiply|"
                        r"dense|max_pooling2d|average_pooling2d|zero_padding2d)(_\d+)?$")


@dataclass(frozen=True)
class BlockColumns:
    """One block's place in a multi-block feature vector: columns [start, stop)."""

    name: str
    start: int
    stop: int

    @property
    def width(self) -> int:
        return self.stop - self.start

    def to_list(self) -> list[Any]:
        return [self.name, self.start, self.stop]


@dataclass(frozen=True)
class FeatureBlock:
    """A block of a backbone: its name, the operation whose output it is, and that tensor."""

    name: str
    operation: Any
    tensor: Any


# --- the graph --------------------------------------------------------------------------------


def _inbound_node(operation: Any, members: set[int]) -> Any:
    """The node by which `operation` takes part in the graph whose operations are `members`."""
    nodes = operation._inbound_nodes
    for node in nodes:
        if all(id(t._keras_history.operation) in members for t in node.input_tensors):
            return node
    return nodes[0]


def _is_nonlinear(operation: Any) -> bool:
    kind = type(operation).__name__
    if kind in _NONLINEAR:
        return True
    if kind == "Activation":
        return getattr(operation.activation, "__name__", "") != "linear"
    return False


def _spatial_end(model: Any, operations: list[Any]) -> int:
    """Index of the operation whose output the backbone's global pooling reads (for a model
    without pooling: its last operation)."""
    for index in range(len(operations) - 1, -1, -1):  # the last one: EfficientNet's
        if type(operations[index]).__name__ in _GLOBAL_POOLS:  # squeeze-excite pools too
            return index - 1 if index else index
    return len(operations) - 1


def feature_blocks(model: Any) -> list[FeatureBlock]:
    """The blocks of a backbone built by `build_feature_model` (avg or max pooling), bottom to
    top, each with the (spatial, N×H×W×C) tensor that is its output; see the module docstring.
    The last block is the tensor the backbone's own pooling reads."""
    operations = [op for op in model.operations if type(op).__name__ != "InputLayer"]
    members = {id(op) for op in model.operations}
    index = {id(op): i for i, op in enumerate(operations)}
    end = _spatial_end(model, operations)
    parents: list[list[int]] = []
    consumers: list[list[int]] = [[] for _ in operations]
    for i, operation in enumerate(operations):
        node = _inbound_node(operation, members)
        mine = sorted({index[id(t._keras_history.operation)] for t in node.input_tensors
                       if id(t._keras_history.operation) in index})
        parents.append(mine)
        for parent in mine:
            consumers[parent].append(i)
    # cut[i]: no operation after i (up to the spatial end) reads a tensor from before i
    cut = [False] * len(operations)
    earliest_read = len(operations)
    for i in range(end, -1, -1):
        cut[i] = earliest_read >= i
        earliest_read = min([earliest_read, *parents[i]]) if parents[i] else earliest_read

    groups = [g for g in backbone_blocks(model)
              if any(id(layer) in index and index[id(layer)] <= end for layer in g)]
    group_of: dict[int, int] = {}
    for g, layers in enumerate(groups):
        for layer in layers:
            if id(layer) in index:
                group_of[index[id(layer)]] = g
    norm_only = {g for g, layers in enumerate(groups)
                 if all(type(layer).__name__ in _NORMS for layer in layers)}

    def passable(i: int) -> bool:
        if i > end:
            return False
        if i in group_of:
            return group_of[i] in norm_only
        return not operations[i].weights if hasattr(operations[i], "weights") else True

    found: dict[int, tuple[str, bool]] = {}  # output index -> (name, path has a nonlinearity)
    for g, layers in enumerate(groups):
        if g in norm_only:
            continue
        positions = sorted(index[id(layer)] for layer in layers if id(layer) in index)
        nonlinear = any(_is_nonlinear(operations[i]) for i in positions)
        at = positions[-1]
        while True:
            while len(consumers[at]) == 1 and passable(consumers[at][0]):
                at = consumers[at][0]
                nonlinear = nonlinear or _is_nonlinear(operations[at])
            if cut[at] or at >= end:
                break
            following = next(i for i in range(at + 1, end + 1) if cut[i])
            nonlinear = nonlinear or any(_is_nonlinear(operations[i])
                                         for i in range(at + 1, following + 1))
            at = following
        at = min(at, end)
        key = _block_key(layers[-1]) or layers[-1].name
        previous = found.get(at)
        if previous is not None and previous[1] and not nonlinear:
            continue  # e.g. an Xception shortcut conv: the block keeps its main branch's name
        found[at] = (key, nonlinear or (previous[1] if previous else False))
    if end not in found:
        found[end] = (operations[end].name, True)
    blocks = []
    for at in sorted(found):
        key, nonlinear = found[at]
        if not nonlinear and at != end:
            continue
        operation = operations[at]
        name = key if _AUTO_NAME.match(operation.name) else operation.name
        node = _inbound_node(operation, members)
        blocks.append(FeatureBlock(name, operation, node.output_tensors[0]))
    return blocks


def block_names(model: Any) -> list[str]:
    """Names of `feature_blocks(model)`, bottom to top."""
    return [block.name for block in feature_blocks(model)]


# --- the multi-block model ----------------------------------------------------------------------


def _pool(keras: Any, pooling: str, tensor: Any, name: str) -> Any:
    layer = (keras.layers.GlobalAveragePooling2D if pooling == "avg"
             else keras.layers.GlobalMaxPooling2D)(name=f"{name}_{pooling}pool")
    return layer(tensor)


def multiblock_model(model: Any, count: int, pooling: str,
                     block_pooling: str | None = None) -> tuple[Any, list[BlockColumns]]:
    """One Keras model computing the pooled outputs of the last `count` blocks of `model` (a
    backbone from `build_feature_model` with `pooling`), concatenated bottom to top, and each
    block's columns.

    For a KerasHub vision transformer the blocks are its last `count` transformer layers
    (`extract.kerashub.hub_multiblock_model`, pooled as `pooling` says).

    The last block's columns are `model`'s own output (the same tensor), so `count == 1` returns
    `model` itself. `block_pooling` (default: `pooling`) reduces the earlier blocks. Flatten
    pooling takes one block only.
    """
    from extract.kerashub import hub_multiblock_model

    hub = hub_multiblock_model(model, count, pooling)  # a KerasHub vision transformer
    if hub is not None:
        return hub[0], block_columns(hub[1])
    keras = load_keras()
    width = int(model.output_shape[-1])
    if count == 1:
        return model, [BlockColumns(feature_blocks(model)[-1].name if pooling != "flatten"
                                    else model.name, 0, width)]
    if pooling not in BLOCK_POOLINGS:
        raise HeadstartError(f"--blocks above 1 needs --pooling avg or max; got {pooling!r}.")
    block_pooling = block_pooling or pooling
    if block_pooling not in BLOCK_POOLINGS:
        raise HeadstartError(f"Unknown block pooling {block_pooling!r}; choose avg or max.")
    blocks = feature_blocks(model)
    if not 1 <= count <= len(blocks):
        raise HeadstartError(
            f"--blocks must be between 1 and {len(blocks)} for this backbone; got {count}.")
    chosen = blocks[len(blocks) - count:]
    outputs = [_pool(keras, block_pooling, b.tensor, f"mb{i}_{b.name}")
               for i, b in enumerate(chosen[:-1])] + [model.output]
    columns = block_columns([(b.name, int(o.shape[-1])) for b, o in zip(chosen, outputs)])
    merged = keras.layers.Concatenate(axis=-1, name="blocks_concat")(outputs)
    return keras.Model(model.inputs, merged, name=f"{model.name}_blocks{count}"), columns


def block_columns(widths: list[tuple[str, int]]) -> list[BlockColumns]:
    """The columns of blocks of these (name, width), side by side from column 0."""
    columns, start = [], 0
    for name, width in widths:
        columns.append(BlockColumns(name, start, start + width))
        start += width
    return columns


def build_multiblock_feature_model(backbone: Backbone, alpha: float | None, weights: Weights,
                                   image_size: int, pooling: str, count: int = 1,
                                   block_pooling: str | None = None
                                   ) -> tuple[Any, list[BlockColumns]]:
    """`build_feature_model` with the last `count` blocks (see `multiblock_model`)."""
    base = build_feature_model(backbone, alpha, weights, image_size, pooling)
    return multiblock_model(base, count, pooling, block_pooling)


def select_columns(features: np.ndarray, columns: list[BlockColumns],
                   names: list[str] | int) -> np.ndarray:
    """The columns of some blocks: the last `names` blocks (an int) or the named ones."""
    if isinstance(names, int):
        if not 1 <= names <= len(columns):
            raise HeadstartError(f"Between 1 and {len(columns)} blocks; got {names}.")
        chosen = columns[len(columns) - names:]
    else:
        by_name = {c.name: c for c in columns}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise HeadstartError(f"Unknown block(s) {', '.join(unknown)}; the cache holds "
                                 f"{', '.join(by_name)}.")
        chosen = [by_name[n] for n in names]
    return np.concatenate([features[:, c.start:c.stop] for c in chosen], axis=1)


# --- test-time views: the horizontal mirror ----------------------------------------------------


def mirror(images: np.ndarray) -> np.ndarray:
    """Mirror a batch (N×H×W×C) left to right."""
    return np.ascontiguousarray(images[:, :, ::-1])


def mirror_graph_inputs(preprocessing: Preprocessing, images: Any) -> Any:
    """Inside a traced function: a uint8/float32 batch (N×H×W×3) → resized, mirrored,
    preprocessed backbone inputs (`Preprocessing.graph_inputs` with the mirror between the
    resize, which rounds to uint8 values, and `preprocess_input`)."""
    import tensorflow as tf

    resized = preprocessing.resize_tensor(tf.cast(images, tf.float32))
    return preprocessing.function()(tf.reverse(resized, axis=[2]))


def views_forward_function(model: Any, preprocessing: Preprocessing, flip: bool = True,
                           stacked: bool = False
                           ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]:
    """Like `extract.pipeline.forward_function`, for the original and (with `flip`) the mirrored
    view of each image: a decoded uint8 batch in, (features, mirrored features or None) out.

    Both views run in one traced call: by default as two backbone calls of the batch's own size,
    so the original view's numbers are those of the single-view pass; with `stacked`, as one call
    on the 2N images (the original view may then differ from the single-view pass in the last
    bits, as another batch size may).
    """
    load_keras()
    import tensorflow as tf

    def infer(batch: Any) -> Any:
        if not flip:
            return tf.cast(model(preprocessing.graph_inputs(batch), training=False), tf.float32)
        # graph_inputs and mirror_graph_inputs, sharing the resize
        resized = preprocessing.resize_tensor(tf.cast(batch, tf.float32))
        inputs = preprocessing.function()(resized)
        mirrored_inputs = preprocessing.function()(tf.reverse(resized, axis=[2]))
        if stacked:
            both = tf.cast(model(tf.concat([inputs, mirrored_inputs], 0), training=False),
                           tf.float32)
            count = tf.shape(inputs)[0]
            return both[:count], both[count:]
        original = tf.cast(model(inputs, training=False), tf.float32)
        return original, tf.cast(model(mirrored_inputs, training=False), tf.float32)

    traced: dict[tuple[str, tuple[int, ...]], Any] = {}

    def call(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        key = (batch.dtype.str, batch.shape[1:])
        if key not in traced:
            spec = tf.TensorSpec([None, *batch.shape[1:]], tf.as_dtype(batch.dtype))
            traced[key] = tf.function(infer, input_signature=[spec])
        result = traced[key](tf.constant(batch))
        if not flip:
            return np.asarray(result), None
        return np.asarray(result[0]), np.asarray(result[1])

    return call
