"""Crash test: kill -9 headstart at many moments, rerun, and prove nothing finished was lost.

    python bench/crash_test.py                          # extract, augment, fit, ensemble, tune: 20 kills each
    python bench/crash_test.py --scenario extract --kills 20 --work /tmp/crash

For each scenario an uninterrupted run makes the reference. Then, per kill: a fresh store, the
same command killed with SIGKILL (at a random moment after the work started, at a random moment
from launch, or at a named moment such as just before the final rename, see crash_child.py), the
same command run again to completion, and a comparison with the reference:

- extract / augment: every finished cache (each view too) equals the reference byte for byte in
  features, labels, ids and skipped files; `verify` then finds the store clean.
- fit: after the kill, every head the store shows loads (its file matches its SHA-256) — a head
  is complete or absent; after the rerun, the head loads and predicts exactly like the reference.

- tune: every trial finished before the kill is still there, unchanged, after the rerun; the
  trials and the best head equal the reference's.

Adding a command is one entry in SCENARIOS.
The test suite runs a small version (tests/test_crash.py).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHILD = ROOT / "bench" / "crash_child.py"
MINI = SHARED / "data" / "cifar10-mini"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
IMAGE_SIZE = 32
#: 64-image segments at 32 px and batch 32: 11 resume points on the mini set.
SEGMENT_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3 * 64
EXTRACT = ["extract", str(MINI), "--backbone", "mobilenet", "--alpha", "0.25", "--weights",
           str(WEIGHTS), "--image-size", str(IMAGE_SIZE), "--batch-size", "32", "--quiet"]

sys.path.insert(0, str(ROOT))


@dataclass
class Scenario:
    """A command to kill, what must exist before it runs, and how to judge the result."""

    command: list[str]
    check: Callable[[Path, Path], str]  # (store, reference store) -> "" or what is wrong
    events: list[str] = field(default_factory=list)  # named kill moments (crash_child.py)
    setup: list[list[str]] = field(default_factory=list)  # commands run before (not killed)
    after_kill: Callable[[Path], str] | None = None  # checked right after each kill
    marker: str = "caches/*.partial"  # glob that shows the work has started ("": none)


def run(args: list[str], store: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHILD), *args, "--store", str(store)],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"HEADSTART_SEGMENT_BYTES": str(SEGMENT_BYTES), "TF_CPP_MIN_LOG_LEVEL": "3",
            **(extra or {})}


# --- checks -----------------------------------------------------------------------------------


def cache_contents(store: Path) -> dict[str, tuple]:
    """fingerprint -> (per split: features bytes, labels bytes, ids; skipped) of every cache."""
    import h5py
    import numpy as np

    found = {}
    for path in sorted((store / "caches").glob("*.h5")):
        if path.name.startswith("."):
            continue
        with h5py.File(path, "r") as handle:
            splits = tuple(
                (s, np.asarray(handle[s]["features"][...]).tobytes(),
                 np.asarray(handle[s]["labels"][...]).tobytes(),
                 tuple(handle[s]["ids"].asstr()[...].tolist()))
                for s in ("train", "test") if s in handle)
            skipped = tuple(tuple(handle["skipped"][c].asstr()[...].tolist())
                            for c in ("split", "id", "reason"))
        found[path.stem] = (splits, skipped)
    return found


def verify_findings(store: Path) -> list[str]:
    from store.store import Store
    from store.verify import verify_store

    return [p.sentence for p in verify_store(Store(store), say=lambda _: None).problems]


def check_caches(store: Path, reference: Path) -> str:
    got, want = cache_contents(store), cache_contents(reference)
    if set(got) != set(want):
        return f"caches {sorted(k[:12] for k in got)} != reference {sorted(k[:12] for k in want)}"
    for key in want:
        if got[key] != want[key]:
            return f"cache {key[:12]} differs from the reference"
    findings = verify_findings(store)
    return f"verify: {findings[0]}" if findings else ""


def heads_loadable(store: Path) -> str:
    """Every head the store lists loads (complete) — or there is none (absent)."""
    from classifiers.saved import load_saved_head
    from store.heads import list_heads
    from store.store import Store

    the_store = Store(store)
    cache = the_store.find_cache()
    for record in list_heads(the_store, cache):
        try:
            load_saved_head(the_store, cache, record["name"])
        except Exception as error:  # noqa: BLE001 - any failure is a finding
            return f"head {record['name']} is listed but does not load: {error}"
    return ""


def check_heads(store: Path, reference: Path) -> str:
    from classifiers.saved import load_saved_head
    from store.heads import list_heads
    from store.store import Store

    problem = heads_loadable(store)
    if problem:
        return problem
    answers = []
    for root in (store, reference):
        the_store = Store(root)
        cache = the_store.find_cache()
        answers.append({r["name"]: load_saved_head(the_store, cache, r["name"])
                        .split_proba("test").tobytes() for r in list_heads(the_store, cache)})
    if answers[0].keys() != answers[1].keys():
        return f"heads {sorted(answers[0])} != reference {sorted(answers[1])}"
    if any(answers[0][k] != answers[1][k] for k in answers[0]):
        return "a head predicts differently from the reference"
    # Leftovers of the kill (a staging or orphan model file) are reported by verify; --fix
    # removes them and must leave every head loadable.
    from store.verify import verify_store

    report = verify_store(Store(store), fix=True, say=lambda _: None)
    if any(not p.remove for p in report.problems):
        return f"verify: {report.problems[0].sentence}"
    return heads_loadable(store)


TRIALS_SEEN: dict[Path, dict[str, float]] = {}


def trials_of(store: Path) -> dict[str, float]:
    """Finished tune trials on disk: canonical params -> validation accuracy."""
    import json

    found = {}
    for path in (store / "heads").glob("*/*.trials-*.jsonl"):
        for line in path.read_text().splitlines():
            trial = json.loads(line)  # whole lines only: the file is replaced atomically
            found[json.dumps(trial["params"], sort_keys=True)] = trial["validation_accuracy"]
    return found


def trials_after_kill(store: Path) -> str:
    TRIALS_SEEN[store] = trials_of(store)
    return heads_loadable(store)


def check_tune(store: Path, reference: Path) -> str:
    """No finished trial lost or changed, the same trials as the reference, the same best head."""
    got, want, before = trials_of(store), trials_of(reference), TRIALS_SEEN.pop(store, {})
    lost = [k for k, v in before.items() if got.get(k) != v]
    if lost:
        return f"{len(lost)} trials finished before the kill were lost or changed"
    if got != want:
        return f"trials differ from the reference ({len(got)} vs {len(want)})"
    return check_heads(store, reference)


CACHE_EVENTS = ["before-final-rename", "after-final-rename", "mid-assembly:3", "mid-cleanup",
                "before-segment-rename:4"]
SCENARIOS: dict[str, Scenario] = {
    "extract": Scenario(EXTRACT, check_caches, CACHE_EVENTS),
    "augment": Scenario([*EXTRACT, "--augment", "2"], check_caches,
                        ["before-final-rename:2", "after-final-rename:3", "mid-assembly:9",
                         "mid-cleanup:2", "before-segment-rename:3"]),
    "fit": Scenario(["fit", "--head", "mlp", "-p", "epochs=3", "--quiet"], check_heads,
                    ["before-model-rename", "before-sidecar"],
                    setup=[EXTRACT, ["fit", "--head", "mlp", "-p", "epochs=2", "--quiet"]],
                    after_kill=heads_loadable, marker=""),
    "ensemble": Scenario(["ensemble", "--method", "vote", "--heads", "logreg,knn"], check_heads,
                         ["before-model-rename", "before-sidecar"],
                         setup=[EXTRACT, ["fit", "--head", "logreg"], ["fit", "--head", "knn"]],
                         after_kill=heads_loadable, marker=""),
    "tune": Scenario(["tune", "--head", "logreg", "--trials", "8", "--name", "tuned"], check_tune,
                     ["before-model-rename", "before-sidecar"], setup=[EXTRACT],
                     after_kill=trials_after_kill, marker="heads/*/*.trials-*.jsonl"),
}


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    kills: int = 0
    too_late: int = 0  # the command finished before the kill arrived (not counted as a kill)
    failures: list[str] = field(default_factory=list)


def fresh_store(work: Path, name: str, scenario: Scenario, template: Path | None) -> Path:
    store = work / name
    shutil.rmtree(store, ignore_errors=True)
    if template is not None:
        shutil.copytree(template, store)
    else:
        store.mkdir(parents=True)
    return store


def kill_randomly(scenario: Scenario, store: Path, rng: random.Random, started_delay: float,
                  work_seconds: float, from_launch: bool) -> int | None:
    """Start the command and SIGKILL it at a random moment; None if the kill landed, else the
    command's exit code (it finished first)."""
    process = subprocess.Popen([sys.executable, str(CHILD), *scenario.command, "--store", str(store)],
                               cwd=ROOT, env={**os.environ, **child_env()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    began = time.monotonic()
    if from_launch:
        delay = rng.uniform(0.2, started_delay + work_seconds)
    else:
        baseline = set(store.glob(scenario.marker))
        while process.poll() is None and set(store.glob(scenario.marker)) == baseline \
                and time.monotonic() - began < 300:
            time.sleep(0.02)
        delay = rng.uniform(0.0, work_seconds)
    deadline = time.monotonic() + delay
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGKILL)
    process.wait()
    return None


def run_scenario(name: str, scenario: Scenario, kills: int, work: Path, seed: int,
                 say: Callable[[str], None] = print) -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome()
    template = None
    if scenario.setup:
        template = fresh_store(work, f"{name}-template", scenario, None)
        for command in scenario.setup:
            done = run(command, template, child_env())
            if done.returncode:
                raise SystemExit(f"setup {command[:2]} failed: {done.stderr[-2000:]}")
    reference = fresh_store(work, f"{name}-reference", scenario, template)
    began = time.monotonic()
    done = run(scenario.command, reference, child_env())
    total = time.monotonic() - began
    if done.returncode:
        raise SystemExit(f"reference run failed: {done.stderr[-2000:]}")
    startup = min(total * 0.8, 12.0)  # the part before the work shows on disk, roughly
    work_seconds = max(0.5, total - startup)
    say(f"[{name}] reference run {total:.1f} s; {kills} kills follow")
    plan = [("event", e) for e in scenario.events][:kills]
    while len(plan) < 2 * kills:  # a kill that comes too late is retried at another moment
        plan.append(("launch", "") if len(plan) % 4 == 0 or not scenario.marker else ("work", ""))
    for number, (how, event) in enumerate(plan, 1):
        if outcome.kills >= kills:
            break
        store = fresh_store(work, f"{name}-run", scenario, template)
        if how == "event":
            killed = run(scenario.command, store, child_env({"HEADSTART_CRASH_AT": event}))
            code = None if killed.returncode == -signal.SIGKILL else killed.returncode
            moment = f"at {event}"
        else:
            code = kill_randomly(scenario, store, rng, startup, work_seconds, how == "launch")
            moment = f"random ({'from launch' if how == 'launch' else 'during the work'})"
        if code:  # it failed on its own before any kill: that is a failure, not a late kill
            outcome.failures.append(f"{name} {number} {moment}: exited {code} before the kill")
            say(f"[{name}] {number:2d} {moment}: FAIL exited {code} before the kill")
            continue
        if code == 0:
            outcome.too_late += 1
            say(f"[{name}] {number:2d} {moment}: finished before the kill (not counted)")
            continue
        outcome.kills += 1
        problem = scenario.after_kill(store) if scenario.after_kill else ""
        if not problem:
            rerun = run(scenario.command, store, child_env())
            problem = (f"rerun exited {rerun.returncode}: {rerun.stderr.strip()[-300:]}"
                       if rerun.returncode else scenario.check(store, reference))
        if problem:
            outcome.failures.append(f"{name} kill {number} {moment}: {problem}")
        say(f"[{name}] {number:2d} killed {moment}: {'FAIL ' + problem if problem else 'ok'}")
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                        help="Repeatable (default: all).")
    parser.add_argument("--kills", type=int, default=20, help="Kills per scenario.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/headstart-crash"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    totals = {}
    for name in args.scenario or list(SCENARIOS):
        totals[name] = run_scenario(name, SCENARIOS[name], args.kills, args.work, args.seed)
    print(f"\n{'scenario':<10} {'kills':>5} {'too late':>8} {'failures':>8}")
    for name, o in totals.items():
        print(f"{name:<10} {o.kills:>5} {o.too_late:>8} {len(o.failures):>8}")
    failures = [f for o in totals.values() for f in o.failures]
    for failure in failures:
        print("FAIL", failure)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import save_json  # command, machine and commit come with the figures

    save_json("crash_test.json", {"seed": args.seed, "kills_per_scenario": args.kills,
                                  "scenarios": {n: {"kills": o.kills, "too_late": o.too_late,
                                                    "failures": o.failures}
                                                for n, o in totals.items()}})
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
