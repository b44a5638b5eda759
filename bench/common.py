"""Shared helpers of the benchmarks: paths, data subsets, machine facts, timing, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
#: The headstart code benchmarked: this checkout, or another (e.g. an older commit's tree).
CODE = Path(os.environ.get("HEADSTART_CODE", ROOT))
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
CIFAR = SHARED / "data" / "cifar10" / "train"
WORK = Path(os.environ.get("HEADSTART_BENCH_DIR", "/tmp/headstart-bench"))
RESULTS = ROOT / "bench" / "results"

#: The issue's setting: MobileNet alpha 0.25 (ImageNet weights from ../shared) at 128 px.
MOBILENET = {"backbone": "mobilenet", "alpha": 0.25, "weights": str(WEIGHTS), "image_size": 128}


def subset(n: int) -> Path:
    """A DIR/<class>/* folder of the first n/10 images of each CIFAR-10 class (symlinks, in WORK)."""
    folder = WORK / "data" / f"cifar10-{n}"
    if folder.is_dir():
        return folder
    classes = sorted(p.name for p in CIFAR.iterdir() if p.is_dir())
    partial = folder.with_name(folder.name + ".tmp")
    for name in classes:
        (partial / name).mkdir(parents=True, exist_ok=True)
        files = sorted(p.name for p in (CIFAR / name).iterdir())[: n // len(classes)]
        for file in files:
            link = partial / name / file
            if not link.exists():
                link.symlink_to(CIFAR / name / file)
    partial.rename(folder)
    return folder


def machine() -> dict[str, Any]:
    """Cores, CPU model, load average, memory and library versions, recorded with every table."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("tensorflow", "keras", "h5py", "numpy", "pillow", "scikit-learn"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"cores": os.cpu_count(), "cpu": model, "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "libraries": versions, "commit": commit,
            "gpus": _gpus()}


def _gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], text=True, capture_output=True, timeout=10)
        return [l for l in out.stdout.splitlines() if l.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """`with timer() as t: ...` then t["s"] is the wall time in seconds."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def best_of(fn: Callable[[], float], repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def provenance(command: str | None = None) -> dict[str, Any]:
    """What bench/figures.py needs of every results file: the command, the machine, the commit."""
    facts = machine()
    return {"command": command or command_line(), "machine": facts, "commit": facts["commit"]}


def save_json(name: str, data: Any) -> Path:
    """Write bench/results/NAME; a dict gets `command`, `machine` and `commit` where it lacks them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    if isinstance(data, dict):
        stamp = provenance(data.get("command"))
        if isinstance(data.get("machine"), dict):  # the machine the figures were taken on
            stamp["commit"] = data["machine"].get("commit", stamp["commit"])
        data = {**stamp, **data}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
