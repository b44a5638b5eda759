"""headstart's command line: a thin typer app over the store, extract, classifiers, endtoend and
service packages. Each command parses its options, makes one library call and prints what it
returns; progress goes to stderr, results to stdout.

    python cli.py extract cifar10          # one backbone pass, features cached in HDF5
    python cli.py fit --head mlp           # train a head on the cached features
    python cli.py evaluate                 # test-split metrics of every head
    python cli.py list                     # caches and heads in the store
    python cli.py verify --fix             # check every byte; remove what cannot be trusted
    python cli.py extract DIR --shard 3/16 # one shard, on any machine; then:
    python cli.py merge --store S          # all N shards -> one cache
    python cli.py extract DIR --engine ray # every shard as a Ray task, then merge
    python cli.py predict photo.jpg dir/ --head mlp --top 3     # classify new images
    python cli.py serve --head mlp --port 8000                  # HTTP API + web page
    python cli.py export --head mlp --format tflite --quantize int8
    python cli.py report --head mlp                             # PNG figures + HTML page
    python cli.py audit --out audit/   # label issues, near-duplicates, leaks, outliers + page
    python cli.py similar photo.jpg --k 8                       # nearest cached training images
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Iterator, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402
from rich import box as boxes  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from extract.augment import Augmentation  # noqa: E402
from store.errors import HeadstartError, Interrupted, set_program  # noqa: E402
from store.store import STORE_ENV, Store, is_disk_full  # noqa: E402
from classifiers.summaries import (MEMBER_COLUMNS, PER_CLASS_COLUMNS, TRIAL_COLUMNS,  # noqa: E402
                                   confusion_rows, ensemble_lines, ensemble_rows, fitted_lines,
                                   per_class_rows, report_title, trial_line, trial_rows)
from store.units import format_size  # noqa: E402

set_program("headstart" if Path(sys.argv[0]).name == "headstart" else "python cli.py")

app = typer.Typer(
    help="Cache frozen backbone features in HDF5 once; train heads on them in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(asked: bool) -> None:
    if asked:
        from importlib import metadata

        try:
            version = metadata.version("headstart")
        except metadata.PackageNotFoundError:
            version = "not installed (run from a checkout)"
        print(f"headstart {version}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print headstart's version and exit.")) -> None:
    """Cache frozen backbone features in HDF5 once; train heads on them in seconds."""
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 220)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of fixed choices, so that --help lists them and typer refuses typos."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


# The library's own tuples (tests/test_cli.py checks that these match them).
Pooling = _choices("Pooling", ("avg", "max", "flatten", "cls", "mean", "cls+mean"))
Dtype = _choices("Dtype", ("float16", "float32"))
Precision = _choices("Precision", ("float32", "mixed_float16", "mixed_bfloat16"))
Engine = _choices("Engine", ("local", "ray"))
Runtime = _choices("Runtime", ("tf", "onnx"))
Method = _choices("Method", ("greedy", "vote", "stack"))
ExportFormat = _choices("ExportFormat", ("keras", "savedmodel", "tflite", "onnx"))
Quantization = _choices("Quantization", ("none", "float16", "dynamic", "int8"))
Output = _choices("Output", ("table", "csv", "json"))
Tta = _choices("Tta", ("flip",))

RuntimeOption = typer.Option(None, help="What runs the backbone (default: the runtime the cache "
                             "was extracted with; another one is refused).", show_default=False)
StoreOption = typer.Option(
    None, "--store", envvar=STORE_ENV, help="Store folder (default: ~/.cache/headstart).",
    show_default=False,
)
CacheOption = typer.Option(
    None, "--cache", help="Cache to use: a fingerprint prefix or a name from 'list' "
    "(default: the pinned cache, else the most recently finished).",
)
CachesOption = typer.Option(
    [], "--cache", help="Cache to use (a fingerprint prefix or a name from 'list'); repeat it "
    "to train on several caches of one dataset, features side by side (default: the pinned "
    "cache, else the newest).",
)
BudgetOption = typer.Option(
    None, "--memory-budget", help="Memory for the features, e.g. 256MB or 2GB; over it, mlp "
    "and sgd stream from HDF5 (default: in memory if the features fit half the free RAM).",
)
HeadOption = typer.Option("mlp", "--head", help="Name of a fitted head (see 'list').")
WeightsOption = typer.Option(
    None, "--weights", help="The backbone weights file the cache was extracted with (default: "
    "the path the cache recorded).")
_AUGMENTATION = Augmentation()  # the paper's settings, the defaults of extract and show-augment
AugRotationOption = typer.Option(_AUGMENTATION.rotation, help="Augmented views: rotation range, "
                                 "degrees.")
AugShiftOption = typer.Option(_AUGMENTATION.shift, help="Augmented views: shift range, fraction "
                              "of the size.")
AugZoomOption = typer.Option(_AUGMENTATION.zoom, help="Augmented views: zoom range, fraction.")
AugFlipOption = typer.Option(_AUGMENTATION.flip, help="Augmented views: random horizontal flips.")
AugContrastOption = typer.Option(_AUGMENTATION.contrast, help="Augmented views: contrast range "
                                 "(0 = off).")
AugSeedOption = typer.Option(_AUGMENTATION.seed, help="Augmented views: seed.")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """HeadstartError and OS errors become one sentence on stderr and exit 1; Ctrl-C exits 130."""
    try:
        yield
    except HeadstartError as error:
        err.print(f"[red]Error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    except OSError as error:  # the system refused (a path too long, no permission, disk full)
        err.print(f"[red]Error:[/red] {escape(os_error_sentence(error))}")
        raise typer.Exit(1) from None
    except Interrupted as interrupted:  # work that keeps what it finished says what it kept
        err.print(escape(str(interrupted)))
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err.print("Interrupted; nothing was saved.")
        raise typer.Exit(130) from None
    except Exception as error:  # a bug: still one sentence, with the way to see the traceback
        if os.environ.get(DEBUG_ENV):
            raise
        first = (str(error).strip().splitlines() or [""])[0][:300]
        err.print(f"[red]Error:[/red] unexpected {type(error).__name__}"
                  f"{': ' + escape(first) if first else ''} (a bug in headstart: please report "
                  f"it; set {DEBUG_ENV}=1 to see the traceback).")
        raise typer.Exit(1) from None


#: Set to 1 to let unexpected exceptions through with their traceback.
DEBUG_ENV = "HEADSTART_DEBUG"
WHY = {"--cache": "named by --cache", "pinned": "pinned with 'use'",
       "newest": "the newest; pin another with 'use'"}


def _chosen(the_store: Store, selector: Optional[str], say: bool = True):
    """The cache a command works on; says on stderr which it is and why."""
    cache, reason = the_store.resolve_cache(selector)
    if say:
        err.print(f"Cache {cache.name} ({cache.short_id}): {WHY[reason]}.")
    return cache


def os_error_sentence(error: OSError) -> str:
    """One sentence for an operating-system error, naming the file involved (shortened)."""
    if is_disk_full(error):
        return ("The disk is full; free some space and run the same command again (finished "
                "work is kept).")
    name = str(error.filename) if error.filename is not None else ""
    name = name if len(name) <= 120 else name[:100] + "..." + name[-17:]
    reason = error.strerror or str(error).rstrip(".") or type(error).__name__
    return f"{reason}: {name!r}." if name else f"{reason}."


def parse_options(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE pairs from --param into a dict."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HeadstartError(f"--param expects KEY=VALUE; got {pair!r}.")
        options[key.strip()] = value.strip()
    return options


def _value(choice: Optional[Enum]) -> Optional[str]:
    return None if choice is None else str(choice.value)


@app.command()
def extract(
    dataset: str = typer.Argument(..., help="A Keras dataset (cifar10, cifar100, mnist, "
                                  "fashion_mnist) or an image folder."),
    backbone: str = typer.Option("vgg16", help="Backbone name (see 'backbones'), or "
                                 "preset:NAME_OR_DIR for a KerasHub preset (a name, kaggle:// "
                                 "or hf:// handle, or a local preset folder)."),
    weights: str = typer.Option("imagenet", help="'imagenet', 'none' (random) or a weights file."),
    alpha: Optional[float] = typer.Option(None, help="Width multiplier (MobileNet family)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the backbone's "
                                             "native size; 32 reproduces the paper)."),
    pooling: Optional[Pooling] = typer.Option(None, help="CNNs: avg (default), max or flatten "
                                              "(the paper's Flatten); vision transformers: cls, "
                                              "mean (of patch tokens) or cls+mean (default for "
                                              "DINO models).", show_default=False),
    dtype: Dtype = typer.Option("float16", help="Stored feature type."),
    batch_size: int = typer.Option(64, help="Images per backbone batch."),
    test_fraction: float = typer.Option(0.2, help="Test share for DIR/<class>/* folders "
                                        "(split by a hash of each file's path)."),
    workers: int = typer.Option(4, min=1, max=64, help="Image decoding threads."),
    precision: Precision = typer.Option("float32", help="GPU: mixed_float16 or mixed_bfloat16 "
                                        "computes in half precision (a new cache; features "
                                        "stay float)."),
    xla: bool = typer.Option(False, "--xla", help="GPU: compile the forward pass with XLA."),
    runtime: Runtime = typer.Option("tf", help="What runs the backbone: tf, or onnx (ONNX "
                                    "Runtime on the CPU; a new cache; pip install -e '.[onnx]')."),
    blocks: int = typer.Option(1, min=1, max=8, help="Store the pooled outputs of the backbone's "
                               "last N blocks side by side (one pass; 1 is the output only; a "
                               "KerasHub preset's blocks are its last N transformer layers)."),
    tta: Optional[Tta] = typer.Option(None, help="flip: also cache the mirrored view of every "
                                      "image of every split, for test-time averaging."),
    augment: int = typer.Option(0, min=0, max=64, help="Also cache K augmented views of every "
                                "training image (test images are never augmented)."),
    aug_rotation: float = AugRotationOption,
    aug_shift: float = AugShiftOption,
    aug_zoom: float = AugZoomOption,
    aug_flip: bool = AugFlipOption,
    aug_contrast: float = AugContrastOption,
    aug_seed: int = AugSeedOption,
    shard: Optional[str] = typer.Option(None, help="Extract only shard i/N (0 <= i < N), chosen "
                                        "by a hash of each sample id; 'merge' joins the N shards."),
    engine: Engine = typer.Option("local", help="local (this process), or ray: one task per "
                                  "shard on a Ray cluster, then merge (pip install -e '.[ray]')."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to use: 'auto' (the running "
                                          "one) or ray://HOST:10001 (default: a local instance)."),
    shards: Optional[int] = typer.Option(None, min=1, help="Ray: number of shards (default: "
                                         "one per GPU, else one per --cpus-per-shard CPUs)."),
    cpus_per_shard: float = typer.Option(4.0, help="Ray: CPUs each shard task asks for."),
    gpus_per_shard: Optional[float] = typer.Option(None, help="Ray: GPUs each shard task asks "
                                                   "for (default: 1 where there are GPUs)."),
    retries: int = typer.Option(2, min=0, help="Ray: retries of a failed shard."),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="Ray: keep the shard files "
                                     "after merging."),
    distribute: bool = typer.Option(False, "--distribute", help="Run the backbone on every GPU "
                                    "of this machine (tf.distribute.MirroredStrategy; a no-op "
                                    "with one device)."),
    name: Optional[str] = typer.Option(None, help="A name for the cache, accepted wherever a "
                                       "cache is named (--cache, use, verify)."),
    store: Optional[Path] = StoreOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the backbone once over DATASET and cache the features (resumes if interrupted).

    Example: python cli.py extract ../shared/data/cifar10-mini --backbone mobilenet --alpha 0.25
    --weights ../shared/weights/mobilenet_2_5_224_tf_no_top.h5 --image-size 128
    """
    from extract.ray_engine import RayOptions
    from extract.run import ExtractRequest, run_extract
    from extract.settings import ExtractSettings

    with user_errors():
        settings = ExtractSettings(dataset, backbone, weights, alpha, image_size, _value(pooling),
                                   _value(dtype), batch_size, test_fraction, workers, distribute,
                                   _value(precision), xla, blocks, _value(tta),
                                   runtime=_value(runtime))
        augmentation = Augmentation(aug_rotation, aug_shift, aug_zoom, aug_flip, aug_contrast,
                                    aug_seed) if augment else None
        request = ExtractRequest(settings, _value(engine), shard, augmentation, augment,
                                 RayOptions(address, shards, cpus_per_shard, gpus_per_shard,
                                            retries, keep_shards), name)
        the_store = Store(store)
        outcome = run_extract(request, the_store, progress=not quiet, announce=err.print)
    _print(outcome.lines(the_store))


