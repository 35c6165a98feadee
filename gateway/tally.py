"""Recipients handed to the smarthost, by outcome, since start: for ``/metrics``.

One process keeps them in its own memory (``Tally``). The workers of one `serve` keep
them in memory shared with the supervisor (``SharedTally``), so that the intake worker,
which serves ``/metrics`` and delivers nothing, reports what the stage workers did.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections import Counter
from collections.abc import Mapping

OUTCOMES = ("delivered", "deferred", "failed")


class Tally:
    """Counts of this process."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts.update(counts)

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {outcome: self._counts[outcome] for outcome in OUTCOMES}


_ROW = struct.Struct(f"={len(OUTCOMES)}q")


class SharedTally(Tally):
    """A row of counters per worker, in an anonymous shared mapping that the supervisor
    makes before it forks. A worker adds to its own row only (``slot``), so rows need no
    lock between processes; a restarted worker goes on from the counts of the one before
    it, so the totals never go down while `serve` runs."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self._map = mmap.mmap(-1, _ROW.size * workers)
        self._workers = workers
        self.slot = 0

    def add(self, counts: Mapping[str, int]) -> None:
        offset = _ROW.size * self.slot
        with self._lock:
            row = _ROW.unpack_from(self._map, offset)
            _ROW.pack_into(self._map, offset, *(
                n + counts.get(outcome, 0) for n, outcome in zip(row, OUTCOMES, strict=True)))

    def totals(self) -> dict[str, int]:
        sums = [0] * len(OUTCOMES)
        for slot in range(self._workers):
            for i, n in enumerate(_ROW.unpack_from(self._map, _ROW.size * slot)):
                sums[i] += n
        return dict(zip(OUTCOMES, sums, strict=True))
