"""The README's figure tables, generated from the saved results in bench/results/.

    python bench/figures.py --write     # rewrite every table between figures markers in README.md
    python bench/figures.py --check     # exit 1, naming the row, if a table differs from the results
    python bench/figures.py --sources   # every results file: does it carry command, machine, commit?

A table lives between `<!-- figures:NAME:start -->` and `<!-- figures:NAME:end -->`; NAME is one
of TABLES. Every row names the results file (and section) its figures come from, and a row may
only cite a file whose figures carry the command that made them, the machine (cores, CPU, load
average, library versions) and the commit: a row citing anything else is an error, so a figure
nothing produces cannot reach the README through this script.

Only the standard library: the check runs in the test suite (tests/test_readme_figures.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"

#: What a machine record must hold (bench/common.py's machine()).
MACHINE_KEYS = ("cores", "cpu", "load_average", "libraries")
#: run_all's sections and the command that re-measures each alone (older results.json files record
#: `quick` and `only` but no command; a section measured by such a run is re-run by this command).
SECTION_COMMAND = {"extraction_before": "python bench/run_all.py --before DIR"}
#: Target 2 of issue 6 is judged at extract's default batch size (see verdict()).
DEFAULT_BATCH, TARGET = 64, 0.9


class MissingProvenance(ValueError):
    """A cited results file (or section) lacks its command, machine or commit."""


@dataclass(frozen=True)
class Source:
    """One results file, or one section of it, with the provenance every cited figure needs."""

    file: str
    section: str | None
    data: Any
    command: str
    machine: dict
    commit: str

    def cite(self) -> str:
        where = f"`bench/results/{self.file}`" + (f" ({self.section})" if self.section else "")
        return f"{where}, commit {self.commit}"


class Results:
    """The results files of one folder, read once."""

    def __init__(self, folder: Path = RESULTS) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Any] = {}

    def file(self, name: str) -> Any:
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise MissingProvenance(f"bench/results/{name} does not exist")
            self._files[name] = json.loads(path.read_text())
        return self._files[name]

    def source(self, name: str, section: str | None = None) -> Source:
        """The figures of file NAME (or its SECTION) with their provenance, or MissingProvenance."""
        data = self.file(name)
        what = f"bench/results/{name}" + (f" section {section!r}" if section else "")
        if section is None:
            machine = data.get("machine") or data.get("machine_start")
            return _checked(what, name, None, data, data.get("command"), machine,
                            data.get("commit") or _commit_of(machine))
        if "benchmarks" in data:  # bench/run_all.py's results.json
            if section not in data["benchmarks"]:
                raise MissingProvenance(f"{what} does not exist")
            body = data["benchmarks"][section]
            stamp = data.get("provenance", {}).get(section)
            if stamp:
                return _checked(what, name, section, body, stamp.get("command"),
                                stamp.get("machine"), stamp.get("commit"))
            own = _own_machine(body)
            if own is None:
                raise MissingProvenance(
                    f"{what} was carried over from an earlier run that recorded no machine or "
                    f"commit for it; re-measure it with `python bench/run_all.py --only {section}`")
            command = SECTION_COMMAND.get(section, "python bench/run_all.py"
                                          f"{' --quick' if data.get('quick') else ''} --only {section}")
            return _checked(what, name, section, body, command, own, own.get("commit"))
        if section not in data:
            raise MissingProvenance(f"{what} does not exist")
        body = data[section]  # a file of several runs by title (bench/audit.py)
        machine = body.get("machine")
        return _checked(what, name, section, body, body.get("command"), machine,
                        body.get("commit") or _commit_of(machine))

    def sources(self) -> list[tuple[str, str]]:
        """(file or file#section, 'ok' or what is missing) for every JSON file in the folder."""
        out = []
        for path in sorted(self.folder.glob("*.json")):
            data = self.file(path.name)
            parts: list[str | None] = [None]
            if "benchmarks" in data:
                parts = list(data["benchmarks"])
            elif "command" not in data and data and all(
                    isinstance(v, dict) and "command" in v for v in data.values()):
                parts = list(data)  # one entry per run, by title (bench/audit.py)
            for section in parts:
                label = path.name + (f"#{section}" if section else "")
                try:
                    self.source(path.name, section)
                    out.append((label, "ok"))
                except MissingProvenance as error:
                    out.append((label, str(error)))
        return out


def _commit_of(machine: Any) -> Any:
    """The commit a machine record names (bench/common.py's machine() records it)."""
    return machine.get("commit") if isinstance(machine, dict) else None


def _own_machine(body: Any) -> dict | None:
    """The machine a section of an older results.json recorded itself (paper: per setting)."""
    if isinstance(body, dict) and isinstance(body.get("machine"), dict):
        return body["machine"]
    if isinstance(body, dict) and body and all(isinstance(v, dict) and isinstance(v.get("machine"), dict)
                                                for v in body.values()):
        return next(iter(body.values()))["machine"]
    return None


def _checked(what: str, file: str, section: str | None, data: Any, command: Any, machine: Any,
             commit: Any) -> Source:
    missing = []
    if not isinstance(command, str) or not command.strip():
        missing.append("command")
    if not isinstance(machine, dict):
        missing.append("machine" if machine is None else f"machine (only {machine!r})")
    else:
        missing += [f"machine.{k}" for k in MACHINE_KEYS if k not in machine]
    if not isinstance(commit, str) or not commit.strip() or commit == "?":
        missing.append("commit")
    if missing:
        raise MissingProvenance(f"{what} lacks {', '.join(missing)}")
    return Source(file, section, data, command, machine, commit)


# --- numbers as the README writes them -------------------------------------------------------

def n(value: float, digits: int = 0) -> str:
    """1234.5 -> '1,234' (digits=0), '1,234.5' (digits=1)."""
    return f"{value:,.{digits}f}"


def pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f} %"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def verdict(rows: list[dict[str, Any]], target: float = TARGET) -> dict[str, Any]:
    """Target 2 (bench/extraction.py saves it with every run): judged on the median over every
    run at extract's default batch size (all rows' runs when none has it), never on the best run
    or the best batch size; the end-to-end ratio's median beside it."""
    chosen = [r for r in rows if r["batch_size"] == DEFAULT_BATCH] or rows
    ratios = [x for r in chosen for x in r["ratios"]]
    whole = [x for r in chosen for x in r.get("end_to_end_ratios", [])]
    ratio = median(ratios)
    return {"batch_size": sorted({r["batch_size"] for r in chosen}), "runs": len(ratios),
            "ratio_median": ratio, "end_to_end_ratio_median": median(whole) if whole else None,
            "target": target, "met": bool(ratio >= target)}


