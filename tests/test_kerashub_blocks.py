"""`extract --blocks N` on a KerasHub preset: the last N transformer layers, each through the
tower's final LayerNorm and pooled as --pooling says, side by side (the tiny 2-layer DINOv2 of
`tiny_preset`, on the mini set), and everything downstream of such a cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from store.store import Store
from tests.conftest import HUB_REGISTERS, MINI
from tests.helpers import assert_clean_error, interrupt_extraction, make_folder, run_cli
from tests.kerashub_support import make_tiny_preset, make_tiny_tower

COLUMNS = [("layers_0", 0, 64), ("layers_1", 64, 128)]  # cls+mean of width 32, twice


def extract_args(preset: Path, store: Path, *extra: str) -> list[str]:
    return ["extract", str(MINI), "--backbone", f"preset:{preset}", "--pooling", "cls+mean",
            "--dtype", "float32", "--blocks", "2", "--quiet", "--store", str(store), *extra]


@pytest.fixture(scope="module")
def hub_blocks_store(tmp_path_factory: pytest.TempPathFactory, tiny_preset: Path) -> Path:
    """The mini set, 2 blocks of the tiny preset; a logreg on both blocks and one on the last."""
    store = tmp_path_factory.mktemp("hub-blocks-store")
    for args in (extract_args(tiny_preset, store),
                 ["fit", "--head", "logreg", "--store", str(store)],
                 ["fit", "--head", "logreg", "--name", "last", "--use-blocks", "1",
                  "--store", str(store)]):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    return store


def layer_outputs(preset: Path, images: np.ndarray) -> list[np.ndarray]:
    """Each transformer layer's output, computed eagerly with KerasHub's own layers: the
    converter, the embeddings, then the encoder's layers one by one (DINOv3's with its rotary
    position embeddings and its count of class and register tokens)."""
    from extract.kerashub import load_keras_hub

    hub = load_keras_hub()
    backbone = hub.models.Backbone.from_preset(str(preset))
    converter = hub.layers.ImageConverter.from_preset(str(preset))
    pixels = converter(images)
    x = backbone.embeddings(pixels)
    rope = getattr(backbone, "rope_embedding", None)
    extra = {} if rope is None else {"position_embeddings": rope(pixels),
                                     "num_prefix_tokens": 1 + backbone.num_register_tokens}
    outputs = []
    for layer in backbone.encoder.layers:
        x = layer(x, **extra)
        outputs.append(np.asarray(backbone.layernorm(x)))  # the final norm, as DINOv2 eval does
    return outputs


def test_hub_blocks_are_the_pooled_normed_transformer_layers(hub_blocks_store: Path,
                                                             hub_store: Path,
                                                             tiny_preset: Path) -> None:
    from extract.rebuild import cache_preprocessing

    cache = Store(hub_blocks_store).find_cache()
    assert cache.blocks == COLUMNS and cache.inputs["blocks"] == 2
    assert cache.inputs["pooling"] == "cls+mean"
    ids = cache.ids("train")[:32]
    decoded = cache_preprocessing(cache)
    images = np.stack([decoded.decode_file(MINI / i) for i in ids])
    features = cache.features("train")[:32]
    for (name, start, stop), tokens in zip(COLUMNS, layer_outputs(tiny_preset, images)):
        expected = np.concatenate([tokens[:, 0], tokens[:, 1 + HUB_REGISTERS:].mean(axis=1)], 1)
        np.testing.assert_allclose(features[:, start:stop], expected, rtol=1e-4, atol=1e-4)
    # the last block is today's one-block cache, bit for bit
    single = Store(hub_store).find_cache()
    assert single.blocks == [("output", 0, 64)] and "blocks" not in single.inputs
    for split in ("train", "test"):
        np.testing.assert_array_equal(cache.features(split)[:, 64:], single.features(split))


def test_hub_blocks_one_keeps_todays_fingerprint(hub_store: Path, tiny_preset: Path) -> None:
    from extract.settings import ExtractSettings

    def plan(**changes: Any) -> Any:
        return ExtractSettings(str(MINI), f"preset:{tiny_preset}", pooling="cls+mean",
                               dtype="float32", **changes).plan()

    single = Store(hub_store).find_cache()
    assert plan().fingerprint == plan(blocks=1).fingerprint == single.fingerprint
    assert "blocks" not in plan(blocks=1).inputs
    assert plan(blocks=2).fingerprint != single.fingerprint


def test_hub_blocks_predict_and_export_give_the_cached_answers(hub_blocks_store: Path,
                                                               tmp_path: Path) -> None:
    from endtoend.export import split_pixels
    from endtoend.keras_heads import load_exported
    from endtoend.predict import open_predictor, predict_files

    store = Store(hub_blocks_store)
    cache = store.find_cache()
    paths = [MINI / i for i in cache.ids("test")[:40]]
    for head in ("logreg", "last"):
        model = open_predictor(store, cache, head)
        answers = list(predict_files(model, paths, top=1, batch_size=16))
        cached = model.estimator.predict_proba(
            cache.features("test")[:40] if head == "logreg" else cache.features("test")[:40, 64:])
        assert [model.class_names.index(a.top[0]["label"]) for a in answers] == \
            cached.argmax(axis=1).tolist()
        assert [a.top[0]["probability"] for a in answers] == pytest.approx(
            cached.max(axis=1).tolist(), abs=1e-5)
    result = run_cli("export", "--head", "last", "--format", "keras", "--out", str(tmp_path),
                     "--store", str(hub_blocks_store))
    assert result.exit_code == 0, result.output
    model = open_predictor(store, cache, "last")
    pixels, _ = split_pixels(model, "test", limit=40)
    got = np.asarray(load_exported(tmp_path / "last.keras").predict(
        pixels.astype(np.float32), verbose=0))
    np.testing.assert_allclose(got, model.estimator.predict_proba(cache.features("test")[:40, 64:]),
                               atol=1e-4)


def test_hub_blocks_resume_after_ctrl_c(hub_blocks_store: Path, tiny_preset: Path,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    restore = interrupt_extraction(monkeypatch)  # warm-up, two batches, then Ctrl-C
    args = extract_args(tiny_preset, tmp_path / "store", "--batch-size", "32")
    assert run_cli(*args).exit_code == 130
    restore()
    result = run_cli(*args)
    assert result.exit_code == 0 and "Extracted 536 images" in result.output, result.output
    resumed = Store(tmp_path / "store").find_cache()
    reference = Store(hub_blocks_store).find_cache()
    assert (resumed.fingerprint, resumed.blocks) == (reference.fingerprint, reference.blocks)
    for split in ("train", "test"):
        np.testing.assert_array_equal(resumed.features(split), reference.features(split))


def test_hub_blocks_beyond_the_transformer_layers_are_one_sentence(tiny_preset: Path,
                                                                   tmp_path: Path) -> None:
    args = extract_args(tiny_preset, tmp_path / "store")
    args[args.index("--blocks") + 1] = "3"
    assert_clean_error(run_cli(*args), "--blocks must be between 1 and 2",
                       "transformer layers")
    assert not list((tmp_path / "store").glob("caches/*.h5"))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_hub_blocks_of_image_towers(kind: str, tmp_path: Path) -> None:
    """SigLIP (its post-norm and attention-pooling head on every block) and CLIP (its final norm,
    then the class token) image towers: the first block against KerasHub's layers run eagerly,
    the last block against the one-block model, bit for bit."""
    from extract.backbones import Weights
    from extract.kerashub import build_hub_feature_model, preset_backbone
    from extract.multiblock import multiblock_model

    tower, _ = make_tiny_tower(kind, tmp_path, layers=2)
    backbone = preset_backbone(str(tmp_path))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    inputs = backbone.preprocessing(16).apply(pixels)
    x = tower.embedding(inputs)
    x = tower.encoder_layers[0](x if kind == "siglip" else tower.pre_layer_norm(x))
    normed = np.asarray(tower.post_layer_norm(x) if kind == "siglip" else tower.layer_norm(x))
    summary = np.asarray(tower.head(normed)) if kind == "siglip" else normed[:, 0]
    mean = normed.mean(axis=1) if kind == "siglip" else normed[:, 1:].mean(axis=1)
    for pooling, first in (("cls", summary), ("cls+mean", np.concatenate([summary, mean], 1))):
        single = build_hub_feature_model(backbone, Weights("preset", tmp_path), 16, pooling)
        model, columns = multiblock_model(single, 2, pooling)
        width = first.shape[1]
        assert [c.to_list() for c in columns] == [["encoder_block_0", 0, width],
                                                  ["encoder_block_1", width, 2 * width]]
        both = np.asarray(model(inputs))
        np.testing.assert_allclose(both[:, :width], first, atol=1e-5)
        np.testing.assert_array_equal(both[:, width:], np.asarray(single(inputs)))


def test_hub_blocks_finetune_refreshes_a_cache_of_the_same_blocks(hub_blocks_store: Path,
                                                                  tmp_path: Path) -> None:
    """`finetune --unfreeze 1` on a 2-block preset cache: the refreshed cache has the parent's
    blocks (names and widths), from the fine-tuned preset folder, and another fingerprint."""
    from extract.rebuild import cache_weights
    from tests.helpers import copy_store

    store = copy_store(hub_blocks_store, tmp_path)  # the refreshed cache would be the newest
    parent = Store(store).find_cache()
    for args in (["fit", "--head", "mlp", "--name", "tuned", "-p", "epochs=1", "--quiet"],
                 ["finetune", "--head", "tuned", "--unfreeze", "1", "--epochs", "1",
                  "--batch-size", "64", "--quiet"]):
        result = run_cli(*args, "--store", str(store))
        assert result.exit_code == 0, result.output
    refreshed = Store(store).find_cache()
    assert refreshed.fingerprint != parent.fingerprint
    assert refreshed.lineage["parent"] == parent.fingerprint
    assert refreshed.blocks == parent.blocks == COLUMNS
    assert refreshed.inputs["blocks"] == 2 and refreshed.inputs["pooling"] == "cls+mean"
    # only the last transformer layer learnt: the first block's columns are the parent's
    for split in ("train", "test"):
        np.testing.assert_allclose(refreshed.features(split)[:, :64],
                                   parent.features(split)[:, :64], rtol=1e-5, atol=1e-5)
        assert not np.allclose(refreshed.features(split)[:, 64:], parent.features(split)[:, 64:])
    saved = cache_weights(refreshed)
    assert saved.source == "preset" and (saved.path / "config.json").is_file()


def test_hub_blocks_of_a_dinov3_preset(tmp_path: Path) -> None:
    """A tiny DINOv3 (2 layers, width 32, 4 register tokens, rotary position embeddings) saved
    with KerasHub's preset saving: each block of `--blocks 2 --pooling cls+mean` is its
    transformer layer's output through the final LayerNorm, computed eagerly, and the last is
    the one-block cache's vector."""
    pytest.importorskip("keras_hub")
    from extract.kerashub import load_keras_hub
    from extract.rebuild import cache_preprocessing

    if not hasattr(load_keras_hub().models, "DINOV3Backbone"):
        pytest.skip("this KerasHub has no DINOv3")
    preset = make_tiny_preset(tmp_path / "tiny-dinov3", registers=4, version=3)
    data = tmp_path / "data"
    for split in ("train", "test"):
        make_folder(data, {"airplane": 6, "cat": 6}, split)
    args = extract_args(preset, tmp_path / "store")
    args[1] = str(data)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    cache = Store(tmp_path / "store").find_cache()
    assert cache.blocks == COLUMNS and cache.inputs["blocks"] == 2
    ids = cache.ids("train")
    decoded = cache_preprocessing(cache)
    images = np.stack([decoded.decode_file(data / i) for i in ids])
    features = cache.features("train")
    for (name, start, stop), tokens in zip(COLUMNS, layer_outputs(preset, images)):
        expected = np.concatenate([tokens[:, 0], tokens[:, 1 + 4:].mean(axis=1)], 1)
        np.testing.assert_allclose(features[:, start:stop], expected, rtol=1e-4, atol=1e-4)
    # the last block is the one-block cache (DINOv3's input is `pixel_values`, not `images`)
    single_args = [a for a in args if a not in ("--blocks", "2")]
    single_args[single_args.index("--store") + 1] = str(tmp_path / "single")
    result = run_cli(*single_args)
    assert result.exit_code == 0, result.output
    single = Store(tmp_path / "single").find_cache()
    assert single.blocks == [("output", 0, 64)]
    np.testing.assert_array_equal(features[:, 64:], single.features("train"))


