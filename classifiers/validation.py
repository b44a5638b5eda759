"""The validation rows: held out of every head's training by a hash of the sample id."""

from __future__ import annotations

import numpy as np

from store.fingerprint import unit_fraction

VALIDATION_FRACTION = 0.1
VALIDATION_SALT = "headstart-validation:"


def validation_mask(ids: np.ndarray, fraction: float = VALIDATION_FRACTION) -> np.ndarray:
    """Rows held out for validation, chosen by a hash of each sample id (same for every head)."""
    return np.fromiter((unit_fraction(str(i), VALIDATION_SALT) < fraction for i in ids),
                       dtype=bool, count=len(ids))