def extraction_verdict(section: dict) -> dict[str, Any]:
    """The verdict a run saved, or for runs older than it, the same rule on their saved ratios."""
    return section.get("verdict") or verdict(section["rows"])


def _hidden(head: dict) -> str:
    hidden = (head.get("options") or {}).get("hidden")
    return f" (hidden {hidden})" if hidden else ""


def _row_at(section: dict, batch: int) -> dict:
    return next(r for r in section["rows"] if r["batch_size"] == batch)


def _end_to_end(row: dict, section: str, verdict: dict | None = None) -> str:
    """The end-to-end ratio: per run where the run recorded it, else from the saved medians."""
    if verdict and verdict.get("end_to_end_ratio_median") is not None:
        return f"{verdict['end_to_end_ratio_median']:.2f} (median over runs)"
    if "end_to_end_ratio_median" in row:
        return f"{row['end_to_end_ratio_median']:.2f} (median over runs)"
    whole = row["images"] / row["end_to_end_seconds"] / row["ceiling_images_per_second"]
    return (f"{whole:.2f} from the medians ({n(row['images'])} images / {row['end_to_end_seconds']:.2f} s "
            f"/ {n(row['ceiling_images_per_second'])} img/s; per run: the next "
            f"`python bench/run_all.py --only {section}`)")


# --- the tables ------------------------------------------------------------------------------

Row = tuple[str, str, Source]


def _direct(p: dict) -> str:
    """The direct (b) - (a) difference over the paired runs, and the speed-up with (a)'s test
    figures computed once (runs that recorded them)."""
    out = ""
    direct = p.get("paired_accuracy") or {}
    if direct.get("lower") is not None:
        out += (f"; measured directly, (b) - (a) over {direct['runs']} runs "
                f"{100 * direct['mean']:+.2f} points (95 % interval {100 * direct['lower']:+.2f} "
                f"to {100 * direct['upper']:+.2f})")
    if p.get("speedup_validated_once"):
        out += (f"; {p['speedup_validated_once']:.1f}x if (a) validated once instead of every "
                f"epoch; both sides' backbone in batches of {p['batch_size']}")
    return out


