"""The heads `fit` can train, each a scikit-learn estimator, with the options the CLI exposes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import LinearSVC

from classifiers.mlp import MLPHead
from classifiers.sgd import SGDHead
from store.errors import HeadstartError


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: how to build it and which of its parameters are options."""

    name: str
    summary: str
    build: Callable[[], Any]
    options: dict[str, str]  # option name → get_params() key
    file_format: str  # "keras" or "joblib"
    streams: bool = False  # can train from blocks read from HDF5 (memory-bounded)

    def defaults(self) -> dict[str, Any]:
        """Each option's default value."""
        params = self.build().get_params()
        return {option: params[key] for option, key in self.options.items()}

    def create(self, overrides: dict[str, Any] | None = None) -> Any:
        """A fresh, unfitted estimator; option values given as text (the CLI's) are parsed."""
        estimator = self.build()
        defaults = self.defaults()
        values = {}
        for option, value in (overrides or {}).items():
            if option not in self.options:
                raise HeadstartError(
                    f"Head {self.name} has no option {option!r}; its options: "
                    f"{', '.join(self.options)}."
                )
            values[self.options[option]] = (parse_option(option, value, defaults[option])
                                            if isinstance(value, str) else value)
        return estimator.set_params(**values)

    def options_of(self, estimator: Any) -> dict[str, Any]:
        """The option values of an estimator, as plain JSON values."""
        params = estimator.get_params()
        return {option: _plain(params[key]) for option, key in self.options.items()}


def parse_option(option: str, text: str, default: Any) -> Any:
    """Parse an option's text into the type of its default."""
    lowered = text.strip().lower()
    try:
        if isinstance(default, bool):
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, (tuple, list)):
            return tuple(int(part) for part in text.split(",") if part.strip())
        if default is None and lowered in ("none", ""):
            return None
        return text
    except ValueError:
        kind = type(default).__name__ if not isinstance(default, (tuple, list)) else "comma-separated ints"
        raise HeadstartError(f"Option {option}={text!r} is not a valid {kind}.") from None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _logreg() -> Any:
    # newton-cg reaches the same optimum as lbfgs in about 10 iterations instead of about 100
    # (2-5x faster on 256-4,096 features), and nearer to it at the default tol.
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="newton-cg",
                                                              max_iter=1000, random_state=0))


def _svm() -> Any:
    svc = LinearSVC(C=0.01, max_iter=2000, random_state=0)
    return make_pipeline(StandardScaler(), CalibratedClassifierCV(svc, method="sigmoid", cv=3))


def _knn() -> Any:
    # On L2-normalized rows, Euclidean distance orders neighbours exactly as cosine distance does.
    return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=15, weights="distance",
                                                             algorithm="brute"))


def _hgb() -> Any:
    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=31,
                                          early_stopping="auto", random_state=0)


_MLP_OPTIONS = {name: name for name in MLPHead().get_params()}
_SGD_OPTIONS = {name: name for name in SGDHead().get_params()}

HEADS: dict[str, HeadKind] = {
    kind.name: kind
    for kind in (
        HeadKind("mlp", "Keras MLP (the paper's head: Dense 256 relu, Dropout 0.5, softmax, Adam)",
                 MLPHead, _MLP_OPTIONS, "keras", streams=True),
        HeadKind("logreg", "Logistic regression on standardized features (scikit-learn)",
                 _logreg,
                 {"C": "logisticregression__C", "max_iter": "logisticregression__max_iter",
                  "tol": "logisticregression__tol"}, "joblib"),
        HeadKind("svm", "Linear SVM on standardized features, probabilities calibrated "
                 "(sigmoid, 3-fold)", _svm,
                 {"C": "calibratedclassifiercv__estimator__C",
                  "max_iter": "calibratedclassifiercv__estimator__max_iter",
                  "calibration": "calibratedclassifiercv__method"}, "joblib"),
        HeadKind("sgd", "Linear model trained incrementally by SGD (partial_fit; streams "
                 "within a memory budget)", SGDHead, _SGD_OPTIONS, "joblib", streams=True),
        HeadKind("knn", "k-nearest neighbours by cosine similarity (L2-normalized features)",
                 _knn, {"n_neighbors": "kneighborsclassifier__n_neighbors",
                        "weights": "kneighborsclassifier__weights"}, "joblib"),
        HeadKind("hgb", "Histogram gradient boosting (scikit-learn), early stopping",
                 _hgb, {"max_iter": "max_iter", "learning_rate": "learning_rate",
                        "max_leaf_nodes": "max_leaf_nodes", "l2_regularization": "l2_regularization"},
                 "joblib"),
    )
}


def get_head_kind(name: str) -> HeadKind:
    """Look a head kind up by name; unknown names fail with the list of known ones."""
    try:
        return HEADS[name]
    except KeyError:
        raise HeadstartError(f"Unknown head {name!r}; known heads: {', '.join(HEADS)}.") from None
