"""Mutation testing of the modules that carry headstart's guarantees (mutmut 3; not part of CI).

    pip install -e '.[bench]'                               # mutmut
    python bench/mutation.py                                # every target, 2 workers
    python bench/mutation.py batching atomic --rev main --label before   # the tests of a commit

Each target is one module (or some functions of it) with the test files that cover it, so a
mutant runs only tests that can kill it and the run stays bounded (--limit seconds per target).
Each target runs in a fresh copy of the tracked files (`git archive REV`, or the work tree), so
the repository itself is never mutated. mutmut maps every mutant to the tests that reach it
(`python -m mutmut tests-for-mutant NAME` inside the copy; keep it with --keep). Results, with
the diff of every surviving mutant, go to bench/results/mutation-<label>.json.

Why mutmut and not cosmic-ray (measured on service/batching.py, tests/test_batching.py, 2
cores): mutmut 3 forks each mutant from a process that has already imported the code and the
tests, 117 mutants in 5 min, most of it the timeouts of mutants that hang the worker; cosmic-ray
starts a new pytest process per mutant and pays interpreter + numpy (+ TensorFlow for most
targets) start-up each time: one such start of tests/test_batching.py took 16 s on the shared
cores, about 30 minutes for the same 117 mutants (README, "Mutation testing").
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402  (cores, CPU, load, libraries, commit)

ROOT = Path(__file__).resolve().parents[1]
FAST_FINGERPRINT = ["-k", "changes_it or not_change or distinct or same_inputs or held_out or "
                           "fractions or alone or hand_picked"]

#: The functions of extract/datasets.py that make the content digest (mutmut's names for them).
DIGEST = tuple(f"extract.datasets.x_{f}__mutmut_*"
               for f in ("_folder_digest", "_array_digest", "_safe_digest", "_safe_digests"))
#: The resume logic of extract/pipeline.py: which segments are still to do, what a finished run
#: kept, and the finished cache a plan reuses (the pass's other functions are not in the target).
RESUME = tuple(f"extract.pipeline.x_{f}__mutmut_*"
               for f in ("_run_backbone", "_finished_rows", "_segment_rows", "_finished",
                         "_width_of_finished"))
#: The fast tests of predict's preprocessing: tests/test_preprocessing.py without its three
#: tests that build a backbone or run an extraction.
FAST_PREPROCESSING = ["tests/test_preprocessing_fast.py", "tests/test_preprocessing.py", "-k",
                      "not (batch_resized_in_the_graph or pillow_plan or traced_functions)"]

#: name -> (module file, covering tests (paths, then pytest options), mutant-name patterns
#: (fnmatch, e.g. some functions) or None for the whole module). A path missing at --rev is
#: left out (the "before" runs). A "-slow" target is the covering tests a target had before
#: its fast table-driven tests (issue 20), kept so the "before" runs can be repeated.
TARGETS: dict[str, tuple[str, list[str], str | tuple[str, ...] | None]] = {
    "batching": ("service/batching.py", ["tests/test_batching.py"], None),
    # what covered the batcher before tests/test_batching.py: the HTTP tests that batch
    "batching-http": ("service/batching.py", ["tests/test_service_http.py", "-k", "batched or 503"],
                      None),
    # validation_mask lives in classifiers/validation.py since the seams redesign (issue 13);
    # before it, in classifiers/training.py (use --rev with the old targets' module there)
    "validation-split": ("classifiers/validation.py", ["tests/test_validation_split.py"], None),
    "validation-split-heads": ("classifiers/validation.py", ["tests/test_heads.py"], None),
    "fingerprint": ("store/fingerprint.py", ["tests/test_fingerprint_table.py"], None),
    "fingerprint-slow": ("store/fingerprint.py", ["tests/test_fingerprint.py",
                                                  "tests/test_validation_split.py",
                                                  *FAST_FINGERPRINT], None),
    "atomic": ("store/atomic.py", ["tests/test_store.py"], None),
    # the resume logic: segments kept, redone, assembled
    "partial": ("store/partial.py", ["tests/test_partial_resume.py"], None),
    "partial-slow": ("store/partial.py", ["tests/test_store.py",
                                          "tests/test_writers_and_disk_full.py"], None),
    "format": ("store/format.py", ["tests/test_format_check_fast.py", "tests/test_format_spec.py"],
               None),
    "format-slow": ("store/format.py", ["tests/test_format_spec.py", "tests/test_verify.py"], None),
    "check": ("store/check.py", ["tests/test_format_check_fast.py"], None),
    "check-slow": ("store/check.py", ["tests/test_verify.py", "tests/test_store.py"], None),
    "preprocessing": ("extract/preprocessing.py", FAST_PREPROCESSING, None),
    "preprocessing-slow": ("extract/preprocessing.py", ["tests/test_preprocessing.py"], None),
    # the one split writer (extraction, views, shards, merge)
    "writer": ("store/writer.py", ["tests/test_format_check_fast.py", "tests/test_partial_resume.py"],
               None),
    "writer-slow": ("store/writer.py", ["tests/test_store.py", "tests/test_writers_and_disk_full.py",
                                        "tests/test_shards.py"], None),
    "selection": ("store/selection.py", ["tests/test_fingerprint_table.py"], None),
    "selection-slow": ("store/selection.py", ["tests/test_store.py", "tests/test_cli.py"], None),
    # the dataset content digest (image folders, arrays) and the digest of one file
    "digest": ("extract/datasets.py", ["tests/test_dataset_digest.py"], DIGEST),
    "digest-slow": ("extract/datasets.py", ["tests/test_datasets.py"], DIGEST),
    # shard files, finding them in a store, checking a set and merging it (round 4)
    "shards": ("store/shards.py", ["tests/test_shards_fast.py"], None),
    "shards-slow": ("store/shards.py", ["tests/test_shards.py"], None),
    # the store: finished and reusable caches, leftovers, locks, names, the pin
    "store": ("store/store.py", ["tests/test_store_fast.py"], None),
    "store-slow": ("store/store.py", ["tests/test_store.py"], None),
    # the pass's resume logic: the segments still to do, rows kept, the cache a plan reuses
    "resume": ("extract/pipeline.py", ["tests/test_resume_fast.py"], RESUME),
    "resume-slow": ("extract/pipeline.py", ["tests/test_extract.py"], RESUME),
}
STATUSES = ("killed", "survived", "timeout", "no tests", "not checked", "suspicious", "skipped")


def tracked_copy(rev: str | None, target: Path) -> None:
    """The tracked files of `rev`, or of the work tree (uncommitted changes included)."""
    if rev:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            check=True, capture_output=True).stdout.split(b"\0")
    for name in map(os.fsdecode, filter(None, listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def mutmut(copy: Path, *args: str, timeout: float | None = None) -> str:
    """mutmut's output; past `timeout`, its whole process group (the mutants it forked, which
    outlive their parent otherwise) is killed and TimeoutExpired raised."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONDONTWRITEBYTECODE": "1"}
    with subprocess.Popen([sys.executable, "-m", "mutmut", *args], cwd=copy, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True) as process:
        try:
            return process.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise


