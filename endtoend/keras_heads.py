"""Saved heads as Keras models from features to class probabilities, and headstart's layers.

Keras heads are used as they are; linear heads (a softmax of a linear function, optionally after
a StandardScaler) become one Dense layer with the standardization folded in; other heads are
refused. An ensemble of one cache's heads combines its members' Keras forms as it combines their
probabilities: a weighted average (greedy, vote) as a Dense layer, or the stacking meta-learner
on the members' log-probabilities as Dense layers.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from classifiers.combine import EPS
from classifiers.saved import SavedHead
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.cache import FeatureCache
from store.errors import HeadstartError


@functools.cache
def _layer_classes() -> dict[str, type]:
    """headstart's Keras layers, registered (once per process) so that safe_mode loads them."""
    keras = load_keras()

    @keras.saving.register_keras_serializable(package="headstart", name="PreprocessInput")
    class PreprocessInput(keras.layers.Layer):
        """Applies e.g. keras.applications.mobilenet.preprocess_input to 0..255 pixels."""

        def __init__(self, function: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if not function.startswith("keras.applications."):
                raise ValueError(f"Refusing preprocess_input outside keras.applications: {function}")
            self.function = function

        def call(self, inputs: Any) -> Any:
            return Preprocessing(1, self.function).function()(inputs)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "function": self.function}

    @keras.saving.register_keras_serializable(package="headstart", name="LogProbabilities")
    class LogProbabilities(keras.layers.Layer):
        """log(clip(p, EPS, 1)): the stacking meta-learner's input (see classifiers.combine)."""

        def call(self, inputs: Any) -> Any:
            return keras.ops.log(keras.ops.clip(inputs, EPS, 1.0))

    @keras.saving.register_keras_serializable(package="headstart", name="MirrorImages")
    class MirrorImages(keras.layers.Layer):
        """Left-right mirror of an N×H×W×C batch: the test-time view (extract --tta flip)."""

        def call(self, inputs: Any) -> Any:
            return keras.ops.flip(inputs, axis=2)

    return {"PreprocessInput": PreprocessInput, "LogProbabilities": LogProbabilities,
            "MirrorImages": MirrorImages}


def mirror_layer() -> Any:
    """A MirrorImages layer."""
    return _layer_classes()["MirrorImages"]()


def preprocess_layer(function: str) -> Any:
    """A PreprocessInput layer applying a backbone's `preprocess_input` by dotted name."""
    return _layer_classes()["PreprocessInput"](function)


def load_exported(path: Any) -> Any:
    """Load an exported .keras model (registers headstart's layers first)."""
    _layer_classes()
    from extract.kerashub import register_for_loading

    register_for_loading(path)  # KerasHub's layers, when the model holds them
    return load_keras().saving.load_model(path, safe_mode=True)


def single_cache(head: SavedHead) -> FeatureCache:
    """The one cache (backbone) whose features `head` reads, or refuse in one sentence."""
    if len(head.caches) > 1:
        raise HeadstartError(
            f"Head {head.name!r} reads the features of {len(head.caches)} caches (backbones), and "
            "an exported model holds one backbone, so only heads and ensembles of a single cache "
            "can be exported.")
    return head.home


def _selecting(selection: np.ndarray, head: Any) -> Any:
    """`head` behind a fixed 0/1 Dense layer that picks the columns of the blocks it reads
    (the identity when it reads every column)."""
    if selection.shape[0] == selection.shape[1] and np.array_equal(selection,
                                                                   np.eye(selection.shape[0])):
        return head
    keras = load_keras()
    inputs = keras.Input((selection.shape[0],), name="all_blocks")
    pick = keras.layers.Dense(selection.shape[1], use_bias=False, trainable=False,
                              name="block_columns")
    outputs = head(pick(inputs), training=False)
    pick.set_weights([selection])
    return keras.Model(inputs, outputs, name="blocks_and_head")


