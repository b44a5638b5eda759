"""Heads on a multi-block cache with mirrored views (issue 15): block subsets, mirrored training
rows without a validation leak, test-time averaging in evaluate, predict and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from classifiers.saved import load_saved_head
from classifiers.sources import CacheSet, choose_blocks
from classifiers.training import training_rows
from classifiers.validation import validation_mask
from store.store import Store
from tests.conftest import MINI, MINI_ARGS
from tests.helpers import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def views_store(tmp_path_factory: pytest.TempPathFactory, shared_paths) -> Path:
    """The mini set at 64 px, 3 blocks, mirrored views; a logreg with views and one without,
    on the last block only; a standardizing mlp with views."""
    store = tmp_path_factory.mktemp("views-store")
    made = run_cli("extract", str(MINI), *MINI_ARGS, "--blocks", "3", "--tta", "flip",
                   "--store", str(store))
    assert made.exit_code == 0, made.output
    for args in (["--head", "logreg"],
                 ["--head", "logreg", "--name", "last", "--use-blocks", "1", "--no-tta"],
                 ["--head", "mlp", "--name", "mlp-std", "-p", "standardize=true",
                  "-p", "hidden=32", "-p", "epochs=3"]):
        fitted = run_cli("fit", *args, "--store", str(store))
        assert fitted.exit_code == 0, fitted.output
    return store


def test_mirrored_training_rows_are_the_fit_images_only(views_store: Path) -> None:
    cache = Store(views_store).find_cache()
    source = CacheSet([cache])
    ids = cache.ids("train")
    held_out = validation_mask(ids)
    rows = training_rows(source, mirrored=True)
    assert len(rows.y_fit) == 2 * int((~held_out).sum())
    assert set(rows.fit_ids) == set(ids[~held_out])  # no view of a validation image
    mirrored = cache.features("train", mirrored=True)[~held_out]
    np.testing.assert_array_equal(rows.X_fit[len(rows.X_fit) // 2:], mirrored)
    record = json.loads(next((views_store / "heads").rglob("logreg.json")).read_text())
    assert record["tta"] == "flip" and record["rows"]["train"] == len(rows.y_fit)


def test_a_block_subset_reads_exactly_those_columns(views_store: Path) -> None:
    cache = Store(views_store).find_cache()
    (name, start, stop), = cache.blocks[-1:]
    assert choose_blocks(cache, "1") == [name] and choose_blocks(cache, "3") is None
    chosen = CacheSet([cache], [choose_blocks(cache, name)])
    assert chosen.width == stop - start
    np.testing.assert_array_equal(chosen.features("test"), cache.features("test")[:, start:stop])
    head = load_saved_head(Store(views_store), cache, "last")
    assert head.record["blocks"] == [[name]] and not head.uses_views
    assert_clean_error(run_cli("fit", "--head", "logreg", "--name", "x", "--use-blocks", "9",
                               "--store", str(views_store)), "holds 3 block(s)")
    assert_clean_error(run_cli("fit", "--head", "logreg", "--name", "x", "--use-blocks", "nope",
                               "--store", str(views_store)), "has no block 'nope'")


def test_evaluate_averages_views_and_reports_the_single_view(views_store: Path) -> None:
    result = run_cli("evaluate", "--json", "--store", str(views_store))
    reports = {r["head"]: r for r in json.loads(result.output)}
    cache = Store(views_store).find_cache()
    head = load_saved_head(Store(views_store), cache, "logreg")
    y = cache.labels("test")
    both = (head.split_proba("test", views=False)
            + head.estimator.predict_proba(cache.features("test", mirrored=True))) / 2
    assert reports["logreg"]["accuracy"] == pytest.approx(float((both.argmax(1) == y).mean()))
    single = head.split_proba("test", views=False)
    assert reports["logreg"]["accuracy_single_view"] == pytest.approx(
        float((single.argmax(1) == y).mean()))
    assert "accuracy_single_view" not in reports["last"]
    plain = json.loads(run_cli("evaluate", "--json", "--no-tta", "--store",
                               str(views_store)).output)
    assert {r["head"]: r["accuracy"] for r in plain}["logreg"] == pytest.approx(
        reports["logreg"]["accuracy_single_view"])


@pytest.mark.parametrize("name", ["logreg", "last", "mlp-std"])
@pytest.mark.parametrize("views", [True, False])
def test_predict_equals_the_cached_answers(views_store: Path, name: str, views: bool) -> None:
    from endtoend.predict import open_predictor
    from extract.rebuild import cache_dataset

    store = Store(views_store)
    cache = store.find_cache()
    dataset = cache_dataset(cache, check_contents=False)
    position = {sample: i for i, sample in enumerate(dataset.splits["test"].ids)}
    ids = cache.ids("test")[:32]
    predictor = open_predictor(store, cache, name, views=views)
    assert predictor.views == (views and name != "last")
    pixels = np.stack([dataset.load("test", position[i], predictor.preprocessing) for i in ids])
    got = predictor.proba(pixels)
    want = load_saved_head(store, cache, name).split_proba("test", views=views)[:32]
    np.testing.assert_allclose(got, want, atol=5e-3)  # the cache stores float16
    assert (got.argmax(1) == want.argmax(1)).all()


def test_export_of_a_standardizing_mlp_with_views_equals_predict(views_store: Path,
                                                                  tmp_path: Path) -> None:
    """The exported model holds the blocks, the mirror average and the Normalization layer."""
    from endtoend.export import end_to_end_model, split_pixels
    from endtoend.keras_heads import load_exported
    from endtoend.predict import open_predictor

    store = Store(views_store)
    predictor = open_predictor(store, store.find_cache(), "mlp-std")
    assert predictor.views
    pixels, _ = split_pixels(predictor, "test", 16)
    path = tmp_path / "mlp-std.keras"
    end_to_end_model(predictor).save(path)
    exported = load_exported(path)
    assert any(layer.name == "standardize" for layer in exported._flatten_layers())
    np.testing.assert_allclose(exported.predict(pixels.astype(np.float32), verbose=0),
                               predictor.proba(pixels), atol=1e-4)


def test_tune_draws_block_subsets_and_scores_trials_with_the_views(views_store: Path) -> None:
    """Each trial trains on the last `use_blocks` blocks plus the mirrored rows of its fit
    images and is scored averaged over each validation image and its mirror; the saved head is
    the best trial's, on its blocks."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from classifiers.tune import tune_head

    store = Store(views_store)
    cache = store.find_cache()
    results, record, _ = tune_head(store, cache, "logreg", trials=4, seed=1, name="lr-tuned")
    drawn = {t["params"]["use_blocks"] for t in results}
    assert drawn <= {1, 2, 3} and len(drawn) > 1
    ids, y = cache.ids("train"), cache.labels("train")
    held_out = validation_mask(ids)
    X, M = cache.features("train"), cache.features("train", mirrored=True)
    for trial in results:  # the expected score, worked out here from the stored columns
        start = cache.blocks[len(cache.blocks) - trial["params"]["use_blocks"]][1]
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=trial["params"]["C"], solver="newton-cg", max_iter=1000, random_state=0))
        fit = ~held_out
        model.fit(np.concatenate([X[fit, start:], M[fit, start:]]), np.concatenate([y[fit]] * 2))
        proba = (model.predict_proba(X[held_out, start:])
                 + model.predict_proba(M[held_out, start:])) / 2
        expected = float((model.classes_[proba.argmax(1)] == y[held_out]).mean())
        assert trial["validation_accuracy"] == pytest.approx(expected)
    best = results[record["tune"]["best_trial"]]
    count = best["params"]["use_blocks"]
    names = [name for name, _, _ in cache.blocks]
    assert record["blocks"] == [names[len(names) - count:]] if count < 3 else "blocks" not in record
    assert record["tta"] == "flip"
    assert "use_blocks" not in json.loads(
        next((views_store / "heads").rglob("lr-tuned.json")).read_text())["options"]


