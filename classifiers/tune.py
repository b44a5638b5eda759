"""Random hyperparameter search for a head, scored on the validation split only.

Trials are drawn by scikit-learn's ParameterSampler with a fixed seed, so a rerun draws the same
trials in the same order. Each finished trial is written at once (the whole trials file is
replaced atomically) beside the heads; after an interruption, trials already on disk are not
run again. The best trial's options are then fitted and saved like `fit` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import loguniform, uniform
from sklearn.model_selection import ParameterSampler

from classifiers.evaluation import accuracy_figures
from classifiers.memory import plan_memory
from classifiers.registry import get_head_kind
from classifiers.scoring import views_proba
from classifiers.sources import CacheSet, choose_blocks
from classifiers.training import (as_cache_set, fit_head, refuse_streamed_views,
                                  train_estimator, wanted_views)
from classifiers.validation import validation_mask
from store.atomic import write_text
from store.cache import FeatureCache
from store.errors import HeadstartError, Interrupted
from store.fingerprint import canonical_json, digest_text
from store.heads import check_head_name
from store.store import Store

SPACES: dict[str, dict[str, Any]] = {
    "mlp": {
        "hidden": [(256,), (512,), (1024,), (256, 256), (512, 256)],
        "dropout": uniform(0.0, 0.6),
        "l2": [0.0, 1e-5, 1e-4],
        "learning_rate": loguniform(3e-4, 3e-3),
        "label_smoothing": [0.0, 0.05, 0.1],
        "batch_norm": [False, True],
        "lr_schedule": ["constant", "cosine", "plateau"],
        "standardize": [False, True],
    },
    "logreg": {"C": loguniform(1e-3, 10.0)},
    "svm": {"C": loguniform(1e-4, 1.0)},
    "sgd": {"alpha": loguniform(1e-6, 1e-2), "loss": ["log_loss", "modified_huber"]},
    "knn": {"n_neighbors": [5, 10, 15, 25, 50], "weights": ["uniform", "distance"]},
    "hgb": {"learning_rate": loguniform(0.03, 0.3), "max_leaf_nodes": [15, 31, 63],
            "l2_regularization": loguniform(1e-4, 1.0)},
}


def plain(value: Any) -> Any:
    """A sampled value as plain JSON (numpy scalars → Python, tuples → lists)."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


#: The trial parameter naming the blocks a trial trains on (`--use-blocks`: the last N blocks).
USE_BLOCKS = "use_blocks"


def draw_trials(kind: str, trials: int, seed: int, blocks: int = 1) -> list[dict[str, Any]]:
    """The first `trials` parameter sets of the seeded search (same seed, same sets). On a
    cache of several `blocks`, every trial also draws how many of the last blocks it uses."""
    if kind not in SPACES:
        raise HeadstartError(f"Head {kind} has no search space; tune one of {', '.join(SPACES)}.")
    if trials < 1:
        raise HeadstartError(f"--trials must be at least 1; got {trials}.")
    space = dict(SPACES[kind])
    if blocks > 1:
        space[USE_BLOCKS] = list(range(1, blocks + 1))
    sampler = ParameterSampler(space, n_iter=trials, random_state=seed)
    return [{k: plain(v) for k, v in sorted(params.items())} for params in sampler]


def trial_source(source: CacheSet, params: dict[str, Any]) -> CacheSet:
    """The caches a trial trains on: all their blocks, or the last `use_blocks` of them."""
    if USE_BLOCKS not in params:
        return source
    return CacheSet(source.caches, [choose_blocks(c, str(params[USE_BLOCKS]))
                                    for c in source.caches])


