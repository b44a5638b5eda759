"""The validation split, with expectations worked out by hand (hashlib), never by the function
under test: which rows are held out, that it depends on the id alone, and that fit and tune
keep to it."""

from __future__ import annotations

import numpy as np
import pytest

import classifiers.training as training
import classifiers.tune as tune
from classifiers.validation import validation_mask
from store.store import Store
from tests.helpers import held_out_by_hand

IDS = [f"train/{name}/{i:04d}.jpg" for name in ("cat", "dog", "ünï 猫") for i in range(400)]


def test_the_held_out_rows_are_the_ones_the_hash_picks() -> None:
    expected = np.array([held_out_by_hand(i) for i in IDS])
    got = validation_mask(np.array(IDS))
    assert got.dtype == bool and got.shape == (len(IDS),)
    assert np.array_equal(got, expected), np.flatnonzero(got != expected)[:10]
    assert 0.07 < expected.mean() < 0.13  # about 10 % (binomial, 1200 ids: ± 3 sigma)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.25, 0.5, 1.0])
def test_other_fractions(fraction: float) -> None:
    expected = np.array([held_out_by_hand(i, fraction) for i in IDS])
    assert np.array_equal(validation_mask(np.array(IDS), fraction), expected)
    if fraction in (0.0, 1.0):
        assert expected.all() == bool(fraction) and expected.any() == bool(fraction)


def test_a_row_is_held_out_for_its_id_alone() -> None:
    """Not its position, its neighbours or the array type: reordered, sliced, listed alike."""
    ids = np.array(IDS)
    order = np.random.default_rng(0).permutation(len(ids))
    whole = validation_mask(ids)
    assert np.array_equal(validation_mask(ids[order]), whole[order])
    assert np.array_equal(validation_mask(ids[5:17]), whole[5:17])
    assert np.array_equal(validation_mask(np.array(IDS, dtype=object)), whole)
    assert validation_mask(np.array([], dtype=str)).shape == (0,)


def test_fit_trains_outside_and_judges_on_the_hand_picked_rows(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    cache = Store(root).find_cache(caches["a"][:12])
    ids = cache.ids("train")
    by_hand = np.array([held_out_by_hand(str(i)) for i in ids])
    assert 0 < by_hand.sum() < len(ids)
    rows = training.training_rows(training.as_cache_set(cache))
    assert sorted(rows.val_ids.tolist()) == sorted(ids[by_hand].tolist())
    assert sorted(rows.fit_ids.tolist()) == sorted(ids[~by_hand].tolist())
    np.testing.assert_array_equal(rows.X_val, cache.features("train")[by_hand])


def test_tune_scores_each_trial_on_the_hand_picked_rows_only(toy_store, monkeypatch) -> None:  # noqa: F811
    """A tune that scored every training row (or the fit rows) would pass a check of the split
    name alone; here the rows scored, and the accuracy reported, are checked."""
    root, caches = toy_store
    store = Store(root)
    cache = store.find_cache(caches["a"][:12])
    ids, y = cache.ids("train"), cache.labels("train")
    by_hand = np.array([held_out_by_hand(str(i)) for i in ids])
    scored = []
    real = tune.views_proba

    def spy(estimator, source, split, mask=None, *rest, **options):
        proba = real(estimator, source, split, mask, *rest, **options)
        scored.append((split, None if mask is None else np.asarray(mask).copy(), proba))
        return proba

    monkeypatch.setattr(tune, "views_proba", spy)
    results, _, _ = tune.tune_head(store, cache, "knn", trials=3, seed=5)
    assert len(scored) == 3
    for (split, mask, proba), trial in zip(scored, results):
        assert split == "train" and mask is not None
        assert np.array_equal(mask, by_hand)
        assert len(proba) == by_hand.sum()
        accuracy = float((proba.argmax(axis=1) == y[by_hand]).mean())
        assert trial["validation_accuracy"] == pytest.approx(accuracy)
