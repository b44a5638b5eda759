"""Benchmark: extraction throughput (CPU images/s) of a KerasHub preset, against its ceiling.

The preset is made here with KerasHub's own classes and saved with its preset saving, so the run
goes the way a downloaded preset goes (bench/extraction.py's pipeline and ceiling, unchanged):
  tiny   the tests' 2-layer DINOv2 of width 32, patch 4, at 28 px (what the CPU suite runs);
  small  DINOv2-S/14's architecture (12 layers, width 384, 6 heads) with random weights, at 224 px:
         the compute of dinov2_small (whose real weights need a download), for a rough CPU figure.
Numbers depend on the machine's load; results go to bench/results/kerashub-PRESET.json.

    python bench/kerashub.py --images 1000 --preset tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import ROOT, WORK, log, save_json

ARCHITECTURES = {  # keyword arguments of tests.kerashub_support.make_tiny_preset
    "tiny": {"image_size": 28, "patch_size": 4, "width": 32, "layers": 2},
    "small": {"image_size": 224, "patch_size": 14, "width": 384, "layers": 12, "heads": 6,
              "mlp_ratio": 4},
}


def make_preset(kind: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.kerashub_support import make_tiny_preset

    folder = WORK / "presets" / f"dinov2-{kind}"
    if not (folder / "model.weights.h5").is_file():
        make_tiny_preset(folder, **ARCHITECTURES[kind])
    return folder


def run(kind: str, images: int, batch: int, repeats: int) -> dict[str, Any]:
    import extraction

    folder = make_preset(kind)
    settings = {"backbone": f"preset:{folder}", "weights": "imagenet", "pooling": "cls+mean",
                "image_size": ARCHITECTURES[kind]["image_size"]}
    result = extraction.run(images, (batch,), workers=2, repeats=repeats, settings=settings,
                            ceiling_images=min(images, 2000))
    result["preset"] = {"kind": kind, **ARCHITECTURES[kind]}
    for row in result["rows"]:
        log(f"kerashub {kind}: pipeline {row['pipeline_images_per_second']:.0f} images/s, "
            f"ceiling {row['ceiling_images_per_second']:.0f} images/s "
            f"(ratio {row['ratio_median']:.2f}) at batch {batch}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    save_json(f"kerashub-{args.preset}.json", run(args.preset, args.images, args.batch, args.repeats))
