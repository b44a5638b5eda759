"""The audit's files: audit.json, exclude.txt and one HTML page with thumbnails of every list.

Thumbnails are read from the original images, as `report`'s sample grid reads them
(`extract.rebuild.cache_dataset`, without hashing every file); a cache whose images cannot be
reopened gets a page without them, saying why.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

import numpy as np

from classifiers.audit import (DEFAULT_PIXEL_THRESHOLD, DEFAULT_THRESHOLD, ImageSource,
                               audit_cache, write_audit)
from store.cache import FeatureCache
from store.store import Store

THUMB_SIZE = 64
#: Entries of each list shown on the page (the JSON has them all).
SHOWN = {"label_issues": 100, "duplicates": 50, "leaks": 50, "outliers": 50}


def audit_folder(store: Store, cache: FeatureCache) -> Path:
    """Where `audit` writes a cache's files unless told (--out)."""
    return store.root / "audits" / cache.fingerprint[:16]


def saved_audit(store: Store, cache: FeatureCache) -> dict[str, Any] | None:
    """The cache's last audit in its default folder, or None (none, or unreadable)."""
    import json

    try:
        report = json.loads((audit_folder(store, cache) / "audit.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("fingerprint") == cache.fingerprint \
        else None


def run_audit(store: Store, cache: FeatureCache, head: str = "logreg",
              options: dict[str, Any] | None = None, folds: int = 5,
              threshold: float | None = None, outliers: int = 50,
              out_dir: Path | None = None, page: bool = True,
              pixel_threshold: float | None = DEFAULT_PIXEL_THRESHOLD,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Audit a cache and write audit.json, exclude.txt and (with `page`) index.html in
    `out_dir` (default STORE/audits/<cache>); returns the audit with the files under `files`."""
    say = progress or (lambda _: None)
    report = audit_cache(cache, head, options, folds,
                         DEFAULT_THRESHOLD if threshold is None else threshold, outliers, say,
                         pixel_threshold)
    folder = Path(out_dir) if out_dir else audit_folder(store, cache)
    files = write_audit(report, folder)
    if page:
        say("Writing the page with thumbnails.")
        files["page"] = write_page(cache, report, folder)
    report["files"] = {name: str(path) for name, path in files.items()}
    return report


class Thumbnails(ImageSource):
    """Small PNGs of a cache's original images, written once each, named by split and id."""

    def __init__(self, cache: FeatureCache, folder: Path) -> None:
        from extract.preprocessing import Preprocessing

        super().__init__(cache)
        self.folder = folder / "thumbs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.show = Preprocessing(THUMB_SIZE, "none")
        self._names: dict[tuple[str, str], str] = {}

    def tag(self, sample_id: str, split: str, caption: str) -> str:
        """An <img> of the sample (or a grey box when it cannot be shown) with its caption."""
        from PIL import Image

        key = (split, sample_id)
        if key not in self._names:
            pixels = self.load(split, sample_id, self.show)
            name = f"{split}-{len(self._names)}.png"
            if pixels is not None:
                Image.fromarray(pixels).save(self.folder / name)
            self._names[key] = name if pixels is not None else ""
        name = self._names[key]
        box = f'<img src="thumbs/{html.escape(name)}" alt="">' if name else '<div class="none">?</div>'
        return (f'<figure>{box}<figcaption title="{html.escape(sample_id)}">'
                f"{html.escape(caption)}</figcaption></figure>")


#: Most training rows drawn on the map (a random sample beyond it; findings always drawn).
MAP_ROWS = 5000
#: UMAP (umap-learn, when installed) from this many rows; PCA below, or without umap-learn.
UMAP_MIN_ROWS = 500


def map_coordinates(X: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of feature rows: UMAP (cosine) when umap-learn is installed and there are
    enough rows, else PCA of the whitened rows; returns (N x 2, method name)."""
    from classifiers.audit import silenced
    from classifiers.similarity import SimilaritySpace

    unit = SimilaritySpace.of(X).train
    if len(unit) >= UMAP_MIN_ROWS:
        try:
            import umap  # optional: pip install umap-learn
        except ImportError:
            pass
        else:
            with silenced():
                reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
                return np.asarray(reducer.fit_transform(unit)), "UMAP"
    centred = unit - unit.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def feature_map(cache: FeatureCache, report: dict[str, Any] | None, path: Path,
                seed: int = 0) -> str:
    """A PNG map of the training features coloured by class, with an audit's findings marked
    (label issues, duplicates, outliers); returns the method used (UMAP or PCA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = cache.ids("train")
    marked: dict[str, set[str]] = {"label issue": set(), "duplicate": set(), "outlier": set()}
    if report:
        marked["label issue"] = {e["id"] for e in report["label_issues"][:SHOWN["label_issues"]]}
        marked["duplicate"] = {m["id"] for g in report["duplicates"] for m in g["members"]}
        marked["outlier"] = {e["id"] for e in report["outliers"]}
    found = np.isin(ids, sorted(set().union(*marked.values())))
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(~found)
    if len(rows) > MAP_ROWS:
        rows = rng.choice(rows, MAP_ROWS, replace=False)
    rows = np.sort(np.concatenate([rows, np.flatnonzero(found)]))
    xy, method = map_coordinates(cache.features("train", rows), seed)
    labels, chosen = cache.labels("train")[rows], ids[rows]
    fig, ax = plt.subplots(figsize=(9, 8))
    colours = plt.get_cmap("tab10" if len(cache.class_names) <= 10 else "tab20")
    for k, name in enumerate(cache.class_names):
        mine = labels == k
        ax.scatter(xy[mine, 0], xy[mine, 1], s=4, alpha=0.5, color=colours(k % colours.N),
                   label=name)
    for (what, members), marker in zip(marked.items(), ("x", "o", "^")):
        mine = np.isin(chosen, sorted(members))
        if mine.any():
            style = ({"color": "black"} if marker == "x"
                     else {"facecolors": "none", "edgecolors": "black"})
            ax.scatter(xy[mine, 0], xy[mine, 1], s=30, marker=marker, linewidths=0.8,
                       label=what, **style)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best", ncol=2)
    ax.set_title(f"{method} map of {len(rows):,} training rows of {cache.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return method


def write_page(cache: FeatureCache, report: dict[str, Any], folder: Path) -> Path:
    """index.html with a row of thumbnails per finding, and the map; returns its path."""
    method = feature_map(cache, report, folder / "map.png")
    thumbs = Thumbnails(cache, folder)
    summary, counts = report["summary"], report["summary"]["counts"]
    sections = []

    issues = [f'<div class="row">{thumbs.tag(e["id"], "train", e["id"])}<p>given '
              f'<b>{html.escape(e["given"])}</b>, suggested <b>{html.escape(e["suggested"])}</b> '
              f'(p={e["confidence"]:.2f}); score {e["score"]:.3f}</p></div>'
              for e in report["label_issues"][:SHOWN["label_issues"]]]
    sections.append(("Label issues", counts["label_issues"], "cleanlab's find_label_issues on "
                     "out-of-fold probabilities; most likely wrong first.", issues))
    groups = [f'<div class="row">{_tags(thumbs, g["members"][:8], "train")}<p>{g["size"]} '
              f'images; similarity up to {g["score"]:.3f}</p></div>'
              for g in report["duplicates"][:SHOWN["duplicates"]]]
    sections.append(("Near-duplicate groups (train)", counts["duplicate_groups"],
                     "Training images with cosine similarity at or above the threshold.", groups))
    leaks = [f'<div class="row">{thumbs.tag(x["test_id"], "test", "test " + x["test_id"])}'
             f'{_tags(thumbs, x["matches"], "train")}<p>label {html.escape(x["label"])}</p></div>'
             for x in report["leaks"][:SHOWN["leaks"]]]
    sections.append(("Leaks (test images with a near-copy in train)", counts["leaks"],
                     "The test image first, then its training matches.", leaks))
    far = [thumbs.tag(o["id"], "train", f'{o["id"]} ({o["label"]}, z={o["score"]:.1f})')
           for o in report["outliers"][:SHOWN["outliers"]]]
    sections.append(("Outliers", counts["outliers"], "Farthest from their class's mean "
                     "(z-score of the cosine distance within the class).",
                     [f'<div class="row">{"".join(far)}</div>'] if far else []))

    body = []
    for title, count, note, items in sections:
        shown = f" (first {len(items)} shown)" if title != "Outliers" and count > len(items) else ""
        body.append(f"<h2>{html.escape(title)}: {count}{shown}</h2><p class=note>"
                    f"{html.escape(note)}</p>" + ("\n".join(items) or "<p>None.</p>"))
    missing = (f"<p class=note>No thumbnails: {html.escape(thumbs.problem)}</p>"
               if thumbs.problem else "")
    page = folder / "index.html"
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headstart audit: {html.escape(report['cache'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:75rem;margin:2rem auto;padding:0 1rem}}
.row{{display:flex;flex-wrap:wrap;align-items:center;gap:.4rem;border-bottom:1px solid #eee;padding:.3rem 0}}
figure{{margin:0;width:{THUMB_SIZE + 40}px;text-align:center}} img,.none{{width:{THUMB_SIZE}px;height:{THUMB_SIZE}px;image-rendering:pixelated}}
.none{{background:#ddd;display:inline-block}} figcaption{{font-size:.65rem;color:#555;overflow-wrap:anywhere}}
.note{{color:#555}}</style></head><body>
<h1>Audit of cache {html.escape(report['cache'])}</h1>
<p>{summary['rows'].get('train', 0):,} training and {summary['rows'].get('test', 0):,} test rows;
out-of-fold accuracy {summary['out_of_fold_accuracy']:.3f} ({html.escape(summary['head'])},
{summary['folds']} folds); near-copies from feature similarity {summary['threshold']}, confirmed
on pixels from {summary['pixel_threshold']}. Nothing was changed:
<code>exclude.txt</code> lists the ids <code>fit --exclude</code> would leave out.</p>
{missing}
<figure style="width:auto"><img src="map.png" alt="feature map" style="width:auto;height:auto;max-width:100%">
<figcaption>{method} map of the training features, coloured by class; x: label issues, o:
duplicates, triangles: outliers.</figcaption></figure>
{''.join(body)}
</body></html>
""", encoding="utf-8")
    return page


def _tags(thumbs: Thumbnails, members: list[dict[str, Any]], split: str) -> str:
    """Thumbnails of group members or matches, captioned with id, label or similarity."""
    def caption(m: dict[str, Any]) -> str:
        return (f"{m['id']} {m['similarity']:.3f}" if "similarity" in m
                else f"{m['id']} ({m['label']})")

    return "".join(thumbs.tag(m["id"], split, caption(m)) for m in members)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The audit's summary for the terminal: counts, the first findings, where the files are."""
    summary, counts = report["summary"], report["summary"]["counts"]
    lines = [f"Audit of cache {report['cache']}: {summary['rows'].get('train', 0):,} training "
             f"rows, out-of-fold accuracy {summary['out_of_fold_accuracy']:.3f} "
             f"({summary['head']}, {summary['folds']} folds), near-copies from feature "
             f"similarity {summary['threshold']}"
             + (f", confirmed on pixels from {summary['pixel_threshold']}."
                if summary.get("pixel_threshold") is not None else " (features alone)."),
             f"  {counts['label_issues']} label issues, {counts['duplicate_groups']} duplicate "
             f"groups ({counts['duplicate_images']} images), {counts['leaks']} test images with "
             f"a near-copy in train, {counts['outliers']} outliers listed."]
    for entry in report["label_issues"][:5]:
        lines.append(f"  label issue {entry['id']}: given {entry['given']}, suggested "
                     f"{entry['suggested']} (score {entry['score']:.3f})")
    for leak in report["leaks"][:3]:
        lines.append(f"  leak {leak['test_id']} ~ {leak['matches'][0]['id']} "
                     f"(similarity {leak['score']:.3f})")
    lines += [f"  {what}: {path}" for what, path in report.get("files", {}).items()]
    return lines
