"""Memory budgets: parsing sizes, and deciding between in-memory and streamed training."""

from __future__ import annotations

import os
from dataclasses import dataclass

from store.errors import HeadstartError
from store.units import format_size, parse_size

#: Without a budget, fit in memory when this fraction of the available RAM holds the features.
DEFAULT_RAM_FRACTION = 0.5
#: In-memory fitting holds the float32 matrix about this many times (slices, scaling copies).
IN_MEMORY_COPIES = 3
#: Streaming keeps this share of the budget for its shuffle buffer; the rest is working space.
BUFFER_SHARE = 0.125
#: The smallest budget streaming can work in: the model, optimizer and a few batches.
MIN_STREAM_BYTES = 32 * 1000**2


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or total RAM if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryPlan:
    """How a head will be trained: in memory, or streamed with a shuffle buffer of some bytes."""

    stream: bool
    budget: int | None
    needed: int  # bytes an in-memory fit would use

    @property
    def buffer_bytes(self) -> int:
        """Bytes of features a streamed fit may hold at once."""
        return int((self.budget or available_memory()) * BUFFER_SHARE)

    def describe(self) -> str:
        if not self.stream:
            return f"in memory (about {format_size(self.needed)})"
        return (f"streamed from HDF5 with a {format_size(self.buffer_bytes)} shuffle buffer "
                f"(in memory would need about {format_size(self.needed)})")


def plan_memory(float32_bytes: int, budget: str | int | None) -> MemoryPlan:
    """In memory when the features fit the budget (or, with no budget, a fraction of free RAM)."""
    needed = int(float32_bytes * IN_MEMORY_COPIES)
    if budget is None:
        return MemoryPlan(needed > DEFAULT_RAM_FRACTION * available_memory(), None, needed)
    size = parse_size(budget) if isinstance(budget, str) else int(budget)
    if needed <= size:
        return MemoryPlan(False, size, needed)
    if size < MIN_STREAM_BYTES:
        raise HeadstartError(
            f"A memory budget of {format_size(size)} is too small to train in; give at least "
            f"{format_size(MIN_STREAM_BYTES)}.")
    return MemoryPlan(True, size, needed)
