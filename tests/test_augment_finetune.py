"""Augmented views in the cache, and fine-tuning that refreshes the cache (issue 4)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from classifiers.training import as_cache_set, augmented_views, fit_head, training_rows
from classifiers.validation import validation_mask
from cli import app
from endtoend.finetune import FinetuneSettings, application_model, finetune
from extract import pipeline, plan as plan_module
from extract.augment import Augmentation
from extract.backbones import Weights, get_backbone
from extract.blocks import is_batch_norm
from extract.datasets import folder_dataset
from extract.pipeline import extract_features, extract_views
from extract.plan import ExtractionPlan
from extract.rebuild import cache_feature_model, cache_preprocessing
from store.store import Store
from tests.conftest import MINI, WEIGHTS

SIZE = 32


def small_dataset(root: Path, per_class: int = 6) -> Path:
    """A copy of the first images of three mini classes (train and test)."""
    for split in ("train", "test"):
        for name in ("airplane", "cat", "ship"):
            target = root / split / name
            target.mkdir(parents=True)
            for source in sorted((MINI / split / name).iterdir())[:per_class]:
                shutil.copy(source, target / source.name)
    return root


def plan_for(root: Path, **changes) -> ExtractionPlan:
    settings = dict(dataset=folder_dataset(root), backbone=get_backbone("mobilenet"),
                    weights=Weights("file", WEIGHTS), image_size=SIZE, alpha=0.25,
                    batch_size=8)
    settings.update(changes)
    return ExtractionPlan(**settings)


def read_split(path: Path, split: str = "train") -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        group = handle[split]
        return {key: group[key][...] for key in group}


@pytest.fixture(scope="module")
def views_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, ExtractionPlan, list]:
    root = small_dataset(tmp_path_factory.mktemp("data"))
    store = Store(tmp_path_factory.mktemp("store"))
    plan = plan_for(root)
    extract_features(plan, store, progress=False)
    views = extract_views(plan, Augmentation(), 2, store, progress=False)
    return store, plan, views


def test_views_are_linked_to_their_source_rows(views_store) -> None:
    store, plan, views = views_store
    base = store.finished(plan.fingerprint)
    assert [v.cache.view for v in views] == [0, 1]
    for result in views:
        view = result.cache
        assert view.kind == "views" and view.parent == base.fingerprint
        assert list(view.split_sizes) == ["train"], "test images are never augmented"
        assert np.array_equal(view.ids("train"), base.ids("train"))
        assert np.array_equal(view.labels("train"), base.labels("train"))
        assert (read_split(view.path)["views"] == view.view).all()
        assert not np.allclose(view.features("train"), base.features("train"))
    assert not np.allclose(views[0].cache.features("train"), views[1].cache.features("train"))
    assert store.find_cache() .fingerprint == base.fingerprint, "views are not picked as caches"


def test_views_are_reproducible_and_extend_instead_of_recomputing(views_store, tmp_path,
                                                                  monkeypatch) -> None:
    store, plan, views = views_store
    again = Store(tmp_path / "other")
    extract_features(plan, again, progress=False)
    first = extract_views(plan, Augmentation(), 1, again, progress=False)
    assert np.array_equal(read_split(first[0].cache.path)["features"],
                          read_split(views[0].cache.path)["features"])
    calls = []
    original = pipeline._compute_segment
    monkeypatch.setattr(pipeline, "_compute_segment",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    extended = extract_views(plan, Augmentation(), 2, again, progress=False)
    assert [r.reused for r in extended] == [True, False]
    assert len(calls) == 1, "only the new view ran through the backbone"
    other_seed = extract_views(plan, Augmentation(seed=7), 1, again, progress=False)
    assert other_seed[0].cache.fingerprint != first[0].cache.fingerprint


def test_interrupted_view_extraction_resumes_to_the_same_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(plan_module, "SEGMENT_BYTES", 1)  # views: one chunk of 256 rows a segment
    plan = plan_for(MINI)  # 400 training images: two view segments
    uninterrupted = Store(tmp_path / "whole")
    extract_features(plan, uninterrupted, progress=False)
    expected = extract_views(plan, Augmentation(), 1, uninterrupted, progress=False)[0].cache
    fresh = Store(tmp_path / "resume")
    extract_features(plan, fresh, progress=False)
    original = pipeline._compute_segment
    calls = []

    class Crash(Exception):
        pass

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_compute_segment", flaky)
    with pytest.raises(Crash):
        extract_views(plan, Augmentation(), 1, fresh, progress=False)
    assert fresh.views_of(fresh.finished(plan.fingerprint)) == []
    calls.clear()
    monkeypatch.setattr(pipeline, "_compute_segment",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = extract_views(plan, Augmentation(), 1, fresh, progress=False)[0].cache
    assert len(calls) == 1, "the finished segment was not recomputed"
    assert resumed.fingerprint == expected.fingerprint
    for key in ("features", "labels", "ids", "views"):
        assert np.array_equal(read_split(expected.path)[key], read_split(resumed.path)[key]), key


def test_views_do_not_depend_on_batch_size(views_store, tmp_path) -> None:
    store, plan, views = views_store
    other = plan_for(Path(plan.dataset.source["path"]), batch_size=3)
    again = Store(tmp_path / "batch3")
    extract_features(other, again, progress=False)
    view = extract_views(other, Augmentation(), 1, again, progress=False)[0].cache
    assert view.fingerprint == views[0].cache.fingerprint
    np.testing.assert_allclose(view.features("train"), views[0].cache.features("train"),
                               rtol=1e-2, atol=1e-2)


def test_validation_split_gets_no_views(views_store) -> None:
    store, plan, _ = views_store
    base = store.finished(plan.fingerprint)
    rows = training_rows(as_cache_set(base), augmented_views(store, base))
    plain = training_rows(as_cache_set(base))
    assert len(rows.views) == 2
    assert len(rows.y_fit) == 3 * len(plain.y_fit)
    assert not set(rows.fit_ids) & set(rows.val_ids)
    assert set(rows.val_ids) == set(base.ids("train")[validation_mask(base.ids("train"))])
    assert len(rows.val_ids) > 0


def test_fit_augmented_needs_views(tmp_path) -> None:
    root = small_dataset(tmp_path / "data", per_class=3)
    store = Store(tmp_path / "store")
    extract_features(plan_for(root), store, progress=False)
    result = CliRunner().invoke(app, ["fit", "--head", "logreg", "--augmented",
                                      "--store", str(store.root)])
    assert result.exit_code == 1
    assert "has no augmented views" in result.output and "Traceback" not in result.output


def test_show_augment_writes_a_grid(tmp_path) -> None:
    target = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["show-augment", str(MINI), "--backbone", "mobilenet",
                                      "--image-size", "32", "--count", "3", "--views", "2",
                                      "--out", str(target)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(target) as grid:
        assert grid.format == "PNG"
        assert grid.size[0] > grid.size[1] * 0.9  # 3 columns (original + 2 views) x 3 rows
    assert str(target) in result.output.replace("\n", "")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory):
    root = small_dataset(tmp_path_factory.mktemp("ft-data"), per_class=10)
    store = Store(tmp_path_factory.mktemp("ft-store"))
    cache = extract_features(plan_for(root), store, progress=False).cache
    fit_head(store, cache, "mlp", {"epochs": "2"})
    result = finetune(store, cache, "mlp", FinetuneSettings(unfreeze=1, epochs=1,
                                                            learning_rate=1e-3), verbose=0)
    return store, cache, result


def test_finetune_refreshes_a_linked_cache_and_keeps_the_old_one(finetuned) -> None:
    store, parent, result = finetuned
    refreshed = result.cache
    assert refreshed.fingerprint != parent.fingerprint
    assert refreshed.lineage["parent"] == parent.fingerprint
    assert store.finished(parent.fingerprint) is not None, "old cache kept"
    record = result.record
    assert set(record["test_before"]) >= {"accuracy"} and set(record["test_after"]) >= {"accuracy"}
    assert record["history"]["loss"] and record["unfrozen_layers"]
    assert (result.run_dir / "run.json").is_file()
    assert result.head_sidecar.is_file()


def test_refreshed_features_equal_the_finetuned_backbone_output(finetuned) -> None:
    store, parent, result = finetuned
    refreshed = result.cache
    weights = Weights("file", Path(result.record["weights"]))
    model = cache_feature_model(refreshed, weights)
    preprocessing = cache_preprocessing(refreshed)
    dataset = folder_dataset(Path(parent.source["path"]))
    ids = list(dataset.splits["train"].ids)
    rows = [ids.index(i) for i in refreshed.ids("train")[:5]]
    batch = np.stack([dataset.load("train", r, preprocessing) for r in rows])
    direct = np.asarray(model.predict_on_batch(preprocessing.apply(batch)))
    cached = refreshed.features("train", slice(0, 5))
    np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3)
    before = cache_feature_model(parent, Weights("file", WEIGHTS))
    assert not np.allclose(np.asarray(before.predict_on_batch(preprocessing.apply(batch))),
                           direct, atol=1e-4), "the unfrozen block changed the features"


def test_batch_norm_statistics_do_not_change(finetuned) -> None:
    _, parent, result = finetuned
    original = application_model(cache_feature_model(parent, Weights("file", WEIGHTS)))
    tuned = application_model(cache_feature_model(parent, Weights("file", WEIGHTS)))
    tuned.load_weights(result.record["weights"])
    changed = []
    for a, b in zip(original.layers, tuned.layers):
        same = all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
        if is_batch_norm(a):
            assert same, f"BatchNorm layer {a.name} changed"
        elif not same:
            changed.append(a.name)
    assert set(changed) == set(result.record["unfrozen_layers"])


def test_show_augment_takes_its_rows_across_the_classes() -> None:
    from extract.preview import _across_classes

    labels = np.repeat(np.arange(4), 5)  # sorted by class, as folder datasets list them
    rows = _across_classes(labels, 6)
    assert [int(labels[r]) for r in rows] == [0, 1, 2, 3, 0, 1]
    assert rows == [0, 5, 10, 15, 1, 6]
    assert _across_classes(np.array([2, 2, 2]), 8) == [0, 1, 2]