def performance_rows(r: Results) -> list[Row]:
    """Issue 6's targets, each judged on medians over all runs."""
    paper = r.source("results.json", "paper")
    ex = r.source("results.json", "extraction")
    vgg = r.source("results.json", "vgg16")
    rows: list[Row] = []
    names = {"vgg16-32": "VGG16 at 32 px, Flatten, random weights (the paper's setting)",
             "mobilenet-128": "MobileNet α = 0.25 at 128 px, avg, ImageNet weights"}
    for key, p in paper.data.items():
        a, b = p["a_paper"], p["b_headstart"]
        storage = p.get("storage_effect") or {}
        # float32-cached heads reproduce (a) seed for seed: then float16 - float32 is the cache's cost
        d = storage["paired"] if storage and all(storage["reproduces_a"]) else p["paired_accuracy"]
        rows.append((f"1. headstart >= 8x faster than the paper's recipe, equal accuracy: {names[key]}",
                     f"(a) {a['seconds']:.1f} s vs (b) {b['seconds']:.1f} s = **{p['speedup']:.1f}x** "
                     f"(median of {len(p['speedups'])} pairs, {min(p['speedups']):.1f}-"
                     f"{max(p['speedups']):.1f}x); float16 cache - (a) over {d['runs']} seeds "
                     f"{100 * d['mean']:+.2f} points (95 % interval {100 * d['lower']:+.2f} to "
                     f"{100 * d['upper']:+.2f}; margin -{100 * d['margin']:.1f}): "
                     f"{'met' if p['target_speedup_met'] else 'not met'}{_direct(p)}", paper))
        further = ", ".join(f"`{f['head']}`{_hidden(f)} {f['seconds']:.2f} s = {f['speedup_vs_a']:.0f}x"
                            for f in b["further_heads"])
        rows.append((f"1. every further head >= 100x faster than (a): {names[key]}",
                     f"{further}: {'met' if p['target_further_met'] else 'not met'}", paper))
    v = extraction_verdict(ex.data)
    row = _row_at(ex.data, DEFAULT_BATCH)
    rows.append(("2. extraction >= 0.9 of the forward-only ceiling: MobileNet α = 0.25, 128 px, "
                 f"{n(row['images'])} images, batch {DEFAULT_BATCH}",
                 f"pass-only ratio **{v['ratio_median']:.2f}**, median of all {v['runs']} runs "
                 f"({min(row['ratios']):.2f}-{max(row['ratios']):.2f}; pipeline "
                 f"{n(row['pipeline_images_per_second'])} img/s, ceiling "
                 f"{n(row['ceiling_images_per_second'])} img/s): {'met' if v['met'] else 'not met'}; "
                 f"end to end (digest, model build, assembly): {_end_to_end(row, 'extraction', v)}", ex))
    others = [x for x in ex.data["rows"] if x["batch_size"] != DEFAULT_BATCH]
    for other in others:
        rows.append((f"2. the same at batch {other['batch_size']}",
                     f"pass-only ratio {other['ratio_median']:.2f} (median of {len(other['ratios'])} "
                     f"runs, {min(other['ratios']):.2f}-{max(other['ratios']):.2f}); end to end "
                     f"{_end_to_end(other, 'extraction')}", ex))
    g = vgg.data["rows"][0]
    rows.append((f"2. the same with VGG16 at 128 px (random weights), {n(g['images'])} images, batch "
                 f"{g['batch_size']}",
                 f"pass-only ratio {g['ratio_median']:.2f} ({len(g['ratios'])} run); end to end "
                 f"{_end_to_end(g, 'vgg16')}", vgg))
    return rows


