"""extract/preprocessing.py on real CIFAR JPEGs and small arrays, with no backbone: each
expected array is made by Pillow, tf.image.resize or KerasHub's own layer called directly here
(the operations the definition names), never by the Preprocessing under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.preprocessing import MAX_BATCHED_PIXELS, Preprocessing
from tests.helpers import mini_files

MOBILENET = "keras.applications.mobilenet.preprocess_input"
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
TF_NAMES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic",
            "lanczos": "lanczos3"}


def _tf_resize(pixels: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """tf.image.resize, antialiased when either side shrinks, rounded and clipped to uint8."""
    import tensorflow as tf

    height, width = pixels.shape[-3:-1]
    batch = pixels if pixels.ndim == 4 else pixels[None]
    resized = tf.image.resize(tf.cast(batch, tf.float32), (size, size),
                              method=TF_NAMES[interpolation],
                              antialias=bool(height > size or width > size))
    out = np.clip(np.round(np.asarray(resized)), 0, 255).astype(np.uint8)
    return out if pixels.ndim == 4 else out[0]


def _pillow(path_or_pixels: Path | np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    image = (Image.open(path_or_pixels) if isinstance(path_or_pixels, Path)
             else Image.fromarray(path_or_pixels)).convert("RGB")
    return np.asarray(image.resize((size, size), PIL_FILTERS[interpolation]))


# --- the definition ---------------------------------------------------------------------------

CONVERTER = {"class_name": "ImageConverter", "config": {}}

#: arguments -> the exact error, written by hand.
REFUSED = [
    (dict(resizer="keras_hub"), "The keras_hub resizer goes with a KerasHub converter, and only it."),
    (dict(converter=CONVERTER), "The keras_hub resizer goes with a KerasHub converter, and only it."),
    (dict(resizer="tensorflow", converter=CONVERTER),
     "The keras_hub resizer goes with a KerasHub converter, and only it."),
    (dict(interpolation="cubic"), "Unknown interpolation 'cubic'; known: nearest, bilinear, bicubic, lanczos."),
    (dict(resizer="opencv"), "Unknown resizer 'opencv'; known: tensorflow, pillow, keras_hub."),
]


@pytest.mark.parametrize(("arguments", "message"), REFUSED)
def test_bad_definitions_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        Preprocessing(32, MOBILENET, **arguments)
    assert str(error.value) == message


def test_a_converter_brings_its_own_interpolation() -> None:
    Preprocessing(32, "", interpolation="whatever", resizer="keras_hub", converter=CONVERTER)


#: definition -> its stored form, by hand (the Pillow one as format 1.2 wrote it).
STORED = [
    (Preprocessing(64, MOBILENET),
     {"image_size": 64, "preprocess_input": MOBILENET, "interpolation": "bilinear",
      "resize": "squash", "color": "RGB", "decoder": "pillow"}),
    (Preprocessing(32, MOBILENET, "nearest", resizer="tensorflow"),
     {"image_size": 32, "preprocess_input": MOBILENET, "interpolation": "nearest",
      "resize": "squash", "color": "RGB", "decoder": "pillow", "resizer": "tensorflow"}),
    (Preprocessing(16, "", resizer="keras_hub", converter=CONVERTER),
     {"image_size": 16, "preprocess_input": "", "interpolation": "bilinear", "resize": "squash",
      "color": "RGB", "decoder": "pillow", "resizer": "keras_hub", "converter": CONVERTER}),
]


@pytest.mark.parametrize(("definition", "stored"), STORED)
def test_stored_form_by_hand(definition: Preprocessing, stored: dict) -> None:
    assert definition.to_dict() == stored
    assert Preprocessing.from_dict(stored) == definition


# --- decoding and resizing one image ----------------------------------------------------------

@pytest.mark.parametrize("interpolation", list(PIL_FILTERS))
def test_the_pillow_resizer_is_pillows_resize(interpolation: str) -> None:
    definition = Preprocessing(48, MOBILENET, interpolation)
    for path in mini_files("train", "cat", 2) + mini_files("test", "ship", 1):
        expected = _pillow(path, 48, interpolation)
        for pixels in (definition.load_file(path), definition.decode_file(path),
                       definition.load_bytes(path.read_bytes())):
            assert pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize(("size", "interpolation"), [(64, "bilinear"), (16, "bilinear"),
                                                     (48, "bicubic"), (20, "lanczos"),
                                                     (40, "nearest"), (24, "nearest")])
def test_the_tensorflow_resizer_is_tf_image_resize(size: int, interpolation: str) -> None:
    definition = Preprocessing(size, MOBILENET, interpolation, resizer="tensorflow")
    for path in mini_files("train", "dog", 2):
        own = np.asarray(Image.open(path).convert("RGB"))
        decoded = definition.decode_file(path)
        np.testing.assert_array_equal(decoded, own)  # small: batched at its own size
        expected = _tf_resize(own, size, interpolation)
        np.testing.assert_array_equal(definition.load_file(path), expected)
        np.testing.assert_array_equal(definition.load_bytes(path.read_bytes()), expected)
        batch = definition.resize_batch(decoded[None])
        assert batch.dtype == np.uint8
        np.testing.assert_array_equal(batch[0], expected)


@pytest.mark.parametrize("shape", [(20, 80), (80, 20), (20, 24), (50, 50)])
def test_shrinking_either_side_is_antialiased(shape: tuple[int, int]) -> None:
    board = ((np.indices(shape).sum(axis=0) % 2) * 255).astype(np.uint8)
    pixels = np.repeat(board[..., None], 3, axis=2)
    definition = Preprocessing(32, MOBILENET, resizer="tensorflow")
    np.testing.assert_array_equal(definition.load_array(pixels), _tf_resize(pixels, 32))


def test_arrays_of_one_channel_become_rgb() -> None:
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    for resizer in ("pillow", "tensorflow"):
        definition = Preprocessing(10, MOBILENET, resizer=resizer)
        for pixels in (grey, grey[..., None]):
            decoded = definition.decode_array(pixels)
            expected = np.repeat(grey[..., None], 3, axis=2)
            if resizer == "pillow":
                expected = _pillow(grey, 10)
            np.testing.assert_array_equal(decoded, expected)
            assert definition.load_array(pixels).shape == (10, 10, 3)
    rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Preprocessing(10, MOBILENET, resizer="tensorflow").load_array(rgb),
                                  rgb)


def test_large_images_are_resized_at_decoding_and_others_are_not() -> None:
    definition = Preprocessing(32, MOBILENET, resizer="tensorflow")
    rng = np.random.default_rng(5)
    at_limit = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)  # exactly MAX_BATCHED_PIXELS
    assert 512 * 512 == MAX_BATCHED_PIXELS
    np.testing.assert_array_equal(definition.decode_array(at_limit), at_limit)
    over = rng.integers(0, 256, (512, 513, 3), dtype=np.uint8)
    decoded = definition.decode_array(over)
    assert decoded.shape == (32, 32, 3)
    reduced = np.asarray(Image.fromarray(over).reduce(8))  # min side 512 // (2 * 32) = 8
    np.testing.assert_array_equal(decoded, _tf_resize(reduced, 32))
    # the pixel count decides, not one side: 100 x 600 (60,000) stays, 1100 x 260 (286,000) not
    wide = rng.integers(0, 256, (100, 600, 3), dtype=np.uint8)
    np.testing.assert_array_equal(definition.decode_array(wide), wide)
    tall = rng.integers(0, 256, (1100, 260, 3), dtype=np.uint8)
    assert definition.decode_array(tall).shape == (32, 32, 3)


@pytest.mark.parametrize(("shape", "factor"), [((512, 512), 1), ((700, 200), 1), ((600, 640), 9),
                                               ((640, 1300), 10), ((260, 1100), 4),
                                               ((1100, 260), 4), ((150, 1800), 2),
                                               ((100, 600), 1)])
def test_the_box_reduce_factor(shape: tuple[int, int], factor: int) -> None:
    """factor = the short side // (2 x 32), used only when over MAX_BATCHED_PIXELS and above 1."""
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    over = shape[0] * shape[1] > MAX_BATCHED_PIXELS
    reduced = np.asarray(Image.fromarray(pixels).reduce(factor)) if over and factor > 1 else pixels
    definition = Preprocessing(32, MOBILENET, resizer="tensorflow")
    np.testing.assert_array_equal(definition.resize_pixels(pixels), _tf_resize(reduced, 32))


