"""The heads `fit` can train, each a scikit-learn estimator, with the options the CLI exposes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from classifiers.mlp import MLPHead
from store.errors import HeadstartError


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: how to build it and which of its parameters are options."""

    name: str
    summary: str
    build: Callable[[], Any]
    options: dict[str, str]  # option name → get_params() key
    file_format: str  # "keras" or "joblib"

    def defaults(self) -> dict[str, Any]:
        """Each option's default value."""
        params = self.build().get_params()
        return {option: params[key] for option, key in self.options.items()}

    def create(self, overrides: dict[str, str] | None = None) -> Any:
        """A fresh, unfitted estimator with options parsed from text (as given on the CLI)."""
        estimator = self.build()
        defaults = self.defaults()
        values = {}
        for option, text in (overrides or {}).items():
            if option not in self.options:
                raise HeadstartError(
                    f"Head {self.name} has no option {option!r}; its options: "
                    f"{', '.join(self.options)}."
                )
            values[self.options[option]] = parse_option(option, text, defaults[option])
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
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=0))


_MLP_OPTIONS = {name: name for name in MLPHead().get_params()}

HEADS: dict[str, HeadKind] = {
    kind.name: kind
    for kind in (
        HeadKind("mlp", "Keras MLP (the paper's head: Dense 256 relu, Dropout 0.5, softmax, Adam)",
                 MLPHead, _MLP_OPTIONS, "keras"),
        HeadKind("logreg", "Logistic regression on standardized features (scikit-learn)",
                 _logreg,
                 {"C": "logisticregression__C", "max_iter": "logisticregression__max_iter",
                  "tol": "logisticregression__tol"}, "joblib"),
    )
}


def get_head_kind(name: str) -> HeadKind:
    """Look a head kind up by name; unknown names fail with the list of known ones."""
    try:
        return HEADS[name]
    except KeyError:
        raise HeadstartError(f"Unknown head {name!r}; known heads: {', '.join(HEADS)}.") from None
