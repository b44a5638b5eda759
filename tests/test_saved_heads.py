"""The one loader of saved heads: heads written by older headstart (tests/fixtures/legacy_store,
joblib ensembles included) still load and score as they did; both ways of asking for
probabilities agree; a refitted member is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from classifiers.saved import SavedEnsemble, load_saved_head
from classifiers.sources import align_rows
from store.errors import HeadstartError
from store.heads import list_heads
from store.store import Store
from tests.helpers import run_cli

FIXTURES = Path(__file__).with_name("fixtures")
HOME, OTHER = "da2b19ea1b2c", "889c362c334c"  # the fixture's caches "a" (width 12) and "b" (6)


@pytest.fixture()
def legacy(tmp_path: Path) -> Store:
    """A private copy of the store saved by the code before issue 13."""
    return Store(shutil.copytree(FIXTURES / "legacy_store", tmp_path / "store"))


def test_legacy_heads_load_and_score_as_they_did(legacy: Store) -> None:
    expected = np.load(FIXTURES / "legacy_store_test_proba.npz")
    seen = set()
    for cache in legacy.caches():
        for record in list_heads(legacy, cache):
            key = f"{record['name']}@{cache.fingerprint[:12]}"
            head = load_saved_head(legacy, cache, record["name"])
            np.testing.assert_allclose(head.split_proba("test"), expected[key], atol=1e-6)
            seen.add(key.split("@")[0])
    assert seen == {"logreg", "mlp", "sgd", "ensemble", "ensemble-stack"}
    stack = load_saved_head(legacy, legacy.find_cache(HOME), "ensemble-stack")
    assert isinstance(stack, SavedEnsemble) and stack.record["file"].endswith(".joblib")
    assert [m.name for m in stack.members] == ["logreg", "sgd"] and len(stack.caches) == 2


def test_fresh_features_by_cache_answer_like_the_cached_split(legacy: Store) -> None:
    """(b) on features handed in per cache fingerprint equals (a) on the cache, even for an
    ensemble across two caches whose rows are stored in different orders."""
    home = legacy.find_cache(HOME)
    for name in ("logreg", "mlp", "ensemble", "ensemble-stack"):
        head = load_saved_head(legacy, home, name)
        features = {}
        for cache in head.caches:
            order = align_rows(cache.ids("test"), home.ids("test"), cache.name, home.name)
            rows = cache.features("test")
            features[cache.fingerprint] = rows if order is None else rows[order]
        np.testing.assert_allclose(head.feature_proba(features), head.split_proba("test"),
                                   atol=1e-5)
    mask = np.arange(home.split_sizes["test"]) % 3 == 0
    stack = load_saved_head(legacy, home, "ensemble-stack")
    np.testing.assert_allclose(stack.split_proba("test", mask), stack.split_proba("test")[mask])


def test_legacy_ensembles_evaluate_and_report_through_the_cli(legacy: Store, tmp_path) -> None:
    result = run_cli("evaluate", "--head", "ensemble-stack", "--cache", HOME,
                     "--store", str(legacy.root))
    assert result.exit_code == 0, result.output
    assert "ensemble-stack (ensemble): accuracy" in result.output
    result = run_cli("report", "--head", "ensemble", "--cache", HOME, "--out",
                     str(tmp_path / "report"), "--store", str(legacy.root))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "members.png").is_file()


def test_a_refitted_member_is_refused(legacy: Store) -> None:
    result = run_cli("fit", "--head", "sgd", "-p", "alpha=0.001", "--cache", OTHER,
                     "--store", str(legacy.root))
    assert result.exit_code == 0, result.output
    with pytest.raises(HeadstartError, match="was refitted since the ensemble was made"):
        load_saved_head(legacy, legacy.find_cache(HOME), "ensemble-stack")