def measured_rows(r: Results) -> list[Row]:
    """Single figures of the MobileNet α = 0.25 setting, each from its results file."""
    paper = r.source("results.json", "paper")
    ex = r.source("results.json", "extraction")
    onnx = r.source("onnx.json")
    p = paper.data["mobilenet-128"]
    a, b = p["a_paper"], p["b_headstart"]
    rows: list[Row] = []
    row = _row_at(ex.data, DEFAULT_BATCH)
    c = ex.data["cpu_steps"]
    rows.append((f"`extract` pass, {n(row['images'])} CIFAR-10 images, batch {row['batch_size']}, "
                 f"{row['workers']} decoding threads",
                 f"{n(row['pipeline_images_per_second'])} images/s (median of {len(row['ratios'])} runs); "
                 f"{row['end_to_end_seconds']:.1f} s end to end", ex))
    rows.append(("CPU per image outside the forward pass",
                 f"decode {c['decode_ms']:.3f} ms, resize + preprocess {c['resize_preprocess_ms']:.3f} ms, "
                 f"against forward {c['forward_ms']:.3f} ms", ex))
    rows.append((f"(a) the paper's recipe, {n(p['images'])} images ({n(a['train_rows'])} train rows), "
                 f"{p['epochs']} epochs",
                 f"{a['seconds']:.1f} s, test accuracy {pct(a['test_accuracy'], 2)} (medians of "
                 f"{p['repeats']} runs)", paper))
    rows.append(("(b) `extract` + `fit --head mlp --validation-fraction 0`, same rows",
                 f"{b['seconds']:.1f} s (extract {b['extract_seconds']:.1f} s + fit "
                 f"{b['fit_seconds']:.1f} s), test accuracy {pct(b['test_accuracy'], 2)}", paper))
    for f in b["further_heads"]:
        rows.append((f"a further `fit --head {f['head']}`{_hidden(f)} on that cache",
                     f"{f['seconds']:.2f} s, test accuracy {pct(f['test_accuracy'], 2)}", paper))
    run = next(x for x in onnx.data["extract"] if x["model"] == "mobilenet-128")
    fw = next(x for x in onnx.data["rows"] if x["model"] == "mobilenet-128")["forward"]
    rows.append((f"`extract --runtime onnx` against `--runtime tf`, {n(run['images'])} images",
                 f"{n(run['onnx_ips'])} vs {n(run['tf_ips'])} images/s (medians of pairs, load "
                 f"average {onnx.machine['load_average'][0]} at the start); features differ by at "
                 f"most {fw['max_abs_diff']:.1e}", onnx))
    return rows


#: bench/recipes.py's heads, as the README names them, and the step that fitted each.
RECIPE_HEADS = {
    "lr-b1": ("logreg, last block, no views (`--use-blocks 1 --no-tta`: a one-block cache)",
              "fit lr-b1"),
    "lr-b4-plain": ("logreg `-p C=0.05`, 4 blocks, no views (`--no-tta`)", "fit lr-b4-plain"),
    "lr-b4": ("logreg `-p C=0.05`, 4 blocks, mirrored training rows, averaged over image + "
              "mirror", "fit lr-b4"),
    "mlp-a": ("mlp, standardizing, 1,024 hidden (bench/recipes.py's `MLP_A`), with the views",
              "fit mlp-a"),
    "mlp-b": ("mlp, standardizing, 2,048 hidden, dropout 0.6, seed 1 (`MLP_B`), with the views",
              "fit mlp-b"),
    "best": ("greedy `ensemble` of mlp-a and mlp-b", "ensemble mlp-a + mlp-b"),
}


def recipe_rows(r: Results) -> list[Row]:
    """Issue 15's recipes on CIFAR-10 (bench/recipes.py): each head, the best recipe's wall time
    against one run of the paper's recipe on the same images."""
    src = r.source("recipes.json")
    d = src.data
    steps, acc = d["steps"], d["accuracy"]
    rows: list[Row] = [(f"`extract --blocks 4 --tta flip`, {n(d['images'])} images",
                        f"{steps['extract --blocks 4 --tta flip']:.1f} s", src)]
    for head, (label, step) in RECIPE_HEADS.items():
        a = acc[head]
        single = "" if a["single_view"] is None else f" ({pct(a['single_view'], 2)} from the image alone)"
        rows.append((label, f"test accuracy {pct(a['accuracy'], 2)}{single}; fit "
                     f"{steps[step]:.1f} s", src))
    best = d["best_recipe"]
    rows.append(("the best recipe: extract + mlp-a + mlp-b + ensemble",
                 f"{pct(best['accuracy'], 2)} in {best['seconds']:.0f} s", src))
    if "paper_recipe" in d:
        paper = d["paper_recipe"]
        rows.append(("the paper's recipe on the same images (frozen base inside the model, 10 "
                     "epochs, test split validated each epoch)",
                     f"{pct(paper['test_accuracy'], 2)} in {paper['seconds']:.0f} s; the best "
                     f"recipe takes {best['time_ratio_to_paper']:.2f} of its time (of "
                     f"{paper['seconds_validated_once']:.0f} s with the test figures computed "
                     f"once, at the end: {best['seconds'] / paper['seconds_validated_once']:.2f})",
                     src))
    return rows


