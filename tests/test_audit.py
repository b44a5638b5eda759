"""audit, similar and fit --exclude on a copy of the mini set with planted problems.

One extraction (64 px) serves every test: the mini set with 20 training labels flipped, an
exact duplicate of a training image in train, and a re-encoded, resized copy of another in test.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest

from tests.conftest import MINI, MINI_ARGS
from tests.helpers import assert_clean_error, copy_store, run_cli

FLIPS = 20


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, shared_paths: dict) -> dict:
    """A store with one cache of the planted mini folder, and what was planted (by sample id)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(MINI, root)
    rng = random.Random(0)
    classes = sorted(p.name for p in (root / "train").iterdir())
    files = sorted((root / "train").glob("*/*.jpg"))
    flipped = []
    for path in rng.sample(files, FLIPS):
        other = rng.choice([c for c in classes if c != path.parent.name])
        target = root / "train" / other / f"flip-{path.parent.name}-{path.name}"
        path.rename(target)
        flipped.append(f"train/{other}/{target.name}")
    left = sorted(set((root / "train").glob("*/[0-9]*.jpg")))
    original, encoded, different = left[0], left[5], left[10]
    shutil.copy(original, original.with_name("dup-" + original.name))
    image = Image.open(encoded).convert("RGB").resize((48, 48), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75)
    copy = root / "test" / encoded.parent.name / ("copy-" + encoded.name)
    copy.write_bytes(buffer.getvalue())
    store = root.parent / "store"
    result = run_cli("extract", str(root), *MINI_ARGS, "--store", str(store))
    assert result.exit_code == 0, result.output

    def sample_id(path: Path) -> str:
        return path.relative_to(root).as_posix()

    return {"store": store, "root": root, "flipped": flipped,
            "duplicate": {sample_id(original), sample_id(original.with_name("dup-" + original.name))},
            "encoded": sample_id(encoded), "copy": sample_id(copy),
            "different": sample_id(different)}


@pytest.fixture(scope="module")
def audited(planted: dict) -> tuple[dict, Path]:
    out = planted["root"].parent / "audit"
    result = run_cli("audit", "--json", "--out", str(out), "--store", str(planted["store"]))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_the_json_has_the_four_lists_by_sample_id(audited: tuple[dict, Path]) -> None:
    report, _ = audited
    for key in ("label_issues", "duplicates", "leaks", "outliers"):
        scores = [entry["score"] for entry in report[key]]
        assert scores == sorted(scores, reverse=True), key
    assert report["summary"]["counts"]["label_issues"] == len(report["label_issues"])
    assert {"id", "given", "suggested", "score"} <= set(report["label_issues"][0])


def test_flipped_labels_rank_high(audited: tuple[dict, Path], planted: dict) -> None:
    report, _ = audited
    top = [entry["id"] for entry in report["label_issues"][:2 * FLIPS]]
    found = sum(1 for sample_id in planted["flipped"] if sample_id in top)
    assert found >= FLIPS // 2, (found, top)


def test_an_exact_duplicate_is_a_group_and_a_different_image_is_not(
        audited: tuple[dict, Path], planted: dict) -> None:
    report, _ = audited
    groups = [{m["id"] for m in g["members"]} for g in report["duplicates"]]
    assert any(planted["duplicate"] <= group for group in groups), groups
    assert report["duplicates"][0]["score"] > 0.999
    everywhere = set().union(*groups) | {leak["test_id"] for leak in report["leaks"]} | {
        m["id"] for leak in report["leaks"] for m in leak["matches"]}
    assert planted["different"] not in everywhere


def test_a_reencoded_copy_in_test_is_a_leak_by_id(audited: tuple[dict, Path],
                                                  planted: dict) -> None:
    report, _ = audited
    leaks = {leak["test_id"]: [m["id"] for m in leak["matches"]] for leak in report["leaks"]}
    assert planted["copy"] in leaks, leaks
    assert leaks[planted["copy"]][0] == planted["encoded"]


