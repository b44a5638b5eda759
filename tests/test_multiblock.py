"""Multi-block features and the mirrored view (extract/multiblock.py), on the mini set.

MobileNet alpha 0.25 with the shared ImageNet weights at 64 px: each block's columns are the
pooled output of its layer computed directly with Keras, one block is `build_feature_model`, and
the mirrored view is the backbone on the mirrored resized image.
"""

from __future__ import annotations

import numpy as np
import pytest

from extract.backbones import Weights, build_feature_model, get_backbone
from extract.datasets import open_dataset
from extract.multiblock import (BlockColumns, feature_blocks, mirror, mirror_graph_inputs,
                                multiblock_model, select_columns, views_forward_function)
from extract.forward import forward_function
from store.errors import HeadstartError
from tests.conftest import MINI, WEIGHTS

SIZE = 64
MOBILENET_TOP4 = ["conv_pw_10_relu", "conv_pw_11_relu", "conv_pw_12_relu", "conv_pw_13_relu"]


@pytest.fixture(scope="module")
def mobilenet():
    backbone = get_backbone("mobilenet")
    return backbone, backbone.preprocessing(SIZE)


@pytest.fixture(scope="module")
def base_models(mobilenet):
    backbone, _ = mobilenet
    weights = Weights.parse(str(WEIGHTS))
    return {pooling: build_feature_model(backbone, 0.25, weights, SIZE, pooling)
            for pooling in ("avg", "max")}


@pytest.fixture(scope="module")
def decoded(mobilenet):
    """24 mini images as the graph takes them (decoded, 32×32, not resized), several classes."""
    _, prep = mobilenet
    dataset = open_dataset(str(MINI))
    rows = np.linspace(0, len(dataset.splits["train"]) - 1, 24).astype(int)
    return prep.stack([dataset.load("train", int(r), prep, resized=False) for r in rows])


def _inputs(prep, decoded: np.ndarray) -> np.ndarray:
    return prep.apply(prep.resize_batch(decoded))


def test_mobilenet_blocks_are_the_pointwise_relus(base_models):
    names = [block.name for block in feature_blocks(base_models["avg"])]
    assert names[-4:] == MOBILENET_TOP4
    assert names[-7:-4] == ["conv_pw_7_relu", "conv_pw_8_relu", "conv_pw_9_relu"]
    assert feature_blocks(base_models["avg"])[-1].tensor is base_models["avg"].layers[-2].output


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_block_columns_equal_the_pooled_layer_output(base_models, mobilenet, decoded, pooling):
    import keras

    _, prep = mobilenet
    base = base_models[pooling]
    model, columns = multiblock_model(base, 4, pooling)
    assert [c.name for c in columns] == MOBILENET_TOP4
    assert [(c.start, c.stop) for c in columns] == [(0, 128), (128, 256), (256, 512), (512, 768)]
    assert model.output_shape[-1] == columns[-1].stop
    inputs = _inputs(prep, decoded)
    features = np.asarray(model.predict(inputs, verbose=0))
    reduce = np.mean if pooling == "avg" else np.max
    for column in columns:
        layer = base.get_layer(column.name)
        spatial = np.asarray(keras.Model(base.inputs, layer.output).predict(inputs, verbose=0))
        np.testing.assert_allclose(features[:, column.start:column.stop],
                                   reduce(spatial, axis=(1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            select_columns(features, columns, [column.name]),
            features[:, column.start:column.stop])
    np.testing.assert_array_equal(select_columns(features, columns, 2), features[:, 256:768])


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_one_block_is_build_feature_model(base_models, mobilenet, decoded, pooling):
    _, prep = mobilenet
    base = base_models[pooling]
    one, columns = multiblock_model(base, 1, pooling)
    assert one is base
    assert columns == [BlockColumns("conv_pw_13_relu", 0, 256)]
    today = forward_function(base, prep)(decoded)
    # with more blocks, the last block's columns are still today's vector, bit for bit
    four, columns = multiblock_model(base, 4, pooling)
    last = columns[-1]
    np.testing.assert_array_equal(forward_function(four, prep)(decoded)[:, last.start:last.stop],
                                  today)


def test_mirrored_view_is_the_backbone_on_the_mirrored_image(base_models, mobilenet, decoded):
    import tensorflow as tf

    _, prep = mobilenet
    model, _ = multiblock_model(base_models["avg"], 3, "avg")
    resized = prep.resize_batch(decoded)
    # resize, mirror, preprocess: the mirror comes between the (uint8) resize and preprocess_input
    expected_inputs = prep.apply(mirror(resized))
    np.testing.assert_array_equal(np.asarray(mirror_graph_inputs(prep, tf.constant(decoded))),
                                  expected_inputs)
    original, mirrored = views_forward_function(model, prep)(decoded)
    np.testing.assert_array_equal(original, forward_function(model, prep)(decoded))
    # the single-view pass on the mirrored resized images (already S×S: not resized again)
    np.testing.assert_array_equal(mirrored, forward_function(model, prep)(mirror(resized)))
    direct = np.asarray(model.predict(expected_inputs, verbose=0))  # another kernel path
    np.testing.assert_allclose(mirrored, direct, rtol=1e-4, atol=1e-4)
    assert not np.allclose(mirrored, original, atol=1e-3)  # the mirror is another view
    stacked = views_forward_function(model, prep, stacked=True)(decoded)
    np.testing.assert_allclose(stacked[0], original, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stacked[1], mirrored, rtol=1e-4, atol=1e-4)
    plain, none = views_forward_function(model, prep, flip=False)(decoded)
    assert none is None
    np.testing.assert_array_equal(plain, original)


def test_mirror_of_an_already_sized_batch(mobilenet):
    """Images already at the input size are not resized: the mirror is a plain flip."""
    import tensorflow as tf

    _, prep = mobilenet
    batch = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(mirror_graph_inputs(prep, tf.constant(batch))),
                                  prep.apply(batch[:, :, ::-1]))


def test_refusals(base_models, mobilenet):
    backbone, _ = mobilenet
    with pytest.raises(HeadstartError, match="between 1 and 14"):
        multiblock_model(base_models["avg"], 15, "avg")
    with pytest.raises(HeadstartError, match="avg or max"):
        multiblock_model(base_models["avg"], 2, "flatten")
    with pytest.raises(HeadstartError, match="Unknown block"):
        select_columns(np.zeros((1, 4)), [BlockColumns("a", 0, 4)], ["b"])


@pytest.mark.parametrize("name, alpha, size, top", [
    ("mobilenet_v2", 0.35, 32, ["block_15_add", "block_16_project_BN", "out_relu"]),
    ("efficientnet_b0", None, 32, ["block6d_add", "block7a_project_bn", "top_activation"]),
    ("resnet50_v2", None, 32, ["conv5_block1_out", "conv5_block2_out", "post_relu"]),
])
def test_block_outputs_of_other_families(name, alpha, size, top):
    """A block's output is its activation (not a lone BatchNormalization or a pre-activation
    tensor), and the last block is the tensor the backbone's own pooling reads."""
    base = build_feature_model(get_backbone(name), alpha, Weights("none"), size, "avg")
    blocks = feature_blocks(base)
    assert [b.name for b in blocks[-3:]] == top
    pool = next(l for l in reversed(base.layers) if type(l).__name__ == "GlobalAveragePooling2D")
    assert blocks[-1].tensor is pool.input
