"""README.md's figure tables are what bench/results/ says (bench/figures.py --check), and the
check does catch a hand-edited figure or a results file without its provenance."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import figures  # noqa: E402


def test_readme_figures_match_the_saved_results() -> None:
    problems = figures.check(ROOT / "README.md", figures.Results(ROOT / "bench" / "results"))
    assert problems == [], "\n".join(problems) + "\n(run: python bench/figures.py --write)"


def _block(text: str, name: str) -> str:
    start = text.index(f"<!-- figures:{name}:start")
    return text[start:text.index(f"<!-- figures:{name}:end -->", start)]


def test_a_hand_edited_figure_is_caught_and_named(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = _block(text, "measured")
    row = next(line for line in block.splitlines() if "`extract` pass" in line)
    true = re.search(r"([\d,]+) images/s", row).group(1)  # whatever the results file says
    typed = f"{int(true.replace(',', '')) + 16:,}"
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(row, row.replace(f"{true} images/s", f"{typed} images/s")),
                      encoding="utf-8")
    problems = figures.check(readme, figures.Results(ROOT / "bench" / "results"))
    assert len(problems) == 1
    assert "'measured'" in problems[0] and "`extract` pass" in problems[0]
    assert typed in problems[0] and true in problems[0]
    assert figures.main(["--check", "--readme", str(readme)]) == 1


def test_a_typed_row_and_a_missing_table_are_caught(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    end = "<!-- figures:performance:end -->"
    typed = text.replace(end, "| 9. a typed target | 1,694 images/s | nowhere |\n" + end)
    readme = tmp_path / "README.md"
    readme.write_text(typed, encoding="utf-8")
    problems = figures.check(readme, figures.Results(ROOT / "bench" / "results"))
    assert problems == ["README table 'performance', row '9. a typed target': no results file "
                        "produces it"]
    start = typed.index("<!-- figures:measured:start")
    readme.write_text(typed[:start], encoding="utf-8")
    assert any("'measured' has no markers" in p for p in figures.check(
        readme, figures.Results(ROOT / "bench" / "results")))


@pytest.mark.parametrize("field", ["command", "machine", "commit"])
def test_a_cited_file_without_provenance_fails(tmp_path: Path, field: str) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    onnx = json.loads((results / "onnx.json").read_text())
    onnx.pop(field, None)
    if field == "machine":
        onnx["machine"] = "vm"  # a host name only, as older mutation runs recorded
    if field == "commit":
        onnx["machine"].pop("commit")  # the commit is also read from the machine record
    (results / "onnx.json").write_text(json.dumps(onnx))
    problems = figures.check(ROOT / "README.md", figures.Results(results))
    assert problems and all("bench/results/onnx.json lacks" in p for p in problems), problems
    assert any(field in p for p in problems)


def test_sections_carried_over_without_a_machine_cannot_be_cited() -> None:
    results = figures.Results(ROOT / "bench" / "results")
    with pytest.raises(figures.MissingProvenance, match="recorded no machine"):
        results.source("results.json", "heads")
    paper = results.source("results.json", "paper")
    assert paper.command == "python bench/run_all.py --only paper" and paper.commit


def test_the_verdict_is_the_median_of_all_runs_not_the_best() -> None:
    rows = [{"batch_size": 64, "ratios": [0.8, 0.85, 1.1], "end_to_end_ratios": [0.6, 0.7, 0.8]},
            {"batch_size": 128, "ratios": [0.95, 0.96, 0.97]}]
    v = figures.verdict(rows)
    assert v["ratio_median"] == 0.85 and not v["met"] and v["runs"] == 3
    assert v["end_to_end_ratio_median"] == 0.7 and v["batch_size"] == [64]


def test_new_results_carry_what_the_check_needs(tmp_path: Path, monkeypatch) -> None:
    """save_json stamps command, machine and commit; run_all stamps each section it measures,
    and figures.Results accepts both without the fallbacks for older files."""
    import common
    import run_all

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench/kerashub.py", "--preset", "tiny"])
    common.save_json("kerashub-tiny.json", {"rows": []})
    saved = figures.Results(tmp_path).source("kerashub-tiny.json")
    assert saved.command == "python bench/kerashub.py --preset tiny"
    assert saved.commit == saved.machine["commit"]

    sections = run_all.Sections({}, quick=False)
    sections.measured("heads", {"fits": []})
    (tmp_path / "results.json").write_text(json.dumps(
        {"benchmarks": dict(sections), "provenance": sections.provenance}))
    heads = figures.Results(tmp_path).source("results.json", "heads")
    assert heads.command == "python bench/run_all.py --only heads" and heads.commit
