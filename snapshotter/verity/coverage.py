"""Which data blocks have been hashed: sorted, merged half-open ranges.

The converter hashes long runs in order plus a few blocks out of order, so the set stays a
handful of ranges; a bitmap would cost a Python operation per block.
"""

from __future__ import annotations

import bisect

from snapshotter.errors import InvalidArgument


class BlockRanges:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        """Mark [start, end) as hashed; hashing a block twice is a caller bug."""
        if end <= start:
            return
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._ends[i - 1] > start:
            raise InvalidArgument(f"data block {start} was already hashed")
        if i < len(self._starts) and self._starts[i] < end:
            raise InvalidArgument(f"data block {self._starts[i]} was already hashed")
        merge_left = i > 0 and self._ends[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)

    def first_missing(self, count: int) -> int | None:
        """The first block in [0, count) not hashed yet, or None."""
        if not self._starts or self._starts[0] > 0:
            return 0 if count > 0 else None
        return self._ends[0] if self._ends[0] < count else None

    @property
    def end(self) -> int:
        """One past the highest hashed block."""
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"BlockRanges({list(zip(self._starts, self._ends, strict=True))})"
