"""What a cache knows about its data: label issues, near-duplicates, train/test leaks, outliers.

Nothing is deleted or relabelled: `audit_cache` returns lists, each ordered by its `score`
(higher is more suspect), that name images by the sample ids the cache stores.

- Label issues: out-of-fold probabilities of a cheap head (logreg by default) trained k-fold on
  the training rows (whitened features: the same accuracy, several times fewer solver steps), then confident learning (cleanlab's `find_label_issues`), ranked by
  1 - cleanlab's label quality score (self-confidence).
- Near-duplicates (train-train, as groups) and leaks (test images with a near-copy in train):
  cosine similarity of the whitened, L2-normalised features (classifiers.similarity), searched
  exactly block by block, then confirmed on the original images' pixels where they can be read.
- Outliers: the rows farthest from their class, as the cosine distance to their class's mean
  feature, in standard deviations of their class's distances.

The nearest training images of new images are classifiers.similar's.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from classifiers.evaluation import full_proba
from classifiers.registry import get_head_kind
from classifiers.similarity import Progress, SimilaritySpace, pairs_above, quiet
from store.cache import FeatureCache
from store.errors import HeadstartError

#: Cosine similarity (of whitened features, see SimilaritySpace) from which two images are
#: near-copies (chosen on the planted folder of bench/audit.py).
DEFAULT_THRESHOLD = 0.5
#: Normalised cross-correlation of the two images' 16 x 16 grey, high-passed thumbnails (minus
#: a box blur of radius 2: the horizon and the sky of every airplane photo cancel out) from which
#: a feature candidate is confirmed as a near-copy (when the original images can be read).
DEFAULT_PIXEL_THRESHOLD = 0.55
PIXEL_SIZE = 16
PIXEL_BLUR = 2
DEFAULT_FOLDS = 5
DEFAULT_OUTLIERS = 50
#: Matches kept per leaked test image (the most similar first).
MATCHES_PER_LEAK = 5

#: The audit's defaults for the out-of-fold heads (cheaper than fit's; -p overrides them):
#: on whitened features newton-cg reaches the same accuracy in 6 iterations at tol 1e-3.
OOF_OPTIONS: dict[str, dict[str, Any]] = {"logreg": {"tol": 1e-3}}


@contextmanager
def silenced() -> Iterator[None]:
    """No library warnings (convergence, cleanlab's notes on tiny classes) reach the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def anchored_groups(a: np.ndarray, b: np.ndarray, sims: np.ndarray,
                    close: Callable[[int, int], bool]) -> list[np.ndarray]:
    """Groups (two or more rows) of the pairs (a[i], b[i]), strongest pair first: two groups
    join only where their anchors (each group's first row) are `close` too, so that a chain of
    look-alikes (airplanes on grass, one a little like the next) does not become one group."""
    parent: dict[int, int] = {}
    size: dict[int, int] = {}

    def root(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for e in np.argsort(-sims, kind="stable"):
        ri, rj = root(int(a[e])), root(int(b[e]))
        if ri == rj or not close(ri, rj):
            continue
        if (size.get(rj, 1), -rj) > (size.get(ri, 1), -ri):
            ri, rj = rj, ri
        parent[rj] = ri
        size[ri] = size.get(ri, 1) + size.get(rj, 1)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    return [np.asarray(sorted(g)) for g in members.values() if len(g) > 1]


class ImageSource:
    """A cache's original images by split and sample id, reopened as `report` reopens them
    (`cache_dataset` without hashing every file); `problem` says why not, when they cannot be."""

    def __init__(self, cache: FeatureCache) -> None:
        from extract.rebuild import cache_dataset

        self.problem = ""
        self.dataset = None
        try:
            self.dataset = cache_dataset(cache, check_contents=False)
        except HeadstartError as error:
            self.problem = str(error)
        self._rows = {} if self.dataset is None else {
            split: {sample_id: n for n, sample_id in enumerate(samples.ids)}
            for split, samples in self.dataset.splits.items()}

    def load(self, split: str, sample_id: str, preprocessing: Any) -> np.ndarray | None:
        """The image as uint8 pixels, or None (unknown id, or a file gone or unreadable)."""
        row = self._rows.get(split, {}).get(sample_id)
        if row is None:
            return None
        try:
            return np.asarray(self.dataset.load(split, row, preprocessing), dtype=np.uint8)
        except Exception:  # a file gone or unreadable since extraction
            return None


class PixelCheck(ImageSource):
    """Confirms feature candidates on pixels: grey 16 x 16 thumbnails of the original images,
    high-passed, centred and normalised, compared by dot product.

    Semantic features put two photos of white hatchbacks close; pixels tell a copy (resized,
    re-encoded, cropped by a few pixels) from a look-alike. A cache whose images cannot be
    reopened is checked on features alone (`problem` says why).
    """

    def __init__(self, cache: FeatureCache) -> None:
        from extract.preprocessing import Preprocessing

        super().__init__(cache)
        self.show = Preprocessing(32, "none")
        self._signatures: dict[tuple[str, str], np.ndarray | None] = {}

    def signature(self, split: str, sample_id: str) -> np.ndarray | None:
        key = (split, sample_id)
        if key not in self._signatures:
            self._signatures[key] = self._read(split, sample_id)
        return self._signatures[key]

    def _read(self, split: str, sample_id: str) -> np.ndarray | None:
        from PIL import Image

        pixels = self.load(split, sample_id, self.show)
        if pixels is None:  # features decide
            return None
        from PIL import ImageFilter

        grey = Image.fromarray(pixels).convert("L").resize((PIXEL_SIZE, PIXEL_SIZE), Image.BOX)
        values = (np.asarray(grey, dtype=np.float32) - np.asarray(
            grey.filter(ImageFilter.BoxBlur(PIXEL_BLUR)), dtype=np.float32)).ravel()
        values -= values.mean()
        return values / max(float(np.linalg.norm(values)), 1e-6)

    def similarity(self, first: tuple[str, str], second: tuple[str, str]) -> float | None:
        """The pixel similarity of two samples, (split, id) each; None when one is unreadable."""
        a, b = self.signature(*first), self.signature(*second)
        return None if a is None or b is None else float(a @ b)

    def confirm(self, pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]],
                threshold: float) -> tuple[np.ndarray, list[float | None]]:
        """Which pairs pass (an unreadable pair passes on its features), and their similarity."""
        values = [self.similarity(a, b) for a, b in pairs]
        keep = np.array([v is None or v >= threshold for v in values], dtype=bool)
        return keep, values