def _print(lines: list[str]) -> None:
    for line in lines:
        out.print(escape(line))


@app.command()
def merge(
    cache: Optional[str] = typer.Argument(None, help="Fingerprint prefix or cache name of the "
                                          "shards to merge (default: every shard set)."),
    keep_shards: bool = typer.Option(False, "--keep-shards", help="Keep the shard files."),
    store: Optional[Path] = StoreOption,
) -> None:
    """Check that all N shards of a cache are finished and consistent; join them into one cache.

    Example: python cli.py merge --store team-store/
    """
    from store.shards import merge_shards

    with user_errors():
        results = merge_shards(Store(store), cache, keep_shards)
    for result in results:
        _print(result.lines())


@app.command("show-augment")
def show_augment(
    dataset: str = typer.Argument(..., help="Dataset, as for extract."),
    image_size: int = typer.Option(128, help="Image size, as for extract."),
    backbone: str = typer.Option("vgg16", help="Backbone (its preprocessing sizes the images)."),
    count: int = typer.Option(8, help="Images (rows)."),
    views: int = typer.Option(4, help="Views per image (columns after the original)."),
    aug_rotation: float = AugRotationOption,
    aug_shift: float = AugShiftOption,
    aug_zoom: float = AugZoomOption,
    aug_flip: bool = AugFlipOption,
    aug_contrast: float = AugContrastOption,
    aug_seed: int = AugSeedOption,
    test_fraction: float = typer.Option(0.2, help="As for extract."),
    output: Path = typer.Option(Path("augment.png"), "--out", help="PNG file to write."),
) -> None:
    """Write a PNG grid of training images beside their augmented views, made as extract makes them.

    Example: python cli.py show-augment ../shared/data/cifar10-mini --image-size 64 --out aug.png
    """
    from extract.preview import write_augmentation_grid

    with user_errors():
        augmentation = Augmentation(aug_rotation, aug_shift, aug_zoom, aug_flip, aug_contrast,
                                    aug_seed)
        path = write_augmentation_grid(dataset, backbone, image_size, augmentation, count, views,
                                       output, test_fraction)
    out.print(f"Augmentation grid ({count} images x {views} views) written to {path.resolve()}")