def test_the_page_and_the_exclude_list_are_written(audited: tuple[dict, Path]) -> None:
    report, out = audited
    page = (out / "index.html").read_text()
    assert "Label issues" in page and "Leaks" in page and 'src="thumbs/' in page
    assert 'src="map.png"' in page and (out / "map.png").stat().st_size > 1000
    thumbs = list((out / "thumbs").glob("*.png"))
    assert thumbs and all(p.stat().st_size > 100 for p in thumbs)
    listed = [line for line in (out / "exclude.txt").read_text().splitlines()
              if not line.startswith("#")]
    assert report["label_issues"][0]["id"] in listed
    assert json.loads((out / "audit.json").read_text())["summary"] == report["summary"]


def test_fit_exclude_leaves_the_ids_out(audited: tuple[dict, Path], planted: dict,
                                        tmp_path: Path) -> None:
    from classifiers.training import training_rows
    from classifiers.sources import CacheSet
    from store.heads import load_head_record

    store = copy_store(planted["store"], tmp_path)
    ids = [entry["id"] for entry in audited[0]["label_issues"][:10]]
    listing = tmp_path / "leave-out.txt"
    listing.write_text("# ten label issues\n" + "\n".join(ids) + "\n")
    plain = run_cli("fit", "--head", "logreg", "--name", "all", "--store", str(store))
    result = run_cli("fit", "--head", "logreg", "--name", "clean", "--exclude", str(listing),
                     "--store", str(store))
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    from store.store import Store

    the_store = Store(store)
    (cache,) = the_store.caches()
    everything, _ = load_head_record(the_store, cache, "all")
    record, _ = load_head_record(the_store, cache, "clean")
    assert record["excluded"] == 10
    rows = training_rows(CacheSet([cache]), exclude=ids)
    assert not set(ids) & set(rows.fit_ids.tolist())
    held = set(rows.val_ids.tolist()) & set(ids)
    assert record["rows"]["train"] == everything["rows"]["train"] - (10 - len(held))
    assert record["rows"]["validation"] == everything["rows"]["validation"]
    assert run_cli("audit", "--no-page", "--store", str(store)).exit_code == 0
    report = run_cli("report", "--head", "all", "--out", str(tmp_path / "report"),
                     "--store", str(store))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "report" / "map.png").stat().st_size > 1000
    assert "audit" in (tmp_path / "report" / "index.html").read_text()
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("train/cat/no-such-image.jpg\n")
    assert_clean_error(run_cli("fit", "--head", "logreg", "--exclude", str(wrong),
                               "--store", str(store)), "not training ids", "no-such-image")
    assert_clean_error(run_cli("fit", "--head", "logreg", "--exclude", str(tmp_path / "none"),
                               "--store", str(store)), "does not exist")


def test_similar_on_a_cached_image_returns_it_first(planted: dict) -> None:
    image = planted["root"] / planted["encoded"]
    result = run_cli("similar", str(image), "--k", "3", "--json", "--store",
                     str(planted["store"]))
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["error"] is None and len(answer["similar"]) == 3
    first = answer["similar"][0]
    assert first["id"] == planted["encoded"] and first["similarity"] > 0.999
    table = run_cli("similar", str(image), "--k", "2", "--store", str(planted["store"]))
    assert table.exit_code == 0 and planted["encoded"] in table.stdout


def test_bad_input_is_one_sentence(planted: dict) -> None:
    store = str(planted["store"])
    assert_clean_error(run_cli("audit", "--threshold", "3", "--store", store), "--threshold")
    assert_clean_error(run_cli("audit", "--head", "nope", "--store", store), "Unknown head")
    assert_clean_error(run_cli("audit", "--folds", "1", "--store", store), "--folds")
    assert_clean_error(run_cli("similar", str(planted["root"] / "missing.jpg"), "--store", store),
                       "missing.jpg")