# --- label issues ----------------------------------------------------------------------------


def out_of_fold_proba(X: np.ndarray, y: np.ndarray, n_classes: int, head: str = "logreg",
                      options: dict[str, Any] | None = None, folds: int = DEFAULT_FOLDS,
                      progress: Progress = quiet, seed: int = 0) -> np.ndarray:
    """Each row's class probabilities from a head that did not see it (stratified k-fold)."""
    from sklearn.model_selection import StratifiedKFold

    kind = get_head_kind(head)
    smallest = int(np.bincount(y, minlength=n_classes)[np.unique(y)].min())
    folds = min(folds, smallest)
    if folds < 2:
        raise HeadstartError(
            "A class has a single training row; out-of-fold probabilities need at least two "
            "rows of every class.")
    proba = np.zeros((len(y), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for number, (fit, held) in enumerate(splitter.split(X, y), 1):
        started = time.perf_counter()
        estimator = kind.create(options)
        if kind.file_format == "keras":
            estimator.set_params(verbose=0)
        with silenced():
            estimator.fit(X[fit], y[fit])
            proba[held] = full_proba(estimator.predict_proba(X[held]), estimator.classes_,
                                     n_classes)
        progress(f"  fold {number}/{folds} ({head}): {time.perf_counter() - started:.1f} s")
    return proba


def label_issues(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of cleanlab's label issues, most likely wrong first, and every row's score
    (1 - cleanlab's self-confidence label quality: higher is more suspect)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(y)
    # cleanlab wants the classes 0..K-1 all present: re-index the columns of present classes
    remap = np.full(proba.shape[1], -1)
    remap[present] = np.arange(len(present))
    labels = remap[y]
    pred = proba[:, present]
    pred = pred / np.maximum(pred.sum(axis=1, keepdims=True), 1e-12)
    if len(present) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(len(y))
    with silenced():
        ranked = find_label_issues(labels, pred, return_indices_ranked_by="self_confidence")
        quality = get_label_quality_scores(labels, pred, method="self_confidence")
    return np.asarray(ranked, dtype=np.int64), 1.0 - quality


# --- the audit -------------------------------------------------------------------------------


def audit_cache(cache: FeatureCache, head: str = "logreg", options: dict[str, Any] | None = None,
                folds: int = DEFAULT_FOLDS, threshold: float = DEFAULT_THRESHOLD,
                outliers: int = DEFAULT_OUTLIERS, progress: Progress = quiet,
                pixel_threshold: float | None = DEFAULT_PIXEL_THRESHOLD) -> dict[str, Any]:
    """The audit of one cache as plain JSON: `summary`, `label_issues`, `duplicates`, `leaks`
    and `outliers` (each list ordered by score, highest first).

    Near-copies are feature pairs at or above `threshold`, confirmed on pixels at
    `pixel_threshold` (None: features alone)."""
    for name, value in (("--threshold", threshold), ("--pixel-threshold", pixel_threshold)):
        if value is not None and not -1.0 <= value <= 1.0:
            raise HeadstartError(f"{name} is a similarity between -1 and 1; got {value}.")
    if outliers < 0:
        raise HeadstartError(f"--outliers must be 0 or more; got {outliers}.")
    if folds < 2:
        raise HeadstartError(f"--folds must be at least 2; got {folds}.")
    get_head_kind(head).create(options)  # an unknown head or option fails before any work
    seconds: dict[str, float] = {}
    classes = list(cache.class_names)
    started = time.perf_counter()
    X = cache.features("train")
    y = cache.labels("train")
    ids = cache.ids("train")
    has_test = "test" in cache.split_sizes and cache.split_sizes["test"] > 0
    seconds["read"] = time.perf_counter() - started

    started = time.perf_counter()
    space, white = SimilaritySpace.whitening(X)
    del X
    seconds["whiten"] = time.perf_counter() - started

    progress(f"Label issues: {folds}-fold out-of-fold probabilities of {head} on "
             f"{len(y):,} training rows ({space.kind} features), then cleanlab.")
    started = time.perf_counter()
    options = {**OOF_OPTIONS.get(head, {}), **(options or {})}
    proba = out_of_fold_proba(white, y, len(classes), head, options, folds, progress)
    del white
    ranked, suspect = label_issues(y, proba)
    suggested = proba.argmax(axis=1)
    issues = [{"id": str(ids[i]), "given": classes[y[i]], "suggested": classes[suggested[i]],
               "score": round(float(suspect[i]), 6),
               "confidence": round(float(proba[i, suggested[i]]), 6)} for i in ranked]
    seconds["label_issues"] = time.perf_counter() - started

    progress(f"Near-duplicates and leaks: cosine similarity >= {threshold} by blocks.")
    started = time.perf_counter()
    a, b, sims = pairs_above(space.train, space.train, threshold, same=True, progress=progress,
                             what="training rows")
    check = PixelCheck(cache) if pixel_threshold is not None else None
    if check is not None and check.problem:
        progress(f"  no pixel check (features alone): {check.problem}")
        check = None
    keep, pixel = _confirmed(check, "train", ids, a, b, ids, pixel_threshold, progress)
    a, b, sims = a[keep], b[keep], sims[keep]

    def close(i: int, j: int) -> bool:
        if check is not None:
            value = check.similarity(("train", str(ids[i])), ("train", str(ids[j])))
            if value is not None:
                return value >= pixel_threshold
        return float(space.train[i] @ space.train[j]) >= threshold

    duplicates = []
    for group in anchored_groups(a, b, sims, close):
        inside = np.isin(a, group) & np.isin(b, group)
        members = sorted(group.tolist(), key=lambda i: str(ids[i]))
        edges = np.flatnonzero(inside)
        edges = edges[np.argsort(-sims[edges], kind="stable")]
        duplicates.append({"score": round(float(sims[edges[0]]), 6), "size": len(members),
                           "members": [{"id": str(ids[i]), "label": classes[y[i]]}
                                       for i in members],
                           "pairs": [[str(ids[a[e]]), str(ids[b[e]]), round(float(sims[e]), 6),
                                      _rounded(pixel[e])] for e in edges]})
    duplicates.sort(key=lambda g: -g["score"])
    seconds["duplicates"] = time.perf_counter() - started

    started = time.perf_counter()
    leaks = []
    if has_test:
        test_ids, y_test = cache.ids("test"), cache.labels("test")
        queries = space.project(cache.features("test"))
        t, r, s = pairs_above(queries, space.train, threshold, progress=progress,
                              what="test rows")
        keep, pixel = _confirmed(check, "test", test_ids, t, r, ids, pixel_threshold, progress)
        t, r, s = t[keep], r[keep], s[keep]
        for row in np.unique(t):
            mine = np.flatnonzero(t == row)
            mine = mine[np.argsort(-s[mine], kind="stable")][:MATCHES_PER_LEAK]
            leaks.append({"test_id": str(test_ids[row]), "label": classes[y_test[row]],
                          "score": round(float(s[mine[0]]), 6),
                          "matches": [{"id": str(ids[r[m]]), "label": classes[y[r[m]]],
                                       "similarity": round(float(s[m]), 6),
                                       "pixel_similarity": _rounded(pixel[m])} for m in mine]})
        leaks.sort(key=lambda leak: -leak["score"])
    seconds["leaks"] = time.perf_counter() - started

    started = time.perf_counter()
    found = farthest_from_class(space.train, y, outliers)
    far = [{"id": str(ids[i]), "label": classes[y[i]], "score": round(float(z), 4)}
           for i, z in found]
    seconds["outliers"] = time.perf_counter() - started

    return {
        "cache": cache.name,
        "fingerprint": cache.fingerprint,
        "summary": {
            "rows": {split: int(n) for split, n in cache.split_sizes.items()},
            "head": head, "folds": folds, "threshold": threshold,
            "pixel_threshold": pixel_threshold if check is not None else None,
            "out_of_fold_accuracy": round(float((suggested == y).mean()), 4),
            "counts": {"label_issues": len(issues), "duplicate_groups": len(duplicates),
                       "duplicate_images": sum(g["size"] for g in duplicates),
                       "leaks": len(leaks), "outliers": len(far)},
            "seconds": {step: round(value, 2) for step, value in seconds.items()},
        },
        "label_issues": issues,
        "duplicates": duplicates,
        "leaks": leaks,
        "outliers": far,
    }


def _confirmed(check: PixelCheck | None, split: str, query_ids: np.ndarray, rows: np.ndarray,
               train_rows: np.ndarray, train_ids: np.ndarray, threshold: float | None,
               progress: Progress) -> tuple[np.ndarray, list[float | None]]:
    """Which candidate pairs (query row, training row) pass the pixel check, and the pixel
    similarities of those that pass (all pass, unmeasured, without a check)."""
    if check is None or threshold is None:
        return np.ones(len(rows), dtype=bool), [None] * len(rows)
    progress(f"  checking {len(rows):,} {split}-train candidate pairs on pixels")
    keep, values = check.confirm([((split, str(query_ids[i])), ("train", str(train_ids[j])))
                                  for i, j in zip(rows, train_rows)], threshold)
    return keep, [v for v, k in zip(values, keep) if k]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def farthest_from_class(unit: np.ndarray, y: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The `count` rows farthest (cosine distance to their class's mean direction, as a z-score
    within the class), farthest first."""
    z = np.zeros(len(y))
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        centre = unit[rows].mean(axis=0)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        distance = 1.0 - unit[rows] @ centre
        spread = float(distance.std()) or 1.0
        z[rows] = (distance - distance.mean()) / spread
    order = np.argsort(-z, kind="stable")[:count]
    return [(int(i), float(z[i])) for i in order]


def exclusion_ids(report: dict[str, Any]) -> list[str]:
    """The training ids an audit suggests leaving out of a fit: its label issues, and every
    member but the first of each duplicate group."""
    ids = [entry["id"] for entry in report["label_issues"]]
    ids += [m["id"] for group in report["duplicates"] for m in group["members"][1:]]
    return list(dict.fromkeys(ids))


def write_audit(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """audit.json and exclude.txt (the ids `fit --exclude` reads) in `folder`."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "audit.json", "exclude": folder / "exclude.txt"}
    paths["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    excluded = exclusion_ids(report)
    paths["exclude"].write_text(
        "# training ids the audit suggests leaving out (label issues, extra duplicates); "
        "edit, then: fit --exclude FILE\n" + "".join(f"{i}\n" for i in excluded),
        encoding="utf-8")
    return paths


def read_id_file(path: Path) -> list[str]:
    """Sample ids from a file: one a line ('#' comments and blank lines skipped), or an
    audit.json (its label issues and extra duplicates)."""
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadstartError(f"The id file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise HeadstartError(f"The id file {path} cannot be read ({error}).") from None
    if text.lstrip().startswith("{"):
        try:
            report = json.loads(text)
            return exclusion_ids(report)
        except (ValueError, KeyError, TypeError):
            raise HeadstartError(f"{path} is JSON but not an audit.json.") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
