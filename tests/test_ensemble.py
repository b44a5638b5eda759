"""Ensembles: Caruana selection, weighted voting, leak-free stacking, the command and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from classifiers.combine import EnsembleHead, greedy_selection
from cli import app

C = 3


def noisy_member(y: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Probabilities right on about `accuracy` of the rows, confidently wrong elsewhere."""
    rng = np.random.default_rng(seed)
    right = rng.random(len(y)) < accuracy
    predicted = np.where(right, y, (y + rng.integers(1, C, len(y))) % C)
    proba = np.full((len(y), C), 0.1)
    proba[np.arange(len(y)), predicted] = 0.8
    return proba


def test_greedy_selection_prefers_the_better_member() -> None:
    y = np.random.default_rng(0).integers(0, C, 600)
    members = np.stack([noisy_member(y, 0.55, 1), noisy_member(y, 0.9, 2), noisy_member(y, 0.6, 3)])
    weights, picks = greedy_selection(members, y, rounds=20)
    assert picks[0] == 1
    assert weights.argmax() == 1 and weights[1] > 0.5
    ensemble = EnsembleHead(n_members=3).fit(np.hstack(list(members)), y)
    assert ensemble.weights_.argmax() == 1


def test_vote_weights_favour_the_better_member() -> None:
    y = np.random.default_rng(1).integers(0, C, 600)
    X = np.hstack([noisy_member(y, 0.5, 4), noisy_member(y, 0.85, 5)])
    ensemble = EnsembleHead(n_members=2, method="vote").fit(X, y)
    assert ensemble.weights_[1] > ensemble.weights_[0]
    assert np.isclose(ensemble.weights_.sum(), 1.0)
    assert ensemble.score(X, y) >= 0.84


def test_stacking_is_scored_out_of_fold() -> None:
    """With labels that carry no signal, a meta-learner scored on its own training rows looks
    good (it memorizes); the out-of-fold figure the ensemble reports must stay at chance."""
    rng = np.random.default_rng(2)
    n, members = 150, 16
    y = rng.integers(0, C, n)
    X = rng.dirichlet(np.ones(C), size=(n, members)).reshape(n, members * C)
    ensemble = EnsembleHead(n_members=members, method="stack", C=1000.0).fit(X, y)
    in_sample = (ensemble.predict(X) == y).mean()
    out_of_fold = (ensemble.validation_proba(X).argmax(axis=1) == y).mean()
    assert in_sample > 0.6
    assert out_of_fold < 0.45


def test_a_rows_own_label_never_reaches_its_stacked_prediction() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, C, 200)
    X = np.hstack([noisy_member(y, 0.7, 6), noisy_member(y, 0.6, 7)])
    before = EnsembleHead(n_members=2, method="stack").fit(X, y).validation_proba(X)
    flipped = y.copy()
    flipped[17] = (y[17] + 1) % C
    after = EnsembleHead(n_members=2, method="stack").fit(X, flipped).validation_proba(X)
    np.testing.assert_allclose(before[17], after[17])


def _fit(runner: CliRunner, root, cache: str, head: str) -> None:
    result = runner.invoke(app, ["fit", "--head", head, "--cache", cache, "--store", str(root),
                                 "-q"])
    assert result.exit_code == 0, result.output


def test_ensemble_command_across_caches(toy_store) -> None:  # noqa: F811
    root, caches = toy_store
    runner = CliRunner()
    _fit(runner, root, caches["a"][:12], "logreg")
    _fit(runner, root, caches["a"][:12], "knn")
    _fit(runner, root, caches["b"][:12], "sgd")
    _fit(runner, root, caches["other"][:12], "logreg")  # another dataset: never a member
    args = ["--cache", caches["a"][:12], "--cache", caches["b"][:12], "--store", str(root)]
    result = runner.invoke(app, ["ensemble", *args])
    assert result.exit_code == 0, result.output
    assert "sgd@toy_arrays-arrays_6_max" in result.output and "Ensemble saved to" in result.output
    for method in ("vote", "stack"):
        result = runner.invoke(app, ["ensemble", "--method", method, "--heads", "logreg,sgd", *args])
        assert result.exit_code == 0, result.output
    listing = runner.invoke(app, ["list", "--store", str(root)])
    assert "ensemble-stack" in listing.output and "ensemble-vote" in listing.output
    report = runner.invoke(app, ["evaluate", "--head", "ensemble", "--cache", caches["a"][:12],
                                 "--store", str(root)])
    assert report.exit_code == 0, report.output
    assert "ensemble (ensemble): accuracy" in report.output


@pytest.mark.parametrize("extra, message", [
    (["--heads", "logreg,nope"], "No fitted head named 'nope'"),
    (["--heads", "logreg"], "at least two fitted heads"),
    (["--cache", "OTHER"], "different datasets"),
])
def test_ensemble_errors_are_one_sentence_and_write_nothing(toy_store, extra, message) -> None:  # noqa: F811
    root, caches = toy_store
    runner = CliRunner()
    _fit(runner, root, caches["a"][:12], "logreg")
    _fit(runner, root, caches["a"][:12], "sgd")
    before = sorted(p.name for p in (root / "heads").rglob("*"))
    extra = [caches["other"][:12] if e == "OTHER" else e for e in extra]
    result = runner.invoke(app, ["ensemble", "--cache", caches["a"][:12], *extra,
                                 "--store", str(root)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in (root / "heads").rglob("*")) == before


def test_an_unknown_method_is_refused_by_the_library_too(toy_store) -> None:  # noqa: F811
    """The CLI's enum refuses it first (tests/test_cli.py); a library caller gets a sentence."""
    from classifiers.ensembles import fit_ensemble
    from store.errors import HeadstartError
    from store.store import Store

    root, caches = toy_store
    store = Store(root)
    with pytest.raises(HeadstartError, match="Unknown ensemble method 'bagging'"):
        fit_ensemble(store, [store.find_cache(caches["a"][:12])], "bagging")
