"""Memory-bounded training: sizes, plans, chunk-aligned batches, and streamed vs in-memory fits."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import classifiers.memory as memory
from classifiers.memory import plan_memory
from store.units import parse_size
from classifiers.sources import CacheSet
from classifiers.streaming import shuffled_batches
from classifiers.training import fit_head
from classifiers.validation import validation_mask
from cli import app
from store.errors import HeadstartError
from store.store import Store


@pytest.mark.parametrize("text, size", [("256MB", 256 * 10**6), ("2GB", 2 * 10**9),
                                        ("1.5GiB", int(1.5 * 2**30)), ("512 kb", 512_000),
                                        ("1000", 1000)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-1GB", "0MB", "1e9"])
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(HeadstartError):
        parse_size(text)


def test_plan_streams_only_over_budget() -> None:
    assert not plan_memory(10 * 10**6, "1GB").stream
    assert plan_memory(10**9, "256MB").stream
    with pytest.raises(HeadstartError, match="too small"):
        plan_memory(10**9, "1MB")


@pytest.fixture()
def tiny_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the toy caches (kilobytes) stream: no minimum budget."""
    monkeypatch.setattr(memory, "MIN_STREAM_BYTES", 0)


def test_shuffled_batches_cover_each_training_row_once(toy_store, tiny_streaming) -> None:  # noqa: F811
    root, caches = toy_store
    source = CacheSet([Store(root).find_cache(caches["b"][:12])])
    y = source.labels("train")
    fit_rows = ~validation_mask(source.ids("train"))
    X_all = source.features("train")
    seen = []
    batches = list(shuffled_batches(source, "train", fit_rows, y, 32, 100, seed=0, epoch=0))
    assert len(batches) == -(-fit_rows.sum() // 32)
    for X, labels in batches:
        rows = [int(np.flatnonzero((X_all == x).all(axis=1))[0]) for x in X]
        np.testing.assert_array_equal(y[rows], labels)
        seen += rows
    assert sorted(seen) == np.flatnonzero(fit_rows).tolist()
    other = list(shuffled_batches(source, "train", fit_rows, y, 32, 100, seed=0, epoch=1))
    assert not np.array_equal(other[0][0], batches[0][0])  # a new order each epoch


@pytest.fixture()
def class_sorted_cache(tmp_path):
    """Three classes, training rows stored class by class (as a folder dataset's are): a stream
    that is not shuffled shows the mlp one class at a time, and it forgets the first ones."""
    from store.arrays import write_array_cache

    classes, width, seed = ["cat", "dog", "fox"], 12, 2
    means = np.random.default_rng(seed).normal(0, 1, (3, width))
    splits = {}
    for split, rows in (("train", 480), ("test", 150)):
        labels = np.sort(np.random.default_rng([seed, rows]).integers(0, 3, rows))
        X = means[labels] + np.random.default_rng([seed, rows, 1]).normal(size=(rows, width))
        ids = [f"{split}/{classes[label]}/{i:05d}.png" for i, label in enumerate(labels)]
        splits[split] = (ids, labels, [X.astype(np.float32)])
    store = Store(tmp_path / "store")
    return store, write_array_cache(store, "sorted", classes, splits, block_rows=480,
                                    inputs={"pooling": "avg", "image_size": width})


#: Measured on this cache and two like it (seeds 0-2): streamed and in-memory test accuracy
#: differ by at most 1 test row of 150 (0.0067) for both heads. With the stream left in stored
#: order (shuffled_batches replaced by consecutive rows) the mlp lost 0.7, 3.3 and 9.3 points on
#: seeds 0, 1, 2; this cache is seed 2.
@pytest.mark.parametrize("head, options", [
    ("sgd", {}),
    ("mlp", {"epochs": "15", "batch_size": "32", "hidden": "32"}),
    ("mlp", {"epochs": "15", "batch_size": "32", "hidden": "32", "standardize": "true"}),
])
def test_streamed_fit_agrees_with_in_memory(class_sorted_cache, tiny_streaming, head,
                                            options) -> None:
    store, cache = class_sorted_cache
    in_memory, _ = fit_head(store, cache, head, options, f"{head}-memory")
    streamed, _ = fit_head(store, cache, head, options, f"{head}-stream", memory_budget=20_000)
    assert in_memory["memory"]["mode"] == "memory" and streamed["memory"]["mode"] == "stream"
    a, b = (r["metrics"]["test"]["accuracy"] for r in (in_memory, streamed))
    assert a > 0.85 and abs(a - b) <= 0.03, (a, b)
    if options.get("standardize"):  # the streamed moments are those of the fit rows in memory
        from classifiers.saved import load_saved_head
        from classifiers.validation import validation_mask

        X = cache.features("train")[~validation_mask(cache.ids("train"))].astype(np.float64)
        for name in (f"{head}-memory", f"{head}-stream"):
            layer = load_saved_head(store, cache, name).estimator.model_.get_layer("standardize")
            np.testing.assert_allclose(np.ravel(layer.mean), X.mean(0), rtol=1e-4, atol=1e-5)


def test_streaming_two_caches(toy_store, tiny_streaming) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    source = CacheSet([store.find_cache(caches["a"][:12]), store.find_cache(caches["b"][:12])])
    record, _ = fit_head(store, source, "sgd", memory_budget=20_000)
    assert record["memory"]["mode"] == "stream" and record["metrics"]["test"]["accuracy"] > 0.7


def test_head_that_cannot_stream_names_one_that_can(toy_store, tiny_streaming) -> None:  # noqa: F811
    root, caches = toy_store
    store = Store(root)
    with pytest.raises(HeadstartError, match="cannot stream.*--head mlp or sgd"):
        fit_head(store, store.find_cache(caches["a"][:12]), "svm", memory_budget=20_000)
    assert not (root / "heads").exists() or not list((root / "heads").rglob("svm*"))


@pytest.mark.parametrize("budget, message", [("12XB", "not understood"),
                                             ("1KB", "too small to train in")])
def test_cli_budget_errors(toy_store, budget, message) -> None:  # noqa: F811
    root, _ = toy_store
    big = root.parent / "big"
    from tests.synthetic_store import make_cache
    make_cache(Store(big), "toy", 40, 9)
    result = CliRunner().invoke(app, ["fit", "--head", "sgd", "--memory-budget", budget,
                                      "--store", str(big)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
