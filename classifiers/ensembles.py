"""Ensembles of fitted heads: choose members, fit the combination on validation rows, save it.

Members may be heads of different caches of the same dataset (two backbones, two poolings):
their probabilities are lined up by sample id with the first member's cache, where the
ensemble is saved. Only validation rows (which no member trained on) choose the combination;
the test split is scored once, for the report.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from classifiers.combine import METHODS, EnsembleHead, describe
from classifiers.evaluation import accuracy_figures
from classifiers.persistence import ENSEMBLE_KIND, save_skops_head
from classifiers.saved import load_member, member_matrix
from classifiers.sources import check_same_dataset, dataset_key
from classifiers.validation import VALIDATION_FRACTION, validation_mask
from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.heads import claiming_head, check_head_name, list_heads
from store.store import Store


def ensemble_caches(store: Store, selectors: Sequence[str]) -> list[FeatureCache]:
    """The caches given (which must share a dataset), or the newest and its dataset's others."""
    if selectors:
        caches = [store.find_cache(s) for s in selectors]
        check_same_dataset(caches)
        return caches
    newest = store.find_cache(None)
    return [newest] + [c for c in store.caches()
                       if c.fingerprint != newest.fingerprint and dataset_key(c) == dataset_key(newest)]


def candidate_members(store: Store, caches: Sequence[FeatureCache],
                      names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Sidecars of the fitted heads (not ensembles) of `caches`, optionally only those named."""
    records = [r for c in caches for r in list_heads(store, c) if r.get("kind") != ENSEMBLE_KIND]
    blind = [r for r in records if not trained_apart_from_validation(r)]
    named_blind = [r for r in blind if names and r["name"] in names]
    if named_blind:
        raise HeadstartError(
            f"Head {member_label(named_blind[0])} was fitted on the validation rows too "
            f"(--validation-fraction below {VALIDATION_FRACTION}), so it cannot be weighed on "
            "them; refit it with the default validation split.")
    records = [r for r in records if trained_apart_from_validation(r)]
    if names:
        known = sorted({r["name"] for r in records})
        unknown = [n for n in names if n not in known]
        if unknown:
            raise HeadstartError(
                f"No fitted head named {', '.join(map(repr, unknown))} on the chosen caches; "
                f"heads there: {', '.join(known) or 'none'}.")
        records = [r for r in records if r["name"] in names]
    if len(records) < 2:
        raise HeadstartError(
            f"An ensemble needs at least two fitted heads of the same dataset; found "
            f"{len(records)} ({', '.join(member_label(r) for r in records) or 'none'}). Fit more "
            f"with '{command('fit --head NAME')}'.")
    first = tuple(records[0].get("classes", []))
    for record in records[1:]:
        if tuple(record.get("classes", [])) != first:
            raise HeadstartError(
                f"Heads {member_label(records[0])} and {member_label(record)} have different "
                "class sets; they cannot be combined.")
    return records


def trained_apart_from_validation(record: dict[str, Any]) -> bool:
    """Whether a head left all of the default validation rows (which ensembles weigh their
    members on) out of its training: its own fraction is at least the default."""
    return record.get("validation_fraction", VALIDATION_FRACTION) >= VALIDATION_FRACTION


def member_label(record: dict[str, Any]) -> str:
    """How a member is shown: name@cache-name."""
    return f"{record['name']}@{record.get('cache_name', str(record['cache'])[:12])}"


def fit_ensemble(store: Store, caches: Sequence[FeatureCache], method: str = "greedy",
                 names: Sequence[str] | None = None, name: str | None = None,
                 rounds: int = 50, replace: bool = False,
                 say: Callable[[str], None] = lambda line: None) -> tuple[dict[str, Any], Path]:
    """Fit an ensemble of the heads of `caches` on validation rows, report it on test, save it
    (a name already fitted is refused unless `replace`)."""
    if method not in METHODS:
        raise HeadstartError(f"Unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}.")
    if rounds < 1:
        raise HeadstartError(f"--rounds must be at least 1; got {rounds}.")
    name = check_head_name(("ensemble" if method == "greedy" else f"ensemble-{method}")
                           if name is None else name)
    members = candidate_members(store, caches, names)
    say(f"Scoring {len(members)} members on the validation and test rows.")
    heads = [load_member(store, record, name) for record in members]
    home = heads[0].home
    with claiming_head(store, home, name, replace):
        record, estimator = _fit(heads, members, home, method, rounds)
        return record, save_skops_head(store, home, name, estimator, record)


def _fit(heads: list[Any], members: list[dict[str, Any]], home: FeatureCache, method: str,
         rounds: int) -> tuple[dict[str, Any], EnsembleHead]:
    """The combination fitted on validation rows, and its record (members' figures, weights)."""
    held_out = validation_mask(home.ids("train"))
    y_val, y_test = home.labels("train")[held_out], home.labels("test")
    started = time.perf_counter()
    X_val = member_matrix(heads, home, "train", held_out)
    X_test = member_matrix(heads, home, "test")
    estimator = EnsembleHead(len(members), method=method, rounds=rounds)
    estimator.fit(X_val, y_val)
    n_classes = len(home.class_names)
    report = []
    for index, record in enumerate(members):
        part = slice(index * n_classes, (index + 1) * n_classes)
        report.append({"name": record["name"], "cache": record["cache"],
                       "cache_name": record.get("cache_name"), "kind": record.get("kind"),
                       "sha256": record.get("sha256"),
                       "validation": accuracy_figures(y_val, X_val[:, part]),
                       "test": accuracy_figures(y_test, X_test[:, part])})
    record = {
        "kind": ENSEMBLE_KIND,
        "options": {"method": method, "rounds": rounds},
        "classes": home.class_names,
        "caches": sorted({str(r["cache"]) for r in members}),
        "members": report,
        **describe(estimator),
        "fit_seconds": round(time.perf_counter() - started, 3),
        "rows": {"validation": int(held_out.sum())},
        "metrics": {"validation": accuracy_figures(y_val, estimator.validation_proba(X_val)),
                    "test": accuracy_figures(y_test, estimator.predict_proba(X_test))},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return record, estimator