def run_target(name: str, options: argparse.Namespace) -> dict[str, object]:
    module, tests, pattern = TARGETS[name]
    patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern or ())
    copy = Path(tempfile.mkdtemp(prefix=f"headstart-mutation-{name}-"))
    try:
        tracked_copy(options.rev, copy)
        # mutmut runs the tests from copy/mutants/, and they read ../shared
        (copy / "shared").symlink_to(ROOT.parent / "shared")
        # paths that exist at this revision (and any pytest options, e.g. -k, as they are)
        paths = [t for t in tests if t.startswith("tests/")]
        tests = [t for t in tests if not t.startswith("tests/") or (copy / t).is_file()]
        if not any(t in paths for t in tests):
            return {"target": name, "module": module, "error": "no covering test file here"}
        with open(copy / "pyproject.toml", "a", encoding="utf-8") as handle:
            handle.write("\n[tool.mutmut]\n"
                         'source_paths = ["service/", "store/", "extract/", "classifiers/", "cli.py"]\n'
                         'also_copy = ["bench/", "docs/"]\n'
                         f"only_mutate = [{json.dumps(module)}]\n"
                         f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
                         'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not ray"]\n'
                         # a mutant that hangs is stopped after 4x the clean run (default 15x)
                         "timeout_multiplier = 4.0\n"
                         # fork each mutant from a server that has only collected the tests:
                         # forked from mutmut's own process, which has run them (TensorFlow ops
                         # included), a mutant's first TensorFlow op hangs (TensorFlow is not
                         # fork-safe) and every such mutant counted as a timeout
                         'process_isolation = "forkserver"\n'
                         # ... and a fresh worker starts TensorFlow itself (seconds of CPU on
                         # every core): the CPU-time limit, (tests + constant) x 4 x 2, leaves
                         # room for that (default constant 1 s: such mutants all timed out)
                         "timeout_constant = 10.0\n")
        started = time.monotonic()
        try:
            mutmut(copy, "run", "--max-children", str(options.workers), *patterns,
                   timeout=options.limit)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        seconds = round(time.monotonic() - started)
        listed = mutmut(copy, "results", "--all", "true")
        status = dict(line.strip().rsplit(": ", 1) for line in listed.splitlines() if ": " in line)
        if patterns:
            status = {k: v for k, v in status.items()
                      if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        survivors = {}
        for key in sorted(k for k, v in status.items() if v == "survived"):
            shown = mutmut(copy, "show", key).splitlines()
            survivors[key] = "\n".join(line for line in shown if line.startswith(("-", "+"))
                                       and not line.startswith(("---", "+++")))
        counts = {s: sum(v == s for v in status.values()) for s in STATUSES}
        return {"target": name, "module": module, "tests": tests, "seconds": seconds,
                "finished": finished, "total": len(status), **counts, "survivors": survivors}
    finally:
        if options.keep:
            print(f"kept {copy}", file=sys.stderr)
        else:
            shutil.rmtree(copy, ignore_errors=True)


def score(result: dict) -> str:
    """Killed (a timeout counts as killed: the mutant hangs) over the mutants that were run."""
    ran = sum(result[s] for s in ("killed", "timeout", "survived", "suspicious"))
    return f"{100 * (result['killed'] + result['timeout']) / ran:.0f}%" if ran else "-"


MARKER = "<!-- generated above by `python bench/mutation.py --report`; written by hand below -->"


def table(results: list[dict]) -> list[str]:
    lines = ["| target | module | tests | mutants | killed | timeout | survived | not run | score | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['target']} | {r['module']} | | | | | | | {r['error']} | |")
            continue
        tests = " ".join(r["tests"]).replace("|", "\\|")
        lines.append(f"| {r['target']} | `{r['module']}` | `{tests}` | {r['total']} | {r['killed']} | "
                     f"{r['timeout']} | {r['survived']} | {r['not checked'] + r['no tests']} | "
                     f"{score(r)} | {r['seconds']}{'' if r['finished'] else ' (cut)'} |")
    return lines


def _machine_text(record: dict) -> str:
    m = record["machine"]  # a host name in runs before the machine facts were recorded
    if isinstance(m, str):
        return m
    return f"{m['cpu']}, load average {m['load_average']}"


def report() -> None:
    """bench/results/mutation.md from every mutation-<label>.json (keeps the hand-written part)."""
    results = ROOT / "bench" / "results"
    out = results / "mutation.md"
    kept = out.read_text().split(MARKER, 1)[1] if out.is_file() and MARKER in out.read_text() else "\n"
    lines = ["# Mutation testing (mutmut 3)", "",
             "Score = (killed + timeout) / mutants run. \"not run\": no test reached the mutant, "
             "or the target's time limit cut the run first.", ""]
    for path in sorted(results.glob("mutation-*.json")):
        record = json.loads(path.read_text())
        lines += [f"## {path.stem.removeprefix('mutation-')}", "",
                  f"`{record['command']}` at commit {record['commit']} ({record['rev']}), "
                  f"{_machine_text(record)}, {record['cpus']} CPUs", "", *table(record["results"]), ""]
        survivors = [(r["target"], k, d) for r in record["results"] for k, d in r.get("survivors", {}).items()]
        if survivors:
            lines += ["Surviving mutants:", ""]
            lines += [f"- {t} `{k.split('.')[-1]}`: `{d.splitlines()[-1].strip() if d else ''}`"
                      for t, k, d in survivors]
            lines.append("")
    out.write_text("\n".join(lines) + "\n" + MARKER + kept)
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true",
                        help="only write bench/results/mutation.md from the saved runs")
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--rev", help="the tracked files of this commit (default: the work tree)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=900, help="seconds per target")
    parser.add_argument("--label", default="work-tree")
    parser.add_argument("--keep", action="store_true", help="keep each target's copy (mutants/)")
    options = parser.parse_args()
    if options.report:
        return report()
    unknown = set(options.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", options.rev or "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = ROOT / "bench" / "results" / f"mutation-{options.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python bench/mutation.py " + " ".join(sys.argv[1:]), "commit": commit,
              "rev": options.rev or "work tree", "machine": machine(),
              "host": os.uname().nodename, "cpus": os.cpu_count(), "results": []}
    for name in options.targets or list(TARGETS):
        result = run_target(name, options)
        record["results"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "survivors"}), flush=True)
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print("| target | module | mutants | killed | timeout | survived | score | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in record["results"]:
        if "error" in r:
            print(f"| {r['target']} | {r['module']} | - | - | - | - | {r['error']} | - |")
        else:
            print(f"| {r['target']} | {r['module']} | {r['total']} | {r['killed']} | {r['timeout']} "
                  f"| {r['survived']} | {score(r)} | {r['seconds']}{'' if r['finished'] else ' (cut)'} |")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