def saved_keras_head(head: SavedHead, features: np.ndarray) -> Any:
    """A Keras model equal to a saved head (or ensemble) of one cache, from its features to class
    probabilities, or refuse. `features` (a few cached rows) check that the conversion matches."""
    cache = single_cache(head)
    n_classes = len(head.class_names)
    if not head.members:
        return _selecting(head.source.select(0, np.eye(features.shape[1], dtype=np.float32)),
                          keras_head(head.estimator, head.source.select(0, features), n_classes))
    keras = load_keras()
    inputs = keras.Input((features.shape[1],), name="features")
    parts = []
    for index, member in enumerate(head.members):
        own = keras.Input((features.shape[1],))
        part = keras.Model(own, saved_keras_head(member, features)(own, training=False),
                           name=f"member_{index}")
        parts.append(part(inputs))
    stacked = keras.layers.Concatenate(name="members")(parts)
    ensemble = head.estimator
    if ensemble.method == "stack":
        log_features = np.log(np.clip(head.members_proba({cache.fingerprint: features}),
                                      EPS, 1.0))
        meta = keras_head(ensemble.meta_, log_features, n_classes)
        outputs = meta(_layer_classes()["LogProbabilities"](name="log_probabilities")(stacked))
    else:
        average = keras.layers.Dense(n_classes, use_bias=False, name="weighted_average")
        outputs = average(stacked)
        average.set_weights([np.kron(np.asarray(ensemble.weights_)[:, None],
                                     np.eye(n_classes)).astype(np.float32)])
    model = keras.Model(inputs, outputs, name=f"ensemble_{ensemble.method}")
    got = np.asarray(model(features.astype(np.float32), training=False))
    if not np.allclose(got, head.feature_proba({cache.fingerprint: features}), atol=1e-4):
        raise HeadstartError(f"The Keras form of ensemble {head.name!r} does not reproduce its "
                             "probabilities, so it is not exported.")
    return model


def keras_head(estimator: Any, features: np.ndarray, n_classes: int) -> Any:
    """A Keras model equal to a fitted estimator, from features to class probabilities, or refuse.

    `features` (a few cached rows) are used to check that a converted head really matches.
    """
    classes = np.asarray(getattr(estimator, "classes_", []))
    if classes.tolist() != list(range(n_classes)):
        raise HeadstartError("The head was not fitted on every class of its cache; it cannot be "
                             "exported as one softmax over all classes.")
    if hasattr(estimator, "model_"):
        return estimator.model_
    head = _linear_as_dense(estimator, features.shape[1], n_classes)
    got = np.asarray(head(features.astype(np.float32), training=False))
    if not np.allclose(got, estimator.predict_proba(features), atol=1e-4):
        raise HeadstartError(
            f"The head ({type(estimator).__name__}) is linear but its probabilities are not a "
            "softmax of its decision function (e.g. calibrated or Platt-scaled), so it cannot be "
            "exported as a Dense layer.")
    return head


def _linear_as_dense(estimator: Any, n_features: int, n_classes: int) -> Any:
    """StandardScaler (optional) + linear model → one Dense(softmax) with the scaler folded in."""
    steps = [s for _, s in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    *transforms, last = steps
    coef = getattr(last, "coef_", None)
    if coef is None or not hasattr(last, "intercept_") or hasattr(coef, "toarray"):
        raise HeadstartError(
            f"A {type(last).__name__} head cannot be expressed in Keras; only Keras heads and "
            "linear heads (logreg, linear svm with softmax probabilities) can be exported.")
    weight = np.asarray(coef, dtype=np.float64).T  # F × K
    bias = np.asarray(last.intercept_, dtype=np.float64).reshape(-1)
    for transform in reversed(transforms):
        mean = np.asarray(getattr(transform, "mean_", None) if transform.with_mean else 0.0)
        scale = getattr(transform, "scale_", None) if transform.with_std else None
        if type(transform).__name__ != "StandardScaler":
            raise HeadstartError(f"Cannot fold a {type(transform).__name__} step into a Dense "
                                 "layer; only StandardScaler is supported.")
        scale = np.ones(n_features) if scale is None else np.asarray(scale, dtype=np.float64)
        weight = weight / scale[:, None]
        bias = bias - (np.broadcast_to(mean, (n_features,)) @ weight)
    if weight.shape[1] == 1 and n_classes == 2:  # binary: sigmoid(z) = softmax([-z/2, z/2])
        weight = np.hstack([-weight / 2, weight / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    keras = load_keras()
    dense = keras.layers.Dense(n_classes, activation="softmax", name="linear_head")
    model = keras.Sequential([keras.Input((n_features,)), dense], name="linear_head")
    dense.set_weights([weight.astype(np.float32), bias.astype(np.float32)])
    return model
