"""headstart's command line: a thin typer app over the extract, store and classifiers packages.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from extract.augment import Augmentation  # noqa: E402
from store.errors import HeadstartError  # noqa: E402
from store.store import STORE_ENV, Store, is_disk_full  # noqa: E402

if TYPE_CHECKING:
    from classifiers.sources import CacheSet

app = typer.Typer(
    help="Cache frozen backbone features in HDF5 once; train heads on them in seconds.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 220)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOption = typer.Option(
    None, "--store", envvar=STORE_ENV, help="Store folder (default: ~/.cache/headstart).",
    show_default=False,
)
CacheOption = typer.Option(
    None, "--cache", help="Cache to use: a fingerprint prefix or a name from 'list' "
    "(default: the most recently finished).",
)
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
CachesOption = typer.Option(
    [], "--cache", help="Cache to use (a fingerprint prefix or a name from 'list'); repeat it "
    "to train on several caches of one dataset, features side by side (default: the newest).",
)
BudgetOption = typer.Option(
    None, "--memory-budget", help="Memory for the features, e.g. 256MB or 2GB; over it, mlp "
    "and sgd stream from HDF5 (default: in memory if the features fit half the free RAM).",
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn HeadstartError into one sentence on stderr and exit 1; Ctrl-C into exit 130."""
    try:
        yield
    except HeadstartError as error:
        err.print(f"[red]Error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    except OSError as error:  # the system refused (a path too long, no permission, disk full)
        err.print(f"[red]Error:[/red] {escape(os_error_sentence(error))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("Interrupted. Finished work is kept; run the same command again to resume.")
        raise typer.Exit(130) from None


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


@app.command()
def extract(
    dataset: str = typer.Argument(..., help="A Keras dataset (cifar10, cifar100, mnist, "
                                  "fashion_mnist) or an image folder."),
    backbone: str = typer.Option("vgg16", help="Backbone name; see 'backbones'."),
    weights: str = typer.Option("imagenet", help="'imagenet', 'none' (random) or a weights file."),
    alpha: Optional[float] = typer.Option(None, help="Width multiplier (MobileNet family)."),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the backbone's "
                                             "native size; 32 reproduces the paper)."),
    pooling: str = typer.Option("avg", help="avg, max or flatten (the paper's Flatten)."),
    dtype: str = typer.Option("float16", help="Stored feature type: float16 or float32."),
    batch_size: int = typer.Option(64, help="Images per backbone batch."),
    test_fraction: float = typer.Option(0.2, help="Test share for DIR/<class>/* folders "
                                        "(split by a hash of each file's path)."),
    workers: int = typer.Option(4, min=1, max=64, help="Image decoding threads."),
    precision: str = typer.Option("float32", help="GPU: mixed_float16 or mixed_bfloat16 computes "
                                  "in half precision (a new cache; features stay float)."),
    xla: bool = typer.Option(False, "--xla", help="GPU: compile the forward pass with XLA."),
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
    engine: str = typer.Option("local", help="local (this process), or ray: one task per shard "
                               "on a Ray cluster, then merge (pip install -e '.[ray]')."),
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
    store: Optional[Path] = StoreOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the backbone once over DATASET and cache the features (resumes if interrupted).

    Example: python cli.py extract ../shared/data/cifar10-mini --backbone mobilenet --alpha 0.25
    --weights ../shared/weights/mobilenet_2_5_224_tf_no_top.h5 --image-size 128
    """
    from extract.pipeline import extract_features, extract_views
    from extract.settings import ExtractSettings
    from store.shards import ShardSpec

    with user_errors():
        augmentation = Augmentation(aug_rotation, aug_shift, aug_zoom, aug_flip, aug_contrast,
                                    aug_seed) if augment else None
        the_store = Store(store)
        settings = ExtractSettings(dataset, backbone, weights, alpha, image_size, pooling, dtype,
                                   batch_size, test_fraction, workers, distribute, precision, xla)
        if engine not in ("local", "ray"):
            raise HeadstartError(f"--engine must be local or ray; got {engine!r}.")
        if engine == "ray":
            if shard or augmentation:
                raise HeadstartError("--engine ray makes every shard itself and does not make "
                                     "augmented views; drop --shard and --augment.")
            _extract_on_ray(settings, the_store, address, shards, cpus_per_shard,
                            gpus_per_shard, retries, keep_shards, quiet)
            return
        shard_spec = ShardSpec.parse(shard) if shard else None
        if shard_spec and augmentation:
            raise HeadstartError("Augmented views are not extracted by shard; merge the shards, "
                                 "then run extract --augment K without --shard.")
        plan = settings.plan(shard_spec)
        sizes = ", ".join(f"{len(s)} {n}" for n, s in plan.dataset.splits.items())
        part = f" (shard {shard_spec} of it)" if shard_spec else ""
        err.print(f"Dataset {plan.dataset.name}{part}: {len(plan.dataset.class_names)} classes, "
                  f"{sizes} images.")
        result = extract_features(plan, the_store, progress=not quiet)
        skipped = result.skipped
        views = (extract_views(plan, augmentation, augment, the_store, progress=not quiet)
                 if augmentation else [])
    cache = result.cache
    if result.reused:
        out.print(f"Reused cache {cache.name} ({cache.short_id}): no backbone pass needed.")
    else:
        out.print(f"Extracted {result.computed} images in {result.seconds:.1f} s "
                  f"({result.images_per_second:.0f} images/s).")
    rows = ", ".join(f"{n} {r}" for n, r in cache.split_sizes.items())
    out.print(f"Features: {rows} rows x {cache.width} ({cache.dtype}).")
    if skipped:
        out.print(f"Skipped {len(skipped)} unusable files:")
        for item in skipped[:20]:
            out.print(f"  {item['id']} ({item['split']}): {item['reason']}")
        if len(skipped) > 20:
            out.print(f"  ... and {len(skipped) - 20} more (all listed in the cache).")
    if cache.kind == "shard":
        out.print(f"Shard {shard_spec} written to {cache.path}; when all {shard_spec.count} "
                  f"shards are done: python cli.py merge --store {the_store.root}")
    else:
        out.print(f"Cache written to {cache.path}")
    if views:
        made = sum(not v.reused for v in views)
        out.print(f"Augmented views: {len(views)} of every training image ({made} computed now, "
                  f"{len(views) - made} reused), settings {augmentation.key}; written to "
                  f"{the_store.caches_dir} (one file per view).")


def _extract_on_ray(settings, the_store: Store, address: Optional[str], shards: Optional[int],
                    cpus_per_shard: float, gpus_per_shard: Optional[float], retries: int,
                    keep_shards: bool, quiet: bool) -> None:
    from extract.ray_engine import RayOptions, extract_on_ray

    options = RayOptions(address, shards, cpus_per_shard, gpus_per_shard, retries, keep_shards)
    run = extract_on_ray(settings, the_store, options, progress=not quiet)
    if run.merge is None:
        cache = the_store.finished(settings.plan().fingerprint)
        out.print(f"Reused cache {cache.name} ({cache.short_id}): no backbone pass needed.")
        return
    computed = sum(s.get("computed", 0) for s in run.shards)
    hosts = sorted({s.get("host", "?") for s in run.shards})
    out.print(f"Extracted {computed} images in {run.count} shards on Ray ({len(hosts)} host(s)) "
              f"in {run.seconds:.1f} s; merged in {run.merge.seconds:.1f} s.")
    _print_merged(run.merge)


def _print_merged(result) -> None:
    cache = result.cache
    rows = ", ".join(f"{n} {r}" for n, r in cache.split_sizes.items())
    verb = "Already merged:" if result.reused else f"Merged {result.shards} shards into"
    out.print(f"{verb} cache {cache.name} ({cache.short_id}), {rows} rows x {cache.width} "
              f"({cache.dtype}); written to {cache.path}")
    if result.removed:
        out.print(f"Removed {len(result.removed)} shard files (use --keep-shards to keep them).")


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
        _print_merged(result)


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
    from extract.backbones import get_backbone
    from extract.datasets import open_dataset
    from extract.preview import augmentation_grid, save_png

    with user_errors():
        augmentation = Augmentation(aug_rotation, aug_shift, aug_zoom, aug_flip, aug_contrast,
                                    aug_seed)
        preprocessing = get_backbone(backbone).preprocessing(image_size)
        grid = augmentation_grid(open_dataset(dataset, test_fraction), preprocessing,
                                 augmentation, count, views)
        path = save_png(grid, output)
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
    cache: List[str] = CachesOption,
    memory_budget: Optional[str] = BudgetOption,
    store: Optional[Path] = StoreOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-epoch progress."),
) -> None:
    """Train a head on cached training features and save it beside the (first) cache.

    Example: python cli.py fit --head mlp -p epochs=10 -p dropout=0.5 --memory-budget 256MB
    """
    from classifiers.registry import get_head_kind
    from classifiers.training import fit_head
    from store.heads import check_head_name

    with user_errors():
        the_store = Store(store)
        source = _cache_set(the_store, cache)
        options = parse_options(param)
        check_head_name(head if name is None else name)
        get_head_kind(head).create(options)  # unknown kinds and bad values stop here, before work
        err.print(f"Fitting {head} on cache {source.label}, {source.rows('train')} training rows x "
                  f"{source.width}.")
        verbose = 0 if quiet else (1 if sys.stdout.isatty() else 2)
        record, sidecar = fit_head(the_store, source, head, options, name, verbose=verbose,
                                   memory_budget=memory_budget, augmented=augmented,
                                   validation_fraction=validation_fraction)
    _print_fitted(head, record, sidecar)


def _cache_set(the_store: Store, selectors: List[str]) -> "CacheSet":
    from classifiers.sources import CacheSet

    return CacheSet([the_store.find_cache(s) for s in selectors] or [the_store.find_cache(None)])


def _print_fitted(head: str, record: dict, sidecar: Path) -> None:
    metrics = record["metrics"]
    mode = "streamed" if record.get("memory", {}).get("mode") == "stream" else "in memory"
    validation = metrics.get("validation", {}).get("accuracy")
    shown = "n/a (no validation rows)" if validation is None else f"{validation:.4f}"
    out.print(f"Fitted {head} ({mode}) in {record['fit_seconds']:.1f} s: validation accuracy "
              f"{shown}, test accuracy {metrics['test']['accuracy']:.4f}.")
    out.print(f"Head saved to {sidecar}")


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
        chosen = the_store.find_cache(cache)
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
                                       "(default: the kind)."),
    cache: List[str] = CachesOption,
    memory_budget: Optional[str] = BudgetOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Random search of a head's options, scored on the validation split; saves the best head.

    Resumable: finished trials are kept beside the heads and not rerun.
    Example: python cli.py tune --head mlp --trials 20 -p epochs=15
    """
    from classifiers.tune import tune_head

    def show(trial: dict) -> None:
        note = " (done before)" if trial["resumed"] else ""
        params = ", ".join(f"{k}={v}" for k, v in trial["params"].items())
        err.print(f"trial {trial['trial']:>3}: val acc {trial['validation_accuracy']:.4f} "
                  f"{trial['seconds']:>7.1f} s  {params}{note}")

    with user_errors():
        the_store = Store(store)
        source = _cache_set(the_store, cache)
        err.print(f"Tuning {head} on {source.name}: {trials} trials, seed {seed}.")
        results, record, sidecar = tune_head(the_store, source, head, trials, seed,
                                             parse_options(param), name, memory_budget, show)
    table = Table("trial", "val acc", "seconds", "options", title="Trials (validation split)",
                  title_justify="left", box=None)
    best = record["tune"]["best_trial"]
    for trial in results:
        mark = " *" if trial["trial"] == best else ""
        table.add_row(f"{trial['trial']}{mark}", f"{trial['validation_accuracy']:.4f}",
                      f"{trial['seconds']:.1f}",
                      ", ".join(f"{k}={v}" for k, v in trial["params"].items()))
    out.print(table)
    out.print(f"Best: trial {best}. Trials kept in {sidecar.parent / record['tune']['trials_file']}")
    _print_fitted(head, record, sidecar)


@app.command()
def ensemble(
    method: str = typer.Option("greedy", help="greedy (Caruana selection), vote (weighted soft "
                               "voting) or stack (logistic-regression meta-learner)."),
    heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated head names "
                                        "(default: every fitted head of the caches)."),
    name: Optional[str] = typer.Option(None, help="Save under this name (default: ensemble, "
                                       "or ensemble-METHOD)."),
    rounds: int = typer.Option(50, help="Greedy selection rounds."),
    cache: List[str] = typer.Option([], "--cache", help="Cache whose heads may join (repeat "
                                    "it) (default: the newest and every cache of its dataset)."),
    store: Optional[Path] = StoreOption,
) -> None:
    """Combine fitted heads (also across caches of one dataset) on the validation split.

    Example: python cli.py ensemble --method stack --heads mlp,logreg,svm
    """
    from classifiers.ensembles import ensemble_caches, fit_ensemble

    with user_errors():
        the_store = Store(store)
        caches = ensemble_caches(the_store, cache)
        names = [n.strip() for n in heads.split(",") if n.strip()] if heads else None
        record, sidecar = fit_ensemble(the_store, caches, method, names, name, rounds)
    table = Table("member", "kind", "weight", "val acc", "test acc", box=None)
    weights = record["weights"] if method != "stack" else [None] * len(record["members"])
    for member, weight in zip(record["members"], weights):
        table.add_row(f"{member['name']}@{member['cache_name']}", str(member["kind"]),
                      "-" if weight is None else f"{weight:.3f}",
                      f"{member['validation']['accuracy']:.4f}", f"{member['test']['accuracy']:.4f}")
    metrics = record["metrics"]
    table.add_row(f"[bold]{sidecar.stem}[/bold]", f"ensemble ({method})", "",
                  f"{metrics['validation']['accuracy']:.4f}", f"{metrics['test']['accuracy']:.4f}")
    out.print(table)
    best = max(m["test"]["accuracy"] for m in record["members"])
    out.print(f"Ensemble test accuracy {metrics['test']['accuracy']:.4f} vs best member "
              f"{best:.4f} ({100 * (metrics['test']['accuracy'] - best):+.2f} points).")
    out.print(f"Ensemble saved to {sidecar}")


@app.command()
def evaluate(
    head: List[str] = typer.Option([], help="Head name (repeatable) (default: all heads)."),
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
    as_json: bool = typer.Option(False, "--json", help="Print the full reports as JSON."),
) -> None:
    """Score heads on the test split: accuracy, top-5, per-class P/R/F1, confusion matrix.

    Example: python cli.py evaluate --head mlp --json
    """
    from classifiers.training import evaluate_heads

    with user_errors():
        the_store = Store(store)
        chosen = the_store.find_cache(cache)
        reports = evaluate_heads(the_store, chosen, head or None)
        if not reports:
            raise HeadstartError(
                f"No heads are fitted on cache {chosen.name}; run 'python cli.py fit --head mlp'.")
    if as_json:
        print(json.dumps(reports, indent=2))
        return
    out.print(f"Cache {chosen.name} ({chosen.short_id}), test split:")
    for report in reports:
        _print_report(report, chosen.class_names)


def _print_report(report: dict, class_names: list[str]) -> None:
    top5 = f", top-5 {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""
    out.print(f"\n[bold]{report['head']}[/bold] ({report['kind']}): accuracy "
              f"{report['accuracy']:.4f}{top5} on {report['rows']} rows")
    table = Table("class", "precision", "recall", "f1", "support", box=None)
    for name, row in report["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                      f"{row['f1']:.3f}", str(row["support"]))
    out.print(table)
    matrix = Table("true \\ predicted", *[n[:6] for n in class_names], box=None)
    for name, row in zip(class_names, report["confusion_matrix"]):
        matrix.add_row(name, *[str(v) for v in row])
    out.print(matrix)


HeadOption = typer.Option("mlp", "--head", help="Name of a fitted head (see 'list').")
WeightsOption = typer.Option(
    None, "--weights", help="The backbone weights file the cache was extracted with (default: "
    "the path the cache recorded).")


@app.command()
def predict(
    inputs: List[str] = typer.Argument(..., help="Image files, folders or globs."),
    head: str = HeadOption,
    top: int = typer.Option(3, min=1, help="Classes to show per image."),
    output: str = typer.Option("table", "--format", help="table, csv or json."),
    batch_size: int = typer.Option(64, help="Images per backbone batch."),
    weights: Optional[str] = WeightsOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Classify images with the cache's backbone and preprocessing and a fitted head.

    Example: python cli.py predict photo.jpg more_photos/ 'shots/*.png' --head mlp --top 3
    """
    from endtoend.predict import collect_inputs, open_predictor, predict_files

    if output not in ("table", "csv", "json"):
        raise typer.BadParameter("--format must be table, csv or json.")
    with user_errors():
        the_store = Store(store)
        paths = collect_inputs(inputs)
        predictor = open_predictor(the_store, the_store.find_cache(cache), head, weights)
        err.print(f"Classifying {len(paths)} files with head {head} of cache "
                  f"{predictor.cache.name}.")
        answers = list(predict_files(predictor, paths, top, batch_size))
    _print_predictions(answers, output, top)
    failed = sum(1 for a in answers if a.error)
    err.print(f"{len(answers) - failed} classified, {failed} could not be read; results went "
              "to stdout.")


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
    weights: Optional[str] = WeightsOption,
    cache: Optional[str] = CacheOption,
    store: Optional[Path] = StoreOption,
) -> None:
    """Serve a fitted head over HTTP: POST /predict, GET /health, /models, /docs, a page at /.

    Example: python cli.py serve --head mlp --port 8000
    """
    from service.app import ServiceSettings
    from service.batching import BatchSettings
    from service.server import ServerOptions, serve as run_server

    with user_errors():
        run_server(ServerOptions(
            head=head, cache=cache, store=store, weights=weights, host=host, port=port,
            service=ServiceSettings(max_body_bytes=int(max_body_mb * 1024 * 1024),
                                    body_timeout_s=body_timeout, token=token,
                                    batching=BatchSettings(max_batch, max_wait_ms, max_queue)),
        ), announce=err.print)


@app.command()
def export(
    head: str = HeadOption,
    formats: List[str] = typer.Option([], "--format", help="keras, savedmodel or tflite "
                                      "(repeatable) (default: all)."),
    quantize: List[str] = typer.Option([], "--quantize", help="TFLite variant: none (float32), "
                                       "float16, dynamic or int8 (repeatable) (default: all)."),
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
    from endtoend.export import FORMATS, QUANTIZATIONS, export_head

    with user_errors():
        variants, folder = export_head(Store(store), cache, head, formats or list(FORMATS),
                                       quantize or list(QUANTIZATIONS), out_dir, weights, evaluate)
    table = Table("variant", "size", "test acc", "agreement", "max |dp|", "ms/image", "file",
                  box=None)
    number = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for v in variants:
        ms = None if v.seconds_per_image is None else 1000 * v.seconds_per_image
        table.add_row(v.name, _size(v.bytes), number(v.accuracy, ".4f"), number(v.agreement, ".3f"),
                      number(v.max_abs_diff, ".2g"), number(ms, ".2f"), Path(v.path).name)
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
        page = write_report(Store(store), cache, head, out_dir)
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
    from store.heads import list_heads

    with user_errors():
        the_store = Store(store)
        everything = the_store.caches()
        heads = list_heads(the_store)
        unfinished = [p for p in the_store.unfinished() if ".shard-" not in p.name]
        leftovers = the_store.leftovers()
        from store.shards import shard_sets

        shard_info = [s.summary() for s in shard_sets(the_store)]
    caches = [c for c in everything if c.kind == "features"]
    views: dict[str, int] = {}
    for c in everything:
        if c.parent:
            views[c.parent] = views.get(c.parent, 0) + 1
    if as_json:
        print(json.dumps({"store": str(the_store.root), "caches": [c.summary() for c in everything],
                          "heads": heads, "unfinished": [str(p) for p in unfinished],
                          "leftovers": [str(p) for p in leftovers],
                          "shards": shard_info}, indent=2))
        return
    out.print(f"Store {the_store.root}")
    table = Table("cache", "id", "backbone", "size", "pooling", "rows (train/test)", "width",
                  "dtype", "disk", "skipped", "views", "from", title="Caches", title_justify="left")
    for c in caches:
        s = c.summary()
        parent = (c.lineage or {}).get("parent")
        table.add_row(c.name, c.short_id, s["backbone"], str(s["image_size"]), s["pooling"],
                      "/".join(str(v) for v in s["rows"].values()), str(s["width"]), s["dtype"],
                      _size(s["disk_bytes"]), str(s["skipped"]), str(views.get(c.fingerprint, 0)),
                      f"finetuned {parent[:12]}" if parent else "")
    out.print(table if caches else "No merged caches yet: run 'python cli.py merge'."
              if shard_info else "No caches yet: run 'python cli.py extract DATASET'.")
    if unfinished:
        out.print(f"{len(unfinished)} unfinished extraction(s); rerun their extract command to resume.")
    if leftovers:
        out.print(f"{len(leftovers)} extraction folder(s) left beside finished caches by an "
                  "interrupted writer; 'verify --fix' removes them.")
    if shard_info:
        _print_shards(shard_info)
    heads_table = Table("head", "kind", "cache", "val acc", "test acc", "fit s", title="Heads",
                        title_justify="left")
    for h in heads:
        m = h.get("metrics", {})
        heads_table.add_row(h["name"], h.get("kind", "?"), f"{h['cache_name']} ({h['cache'][:12]})",
                            f"{m.get('validation', {}).get('accuracy', float('nan')):.4f}",
                            f"{m.get('test', {}).get('accuracy', float('nan')):.4f}",
                            f"{h.get('fit_seconds', 0):.1f}")
    out.print(heads_table if heads else "No heads yet: run 'python cli.py fit --head mlp'.")


def _print_shards(shard_info: list[dict]) -> None:
    table = Table("cache (not merged)", "id", "shards", "finished", "running", "missing",
                  title="Shards (not caches: 'merge' joins a complete set)", title_justify="left")
    compact = lambda v: ",".join(map(str, v[:12])) + (",..." if len(v) > 12 else "") or "-"  # noqa: E731
    for s in shard_info:
        odd = f" (+ shards of {','.join(map(str, s['other_counts']))})" if s["other_counts"] else ""
        table.add_row(s["name"], s["fingerprint"][:12], f"{len(s['finished'])}/{s['count']}{odd}",
                      compact(s["finished"]), compact(s["unfinished"]), compact(s["missing"]))
    out.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def backbones() -> None:
    """List the registered backbones with input size and feature width."""
    from extract.backbones import backbone_names, get_backbone

    table = Table("backbone", "native size", "min size", "avg/max width", "alpha", "preprocess_input")
    for name in backbone_names():
        b = get_backbone(name)
        table.add_row(name, str(b.native_size), str(b.min_size), str(b.width),
                      ",".join(str(a) for a in b.alphas) or "-",
                      b.preprocessing(b.native_size).preprocess_input)
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


if __name__ == "__main__":
    app()
