"""A small version of bench/crash_test.py: kill -9 extraction twice (once just before the final
rename, once at a random moment during the work), rerun, and compare with an uninterrupted run
byte for byte. The full run (20 kills each for extract, augment and fit) is the bench script."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import crash_test  # noqa: E402


def test_killed_extraction_resumes_to_an_identical_cache(tmp_path: Path) -> None:
    scenario = dataclasses.replace(crash_test.SCENARIOS["extract"], events=["before-final-rename"])
    lines: list[str] = []
    outcome = crash_test.run_scenario("extract", scenario, kills=2, work=tmp_path, seed=1,
                                      say=lines.append)
    assert outcome.failures == [], lines
    assert outcome.kills + outcome.too_late == 2 and outcome.kills >= 1, lines
