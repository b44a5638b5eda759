"""End-to-end fine-tuning of backbone + a fitted Keras head, then a refreshed cache.

The head was already trained on the cached features (the "head first" phase, in seconds).
Fine-tuning then unfreezes the top N blocks of the backbone (BatchNorm stays frozen and in
inference mode), trains backbone + head together at a low learning rate on augmented images
streamed from the dataset with the cache's own preprocessing, stops early on the validation
split, saves the backbone weights and a record of the run, and re-extracts a new cache from the
fine-tuned weights, linked to its parent. Old caches and heads are never replaced.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.evaluation import accuracy_figures
from classifiers.persistence import save_fitted_head
from classifiers.progress import epoch_progress
from classifiers.registry import HEADS, get_head_kind
from classifiers.saved import load_saved_head
from classifiers.scoring import head_proba
from classifiers.training import as_cache_set, head_metrics
from classifiers.validation import validation_mask
from extract.augment import Augmentation
from extract.blocks import is_batch_norm, unfreeze_top
from extract.datasets import Dataset
from extract.compute import ComputeOptions
from extract.pipeline import extract_features
from extract.preprocessing import Preprocessing
from extract.rebuild import (cache_dataset, cache_feature_model, cache_plan, cache_preprocessing,
                             cache_weights)
from extract.backbones import Weights
from extract.kerashub import save_finetuned_preset
from extract.runtime import load_keras
from store.atomic import write_text
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store


@dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune."""

    unfreeze: int | None = 2  # top blocks to unfreeze; None = all
    epochs: int = 3
    learning_rate: float = 1e-5
    batch_size: int = 32
    patience: int = 2
    augment: bool = False  # on-the-fly augmentation; pays off over several epochs
    seed: int = 0
    train_head: bool = True  # False: only the unfrozen backbone blocks learn


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    record: dict[str, Any]
    run_dir: Path
    cache: FeatureCache
    head_sidecar: Path


def application_model(feature_model: Any) -> Any:
    """The keras.applications model inside a feature model (flatten wraps it in a Sequential)."""
    inner = [layer for layer in feature_model.layers if hasattr(layer, "layers")]
    return inner[0] if type(feature_model).__name__ == "Sequential" and inner else feature_model


