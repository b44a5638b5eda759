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
    """The disk fills up part-way through writing the third segment (its first bytes are in the
    temporary file beside the segments), then again part-way through the assembly's HDF5 file."""
    import io

    import extract.plan as plan_module
    import store.partial as partial_module

    monkeypatch.setattr(plan_module, "SEGMENT_BYTES", 40 * 40 * 3 * 64)  # 64-image segments
    real_savez = partial_module.np.savez
    calls, torn = [], []

    def savez_until_full(handle, **arrays):
        calls.append(handle.name)
        if len(calls) != 3:
            return real_savez(handle, **arrays)
        whole = io.BytesIO()
        real_savez(whole, **arrays)
        handle.write(whole.getvalue()[: len(whole.getvalue()) // 2])  # half of it lands
        handle.flush()
        torn.append((Path(handle.name), Path(handle.name).stat().st_size))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(partial_module.np, "savez", savez_until_full)
    others = tree_digest(store)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert errors[-1].startswith("Error: The disk holding store") and "is full" in errors[-1]
    assert "run the same command again to resume" in errors[-1]
    assert "Traceback" not in result.output
    partial = next((store / "caches").glob("*.partial"))
    (temporary, size), = torn
    assert temporary.parent == partial and temporary.name.startswith(".") and size > 0
    assert not temporary.exists()  # the torn temporary is gone...
    assert sorted(p.name for p in partial.iterdir()) == [  # ...and only finished files are left
        "manifest.json", "train-000000.npz", "train-000001.npz"]
    assert not [p for p in (store / "caches").rglob("*") if ".tmp-" in p.name]
    assert {k: v for k, v in tree_digest(store).items() if k in others} == others
    monkeypatch.setattr(partial_module.np, "savez", real_savez)

    # the disk fills up again while the finished HDF5 file is being assembled: the train split
    # is in the temporary file when the test split's write fails (h5py says it only in the text)
    real_segments = partial_module.PartialCache._segments
    assembling = []

    def segments_until_full(self, split, rows):
        if split == "test":
            assembling.extend(p for p in (store / "caches").iterdir() if ".tmp-" in p.name)
            raise OSError("Can't write data (file write failed: time = x, filename = y, "
                          "errno = 28, error message = 'No space left on device')")
        return real_segments(self, split, rows)

    monkeypatch.setattr(partial_module.PartialCache, "_segments", segments_until_full)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])
    assert result.exit_code == 1 and "is full" in result.output, result.output
    (half_written,) = assembling
    assert half_written.suffix == ".h5" and not half_written.exists()
    assert not [p for p in (store / "caches").rglob("*") if ".tmp-" in p.name]
    assert {k for k in tree_digest(store) if k.endswith(".h5")} == {  # no new finished cache
        k for k in others if k.endswith(".h5")}
    monkeypatch.setattr(partial_module.PartialCache, "_segments", real_segments)
    result = runner.invoke(app, ["extract", *ARGS, "--store", str(store)])  # space freed: resume
    assert result.exit_code == 0, result.output
    assert "Extracted 0 images" in result.output  # every segment was kept
    assert runner.invoke(app, ["verify", "--store", str(store)]).exit_code == 0