def test_the_pillow_resizer_never_box_reduces() -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (600, 640, 3), dtype=np.uint8)
    definition = Preprocessing(32, MOBILENET)
    np.testing.assert_array_equal(definition.resize_pixels(pixels), _pillow(pixels, 32))
    np.testing.assert_array_equal(definition.decode_array(pixels), _pillow(pixels, 32))


# --- batches ----------------------------------------------------------------------------------

def test_stack_keeps_one_shared_size_and_resizes_mixed_sizes() -> None:
    definition = Preprocessing(24, MOBILENET, resizer="tensorflow")
    empty = definition.stack([])
    assert empty.shape == (0, 24, 24, 3) and empty.dtype == np.uint8
    rng = np.random.default_rng(8)
    same = [rng.integers(0, 256, (30, 20, 3), dtype=np.uint8) for _ in range(3)]
    np.testing.assert_array_equal(definition.stack(same), np.stack(same))
    mixed = [same[0], rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)]
    np.testing.assert_array_equal(definition.stack(mixed),
                                  np.stack([_tf_resize(same[0], 24), mixed[1]]))


def test_batches_at_the_input_size_or_empty_are_returned_as_they_are() -> None:
    for resizer in ("pillow", "tensorflow"):
        definition = Preprocessing(8, MOBILENET, resizer=resizer)
        batch = np.zeros((2, 8, 8, 3), np.uint8)
        assert definition.resize_batch(batch) is batch
        empty = np.zeros((0, 5, 5, 3), np.uint8)
        assert definition.resize_batch(empty) is empty


