"""Fitted heads on disk: sidecars, round trips, and the refusals that protect them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classifiers.saved import load_saved_head
from classifiers.training import evaluate_heads
from classifiers.validation import validation_mask
from tests.helpers import assert_clean_error, copy_store, held_out_by_hand, run_cli, snapshot
from store.errors import HeadstartError
from store.fingerprint import digest_file
from store.heads import list_heads, load_head_record
from store.store import Store


@pytest.fixture()
def heads_store(fitted_store: tuple[Path, dict], tmp_path: Path) -> Store:
    """A private copy of the store with both heads fitted."""
    return Store(copy_store(fitted_store[0], tmp_path))


def _sidecar(store: Store, name: str) -> Path:
    return store.head_dir(store.find_cache()) / f"{name}.json"


@pytest.mark.parametrize("name, suffix", [("logreg", ".skops"), ("mlp", ".keras")])
def test_sidecar_records_the_cache_the_file_and_the_metrics(heads_store: Store, name: str,
                                                            suffix: str) -> None:
    cache = heads_store.find_cache()
    record = json.loads(_sidecar(heads_store, name).read_text())
    model = _sidecar(heads_store, name).parent / record["file"]
    assert model.suffix == suffix and model.is_file()
    assert record["sha256"] == digest_file(model)
    assert record["cache"] == cache.fingerprint and record["kind"] == name
    assert record["classes"] == cache.class_names
    assert record["rows"]["train"] + record["rows"]["validation"] == 400
    assert record["rows"]["validation"] == sum(map(held_out_by_hand, cache.ids("train"))) > 0
    assert set(record["metrics"]) == {"validation", "test"}
    assert {"accuracy", "top5_accuracy"} <= set(record["metrics"]["test"])
    assert record["fit_seconds"] > 0
    if name == "mlp":
        assert record["options"]["epochs"] == 3 and record["options"]["hidden"] == [256]


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_loaded_head_reproduces_its_recorded_test_accuracy(heads_store: Store, name: str) -> None:
    cache = heads_store.find_cache()
    head = load_saved_head(heads_store, cache, name)
    estimator, record = head.estimator, head.record
    predicted = estimator.predict(cache.features("test"))
    accuracy = float(np.mean(predicted == cache.labels("test")))
    assert accuracy == pytest.approx(record["metrics"]["test"]["accuracy"])
    assert accuracy > 0.25  # ten classes: chance is 0.1
    (report,) = evaluate_heads(heads_store, cache, [name])
    assert report["accuracy"] == pytest.approx(accuracy)


def test_a_head_of_another_cache_is_refused(heads_store: Store) -> None:
    sidecar = _sidecar(heads_store, "logreg")
    record = json.loads(sidecar.read_text())
    record["cache"] = "ab" * 32
    sidecar.write_text(json.dumps(record))
    with pytest.raises(HeadstartError, match="was fitted on cache abababababab"):
        load_head_record(heads_store, heads_store.find_cache(), "logreg")
    before = snapshot(heads_store.root)
    result = run_cli("evaluate", "--head", "logreg", "--store", str(heads_store.root))
    assert_clean_error(result, "fitted on cache abababababab", "fit it again")
    assert snapshot(heads_store.root) == before


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_a_model_file_that_does_not_match_its_digest_is_never_loaded(
        heads_store: Store, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import joblib
    import keras

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model file was loaded before its digest was checked")

    monkeypatch.setattr(joblib, "load", never)
    monkeypatch.setattr(keras.saving, "load_model", never)
    record = json.loads(_sidecar(heads_store, name).read_text())
    model = _sidecar(heads_store, name).parent / record["file"]
    with model.open("ab") as handle:
        handle.write(b"\0")
    result = run_cli("evaluate", "--head", name, "--store", str(heads_store.root))
    assert_clean_error(result, "does not match its recorded SHA-256", "refusing to load")
    model.unlink()
    result = run_cli("evaluate", "--head", name, "--store", str(heads_store.root))
    assert_clean_error(result, "missing or does not match")


def test_refitting_replaces_the_model_file(heads_store: Store) -> None:
    directory = _sidecar(heads_store, "mlp").parent
    old = json.loads(_sidecar(heads_store, "mlp").read_text())["file"]
    result = run_cli("fit", "--head", "mlp", "-p", "epochs=1", "-p", "hidden=32", "--quiet",
                     "--replace", "--store", str(heads_store.root))  # asked: see test_nothing_lost
    assert result.exit_code == 0, result.output
    new = json.loads(_sidecar(heads_store, "mlp").read_text())
    assert new["options"]["hidden"] == [32] and new["file"] != old
    assert not (directory / old).exists() and (directory / new["file"]).is_file()
    assert sorted(r["name"] for r in list_heads(heads_store)) == ["logreg", "mlp"]


def test_a_second_name_keeps_both_heads(heads_store: Store) -> None:
    result = run_cli("fit", "--head", "logreg", "--name", "logreg-strong", "-p", "C=0.1",
                     "--store", str(heads_store.root))
    assert result.exit_code == 0, result.output
    names = [r["name"] for r in list_heads(heads_store)]
    assert sorted(names) == ["logreg", "logreg-strong", "mlp"]
    reports = evaluate_heads(heads_store, heads_store.find_cache())
    assert [r["head"] for r in reports] == names


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x" * 65])
def test_head_names_that_are_not_file_names_are_refused(heads_store: Store, name: str) -> None:
    before = snapshot(heads_store.root)
    result = run_cli("fit", "--head", "logreg", "--name", name, "--store", str(heads_store.root))
    assert_clean_error(result, "is not allowed")
    assert snapshot(heads_store.root) == before


def test_heads_fit_on_a_training_split_too_small_for_validation_rows(tmp_path: Path) -> None:
    """Ten training images whose ids hash no row into validation: both heads still fit."""
    import shutil

    from tests.conftest import MINI_ARGS
    from tests.helpers import mini_files

    root = tmp_path / "tiny"
    chosen = 0
    for k in range(200):  # names that fall outside the validation hash
        class_name = ("cat", "dog")[chosen % 2]
        sample_id = f"train/{class_name}/img{k}.jpg"
        if validation_mask(np.array([sample_id])).any():
            continue
        (root / "train" / class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(mini_files("train", class_name, 5)[chosen // 2], root / sample_id)
        chosen += 1
        if chosen == 10:
            break
    for class_name in ("cat", "dog"):
        (root / "test" / class_name).mkdir(parents=True)
        for path in mini_files("test", class_name, 2):
            shutil.copy(path, root / "test" / class_name / path.name)
    store = str(tmp_path / "store")
    assert run_cli("extract", str(root), *MINI_ARGS, "--store", store).exit_code == 0
    for head in ("logreg", "mlp"):
        result = run_cli("fit", "--head", head, "-p", "epochs=2" if head == "mlp" else "C=1",
                         "--quiet", "--store", store)
        assert result.exit_code == 0, result.output
        assert "validation accuracy n/a (no validation rows)" in result.output
        record = json.loads(Path(result.output.split("Head saved to ")[1].strip()).read_text())
        assert record["rows"] == {"train": 10, "validation": 0}
        assert set(record["metrics"]) == {"test"}
    assert run_cli("list", "--store", store).exit_code == 0
