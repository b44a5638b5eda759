"""The audit's targets (issue 18) on a planted folder, and its time and memory on 50,000 rows
(the whole of cifar10/train, extracted: real features rather than a synthetic array cache).

    python bench/audit.py planted        # build /tmp/headstart-audit/planted, extract, audit, score
    python bench/audit.py full           # extract all of cifar10/train at 128 px, audit it, time it

The planted folder: 5,000 CIFAR-10 training images (500 a class) as DIR/train (4,000) and
DIR/test (1,000); 5 % of the training images are moved to a random other class (a wrong label),
and 50 near-copies (resized, slightly cropped, re-encoded JPEG) of training images are planted,
25 in train and 25 in test. truth.json lists the flipped ids and the planted pairs by sample id.
Results go to bench/results/audit.md (appended) and audit.json.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import CIFAR, RESULTS, ROOT, WEIGHTS, machine  # noqa: E402  (puts ROOT on the path)

WORK = Path("/tmp/headstart-audit")
PLANTED = WORK / "planted"
PER_CLASS = 500
TEST_PER_CLASS = 100
FLIP_FRACTION = 0.05
COPIES = 50
SEED = 18
EXTRACT = ["--backbone", "mobilenet", "--alpha", "0.25", "--weights", str(WEIGHTS),
           "--image-size", "128", "--quiet"]


def near_copy(path: Path, rng: random.Random) -> bytes:
    """A resized, slightly cropped, re-encoded JPEG of an image."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    crop = [rng.randint(0, 2) for _ in range(4)]
    image = image.crop((crop[0], crop[1], w - crop[2], h - crop[3]))
    size = rng.choice((24, 40, 48, 64))
    image = image.resize((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(60, 85))
    return buffer.getvalue()


def build_planted(folder: Path = PLANTED) -> dict[str, Any]:
    """The planted folder (built once) and its truth: flipped ids and planted pairs."""
    truth_path = folder / "truth.json"
    if truth_path.is_file():
        return json.loads(truth_path.read_text())
    rng = random.Random(SEED)
    shutil.rmtree(folder, ignore_errors=True)
    classes = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    train: list[tuple[str, Path]] = []
    numbers = itertools.count()
    for name in classes:
        files = sorted((CIFAR / name).iterdir())[:PER_CLASS]
        rng.shuffle(files)
        for split, chosen in (("test", files[:TEST_PER_CLASS]), ("train", files[TEST_PER_CLASS:])):
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            for path in chosen:  # names unique across classes: a moved file keeps its own
                target = folder / split / name / f"{next(numbers):05d}.jpg"
                shutil.copy(path, target)
                if split == "train":
                    train.append((name, target))
    rng.shuffle(train)
    sources, flips = train[:COPIES], train[COPIES:COPIES + int(FLIP_FRACTION * len(train))]
    flipped = []
    for name, path in flips:
        other = rng.choice([c for c in classes if c != name])
        path.rename(folder / "train" / other / path.name)
        flipped.append({"id": f"train/{other}/{path.name}", "true": name, "given": other})
    pairs = []
    for number, (name, path) in enumerate(sources):
        split = "train" if number % 2 == 0 else "test"
        copy = f"copy-{path.stem}.jpg"
        (folder / split / name / copy).write_bytes(near_copy(path, rng))
        pairs.append({"original": f"train/{name}/{path.name}", "copy": f"{split}/{name}/{copy}"})
    truth = {"flipped": flipped, "pairs": pairs}
    truth_path.write_text(json.dumps(truth, indent=1))
    return truth


def cli(*args: str) -> str:
    """Run `python cli.py ARGS` in this checkout; returns stdout (stderr passes through)."""
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


def extract(folder: Path, store: Path) -> None:
    if not any(store.glob("caches/*.h5")):
        started = time.perf_counter()
        cli("extract", str(folder), *EXTRACT, "--store", str(store))
        print(f"extracted {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


CPU_SECONDS: list[float] = []


def timed_audit(store: Path, out: Path, *options: str) -> tuple[dict[str, Any], float, float]:
    """The audit through the CLI (--json), its wall time and the child's peak RSS in MiB (the
    largest of the children so far); its CPU seconds (user + system) go to CPU_SECONDS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    report = json.loads(cli("audit", "--json", "--out", str(out), "--store", str(store), *options))
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return report, seconds, after.ru_maxrss / 1024


def found_pairs(report: dict[str, Any], threshold: float, pixel: float | None = None
                ) -> set[frozenset[str]]:
    """Every pair of ids the audit calls near-copies (train-train and test-train) at thresholds
    at or above the ones it ran with (a pair without a pixel similarity passes)."""
    def passes(feature: float, pixel_value: float | None) -> bool:
        return feature >= threshold and (pixel is None or pixel_value is None
                                         or pixel_value >= pixel)

    found = set()
    for group in report["duplicates"]:
        found |= {frozenset((a, b)) for a, b, s, p in group["pairs"] if passes(s, p)}
    for leak in report["leaks"]:
        found |= {frozenset((leak["test_id"], m["id"])) for m in leak["matches"]
                  if passes(m["similarity"], m["pixel_similarity"])}
    return found


def score_planted(report: dict[str, Any], truth: dict[str, Any],
                  threshold: float | None = None, pixel: float | None = None) -> dict[str, Any]:
    """Recall of the flipped labels in the top 2 x flipped, precision of the whole list, and
    recall / false pairs of the planted near-copies."""
    flipped = {f["id"] for f in truth["flipped"]}
    issues = [entry["id"] for entry in report["label_issues"]]
    top = issues[:2 * len(flipped)]
    planted = {frozenset((p["original"], p["copy"])) for p in truth["pairs"]}
    found = found_pairs(report, report["summary"]["threshold"] if threshold is None
                        else threshold, pixel)
    hits = planted & found
    return {
        "flipped": len(flipped),
        "label_issues": len(issues),
        "flipped_in_top_2x": sum(1 for i in top if i in flipped),
        "recall_top_2x": round(sum(1 for i in top if i in flipped) / len(flipped), 3),
        "precision_list": round(sum(1 for i in issues if i in flipped) / max(1, len(issues)), 3),
        "recall_list": round(sum(1 for i in issues if i in flipped) / len(flipped), 3),
        "planted_pairs": len(planted),
        "pairs_found": len(found),
        "planted_found": len(hits),
        "pair_recall": round(len(hits) / len(planted), 3),
        "false_pair_fraction": round(len(found - planted) / max(1, len(found)), 3),
    }


def write_results(title: str, command: str, rows: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    facts = machine()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"\n## {title}\n", f"- date: {stamp}", f"- command: `{command}`",
             f"- machine: {facts.get('cores')} cores, {facts.get('cpu')}, load average "
             f"{facts.get('load_average')}", ""]
    lines += ["| figure | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    with (RESULTS / "audit.md").open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    saved = RESULTS / "audit.json"
    everything = json.loads(saved.read_text()) if saved.is_file() else {}
    everything[title] = {"date": stamp, "command": command, "machine": facts,
                       "commit": facts.get("commit"), **rows}
    saved.write_text(json.dumps(everything, indent=1))


SWEEP = (0.45, 0.5, 0.55, 0.6, 0.7)
PIXEL_SWEEP = (None, 0.45, 0.55, 0.65)


def planted() -> None:
    """The default audit's figures, then the near-copy figures at other thresholds (from one
    audit run at the lowest, its pairs filtered)."""
    from classifiers.audit import DEFAULT_THRESHOLD

    truth = build_planted()
    store = WORK / "planted-store"
    extract(PLANTED, store)
    report, seconds, peak = timed_audit(store, WORK / "planted-audit")
    rows = {**score_planted(report, truth), "audit_seconds": round(seconds, 1),
            "cpu_seconds": round(CPU_SECONDS[-1], 1), "peak_rss_mib": round(peak), "threshold": DEFAULT_THRESHOLD,
            "out_of_fold_accuracy": report["summary"]["out_of_fold_accuracy"]}
    low, _, _ = timed_audit(store, WORK / "planted-audit-low", "--threshold", str(SWEEP[0]),
                            "--pixel-threshold", "-1", "--no-page")
    for threshold in SWEEP:
        for pixel in PIXEL_SWEEP:
            scored = score_planted(low, truth, threshold, pixel)
            rows[f"features >= {threshold}, pixels >= {pixel}: planted found / pairs found / "
                 "false fraction"] = (f"{scored['planted_found']}/{scored['planted_pairs']} / "
                                      f"{scored['pairs_found']} / {scored['false_pair_fraction']}")
    unplanted = found_pairs(report, report["summary"]["threshold"],
                            report["summary"]["pixel_threshold"]) - {
        frozenset((p["original"], p["copy"])) for p in truth["pairs"]}
    (WORK / "unplanted-pairs.json").write_text(json.dumps(sorted(map(sorted, unplanted))))
    print(json.dumps(rows, indent=1))
    write_results("planted folder (5,000 CIFAR-10 images, 128 px)", "python bench/audit.py "
                  "planted", rows)


def full() -> None:
    store = WORK / "full-store"
    extract(CIFAR, store)
    report, seconds, peak = timed_audit(store, WORK / "full-audit")
    rows = {"rows": report["summary"]["rows"], **report["summary"]["counts"],
            "out_of_fold_accuracy": report["summary"]["out_of_fold_accuracy"],
            "audit_seconds": round(seconds, 1), "cpu_seconds": round(CPU_SECONDS[-1], 1),
            "peak_rss_mib": round(peak),
            "steps_seconds": report["summary"]["seconds"]}
    print(json.dumps(rows, indent=1))
    write_results("whole cifar10/train (50,000 images, 128 px; hash split 80/20)",
                  "python bench/audit.py full", rows)


if __name__ == "__main__":
    {"planted": planted, "full": full}[sys.argv[1] if len(sys.argv) > 1 else "planted"]()