def test_an_array_cache_is_audited_without_thumbnails(tmp_path: Path) -> None:
    """Features from elsewhere (no images to reopen): the audit runs on features alone and
    says why the page has no thumbnails; `similar` refuses in one sentence (no backbone)."""
    import numpy as np

    from store.arrays import write_array_cache
    from store.store import Store

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    splits = {}
    for split, n in (("train", 150), ("test", 30)):
        labels = np.arange(n) % 3
        X = (centres[labels] + rng.normal(size=(n, 16))).astype(np.float32)
        if split == "test":
            X[0] = splits["train"][2][0][4]  # test row 0 is training row 4 again: a leak
        splits[split] = ([f"{split}/{i:03d}" for i in range(n)], labels, [X])
    write_array_cache(Store(tmp_path / "store"), "toy", ["a", "b", "c"], splits, 256)
    out = tmp_path / "audit"
    result = run_cli("audit", "--json", "--out", str(out), "--store", str(tmp_path / "store"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["summary"]["pixel_threshold"] is None
    assert report["leaks"][0]["test_id"] == "test/000"
    assert report["leaks"][0]["matches"][0]["id"] == "train/004"
    assert "No thumbnails" in (out / "index.html").read_text()
    image = MINI / "train" / "cat" / "0000.jpg"
    assert_clean_error(run_cli("similar", str(image), "--store", str(tmp_path / "store")),
                       "not made by a backbone")


def test_serve_answers_similar_with_the_cached_image_first() -> None:
    """POST /similar: the served predictor's own forward pass, the cache's training features."""
    from fastapi.testclient import TestClient

    from service.app import ServiceSettings, create_app
    from service.server import similar_search
    from tests.service_support import predictor

    model = predictor("logreg")
    image = MINI / "train" / "dog" / "0003.jpg"
    with TestClient(create_app(model, ServiceSettings(),
                               similar=similar_search(model, model.cache))) as client:
        answer = client.post("/similar?k=2", content=image.read_bytes(),
                             headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
        found = answer.json()["similar"]
        assert len(found) == 2 and found[0]["id"] == "train/dog/0003.jpg"
        assert found[0]["label"] == "dog" and found[0]["similarity"] > 0.999
        assert client.post("/similar", content=b"not an image",
                           headers={"Content-Type": "image/jpeg"}).status_code in (415, 422)
        assert client.post("/similar?k=0", content=image.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}).status_code == 422
    with TestClient(create_app(model, ServiceSettings())) as plain:
        assert plain.post("/similar", content=image.read_bytes(),
                          headers={"Content-Type": "image/jpeg"}).status_code in (404, 405)


def test_serve_answers_similar_by_id_from_the_stored_features() -> None:
    """GET /similar?id=: a cached image's neighbours without a forward pass, itself left out
    when it is a training image; they agree with POST /similar on the same file."""
    from fastapi.testclient import TestClient

    from service.app import MAX_SIMILAR, ServiceSettings, create_app
    from service.server import similar_search
    from tests.service_support import predictor

    model = predictor("logreg")
    cache = model.cache
    root = Path(cache.source["path"])
    search = similar_search(model, model.cache)
    raw = {"Content-Type": "image/jpeg"}
    with TestClient(create_app(model, ServiceSettings(), similar=search)) as client:
        train_id = "train/dog/0003.jpg"
        answer = client.get("/similar", params={"id": train_id, "k": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["id"] == train_id
        found = answer.json()["similar"]
        assert len(found) == 3 and train_id not in [f["id"] for f in found]
        sims = [f["similarity"] for f in found]
        assert sims == sorted(sims, reverse=True)
        posted = client.post("/similar?k=2", content=(root / train_id).read_bytes(),
                             headers=raw).json()["similar"]
        assert posted[0]["id"] == train_id and posted[1]["id"] == found[0]["id"]
        assert posted[1]["similarity"] == pytest.approx(found[0]["similarity"], abs=1e-3)

        test_id = str(cache.ids("test")[0])
        by_id = client.get("/similar", params={"id": test_id, "k": 4})
        assert by_id.status_code == 200, by_id.text
        by_file = client.post("/similar?k=4", content=(root / test_id).read_bytes(),
                              headers=raw).json()["similar"]
        assert [f["id"] for f in by_id.json()["similar"]] == [f["id"] for f in by_file]

        unknown = client.get("/similar", params={"id": "train/no-such.jpg"})
        assert unknown.status_code == 404
        detail = unknown.json()["detail"]
        assert "train/no-such.jpg" in detail and detail.count(". ") == 0
        for k in (0, MAX_SIMILAR + 1):
            assert client.get("/similar", params={"id": train_id, "k": k}).status_code == 422
    with TestClient(create_app(model, ServiceSettings(token="s3cret"), similar=search)) as locked:
        assert locked.get("/similar", params={"id": train_id}).status_code == 401
        assert locked.get("/similar", params={"id": train_id},
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with TestClient(create_app(model, ServiceSettings())) as plain:
        assert plain.get("/similar", params={"id": train_id}).status_code in (404, 405)