@pytest.mark.parametrize("blocks", ["1", "2"])
def test_a_preset_on_the_onnx_runtime_gives_tensorflows_features(
        blocks: str, tiny_preset: Path, hub_blocks_store: Path, tmp_path: Path) -> None:
    """tf2onnx writes the towers' exact GELU (TensorFlow's Erfc) as 1 - Erf, which ONNX Runtime
    runs: the onnx cache of the tiny DINOv2 preset has the tf cache's features (within float
    error), and its head answers in predict as on the cached rows."""
    pytest.importorskip("onnxruntime")
    from endtoend.predict import open_predictor, predict_files

    store = tmp_path / "store"
    args = extract_args(tiny_preset, store, "--runtime", "onnx")
    args[args.index("--blocks") + 1] = blocks
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert len(list((store / "runtimes").glob("*.onnx"))) == 1
    cache, reference = Store(store).find_cache(), Store(hub_blocks_store).find_cache()
    assert cache.inputs["runtime"] == "onnx" and cache.blocks == (
        COLUMNS if blocks == "2" else [("output", 0, 64)])
    for split in ("train", "test"):
        expected = reference.features(split)[:, -64:] if blocks == "1" else \
            reference.features(split)
        np.testing.assert_allclose(cache.features(split), expected, rtol=0, atol=1e-4)
    assert run_cli("fit", "--head", "logreg", "--store", str(store)).exit_code == 0
    model = open_predictor(Store(store), cache, "logreg")
    paths = [Path(cache.source["path"]) / i for i in cache.ids("test")[:20]]
    answers = list(predict_files(model, paths, top=1))
    assert [a.top[0]["probability"] for a in answers] == pytest.approx(
        model.estimator.predict_proba(cache.features("test")[:20]).max(axis=1).tolist(),
        abs=1e-5)


