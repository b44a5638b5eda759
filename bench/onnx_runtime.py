"""TensorFlow vs ONNX Runtime on the CPU, side by side in one run (issue 17, "measure first").

For each backbone of the registry's set (MobileNet alpha 0.25 with the shared ImageNet weights at
128 and 224 px; ResNet50 and VGG16 with --weights none at 128 px; a KerasHub preset of
DINOv2-S/14's architecture with random weights at 224 px): the feature model with its
preprocessing converted to ONNX (tf2onnx, as `--runtime onnx` does; and Keras's own
`model.export(format="onnx")` of the bare backbone, for comparison), then batches of 64 timed
alternately under each runtime (median of pairs), forward-only (images already at the input size)
and with the resize (32 px CIFAR-sized images, as `extract` hands them over: TensorFlow resizes
them in its traced graph, ONNX Runtime in the converted graph), plus the max abs difference of
the features; then `extract` end to end under each runtime (MobileNet at both sizes, ResNet50 on
fewer images). Writes bench/results/onnx.json and onnx.md.

    python bench/onnx_runtime.py [--pairs 3] [--only mobilenet-128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import RESULTS, WEIGHTS, log, machine, median, save_json, subset

CONFIGS = {
    "mobilenet-128": {"backbone": "mobilenet", "alpha": 0.25, "weights": str(WEIGHTS),
                      "image_size": 128},
    "mobilenet-224": {"backbone": "mobilenet", "alpha": 0.25, "weights": str(WEIGHTS),
                      "image_size": 224},
    "resnet50-128": {"backbone": "resnet50", "alpha": None, "weights": "none", "image_size": 128},
    "vgg16-128": {"backbone": "vgg16", "alpha": None, "weights": "none", "image_size": 128,
                  "batch": 32},
    # DINOv2-S/14's architecture with random weights (bench/kerashub.py's "small" preset)
    "dinov2s-224": {"backbone": "preset:small", "alpha": None, "weights": "preset",
                    "image_size": 224, "batch": 16},
}
BATCH = 64  # per batch, unless the config says (VGG16: 32, as in the issue)


def _alternating(calls: list[Callable[[], Any]], rounds: int, sample_s: float = 1.0
                 ) -> list[float]:
    """Median seconds per call of each of `calls`, timed in turn for `rounds` rounds (one
    warm-up each); each timing repeats the call for about `sample_s` seconds, so that a busy
    machine's hiccups spread over many batches."""
    started = time.perf_counter()
    for call in calls:
        call()
    repeats = max(1, round(len(calls) * sample_s / (time.perf_counter() - started)))
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, out in zip(calls, seconds):
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            out.append((time.perf_counter() - started) / repeats)
    return [median(x) for x in seconds]


