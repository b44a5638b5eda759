"""The stored preprocessing: the in-graph resize of the extraction pass gives the same pixels and
features as one image at a time, shrinking is antialiased, and Pillow-era caches keep theirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.backbones import Weights, build_feature_model, get_backbone
from extract.forward import forward_function
from extract.pipeline import extract_features
from extract.preprocessing import MAX_BATCHED_PIXELS, Preprocessing
from store.store import Store
from tests.conftest import WEIGHTS
from tests.helpers import make_folder, make_plan, mini_files

MOBILENET = "keras.applications.mobilenet.preprocess_input"


@pytest.fixture(scope="module")
def model() -> object:
    return build_feature_model(get_backbone("mobilenet"), 0.25, Weights.parse(str(WEIGHTS)), 64,
                               "avg")


def test_a_batch_resized_in_the_graph_equals_images_resized_one_by_one(model: object) -> None:
    preprocessing = get_backbone("mobilenet").preprocessing(64)
    paths = mini_files("train", "cat", 5) + mini_files("test", "ship", 3)
    native = preprocessing.stack([preprocessing.decode_file(p) for p in paths])
    assert native.shape == (8, 32, 32, 3)  # batched at the images' own size
    one_by_one = np.stack([preprocessing.load_file(p) for p in paths])
    assert one_by_one.shape == (8, 64, 64, 3) and one_by_one.dtype == np.uint8
    np.testing.assert_array_equal(preprocessing.resize_batch(native), one_by_one)
    forward = forward_function(model, preprocessing)
    np.testing.assert_array_equal(forward(native), forward(one_by_one))
    # and the numpy preprocessing used by fine-tuning agrees with the graph's (to float32
    # rounding: Keras's predict path computes the convolutions in another order)
    direct = np.asarray(model.predict_on_batch(preprocessing.apply(one_by_one)))
    np.testing.assert_allclose(forward(native), direct, rtol=1e-3, atol=1e-4)


def test_images_of_mixed_sizes_are_resized_before_batching() -> None:
    preprocessing = Preprocessing(48, MOBILENET, resizer="tensorflow")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
              ((32, 32, 3), (40, 20, 3), (48, 48, 3))]
    batch = preprocessing.stack(images)
    assert batch.shape == (3, 48, 48, 3)
    for image, row in zip(images, batch):
        np.testing.assert_array_equal(row, preprocessing.resize_pixels(image))
    np.testing.assert_array_equal(batch[2], images[2])  # the input size already: untouched


def test_shrinking_is_antialiased_like_pillow() -> None:
    """A 1-pixel checkerboard shrunk 8x is flat grey when antialiased; aliasing would keep
    black and white pixels."""
    board = ((np.indices((256, 256)).sum(axis=0) % 2) * 255).astype(np.uint8)
    pixels = np.repeat(board[..., None], 3, axis=2)
    ours = Preprocessing(32, MOBILENET, resizer="tensorflow").load_array(pixels).astype(float)
    pillow = Preprocessing(32, MOBILENET, resizer="pillow").load_array(pixels).astype(float)
    assert ours.std() < 2 and abs(ours.mean() - 127.5) < 2
    assert np.abs(ours - pillow).max() <= 2


def test_large_images_are_resized_as_soon_as_they_are_decoded(tmp_path: Path) -> None:
    side = int(MAX_BATCHED_PIXELS ** 0.5) + 1
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), (10, 200, 30)).save(path)
    preprocessing = Preprocessing(32, MOBILENET, resizer="tensorflow")
    decoded = preprocessing.decode_file(path)
    assert decoded.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded, preprocessing.load_file(path))
    assert (decoded == (10, 200, 30)).all()


def test_definitions_without_a_resizer_are_pillow_ones() -> None:
    stored = {"image_size": 64, "preprocess_input": MOBILENET, "interpolation": "bilinear",
              "resize": "squash", "color": "RGB", "decoder": "pillow"}  # as format 1.2 wrote it
    old = Preprocessing.from_dict(stored)
    assert old.resizer == "pillow" and old.to_dict() == stored
    new = get_backbone("mobilenet").preprocessing(64)
    assert new.resizer == "tensorflow" and new.to_dict()["resizer"] == "tensorflow"
    assert Preprocessing.from_dict(new.to_dict()) == new
    path = mini_files("train", "cat", 1)[0]
    assert old.decode_file(path).shape == (64, 64, 3)  # Pillow resizes before batching
    with pytest.raises(ValueError, match="resizer"):
        Preprocessing(64, MOBILENET, resizer="opencv")


def test_a_pillow_plan_is_another_cache_with_its_own_pixels(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", {"cat": 6, "ship": 6})
    store = Store(tmp_path / "store")
    graph = extract_features(make_plan(folder), store, progress=False).cache
    pillow_plan = make_plan(folder, resizer="pillow")
    pillow = extract_features(pillow_plan, store, progress=False).cache
    assert pillow.fingerprint != graph.fingerprint
    assert Preprocessing.from_dict(pillow.preprocessing).resizer == "pillow"
    model = build_feature_model(get_backbone("mobilenet"), 0.25, Weights.parse(str(WEIGHTS)), 32,
                                "avg")
    ids = pillow.ids("train")
    pixels = np.stack([pillow_plan.preprocessing.load_file(folder / i) for i in ids])
    expected = np.asarray(model.predict_on_batch(pillow_plan.preprocessing.apply(pixels)))
    np.testing.assert_allclose(pillow.features("train"), expected, rtol=2e-3,
                               atol=2e-3 * np.abs(expected).max())


def test_interpolations_that_overshoot_are_clipped_to_pixel_values() -> None:
    edge = np.zeros((8, 8, 3), np.uint8)
    edge[:, 4:] = 255  # a hard edge: bicubic and lanczos ring past 0 and 255 around it
    for interpolation in ("bicubic", "lanczos", "bilinear"):
        resized = Preprocessing(32, MOBILENET, interpolation, resizer="tensorflow").resize_batch(
            edge[None]).astype(int)
        assert resized.min() == 0 and resized.max() == 255  # no wrap-around of -3 or 258
        assert (resized[:, :, :6] == 0).all() and (resized[:, :, -6:] == 255).all()


def test_very_large_images_are_box_reduced_before_the_resize() -> None:
    preprocessing = Preprocessing(32, MOBILENET, resizer="tensorflow")
    side = 32 * 2 * 9  # a factor-9 box reduce to 64 px, then the antialiased resize to 32
    rng = np.random.default_rng(1)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 9, 0), 9, 1)
    assert pixels.shape[0] == side and side * side > MAX_BATCHED_PIXELS
    expected = preprocessing.resize_batch(pixels[::9, ::9][None])[0]  # 9x9 blocks: box = block
    np.testing.assert_array_equal(preprocessing.resize_pixels(pixels), expected)


def test_many_image_sizes_share_a_few_traced_functions(model: object) -> None:
    from extract.forward import MAX_TRACED_SHAPES

    preprocessing = get_backbone("mobilenet").preprocessing(64)
    forward = forward_function(model, preprocessing)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, (2, 30 + i, 30 + i, 3), dtype=np.uint8) for i in range(7)]
    for batch in batches:  # sizes past the limit are resized first: the same features
        np.testing.assert_allclose(forward(batch), forward(preprocessing.resize_batch(batch)),
                                   rtol=1e-6, atol=1e-6)
    assert MAX_TRACED_SHAPES < len(batches)