def test_dinov3_on_onnx_and_a_backbone_that_cannot_convert(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """DINOv3's rotary embedding captures tensors outside its variables, which tf2onnx leaves
    as graph inputs: they become constants of the graph, and the onnx cache has the tf cache's
    features. A conversion that fails is one sentence, with nothing left behind."""
    pytest.importorskip("onnxruntime")
    import tf2onnx

    preset = make_tiny_preset(tmp_path / "tiny-dinov3", version=3, registers=4)
    features = {}
    for runtime in ("tf", "onnx"):
        store = tmp_path / runtime
        assert run_cli(*extract_args(preset, store, "--runtime", runtime)).exit_code == 0
        features[runtime] = Store(store).find_cache().features("train")
    np.testing.assert_allclose(features["onnx"], features["tf"], rtol=0, atol=1e-4)

    def fails(*_, **__):
        raise RuntimeError("Unsupported op Frobnicate\nand a long trace")

    monkeypatch.setattr(tf2onnx.convert, "from_function", fails)
    store = tmp_path / "refused"
    args = extract_args(make_tiny_preset(tmp_path / "other", seed=3), store, "--runtime", "onnx")
    assert_clean_error(run_cli(*args), "Cannot convert backbone", "Unsupported op Frobnicate",
                       "--runtime tf")
    assert not list(store.glob("caches/*.h5")) and not list(store.glob("caches/*.partial"))
    assert not list(store.glob("runtimes/*"))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_siglip_and_clip_towers_convert_to_onnx_with_tensorflows_features(
        kind: str, tmp_path: Path) -> None:
    """The SigLIP and CLIP towers (exact GELU and, for SigLIP, its attention-pooling head)
    through the onnx runtime's conversion: TensorFlow's features within float error."""
    pytest.importorskip("onnxruntime")
    from extract.backbones import Weights
    from extract.forward import forward_function
    from extract.kerashub import build_hub_feature_model, preset_backbone
    from extract.multiblock import multiblock_model
    from extract.onnx_runtime import convert, onnx_forward_function, session

    make_tiny_tower(kind, tmp_path, layers=2)
    backbone = preset_backbone(str(tmp_path))
    preprocessing = backbone.preprocessing(16)
    single = build_hub_feature_model(backbone, Weights("preset", tmp_path), 16, "cls+mean")
    pixels = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    for model in (single, multiblock_model(single, 2, "cls+mean")[0]):
        onnx = onnx_forward_function(session(convert(model, preprocessing)), preprocessing)
        expected = forward_function(model, preprocessing)(pixels)
        np.testing.assert_allclose(onnx(pixels), expected, rtol=0, atol=1e-5)