def test_a_standardizing_mlp_answers_alike_on_rescaled_columns(views_store: Path) -> None:
    """-p standardize=true: the head's first layer holds the training rows' column moments, so
    scaling and shifting the columns (as blocks of other scales would be) changes nothing."""
    from classifiers.mlp import MLPHead

    cache = Store(views_store).find_cache()
    X, y = cache.features("train").astype(np.float32), cache.labels("train")
    scale = np.linspace(0.01, 100.0, X.shape[1], dtype=np.float32)
    options = dict(hidden=(32,), epochs=3, early_stopping=False, standardize=True)
    plain = MLPHead(**options).fit(X, y)
    scaled = MLPHead(**options).fit(X * scale + 5.0, y)
    layer = plain.model_.get_layer("standardize")
    np.testing.assert_allclose(np.ravel(layer.mean), X.astype(np.float64).mean(0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.ravel(layer.variance), X.astype(np.float64).var(0),
                               rtol=1e-3, atol=1e-6)
    T = cache.features("test").astype(np.float32)
    np.testing.assert_allclose(plain.predict_proba(T), scaled.predict_proba(T * scale + 5.0),
                               atol=2e-3)
    unscaled = MLPHead(**{**options, "standardize": False}).fit(X * scale + 5.0, y)
    assert not np.allclose(unscaled.predict_proba(T * scale + 5.0), plain.predict_proba(T),
                           atol=2e-3)


def test_column_moments_of_blocks_equal_those_of_the_whole() -> None:
    from classifiers.mlp import column_moments

    rows = np.random.default_rng(0).normal(300.0, 0.5, (1000, 7)).astype(np.float16)
    mean, variance = column_moments(np.array_split(rows, [3, 400, 401, 999]))
    np.testing.assert_allclose(mean, rows.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(variance, rows.astype(np.float64).var(0), rtol=1e-4)
