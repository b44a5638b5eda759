"""The heads added after mlp/logreg: estimator checks, the registry, multi-cache training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks
from typer.testing import CliRunner

from classifiers.registry import HEADS, get_head_kind
from classifiers.sgd import SGDHead
from classifiers.sources import CacheSet
from classifiers.training import evaluate_heads, fit_head
from cli import app
from store.errors import HeadstartError
from store.store import Store

NEW_HEADS = ("svm", "sgd", "knn", "hgb")


def expected_failures(estimator) -> dict[str, str]:
    """Checks a head is known to fail, with the reason."""
    if type(estimator).__name__ == "Pipeline":
        reason = "a Pipeline fits its step estimators in place (scikit-learn's own behaviour)"
        return {"check_estimators_overwrite_params": reason,
                "check_dont_overwrite_parameters": reason}
    return {}


def _small(kind: str):
    estimator = get_head_kind(kind).create()
    if kind == "hgb":
        estimator.set_params(max_iter=3, max_leaf_nodes=7)
    if kind == "knn":
        estimator.set_params(kneighborsclassifier__n_neighbors=3)
    return estimator


@parametrize_with_checks([_small(k) for k in NEW_HEADS], expected_failed_checks=expected_failures)
def test_new_heads_are_sklearn_estimators(estimator, check) -> None:
    check(estimator)


def test_heads_command_lists_every_head_with_options() -> None:
    result = CliRunner().invoke(app, ["heads"])
    assert result.exit_code == 0, result.output
    for kind in ("mlp", "logreg", *NEW_HEADS):
        assert f"{kind}:" in result.output
    assert "n_neighbors = 15" in result.output and "label_smoothing = 0.0" in result.output


def test_sgd_partial_fit_learns_incrementally() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    X = y[:, None] * 2.0 + rng.normal(size=(400, 5))
    head = SGDHead()
    for start in range(0, 400, 100):
        head.partial_fit(X[start:start + 100], y[start:start + 100], classes=[0, 1])
    assert head.score(X, y) > 0.8
    assert np.allclose(head.predict_proba(X).sum(axis=1), 1.0)


@pytest.mark.parametrize("kind", NEW_HEADS)
def test_each_new_head_fits_saves_and_evaluates(toy_store, kind) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    cache = store.find_cache(caches["a"][:12])
    record, sidecar = fit_head(store, cache, kind)
    assert sidecar.is_file() and record["metrics"]["test"]["accuracy"] > 0.6
    report, = evaluate_heads(store, cache, [kind])
    assert report["kind"] == kind
    assert report["accuracy"] == pytest.approx(record["metrics"]["test"]["accuracy"])


def test_mlp_gains_options_work_together(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    options = {"hidden": "32,16", "batch_norm": "true", "label_smoothing": "0.1",
               "class_weight": "balanced", "lr_schedule": "cosine", "epochs": "15", "batch_size": "32",
               "patience": "1"}
    record, _ = fit_head(store, store.find_cache(caches["a"][:12]), "mlp", options)
    assert record["metrics"]["validation"]["accuracy"] > 0.6


def test_fit_on_two_caches_matches_rows_by_sample_id(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    a, b = store.find_cache(caches["a"][:12]), store.find_cache(caches["b"][:12])
    both = CacheSet([a, b])
    assert both.width == a.width + b.width
    # b stores its rows in another order; the set lines them up with a's ids.
    joined = both.features("test")
    order = {sample: row for row, sample in enumerate(b.ids("test"))}
    expected = b.features("test")[[order[s] for s in a.ids("test")]]
    np.testing.assert_array_equal(joined[:, a.width:], expected)
    np.testing.assert_array_equal(joined[5:9], both.read_rows("test", np.arange(5, 9)))
    record, _ = fit_head(store, both, "logreg", name="both")
    assert record["caches"] == [a.fingerprint, b.fingerprint]
    report, = evaluate_heads(store, a, ["both"])
    assert report["accuracy"] == pytest.approx(record["metrics"]["test"]["accuracy"])


def test_cli_fit_two_caches_and_refuses_another_dataset(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "--head", "sgd", "--cache", caches["a"][:12], "--cache",
                                 caches["b"][:12], "--store", str(root), "--name", "sgd2"])
    assert result.exit_code == 0, result.output
    assert "Head saved to" in result.output
    result = runner.invoke(app, ["fit", "--head", "sgd", "--cache", caches["a"][:12], "--cache",
                                 caches["other"][:12], "--store", str(root)])
    assert result.exit_code == 1
    assert "different datasets" in result.output and "Traceback" not in result.output


def test_unknown_head_is_one_sentence() -> None:
    with pytest.raises(HeadstartError, match="known heads: mlp, logreg, svm, sgd, knn, hgb"):
        get_head_kind("forest")
    assert set(NEW_HEADS) <= set(HEADS)


def test_sgd_probabilities_rank_classes_like_predict_when_decisions_are_large() -> None:
    """SGDClassifier's own one-vs-rest probabilities saturate (ties at 1, or a uniform row)
    once decision values are large; the head's softmax must keep predict's ranking."""
    from classifiers.sgd import SGDHead

    rng = np.random.default_rng(0)  # many weak features, as in bench/memory_budget.py
    means = rng.normal(0, 0.2, size=(10, 512))
    y = rng.integers(0, 10, 4000)
    X = (means[y] + rng.standard_normal((4000, 512))).astype(np.float32)
    head = SGDHead(epochs=3).fit(X, y)
    one_vs_rest = head.model_.predict_proba(head.scaler_.transform(X))
    assert (one_vs_rest.argmax(axis=1) != head.decision_function(X).argmax(axis=1)).any(), \
        "the case needs saturated one-vs-rest sigmoids"
    proba = head.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(head.classes_[proba.argmax(axis=1)], head.predict(X))


def test_validation_fraction_zero_trains_on_every_row_and_stays_out_of_ensembles(
        toy_store) -> None:  # noqa: F811
    from classifiers.ensembles import candidate_members

    root, caches = toy_store
    store = Store(root)
    cache = store.find_cache(caches["a"][:12])
    everything, _ = fit_head(store, cache, "logreg", name="all-rows", validation_fraction=0.0)
    assert everything["rows"] == {"train": cache.split_sizes["train"], "validation": 0}
    assert "validation" not in everything["metrics"]
    mlp, sidecar = fit_head(store, cache, "mlp", {"epochs": "3"}, name="mlp-all-rows",
                            validation_fraction=0.0)  # early stopping on: nothing to stop on
    assert mlp["rows"] == everything["rows"]
    assert json.loads(sidecar.read_text())["options"]["early_stopping"] is False
    fit_head(store, cache, "logreg", name="partly", validation_fraction=0.05)
    fit_head(store, cache, "logreg", name="split")
    fit_head(store, cache, "sgd", name="split-sgd")
    assert {r["name"] for r in candidate_members(store, [cache])} == {"split", "split-sgd"}
    with pytest.raises(HeadstartError, match="validation rows too"):
        candidate_members(store, [cache], ["all-rows", "split"])
    with pytest.raises(HeadstartError, match="validation-fraction"):
        fit_head(store, cache, "logreg", name="bad", validation_fraction=1.0)