def test_a_pillow_batch_is_pillows_resize_of_each_image() -> None:
    rng = np.random.default_rng(9)
    batch = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    definition = Preprocessing(12, MOBILENET, "bicubic")
    np.testing.assert_array_equal(definition.resize_batch(batch),
                                  np.stack([_pillow(image, 12, "bicubic") for image in batch]))


def test_unknown_image_sides_in_a_traced_function_are_resized_antialiased() -> None:
    import tensorflow as tf

    definition = Preprocessing(16, MOBILENET, resizer="tensorflow")
    board = ((np.indices((40, 40)).sum(axis=0) % 2) * 255).astype(np.uint8)
    pixels = np.repeat(board[..., None], 3, axis=2)[None]
    for spec in ([None, None, 40, 3], [None, 40, None, 3]):
        traced = tf.function(definition.resize_tensor,
                             input_signature=[tf.TensorSpec(spec, tf.float32)])
        resized = np.asarray(traced(tf.constant(pixels, tf.float32)))
        np.testing.assert_array_equal(resized, _tf_resize(pixels, 16))  # shrinking: antialiased


@pytest.mark.parametrize(("size", "interpolation"), [(64, "bilinear"), (48, "bicubic"),
                                                     (32, "bilinear"), (40, "lanczos")])
def test_enlarging_with_unknown_sides_is_the_plain_resize(size: int, interpolation: str) -> None:
    """`enlarge_tensor` (what the onnx runtime's graph traces for any image up to the input
    size) gives tf.image.resize's rounded, clipped values without antialiasing, the same size
    unchanged; `decode_bytes` is `decode_file` of the same bytes."""
    import tensorflow as tf

    definition = Preprocessing(size, MOBILENET, interpolation, resizer="tensorflow")
    paths = mini_files("train", "cat", 3)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    traced = tf.function(definition.enlarge_tensor,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    enlarged = np.asarray(traced(tf.constant(pixels, tf.float32)))
    np.testing.assert_array_equal(enlarged, _tf_resize(pixels, size, interpolation))
    for path in paths:
        np.testing.assert_array_equal(definition.decode_bytes(path.read_bytes()),
                                      definition.decode_file(path))


def test_resize_tensor_returns_input_size_tensors_untouched() -> None:
    import tensorflow as tf

    images = tf.zeros((1, 16, 16, 3))
    assert Preprocessing(16, MOBILENET, resizer="tensorflow").resize_tensor(images) is images


# --- to backbone inputs -----------------------------------------------------------------------

def test_apply_and_graph_inputs_are_mobilenets_scaling() -> None:
    """MobileNet's preprocess_input maps 0..255 to x / 127.5 - 1."""
    import tensorflow as tf

    rng = np.random.default_rng(10)
    batch = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    definition = Preprocessing(16, MOBILENET, resizer="tensorflow")
    applied = definition.apply(batch)
    assert applied.dtype == np.float32
    # computed in float32, as the graph does (in float64 then rounded, half the values differ)
    np.testing.assert_array_equal(applied, batch.astype(np.float32) / np.float32(127.5) - 1)
    small = batch[:, ::2, ::2]
    inputs = np.asarray(definition.graph_inputs(tf.constant(small)))
    np.testing.assert_allclose(inputs, _tf_resize(small, 16) / 127.5 - 1, rtol=1e-6, atol=1e-6)


def test_a_kerashub_converter_resizes_and_rescales_as_its_layer() -> None:
    import tensorflow as tf

    from extract.hub_support import load_keras_hub

    hub = load_keras_hub()
    import keras

    layer = hub.layers.ImageConverter(image_size=(12, 12), scale=1 / 255.0, offset=-0.5)
    definition = Preprocessing(12, "", resizer="keras_hub",
                               converter=keras.saving.serialize_keras_object(layer))
    rng = np.random.default_rng(11)
    batch = rng.integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    resized = np.clip(np.round(np.asarray(layer.resizing(batch), np.float32)), 0, 255)
    np.testing.assert_array_equal(definition.resize_batch(batch), resized.astype(np.uint8))
    inputs = np.asarray(definition.graph_inputs(tf.constant(batch)))
    np.testing.assert_allclose(inputs, resized / 255.0 - 0.5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(definition.apply(resized.astype(np.uint8)), resized / 255.0 - 0.5,
                               rtol=1e-5, atol=1e-6)
