"""The paper's head as a scikit-learn estimator: Dense(256, relu) → Dropout(0.5) → softmax, Adam."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from classifiers.progress import epoch_progress
from extract.runtime import load_keras

LR_SCHEDULES = ("constant", "cosine", "plateau")
#: Training steps run per call into TensorFlow: one call per step costs more than a small step.
STEPS_PER_EXECUTION = 64


def index_batches(n_rows: int, batch_size: int, seed: int | None = None) -> Any:
    """A `tf.data` dataset of row-index batches: in order, or reshuffled every epoch by `seed`.

    After `keras.utils.set_random_seed(seed)` the epochs' orders depend on `seed` alone, so
    another model fed through this gets the rows in the same order as an `MLPHead` fitted in
    memory with `random_state=seed`.
    """
    import tensorflow as tf

    rows = tf.data.Dataset.range(n_rows)
    if seed is not None:
        rows = rows.shuffle(n_rows, seed=seed)
    return rows.batch(batch_size)


def column_moments(blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and variance over row blocks, in float64 (Chan et al.'s pairwise
    update, so blocks of float16 rows with large means lose no precision)."""
    count, mean, m2 = 0, None, None
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        if not len(block):
            continue
        n, block_mean = len(block), block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        if mean is None:
            count, mean, m2 = n, block_mean, block_m2
            continue
        delta, total = block_mean - mean, count + n
        mean = mean + delta * (n / total)
        m2 = m2 + block_m2 + delta**2 * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("No rows to standardize.")
    return mean.astype(np.float32), (m2 / count).astype(np.float32)


