"""Shared, built-once state for the predict/serve/export/report tests.

A store with cifar10-mini at 48 px (float32 features, so live features equal cached ones) and
two fitted heads: mlp (Keras) and logreg (linear). Built once per test process, under /tmp.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
MINI = SHARED / "data" / "cifar10-mini"
SERVICE_ARGS = ["--backbone", "mobilenet", "--alpha", "0.25", "--weights", str(WEIGHTS),
                "--image-size", "48", "--dtype", "float32", "--quiet"]


@functools.lru_cache(maxsize=1)
def service_store() -> Path:
    """The store path (extracted and fitted on first use)."""
    from typer.testing import CliRunner

    from cli import app

    store = Path(tempfile.mkdtemp(prefix="headstart-service-"))
    runner = CliRunner()
    for args in (["extract", str(MINI), *SERVICE_ARGS],
                 ["fit", "--head", "mlp", "-p", "epochs=4", "--quiet"],
                 ["fit", "--head", "logreg"]):
        result = runner.invoke(app, [*args, "--store", str(store)])
        assert result.exit_code == 0, result.output
    return store


@functools.lru_cache(maxsize=2)
def predictor(head: str = "mlp"):
    """A loaded Predictor for `head` on the service store."""
    from endtoend.predict import open_predictor
    from store.store import Store

    store = Store(service_store())
    return open_predictor(store, store.find_cache(), head)


def cache_test_images(count: int) -> list[Path]:
    """The first `count` test-split files of the cache, in cache order."""
    from store.store import Store

    cache = Store(service_store()).find_cache()
    root = Path(cache.source["path"])
    return [root / i for i in cache.ids("test")[:count]]


#: The ensembles `ensemble_store` makes with the `ensemble` command: one per method of the
#: first cache's mlp and logreg, and one of the logreg heads of two caches (two backbones).
ENSEMBLES = ("ensemble-greedy", "ensemble-vote", "ensemble-stack", "across")


@functools.lru_cache(maxsize=1)
def ensemble_store() -> tuple[Path, str]:
    """A copy of the service store with a second cache (max pooling, a logreg on it) and the
    `ENSEMBLES`; returns (store path, fingerprint prefix of the first cache: theirs)."""
    import shutil

    from typer.testing import CliRunner

    from cli import app
    from store.store import Store

    store = Path(tempfile.mkdtemp(prefix="headstart-ensembles-")) / "store"
    shutil.copytree(service_store(), store)
    first = Store(store).find_cache().fingerprint[:12]
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(MINI), *SERVICE_ARGS, "--pooling", "max",
                                 "--store", str(store)])
    assert result.exit_code == 0, result.output
    (second,) = [c.fingerprint[:12] for c in Store(store).caches() if c.fingerprint[:12] != first]
    steps = [["fit", "--head", "logreg", "--cache", second],
             *(["ensemble", "--method", method, "--heads", "mlp,logreg", "--cache", first,
                "--name", f"ensemble-{method}"] for method in ("greedy", "vote", "stack")),
             ["ensemble", "--heads", "logreg", "--cache", first, "--cache", second,
              "--name", "across"]]
    for args in steps:
        result = runner.invoke(app, [*args, "--store", str(store)])
        assert result.exit_code == 0, result.output
    return store, first
