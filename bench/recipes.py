"""Issue 15's recipes on CIFAR-10 (a 20 % hash test split of ../shared/data/cifar10/train),
MobileNet alpha 0.25 ImageNet weights at 128 px, through headstart's own commands, beside one
run of the paper's recipe on the same images:

    python bench/recipes.py                 # the whole 50,000 images (about 20 minutes)
    python bench/recipes.py --images 10000  # a subset (symlinks), faster
    python bench/recipes.py --no-paper      # without the paper's recipe

The best recipe is: `extract --blocks 4 --tta flip`, two standardizing mlps (`MLP_A`, `MLP_B`)
and a greedy ensemble of them; its wall time (extraction + every fit it needs) is compared
with one run of the paper's recipe (bench/paper.py: frozen base inside the Keras model, the
paper's head, 10 epochs, the test split as validation data each epoch). The other fits say what
each ingredient adds on its own: logreg on the last block without views (today's cache), on 4
blocks without views (blocks), on 4 blocks with the mirrored rows (mirrored training rows; its
single-view figure) and averaged over the views (test-time averaging); the ensemble against its
best member. Accuracies come from `evaluate --json`. Writes bench/results/recipes.md and
recipes.json (command, machine, commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CIFAR, MOBILENET, RESULTS, ROOT, WORK, log, machine, subset  # noqa: E402

BACKBONE = ["--backbone", "mobilenet", "--alpha", "0.25", "--weights",
            str(MOBILENET["weights"]), "--image-size", "128"]
#: The standardizing mlp of the recipe: 1,024 hidden units, batch 256, Adam 2e-3 with a cosine
#: schedule, label smoothing 0.1, 20 epochs (no early stopping: the schedule ends the training).
MLP = ["-p", "standardize=true", "-p", "batch_size=256", "-p", "learning_rate=0.002",
       "-p", "lr_schedule=cosine", "-p", "label_smoothing=0.1", "-p", "epochs=20",
       "-p", "early_stopping=false"]
MLP_A = ["--head", "mlp", "--name", "mlp-a", *MLP, "-p", "hidden=1024", "-p", "dropout=0.5"]
MLP_B = ["--head", "mlp", "--name", "mlp-b", *MLP, "-p", "hidden=2048", "-p", "dropout=0.6",
         "-p", "random_state=1"]
LOGREG_C = "0.05"


def cli(*args: str) -> tuple[float, str]:
    """Run `python cli.py ARGS`; returns (wall seconds, stdout)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def run(data: Path, store: Path, paper_run: bool) -> dict:
    """Every step timed, the accuracies, and the paper's recipe (when `paper_run`)."""
    opts = ["--store", str(store), "--cache", "blocks4-flip"]
    steps: dict[str, float] = {}
    log("recipes: extract --blocks 4 --tta flip")
    steps["extract --blocks 4 --tta flip"] = cli(
        "extract", str(data), *BACKBONE, "--blocks", "4", "--tta", "flip", "-q",
        "--name", "blocks4-flip", "--store", str(store))[0]
    fits = {
        "mlp-a": MLP_A, "mlp-b": MLP_B,
        "lr-b1": ["--head", "logreg", "--name", "lr-b1", "--use-blocks", "1", "--no-tta"],
        "lr-b4-plain": ["--head", "logreg", "--name", "lr-b4-plain", "--no-tta",
                        "-p", f"C={LOGREG_C}"],
        "lr-b4": ["--head", "logreg", "--name", "lr-b4", "-p", f"C={LOGREG_C}"],
    }
    for name, fit in fits.items():
        log(f"recipes: fit {name}")
        steps[f"fit {name}"] = cli("fit", *fit, "--replace", "-q", *opts)[0]
    log("recipes: ensemble")
    steps["ensemble mlp-a + mlp-b"] = cli("ensemble", "--heads", "mlp-a,mlp-b", "--name",
                                          "best", "--replace", *opts)[0]
    _, text = cli("evaluate", "--json", *opts)
    accuracy = {r["head"]: {"accuracy": r["accuracy"],
                            "single_view": r.get("accuracy_single_view")}
                for r in json.loads(text)}
    best_steps = ("extract --blocks 4 --tta flip", "fit mlp-a", "fit mlp-b",
                  "ensemble mlp-a + mlp-b")
    results = {"steps": steps, "accuracy": accuracy,
               "best_recipe": {"steps": list(best_steps),
                               "seconds": sum(steps[s] for s in best_steps),
                               "accuracy": accuracy["best"]["accuracy"]}}
    if paper_run:
        import paper

        log("recipes: the paper's recipe (10 epochs, frozen base inside the model)")
        recipe = paper.paper_recipe(data, {**MOBILENET, "pooling": "avg"}, epochs=10)
        results["paper_recipe"] = recipe
        results["best_recipe"]["time_ratio_to_paper"] = (results["best_recipe"]["seconds"]
                                                         / recipe["seconds"])
    return results


def render(results: dict) -> str:
    """recipes.md: the steps, the accuracies and what each ingredient adds."""
    acc = results["accuracy"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    lines = [f"# Issue 15 recipes ({results['images']} images, MobileNet a=0.25, 128 px)", "",
             f"Command: `{results['command']}`; commit {results['machine_start'].get('commit')}; "
             f"machine at start: {results['machine_start']}", "",
             "| step | wall s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["steps"].items()]
    lines += ["", "| head | test accuracy (views averaged) | from the images alone |",
              "|---|---:|---:|"]
    lines += [f"| {head} | {pct(a['accuracy'])} | {pct(a['single_view'])} |"
              for head, a in acc.items()]
    members = max(acc["mlp-a"]["accuracy"], acc["mlp-b"]["accuracy"])
    lines += ["", "What each ingredient adds (test accuracy points):", "",
              f"- 4 blocks instead of the last one (logreg, no views): "
              f"{100 * (acc['lr-b4-plain']['accuracy'] - acc['lr-b1']['accuracy']):+.2f}",
              f"- mirrored training rows (logreg on 4 blocks, judged on the images alone): "
              f"{100 * (acc['lr-b4']['single_view'] - acc['lr-b4-plain']['accuracy']):+.2f}",
              f"- test-time averaging over the mirror (the same logreg): "
              f"{100 * (acc['lr-b4']['accuracy'] - acc['lr-b4']['single_view']):+.2f}",
              f"- a standardizing mlp instead of logreg (both with the views): "
              f"{100 * (acc['mlp-a']['accuracy'] - acc['lr-b4']['accuracy']):+.2f}",
              f"- the ensemble over its best member: {100 * (acc['best']['accuracy'] - members):+.2f}"]
    best = results["best_recipe"]
    lines += ["", f"Best recipe ({' + '.join(best['steps'])}): {pct(best['accuracy'])} in "
              f"{best['seconds']:.0f} s."]
    if "paper_recipe" in results:
        paper = results["paper_recipe"]
        lines.append(f"The paper's recipe on the same images (10 epochs, frozen base inside the "
                     f"model): {pct(paper['test_accuracy'])} in {paper['seconds']:.0f} s; the "
                     f"best recipe takes {best['time_ratio_to_paper']:.2f} of its time.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=0, help="a subset (0: all 50,000)")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper's recipe")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = subset(args.images) if args.images else CIFAR
    store = WORK / f"recipes-{args.images or 'all'}"
    results = {"command": " ".join(["python", "bench/recipes.py", *sys.argv[1:]]),
               "images": args.images or 50000, "machine_start": machine(),
               **run(data, store, not args.no_paper), "machine_end": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps(results, indent=2, default=str))
    text = render(results)
    (args.out / "recipes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
