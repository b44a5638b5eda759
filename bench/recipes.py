"""Issue 15's recipes on CIFAR-10 (a 20 % hash test split of ../shared/data/cifar10/train),
MobileNet alpha 0.25 ImageNet weights at 128 px, through headstart's own commands:

    python bench/recipes.py                 # the whole 50,000 images
    python bench/recipes.py --images 10000  # a subset (symlinks), faster

Steps, each timed (wall seconds of the command): extract --blocks 4 --tta flip; logreg on it
(blocks + mirrored rows + test-time averaging); the same logreg on the last block without views
(today's cache); an mlp; a greedy ensemble of the two heads. Accuracies come from
`evaluate --json` (with views, and from the images alone). Writes bench/results/recipes.md and
recipes.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CIFAR, RESULTS, ROOT, WORK, machine, subset  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
BACKBONE = ["--backbone", "mobilenet", "--alpha", "0.25", "--weights", str(WEIGHTS),
            "--image-size", "128"]


def cli(*args: str) -> tuple[float, str]:
    """Run `python cli.py ARGS`; returns (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="a subset (0: all 50,000)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = subset(args.images) if args.images else CIFAR
    store = WORK / f"recipes-{args.images or 'all'}"
    results: dict = {"command": " ".join(["python", "bench/recipes.py", *sys.argv[1:]]),
                     "machine_start": machine(), "steps": {}}
    steps = results["steps"]
    opts = ["--store", str(store)]
    steps["extract --blocks 4 --tta flip"] = cli("extract", str(data), *BACKBONE,
                                                 "--blocks", "4", "--tta", "flip", "-q",
                                                 "--name", "blocks4-flip", *opts)[0]
    fits = {
        "logreg (4 blocks, mirrored rows, averaged)": ["--head", "logreg", "--name", "lr-b4"],
        "logreg (last block, no views: today's cache)": ["--head", "logreg", "--name", "lr-b1",
                                                         "--use-blocks", "1", "--no-tta"],
        "logreg (4 blocks, no views)": ["--head", "logreg", "--name", "lr-b4-plain", "--no-tta"],
        "mlp 1024 (4 blocks, mirrored rows, averaged)": [
            "--head", "mlp", "--name", "mlp-b4", "-p", "hidden=1024", "-p", "epochs=20",
            "-p", "dropout=0.3", "-q"],
    }
    for label, fit in fits.items():
        steps[label] = cli("fit", *fit, "--cache", "blocks4-flip", "--replace", *opts)[0]
    steps["ensemble greedy (lr-b4 + mlp-b4)"] = cli(
        "ensemble", "--heads", "lr-b4,mlp-b4", "--cache", "blocks4-flip", "--replace",
        *opts)[0]
    _, text = cli("evaluate", "--json", "--cache", "blocks4-flip", *opts)
    results["accuracy"] = {r["head"]: {"accuracy": r["accuracy"],
                                       "single_view": r.get("accuracy_single_view")}
                           for r in json.loads(text)}
    results["machine_end"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# Issue 15 recipes ({args.images or 50000} images, MobileNet a=0.25, 128 px)", "",
             f"Command: `{results['command']}`; machine at start: {results['machine_start']}", "",
             "| step | wall s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in steps.items()]
    lines += ["", "| head | test accuracy (views averaged) | from the images alone |",
              "|---|---:|---:|"]
    for head, acc in results["accuracy"].items():
        single = "-" if acc["single_view"] is None else f"{100 * acc['single_view']:.2f} %"
        lines.append(f"| {head} | {100 * acc['accuracy']:.2f} % | {single} |")
    (args.out / "recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
