"""What fit, tune, ensemble and evaluate report, as the lines and table rows a front end shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = tuple[str, ...]


def fitted_lines(head: str, record: dict[str, Any], sidecar: Path) -> list[str]:
    """How a fitted head did, and where it was saved."""
    metrics = record["metrics"]
    mode = "streamed" if record.get("memory", {}).get("mode") == "stream" else "in memory"
    validation = metrics.get("validation", {}).get("accuracy")
    shown = "n/a (no validation rows)" if validation is None else f"{validation:.4f}"
    rows = record.get("rows", {})
    views = f", with {len(record['views'])} augmented views" if record.get("views") else ""
    trained = (f" on {rows['train']:,} training rows{views} ({rows.get('validation', 0):,} held "
               "out for validation)" if "train" in rows else "")
    return [f"Fitted {head} ({mode}){trained} in {record['fit_seconds']:.1f} s: validation "
            f"accuracy {shown}, test accuracy {metrics['test']['accuracy']:.4f}.",
            f"Head saved to {sidecar}"]


TRIAL_COLUMNS = ("trial", "val acc", "seconds", "options")


def _accuracy(trial: dict[str, Any]) -> str:
    value = trial.get("validation_accuracy")
    return "skipped" if value is None else f"{value:.4f}"


def trial_rows(results: list[dict[str, Any]], best: int) -> list[Row]:
    """One row per tuning trial; the best is starred, skipped ones say so."""
    return [(f"{t['trial']}{' *' if t['trial'] == best else ''}", _accuracy(t),
             f"{t['seconds']:.1f}", ", ".join(f"{k}={v}" for k, v in t["params"].items()))
            for t in results]


def trial_line(trial: dict[str, Any]) -> str:
    """One trial as it finishes (progress on stderr)."""
    note = " (done before)" if trial["resumed"] else ""
    params = ", ".join(f"{k}={v}" for k, v in trial["params"].items())
    skipped = f" ({trial['skipped']})" if trial.get("skipped") else ""
    return (f"trial {trial['trial']:>3}: val acc {_accuracy(trial)} {trial['seconds']:>7.1f} s  "
            f"{params}{note}{skipped}")


MEMBER_COLUMNS = ("member", "kind", "weight", "val acc", "test acc")


def ensemble_rows(record: dict[str, Any], name: str) -> list[Row]:
    """One row per member, then the ensemble's own."""
    method = record["options"]["method"]
    weights = record.get("weights") if method != "stack" else None
    rows: list[Row] = []
    for index, member in enumerate(record["members"]):
        weight = "-" if weights is None else f"{weights[index]:.3f}"
        rows.append((f"{member['name']}@{member['cache_name']}", str(member["kind"]), weight,
                     f"{member['validation']['accuracy']:.4f}", f"{member['test']['accuracy']:.4f}"))
    metrics = record["metrics"]
    rows.append((name, f"ensemble ({method})", "", f"{metrics['validation']['accuracy']:.4f}",
                 f"{metrics['test']['accuracy']:.4f}"))
    return rows


def ensemble_lines(record: dict[str, Any], sidecar: Path) -> list[str]:
    """The ensemble against its best member, and where it was saved."""
    accuracy = record["metrics"]["test"]["accuracy"]
    best = max(m["test"]["accuracy"] for m in record["members"])
    return [f"Ensemble test accuracy {accuracy:.4f} vs best member {best:.4f} "
            f"({100 * (accuracy - best):+.2f} points).", f"Ensemble saved to {sidecar}"]


PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


def report_title(report: dict[str, Any]) -> str:
    top5 = f", top-5 {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""
    return (f"{report['head']} ({report['kind']}): accuracy {report['accuracy']:.4f}{top5} on "
            f"{report['rows']} rows")


def per_class_rows(report: dict[str, Any]) -> list[Row]:
    return [(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
             str(row["support"])) for name, row in report["per_class"].items()]


def confusion_rows(report: dict[str, Any], class_names: list[str]) -> list[Row]:
    """Rows: the true class, then the count predicted as each class (full class names)."""
    return [(name, *map(str, row)) for name, row in zip(class_names, report["confusion_matrix"])]