class MLPHead(ClassifierMixin, BaseEstimator):
    """A Keras multilayer perceptron on feature vectors.

    The defaults are the paper's recipe: one hidden layer of 256 ReLU units, dropout 0.5,
    softmax output, Adam (learning rate 1e-3), cross-entropy, batch 128, 10 epochs. Early
    stopping watches the validation loss and restores the best weights.

    With `standardize`, the model's first layer scales every column to zero mean and unit
    variance over the training rows (a Keras Normalization layer, so an exported or
    fine-tuned model carries it): blocks of different widths and scales then count alike.

    `fit` takes `validation_data=(X_val, y_val)`; without it, `validation_fraction` of the
    training rows is held out (stratified, seeded) when early stopping is on.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        *,
        dropout: float = 0.5,
        l2: float = 0.0,
        batch_norm: bool = False,
        learning_rate: float = 1e-3,
        lr_schedule: str = "constant",
        label_smoothing: float = 0.0,
        class_weight: str | dict | None = None,
        epochs: int = 10,
        batch_size: int = 128,
        early_stopping: bool = True,
        patience: int = 3,
        standardize: bool = False,
        validation_fraction: float = 0.1,
        random_state: int = 0,
        verbose: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.l2 = l2
        self.batch_norm = batch_norm
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.early_stopping = early_stopping
        self.patience = patience
        self.standardize = standardize
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.verbose = verbose

    def _check_params(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1). Received: dropout={self.dropout}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES}. Received: {self.lr_schedule!r}")
        if not (self.class_weight in (None, "balanced") or isinstance(self.class_weight, dict)):
            raise ValueError("Expected class_weight None, 'balanced' or a dict of class to weight. "
                             f"Received: {self.class_weight!r}")
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"Expected epochs and batch_size >= 1. Received: {self.epochs}, {self.batch_size}")
        if any(int(units) < 1 for units in self.hidden):
            raise ValueError(f"Expected hidden sizes >= 1. Received: hidden={self.hidden}")

    def _build(self, n_features: int, n_classes: int, steps: int,
               moments: tuple[np.ndarray, np.ndarray] | None) -> Any:
        keras = load_keras()

        regularizer = keras.regularizers.L2(self.l2) if self.l2 else None
        layers: list[Any] = [keras.Input(shape=(n_features,))]
        if moments is not None:
            layers.append(keras.layers.Normalization(mean=moments[0], variance=moments[1],
                                                     name="standardize"))
        for units in self.hidden:
            layers.append(keras.layers.Dense(int(units), activation=None if self.batch_norm else "relu",
                                             kernel_regularizer=regularizer))
            if self.batch_norm:
                layers += [keras.layers.BatchNormalization(), keras.layers.Activation("relu")]
            if self.dropout:
                layers.append(keras.layers.Dropout(self.dropout))
        layers.append(keras.layers.Dense(n_classes, activation="softmax",
                                         kernel_regularizer=regularizer))
        model = keras.Sequential(layers, name="mlp_head")
        learning_rate: Any = float(self.learning_rate)
        if self.lr_schedule == "cosine":
            learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=float(self.label_smoothing)),
            metrics=["accuracy"],
            steps_per_execution=STEPS_PER_EXECUTION,
        )
        return model

    def fit(self, X: Any, y: Any, validation_data: tuple[Any, Any] | None = None) -> "MLPHead":
        """Train on features X (n_samples × n_features) and labels y."""
        keras = load_keras()

        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.label_encoder_ = LabelEncoder().fit(y)
        self.classes_ = self.label_encoder_.classes_
        if len(self.classes_) < 2:
            raise ValueError("MLPHead needs samples of at least 2 classes; got 1 class.")
        encoded = self.label_encoder_.transform(y)
        X_val = y_val = None
        if validation_data is not None and len(validation_data[0]):
            X_val = validate_data(self, validation_data[0], dtype=np.float32, reset=False)
            y_val = self.label_encoder_.transform(np.asarray(validation_data[1]))
        elif self.early_stopping and self.validation_fraction > 0 and len(X) >= 20:
            counts = np.bincount(encoded)
            n_val = int(np.ceil(self.validation_fraction * len(X)))
            # Stratify only where every class can appear on both sides of the split.
            feasible = counts.min() >= 2 and len(counts) <= min(n_val, len(X) - n_val)
            stratify = encoded if feasible else None
            X, X_val, encoded, y_val = train_test_split(
                X, encoded, test_size=self.validation_fraction,
                random_state=self.random_state, stratify=stratify)
        n_classes = len(self.classes_)
        validation = None
        if X_val is not None and len(X_val):
            validation = (X_val, keras.utils.to_categorical(y_val, n_classes))
            class_weights = self._class_weights(encoded, n_classes)
            if class_weights is not None:  # early stopping watches the loss being minimised
                validation += (np.array([class_weights[c] for c in y_val], dtype=np.float32),)
        moments = column_moments([X]) if self.standardize else None
        return self._train((X, keras.utils.to_categorical(encoded, n_classes)), validation, encoded,
                           moments)

    def _batches(self, columns: tuple[np.ndarray, ...], shuffle: bool) -> Any:
        """A dataset of batches of in-memory float rows, reshuffled every epoch when `shuffle`.

        Batches are gathered by index from one copy of the rows: faster than `fit` on arrays,
        and without a shuffle buffer of rows.
        """
        import tensorflow as tf

        tensors = tuple(tf.constant(column, dtype=tf.float32) for column in columns)
        seed = int(self.random_state) if shuffle else None
        indices = index_batches(len(columns[0]), int(self.batch_size), seed)

        def gather(index: Any) -> tuple[Any, ...]:
            return tuple(tf.gather(tensor, index) for tensor in tensors)

        return indices.map(gather).prefetch(1)

    def fit_batches(self, batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]],
                    labels: np.ndarray, n_features: int,
                    validation: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
                    validation_batches: int = 0) -> "MLPHead":
        """Train from batches it never holds together (memory-bounded training).

        `batches(epoch)` yields (features, labels) batches of one epoch; `labels` are all the
        training labels (for the classes, class weights and schedule length); `validation()`
        yields the validation rows' `validation_batches` batches, for early stopping. An epoch
        must yield exactly ceil(len(labels) / batch_size) batches. With `standardize`, the
        column moments come from one more pass, `batches(-1)` (any order).
        """
        load_keras()
        import tensorflow as tf

        self._check_params()
        self.label_encoder_ = LabelEncoder().fit(np.asarray(labels))
        self.classes_ = self.label_encoder_.classes_
        if len(self.classes_) < 2:
            raise ValueError("MLPHead needs samples of at least 2 classes; got 1 class.")
        self.n_features_in_ = int(n_features)
        n_classes = len(self.classes_)
        eye = np.eye(n_classes, dtype=np.float32)
        epochs = itertools.count()

        def encoded(source: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[Any]:
            for X, y in source:
                yield np.asarray(X, dtype=np.float32), eye[self.label_encoder_.transform(y)]

        spec = (tf.TensorSpec((None, n_features), tf.float32),
                tf.TensorSpec((None, n_classes), tf.float32))
        steps = -(-len(labels) // int(self.batch_size))
        train = tf.data.Dataset.from_generator(lambda: encoded(batches(next(epochs))),
                                               output_signature=spec)
        train = train.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(1)
        val = None
        if validation is not None and validation_batches:
            val = tf.data.Dataset.from_generator(lambda: encoded(validation()), output_signature=spec)
            val = val.apply(tf.data.experimental.assert_cardinality(validation_batches))
        moments = column_moments(X for X, _ in batches(-1)) if self.standardize else None
        return self._train(train, val, self.label_encoder_.transform(labels), moments)

    def _train(self, train: Any, validation: Any, encoded: np.ndarray,
               moments: tuple[np.ndarray, np.ndarray] | None = None) -> "MLPHead":
        """Build and fit the model on (X, Y) arrays or a dataset of batches."""
        keras = load_keras()

        keras.utils.set_random_seed(int(self.random_state))
        if isinstance(train, tuple):  # in-memory rows (seeded first: the shuffle depends on it)
            train = self._batches(train, shuffle=True)
            validation = None if validation is None else self._batches(validation, shuffle=False)
        n_classes = len(self.classes_)
        steps = int(self.epochs) * -(-len(encoded) // int(self.batch_size))
        model = self._build(int(self.n_features_in_), n_classes, steps, moments)
        callbacks: list[Any] = []
        if validation is not None:
            if self.early_stopping:
                callbacks.append(keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=int(self.patience), restore_best_weights=True))
            if self.lr_schedule == "plateau":
                callbacks.append(keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=0.3, patience=max(1, int(self.patience) // 2)))
        if self.verbose:
            callbacks.append(epoch_progress("mlp"))  # on stderr, not Keras's bar on stdout
        history = model.fit(
            train, epochs=int(self.epochs), validation_data=validation, callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself
            class_weight=self._class_weights(encoded, n_classes), verbose=0,
        )
        self.model_ = model
        self.history_ = {k: [float(v) for v in values] for k, values in history.history.items()}
        self.n_iter_ = len(next(iter(self.history_.values()), []))
        return self

    def _class_weights(self, encoded: np.ndarray, n_classes: int) -> dict[int, float] | None:
        if isinstance(self.class_weight, dict):  # {class label: weight}, as in scikit-learn
            return {i: float(self.class_weight.get(label, 1.0))
                    for i, label in enumerate(self.classes_.tolist())}
        if self.class_weight != "balanced":
            return None
        counts = np.bincount(encoded, minlength=n_classes).astype(float)
        return {i: float(len(encoded) / (n_classes * c)) if c else 0.0 for i, c in enumerate(counts)}

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of `classes_`."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        if len(X) <= 4096:  # one batch: predict_on_batch skips predict()'s ~0.1 s set-up per call
            proba = np.asarray(self.model_.predict_on_batch(X), dtype=np.float64)
        else:
            proba = np.asarray(self.model_.predict(X, batch_size=4096, verbose=0), dtype=np.float64)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        proba = self.predict_proba(X)  # checks fitted-ness before classes_ is touched
        return self.classes_[np.argmax(proba, axis=1)]
