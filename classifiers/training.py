"""Fitting and evaluating heads on cached features."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from classifiers.boosting import fit_boosting
from classifiers.evaluation import accuracy_figures, classification_report
from classifiers.memory import MemoryPlan, format_size, plan_memory
from classifiers.mlp import MLPHead
from classifiers.persistence import save_fitted_head
from classifiers.registry import HEADS, get_head_kind
from classifiers.saved import load_saved_head
from classifiers.scoring import PREDICT_BLOCK_BYTES, head_proba, source_proba, views_proba
from classifiers.sources import CacheSet, choose_blocks
from classifiers.streaming import (buffer_rows_for, count_ordered_batches, ordered_batches,
                                   shuffled_batches)
from classifiers.validation import VALIDATION_FRACTION, validation_mask
from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.heads import claiming_head, check_head_name, list_heads
from store.store import Store


def augmented_views(store: Store, cache: FeatureCache) -> list[FeatureCache]:
    """The cached views of `cache` with the newest augmentation settings."""
    views = store.views_of(cache)
    if not views:
        raise HeadstartError(
            f"Cache {cache.name} has no augmented views; run its extract command again with "
            "--augment K first.")
    newest = max(views, key=lambda v: v.created).augmentation
    return [v for v in views if v.augmentation == newest]


@dataclass
class TrainingRows:
    """The rows a head is fitted on, and the validation rows it is judged on."""

    X_fit: np.ndarray
    y_fit: np.ndarray
    fit_ids: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    val_ids: np.ndarray
    held_out: np.ndarray  # the validation mask over the primary cache's training rows
    views: list[str] = field(default_factory=list)  # fingerprints of the view caches used


def training_rows(source: CacheSet, views: Sequence[FeatureCache] = (),
                  fraction: float = VALIDATION_FRACTION,
                  exclude: np.ndarray | None = None, mirrored: bool = False) -> TrainingRows:
    """Split the training rows into fit and validation rows (by sample id), in memory.

    Augmented `views` of the primary cache add rows for the fit images only; no view of a
    validation image is ever trained on. Sample ids in `exclude` are left out of the fit rows
    (and their views); the validation rows stay the same. With `mirrored`, the mirrored view of
    every fit image (never of a validation image) is a training row too.
    """
    X = source.features("train")
    y = source.labels("train")
    ids = source.ids("train")
    held_out = validation_mask(ids, fraction)
    fit = ~held_out if exclude is None else ~held_out & ~np.isin(ids, exclude)
    parts = [(X[fit], y[fit], ids[fit])]
    if mirrored:
        parts.append((source.mirror().features("train")[fit], y[fit], ids[fit]))
    for view in views:
        view_ids = view.ids("train")
        keep = ~validation_mask(view_ids, fraction)
        if exclude is not None:
            keep &= ~np.isin(view_ids, exclude)
        parts.append((view.features("train")[keep], view.labels("train")[keep], view_ids[keep]))
    X_fit, y_fit, fit_ids = (np.concatenate(column) for column in zip(*parts))
    return TrainingRows(X_fit, y_fit, fit_ids, X[held_out], y[held_out], ids[held_out], held_out,
                        [v.fingerprint for v in views])


def excluded_mask(ids: np.ndarray, exclude: Sequence[str], cache_name: str) -> np.ndarray:
    """True for the training rows whose ids are in `exclude`; an id that is not a training id
    of the cache is refused (a typo would otherwise be silently ignored)."""
    wanted = np.asarray(list(exclude), dtype=str)
    unknown = wanted[~np.isin(wanted, ids)]
    if len(unknown):
        raise HeadstartError(
            f"{len(unknown)} of the {len(wanted)} ids to exclude are not training ids of cache "
            f"{cache_name} (the first: {unknown[0]!r}).")
    return np.isin(ids, wanted)


def wanted_views(source: CacheSet, tta: bool | None, command: str) -> bool:
    """Whether to train on (and answer with) the mirrored views: `tta`, or by default whether
    every cache holds them; asked for on caches without them, refused in one sentence."""
    views = source.has_views if tta is None else bool(tta)
    if views and not source.has_views:
        raise HeadstartError(f"Cache {source.name} holds no mirrored views; extract it with "
                             f"--tta flip, or {command} without --tta.")
    return views


def refuse_streamed_views(plan: MemoryPlan, views: bool, command: str) -> None:
    """Mirrored views train in memory: refuse them where the plan streams."""
    if plan.stream and views:
        raise HeadstartError(
            "Mirrored views train in memory, and the features with their mirrors need more than "
            f"the memory budget; raise --memory-budget or {command} with --no-tta.")


def as_cache_set(caches: FeatureCache | CacheSet | Sequence[FeatureCache]) -> CacheSet:
    """One cache, several caches of one dataset, or a CacheSet, as a CacheSet."""
    if isinstance(caches, CacheSet):
        return caches
    return CacheSet([caches] if isinstance(caches, FeatureCache) else list(caches))


def fit_head(store: Store, caches: FeatureCache | CacheSet | Sequence[FeatureCache],
             kind_name: str, options: dict[str, Any] | None = None, name: str | None = None,
             verbose: int = 0, memory_budget: str | int | None = None,
             extra: dict[str, Any] | None = None, augmented: bool = False,
             validation_fraction: float = VALIDATION_FRACTION, replace: bool = False,
             exclude: Sequence[str] = (), use_blocks: str | None = None,
             tta: bool | None = None) -> tuple[dict[str, Any], Path]:
    """Fit one head on the training rows (minus the validation rows) of one or more caches of
    the same dataset, and save it beside the first cache.

    With `augmented`, the cached augmented views of the training images are trained on too.
    `validation_fraction` 0 trains on every training row (no validation figures, no early
    stopping); a head with a fraction below the default cannot join an ensemble. Sample ids in
    `exclude` (e.g. an audit's exclude.txt) are left out of the fit. A name already fitted on
    the cache is refused unless `replace`; the name is held (locked) for the whole fit.
    `use_blocks` (a count N: the last N blocks, or block names) trains on some of the caches'
    blocks. With `tta` (default: when every cache holds mirrored views), the mirrored views of
    the fit images are training rows too and the head's answers average each image with its
    mirror. Returns the sidecar record and its path. Validation and test accuracy are recorded.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise HeadstartError(
            f"--validation-fraction must be at least 0 and below 1; got {validation_fraction}.")
    kind = get_head_kind(kind_name)
    name = check_head_name(kind_name if name is None else name)
    source = as_cache_set(caches)
    if use_blocks is not None:
        source = CacheSet(source.caches, [choose_blocks(c, use_blocks) for c in source.caches])
    views_on = wanted_views(source, tta, "fit")
    estimator = kind.create(options)
    if validation_fraction == 0 and isinstance(estimator, MLPHead):
        estimator.set_params(early_stopping=False)  # no rows to stop on: train every epoch
    views = augmented_views(store, source.primary) if augmented else []
    if views and len(source.caches) > 1:
        raise HeadstartError("--augmented trains on one cache at a time; give a single --cache.")
    plan = plan_memory(source.float32_bytes("train") * (1 + len(views) + views_on), memory_budget)
    refuse_streamed_views(plan, views_on, "fit")
    if plan.stream and views:
        raise HeadstartError(
            f"--augmented trains in memory, and the original and augmented features need about "
            f"{format_size(plan.needed)}, over the budget of {format_size(plan.budget or 0)}; "
            "raise --memory-budget or drop --augmented.")
    if plan.stream and not kind.streams:
        streaming = " or ".join(k.name for k in HEADS.values() if k.streams)
        raise HeadstartError(
            f"Head {kind.name} cannot stream, and its features need about "
            f"{format_size(plan.needed)} in memory, over the budget of "
            f"{format_size(plan.budget or 0)}; use --head {streaming}, which train within it.")
    if kind.file_format == "keras" and verbose:
        estimator.set_params(verbose=verbose)
    excluded = None
    if exclude:
        if plan.stream:
            raise HeadstartError("--exclude trains in memory, over the memory budget here; "
                                 "raise --memory-budget or drop --exclude.")
        ids = source.ids("train")
        excluded = ids[excluded_mask(ids, exclude, source.name)]
    with claiming_head(store, source.primary, name, replace):
        return _fit_and_save(store, source, kind, estimator, name, options, plan, views,
                             validation_fraction, verbose, extra, excluded, views_on)


def _fit_and_save(store: Store, source: CacheSet, kind: Any, estimator: Any, name: str,
                  options: dict[str, Any] | None, plan: MemoryPlan, views: Sequence[FeatureCache],
                  validation_fraction: float, verbose: int, extra: dict[str, Any] | None,
                  excluded: np.ndarray | None, views_on: bool = False
                  ) -> tuple[dict[str, Any], Path]:
    started = time.perf_counter()
    try:
        rows, held_out, X_val = train_estimator(estimator, source, plan, views,
                                                validation_fraction, excluded,
                                                progress=verbose > 0, mirrored=views_on)
    except ValueError as error:  # an option value the estimator refuses (parsing passed)
        if not options:
            raise
        given = " ".join(f"-p {key}={value}" for key, value in options.items())
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise HeadstartError(f"Head {kind.name} cannot be fitted with {given} ({reason}).") from None
    fit_seconds = time.perf_counter() - started
    record = {
        "classes": source.class_names,
        "caches": source.fingerprints,
        "fit_seconds": round(fit_seconds, 3),
        "rows": rows,
        "validation_fraction": validation_fraction,
        "views": [v.fingerprint for v in views],
        **({"blocks": source.blocks_used} if any(b is not None for b in source.blocks_used)
           else {}),
        **({"tta": "flip"} if views_on else {}),
        **({"excluded": len(excluded)} if excluded is not None else {}),
        "memory": {"mode": "stream" if plan.stream else "memory", "budget_bytes": plan.budget},
        "metrics": head_metrics(estimator, source, plan.buffer_bytes if plan.stream
                                else PREDICT_BLOCK_BYTES, held_out, X_val, views_on),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    sidecar = save_fitted_head(store, source.primary, name, kind, estimator, record)
    return record, sidecar


def train_estimator(estimator: Any, source: CacheSet, plan: MemoryPlan,
                    views: Sequence[FeatureCache] = (), fraction: float = VALIDATION_FRACTION,
                    exclude: np.ndarray | None = None, progress: bool = False,
                    mirrored: bool = False
                    ) -> tuple[dict[str, int], np.ndarray, np.ndarray | None]:
    """Fit on the training rows outside the validation split (plus views), in memory or streamed.

    Returns the row counts, the validation mask of the train split, and the validation rows'
    features when they were read into memory (None when streamed). Training rows the head
    cannot learn from (one class; fewer rows than a knn head's neighbours) are refused first.
    """
    if plan.stream:
        y = source.labels("train")
        held_out = validation_mask(source.ids("train"), fraction)
        check_trainable(estimator, y[~held_out], source.class_names)
        fit_streaming(estimator, source, y, ~held_out, plan.buffer_bytes)
        return {"train": int((~held_out).sum()), "validation": int(held_out.sum())}, held_out, None
    rows = training_rows(source, views, fraction, exclude, mirrored)
    check_trainable(estimator, rows.y_fit, source.class_names)
    if isinstance(estimator, MLPHead):
        estimator.fit(rows.X_fit, rows.y_fit, validation_data=(rows.X_val, rows.y_val))
    elif isinstance(estimator, HistGradientBoostingClassifier):
        fit_boosting(estimator, rows.X_fit, rows.y_fit, progress)
    else:
        estimator.fit(rows.X_fit, rows.y_fit)
    counts = {"train": int(len(rows.y_fit)), "validation": int(len(rows.y_val))}
    return counts, rows.held_out, rows.X_val


def check_trainable(estimator: Any, y: np.ndarray, class_names: Sequence[str]) -> None:
    """Refuse, in one sentence, training rows a head cannot be fitted on."""
    present = np.unique(y)
    if len(present) < 2:
        found = (f"only class {class_names[int(present[0])]!r}" if len(present) else "no rows")
        raise HeadstartError(
            f"The training rows hold {found}; a head needs examples of at least two classes.")
    neighbours = estimator.get_params().get("kneighborsclassifier__n_neighbors")
    if neighbours is not None and int(neighbours) > len(y):
        raise HeadstartError(
            f"Head knn looks at n_neighbors={neighbours} neighbours but there are only {len(y)} "
            f"training rows; use -p n_neighbors={max(1, min(len(y), 15))} or fewer.")


def fit_streaming(estimator: Any, source: CacheSet, y: np.ndarray, fit_rows: np.ndarray,
                  buffer_bytes: int) -> None:
    """Fit an MLP or SGD head from shuffled chunk-aligned batches, never the whole matrix."""
    size = int(estimator.get_params()["batch_size"])
    seed = int(estimator.get_params()["random_state"])
    buffer_rows = buffer_rows_for(source, buffer_bytes, size)

    def batches(epoch: int) -> Any:
        if epoch < 0:  # the SGD head's statistics pass: order does not matter
            return ordered_batches(source, "train", fit_rows, y, buffer_rows)
        return shuffled_batches(source, "train", fit_rows, y, size, buffer_rows, seed, epoch)

    if isinstance(estimator, MLPHead):
        estimator.fit_batches(
            batches, y[fit_rows], source.width,
            validation=lambda: ordered_batches(source, "train", ~fit_rows, y, buffer_rows),
            validation_batches=count_ordered_batches(source, "train", ~fit_rows, buffer_rows))
    else:
        estimator.fit_blocks(batches, np.unique(y[fit_rows]), source.width)


def head_metrics(estimator: Any, source: CacheSet, block_bytes: int = 0,
                 held_out: np.ndarray | None = None, X_val: np.ndarray | None = None,
                 views: bool = False) -> dict[str, dict[str, float]]:
    """Validation and test accuracy figures of a fitted head (features read in blocks); with
    `views`, averaged over each image and its mirror, and the test figures of the images alone
    as `test_single_view`.

    A caller that already holds the validation mask (`held_out`) or the validation rows'
    features (`X_val`) passes them, and they are not worked out or read again.
    """
    y = source.labels("train")
    if held_out is None:
        held_out = validation_mask(source.ids("train"))
    y_test = source.labels("test")
    single = source_proba(estimator, source, "test", None, block_bytes)
    metrics = {"test": accuracy_figures(y_test, single)}
    if views:
        mirrored = source_proba(estimator, source.mirror(), "test", None, block_bytes)
        metrics = {"test": accuracy_figures(y_test, (single + mirrored) / 2),
                   "test_single_view": metrics["test"]}
    if held_out.any():  # a very small training split may hash no row into validation
        proba = (head_proba(estimator, X_val, len(source.class_names))
                 if X_val is not None and not views
                 else views_proba(estimator, source, "train", held_out, block_bytes, views))
        metrics["validation"] = accuracy_figures(y[held_out], proba)
    return metrics


def evaluate_heads(store: Store, cache: FeatureCache, names: list[str] | None = None,
                   views: bool = True) -> list[dict[str, Any]]:
    """Test-split reports for the named heads (and ensembles), or for every one of the cache.

    A head fitted with test-time views is scored averaging each image with its mirror (unless
    `views` is false), and its report also gives `accuracy_single_view`."""
    if names is None:
        names = [r["name"] for r in list_heads(store, cache)]
        if not names:
            raise HeadstartError(f"No heads are fitted on cache {cache.name}; run "
                                 f"'{command('fit --head mlp')}'.")
    y_test = cache.labels("test")
    reports = []
    for name in names:
        head = load_saved_head(store, cache, name)
        report = {"head": name, "kind": head.kind, "cache": cache.name,
                  "views": bool(views and head.uses_views),
                  **classification_report(y_test, head.split_proba("test", views=views),
                                          cache.class_names)}
        if head.uses_views:
            single = head.split_proba("test", views=False)
            report["accuracy_single_view"] = float((single.argmax(1) == y_test).mean())
        reports.append(report)
    return reports