@app.command()
def fit(
    head: str = typer.Option("mlp", help="Head kind; see 'heads'."),
    param: List[str] = typer.Option([], "--param", "-p", help="Head option KEY=VALUE "
                                    "(repeatable), e.g. -p epochs=20 -p hidden=512,256."),
    name: Optional[str] = typer.Option(None, help="Save under this name (default: the kind)."),
    augmented: bool = typer.Option(False, "--augmented", help="Also train on the cache's "
                                   "augmented views (made with extract --augment K)."),
    validation_fraction: float = typer.Option(
        0.1, help="Training rows held out (by a hash of their ids) for validation and early "
        "stopping; 0 trains on every row, without early stopping (below 0.1, the head cannot "
        "join an ensemble)."),
    replace: bool = typer.Option(False, "--replace", help="Replace a head of that name."),
    use_blocks: Optional[str] = typer.Option(None, "--use-blocks", help="Train on some of the "
                                             "cache's blocks: N (the last N) or block names, "
                                             "comma-separated (default: all; see 'list --json')."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Train on the mirrored "
                                       "views too and average each answer over the image and "
                                       "its mirror (default: on where the cache holds them)."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="A file of training sample "
                                           "ids to leave out of the fit, one a line (e.g. the "
                                           "exclude.txt 'audit' writes), or an audit.json."),
    cache: List[str] = CachesOption,
    memory_budget: Optional[str] = BudgetOption,
    store: Optional[Path] = StoreOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch progress."),
) -> None:
    """Train a head on cached training features and save it beside the (first) cache.

    Example: python cli.py fit --head mlp -p epochs=10 -p dropout=0.5 --memory-budget 256MB
    """
    from classifiers.audit import read_id_file
    from classifiers.sources import CacheSet
    from classifiers.training import fit_head

    with user_errors():
        left_out = read_id_file(exclude) if exclude else []
        the_store = Store(store)
        source = CacheSet([the_store.find_cache(c) for c in cache] or [_chosen(the_store, None)])
        err.print(f"Fitting {head} on cache {source.label} ({source.width} features).")
        verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
        record, sidecar = fit_head(the_store, source, head, parse_options(param), name,
                                   verbose=verbose, memory_budget=memory_budget,
                                   augmented=augmented, validation_fraction=validation_fraction,
                                   replace=replace, exclude=left_out, use_blocks=use_blocks,
                                   tta=tta)
    _print(fitted_lines(head, record, sidecar))


