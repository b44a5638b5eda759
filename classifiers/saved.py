"""A saved head, loaded: its sidecar record, its estimator and the caches it reads.

`load_saved_head` is the one way to load a head of any kind. The object it returns answers
class probabilities over all of the cache's classes, either for a split of its own caches
(`split_proba`) or for fresh features, one matrix per cache fingerprint (`feature_proba`: what
predict and serve compute from images). An ensemble is the same kind of object, answering
through its members: their probabilities are lined up by sample id with the ensemble's home
cache and combined by its estimator (see classifiers.combine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from classifiers.persistence import ENSEMBLE_KIND, read_estimator
from classifiers.scoring import head_proba, source_proba
from classifiers.sources import CacheSet, align_rows
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.heads import load_head_record
from store.store import Store


@dataclass
class SavedHead:
    """A fitted head of one or more caches of a dataset (features side by side)."""

    record: dict[str, Any]
    estimator: Any
    source: CacheSet
    members: list["SavedHead"] = field(default_factory=list)  # an ensemble's; none for a head

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def kind(self) -> str:
        return str(self.record["kind"])

    @property
    def home(self) -> FeatureCache:
        """The cache the head is saved beside: its row order and labels are the head's."""
        return self.source.primary

    @property
    def class_names(self) -> list[str]:
        return self.home.class_names

    @property
    def caches(self) -> list[FeatureCache]:
        """Every cache whose features the head reads, its home first."""
        return self.source.caches

    def split_proba(self, split: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Probabilities for the rows of a split of the home cache (where `mask` is true)."""
        return source_proba(self.estimator, self.source, split, mask)

    def feature_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Probabilities for fresh rows, given their features under each cache's fingerprint."""
        X = np.hstack([features[fingerprint] for fingerprint in self.source.fingerprints])
        return head_proba(self.estimator, X, len(self.class_names))


@dataclass
class SavedEnsemble(SavedHead):
    """Fitted ensemble: its members' probabilities, combined by its estimator."""

    @property
    def caches(self) -> list[FeatureCache]:
        seen: dict[str, FeatureCache] = {self.home.fingerprint: self.home}
        for member in self.members:
            seen.update({c.fingerprint: c for c in member.caches if c.fingerprint not in seen})
        return list(seen.values())

    def split_proba(self, split: str, mask: np.ndarray | None = None) -> np.ndarray:
        return self.estimator.predict_proba(member_matrix(self.members, self.home, split, mask))

    def feature_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.estimator.predict_proba(self.members_proba(features))

    def members_proba(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """The members' probabilities for fresh rows, side by side (n × m·C)."""
        return np.hstack([member.feature_proba(features) for member in self.members])


def member_matrix(members: Sequence[SavedHead], home: FeatureCache, split: str,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Members' probabilities side by side (n × m·C) for the rows of `home`'s split where
    `mask` is true, in `home`'s order; each member reads its own cache's rows of those samples."""
    target = home.ids(split) if mask is None else home.ids(split)[mask]
    return np.hstack([proba_of_samples(member, split, target, home.name) for member in members])


def proba_of_samples(head: SavedHead, split: str, ids: np.ndarray, label: str) -> np.ndarray:
    """A head's probabilities for the samples `ids` of a split, in that order (`label` names
    whose samples they are, for the error when the head's cache lacks one)."""
    own = head.home.ids(split)
    order = align_rows(own, ids, head.home.name, label)
    if order is None:
        return head.split_proba(split)
    rows, inverse = np.unique(order, return_inverse=True)
    wanted = np.zeros(len(own), dtype=bool)
    wanted[rows] = True
    return head.split_proba(split, wanted)[inverse]


def load_saved_head(store: Store, cache: FeatureCache, name: str) -> SavedHead:
    """Head (or ensemble) `name` of `cache`, its file verified against its sidecar, ready to score."""
    record, path = load_head_record(store, cache, name)
    estimator = read_estimator(record, path)
    if record.get("kind") != ENSEMBLE_KIND:
        source = CacheSet.from_fingerprints(store, record.get("caches") or [record["cache"]])
        return SavedHead(record, estimator, source)
    members = [load_member(store, member, name) for member in record["members"]]
    return SavedEnsemble(record, estimator, CacheSet([cache]), members)


def load_member(store: Store, member: dict[str, Any], ensemble: str) -> SavedHead:
    """One member of ensemble `ensemble`, refused if it was refitted since the ensemble was made."""
    owner = store.finished(str(member["cache"]))
    if owner is None:
        raise HeadstartError(
            f"Member {member['name']} of ensemble {ensemble!r} lost its cache; fit the ensemble "
            "again.")
    head = load_saved_head(store, owner, str(member["name"]))
    if head.record.get("sha256") != member.get("sha256"):
        raise HeadstartError(
            f"Member {member['name']} of ensemble {ensemble!r} was refitted since the ensemble "
            "was made; fit the ensemble again.")
    return head
