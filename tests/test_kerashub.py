"""KerasHub backbones: a tiny random DINOv2 preset, made and saved with KerasHub's own classes,
goes the way a downloaded preset goes (extract, fit, evaluate, predict, list, resume,
fingerprint), offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.conftest import HUB_REGISTERS, MINI, ROOT
from tests.helpers import assert_clean_error, interrupt_extraction, run_cli
from tests.kerashub_support import make_tiny_preset, make_tiny_tower
from store.errors import HeadstartError
from store.store import Store

REGISTERS = HUB_REGISTERS  # the tiny preset has registers, so pooling must skip them


def plan_of(preset: Path, **changes: Any) -> Any:
    from extract.settings import ExtractSettings

    return ExtractSettings(str(MINI), f"preset:{preset}", **changes).plan()


def test_registry_lists_kerashub_presets_without_importing_keras_hub() -> None:
    code = ("import sys; sys.argv = ['cli.py', 'backbones']; import cli\n"
            "try:\n    cli.app()\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', 'keras_hub' in sys.modules, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED False False" in done.stdout
    for name in ("dinov2_small", "dinov2_with_registers_large", "dinov3_base", "siglip2_base",
                 "clip_base", "efficientnet_v2_s", "mobilenet"):
        assert name in done.stdout
    assert "KerasHub preset dinov2_small" in done.stdout and done.stderr == ""

    from extract.backbones import get_backbone

    small = get_backbone("dinov2_small")
    assert (small.native_size, small.patch_size, small.width) == (224, 14, 384)
    assert small.default_pooling == "cls+mean" and "cls" in small.poolings
    assert get_backbone("preset:dinov2_small") is small  # a built-in preset name, same entry


def test_features_equal_the_backbone_on_the_converters_output(
        hub_store: Path, tiny_preset: Path) -> None:
    """Headstart's in-graph resize + rescale + pooling = KerasHub's converter and backbone."""
    from extract.kerashub import load_keras_hub
    from extract.rebuild import cache_preprocessing

    hub = load_keras_hub()
    cache = Store(hub_store).find_cache()
    assert cache.preprocessing["resizer"] == "keras_hub"
    assert cache.preprocessing["converter"]["class_name"] == "DINOV2ImageConverter"
    backbone = hub.models.Backbone.from_preset(str(tiny_preset))
    converter = hub.layers.ImageConverter.from_preset(str(tiny_preset))
    ids = cache.ids("train")[:48]
    decoded = cache_preprocessing(cache)  # headstart's JPEG decoding; nothing resized
    images = np.stack([decoded.decode_file(MINI / i) for i in ids])
    assert images.shape[1:] == (32, 32, 3)  # resized to 28 by the converter
    tokens = np.asarray(backbone({"images": converter(images)}))
    assert tokens.shape == (48, 1 + REGISTERS + 49, 32)
    expected = np.concatenate([tokens[:, 0], tokens[:, 1 + REGISTERS:].mean(axis=1)], axis=1)
    np.testing.assert_allclose(cache.features("train")[:48], expected, rtol=1e-5, atol=1e-5)


def test_fit_evaluate_predict_list_work_on_a_preset_cache(hub_store: Path) -> None:
    from endtoend.predict import open_predictor as Predictor, predict_files

    store = Store(hub_store)
    cache = store.find_cache()
    result = run_cli("evaluate", "--store", str(hub_store))
    assert result.exit_code == 0 and "logreg" in result.output and "mlp" in result.output
    listing = json.loads(run_cli("list", "--json", "--store", str(hub_store)).output)
    assert listing["caches"][0]["backbone"] == "preset:tiny-dinov2"
    for head in ("logreg", "mlp"):
        model = Predictor(store, cache, head)
        paths = [Path(cache.source["path"]) / i for i in cache.ids("test")[:60]]
        answers = list(predict_files(model, paths, top=1, batch_size=25))
        predicted = [model.class_names.index(a.top[0]["label"]) for a in answers]
        assert predicted == model.estimator.predict(cache.features("test")[:60]).tolist()
        cached = model.estimator.predict_proba(cache.features("test")[:5]).max(axis=1)
        assert [a.top[0]["probability"] for a in answers[:5]] == pytest.approx(
            cached.tolist(), abs=1e-5)


def test_fingerprint_is_the_presets_files_not_its_name(tiny_preset: Path,
                                                       tmp_path: Path) -> None:
    same = tmp_path / "elsewhere" / tiny_preset.name
    shutil.copytree(tiny_preset, same)
    changed = tmp_path / "changed" / tiny_preset.name
    shutil.copytree(tiny_preset, changed)
    with h5py.File(changed / "model.weights.h5", "r+") as weights:
        names: list[str] = []
        weights.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        data = weights[names[-1]]
        values = data[()]
        values.flat[0] += 1e-3  # one weight
        data[...] = values
    reference = plan_of(tiny_preset).fingerprint
    assert plan_of(same).fingerprint == reference
    assert plan_of(changed).fingerprint != reference
    assert plan_of(tiny_preset, image_size=32).fingerprint != reference
    assert plan_of(tiny_preset, pooling="mean").fingerprint != reference


def test_a_moved_or_changed_preset_is_refused_in_one_sentence(hub_store: Path, tiny_preset: Path,
                                                             tmp_path: Path) -> None:
    from extract.rebuild import cache_weights

    cache = Store(hub_store).find_cache()
    assert cache_weights(cache).path == tiny_preset.resolve()
    other = make_tiny_preset(tmp_path / "other", seed=1)
    image = MINI / cache.ids("test")[0]
    assert_clean_error(run_cli("predict", str(image), "--head", "logreg", "--weights", str(other),
                               "--store", str(hub_store)), "not the one cache")
    assert_clean_error(run_cli("predict", str(image), "--head", "logreg", "--weights",
                               str(tmp_path / "gone"), "--store", str(hub_store)), "gone")


def test_ctrl_c_then_resume_gives_the_same_cache(hub_store: Path, tiny_preset: Path,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    restore = interrupt_extraction(monkeypatch)  # warm-up, two batches, then Ctrl-C
    store = tmp_path / "store"
    args = ["extract", str(MINI), "--backbone", f"preset:{tiny_preset}", "--pooling", "cls+mean",
            "--dtype", "float32", "--batch-size", "32", "--quiet", "--store", str(store)]
    result = run_cli(*args)
    assert result.exit_code == 130 and "run the same command again" in result.output
    restore()
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "Extracted 536 images" in result.output  # 64 rows were kept
    resumed, reference = Store(store).find_cache(), Store(hub_store).find_cache()
    assert resumed.fingerprint == reference.fingerprint
    for split in ("train", "test"):
        np.testing.assert_array_equal(resumed.features(split), reference.features(split))


BAD = {
    "size not a multiple of the patch": (["--image-size", "30"], "multiple of"),
    "cnn pooling on a transformer": (["--pooling", "avg"], "cls, mean, cls+mean"),
    "weights beside a preset": (["--weights", "none"], "carries its own weights"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_preset_options_are_one_sentence(case: str, tiny_preset: Path,
                                             tmp_path: Path) -> None:
    extra, fragment = BAD[case]
    result = run_cli("extract", str(MINI), "--backbone", f"preset:{tiny_preset}", *extra,
                     "--store", str(tmp_path))
    assert_clean_error(result, fragment)


def test_bad_backbones_are_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def extract(*args: str) -> Any:
        return run_cli("extract", str(MINI), *args, "--store", str(tmp_path / "store"))

    assert_clean_error(extract("--backbone", "mobilenet", "--pooling", "cls"), "avg, max")
    assert_clean_error(extract("--backbone", f"preset:{tmp_path / 'nothing'}"), "no preset folder")
    (tmp_path / "empty").mkdir()
    assert_clean_error(extract("--backbone", f"preset:{tmp_path / 'empty'}"), "not a KerasHub")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({
        "class_name": "DINOV2Backbone", "config": {"patch_size": 4, "hidden_dim": 8}}))
    assert_clean_error(extract("--backbone", f"preset:{tmp_path / 'bare'}"), "image converter")

    # offline: a named preset's download fails in one sentence naming the way out
    from extract.kerashub import load_keras_hub
    from keras_hub.src.utils import preset_utils

    load_keras_hub()

    def offline(preset: str, path: str) -> str:
        raise OSError("HTTPSConnectionPool: Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(preset_utils, "get_file", offline)
    sentence = assert_clean_error(extract("--backbone", "dinov2_small"), "no network",
                                  "--backbone preset:DIR")
    assert "dinov2_small" in sentence


def test_export_keras_holds_the_converter_and_matches_the_cache(hub_store: Path,
                                                                tmp_path: Path) -> None:
    from endtoend.export import split_pixels
    from endtoend.keras_heads import load_exported
    from endtoend.predict import open_predictor as Predictor

    result = run_cli("export", "--head", "logreg", "--format", "keras", "--out", str(tmp_path),
                     "--store", str(hub_store))
    assert result.exit_code == 0, result.output
    store = Store(hub_store)
    cache = store.find_cache()
    pixels, _ = split_pixels(Predictor(store, cache, "logreg"), "test", limit=40)
    model = load_exported(tmp_path / "logreg.keras")
    assert any("Converter" in type(layer).__name__ for layer in model.layers)
    got = np.asarray(model.predict(pixels.astype(np.float32), verbose=0))
    want = Predictor(store, cache, "logreg").estimator.predict_proba(cache.features("test")[:40])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_finetune_trains_the_last_transformer_layers_and_refreshes_the_cache(
        hub_store: Path, tmp_path: Path) -> None:
    from endtoend.finetune import FinetuneSettings, finetune
    from extract.blocks import unfreeze_top
    from extract.rebuild import cache_feature_model, cache_weights
    from tests.helpers import copy_store

    store = Store(copy_store(hub_store, tmp_path))  # the refreshed cache would be the newest
    parent = store.find_cache()
    model = cache_feature_model(parent, cache_weights(parent))
    assert unfreeze_top(model, 1) == ["layers_1"]  # the last of 2 transformer layers
    trainable = [w.path for w in model.trainable_weights]
    assert trainable and all("/layers_1/" in p and "norm" not in p for p in trainable)

    result = finetune(store, parent, "mlp", FinetuneSettings(unfreeze=1, epochs=1), verbose=0)
    refreshed = result.cache
    assert refreshed.fingerprint != parent.fingerprint
    assert refreshed.lineage["parent"] == parent.fingerprint
    assert refreshed.preprocessing == parent.preprocessing  # the same converter
    saved = Path(result.record["weights"])
    assert (saved / "config.json").is_file() and (saved / "image_converter.json").is_file()
    assert not np.allclose(refreshed.features("train"), parent.features("train"))
    # the refreshed cache rebuilds from its preset folder (predict, serve)
    assert cache_weights(refreshed).path == saved.resolve()


def test_serve_answers_as_the_cache_does(hub_store: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from endtoend.predict import open_predictor as Predictor
    from service.app import ServiceSettings, create_app

    store = Store(hub_store)
    cache = store.find_cache()
    model = Predictor(store, cache, "logreg")
    path = Path(cache.source["path"]) / cache.ids("test")[0]
    with TestClient(create_app(model, ServiceSettings())) as client:
        answer = client.post("/predict?top=1", content=path.read_bytes(),
                             headers={"content-type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
        assert client.get("/models").json()["models"][0]["backbone"] == "preset:tiny-dinov2"
    cached = model.estimator.predict_proba(cache.features("test")[:1])[0]
    top = answer.json()["predictions"][0]
    assert top["label"] == cache.class_names[int(cached.argmax())]
    assert top["probability"] == pytest.approx(float(cached.max()), abs=1e-5)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_image_towers_pool_their_own_tokens(kind: str, tmp_path: Path) -> None:
    """SigLIP (no class token: cls is its attention-pooling head) and CLIP (class token first)
    image towers, saved as presets, pool as their outputs say."""
    from extract.backbones import Weights
    from extract.kerashub import build_hub_feature_model, preset_backbone

    tower, converter = make_tiny_tower(kind, tmp_path)
    backbone = preset_backbone(str(tmp_path))
    assert (backbone.patch_size, backbone.width, backbone.native_size) == (4, 16, 16)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    inputs = backbone.preprocessing(16).apply(pixels)
    np.testing.assert_allclose(inputs, np.asarray(converter(pixels)), atol=1e-6)
    pooled = {p: np.asarray(build_hub_feature_model(backbone, Weights("preset", tmp_path), 16,
                                                    p)(inputs)) for p in ("cls", "cls+mean")}
    output = np.asarray(tower({"images": inputs}))
    if kind == "siglip":  # the head's pooled vector
        np.testing.assert_allclose(pooled["cls"], output, atol=1e-5)
    else:  # class token, then 16 patch tokens
        np.testing.assert_allclose(pooled["cls"], output[:, 0], atol=1e-5)
        np.testing.assert_allclose(pooled["cls+mean"][:, 16:], output[:, 1:].mean(axis=1),
                                   atol=1e-5)
    assert pooled["cls+mean"].shape == (3, 32)
    with pytest.raises(HeadstartError, match="its own size only"):
        backbone.check(None, 32, "cls")