@app.command()
def finetune(
    head: str = typer.Option("mlp", help="A fitted Keras head of the cache."),
    unfreeze: str = typer.Option("2", help="Top backbone blocks to train, or 'all'."),
    epochs: int = typer.Option(3, help="Epochs (early stopping on the validation split)."),
    learning_rate: float = typer.Option(1e-5, help="Adam learning rate (keep it low)."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    patience: int = typer.Option(2, help="Early-stopping patience, epochs."),
    augment: bool = typer.Option(False, help="Augment training images on the fly (pays off over "
                                 "several epochs; in a 1-epoch run it cost accuracy here)."),
    train_head: bool = typer.Option(True, help="Train the head too (--no-train-head: only the "
                                    "unfrozen backbone blocks learn)."),
    weights: Optional[str] = typer.Option(None, help="The cache's weights file, if it moved."),
    dataset: Optional[str] = typer.Option(None, help="The cache's dataset, if it moved."),
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
) -> None:
    """Fine-tune backbone + head end to end, then re-extract a new cache from the new weights.

    Example: python cli.py finetune --head mlp --unfreeze 2 --epochs 3
    """
    from endtoend.finetune import FinetuneSettings, finetune as run_finetune, parse_unfreeze
    from endtoend.finetune import print_progress_note

    with user_errors():
        the_store = Store(store)
        chosen = _chosen(the_store, cache)
        settings = FinetuneSettings(parse_unfreeze(unfreeze), epochs, learning_rate, batch_size,
                                    patience, augment, train_head=train_head)
        err.print(f"Fine-tuning {head} of cache {chosen.name} ({chosen.short_id}).")
        if not quiet:
            print_progress_note()
        result = run_finetune(the_store, chosen, head, settings, weights, dataset,
                              verbose=0 if quiet else 1)  # a bar with ETA: epochs are long
    record = result.record
    out.print(f"Trained {len(record['unfrozen_layers'])} backbone layers + head in "
              f"{record['train_seconds']:.0f} s.")
    out.print(f"Test accuracy: original head on original cache {record['test_before']['accuracy']:.4f}"
              f" -> fine-tuned model {record['test_after']['accuracy']:.4f}.")
    out.print(f"Run record and weights: {result.run_dir}")
    out.print(f"Refreshed cache {result.cache.name} ({result.cache.short_id}): {result.cache.path}")
    out.print(f"Fine-tuned head saved to {result.head_sidecar}")


@app.command()
def tune(
    head: str = typer.Option("mlp", help="Head kind to tune; see 'heads'."),
    trials: int = typer.Option(20, help="Number of random-search trials."),
    seed: int = typer.Option(0, help="Seed of the search (same seed, same trials)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Fixed head option KEY=VALUE "
                                    "(repeatable), e.g. -p epochs=20."),
    name: Optional[str] = typer.Option(None, help="Save the best head under this name "
                                       "(default: KIND-tuned)."),
    replace: bool = typer.Option(False, "--replace", help="Replace a head of that name."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Trials train on the "
                                       "mirrored views and are scored with them (default: "
                                       "when the cache holds them)."),
    cache: List[str] = CachesOption,
    memory_budget: Optional[str] = BudgetOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Random search of a head's options, scored on the validation split; saves the best head.

    On a multi-block cache each trial also draws how many of the last blocks it uses.
    Resumable: finished trials are kept beside the heads and not rerun.
    Example: python cli.py tune --head mlp --trials 20 -p epochs=15
    """
    from classifiers.sources import CacheSet
    from classifiers.tune import tune_head

    def show(trial: dict) -> None:
        err.print(escape(trial_line(trial)))

    with user_errors():
        the_store = Store(store)
        source = CacheSet([the_store.find_cache(c) for c in cache] or [_chosen(the_store, None)])
        err.print(f"Tuning {head} on {source.name}: {trials} trials, seed {seed}.")
        results, record, sidecar = tune_head(the_store, source, head, trials, seed,
                                             parse_options(param), name, memory_budget, show,
                                             replace, tta)
    _table(TRIAL_COLUMNS, trial_rows(results, record["tune"]["best_trial"]),
           "Trials (validation split)")
    out.print(f"Best: trial {record['tune']['best_trial']}. Trials kept in "
              f"{sidecar.parent / record['tune']['trials_file']}")
    _print(fitted_lines(head, record, sidecar))


@app.command()
def ensemble(
    method: Method = typer.Option("greedy", help="greedy (Caruana selection), vote (weighted "
                                  "soft voting) or stack (logistic-regression meta-learner)."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated head names "
                                        "(default: every fitted head of the caches)."),
    name: Optional[str] = typer.Option(None, help="Save under this name (default: ensemble, "
                                       "or ensemble-METHOD)."),
    rounds: int = typer.Option(50, help="Greedy selection rounds."),
    replace: bool = typer.Option(False, "--replace", help="Replace an ensemble of that name."),
    cache: List[str] = typer.Option([], "--cache", help="Cache whose heads may join (repeat "
                                    "it) (default: the default cache and every cache of its "
                                    "dataset)."),
    store: Optional[Path] = StoreOption,
) -> None:
    """Combine fitted heads (also across caches of one dataset) on the validation split.

    Example: python cli.py ensemble --method stack --heads mlp,logreg,svm
    """
    from classifiers.ensembles import ensemble_caches, fit_ensemble

    with user_errors():
        the_store = Store(store)
        names = [n.strip() for n in heads.split(",") if n.strip()] if heads else None
        record, sidecar = fit_ensemble(the_store, ensemble_caches(the_store, cache),
                                       _value(method), names, name, rounds, replace,
                                       say=err.print)
    _table(MEMBER_COLUMNS, ensemble_rows(record, sidecar.stem))
    _print(ensemble_lines(record, sidecar))


@app.command()
def evaluate(
    head: List[str] = typer.Option([], help="Head name (repeatable) (default: all heads)."),
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
    as_json: bool = typer.Option(False, "--json", help="Print the full reports as JSON."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Score heads fitted with test-time "
                                "views on the images alone, without averaging with mirrors."),
) -> None:
    """Score heads on the test split: accuracy, top-5, per-class P/R/F1, confusion matrix.

    Example: python cli.py evaluate --head mlp --json
    """
    from classifiers.training import evaluate_heads

    with user_errors():
        the_store = Store(store)
        chosen = _chosen(the_store, cache, say=not as_json)  # JSON output stays parseable
        reports = evaluate_heads(the_store, chosen, head or None, views=not no_tta)
    if as_json:
        print(json.dumps(reports, indent=2))
        return
    out.print(f"Cache {chosen.name} ({chosen.short_id}), test split:")
    for report in reports:
        _print_report(report, chosen.class_names)


def _print_report(report: dict, class_names: list[str]) -> None:
    out.print(f"\n[bold]{escape(report_title(report))}[/bold]")
    _table(PER_CLASS_COLUMNS, per_class_rows(report))
    _table(("true \\ predicted", *class_names), confusion_rows(report, class_names))


@app.command()
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    head: str = HeadOption,
    top: int = typer.Option(3, min=1, help="Classes to show per image."),
    output: Output = typer.Option("table", "--format", help="How results are printed."),
    batch_size: int = typer.Option(64, help="Images per backbone batch."),
    weights: Optional[str] = WeightsOption,
    no_tta: bool = typer.Option(False, "--no-tta", help="Answer from the image alone, without "
                                "averaging with its mirror (heads fitted with test-time views)."),
    runtime: Optional[Runtime] = RuntimeOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Classify images with the cache's backbone and preprocessing and a fitted head.

    Example: python cli.py predict photo.jpg more_photos/ 'shots/*.png' --head mlp --top 3
    """
    from endtoend.predict import collect_inputs, open_predictor, predict_files

    with user_errors():
        the_store = Store(store)
        paths = collect_inputs(inputs)
        predictor = open_predictor(the_store, _chosen(the_store, cache), head, weights,
                                   _value(runtime), views=not no_tta)
        top = min(top, len(predictor.class_names))  # no more classes than there are
        err.print(f"Classifying {_count(len(paths), 'file')} with head {head} of cache "
                  f"{predictor.cache.name}.")
        answers = list(predict_files(predictor, paths, top, batch_size))
    _print_predictions(answers, _value(output), top)
    failed = sum(1 for a in answers if a.error)
    err.print(f"{len(answers) - failed} classified, {failed} could not be read; results went "
              "to stdout.")
    if failed:  # the rest were classified; a script still learns that some were not
        raise typer.Exit(1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _print_predictions(answers: list, output: str, top: int) -> None:
    if output == "json":
        print(json.dumps([{"file": a.source, "predictions": a.top, "error": a.error}
                          for a in answers], indent=2))
        return
    if output == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["file", "rank", "label", "probability", "error"])
        for a in answers:
            for rank, p in enumerate(a.top, 1):
                writer.writerow([a.source, rank, p["label"], f"{p['probability']:.6f}", ""])
            if a.error:
                writer.writerow([a.source, "", "", "", a.error])
        return
    table = Table("file", *[f"top {k + 1}" for k in range(top)], box=None)
    for a in answers:
        cells = [f"{p['label']} {p['probability']:.3f}" for p in a.top]
        cells = cells or [f"[red]error: {a.error}[/red]"]
        table.add_row(a.source, *cells, *[""] * (top - len(cells)))
    out.print(table)


@app.command()
def serve(
    head: str = HeadOption,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told)."),
    port: int = typer.Option(8000, help="TCP port."),
    token: Optional[str] = typer.Option(None, envvar="HEADSTART_TOKEN", help="Require "
                                        "'Authorization: Bearer TOKEN' on /predict and /models."),
    max_body_mb: float = typer.Option(10.0, help="Largest accepted request body (413 above)."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a request body may take "
                                       "to arrive (408 after: slow-drip clients are cut off)."),
    max_batch: int = typer.Option(32, min=1, help="Most images per backbone batch."),
    max_wait_ms: float = typer.Option(5.0, min=0, help="Longest wait to fill a batch."),
    max_queue: int = typer.Option(256, min=1, help="Queued images before answering 503."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host "
                                  "without a token."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No access log line per request."),
    weights: Optional[str] = WeightsOption,
    no_tta: bool = typer.Option(False, "--no-tta", help="Answer from the image alone, without "
                                "averaging with its mirror (heads fitted with test-time views)."),
    runtime: Optional[Runtime] = RuntimeOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Serve a fitted head over HTTP: POST /predict and /similar, GET /health, /models, /docs, a
    page at /.

    Example: python cli.py serve --head mlp --port 8000
    """
    from service.app import ServiceSettings
    from service.batching import BatchSettings
    from service.server import ServerOptions, serve as run_server

    with user_errors():
        run_server(ServerOptions(
            head=head, cache=_chosen(Store(store), cache).fingerprint, store=store, weights=weights, host=host, port=port,
            service=ServiceSettings(max_body_bytes=int(max_body_mb * 1024 * 1024),
                                    body_timeout_s=body_timeout, token=token,
                                    batching=BatchSettings(max_batch, max_wait_ms, max_queue)),
            insecure=insecure, runtime=_value(runtime), views=not no_tta),
            announce=err.print, access_log=None if quiet else err.print)


@app.command()
def export(
    head: str = HeadOption,
    formats: List[ExportFormat] = typer.Option([], "--format", help="Format (repeatable) "
                                               "(default: all)."),
    quantize: List[Quantization] = typer.Option([], "--quantize", help="TFLite variant: none "
                                                "(float32), float16, dynamic or int8 "
                                                "(repeatable) (default: all)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                           "STORE/exports/<cache>/<head>)."),
    evaluate: bool = typer.Option(True, help="Score every variant on the test split."),
    weights: Optional[str] = WeightsOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Export backbone + head as one model (.keras, SavedModel, TFLite with quantization).

    Example: python cli.py export --head mlp --format tflite --quantize int8
    """
    from endtoend.export import export_head

    with user_errors():
        the_store = Store(store)
        variants, folder = export_head(
            the_store, _chosen(the_store, cache).fingerprint, head, [_value(f) for f in formats or list(ExportFormat)],
            [_value(q) for q in quantize or list(Quantization)], out_dir, weights, evaluate,
            say=err.print)
    table = Table("variant", "size", "test acc", "agreement", "max |dp|", "ms/image", "file",
                  box=None)
    number = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for v in variants:
        ms = None if v.seconds_per_image is None else 1000 * v.seconds_per_image
        table.add_row(v.name, format_size(v.bytes), number(v.accuracy, ".4f"),
                      number(v.agreement, ".3f"), number(v.max_abs_diff, ".2g"),
                      number(ms, ".2f"), Path(v.path).name)
    out.print(table)
    out.print(f"Exported to {folder} (summary in export.json)")


@app.command()
def report(
    head: str = HeadOption,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                           "STORE/reports/<cache>/<head>)."),
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """PNG figures (samples, training curves, confusion matrix, per-class accuracy) and a page.

    Example: python cli.py report --head mlp
    """
    from endtoend.report import write_report

    with user_errors():
        the_store = Store(store)
        page = write_report(the_store, _chosen(the_store, cache).fingerprint, head, out_dir)
    out.print(f"Report written to {page} (figures beside it)")


@app.command()
def verify(
    cache: Optional[str] = typer.Argument(None, help="A cache (fingerprint prefix, name or .h5 "
                                          "path); default: the whole store."),
    fix: bool = typer.Option(False, "--fix", help="Remove what cannot be trusted (corrupt or "
                             "unfinished caches, crash leftovers, orphan or damaged model "
                             "files), saying so first; healthy caches and heads are never touched."),
    store: Optional[Path] = StoreOption,
) -> None:
    """Check caches and heads, reading every byte: format, rows, ids, labels, checksums, SHA-256.

    Example: python cli.py verify --fix
    """
    from store.verify import verify_store

    with user_errors():
        the_store = Store(store)
        report = verify_store(the_store, cache, fix, say=out.print)
    left = [p for p in report.unfixed if p.remove]
    fixed = sum(p.fixed for p in report.problems)
    out.print(f"Checked {report.caches} caches ({report.rows:,} rows, every checksum read) and "
              f"{report.heads} heads in {the_store.root}: {len(report.problems)} findings, "
              f"{fixed} fixed, {len(left)} needing attention.")
    if left:
        raise typer.Exit(1)


@app.command("list")
def list_command(
    store: Optional[Path] = StoreOption,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List caches (dataset, backbone, size, rows, dtype, disk size) and fitted heads."""
    from store.inventory import inventory

    with user_errors():
        found = inventory(Store(store))
    if as_json:
        print(json.dumps(found.to_json(), indent=2))
        return
    out.print(f"Store {found.root}")
    _table(found.CACHE_COLUMNS, found.cache_rows(), "Caches (* the default)")
    _table(found.SHARD_COLUMNS, found.shard_rows(),
           "Shards (not caches: 'merge' joins a complete set)")
    _table(found.HEAD_COLUMNS, found.head_rows(), "Heads")
    _print(found.notes())


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]], title: str | None = None) -> None:
    """Print rows under their column names (nothing when there are no rows)."""
    if not rows:
        return
    table = Table(*columns, title=title, title_justify="left",
                  box=boxes.HEAVY_HEAD if title else None)
    for row in rows:
        table.add_row(*map(escape, row))
    out.print(table)


@app.command()
def use(
    cache: Optional[str] = typer.Argument(None, help="The cache every command uses by default "
                                          "(a name or fingerprint prefix from 'list')."),
    newest: bool = typer.Option(False, "--newest", help="Unpin: the newest cache is the "
                                "default again."),
    store: Optional[Path] = StoreOption,
) -> None:
    """Pin the store's default cache, so that new extractions do not move it.

    Example: python cli.py use cifar10-mini_mobilenet-a0.25-3f0c1e_64_avg
    """
    with user_errors():
        if (cache is None) == (not newest):
            raise HeadstartError("Name the cache to pin, or give --newest to unpin.")
        the_store = Store(store)
        pinned = the_store.pin(cache)
    out.print(f"Default cache: {pinned.name} ({pinned.short_id}), pinned in "
              f"{the_store.pin_path}." if pinned else "Default cache: the newest (nothing pinned).")


@app.command()
def backbones(store: Optional[Path] = StoreOption) -> None:
    """List the registered backbones: input sizes, feature width (per alpha), preprocessing,
    poolings and where the weights come from (nothing is downloaded to list them).

    Any other KerasHub image backbone preset: --backbone preset:NAME_OR_DIR. Every command
    takes --store; this one lists what any store can use.
    """
    from extract.backbones import backbone_names, get_backbone

    table = Table("backbone", "native size", "min size", "width (per alpha)", "preprocessing",
                  "poolings", "weights")
    for name in backbone_names():
        b = get_backbone(name)
        widths = (", ".join(f"{b.feature_width(a)} (a={a})" for a in b.alphas) if b.alphas
                  else str(b.width))
        hub = b.module == "keras_hub"
        preprocessing = ("the preset's image converter" if hub
                         else b.preprocessing(b.native_size).preprocess_input)
        size = f"{b.min_size} (patch; sizes are multiples)" if hub else str(b.min_size)
        table.add_row(name, str(b.native_size), size, widths + (" per token" if hub else ""),
                      preprocessing, ", ".join(b.poolings), b.source)
    out.print(table)


@app.command()
def heads() -> None:
    """List the head kinds and their options with defaults (set them with fit -p KEY=VALUE)."""
    from classifiers.registry import HEADS

    for kind in HEADS.values():
        streams = " [streams within --memory-budget]" if kind.streams else ""
        out.print(f"[bold]{kind.name}[/bold]: {kind.summary}{streams}")
        for option, default in kind.defaults().items():
            out.print(f"    {option} = {default}")


@app.command()
def audit(
    head: str = typer.Option("logreg", help="Head kind trained k-fold for the out-of-fold "
                             "probabilities of the label-issue search; see 'heads'."),
    param: List[str] = typer.Option([], "--param", "-p", help="Head option KEY=VALUE "
                                    "(repeatable)."),
    folds: int = typer.Option(5, help="Folds of the out-of-fold probabilities."),
    threshold: Optional[float] = typer.Option(None, help="Cosine similarity (whitened "
                                              "features) from which two images are near-copy "
                                              "candidates (default 0.5)."),
    pixel_threshold: float = typer.Option(0.55, help="Similarity of the two images' 16x16 grey "
                                          "high-passed thumbnails that confirms a candidate."),
    pixel_check: bool = typer.Option(True, help="Confirm candidates on the original images' "
                                     "pixels (--no-pixel-check: features alone)."),
    outliers: int = typer.Option(50, help="How many of the rows farthest from their class to "
                                 "list."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for audit.json, "
                                           "exclude.txt and the page (default: "
                                           "STORE/audits/<cache>)."),
    page: bool = typer.Option(True, help="Write the HTML page with thumbnails."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON only."),
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Label issues (cleanlab on out-of-fold probabilities), near-duplicates, train/test leaks
    and outliers of a cache, by sample id; nothing is changed.

    Example: python cli.py audit --out audit/ ; then python cli.py fit --exclude audit/exclude.txt
    """
    from classifiers.audit_page import run_audit, summary_lines

    with user_errors():
        the_store = Store(store)
        report = run_audit(the_store, _chosen(the_store, cache, say=not as_json), head,
                           parse_options(param), folds, threshold, outliers, out_dir, page,
                           pixel_threshold if pixel_check else None,
                           progress=None if as_json else err.print)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    _print(summary_lines(report))


@app.command()
def similar(
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    k: int = typer.Option(8, "--k", min=1, help="Training images to list per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    batch_size: int = typer.Option(64, help="Images per backbone batch."),
    weights: Optional[str] = WeightsOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """The nearest cached training images of new images (the cache's backbone,
    preprocessing and runtime), with their labels and similarity.

    Example: python cli.py similar photo.jpg --k 8
    """
    from classifiers.similar import similar_files
    from endtoend.predict import collect_inputs

    with user_errors():
        the_store = Store(store)
        paths = collect_inputs(inputs)
        chosen = _chosen(the_store, cache, say=not as_json)
        answers = similar_files(chosen, paths, k, weights, batch_size, the_store.root)
    if as_json:
        print(json.dumps(answers, indent=1))
        return
    table = Table("file", "rank", "training image", "label", "similarity", box=None)
    for answer in answers:
        if answer["error"]:
            table.add_row(escape(answer["file"]), "", f"[red]error: {escape(answer['error'])}[/red]",
                          "", "")
        for rank, match in enumerate(answer["similar"], 1):
            table.add_row(escape(answer["file"]) if rank == 1 else "", str(rank),
                          escape(match["id"]), escape(match["label"]), f"{match['similarity']:.3f}")
    out.print(table)


if __name__ == "__main__":
    app()
