"""Nothing the user made is replaced without being asked, and degenerate training data is one
sentence: fit, tune and ensemble over names that exist, two writers of one head name, heads
that cannot learn from the rows they are given (issue 14)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pytest

from store.arrays import write_array_cache
from store.store import Store
from tests.helpers import assert_clean_error, run_cli, snapshot

def _fit(root: Path, cache: str, *args: str):
    return run_cli("fit", "--cache", cache[:12], "--store", str(root), *args)


@pytest.mark.parametrize("kind", ["logreg", "sgd", "knn", "mlp"])
def test_fit_over_an_existing_name_is_refused_unless_replace(toy_store, kind: str) -> None:
    root, caches = toy_store
    options = ["-p", "epochs=2"] if kind == "mlp" else []
    first = _fit(root, caches["a"], "--head", kind, "--name", "mine", *options)
    assert first.exit_code == 0, first.output
    before = snapshot(root / "heads")
    again = _fit(root, caches["a"], "--head", "logreg", "--name", "mine")
    assert_clean_error(again, "A head named 'mine' is already fitted", "--replace")
    assert snapshot(root / "heads") == before
    replaced = _fit(root, caches["a"], "--head", "logreg", "--name", "mine", "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert snapshot(root / "heads") != before


def test_a_second_writer_of_one_head_name_gets_a_sentence(toy_store) -> None:
    root, caches = toy_store
    store = Store(root)
    head_dir = store.head_dir(store.find_cache(caches["a"][:12]))
    head_dir.mkdir(parents=True, exist_ok=True)
    with open(head_dir / ".logreg.lock", "a+") as held:  # another process fitting 'logreg'
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = _fit(root, caches["a"], "--head", "logreg")
    assert_clean_error(result, "Another headstart process is fitting head 'logreg'")
    assert not (head_dir / "logreg.json").exists()


def test_tune_saves_beside_a_plain_fit_and_never_over_it(toy_store) -> None:
    root, caches = toy_store
    assert _fit(root, caches["a"], "--head", "logreg").exit_code == 0
    before = snapshot(root / "heads")
    tuned = run_cli("tune", "--head", "logreg", "--trials", "2", "--cache", caches["a"][:12],
                    "--store", str(root))
    assert tuned.exit_code == 0, tuned.output
    after = snapshot(root / "heads")
    assert {k: v for k, v in after.items() if k in before} == before  # the user's logreg kept
    assert any(k.endswith("logreg-tuned.json") for k in after)
    again = run_cli("tune", "--head", "logreg", "--trials", "2", "--cache", caches["a"][:12],
                    "--store", str(root))
    assert_clean_error(again, "'logreg-tuned' is already fitted", "--replace")


def test_ensemble_over_an_existing_ensemble_is_refused_unless_replace(toy_store) -> None:
    root, caches = toy_store
    for kind in ("logreg", "sgd"):
        assert _fit(root, caches["a"], "--head", kind).exit_code == 0
    args = ["ensemble", "--cache", caches["a"][:12], "--store", str(root)]
    assert run_cli(*args).exit_code == 0
    before = snapshot(root / "heads")
    assert_clean_error(run_cli(*args), "A head named 'ensemble' is already fitted")
    assert snapshot(root / "heads") == before
    assert run_cli(*args, "--replace").exit_code == 0


def test_knn_with_more_neighbours_than_rows_is_one_sentence(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    ids = [f"train/{i}.png" for i in range(12)]
    labels = np.arange(12) % 2
    cache = write_array_cache(store, "tiny", ["a", "b"], {
        "train": (ids, labels, [rng.normal(size=(12, 4)).astype(np.float32)]),
        "test": ([f"test/{i}.png" for i in range(4)], np.arange(4) % 2,
                 [rng.normal(size=(4, 4)).astype(np.float32)])}, block_rows=12)
    before = snapshot(store.root)
    for options in ([], ["-p", "n_neighbors=40"]):
        result = _fit(store.root, cache.fingerprint, "--head", "knn", *options)
        assert_clean_error(result, "only", "training rows", "-p n_neighbors=")
    assert snapshot(store.root) == before
    tuned = run_cli("tune", "--head", "knn", "--trials", "3", "--store", str(store.root))
    assert tuned.exit_code in (0, 1), tuned.output
    assert "Traceback" not in tuned.output
    assert "skipped" in tuned.output or "No trial could be fitted" in tuned.output


@pytest.mark.parametrize("kind", ["logreg", "mlp", "knn", "svm", "hgb", "sgd"])
def test_one_class_of_training_rows_is_one_sentence(tmp_path: Path, kind: str) -> None:
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    cache = write_array_cache(store, "one-class", ["a", "b"], {
        "train": ([f"train/{i}.png" for i in range(40)], np.zeros(40, int),
                  [rng.normal(size=(40, 4)).astype(np.float32)]),
        "test": ([f"test/{i}.png" for i in range(6)], np.arange(6) % 2,
                 [rng.normal(size=(6, 4)).astype(np.float32)])}, block_rows=40)
    before = snapshot(store.root)
    result = _fit(store.root, cache.fingerprint, "--head", kind)
    assert_clean_error(result, "hold only class 'a'", "at least two classes")
    assert snapshot(store.root) == before
