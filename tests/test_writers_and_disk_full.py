"""Two writers of one cache, and a disk that fills up during extraction."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from tests.conftest import MINI, MINI_ARGS, WEIGHTS
from tests.reliability_support import lock_held_elsewhere, tree_digest

runner = CliRunner()
#: Another image size than the session cache (so a new cache is written), small segments.
ARGS = [str(MINI), *MINI_ARGS[:-3], "--image-size", "40", "--quiet"]


def plan_fingerprint() -> str:
    from extract.backbones import Weights, get_backbone
    from extract.datasets import open_dataset
    from extract.plan import ExtractionPlan

    plan = ExtractionPlan(open_dataset(str(MINI)), get_backbone("mobilenet"),
                          Weights.parse(str(WEIGHTS)), 40, alpha=0.25)
    return plan.fingerprint


@pytest.fixture
def store(mini_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(mini_store, copy)
    return copy


def test_second_writer_of_the_same_cache_stops_with_a_clear_message(store: Path) -> None:
    fingerprint = plan_fingerprint()
    before = tree_digest(store)
    with lock_held_elsewhere(store, fingerprint):  # a second process is writing that cache
        result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])
    assert result.exit_code == 1
    assert f"Another headstart process is writing cache {fingerprint[:12]}" in result.output
    assert "Traceback" not in result.output
    assert tree_digest(store) == before  # nothing written, nothing damaged


def test_disk_full_keeps_the_finished_part_and_other_caches(store: Path, monkeypatch) -> None:
    import extract.plan as plan_module
    from store.partial import PartialCache

    monkeypatch.setattr(plan_module, "SEGMENT_BYTES", 40 * 40 * 3 * 64)  # 64-image segments
    real_write = PartialCache.write_segment
    calls = []

    def write_until_full(self, split, index, segment):
        calls.append(index)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, split, index, segment)

    monkeypatch.setattr(PartialCache, "write_segment", write_until_full)
    others = tree_digest(store)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert errors[-1].startswith("Error: The disk holding store") and "is full" in errors[-1]
    assert "run the same command again to resume" in errors[-1]
    assert "Traceback" not in result.output
    partial = next((store / "caches").glob("*.partial"))
    assert len(list(partial.glob("*.npz"))) == 2  # the finished part is kept
    assert not list((store / "caches").glob(".*.tmp-*"))  # the failed write left nothing
    assert {k: v for k, v in tree_digest(store).items() if k in others} == others

    # the assembly's HDF5 write fails too (h5py says it only in the text)
    monkeypatch.setattr(PartialCache, "write_segment", real_write)

    def assemble_full(*args, **kwargs):
        raise OSError("Can't write data (file write failed: time = x, filename = y, "
                      "errno = 28, error message = 'No space left on device')")

    real_assemble = PartialCache.assemble
    monkeypatch.setattr(PartialCache, "assemble", assemble_full)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])
    assert result.exit_code == 1 and "is full" in result.output
    monkeypatch.setattr(PartialCache, "assemble", real_assemble)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])  # space freed: resume
    assert result.exit_code == 0, result.output
    assert "Extracted 0 images" in result.output  # every segment was kept
    assert runner.invoke(app, ["verify", "--store", str(store)]).exit_code == 0
