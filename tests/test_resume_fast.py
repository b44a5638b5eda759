"""The resume logic of extract/pipeline.py without a backbone: which segments a pass still has to
do (`_run_backbone`'s `todo`), the rows finished segments keep, each segment's rows, the finished
cache a plan reuses, and the width read back from finished segments. The plan is a stand-in with
the attributes the pass reads, its "images" small arrays whose pixels are their row number, the
backbone a stand-in that returns the first pixel (so the expected features, rows and counts are
written out by hand); the segments are real files of store/partial.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from extract import pipeline
from extract.images import BadImage
from extract.multiblock import BlockColumns
from store.format import CacheAttributes
from store.partial import PartialCache, Segment
from store.store import Store
from store.writer import write_cache

FP = "f" * 64
COLUMNS = [BlockColumns("output", 0, 3)]


class Split(list):
    pass


class Dataset:
    """train: 10 images, test: 3; `bad` rows are files that cannot be decoded."""

    def __init__(self, sizes: dict[str, int], bad: dict[str, set[int]] | None = None) -> None:
        self.splits = {s: Split(range(n)) for s, n in sizes.items()}
        self.bad = bad or {}
        self.loads: list[tuple[str, int, bool]] = []

    def load(self, split: str, row: int, preprocessing: object, resized: bool = True) -> np.ndarray:
        assert isinstance(preprocessing, Preprocessing)
        self.loads.append((split, row, resized))
        if row in self.bad.get(split, set()):
            raise BadImage(f"{split} {row} is broken")
        image = np.zeros((2 + (split == "test"), 2, 3), np.uint8)
        image[0, 0] = [row, row + 1, 100 if split == "test" else 0]
        return image


class Preprocessing:
    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack(images) if images else np.zeros((0, 2, 2, 3), np.uint8)


PREPROCESSING = Preprocessing()


def make_plan(sizes: dict[str, int] | None = None, bad: dict | None = None, **changes) -> SimpleNamespace:
    sizes = {"train": 10, "test": 3} if sizes is None else sizes
    options = dict(splits=tuple(sizes), dataset=Dataset(sizes, bad), blocks=1, fingerprint=FP,
                   storage_key=FP, image_size=5, preprocessing=PREPROCESSING,
                   compute=SimpleNamespace(runtime="fake-runtime"), tta=None,
                   inputs={"the": "inputs"}, workers=2, batch_size=3, augmentation=None,
                   dtype="float32", view=None)
    options.update(changes)
    return SimpleNamespace(**options)


def segment(rows: list[int], width: int = 3, skipped: list[int] = ()) -> Segment:
    features = np.array([[r, r + 1, 0][:width] for r in rows], np.float32).reshape(len(rows), width)
    return Segment(features, np.array(rows, np.int64), np.array(list(skipped), np.int64),
                   [f"bad {r}" for r in skipped])


def open_partial(tmp_path: Path, size: int = 4) -> PartialCache:
    return PartialCache.open(tmp_path / "p", {"fingerprint": FP, "segment_size": size})


class Backbone:
    """Stands in for runtime_forward: records how each function was made and every batch."""

    def __init__(self, monkeypatch) -> None:
        self.made: list[tuple] = []
        self.batches: list[np.ndarray] = []
        self.built = 0
        monkeypatch.setattr(pipeline, "runtime_forward", self.make)
        monkeypatch.setattr(pipeline, "_build_model", self.build)

    def build(self, plan) -> tuple[str, list[BlockColumns]]:
        self.built += 1
        return "model", list(COLUMNS if plan.blocks == 1 else
                             [BlockColumns("b1", 0, 1), BlockColumns("b2", 1, 3)])

    def make(self, runtime, model, preprocessing, compute, *, store_root, inputs, mirror,
             throughput):
        assert throughput  # the pass asks for the runtime's throughput mode
        self.made.append((runtime, model, preprocessing, compute, store_root, inputs, mirror))

        def forward(batch: np.ndarray) -> np.ndarray:
            self.batches.append(batch)
            out = batch[:, 0, 0, :].astype(np.float32)
            return -out if mirror else out
        return forward


def run(plan, partial, progress: bool = False, root: Path | None = Path("/the/store")):
    return pipeline._run_backbone(plan, partial, progress, root)


# --- rows of a segment, rows kept ---------------------------------------------------------------


@pytest.mark.parametrize(("rows", "size", "k", "expected"), [
    (10, 4, 0, range(0, 4)), (10, 4, 1, range(4, 8)), (10, 4, 2, range(8, 10)),
    (8, 4, 1, range(4, 8)), (3, 4, 0, range(0, 3)), (1, 1, 0, range(0, 1)), (5, 1, 4, range(4, 5)),
    (0, 4, 0, range(0, 0))])
def test_segment_rows(tmp_path: Path, rows: int, size: int, k: int, expected: range) -> None:
    plan = make_plan({"train": rows})
    assert pipeline._segment_rows(plan, open_partial(tmp_path, size), "train", k) == expected


def test_finished_rows_counts_the_rows_of_finished_segments(tmp_path: Path) -> None:
    plan = make_plan()  # train: segments 0-3, 4-7, 8-9; test: 0-2
    partial = open_partial(tmp_path)
    assert pipeline._finished_rows(plan, partial) == (0, 13)
    partial.write_segment("train", 2, segment([8], skipped=[9]))  # a skipped row is kept too
    assert pipeline._finished_rows(plan, partial) == (2, 13)
    partial.write_segment("train", 0, segment([0, 1, 2, 3]))
    assert pipeline._finished_rows(plan, partial) == (6, 13)
    partial.write_segment("test", 0, segment([0, 1, 2]))
    assert pipeline._finished_rows(plan, partial) == (9, 13)
    partial.write_segment("train", 3, segment([12]))  # past the split: not one of its segments
    assert pipeline._finished_rows(plan, partial) == (9, 13)
    assert pipeline._finished_rows(make_plan({"train": 10}), partial) == (6, 10)
    assert pipeline._finished_rows(make_plan({"test": 3, "train": 10}), partial) == (9, 13)


# --- the width of finished segments --------------------------------------------------------------


def test_width_of_finished_reads_the_first_segment_with_rows(tmp_path: Path) -> None:
    plan = make_plan()
    partial = open_partial(tmp_path)
    assert pipeline._width_of_finished(partial, plan) == 0
    partial.write_segment("train", 0, Segment(np.zeros((0, 7), np.float32), np.zeros(0, np.int64),
                                              np.arange(4), ["x"] * 4))  # no rows: no width
    assert pipeline._width_of_finished(partial, plan) == 0
    partial.write_segment("test", 0, segment([0, 1], width=2))
    assert pipeline._width_of_finished(partial, plan) == 2
    partial.write_segment("train", 2, segment([8, 9], width=3))
    assert pipeline._width_of_finished(partial, plan) == 3  # train first, in segment order
    partial.write_segment("train", 1, segment([4], width=1))
    assert pipeline._width_of_finished(partial, plan) == 1
    assert pipeline._width_of_finished(partial, make_plan({"test": 3})) == 2


def test_width_of_finished_skips_features_that_are_not_a_table(tmp_path: Path) -> None:
    plan = make_plan({"train": 8})
    partial = open_partial(tmp_path)
    partial.write_segment("train", 0, Segment(np.zeros(4, np.float32), np.arange(4),
                                              np.zeros(0, np.int64), []))
    assert pipeline._width_of_finished(partial, plan) == 0
    partial.write_segment("train", 1, segment([4, 5], width=2))
    assert pipeline._width_of_finished(partial, plan) == 2


# --- what a pass still has to do ------------------------------------------------------------------


def test_nothing_left_to_do_returns_the_finished_width_without_a_model(tmp_path: Path,
                                                                       monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan()
    partial = open_partial(tmp_path)
    for split, k, rows in (("train", 0, [0, 1, 2, 3]), ("train", 1, [4, 5, 6, 7]),
                           ("train", 2, [8, 9]), ("test", 0, [0, 1, 2])):
        partial.write_segment(split, k, segment(rows, width=2))
    assert run(plan, partial) == (0, [BlockColumns("output", 0, 2)], 0.0, 0.0)
    assert backbone.built == 0 and backbone.made == [] and plan.dataset.loads == []
    # several blocks: the model is built for the block names and widths only
    assert run(make_plan(blocks=2), partial) == (0, [BlockColumns("b1", 0, 1),
                                                     BlockColumns("b2", 1, 3)], 0.0, 0.0)
    assert backbone.built == 1 and backbone.made == []


def test_only_the_missing_segments_are_computed(tmp_path: Path, monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan(bad={"train": {5}, "test": {1}})
    partial = open_partial(tmp_path)
    partial.write_segment("train", 0, segment([0, 1, 2, 3]))  # finished by an earlier run
    before = partial.segment_path("train", 0).read_bytes()
    computed, columns, seconds, cpu = run(plan, partial)
    assert computed == 6 + 3 and columns == COLUMNS
    assert 0 <= seconds < 60 and 0 <= cpu < 60  # the pass's own clocks
    assert backbone.built == 1
    assert backbone.made == [("fake-runtime", "model", PREPROCESSING, plan.compute,
                              Path("/the/store"), {"the": "inputs"}, False)]
    # the warm-up batch: one blank image of the first missing segment's first image's size
    assert backbone.batches[0].shape == (1, 2, 2, 3) and not backbone.batches[0].any()
    assert backbone.batches[0].dtype == np.uint8
    loads = [(s, r) for s, r, _ in plan.dataset.loads]
    assert loads[0] == ("train", 0) and all(not resized for *_, resized in plan.dataset.loads)
    assert sorted(loads[1:]) == sorted([("train", r) for r in range(4, 10)]
                                       + [("test", r) for r in range(3)])
    assert partial.segment_path("train", 0).read_bytes() == before  # not redone
    one = partial.read_segment("train", 1)
    assert one.rows.tolist() == [4, 6, 7] and one.skipped_rows.tolist() == [5]
    assert one.skipped_reasons == ["train 5 is broken"]
    np.testing.assert_array_equal(one.features, [[4, 5, 0], [6, 7, 0], [7, 8, 0]])
    two = partial.read_segment("train", 2)
    np.testing.assert_array_equal(two.features, [[8, 9, 0], [9, 10, 0]])
    test = partial.read_segment("test", 0)
    assert test.rows.tolist() == [0, 2] and test.skipped_rows.tolist() == [1]
    np.testing.assert_array_equal(test.features, [[0, 1, 100], [2, 3, 100]])
    assert sorted(p.name for p in partial.directory.iterdir()) == [
        "manifest.json", "test-000000.npz", "train-000000.npz", "train-000001.npz",
        "train-000002.npz"]
    assert pipeline._finished_rows(plan, partial) == (13, 13)


def test_the_warm_up_batch_is_of_the_first_missing_split(tmp_path: Path, monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan()
    partial = open_partial(tmp_path)
    for k, rows in enumerate(([0, 1, 2, 3], [4, 5, 6, 7], [8, 9])):
        partial.write_segment("train", k, segment(rows))
    assert run(plan, partial, root=None)[0] == 3
    assert backbone.batches[0].shape == (1, 3, 2, 3)  # a test image: 3 x 2
    assert backbone.made[0][4] is None
    assert [b.shape[0] for b in backbone.batches[1:]] == [3]


def test_the_warm_up_batch_of_a_broken_first_image_has_the_plan_size(tmp_path: Path,
                                                                      monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan({"train": 2}, bad={"train": {0}})
    assert run(plan, open_partial(tmp_path))[0] == 2
    assert backbone.batches[0].shape == (1, 5, 5, 3) and backbone.batches[0].dtype == np.uint8


def test_a_pass_with_mirrored_views_makes_both_functions(tmp_path: Path, monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan({"train": 2}, tta="flip")
    partial = PartialCache.open(tmp_path / "p", {"fingerprint": FP, "segment_size": 4,
                                                 "mirrored": True})
    assert run(plan, partial)[0] == 2
    assert [m[-1] for m in backbone.made] == [False, True]
    np.testing.assert_array_equal(partial.read_segment("train", 0).mirrored,
                                  [[0, -1, 0], [-1, -2, 0]])


def test_the_progress_bar(tmp_path: Path, monkeypatch, capsys) -> None:
    Backbone(monkeypatch)
    run(make_plan(), open_partial(tmp_path), progress=False)
    assert capsys.readouterr().err == ""
    run(make_plan(), open_partial(tmp_path / "again"), progress=True)
    err = capsys.readouterr().err
    assert "extract: 100%" in err and "13/13" in err and "img/s" in err


def test_the_progress_bar_counts_only_missing_rows(tmp_path: Path, monkeypatch, capsys) -> None:
    Backbone(monkeypatch)
    partial = open_partial(tmp_path)
    partial.write_segment("train", 1, segment([4, 5, 6, 7]))
    run(make_plan(), partial, progress=True)
    assert "9/9" in capsys.readouterr().err


@pytest.mark.parametrize("failing", [0, 1, 3])
def test_a_segment_that_cannot_be_written_stops_the_pass(tmp_path: Path, monkeypatch,
                                                         failing: int) -> None:
    """The error of any write (the first, one in the middle, the last) reaches the caller."""
    Backbone(monkeypatch)
    partial = open_partial(tmp_path)
    real, writes = PartialCache.write_segment, []

    def write(self, split, k, segment):
        writes.append((split, k))
        if len(writes) == failing + 1:
            raise OSError(28, "No space left on device")
        real(self, split, k, segment)

    monkeypatch.setattr(PartialCache, "write_segment", write)
    with pytest.raises(OSError, match="No space left"):
        run(make_plan(), partial)
    assert writes[failing] == [("train", 0), ("train", 1), ("train", 2), ("test", 0)][failing]
    assert len(writes) <= failing + 2  # at most one more write was in flight


def test_all_segments_missing_are_computed_in_order(tmp_path: Path, monkeypatch) -> None:
    backbone = Backbone(monkeypatch)
    plan = make_plan({"train": 5, "test": 0}, workers=1, batch_size=2)
    partial = open_partial(tmp_path, size=4)
    computed, *_ = run(plan, partial)
    assert computed == 5
    assert [b.shape[0] for b in backbone.batches[1:]] == [2, 2, 1]
    assert partial.read_segment("train", 0).rows.tolist() == [0, 1, 2, 3]
    assert partial.read_segment("train", 1).rows.tolist() == [4]
    assert not partial.segment_path("test", 0).exists()


# --- the finished cache a plan reuses ------------------------------------------------------------


def put(store: Store, key: str) -> Path:
    path = store.cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    attributes = CacheAttributes(fingerprint=FP, inputs={"image_size": 8}, preprocessing={},
                                 dataset=key[-4:], created="2026-01-01T00:00:00+00:00",
                                 libraries={})
    with write_cache(path, attributes, ["x"]) as out:
        out.split("train", [np.zeros((1, 2), np.float32)], rows=1, width=2, dtype="float32",
                  labels=np.zeros(1), ids=["a"])
        out.skipped([])
    return path


def test_finished_is_the_merged_cache_else_the_shard_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    key = f"{FP}.shard-0001-of-0002"
    plan = make_plan(storage_key=key)
    assert pipeline._finished(plan, store) is None
    shard = put(store, key)
    assert pipeline._finished(plan, store).path == shard
    merged = put(store, FP)
    assert pipeline._finished(plan, store).path == merged
    assert pipeline._finished(plan, store, remove_leftovers=False).path == merged
    assert pipeline._finished(make_plan(), store).path == merged
    merged.unlink()
    assert pipeline._finished(plan, store, remove_leftovers=False).path == shard
    assert pipeline._finished(make_plan(), store) is None


@pytest.mark.parametrize("key", [FP, f"{FP}.shard-0001-of-0002"])
def test_finished_removes_a_leftover_folder_only_when_asked(tmp_path: Path, key: str) -> None:
    store = Store(tmp_path / "s")
    plan = make_plan(storage_key=key)
    put(store, key)
    leftover = store.partial_dir(key)
    leftover.mkdir()
    assert pipeline._finished(plan, store, remove_leftovers=False).path == store.cache_path(key)
    assert leftover.is_dir()
    assert pipeline._finished(plan, store).path == store.cache_path(key)
    assert not leftover.exists()
    store.partial_dir(FP + ".other").mkdir()  # another plan's unfinished run: left alone
    assert pipeline._finished(plan, store) is not None
    assert store.partial_dir(FP + ".other").is_dir()


def test_the_pass_reports_its_own_wall_and_cpu_seconds(tmp_path: Path, monkeypatch) -> None:
    Backbone(monkeypatch)
    clocks = {"perf_counter": [10.0, 13.0], "process_time": [5.0, 7.5]}

    def clock(name: str):
        def read() -> float:  # the first reading, then the second one for every later call
            values = clocks[name]
            return values.pop(0) if len(values) > 1 else values[0]
        return read

    for name in clocks:
        monkeypatch.setattr(pipeline.time, name, clock(name))
    computed, _, seconds, cpu = run(make_plan({"train": 2}), open_partial(tmp_path))
    assert (computed, seconds, cpu) == (2, 3.0, 2.5)


def test_views_are_augmented_per_split_with_their_rows(tmp_path: Path, monkeypatch) -> None:
    """A views plan: the segment's resized images are augmented together, told their rows, the
    view and the split."""
    backbone = Backbone(monkeypatch)
    calls = []

    class Augmentation:
        def apply(self, images, rows, view, split):
            calls.append((images.shape, rows.tolist(), view, split))
            return images + 1

    preprocessing = Preprocessing()
    preprocessing.resize_batch = lambda pixels: pixels
    plan = make_plan({"train": 5}, augmentation=Augmentation(), view=3, bad={"train": {1}})
    plan.preprocessing = preprocessing
    partial = open_partial(tmp_path)
    assert run(plan, partial)[0] == 5
    assert calls == [((3, 2, 2, 3), [0, 2, 3], 3, "train"), ((1, 2, 2, 3), [4], 3, "train")]
    np.testing.assert_array_equal(partial.read_segment("train", 0).features,
                                  [[1, 2, 1], [3, 4, 1], [4, 5, 1]])
    assert [b.shape[0] for b in backbone.batches[1:]] == [3, 1]
