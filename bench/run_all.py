"""Run every benchmark of issue 6 and write bench/results/results.md and results.json.

    python bench/run_all.py            # the full run (about 15-25 minutes on 2 cores)
    python bench/run_all.py --quick    # smaller sizes, a few minutes
    python bench/run_all.py --only paper extraction

Offline: reads ../shared (MobileNet alpha 0.25 weights, CIFAR-10 JPEGs); writes stores and data
subsets (symlinks) under $HEADSTART_BENCH_DIR (default /tmp/headstart-bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CIFAR, RESULTS, WORK, command_line, log, machine, provenance, subset  # noqa: E402

import caches  # noqa: E402
import extraction  # noqa: E402
import paper  # noqa: E402
from report import render  # noqa: E402

ALL = ("paper", "extraction", "vgg16", "heads", "cache_read", "scaling", "storage")


class Sections(dict):
    """The benchmarks' results; each section stored by this run gets its own provenance (the
    command that re-measures it alone, the run's command, the machine right after it, the commit),
    which bench/figures.py requires of every figure it puts in the README."""

    def __init__(self, provenance: dict, quick: bool) -> None:
        super().__init__()
        self.provenance, self.quick = provenance, quick

    def measured(self, name: str, value: object) -> None:
        facts = machine()
        alone = " --before DIR" if name == "extraction_before" else f" --only {name}"
        self.provenance[name] = {"command": f"python bench/run_all.py{' --quick' if self.quick else ''}"
                                 + alone, "run": command_line(), "machine": facts,
                                 "commit": facts["commit"]}
        self[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes)")
    parser.add_argument("--only", nargs="+", choices=ALL, default=list(ALL))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--before", type=Path, help="also run the extraction benchmark on the "
                        "code in this folder (e.g. an older commit: git archive f39160f | tar -x "
                        "-C /tmp/before), for before/after figures")
    args = parser.parse_args()
    q = args.quick
    started = time.time()
    start = provenance()
    results: dict = {"command": start["command"], "commit": start["commit"], "quick": q,
                     "only": args.only, "machine_start": start["machine"],
                     "provenance": {}, "notes": args.note}
    done = results["benchmarks"] = Sections(results["provenance"], q)
    previous = args.out / "results.json"
    if set(args.only) != set(ALL) and previous.is_file():  # keep the other benchmarks' results
        kept = json.loads(previous.read_text())
        done.update(kept.get("benchmarks", {}))
        results["provenance"].update(kept.get("provenance", {}))  # each kept section keeps its own
    full = CIFAR.parent if not q else subset(10000)  # the full set: 50,000 images, 40,072 train rows
    if "paper" in args.only:
        done.measured("paper", paper.run(images=2000 if q else 10000, epochs=10, repeats=1 if q else 5,
                                  seeds=3 if q else 40))
    if "extraction" in args.only:
        done.measured("extraction", extraction.run(images=2000 if q else 5000,
                                            batches=(64,) if q else (64, 128),
                                            repeats=2 if q else 5))
    if args.before:
        done.measured("extraction_before", extraction.run_elsewhere(args.before, images=2000 if q else 5000,
                                                             repeats=2 if q else 5))
    if "vgg16" in args.only:
        vgg = {"backbone": "vgg16", "weights": "none", "image_size": 128}
        done.measured("vgg16", extraction.run(images=1000, batches=(32,), repeats=1,
                                       settings=vgg, ceiling_images=200, pipeline_images=300))
    if "heads" in args.only:
        done.measured("heads", caches.heads(full, q))
    if "cache_read" in args.only:
        done.measured("cache_read", caches.cache_reads(caches.read_caches(full)))
    if "scaling" in args.only:
        done.measured("scaling", caches.scaling((1000, 2000, 5000) if q else (1000, 5000, 20000, 40000)))
    if "storage" in args.only:
        sources = {}
        for pooling, cache in done.get("heads", {}).get("caches", {}).items():
            sources[f"{pooling}-{cache['width']}"] = (cache["path"], 40000 if cache["width"] <= 512 else 10000)
        done.measured("storage", caches.storage(sources, repeats=2 if q else 3))
    results["machine_end"] = machine()
    results["minutes"] = (time.time() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "results.md").write_text(render(results))
    log(f"wrote {args.out / 'results.md'} and results.json in {results['minutes']:.1f} min")


if __name__ == "__main__":
    main()