def _keras_export(model: Any, folder: Path) -> dict[str, Any]:
    """Keras's own ONNX export of the bare backbone: whether it works, how long it takes."""
    from extract.runtime import quiet_stderr

    path = folder / "keras-export.onnx"
    started = time.perf_counter()
    try:
        with quiet_stderr():
            model.export(str(path), format="onnx", verbose=False)
    except Exception as error:  # report, do not stop the run
        return {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    return {"ok": True, "seconds": time.perf_counter() - started, "path": path}


def _backbone(settings: dict[str, Any]) -> tuple[Any, Any, str]:
    """(backbone, weights, pooling) of a config; a preset is made with KerasHub's classes."""
    from extract.backbones import Weights, get_backbone

    if settings["backbone"].startswith("preset:"):
        from extract.kerashub import preset_backbone
        from kerashub import make_preset

        folder = make_preset(settings["backbone"].split(":", 1)[1])
        return preset_backbone(str(folder)), Weights("preset", folder), "cls+mean"
    return get_backbone(settings["backbone"]), Weights.parse(settings["weights"]), "avg"


def measure(name: str, settings: dict[str, Any], pairs: int, folder: Path
            ) -> tuple[dict[str, Any], dict[str, Callable[[], float]]]:
    """The forward-only row of one model, and probes of ONNX Runtime's ceiling (images per
    second now, as the pass runs it, on images at the input size and on 32 px ones) for
    `extraction` to time beside each pass."""
    from extract.backbones import build_feature_model
    from extract.forward import forward_function
    from extract.onnx_runtime import (convert, cpu_threads, onnx_forward_function, session,
                                      session_threads)
    from extract.pipeline import _in_order

    spec, weights, pooling = _backbone(settings)
    size = settings["image_size"]
    preprocessing = spec.preprocessing(size)
    model = build_feature_model(spec, settings["alpha"], weights, size, pooling)
    tf_forward = forward_function(model, preprocessing)
    started = time.perf_counter()
    data = convert(model, preprocessing)
    conversion = time.perf_counter() - started
    onnx_forward = onnx_forward_function(session(data), preprocessing)
    # as extract runs it: slices of each batch from one thread per core, one single-threaded session
    sliced_forward = onnx_forward_function(session(data, session_threads(cpu_threads())),
                                           preprocessing, cpu_threads())

    batch_size = settings.get("batch", BATCH)
    rng = np.random.default_rng(0)
    at_size = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    row: dict[str, Any] = {"model": name, "threads": cpu_threads(), "onnx_bytes": len(data),
                           "conversion_s": conversion, "batch": batch_size}
    calls = ThreadPoolExecutor(2)

    def two_at_once(batch: np.ndarray) -> None:  # as the pass calls it: two batches in flight
        for _ in _in_order([lambda: sliced_forward(batch)] * 2, calls):
            pass

    for label, batch in (("forward", at_size), ("resize", small)):
        diff = float(max(np.abs(tf_forward(batch) - onnx_forward(batch)).max(),
                         np.abs(tf_forward(batch) - sliced_forward(batch)).max()))
        tf_s, onnx_s, sliced_s, two_s = _alternating(
            [lambda: tf_forward(batch), lambda: onnx_forward(batch),
             lambda: sliced_forward(batch), lambda: two_at_once(batch)], pairs)
        best_s = min(sliced_s, two_s / 2)
        row[label] = {"tf_ips": batch_size / tf_s, "onnx_session_ips": batch_size / onnx_s,
                      "session_ratio": tf_s / onnx_s, "onnx_sliced_ips": batch_size / sliced_s,
                      "onnx_two_at_once_ips": 2 * batch_size / two_s,
                      "onnx_ips": batch_size / best_s, "ratio": tf_s / best_s,
                      "max_abs_diff": diff}
        log(f"{name} {label}: TF {batch_size / tf_s:.0f} img/s, ONNX Runtime "
            f"{batch_size / best_s:.0f} img/s at best ({tf_s / best_s:.2f}x; sliced per core "
            f"{batch_size / sliced_s:.0f}, two batches at once {2 * batch_size / two_s:.0f}), "
            f"{batch_size / onnx_s:.0f} img/s on one session ({tf_s / onnx_s:.2f}x), "
            f"max abs diff {diff:.2e}")

    def probe(batch: np.ndarray, seconds: float = 1.0) -> Callable[[], float]:
        def rate() -> float:
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                two_at_once(batch)
                images += 2 * len(batch)
            return images / (time.perf_counter() - started)
        return rate

    exported = _keras_export(model, folder)
    if exported.get("ok"):
        runner = session(Path(exported.pop("path")))
        inputs = preprocessing.apply(at_size)
        feed = {runner.get_inputs()[0].name: inputs}
        tf_s, keras_s = _alternating([lambda: tf_forward(at_size),
                                      lambda: runner.run(None, feed)],
                                     pairs if name.startswith("mobilenet") else 1)
        difference = np.abs(runner.run(None, feed)[0] - tf_forward(at_size)).max()
        exported.update(onnx_ips=batch_size / keras_s, ratio=tf_s / keras_s,
                        max_abs_diff=float(difference))
    row["keras_export"] = exported
    log(f"{name} keras export: {exported}")
    return row, {"forward": probe(at_size), "resize": probe(small)}


def extraction(name: str, settings: dict[str, Any], images: int, pairs: int, folder: Path,
               probes: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """`extract_features` end to end (decode, resize, backbone, writes) under each runtime, in
    alternating pairs on fresh caches of `images` CIFAR-10 files; the ONNX model converted once.
    ONNX Runtime's ceilings are probed right after each pair, so that the pass's share of them
    is a median of ratios taken at one moment (a busy machine slows both)."""
    import shutil

    from extract.pipeline import extract_features
    from extract.settings import ExtractSettings
    from store.store import Store

    data = subset(images)
    store = Store(folder / f"store-{name}")
    seconds: dict[str, list[float]] = {"tf": [], "onnx": []}
    shares: dict[str, list[float]] = {"forward": [], "resize": []}
    for run in range(pairs + 1):  # the first pair warms up (and converts)
        for runtime in ("tf", "onnx"):
            plan = ExtractSettings(str(data), settings["backbone"], settings["weights"],
                                   settings["alpha"], settings["image_size"], dtype="float16",
                                   runtime=runtime).plan()
            result = extract_features(plan, store, progress=False)
            if run:
                seconds[runtime].append(result.seconds / result.computed)
            shutil.rmtree(store.caches_dir)
        if run:
            for label, out in shares.items():
                out.append(1 / seconds["onnx"][-1] / probes[label]())
    tf_s, onnx_s = median(seconds["tf"]), median(seconds["onnx"])
    row = {"model": name, "images": images, "tf_ips": 1 / tf_s, "onnx_ips": 1 / onnx_s,
           "ratio": tf_s / onnx_s, "of_onnx_ceiling": median(shares["forward"]),
           "of_onnx_session": median(shares["resize"]),
           "per_pair": {"tf_ips": [1 / x for x in seconds["tf"]],
                        "onnx_ips": [1 / x for x in seconds["onnx"]], "shares": shares}}
    log(f"{name} extract: TF {1 / tf_s:.0f} img/s, ONNX Runtime {1 / onnx_s:.0f} img/s "
        f"({tf_s / onnx_s:.2f}x; {row['of_onnx_ceiling']:.2f} of ONNX's forward ceiling, "
        f"{row['of_onnx_session']:.2f} of its session on the same 32 px batches)")
    return row


def markdown(rows: list[dict[str, Any]], extracts: list[dict[str, Any]], facts: dict[str, Any],
             command: str, date: str) -> str:
    lines = [
        "# TensorFlow vs ONNX Runtime on the CPU",
        "",
        f"Command: `{command}`  ",
        f"Date: {date}  ",
        f"Machine: {facts['cores']} cores ({facts['cpu']}), load average {facts['load_average']} "
        f"at the start, Python {facts['python']}, TensorFlow {facts['libraries']['tensorflow']}, "
        f"Keras {facts['libraries']['keras']}, numpy {facts['libraries']['numpy']}; "
        f"{facts['converter']}; commit {facts['commit']}.",
        "",
        f"Batch {BATCH} (VGG16: 32; the DINOv2-S preset: 16), float32, the feature model with "
        "its preprocessing (avg pooling; the preset cls+mean, its converter resizing before the "
        "session under ONNX Runtime). TF is "
        "`extract.forward.forward_function` (the extraction pass's traced function); ONNX Runtime "
        "is `extract.onnx_runtime` (tf2onnx, opset 17, CPUExecutionProvider, no spin-waiting) "
        "as `extract` runs it: each batch split into two slices per core, run at once from one "
        "thread per core on a session of one intra-op thread, the better of one batch at a time "
        "and two at once (as the pass calls it); *one session*: the whole batch on one session of "
        "intra-op threads = the cores this process may use (as predict and serve run it). "
        "Median of alternating rounds (TF, one session, sliced, sliced two at once) in one run, "
        "each timing about a second of batches. *forward*: "
        "uint8 images already at the input size (each runtime's forward ceiling); *with resize*: "
        "32 px images (CIFAR-sized, as extract hands them over), enlarged inside each runtime's "
        "graph (TensorFlow's traced function; the converted ONNX graph's Resize, which gives "
        "TensorFlow's uint8 arrays at these whole factors). Max abs diff: features of the same "
        "batch under both runtimes.",
        "",
        "| model | TF forward img/s | ONNX forward img/s | ratio | one session | "
        "TF with resize img/s | ONNX with resize img/s | ratio | one session | max abs diff | "
        "conversion s | ONNX MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        f, z = r["forward"], r["resize"]
        lines.append(
            f"| {r['model']} | {f['tf_ips']:,.0f} | {f['onnx_ips']:,.0f} | {f['ratio']:.2f}x | "
            f"{f['session_ratio']:.2f}x | {z['tf_ips']:,.0f} | {z['onnx_ips']:,.0f} | "
            f"{z['ratio']:.2f}x | {z['session_ratio']:.2f}x | "
            f"{max(f['max_abs_diff'], z['max_abs_diff']):.1e} | {r['conversion_s']:.1f} | "
            f"{r['onnx_bytes'] / 1e6:.1f} |")
    if extracts:
        lines += ["", "`extract` end to end (decode, resize, backbone, segment writes; the "
                  "pass's own clock, model build and conversion excluded), CIFAR-10 files, "
                  "median of alternating pairs. *of ONNX forward ceiling*: of ONNX Runtime run as "
                  "the pass runs it (sliced per core, two batches at once) on images already at "
                  "the input size; *of ONNX session, same batches*: of it alone on 32 px batches "
                  "like those the pass hands it (its resize included); both probed for a second "
                  "right after each pair, the median of the pairs' shares:", "",
                  "| model | images | TF img/s | ONNX img/s | ratio | of ONNX forward ceiling "
                  "| of ONNX session, same batches |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for e in extracts:
            session = e.get("of_onnx_session")
            lines.append(f"| {e['model']} | {e['images']:,} | {e['tf_ips']:,.0f} | "
                         f"{e['onnx_ips']:,.0f} | {e['ratio']:.2f}x | {e['of_onnx_ceiling']:.2f} | "
                         f"{'' if session is None else f'{session:.2f}'} |")
    lines += ["", "Keras's own `model.export(path, format=\"onnx\")` of the bare backbone "
              "(preprocessed float inputs; forward only; one pair for ResNet50 and VGG16; the "
              "session as above):", "",
              "| model | works | export s | ONNX img/s | ratio vs TF | max abs diff |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        k = r["keras_export"]
        if k.get("ok"):
            lines.append(f"| {r['model']} | yes | {k['seconds']:.1f} | {k['onnx_ips']:,.0f} | "
                         f"{k['ratio']:.2f}x | {k['max_abs_diff']:.1e} |")
        else:
            lines.append(f"| {r['model']} | no: {k['error']} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--extract", type=int, default=8192, help="CIFAR-10 images for the "
                        "end-to-end extract rows (MobileNet; ResNet50 an eighth; VGG16 and the "
                        "preset none; 0: none)")
    args = parser.parse_args()
    from extract.onnx_runtime import converter_versions

    facts = machine()
    versions = converter_versions()
    from importlib import metadata
    facts["converter"] = (f"onnxruntime {metadata.version('onnxruntime')}, tf2onnx "
                          f"{versions['tf2onnx']}, onnx {versions['onnx']}")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows, extracts = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only:
            row, probes = measure(name, CONFIGS[name], args.pairs, Path(folder))
            rows.append(row)
            if args.extract and name.startswith(("mobilenet", "resnet50")):
                images = (args.extract if name.startswith("mobilenet")
                          else max(64, args.extract // 8))
                extracts.append(extraction(name, CONFIGS[name], images,
                                           max(1, args.pairs // 2), Path(folder), probes))
    command = "python " + " ".join(["bench/onnx_runtime.py", *sys.argv[1:]])
    save_json("onnx.json", {"machine": facts, "date": date, "command": command, "rows": rows,
                            "extract": extracts})
    text = markdown(rows, extracts, facts, command, date)
    (RESULTS / "onnx.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
