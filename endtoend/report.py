"""Report: PNG figures of a head and its data, and one HTML page that shows them.

Figures: sample images per class, training curves (Keras heads), the confusion matrix,
per-class accuracy, and (for ensembles) each member against the ensemble.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.audit_page import feature_map, saved_audit
from classifiers.evaluation import classification_report
from classifiers.saved import load_saved_head
from extract.rebuild import cache_dataset
from extract.preprocessing import Preprocessing
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store

SAMPLES_PER_CLASS = 8


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grid(cache: FeatureCache, path: Path, per_class: int = SAMPLES_PER_CLASS) -> None:
    """A grid: one row per class, the first `per_class` training images of each."""
    plt = _pyplot()
    dataset = cache_dataset(cache, check_contents=False)
    show = Preprocessing(max(64, int(cache.preprocessing["image_size"])), "none")
    split = dataset.splits["train"]
    classes = cache.class_names
    fig, axes = plt.subplots(len(classes), per_class, squeeze=False,
                             figsize=(per_class * 1.1 + 1.4, len(classes) * 1.1 + 0.6))
    for row, name in enumerate(classes):
        indices = np.flatnonzero(split.labels == row)[:per_class]
        for col in range(per_class):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(indices):
                try:
                    ax.imshow(dataset.load("train", int(indices[col]), show))
                except Exception:  # a skipped file: leave the cell empty
                    pass
        axes[row][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=11)
    fig.suptitle(f"Training images per class ({cache.dataset})", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def training_curves(history: dict[str, list[float]], title: str, path: Path) -> bool:
    """Loss and accuracy per epoch, train vs validation; False when there is no history."""
    if not history.get("loss"):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        epochs = np.arange(1, len(history.get(metric, [])) + 1)
        if len(epochs):
            ax.plot(epochs, history[metric], "o-", label="train")
        if history.get(f"val_{metric}"):
            ax.plot(epochs, history[f"val_{metric}"], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """The confusion matrix with counts in each cell (rows: true class)."""
    plt = _pyplot()
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        peak = matrix.max() or 1
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bar_figure(names: list[str], values: list[float], title: str, xlabel: str, path: Path,
               highlight: int | None = None) -> None:
    """Horizontal bars with their values (e.g. per-class accuracy, or members vs ensemble)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.2))
    colors = ["#1a73e8"] * len(names)
    if highlight is not None:
        colors[highlight] = "#e8711a"
    bars = ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(store: Store, cache_selector: str | None, head: str,
                 out_dir: Path | None = None) -> Path:
    """Write the figures and index.html; returns the HTML page's path."""
    cache = store.find_cache(cache_selector)
    saved = load_saved_head(store, cache, head)
    record = saved.record
    folder = Path(out_dir) if out_dir else store.root / "reports" / cache.fingerprint[:16] / head
    folder.mkdir(parents=True, exist_ok=True)
    report = classification_report(cache.labels("test"), saved.split_proba("test"),
                                   cache.class_names)
    figures: list[tuple[str, str]] = []
    try:
        sample_grid(cache, folder / "samples.png")
        figures.append(("samples.png", "Sample training images per class"))
    except HeadstartError as error:
        figures.append(("", f"No sample images: {error}"))
    history = record.get("state", {}).get("history_") or getattr(saved.estimator, "history_", {})
    if training_curves(history, f"Training curves of {head}", folder / "curves.png"):
        figures.append(("curves.png", "Loss and accuracy per epoch (train vs validation)"))
    confusion_figure(np.asarray(report["confusion_matrix"]), cache.class_names,
                     f"{head}: test confusion matrix (accuracy {report['accuracy']:.3f})",
                     folder / "confusion.png")
    figures.append(("confusion.png", "Confusion matrix on the test split"))
    recall = [row["recall"] for row in report["per_class"].values()]
    bar_figure(cache.class_names, recall, f"{head}: per-class test accuracy",
               "accuracy (recall)", folder / "per_class.png")
    figures.append(("per_class.png", "Per-class accuracy on the test split"))
    audit = saved_audit(store, cache)
    method = feature_map(cache, audit, folder / "map.png")
    figures.append(("map.png", f"{method} map of the training features by class"
                    + (" (x: label issues, o: duplicates, triangles: outliers of the last "
                       "'audit')" if audit else "")))
    if saved.members:
        names = [f"{m.name}@{m.home.name}" for m in saved.members]
        scores = [float((m.split_proba("test").argmax(1) == m.home.labels("test")).mean())
                  for m in saved.members]
        bar_figure([*names, head], [*scores, report["accuracy"]],
                   "Ensemble members vs the ensemble (test accuracy)", "test accuracy",
                   folder / "members.png", highlight=len(names))
        figures.append(("members.png", "Each member against the ensemble"))
    page = folder / "index.html"
    page.write_text(_html(head, cache, record, report, figures), encoding="utf-8")
    return page


def _html(head: str, cache: FeatureCache, record: dict[str, Any], report: dict[str, Any],
          figures: list[tuple[str, str]]) -> str:
    items = "\n".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
        "</figcaption></figure>" if f else f"<p>{html.escape(c)}</p>" for f, c in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headstart report: {html.escape(head)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
figure{{margin:1.5rem 0}} img{{max-width:100%;border:1px solid #ddd}}
figcaption{{color:#555}}</style></head><body>
<h1>Head {html.escape(head)} ({html.escape(str(record.get('kind')))})</h1>
<p>Cache {html.escape(cache.name)} ({cache.short_id}); test accuracy
<b>{report['accuracy']:.4f}</b> on {report['rows']} images; fitted in
{record.get('fit_seconds', 0):.1f} s.</p>
{items}
</body></html>
"""
