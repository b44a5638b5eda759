"""Heads (scikit-learn estimators) trained and evaluated on cached features."""
