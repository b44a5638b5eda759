"""Probe for issue 15: multi-block features and mirrored views, measured before they are built in.

On the 20 % hash test split of ../shared/data/cifar10/train (headstart's own split,
`open_dataset(path, 0.2)`), MobileNet alpha 0.25 (ImageNet weights from ../shared) at 128 px:

1. decode every image once; one backbone pass per view (original, mirror) computes the avg- and
   max-pooled outputs of the last 6 blocks (`extract.multiblock`), stored as float16 as a cache is;
2. times the extraction forward pass for --blocks 1, --blocks 4 and --blocks 4 with the mirror, on
   the same decoded images, runs interleaved, medians;
3. test accuracy of logreg (the registry's own `_logreg`) on the last N blocks (N = 1, 2, 3, 4, 6),
   with mirrored training rows, with test-time averaging over the original and the mirror; avg
   vs max pooling of the blocks; and a wider mlp (StandardScaler + MLPHead, 1024 hidden) on the
   best logreg combination.

    python bench/blocks_probe.py [--subset 20000] [--quick]

Writes bench/results/blocks_probe.md and .json; features are kept in
$HEADSTART_BENCH_DIR/blocks_probe/ (default /tmp/headstart-bench) so a rerun skips extraction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CIFAR, RESULTS, WEIGHTS, WORK, log, machine, median  # noqa: E402

BLOCKS = (1, 2, 3, 4, 6)
MAX_BLOCKS = max(BLOCKS)
IMAGE_SIZE = 128
BATCH = 64  # ExtractionPlan's default batch size
SCHEMES = {"avg": "avg pooling of every block (--pooling avg)",
           "max": "max pooling of every block (--pooling max)",
           "mix": "last block avg (today's cache), earlier blocks max"}


#: Training images of the pooling comparison's fits.
POOL_ROWS = 10_000
#: logreg runs of the default grid: every N with avg pooling; mirrored training rows at N = 4;
#: avg, max and mixed pooling at N = 4 and 6 on POOL_ROWS training images (":s").
DEFAULT_GRID = ",".join([f"avg:{n}" for n in BLOCKS] + ["avg:4:m"]
                        + [f"{p}:{n}:s" for n in (4, 6) for p in ("avg", "max", "mix")])


def parse_run(text: str) -> tuple[str, int, bool, int]:
    """POOLING:BLOCKS[:m][:s] → (pooling, blocks, mirrored rows, training-image subset)."""
    parts = text.strip().split(":")
    return parts[0], int(parts[1]), "m" in parts[2:], POOL_ROWS if "s" in parts[2:] else 0


def stratified(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Row indices of a stratified subset (sorted)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep.append(rng.choice(rows, size=max(1, round(len(rows) * fraction)), replace=False))
    return np.sort(np.concatenate(keep))


def decode(dataset, split: str, rows: np.ndarray, prep) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        images = list(pool.map(lambda r: dataset.load(split, int(r), prep, resized=False), rows))
    return prep.stack(images), time.perf_counter() - started


def probe_model(base, keras):
    """One model: [avg of the last 6 blocks | max of the last 6 blocks], and the block names."""
    from extract.multiblock import feature_blocks

    blocks = feature_blocks(base)[-MAX_BLOCKS:]
    avg = [keras.layers.GlobalAveragePooling2D(name=f"p_avg_{b.name}")(b.tensor)
           for b in blocks[:-1]] + [base.output]
    mx = [keras.layers.GlobalMaxPooling2D(name=f"p_max_{b.name}")(b.tensor) for b in blocks]
    model = keras.Model(base.inputs, keras.layers.Concatenate()(avg + mx), name="probe")
    widths = [int(t.shape[-1]) for t in avg]
    return model, [b.name for b in blocks], widths


def extract_all(args, dataset, prep, keras):
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.multiblock import views_forward_function

    out = WORK / "blocks_probe" / f"features-{args.subset or 'all'}.npz"
    meta_path = out.with_suffix(".json")
    if out.exists() and meta_path.exists() and not args.reextract:
        log(f"reusing {out}")
        return dict(np.load(out)), json.loads(meta_path.read_text())
    backbone = get_backbone("mobilenet")
    base = build_feature_model(backbone, 0.25, Weights.parse(str(WEIGHTS)), IMAGE_SIZE, "avg")
    model, names, widths = probe_model(base, keras)
    forward = views_forward_function(model, prep, flip=True)
    arrays, meta = {}, {"names": names, "widths": widths, "decode_s": {}, "extract_s": {}}
    for split in ("train", "test"):
        labels = dataset.splits[split].labels
        rows = stratified(labels, args.subset_fraction, seed=0)
        images, seconds = decode(dataset, split, rows, prep)
        meta["decode_s"][split] = seconds
        log(f"{split}: decoded {len(rows)} images in {seconds:.1f} s")
        started = time.perf_counter()
        plain, mirrored = [], []
        for start in range(0, len(images), BATCH):
            a, b = forward(images[start:start + BATCH])
            plain.append(a.astype(np.float16))
            mirrored.append(b.astype(np.float16))
        meta["extract_s"][split] = time.perf_counter() - started
        log(f"{split}: both views in {meta['extract_s'][split]:.1f} s")
        arrays[f"{split}_x"] = np.concatenate(plain)
        arrays[f"{split}_xm"] = np.concatenate(mirrored)
        arrays[f"{split}_y"] = labels[rows]
        if split == "train":
            arrays["timing_images"] = images[: args.timing_images]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    meta_path.write_text(json.dumps(meta))
    return arrays, meta


def time_extraction(images: np.ndarray, prep, repeats: int) -> dict:
    """Forward-pass seconds (resize + preprocess + backbone, in the graph, batches of 64) of
    --blocks 1, --blocks 4, and each with the mirror, runs interleaved."""
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.multiblock import multiblock_model, views_forward_function
    from extract.forward import forward_function

    base = build_feature_model(get_backbone("mobilenet"), 0.25, Weights.parse(str(WEIGHTS)),
                               IMAGE_SIZE, "avg")
    four, _ = multiblock_model(base, 4, "avg")
    runs = {
        "blocks 1 (today's forward_function)": forward_function(base, prep),
        "blocks 4": forward_function(four, prep),
        "blocks 1 + flip": views_forward_function(base, prep, flip=True),
        "blocks 4 + flip": views_forward_function(four, prep, flip=True),
        "blocks 4 + flip (one stacked 2B call)": views_forward_function(four, prep, flip=True,
                                                                         stacked=True),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn(images[:BATCH])  # trace
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            for start in range(0, len(images), BATCH):
                fn(images[start:start + BATCH])
            seconds[name].append(time.perf_counter() - started)
    return seconds


def columns(meta: dict, scheme: str, count: int) -> np.ndarray:
    """Column indices of the last `count` blocks in the probe layout for a pooling scheme."""
    widths = meta["widths"]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    half = int(offsets[-1])
    chosen = range(len(widths) - count, len(widths))
    cols = []
    for b in chosen:
        last = b == len(widths) - 1
        use_max = scheme == "max" or (scheme == "mix" and not last)
        base = half if use_max else 0
        cols.append(np.arange(base + offsets[b], base + offsets[b + 1]))
    return np.concatenate(cols)


def logreg_run(data: dict, cols: np.ndarray, mirrored_rows: bool, train_rows: int = 0) -> dict:
    """logreg on the given columns; `train_rows` > 0: a stratified subset of the training images
    (for the pooling comparison, which the full fits make too slow on 2 shared cores)."""
    from classifiers.registry import HEADS

    rows = (stratified(data["train_y"], train_rows / len(data["train_y"]), seed=2)
            if train_rows else np.arange(len(data["train_y"])))
    x = data["train_x"][rows][:, cols].astype(np.float32)
    y = data["train_y"][rows]
    if mirrored_rows:
        x = np.concatenate([x, data["train_xm"][rows][:, cols].astype(np.float32)])
        y = np.concatenate([y, y])
    head = HEADS["logreg"].build()
    started = time.perf_counter()
    head.fit(x, y)
    fit_s = time.perf_counter() - started
    p = head.predict_proba(data["test_x"][:, cols].astype(np.float32))
    pm = head.predict_proba(data["test_xm"][:, cols].astype(np.float32))
    yt = data["test_y"]
    return {"single": float((p.argmax(1) == yt).mean()),
            "tta": float(((p + pm).argmax(1) == yt).mean()),
            "mirror_only": float((pm.argmax(1) == yt).mean()),
            "fit_s": fit_s, "rows": int(len(x)), "width": int(len(cols))}


def mlp_run(data: dict, cols: np.ndarray, mirrored_rows: bool, hidden: int, epochs: int) -> dict:
    """StandardScaler + MLPHead; early stopping on 10 % of the training *images* (both views of a
    held-out image are held out)."""
    from sklearn.preprocessing import StandardScaler

    from classifiers.mlp import MLPHead

    y_all = data["train_y"]
    val = np.zeros(len(y_all), bool)
    val[stratified(y_all, 0.1, seed=1)] = True
    x, xm = data["train_x"][:, cols].astype(np.float32), data["train_xm"][:, cols].astype(np.float32)
    fit_x, fit_y = x[~val], y_all[~val]
    if mirrored_rows:
        fit_x = np.concatenate([fit_x, xm[~val]])
        fit_y = np.concatenate([fit_y, y_all[~val]])
    scaler = StandardScaler().fit(fit_x)
    head = MLPHead(hidden=(hidden,), dropout=0.5, epochs=epochs, early_stopping=True, patience=4,
                   random_state=0)
    started = time.perf_counter()
    head.fit(scaler.transform(fit_x), fit_y,
             validation_data=(scaler.transform(x[val]), y_all[val]))
    fit_s = time.perf_counter() - started
    p = head.predict_proba(scaler.transform(data["test_x"][:, cols].astype(np.float32)))
    pm = head.predict_proba(scaler.transform(data["test_xm"][:, cols].astype(np.float32)))
    yt = data["test_y"]
    return {"single": float((p.argmax(1) == yt).mean()),
            "tta": float(((p + pm).argmax(1) == yt).mean()),
            "fit_s": fit_s, "rows": int(len(fit_x)), "width": int(len(cols)), "hidden": hidden,
            "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=0,
                        help="stratified subset of this many images of the 50,000 (0: all)")
    parser.add_argument("--timing-images", type=int, default=8192)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--mlp-hidden", type=int, default=1024)
    parser.add_argument("--mlp-epochs", type=int, default=30)
    parser.add_argument("--grid", default=DEFAULT_GRID,
                        help="logreg runs, comma-separated POOLING:BLOCKS[:m] (m: with mirrored "
                             "training rows); the newton-cg fit on 80k mirrored rows takes minutes "
                             "on 2 cores, so only some runs have them by default")
    parser.add_argument("--quick", action="store_true", help="fewer fits (smoke test)")
    parser.add_argument("--reextract", action="store_true")
    parser.add_argument("--output", default="blocks_probe")
    parser.add_argument("--timing-only", action="store_true",
                        help="re-measure the extraction times only (reusing the cached features) "
                             "and rewrite the report with them")
    args = parser.parse_args()
    args.subset_fraction = args.subset / 50_000 if args.subset else 1.0
    command = "python bench/blocks_probe.py " + " ".join(sys.argv[1:])
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine_start = machine()

    from extract.backbones import get_backbone
    from extract.datasets import open_dataset
    from extract.runtime import load_keras

    keras = load_keras()
    dataset = open_dataset(str(CIFAR), 0.2)
    prep = get_backbone("mobilenet").preprocessing(IMAGE_SIZE)
    data, meta = extract_all(args, dataset, prep, keras)
    log(f"features: train {data['train_x'].shape}, test {data['test_x'].shape}; "
        f"blocks {meta['names']} widths {meta['widths']}")

    if args.timing_only:
        timing = time_extraction(data["timing_images"], prep, args.timing_repeats)
        log(f"timing: { {k: median(v) for k, v in timing.items()} }")
        report = json.loads((RESULTS / f"{args.output}.json").read_text())
        report.update(timing_s=timing, timing_command=command, timing_started=started_at,
                      timing_machine_start=machine_start, timing_machine_end=machine())
        (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2, default=str))
        (RESULTS / f"{args.output}.md").write_text(render(report))
        log(f"rewrote {RESULTS / (args.output + '.md')} with new timings")
        return
    decode_per_image = sum(meta["decode_s"].values()) / (len(data["train_y"]) + len(data["test_y"]))

    grid = [tuple(parse_run(run)) for run in args.grid.split(",")]
    if args.quick:
        grid = [("avg", 1, False, 0), ("avg", 4, True, 0), ("max", 4, True, 0)]
    # each fit is appended to a log as it ends, so an interrupted probe resumes where it was
    done_path = WORK / "blocks_probe" / f"logreg-{args.subset or 'all'}.jsonl"
    done = {}
    if done_path.exists() and not args.quick:
        for line in done_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["scheme"], r["blocks"], r["mirrored_rows"], r.get("subset", 0))] = r
    results = []
    for scheme, n, mirrored, subset in grid:
        if (scheme, n, mirrored, subset) in done:
            results.append(done[(scheme, n, mirrored, subset)])
            continue
        r = logreg_run(data, columns(meta, scheme, n), mirrored, subset)
        r.update(scheme=scheme, blocks=n, mirrored_rows=mirrored, subset=subset)
        results.append(r)
        if not args.quick:
            with done_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
        log(f"logreg {scheme} N={n} mirrored={mirrored} subset={subset}: single "
            f"{r['single']:.4f} tta {r['tta']:.4f} ({r['fit_s']:.1f} s)")
    best = max((r for r in results if not r.get("subset")), key=lambda r: r["tta"])
    mlp = mlp_run(data, columns(meta, best["scheme"], best["blocks"]), True, args.mlp_hidden,
                  args.mlp_epochs if not args.quick else 3)
    mlp.update(scheme=best["scheme"], blocks=best["blocks"], mirrored_rows=True)
    log(f"mlp: single {mlp['single']:.4f} tta {mlp['tta']:.4f} ({mlp['fit_s']:.1f} s)")
    timing = time_extraction(data["timing_images"], prep, args.timing_repeats)
    log(f"timing: { {k: median(v) for k, v in timing.items()} }")

    report = {"command": command, "started": started_at, "machine_start": machine_start,
              "machine_end": machine(), "meta": meta, "timing_s": timing,
              "timing_images": int(len(data["timing_images"])),
              "decode_s_per_image": decode_per_image, "logreg": results, "mlp": mlp,
              "rows": {"train": int(len(data["train_y"])), "test": int(len(data["test_y"]))}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / f"{args.output}.md").write_text(render(report))
    log(f"wrote {RESULTS / (args.output + '.md')}")


def _machine_line(m: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    load = " / ".join(str(x) for x in m["load_average"])
    return (f"_Machine: {m['cores']} cores, {m['cpu']}, {'GPU' if m['gpus'] else 'no GPU'}; "
            f"load average {load} (1/5/15 min); Python {m['python']}; {libs}; "
            f"commit {m['commit']}._")


def render(r: dict) -> str:
    meta, med = r["meta"], {k: median(v) for k, v in r["timing_s"].items()}
    base = med["blocks 1 (today's forward_function)"]
    n_img = r["timing_images"]
    dec = r["decode_s_per_image"] * n_img
    lines = [
        "# Probe: multi-block features and mirrored views (issue 15)", "",
        f"Command: `{r['command']}`, started {r['started']}.", "",
        "Start: " + _machine_line(r["machine_start"]), "",
        "End: " + _machine_line(r["machine_end"]), "",
        f"Data: `open_dataset(../shared/data/cifar10/train, 0.2)` (headstart's 20 % hash test "
        f"split): {r['rows']['train']:,} train / {r['rows']['test']:,} test images"
        + (" (a stratified subset)" if "--subset" in r["command"] else " (all 50,000)") +
        ". MobileNet alpha 0.25, ImageNet weights (../shared), 128 px, tensorflow resizer, "
        "features stored as float16 (the cache's default dtype).", "",
        "Blocks (bottom to top, `extract.multiblock.feature_blocks`): "
        + ", ".join(f"`{n}` ({w})" for n, w in zip(meta["names"], meta["widths"])) + ".", "",
        "## Extraction time", "",
        f"Forward pass (resize + preprocess + backbone in one traced function, batches of {BATCH}) "
        f"over the same {n_img:,} decoded training images, runs interleaved, median of "
        f"{len(next(iter(r['timing_s'].values())))}. 'with decode' adds the measured decode time "
        f"of those images ({dec:.1f} s, 2 threads) serially — the pipeline overlaps decoding with "
        "the backbone, so the real end-to-end ratio lies between the two columns.", "",
    ]
    if "timing_command" in r:
        lines += [f"Timings re-measured by `{r['timing_command']}`, started {r['timing_started']}.",
                  "", "Start: " + _machine_line(r["timing_machine_start"]), "",
                  "End: " + _machine_line(r["timing_machine_end"]), ""]
    lines += ["| run | forward s (runs) | ratio | with decode s | ratio |", "|---|---|---|---|---|"]
    for name, values in r["timing_s"].items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {med[name]:.2f} ({runs}) | {med[name] / base:.3f}x | "
                     f"{med[name] + dec:.2f} | {(med[name] + dec) / (base + dec):.3f}x |")
    lines += ["", f"Full extraction of both views with 6 blocks x 2 poolings (one pass per view): "
              + ", ".join(f"{s} {v:.1f} s" for s, v in meta["extract_s"].items())
              + "; decode " + ", ".join(f"{s} {v:.1f} s" for s, v in meta["decode_s"].items())
              + ".", "",
              "## Test accuracy: logreg (StandardScaler + LogisticRegression newton-cg, the "
              "registry's `_logreg`)", "",
              "single = original test images; TTA = mean of the probabilities on the original and "
              "the mirrored test image; mirrored rows = every training image's mirror added as a "
              "row (the test split is never seen).", "",
              "| pooling | blocks | width | mirrored train rows | rows | single | TTA | mirror only "
              "| fit s |", "|---|---|---|---|---|---|---|---|---|"]
    full = [x for x in r["logreg"] if not x.get("subset")]
    sub = [x for x in r["logreg"] if x.get("subset")]

    def row(x: dict) -> str:
        only = f"{x['mirror_only']:.4f}" if x.get("mirror_only") is not None else "-"
        return (f"| {x['scheme']} | {x['blocks']} | {x['width']} | "
                f"{'yes' if x['mirrored_rows'] else 'no'} | {x['rows']:,} | "
                f"{x['single']:.4f} | {x['tta']:.4f} | {only} | {x['fit_s']:.1f} |")
    lines += [row(x) for x in full]
    if sub:
        lines += ["", f"Pooling comparison: the same head on a stratified subset of "
                  f"{sub[0]['subset']:,} training images (the full newton-cg fits take 2-10 "
                  "minutes each on the shared cores), same test split.", "",
                  lines[-len(full) - 2], lines[-len(full) - 1]] + [row(x) for x in sub]
    m = r["mlp"]
    lines += ["", "Pooling schemes: " + "; ".join(f"`{k}` = {v}" for k, v in SCHEMES.items())
              + ".", "",
              "## Wider mlp on the best logreg combination", "",
              f"StandardScaler + `MLPHead(hidden=({m['hidden']},), dropout=0.5)`, Adam 1e-3, "
              f"batch 128, up to {m['epochs']} epochs, early stopping (patience 4) on 10 % of the "
              "training images held out with their mirrors; mirrored training rows.", "",
              "| pooling | blocks | width | rows | single | TTA | fit s |", "|---|---|---|---|---|---|---|",
              f"| {m['scheme']} | {m['blocks']} | {m['width']} | {m['rows']:,} | {m['single']:.4f} | "
              f"{m['tta']:.4f} | {m['fit_s']:.1f} |", "",
              "Note: the best combination is chosen on the test split here (a probe, not a "
              "result); `tune` would choose it on the validation split.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
