"""Run `cli.py` unchanged, optionally SIGKILLing itself at a named moment (for crash_test.py).

    HEADSTART_SEGMENT_BYTES=49152 HEADSTART_CRASH_AT=before-final-rename \\
        python bench/crash_child.py extract DIR ...

The command line is exactly cli.py's. Two optional environment variables:

- HEADSTART_SEGMENT_BYTES: smaller extraction segments (more resume points on a small dataset);
  it sets extract.plan.SEGMENT_BYTES, nothing else.
- HEADSTART_CRASH_AT=EVENT[:N]: kill -9 this process at the N-th (default 1st) EVENT, one of
  before-final-rename   the finished cache is written under its temporary name, not renamed
  after-final-rename    renamed, but the partial folder not yet removed
  mid-assembly          inside the HDF5 assembly (the N-th dataset created)
  mid-cleanup           the partial folder half deleted
  before-segment-rename a segment file written under its temporary name
  before-model-rename   a head's model file written, not yet renamed to its digest name
  before-sidecar        a head's model file in place, its sidecar not yet written
Random-moment kills need no hook: crash_test.py sends SIGKILL from outside.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(event: str, nth: int) -> None:
    """Patch the one function where `event` happens so that its nth occurrence kills us."""
    seen = 0

    def hit() -> bool:
        nonlocal seen
        seen += 1
        return seen == nth

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        name = os.fspath(dst)
        if event == "before-final-rename" and name.endswith(".h5") and hit():
            _die()
        if event == "before-segment-rename" and name.endswith(".npz") and hit():
            _die()
        if event == "before-model-rename" and ".staging" in name and hit():
            _die()
        result = real_replace(src, dst, *args, **kwargs)
        if event == "after-final-rename" and name.endswith(".h5") and hit():
            _die()
        return result

    os.replace = replace  # type: ignore[assignment]

    if event == "mid-cleanup":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if str(path).endswith(".partial") and hit():
                files = sorted(Path(path).iterdir())
                for victim in files[: max(1, len(files) // 2)]:
                    victim.unlink()
                _die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree  # type: ignore[assignment]
    if event == "mid-assembly":
        import h5py

        real_create = h5py.Group.create_dataset

        def create_dataset(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if hit():
                _die()
            return real_create(self, *args, **kwargs)

        h5py.Group.create_dataset = create_dataset  # type: ignore[method-assign]
    if event == "before-sidecar":
        import store.heads as heads

        real_write_text = heads.write_text

        def write_text(target, text):  # type: ignore[no-untyped-def]
            if Path(target).suffix == ".json" and hit():
                _die()
            return real_write_text(target, text)

        heads.write_text = write_text  # type: ignore[assignment]


def main() -> None:
    os.chdir(ROOT)
    if os.environ.get("HEADSTART_SEGMENT_BYTES"):
        import extract.plan

        extract.plan.SEGMENT_BYTES = int(os.environ["HEADSTART_SEGMENT_BYTES"])
    crash_at = os.environ.get("HEADSTART_CRASH_AT")
    if crash_at:
        event, _, nth = crash_at.partition(":")
        install(event, int(nth or 1))
    from cli import app

    sys.argv[0] = "cli.py"
    app()


if __name__ == "__main__":
    main()
