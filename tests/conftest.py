"""Shared fixtures: the real weights and images in ../shared, and small stores made per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
MINI = SHARED / "data" / "cifar10-mini"

#: The small, fast extraction settings most tests use (real pretrained weights, real images).
MINI_ARGS = ["--backbone", "mobilenet", "--alpha", "0.25", "--weights", str(WEIGHTS),
             "--image-size", "64", "--quiet"]


@pytest.fixture(scope="session")
def shared_paths() -> dict[str, Path]:
    """Paths of the shared test data; skips nothing: the suite needs them."""
    for path in (WEIGHTS, MINI):
        assert path.exists(), f"{path} is missing: the tests read ../shared at run time"
    return {"weights": WEIGHTS, "mini": MINI}


@pytest.fixture(scope="session")
def mini_store(tmp_path_factory: pytest.TempPathFactory, shared_paths: dict[str, Path]) -> Path:
    """A store holding one avg-pooled cache of cifar10-mini at 64 px (built once per session)."""
    from typer.testing import CliRunner

    from cli import app

    store = tmp_path_factory.mktemp("mini-store")
    result = CliRunner().invoke(app, ["extract", str(shared_paths["mini"]), *MINI_ARGS,
                                      "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture(scope="session")
def mini_cache(mini_store: Path):
    """The FeatureCache of `mini_store` (read-only: copy the store before changing anything)."""
    from store.store import Store

    (cache,) = Store(mini_store).caches()
    return cache


@pytest.fixture(scope="session")
def fitted_store(tmp_path_factory: pytest.TempPathFactory, mini_store: Path):
    """A copy of `mini_store` with a logreg and a 3-epoch mlp head fitted through the CLI.

    Returns (store path, {"logreg": CliRunner result, "mlp": CliRunner result}).
    """
    from tests.helpers import copy_store, run_cli

    store = copy_store(mini_store, tmp_path_factory.mktemp("fitted-store"))
    results = {
        "logreg": run_cli("fit", "--head", "logreg", "--store", str(store)),
        "mlp": run_cli("fit", "--head", "mlp", "-p", "epochs=3", "--quiet", "--store", str(store)),
    }
    for result in results.values():
        assert result.exit_code == 0, result.output
    return store, results


#: The tiny preset has register tokens, so pooling must skip them.
HUB_REGISTERS = 2


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer DINOv2 of width 32, patch 4, 28 px, with 2 register tokens and its converter
    (tests/kerashub_support.py), saved with KerasHub's own preset saving."""
    from tests.kerashub_support import make_tiny_preset

    return make_tiny_preset(tmp_path_factory.mktemp("presets") / "tiny-dinov2",
                            registers=HUB_REGISTERS)


@pytest.fixture(scope="session")
def hub_store(tmp_path_factory: pytest.TempPathFactory, tiny_preset: Path) -> Path:
    """The mini set extracted with the tiny preset (cls+mean, float32), logreg and mlp fitted."""
    from tests.helpers import run_cli

    store = tmp_path_factory.mktemp("hub-store")
    for args in (["extract", str(MINI), "--backbone", f"preset:{tiny_preset}", "--pooling",
                  "cls+mean", "--dtype", "float32", "--quiet"],
                 ["fit", "--head", "logreg"], ["fit", "--head", "mlp", "-p", "epochs=2",
                                               "--quiet"]):
        result = run_cli(*args, "--store", str(store))
        assert result.exit_code == 0, result.output
    return store


from tests.synthetic_store import toy_store  # noqa: E402,F401  (fixture shared by head tests)
