"""Extraction cost of `--blocks 4` and `--tta flip` against `--blocks 1` (issue 15's targets).

Each run is `extract_features` into a fresh store (`result.seconds`: decode, resize, preprocess,
forward, segment writes; the model build is left out), on the same images, runs interleaved
(one round of every variant, then the next round), median of the rounds. Three ways of running
the mirrored view are compared: two compiled calls (what headstart does: the original view is
today's cache, bit for bit), one compiled call running the model twice, and one stacked 2B call.

    python bench/blocks_extraction.py --images 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MOBILENET, WORK, log, machine, median, save_json, subset  # noqa: E402

import extract.pipeline as pipeline  # noqa: E402
from extract.backbones import Weights, get_backbone  # noqa: E402
from extract.datasets import open_dataset  # noqa: E402
from extract.multiblock import views_forward_function  # noqa: E402
from extract.plan import ExtractionPlan  # noqa: E402
from store.store import Store  # noqa: E402

#: name -> (blocks, tta, how the mirrored view runs)
VARIANTS = {
    "blocks 1": (1, None, "two calls"),
    "blocks 4": (4, None, "two calls"),
    "blocks 1 + flip": (1, "flip", "two calls"),
    "blocks 4 + flip": (4, "flip", "two calls"),
    "blocks 4 + flip (one call)": (4, "flip", "one call"),
    "blocks 4 + flip (stacked)": (4, "flip", "stacked"),
}


def _forward(how: str) -> Any:
    """A replacement for `pipeline.views_forward` running the views `how`."""
    real = pipeline.views_forward
    if how == "two calls":
        return real

    def build(model: Any, preprocessing: Any, compute: Any = None, tta: str | None = None,
              make: Any = None) -> Any:
        return views_forward_function(model, preprocessing, flip=tta == "flip",
                                      stacked=how == "stacked")
    return build


def run(folder: Path, blocks: int, tta: str | None, how: str, batch: int
        ) -> tuple[float, float]:
    spec = get_backbone(MOBILENET["backbone"])
    plan = ExtractionPlan(dataset=open_dataset(str(folder), 0.2), backbone=spec,
                          weights=Weights.parse(MOBILENET["weights"]),
                          image_size=MOBILENET["image_size"], alpha=MOBILENET["alpha"],
                          batch_size=batch, workers=2, blocks=blocks, tta=tta)
    store = WORK / "blocks_extraction" / "store"
    shutil.rmtree(store, ignore_errors=True)
    real = pipeline.views_forward
    pipeline.views_forward = _forward(how)
    try:
        result = pipeline.extract_features(plan, Store(store), progress=False)
        return result.seconds, result.cpu_seconds
    finally:
        pipeline.views_forward = real
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    folder = subset(args.images)
    names = args.variants.split(",")
    start = machine()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            seconds, cpu_seconds = run(folder, *VARIANTS[name], args.batch_size)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
            log(f"round {round_ + 1} {name}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU")
    lines = [f"Machine at start: {start}", f"Machine at end: {machine()}",
             f"{args.images} images, MobileNet 0.25 at 128 px, batch {args.batch_size}, "
             f"{args.rounds} interleaved rounds; pass seconds. Ratios: median over rounds of "
             f"each round's ratio to that round's {names[0]!r}.", "",
             "| run | wall s (rounds) | wall ratio | CPU s (median) | CPU ratio |",
             "|---|---|---|---|---|"]
    for name in names:
        wall = [t / b for t, b in zip(times[name], times[names[0]])]
        used = [t / b for t, b in zip(cpu[name], cpu[names[0]])]
        rounds = ", ".join(f"{t:.2f}" for t in times[name])
        lines.append(f"| {name} | {median(times[name]):.2f} ({rounds}) | {median(wall):.3f}x | "
                     f"{median(cpu[name]):.2f} | {median(used):.3f}x |")
    print("\n".join(lines))
    save_json("blocks_extraction.json", {"images": args.images, "wall": times, "cpu": cpu})


if __name__ == "__main__":
    main()