def head_options(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's head options (its parameters without the block choice)."""
    return {k: v for k, v in params.items() if k != USE_BLOCKS}


def trials_path(store: Store, source: CacheSet, kind: str, name: str, seed: int,
                fixed: dict[str, Any]) -> Path:
    """The trials file of one search (head kind, caches, seed, fixed options)."""
    key = digest_text(canonical_json({"kind": kind, "caches": source.fingerprints,
                                      "seed": seed, "fixed": fixed}))[:12]
    return store.head_dir(source.primary) / f"{name}.trials-{key}.jsonl"


def read_trials(path: Path) -> list[dict[str, Any]]:
    """Finished trials on disk (none if the file is missing; unreadable lines are dropped)."""
    if not path.is_file():
        return []
    trials = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            trials.append(json.loads(line))
        except ValueError:
            continue
    return trials


def run_trial(kind: Any, options: dict[str, Any], params: dict[str, Any], source: CacheSet,
              plan: Any, y: np.ndarray, held_out: np.ndarray,
              views: bool = False) -> dict[str, Any]:
    """Fit one trial and score it on the validation rows; a head that cannot be fitted with
    these options is a skipped trial, with the reason. With `views`, the trial trains on the
    mirrored views of its fit images too and is scored averaged over each validation image and
    its mirror, as `fit` would train and judge it."""
    estimator = kind.create(head_options(options))
    source = trial_source(source, params)
    started = time.perf_counter()
    try:
        train_estimator(estimator, source, plan, mirrored=views)
    except HeadstartError as error:
        return {"params": params, "validation_accuracy": None, "skipped": str(error),
                "seconds": round(time.perf_counter() - started, 2)}
    proba = views_proba(estimator, source, "train", held_out, views=views)
    return {"params": params,
            "validation_accuracy": accuracy_figures(y[held_out], proba)["accuracy"],
            "seconds": round(time.perf_counter() - started, 2)}


def tune_head(store: Store, caches: FeatureCache | Sequence[FeatureCache], kind_name: str,
              trials: int = 20, seed: int = 0, fixed: dict[str, str] | None = None,
              name: str | None = None, memory_budget: str | None = None,
              on_trial: Callable[[dict[str, Any]], None] | None = None,
              replace: bool = False, tta: bool | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """Run (or resume) the search, then fit and save the best trial's head.

    The head is saved as KIND-tuned unless named, so it never replaces a plain fit; a name
    already fitted is refused before any trial unless `replace`. A trial the head cannot be
    fitted with (e.g. more knn neighbours than rows) is kept as skipped, with its reason. On a
    cache of several blocks each trial also draws how many of the last blocks it trains on;
    with `tta` (default: when the caches hold mirrored views) trials train on the mirrored
    views and are scored with them, as `fit` does. Returns (every trial, the saved head's
    record, its sidecar path).
    """
    kind = get_head_kind(kind_name)
    name = check_head_name(f"{kind_name}-tuned" if name is None else name)
    fixed = dict(fixed or {})
    kind.create(fixed)  # unknown or malformed fixed options fail before any work
    source = as_cache_set(caches)
    views = wanted_views(source, tta, "tune")
    wanted = draw_trials(kind.name, trials, seed, min(len(c.blocks) for c in source.caches))
    if not replace and (store.head_dir(source.primary) / f"{name}.json").is_file():
        raise HeadstartError(
            f"A head named {name!r} is already fitted on cache {source.primary.name}; give "
            "--replace to replace it, or choose another --name.")
    plan = plan_memory(source.float32_bytes("train") * (1 + views), memory_budget)
    refuse_streamed_views(plan, views, "tune")
    path = trials_path(store, source, kind.name, name, seed,
                       {**fixed, **({"tta": "flip"} if views else {})})
    done = {canonical_json(t["params"]): t for t in read_trials(path)}
    y = source.labels("train")
    held_out = validation_mask(source.ids("train"))
    for index, params in enumerate(wanted):
        key = canonical_json(params)
        resumed = key in done
        if not resumed:
            try:
                done[key] = run_trial(kind, {**fixed, **params}, params, source, plan, y,
                                      held_out, views)
            except KeyboardInterrupt:
                raise Interrupted(f"Interrupted. Kept {len(done)} finished trials in {path}; run "
                                  "the same command again to resume from them.") from None
            write_text(path, "".join(json.dumps(t) + "\n" for t in done.values()))
        if on_trial:
            on_trial({**done[key], "trial": index, "resumed": resumed})
    results = [done[canonical_json(p)] | {"trial": i} for i, p in enumerate(wanted)]
    scored = [t for t in results if t.get("validation_accuracy") is not None]
    if not scored:
        raise HeadstartError(f"No trial could be fitted ({results[0].get('skipped')}).")
    best = max(scored, key=lambda t: (t["validation_accuracy"], -t["trial"]))
    chosen = best["params"].get(USE_BLOCKS)
    record, sidecar = fit_head(store, source, kind.name,
                               {**fixed, **head_options(best["params"])}, name,
                               memory_budget=memory_budget, replace=replace, tta=views,
                               use_blocks=None if chosen is None else str(chosen),
                               extra={"tune": {"trials": len(results), "seed": seed,
                                               "best_trial": best["trial"],
                                               "trials_file": path.name}})
    return results, record, sidecar