TABLES: dict[str, tuple[tuple[str, str], Callable[[Results], list[Row]]]] = {
    "performance": (("target (issue 6)", "measured: medians over all runs"), performance_rows),
    "measured": (("step (MobileNet α = 0.25, 128 px)", "result"), measured_rows),
    "recipes": (("on `extract --blocks 4 --tta flip` (MobileNet α = 0.25, 128 px)", "measured"),
                recipe_rows),
}


def render(name: str, results: Results) -> str:
    (first, second), rows = TABLES[name]
    lines = [f"| {first} | {second} | source |", "| --- | --- | --- |"]
    lines += [f"| {step} | {value} | {source.cite()} |" for step, value, source in rows(results)]
    return "\n".join(lines) + "\n"


# --- README markers --------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+):start[^>]*-->\n)(?P<body>.*?)"
                   r"(<!-- figures:(?P=name):end -->)", re.S)


def write(readme: Path = README, results: Results | None = None) -> list[str]:
    results = results or Results()
    text = readme.read_text(encoding="utf-8")
    names: list[str] = []

    def fill(match: re.Match) -> str:
        names.append(match["name"])
        if match["name"] not in TABLES:
            raise SystemExit(f"README.md: unknown figures table {match['name']!r}")
        return match.group(1) + render(match["name"], results) + match.group(4)

    readme.write_text(BLOCK.sub(fill, text), encoding="utf-8")
    return names


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def check(readme: Path = README, results: Results | None = None) -> list[str]:
    """Every difference between the README's figure tables and the results, one sentence each."""
    results = results or Results()
    text = readme.read_text(encoding="utf-8")
    problems: list[str] = []
    found = set()
    for match in BLOCK.finditer(text):
        name = match["name"]
        found.add(name)
        if name not in TABLES:
            problems.append(f"README table {name!r}: no such figures table ({', '.join(TABLES)})")
            continue
        try:
            want = render(name, results)
        except MissingProvenance as error:
            problems.append(f"README table {name!r}: a row cites {error}")
            continue
        except (KeyError, StopIteration, TypeError) as error:
            problems.append(f"README table {name!r}: the results lack a figure it needs ({error!r})")
            continue
        have_lines = [l for l in match["body"].splitlines() if l.strip()]
        want_lines = [l for l in want.splitlines() if l.strip()]
        have = {_cells(l)[0]: l for l in have_lines[2:]}
        wanted = {_cells(l)[0]: l for l in want_lines[2:]}
        if have_lines[:2] != want_lines[:2]:
            problems.append(f"README table {name!r}: header differs from the generated one")
        for step, line in wanted.items():
            if step not in have:
                problems.append(f"README table {name!r}, row {step!r}: missing")
            elif have[step].strip() != line.strip():
                cells, want_cells = _cells(have[step]), _cells(line)
                problems.append(f"README table {name!r}, row {step!r}: the README says "
                                f"{' | '.join(cells[1:])!r}, the results say {' | '.join(want_cells[1:])!r}")
        for step in have.keys() - wanted.keys():
            problems.append(f"README table {name!r}, row {step!r}: no results file produces it")
        if list(have) != list(wanted) and not problems:
            problems.append(f"README table {name!r}: rows out of order")
    for name in TABLES.keys() - found:
        problems.append(f"README: figures table {name!r} has no markers")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the tables in the README")
    mode.add_argument("--check", action="store_true", help="exit 1 if a table differs from the results")
    mode.add_argument("--sources", action="store_true", help="which results files carry provenance")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = Results(args.results)
    if args.sources:
        for label, state in results.sources():
            print(f"{label}: {state}")
        return 0
    if args.write:
        try:
            names = write(args.readme, results)
        except MissingProvenance as error:
            print(f"cannot write the figures: a row cites {error}", file=sys.stderr)
            return 1
        print(f"wrote {', '.join(names) or 'no'} figures tables in {args.readme}")
        return 0
    problems = check(args.readme, results)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"{args.readme.name}: every figures table matches bench/results/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
