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
    on the last block only."""
    store = tmp_path_factory.mktemp("views-store")
    made = run_cli("extract", str(MINI), *MINI_ARGS, "--blocks", "3", "--tta", "flip",
                   "--store", str(store))
    assert made.exit_code == 0, made.output
    for args in (["--head", "logreg"],
                 ["--head", "logreg", "--name", "last", "--use-blocks", "1", "--no-tta"]):
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


@pytest.mark.parametrize("name", ["logreg", "last"])
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
    assert predictor.views == (views and name == "logreg")
    pixels = np.stack([dataset.load("test", position[i], predictor.preprocessing) for i in ids])
    got = predictor.proba(pixels)
    want = load_saved_head(store, cache, name).split_proba("test", views=views)[:32]
    np.testing.assert_allclose(got, want, atol=5e-3)  # the cache stores float16
    assert (got.argmax(1) == want.argmax(1)).all()
