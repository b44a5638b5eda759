"""evaluate, predict, serve and export on real ensembles made by the `ensemble` command: every
method of one cache, and one across two caches (which export refuses). report: see
test_service_report.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classifiers.saved import load_saved_head
from store.store import Store
from tests.helpers import assert_clean_error, run_cli
from tests.service_support import ENSEMBLES, cache_test_images, ensemble_store

ONE_CACHE = [name for name in ENSEMBLES if name != "across"]


def cached_proba(head: str) -> np.ndarray:
    """The ensemble's test-split probabilities on the cached features."""
    store, first = ensemble_store()
    the_store = Store(store)
    return load_saved_head(the_store, the_store.find_cache(first), head).split_proba("test")


@pytest.mark.parametrize("head", ENSEMBLES)
def test_evaluate_reports_the_recorded_test_accuracy(head: str) -> None:
    store, first = ensemble_store()
    result = run_cli("evaluate", "--head", head, "--cache", first, "--json", "--store", str(store))
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout[result.stdout.index("["):])
    sidecar = next(store.glob(f"heads/{first}*/{head}.json"))
    assert report["kind"] == "ensemble"
    assert report["accuracy"] == pytest.approx(json.loads(sidecar.read_text())["metrics"]["test"]
                                               ["accuracy"])


@pytest.mark.parametrize("head", ["ensemble-stack", "across"])
def test_predict_on_images_matches_the_ensemble_on_cached_features(head: str) -> None:
    store, first = ensemble_store()
    paths = cache_test_images(24)
    result = run_cli("predict", *map(str, paths), "--head", head, "--cache", first, "--top", "1",
                     "--format", "json", "--store", str(store))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):result.stdout.rindex("]") + 1])
    cached = cached_proba(head)[:24]
    classes = Store(store).find_cache(first).class_names
    assert [classes.index(r["predictions"][0]["label"]) for r in rows] == \
        cached.argmax(axis=1).tolist()
    assert [r["predictions"][0]["probability"] for r in rows] == pytest.approx(
        cached.max(axis=1).tolist(), abs=1e-4)


def test_serve_answers_like_the_ensemble_on_cached_features() -> None:
    from fastapi.testclient import TestClient

    from endtoend.predict import open_predictor
    from service.app import create_app

    store, first = ensemble_store()
    the_store = Store(store)
    model = open_predictor(the_store, the_store.find_cache(first), "across")
    path = cache_test_images(1)[0]
    expected = cached_proba("across")[0]
    with TestClient(create_app(model)) as client:
        answer = client.post("/predict?top=1", content=path.read_bytes(),
                             headers={"content-type": "image/jpeg"})
        models = client.get("/models").json()["models"]
    assert answer.status_code == 200, answer.text
    top = answer.json()["predictions"][0]
    assert top["label"] == model.class_names[int(expected.argmax())]
    assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-4)
    assert models[0]["head"] == "across" and models[0]["kind"] == "ensemble"


@pytest.mark.parametrize("head", ONE_CACHE)
def test_export_of_a_one_cache_ensemble_equals_predict(head: str, tmp_path) -> None:
    from endtoend.export import split_pixels
    from endtoend.keras_heads import load_exported
    from endtoend.predict import open_predictor

    store, first = ensemble_store()
    formats = ["--format", "keras"] + (["--format", "tflite", "--quantize", "none"]
                                       if head == "ensemble-stack" else [])
    result = run_cli("export", "--head", head, "--cache", first, *formats, "--out", str(tmp_path),
                     "--store", str(store))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "export.json").read_text())
    assert all(v["agreement"] == 1.0 for v in summary["variants"]), summary
    the_store = Store(store)
    model = open_predictor(the_store, the_store.find_cache(first), head)
    pixels, _ = split_pixels(model, "test", 16)
    exported = np.asarray(load_exported(tmp_path / f"{head}.keras").predict(
        pixels.astype(np.float32), verbose=0))
    np.testing.assert_allclose(exported, model.proba(pixels), atol=1e-4)


def test_export_refuses_an_ensemble_across_caches_in_one_sentence(tmp_path) -> None:
    store, first = ensemble_store()
    result = run_cli("export", "--head", "across", "--cache", first, "--format", "keras",
                     "--out", str(tmp_path), "--store", str(store))
    assert_clean_error(result, "across", "2 caches", "single cache")
    assert not any(tmp_path.iterdir())
