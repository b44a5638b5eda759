"""docs/format.md and the code name the same attributes and datasets."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from store.format import ATTRIBUTE_NAMES, OPTIONAL_FIELDS, CacheAttributes
from store.store import Store
from tests.conftest import ROOT

SPEC = ROOT / "docs" / "format.md"


def spec_table(heading: str) -> dict[str, dict[str, str]]:
    """The rows of the first table under `## heading`, keyed by their first cell's `name`."""
    section = SPEC.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[re.fullmatch(r"`([^`]+)`", cells[0]).group(1)] = dict(zip(header, cells))
    return rows


def test_the_spec_lists_exactly_the_records_attributes() -> None:
    table = spec_table("Root attributes")
    assert set(table) == set(ATTRIBUTE_NAMES.values())
    required = {ATTRIBUTE_NAMES[f] for f in ATTRIBUTE_NAMES if f not in OPTIONAL_FIELDS}
    assert {name for name, row in table.items() if row["presence"] == "MUST"} == required
    assert all(re.fullmatch(r"1\.\d", row["since"]) for row in table.values())


def test_a_written_file_holds_only_what_the_spec_lists(tmp_path: Path) -> None:
    from store.arrays import write_array_cache

    rng = np.random.default_rng(0)
    cache = write_array_cache(Store(tmp_path), "toy", ["a", "b"], {
        "train": ([f"t{i}" for i in range(6)], rng.integers(0, 2, 6), [rng.normal(size=(6, 3))]),
        "test": ([f"s{i}" for i in range(2)], rng.integers(0, 2, 2), [rng.normal(size=(2, 3))]),
    }, block_rows=6)
    datasets = spec_table("Datasets")
    names: list[str] = []
    with h5py.File(cache.path, "r") as handle:
        attrs = dict(handle.attrs)
        handle.visititems(lambda name, item: names.append(name)
                          if isinstance(item, h5py.Dataset) else None)
    assert set(attrs) <= set(spec_table("Root attributes"))
    generic = {"/" + re.sub(r"^(train|test)/", "<split>/", name) for name in names}
    assert generic <= set(datasets)
    assert {d for d, row in datasets.items() if row["presence"] == "MUST"} <= generic
    assert CacheAttributes.from_attrs(attrs) == cache.attributes


def test_every_attribute_survives_a_round_trip() -> None:
    record = CacheAttributes(
        fingerprint="f" * 64, inputs={"image_size": 32}, preprocessing={"image_size": 32},
        dataset="toy", created="2026-01-01T00:00:00+00:00", libraries={"h5py": "3"},
        source={"kind": "arrays"}, weights_path="w.h5", kind="views", parent="p" * 64, view=2,
        augmentation={"seed": 0}, lineage={"parent": "q"}, shard={"index": 0}, merged={"shards": 2},
        blocks=[{"name": "b", "start": 0, "stop": 3}], tta="flip", extra={"future-attribute": "kept"})
    attrs = record.to_attrs()
    assert set(attrs) == set(ATTRIBUTE_NAMES.values()) | {"future-attribute"}
    again = CacheAttributes.from_attrs(attrs)
    assert again == record and again.extra == record.extra and again.image_size == 32


def test_the_checker_names_what_a_file_breaks(tmp_path: Path) -> None:
    from store.arrays import write_array_cache
    from store.check import layout_problems

    rng = np.random.default_rng(1)
    cache = write_array_cache(Store(tmp_path), "toy", ["a", "b"], {
        "train": ([f"t{i}" for i in range(4)], rng.integers(0, 2, 4), [rng.normal(size=(4, 3))]),
    }, block_rows=4)
    with h5py.File(cache.path, "r") as handle:
        assert layout_problems(handle, cache.attributes, 2) == ([], 4)
        as_views = cache.attributes.replace(kind="views", view=0)
        assert layout_problems(handle, as_views, 2)[0] == [
            "is a views file without its parent, augmentation attribute", "has no train/views"]
    with h5py.File(cache.path, "r+") as handle:
        del handle["skipped/reason"]
        assert layout_problems(handle, cache.attributes, 2)[0] == ["has no complete /skipped group"]
