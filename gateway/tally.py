"""Recipients handed to the smarthost, by outcome, since start: for ``/metrics``.

The workers of one `serve` count in memory shared with the supervisor, so that the
intake worker, which serves ``/metrics`` and delivers nothing, reports what the stage
workers did. One process counts the same way, in a mapping of one row.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Mapping

OUTCOMES = ("delivered", "deferred", "failed")

_ROW = struct.Struct(f"={len(OUTCOMES)}q")


class Tally:
    """A row of counters per worker, in an anonymous shared mapping (the supervisor makes
    it before it forks). A worker adds to its own row only (``slot``), so rows need no
    lock between processes; a restarted worker goes on from the counts of the one before
    it, so the totals never go down while `serve` runs."""

    def __init__(self, workers: int = 1) -> None:
        self._map = mmap.mmap(-1, _ROW.size * workers)
        self._workers = workers
        self._lock = threading.Lock()  # the delivery threads of one worker
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
