"""Markdown tables from results.json (bench/run_all.py writes both)."""

from __future__ import annotations

from statistics import mean
from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _machine(m: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    gpus = "; ".join(m.get("gpus") or []) or "no GPU"
    return (f"_Machine: {m['cores']} cores, {m['cpu']}, {gpus}; load average "
            f"{' / '.join(str(x) for x in m['load_average'])} (1/5/15 min); Python {m['python']}; "
            f"{libs}; commit {m['commit']}._\n")


def _f(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"  # NaN: not measured by that code


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**not met**"


def _verdict(e: dict) -> str:
    """Target 2, judged on the median over all runs at the default batch size (never the best)."""
    from figures import extraction_verdict

    v = extraction_verdict(e)
    whole = v.get("end_to_end_ratio_median")
    beside = (f"; end to end (dataset digest, model build and HDF5 assembly included) "
              f"{whole:.3f}" if whole is not None else
              "; the end-to-end ratio was not recorded by that code")
    return (f"Target >= {v['target']}: {_ok(v['met'])} (median pass ratio over all {v['runs']} runs "
            f"at batch {', '.join(map(str, v['batch_size']))}: {v['ratio_median']:.3f}{beside}).")


def _paired(d: dict, what: str) -> str:
    """A paired accuracy difference: mean, 95 % interval, and the equality test."""
    if d.get("lower") is None:
        return f"{d['mean']:+.4f} ({what}, {d['runs']} seeds: too few to test equality)"
    return (f"{d['mean']:+.4f}, 95 % interval {d['lower']:+.4f} to {d['upper']:+.4f} ({what} per "
            f"seed, {d['runs']} seeds; equal or better when the interval's lower end is above "
            f"-{d['margin']})")


def _paper_section(name: str, p: dict) -> list[str]:
    """Section 1 for one setting: (a) the paper's recipe, (b) headstart, further heads."""
    a, h, s = p["a_paper"], p["b_headstart"], p["settings"]
    alpha = f" alpha {s['alpha']}" if s.get("alpha") else ""
    out = [f"\n## 1. The paper's recipe vs headstart: {s['backbone']}{alpha} at {s['image_size']} px "
           f"({p['images']:,} images, E = {p['epochs']}, {p.get('repeats', 1)} runs each)\n",
           f"{s['backbone']}{alpha}, weights {p.get('weights', 'ImageNet')}, {s.get('pooling', 'avg')} "
           "pooling, Dense(256, relu) + Dropout(0.5) + softmax, Adam 1e-3, batch 128. Wall times "
           "are medians; the speed-up is the median of the per-pair ratios.\n",
           _machine(p["machine"])]
    held = f" ({h['validation_rows']} held out)" if h.get("validation_rows") else ""
    rows = [["(a) paper: frozen base inside the model, `model.fit` E epochs",
             f"{a['seconds']:.1f}", f"{a['test_accuracy']:.4f}",
             f"decode {a['decode_seconds']:.1f} s + fit/validate {a['fit_seconds']:.1f} s; "
             f"{a['train_rows']} train rows"],
            ["(b) headstart: extract once + `fit --head mlp` E epochs",
             f"{h['seconds']:.1f}", f"{h['test_accuracy']:.4f}",
             f"extract {h['extract_seconds']:.1f} s + fit {h['fit_seconds']:.1f} s; "
             f"{h['train_rows']} train rows{held}"]]
    for f in h["further_heads"]:
        rows.append([f"further head on the same cache: {f['head']} {f['options'] or ''}",
                     f"{f['seconds']:.2f}", f"{f['test_accuracy']:.4f}",
                     f"{f['speedup_vs_a']:.0f}x faster than (a)"])
    out.append(_table(["run", "wall s", "test accuracy", "notes"], rows))
    accuracy = f"{h['test_accuracy'] - a['test_accuracy']:+.4f} (medians)"
    if p.get("accuracies"):
        pairs = p["accuracies"]
        spread = max(a_acc for a_acc, _ in pairs) - min(a_acc for a_acc, _ in pairs)
        out.append("\nTest accuracy per seed, (a) / (b): " + ", ".join(
            f"{a_acc:.4f} / {b_acc:.4f}" for a_acc, b_acc in pairs) + " (medians above). Seed r "
            "gives (a) and (b) the same initial head weights, dropout masks and batch order, so "
            f"they differ only in where the features come from. Spread of (a) over its seeds: "
            f"{spread:.4f}.\n")
    if p.get("paired_accuracy"):
        accuracy = _paired(p["paired_accuracy"], "(b) - (a)")
    storage = p.get("storage_effect")
    if storage:
        d, f32 = storage["paired"], storage["accuracies"]["float32"]
        same = sum(storage["reproduces_a"])
        out.append(f"\nThe same head on a float32 cache of these features gives (a)'s accuracy "
                   f"for {same} of (a)'s {len(storage['reproduces_a'])} seeds (the same number of "
                   "correct test images): " + ", ".join(
                       f"{x:.4f}" for x in f32[:len(storage["reproduces_a"])]) +
                   ". So float32-cached heads stand in for (a), and "
                   f"{storage['seeds']} seeds of the float16 cache (the default) against the "
                   f"float32 one measure what the cache changes: mean test accuracy "
                   f"{mean(storage['accuracies']['float16']):.4f} against {mean(f32):.4f}; "
                   f"per-seed difference {_paired(d, 'float16 - float32')}.\n")
        if all(storage["reproduces_a"]):
            direct = accuracy
            accuracy = _paired(d, "float16 cache - (a), measured as float16 - float32")
            out.append(f"\nMeasured directly over the {p.get('repeats', 1)} runs, (b) - (a): "
                       f"{direct}.\n")
    if p.get("speedup_validated_once"):
        out.append(f"\n(a) validates on the test split after every epoch, as the paper's code "
                   f"does; with its test figures computed once at the end instead (E - 1 timed "
                   f"validation passes less), the speed-up is "
                   f"{p['speedup_validated_once']:.2f}x. Both sides run the backbone in batches "
                   f"of {p.get('batch_size', 128)}.\n")
    out.append(f"\nSpeed-up (a)/(b): **{p['speedup']:.2f}x** {p.get('speedups', '')} at accuracy "
               f"{accuracy} - target >= 8x at equal or better accuracy: "
               f"{_ok(p['target_speedup_met'])}. Further heads >= 100x faster than another run of "
               f"(a): {_ok(p['target_further_met'])}.\n")
    return out


def render(results: dict) -> str:
    b = results["benchmarks"]
    out = ["# headstart benchmarks\n",
           f"Command: `python bench/run_all.py{' --quick' if results.get('quick') else ''}` "
           f"({results.get('minutes', 0):.0f} min). Timings are wall-clock seconds unless marked CPU; "
           "ratios are medians of runs made side by side in the same process.\n",
           "Start of run: " + _machine(results["machine_start"]),
           "End of run: " + _machine(results.get("machine_end", results["machine_start"]))]
    if results.get("only") and len(results["only"]) < 7:
        out.append(f"This run measured: {', '.join(results['only'])}; the other sections are kept "
                   "from the previous run (each section names its own machine state and commit).\n")
    out += [f"Note: {n}\n" for n in results.get("notes", [])]
    if "paper" in b:
        papers = b["paper"] if "a_paper" not in b["paper"] else {"mobilenet-128": b["paper"]}
        for name, p in papers.items():
            out += _paper_section(name, p)
    for key, title in (("extraction", "2. Extraction throughput vs its ceiling"),
                       ("extraction_before", "2a. The same benchmark on the code before this work "
                        "(`--before`: thread pool per image, `predict_on_batch`, writes inline)"),
                       ("vgg16", "2b. VGG16 (`--backbone vgg16 --weights none`) cost")):
        if key not in b:
            continue
        e = b[key]
        s = e["settings"]
        out.append(f"\n## {title}\n")
        alpha = f" alpha {s['alpha']}" if s.get("alpha") else ""
        pipeline = ("that code's `extract_features` pass" if key == "extraction_before" else
                    "`extract_features` pass (decode on worker threads; resize, preprocess and "
                    "forward in one compiled graph; segment writes)")
        out.append(f"{s['backbone']}{alpha} at {s['image_size']} px, avg pooling. "
                   "Ceiling: the same Keras model's forward pass alone on preprocessed float32 "
                   "tensors in memory, same batch size (the faster of `predict_on_batch` and a "
                   f"traced `tf.function`). Pipeline: {pipeline} into a fresh store.\n")
        out.append(_machine(e["machine"]))
        rows = [[r["batch_size"], r["workers"], r["images"], f"{r['pipeline_images_per_second']:.0f}",
                 f"{r['ceiling_images_per_second']:.0f}", f"**{r['ratio_median']:.3f}** {r['ratios']}",
                 (f"{r['end_to_end_ratio_median']:.3f} {r['end_to_end_ratios']}"
                  if "end_to_end_ratios" in r else "- (not recorded by that code)"),
                 _f(r["pipeline_cpu_ms_per_image"]), _f(r["ceiling_cpu_ms_per_image"]),
                 _f(r["cpu_ratio_median"]), f"{r['end_to_end_seconds']:.1f}"] for r in e["rows"]]
        out.append(_table(["batch", "workers", "images", "pipeline img/s", "ceiling img/s",
                           "pass ratio (median) [runs]", "end-to-end ratio (median) [runs]",
                           "pipeline CPU ms/img", "forward CPU ms/img",
                           "CPU ratio", "extract end-to-end s"], rows))
        c = e["cpu_steps"]
        graph = (f"resize + preprocess in the graph {c['resize_preprocess_ms']:.3f} ms (batches of "
                 "64, all threads)" if "resize_preprocess_ms" in c else
                 f"resize {c['resize_ms']:.3f} ms, preprocess {c['preprocess_ms']:.3f} ms")
        out.append(f"\nCPU per image outside the forward pass: decode {c['decode_ms']:.3f} ms (one "
                   f"thread), {graph}; forward {c['forward_ms']:.3f} CPU ms. Bound when the CPU is "
                   f"the limit: forward / (forward + decode + resize + preprocess) = "
                   f"**{c['cpu_bound_ratio']:.3f}** (from CPU times: a pipeline that decodes while the "
                   f"forward pass leaves a core idle can pass it). {_verdict(e)}\n")
    if "heads" in b:
        h = b["heads"]
        out.append("\n## 3. Head fit times on cached features\n")
        caches = "; ".join(f"{k}: {v['rows']} rows x {v['width']}, extracted in "
                           f"{v['end_to_end_seconds']:.0f} s ({v['images_per_second']:.0f} img/s)"
                           for k, v in h["caches"].items())
        out.append(f"Caches: {caches}. mlp = the paper's head, 10 epochs, early stopping off; "
                   "logreg = StandardScaler + LogisticRegression (newton-cg).\n")
        out.append(_table(["head", "features", "train rows", "fit s", "fit + load + test s",
                           "test accuracy"],
                          [[f["head"], f["width"], f["train_rows"], f"{f['fit_seconds']:.1f}",
                            f"{f['end_to_end_seconds']:.1f}", f"{f['test_accuracy']:.4f}"]
                           for f in h["fits"]]))
    if "cache_read" in b:
        out.append("\n## 4. Cache reads (warm page cache)\n")
        out.append(_table(["cache", "rows x width", "file MB", "raw read MB/s", "full scan MB/s",
                           "scan / raw speed", "128 random rows ms", "128 contiguous rows ms",
                           "chunk-aligned, per 128 rows ms"],
                          [[r["cache"], f"{r['rows']} x {r['width']} {r['dtype']}",
                            f"{r['file_bytes'] / 1e6:.1f}", f"{r['raw_read_MBps']:.0f}",
                            f"{r['full_scan_MBps']:.0f}", f"{r['scan_vs_raw']:.2f}",
                            f"{r['random_128_rows_ms']:.2f}", f"{r['contiguous_128_rows_ms']:.2f}",
                            f"{r['chunk_aligned_per_128_rows_ms']:.3f}"] for r in b["cache_read"]]))
    if "scaling" in b:
        sc = b["scaling"]
        out.append("\n## 5. Scaling with the number of images\n")
        out.append(_table(["images", "extract end-to-end s", "pass s", "img/s", "logreg fit s",
                           "mlp fit s (10 epochs)"],
                          [[p["images"], f"{p['end_to_end_seconds']:.1f}", f"{p['pass_seconds']:.1f}",
                            f"{p['images_per_second']:.0f}", f"{p['logreg_fit_seconds']:.1f}",
                            f"{p['mlp_fit_seconds']:.1f}"] for p in sc["points"]]))
        out.append("\nLeast-squares line through the points:\n\n")
        out.append(_table(["quantity", "seconds per 1,000 images (slope)", "intercept s"],
                          [[k, f"{v['seconds_per_1000_images']:.2f}", f"{v['intercept_seconds']:.1f}"]
                           for k, v in sc["fits"].items()]))
    if "storage" in b:
        out.append("\n## Storage choices (real features, Fletcher-32 on, warm page cache)\n")
        out.append(_table(["features", "dtype", "chunk", "compression", "file MB", "write s",
                           "full scan s", "128 random rows ms"],
                          [[f"{r['rows']} x {r['width']}", r["dtype"],
                            f"{r['chunk_KiB']} KiB ({r['chunk_rows']} rows)", r["compression"],
                            f"{r['file_MB']:.1f}", f"{r['write_seconds']:.2f}",
                            f"{r['scan_seconds']:.2f}", f"{r['random_128_rows_ms']:.2f}"]
                           for r in b["storage"]]))
    return "\n".join(out)
