"""tune: seeded random search on the validation split, resumable, best head saved."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import classifiers.tune as tune
from classifiers.tune import draw_trials, tune_head
from cli import app
from store.errors import HeadstartError
from store.store import Store


def test_trials_are_the_same_for_the_same_seed() -> None:
    assert draw_trials("mlp", 5, 0) == draw_trials("mlp", 5, 0)
    assert draw_trials("mlp", 5, 0) != draw_trials("mlp", 5, 1)
    assert draw_trials("mlp", 8, 0)[:5] == draw_trials("mlp", 5, 0)


def test_tune_resumes_without_rerunning_finished_trials(toy_store, monkeypatch) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    cache = store.find_cache(caches["a"][:12])
    real = tune.train_estimator
    calls = []

    def interrupted(estimator, source, plan, **options):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(estimator.get_params()["alpha"])
        return real(estimator, source, plan, **options)

    monkeypatch.setattr(tune, "train_estimator", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune_head(store, cache, "sgd", trials=4, seed=3)
    trials_files = list((root / "heads").rglob("sgd-tuned.trials-*.jsonl"))  # saved as KIND-tuned
    assert len(trials_files) == 1
    assert len(trials_files[0].read_text().splitlines()) == 2

    calls.clear()
    monkeypatch.setattr(tune, "train_estimator", lambda e, s, p, **o: (calls.append(1), real(e, s, p, **o)))
    results, record, sidecar = tune_head(store, cache, "sgd", trials=4, seed=3)
    assert len(calls) == 2  # only the two unfinished trials ran
    assert [t["trial"] for t in results] == [0, 1, 2, 3]
    best = max(results, key=lambda t: t["validation_accuracy"])
    assert record["tune"]["best_trial"] == best["trial"]
    saved = json.loads(sidecar.read_text())
    assert saved["options"]["alpha"] == pytest.approx(best["params"]["alpha"])
    assert saved["tune"]["trials"] == 4


def test_tune_command_prints_the_trials_table(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    args = ["tune", "--head", "logreg", "--trials", "3", "--store", str(root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Trials (validation split)" in result.output and "Head saved to" in result.output
    again = CliRunner().invoke(app, [*args, "--replace"])  # the tuned head exists: asked to
    assert again.output.count("(done before)") == 3
    bad = CliRunner().invoke(app, ["tune", "--head", "logreg", "--trials", "0", "--store", str(root)])
    assert bad.exit_code == 1 and "at least 1" in bad.output


def test_tune_with_views_on_a_cache_without_them_is_one_sentence(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    cache = store.find_cache(caches["a"][:12])
    with pytest.raises(HeadstartError, match="holds no mirrored views; extract it with --tta "
                                             "flip, or tune without --tta"):
        tune_head(store, cache, "logreg", trials=1, tta=True)
    assert not list((root / "heads").rglob("logreg-tuned*"))  # refused before any trial
