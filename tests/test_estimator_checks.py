"""scikit-learn's own estimator checks on both heads, and the few they cannot pass, with reasons."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import (check_class_weight_classifiers,
                                            check_classifiers_train, parametrize_with_checks)

from classifiers.combine import METHODS, EnsembleHead
from classifiers.mlp import MLPHead
from classifiers.registry import HEADS

SHORT_TRAINING = ("3 epochs (kept short so this file stays fast) do not reach the check's accuracy "
                  "bar; test_accuracy_checks_at_the_default_epochs runs it with the defaults")
PIPELINE_IN_PLACE = ("the logreg head is scikit-learn's own Pipeline, which by design fits the "
                     "estimators held in its `steps` parameter in place")
PROBABILITY_BLOCKS = ("the check fits 3 classes on 2 feature columns (or string labels), and an "
                      "ensemble's X is n_members blocks of one probability column per class "
                      "index, so it refuses such data with a ValueError; "
                      "test_ensemble_head_keeps_the_estimator_contract covers the same ground on "
                      "data it accepts")
NO_PRIOR = ("greedy and vote average the members' columns, read as class probabilities; with one "
            "label in y they still answer the argmax of those columns (here random features), "
            "they learn no class prior")
BLOCK_CHECKS = ("check_classifier_data_not_an_array", "check_classifiers_classes",
                "check_classifiers_train", "check_estimators_fit_returns_self",
                "check_estimators_overwrite_params", "check_readonly_memmap_input")


def expected_failures(estimator: object) -> dict[str, str]:
    if isinstance(estimator, EnsembleHead):
        failures = dict.fromkeys(BLOCK_CHECKS, PROBABILITY_BLOCKS)
        if estimator.method != "stack":
            failures["check_classifiers_one_label"] = NO_PRIOR
        return failures
    if isinstance(estimator, MLPHead):
        return {"check_classifiers_train": SHORT_TRAINING,
                "check_class_weight_classifiers": SHORT_TRAINING}
    return {"check_estimators_overwrite_params": PIPELINE_IN_PLACE,
            "check_dont_overwrite_parameters": PIPELINE_IN_PLACE}


@parametrize_with_checks([MLPHead(epochs=3), HEADS["logreg"].build(),
                          *(EnsembleHead(1, method=method) for method in METHODS)],
                         expected_failed_checks=expected_failures)
def test_sklearn_compatible(estimator: object, check: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


@pytest.mark.parametrize("method", METHODS)
def test_ensemble_head_keeps_the_estimator_contract(method: str) -> None:
    """What the checks listed above test, on members' probabilities: fit returns self and
    leaves the parameters alone, read-only arrays and lists work, predictions are classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    X = np.hstack([np.eye(3)[y] * 0.6 + 0.4 * rng.dirichlet(np.ones(3), 120) for _ in range(2)])
    head = EnsembleHead(2, method=method)
    before = head.get_params()
    assert head.fit(X, y) is head
    assert head.get_params() == before
    X.setflags(write=False)
    np.testing.assert_array_equal(head.predict(X), clone(head).fit(X.tolist(), y.tolist())
                                  .predict(X.tolist()))
    assert set(head.predict(X)) <= set(head.classes_) and head.score(X, y) > 0.9
    with pytest.raises(ValueError, match="class indices"):
        clone(head).fit(X, np.array(["a", "b", "c"] * 40))


@pytest.mark.parametrize("check", [check_classifiers_train, check_class_weight_classifiers])
def test_accuracy_checks_at_the_default_epochs(check: object) -> None:
    """The checks listed above as failing with 3 epochs pass with the paper's 10."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check("MLPHead", MLPHead())


def test_mlp_learns_separable_data_and_keeps_label_types() -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 1, (60, 5)), rng.normal(3, 1, (60, 5))]).astype(np.float32)
    y = np.array(["cat"] * 60 + ["dog"] * 60)
    head = MLPHead(epochs=5, early_stopping=False).fit(X, y)
    assert list(head.classes_) == ["cat", "dog"]
    assert head.score(X, y) > 0.95
    proba = head.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    again = clone(head).fit(X, y)  # seeded: the same fit twice gives the same predictions
    np.testing.assert_allclose(again.predict_proba(X), proba, atol=1e-4)


def test_mlp_with_few_rows_per_class_still_holds_out_validation_rows() -> None:
    """Fewer validation rows than classes: the split cannot stratify, and must not fail."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.repeat(np.arange(6), 5)
    head = MLPHead(epochs=2, validation_fraction=0.1).fit(X, y)
    assert "val_loss" in head.history_ and head.predict(X).shape == (30,)


def test_a_keras_model_fed_through_index_batches_trains_exactly_like_the_mlp_head() -> None:
    """bench/paper.py's (a) relies on this: same seed, same initial weights, dropout masks and
    batch order as MLPHead, so the two differ only in their inputs."""
    import tensorflow as tf

    from classifiers.mlp import index_batches
    from extract.runtime import load_keras

    keras = load_keras()
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    head = MLPHead(hidden=(16,), epochs=3, batch_size=32, early_stopping=False,
                   random_state=5).fit(X, y)

    keras.utils.set_random_seed(5)
    features, targets = tf.constant(X), tf.constant(np.eye(3, dtype=np.float32)[y])
    batches = index_batches(len(X), 32, 5).map(
        lambda i: (tf.gather(features, i), tf.gather(targets, i)))
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)  # layers made in MLPHead's order
    hidden = keras.layers.Dropout(0.5)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
    model.fit(batches, epochs=3, shuffle=False, verbose=0)

    for ours, theirs in zip(head.model_.get_weights(), model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    other_seed = index_batches(len(X), 32, 6)
    assert not np.array_equal(np.concatenate(list(other_seed.as_numpy_iterator())),
                              np.concatenate(list(index_batches(len(X), 32, 5).as_numpy_iterator())))
