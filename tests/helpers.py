"""Helpers shared by the tests: small datasets, store snapshots, CLI calls, extraction plans."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

from tests.conftest import MINI, WEIGHTS


def run_cli(*args: str) -> Any:
    """Invoke the typer app in-process; returns click's Result (output = stdout + stderr)."""
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, list(args))


def assert_clean_error(result: Any, *fragments: str) -> str:
    """A failed command: non-zero exit, no traceback, one sentence naming every fragment.

    Returns the error sentence (without the leading 'Error: ').
    """
    output = result.output
    assert result.exit_code not in (0, None), output
    assert isinstance(result.exception, SystemExit), (
        f"an exception escaped: {result.exception!r}\n{output}")
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    sentence = errors[0].removeprefix("Error: ")
    assert sentence.rstrip().endswith("."), sentence
    for fragment in fragments:
        assert fragment.lower() in sentence.lower(), f"{fragment!r} not in {sentence!r}"
    return sentence


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file below root, lock files aside (they hold no data)."""
    if not root.exists():
        return {}
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix != ".lock"
    } | {path.relative_to(root).as_posix() + "/": "dir" for path in root.rglob("*") if path.is_dir()}


def copy_store(source: Path, target: Path) -> Path:
    """A private copy of a store, to change without touching the session's fixtures."""
    destination = target / "store"
    shutil.copytree(source, destination)
    return destination


def mini_files(split: str, class_name: str, count: int) -> list[Path]:
    """The first `count` real CIFAR JPEGs of one class of cifar10-mini."""
    files = sorted((MINI / split / class_name).glob("*.jpg"))[:count]
    assert len(files) == count
    return files


def make_folder(root: Path, per_class: dict[str, int], split: str | None = None) -> Path:
    """An image folder of real mini JPEGs: root/<class>/*.jpg, or root/<split>/<class>/*.jpg."""
    for class_name, count in per_class.items():
        target = root / split / class_name if split else root / class_name
        target.mkdir(parents=True, exist_ok=True)
        for path in mini_files(split or "train", class_name, count):
            shutil.copy(path, target / path.name)
    return root


def make_plan(dataset: str | Path, **overrides: Any) -> Any:
    """An ExtractionPlan with the suite's settings (mobilenet 0.25, real weights, 32 px)."""
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.plan import ExtractionPlan

    options: dict[str, Any] = {
        "backbone": get_backbone("mobilenet"), "alpha": 0.25, "weights": Weights.parse(str(WEIGHTS)),
        "image_size": 32, "pooling": "avg", "dtype": "float16", "batch_size": 64, "workers": 2,
    }
    test_fraction = overrides.pop("test_fraction", 0.2)
    options.update(overrides)
    return ExtractionPlan(dataset=open_dataset(str(dataset), test_fraction), **options)


def open_image(path: Path) -> Any:
    """An image file as the PIL RGB image of `read_pixels`'s pixels (or BadImage)."""
    from PIL import Image

    from extract.images import read_pixels

    return Image.fromarray(read_pixels(path))


def held_out_by_hand(sample_id: str, fraction: float = 0.1) -> bool:
    """Whether the validation split holds `sample_id`, worked out without headstart's code:
    sha256("headstart-validation:" + id), its first 8 bytes as a big-endian fraction of 2**64."""
    head = hashlib.sha256(("headstart-validation:" + sample_id).encode("utf-8")).digest()[:8]
    return int.from_bytes(head, "big") < fraction * 2**64


def interrupt_extraction(monkeypatch: Any, at_call: int = 4) -> Callable[[], None]:
    """Make extraction's forward function raise KeyboardInterrupt (Ctrl-C) on its `at_call`-th
    call (the first is the warm-up); returns the function that puts the real one back."""
    from extract import pipeline

    real, calls = pipeline.runtime_forward, []

    def interrupting(*args: Any, **kwargs: Any) -> Any:
        forward = real(*args, **kwargs)

        def call(batch: Any) -> Any:
            calls.append(len(batch))
            if len(calls) == at_call:
                raise KeyboardInterrupt
            return forward(batch)
        return call

    monkeypatch.setattr(pipeline, "runtime_forward", interrupting)
    return lambda: monkeypatch.setattr(pipeline, "runtime_forward", real)
