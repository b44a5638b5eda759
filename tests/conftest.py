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
def logreg_store(mini_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the mini store with a fitted logreg head (built once per session; copy it
    before changing it)."""
    import shutil

    from typer.testing import CliRunner

    from cli import app

    store = tmp_path_factory.mktemp("logreg-store") / "store"
    shutil.copytree(mini_store, store)
    result = CliRunner().invoke(app, ["fit", "--head", "logreg", "--store", str(store)])
    assert result.exit_code == 0, result.output
    return store
