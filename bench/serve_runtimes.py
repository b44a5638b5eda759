"""serve latency per runtime (issue 17): TensorFlow against ONNX Runtime, alternating pairs.

    python bench/serve_runtimes.py [--pairs 3] [--requests 300] [--image-size 224]

Two stores of ../shared/data/cifar10-mini (MobileNet alpha 0.25, ImageNet weights), one
extracted with `--runtime tf` and one with `--runtime onnx`, a logreg head fitted on each
(`serve` answers with its cache's runtime); then, alternately, `serve` on each and one image per
request at concurrency 1 (bench/load_test.py's closed loop). p50/p99 are per run; the verdict
uses the median over pairs of the tf/onnx p50 ratio. Writes bench/results/serve_runtimes.json
(command, machine, commit) and serve_runtimes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MOBILENET, RESULTS, ROOT, WORK, log, machine, median, save_json  # noqa: E402
from load_test import run as load  # noqa: E402
from server_process import SHARED, running_server  # noqa: E402

RUNTIMES = ("tf", "onnx")


def prepare(runtime: str, image_size: int) -> Path:
    """A store of the mini set extracted with `runtime`, with a logreg head (reused if there)."""
    store = WORK / f"serve-{runtime}-{image_size}"
    for args in (["extract", str(SHARED / "data" / "cifar10-mini"), "--backbone", "mobilenet",
                  "--alpha", "0.25", "--weights", str(MOBILENET["weights"]), "--image-size",
                  str(image_size), "--runtime", runtime, "-q"],
                 ["fit", "--head", "logreg", "--replace"]):
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "--store", str(store)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    started = machine()
    stores = {runtime: prepare(runtime, args.image_size) for runtime in RUNTIMES}
    runs = []
    for pair in range(args.pairs):
        for runtime in RUNTIMES:
            with running_server(str(stores[runtime]), "logreg") as url:
                result = asyncio.run(load(url, [1], args.requests, args.seconds))[0]
            runs.append({"pair": pair, "runtime": runtime, **result})
            log(f"serve {runtime} pair {pair}: p50 {result['p50']:.1f} ms, p99 "
                f"{result['p99']:.1f} ms, {result['rps']:.1f} req/s")
    p50 = {r: [x["p50"] for x in runs if x["runtime"] == r] for r in RUNTIMES}
    ratios = [tf / onnx for tf, onnx in zip(p50["tf"], p50["onnx"])]
    command = " ".join(["python", "bench/serve_runtimes.py", *sys.argv[1:]])
    summary = {"command": command, "machine": started, "machine_end": machine(),
               "image_size": args.image_size, "runs": runs,
               "p50_ratio_tf_over_onnx": median(ratios), "ratios": ratios,
               "target_met": median(ratios) >= 1.5}
    save_json("serve_runtimes.json", summary)
    lines = [f"# serve latency per runtime (MobileNet a=0.25, {args.image_size} px, concurrency 1)",
             "", f"Command: `{command}`; commit {started.get('commit')}; machine at start: "
             f"{started}", "", "| pair | runtime | req/s | p50 ms | p99 ms |",
             "| ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['pair']} | {r['runtime']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} |"
              for r in runs]
    lines += ["", f"p50 tf / onnx, median of {len(ratios)} pairs: "
              f"{summary['p50_ratio_tf_over_onnx']:.2f}x (pairs: "
              f"{', '.join(f'{x:.2f}' for x in ratios)}); target >= 1.5x: "
              f"{'met' if summary['target_met'] else 'not met'}."]
    (RESULTS / "serve_runtimes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