def _batches(dataset: Dataset, rows: np.ndarray, labels: np.ndarray, n_classes: int,
             preprocessing: Preprocessing, batch_size: int, augmentation: Augmentation | None,
             seed: int, shuffle: bool) -> Any:
    """A Keras PyDataset of (preprocessed images, one-hot labels); training batches are
    reshuffled every epoch (rows come sorted by class, so unshuffled batches would hold one
    class each)."""
    keras = load_keras()

    class ImageBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.order = np.arange(len(rows))
            self.pool = ThreadPoolExecutor(max_workers=4)
            self._shuffle()

        def _shuffle(self) -> None:
            if shuffle:
                self.order = np.random.default_rng(seed + self.epoch).permutation(len(rows))

        def __len__(self) -> int:
            return -(-len(rows) // batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            picked = self.order[index * batch_size:(index + 1) * batch_size]
            images = np.stack(list(self.pool.map(
                lambda r: dataset.load("train", int(rows[r]), preprocessing), picked)))
            if augmentation is not None:
                images = augmentation.apply(images, np.arange(len(picked)), self.epoch,
                                            f"finetune-batch-{index}")
            return preprocessing.apply(images), keras.utils.to_categorical(labels[picked], n_classes)

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self._shuffle()

    return ImageBatches()


def _dataset_rows(dataset: Dataset, ids: np.ndarray) -> np.ndarray:
    position = {sample_id: i for i, sample_id in enumerate(dataset.splits["train"].ids)}
    return np.asarray([position[str(i)] for i in ids], dtype=np.int64)


def _batch_norm_state(base: Any) -> list[np.ndarray]:
    return [np.array(w) for layer in base.layers if is_batch_norm(layer) for w in layer.get_weights()]


def finetune(store: Store, cache: FeatureCache, head_name: str, settings: FinetuneSettings,
             weights: str | None = None, dataset_spec: str | None = None, verbose: int = 1
             ) -> FinetuneResult:
    """Fine-tune backbone + head `head_name` of `cache`; re-extract into a new linked cache."""
    keras = load_keras()
    saved = load_saved_head(store, cache, head_name)
    head, head_record = saved.estimator, saved.record
    if len(saved.caches) > 1:
        raise HeadstartError(
            f"Head {head_name!r} was fitted on several caches; finetune needs a head of one cache.")
    if head_record["kind"] not in HEADS or get_head_kind(head_record["kind"]).file_format != "keras":
        raise HeadstartError(
            f"finetune needs a Keras head (mlp); head {head_name!r} is a {head_record['kind']}.")
    if settings.epochs < 1 or settings.batch_size < 1 or not 0 < settings.learning_rate < 1:
        raise HeadstartError("finetune needs --epochs >= 1, --batch-size >= 1 and 0 < --learning-rate < 1.")
    backbone_weights = cache_weights(cache, weights)
    dataset = cache_dataset(cache, dataset_spec)
    preprocessing = cache_preprocessing(cache)
    n_classes = len(cache.class_names)
    ids = cache.ids("train")
    labels = cache.labels("train")
    held_out = validation_mask(ids)
    rows = _dataset_rows(dataset, ids)
    before = accuracy_figures(cache.labels("test"),
                              head_proba(head, cache.features("test"), n_classes))

    gpu = _has_gpu()
    with ComputeOptions("mixed_float16" if gpu else "float32").building():
        feature_model = cache_feature_model(cache, backbone_weights)
    base = application_model(feature_model)
    unfrozen = unfreeze_top(base, settings.unfreeze)
    if not unfrozen:
        raise HeadstartError("--unfreeze selects no layer with weights; use 1 or more, or 'all'.")
    batch_norm_before = _batch_norm_state(base)

    head.model_.trainable = settings.train_head
    size = int(cache.inputs["image_size"])
    images_in = keras.Input(shape=(size, size, 3))
    outputs = head.model_(feature_model(images_in, training=False))
    model = keras.Model(images_in, outputs, name="finetune")
    keras.utils.set_random_seed(settings.seed)
    model.compile(optimizer=keras.optimizers.Adam(settings.learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    augmentation = Augmentation(seed=settings.seed) if settings.augment else None
    train = _batches(dataset, rows[~held_out], labels[~held_out], n_classes, preprocessing,
                     settings.batch_size, augmentation, settings.seed, shuffle=True)
    validation = _batches(dataset, rows[held_out], labels[held_out], n_classes, preprocessing,
                          settings.batch_size, None, settings.seed, shuffle=False)
    started = time.perf_counter()
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience,
                                               restore_best_weights=True)]
    if verbose:
        callbacks.append(epoch_progress("finetune"))  # on stderr, not Keras's bar on stdout
    history = model.fit(train, validation_data=validation, epochs=settings.epochs, verbose=0,
                        callbacks=callbacks)
    train_seconds = time.perf_counter() - started
    if any(not np.array_equal(a, b) for a, b in zip(batch_norm_before, _batch_norm_state(base))):
        raise RuntimeError("BatchNorm statistics changed during fine-tuning.")

    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{cache.short_id}"
    run_dir = store.root / "finetune" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # a KerasHub backbone is saved as a preset folder (its converter beside it), others as weights
    saved = save_finetuned_preset(feature_model, preprocessing, run_dir / "preset")
    if saved is None:
        base.save_weights(str(run_dir / "backbone.weights.h5"))
        saved = Weights("file", (run_dir / "backbone.weights.h5").resolve())
    weights_path = saved.path

    plan = cache_plan(cache, dataset, saved,
                      lineage={"parent": cache.fingerprint, "finetune_run": str(run_dir)})
    refreshed = extract_features(plan, store, progress=verbose > 0).cache
    head_kind = get_head_kind(head_record["kind"])
    metrics = head_metrics(head, as_cache_set(refreshed))
    after = metrics["test"]
    record = {
        "parent_cache": cache.fingerprint,
        "parent_name": cache.name,
        "head": head_name,
        "settings": asdict(settings),
        "unfrozen_layers": unfrozen,
        "mixed_precision": gpu,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "train_seconds": round(train_seconds, 1),
        "test_before": before,
        "test_after": after,
        "weights": str(weights_path),
        "refreshed_cache": refreshed.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text(run_dir / "run.json", json.dumps(record, indent=2))
    head_sidecar = save_fitted_head(store, refreshed, head_name, head_kind, head, {
        "classes": refreshed.class_names,
        "fit_seconds": round(train_seconds, 3),
        "finetune_run": str(run_dir),
        "metrics": metrics,
        "created": record["created"],
    })
    return FinetuneResult(record, run_dir, refreshed, head_sidecar)


def _has_gpu() -> bool:
    load_keras()  # imports TensorFlow quietly
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def parse_unfreeze(text: str) -> int | None:
    """'all' → None (every block); otherwise a non-negative number of top blocks."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise HeadstartError(f"--unfreeze takes a number of top blocks (1 or more) or 'all'; got {text!r}.")
    return value


def print_progress_note() -> None:
    """Fine-tuning on a CPU is slow; say so once."""
    if not _has_gpu():
        print("No GPU found: fine-tuning runs on the CPU, slowly.", file=sys.stderr)
