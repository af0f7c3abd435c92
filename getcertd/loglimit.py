"""Log lines that anyone can cause, at a bounded rate (layer 0: no I/O; the clock is passed in).

Whoever can reach a port can make the appliance refuse a request, fail a login or drop a datagram as fast as
they can send: a log line for each would let them fill the disk (a twistd log file rotates but keeps every
old file). At most ``burst`` lines of a kind are logged per ``interval``; the rest are counted, and the next
line that is logged says how many were not. The metrics still count every event.
"""
from typing import Optional


class LogLimit:
    """At most ``burst`` log lines of one kind per ``interval`` seconds; the others are counted."""

    def __init__(self, clock, burst: int = 10, interval: float = 10.0):
        self.clock, self.burst, self.interval = clock, burst, interval
        self._start: Optional[float] = None
        self._logged = 0
        self.suppressed = 0  # not logged since the last line that was

    def allow(self) -> Optional[int]:
        """None if this line must not be logged; else how many were not logged before it."""
        now = self.clock.seconds()
        if self._start is None or now - self._start >= self.interval:
            self._start, self._logged = now, 0
        if self._logged >= self.burst:
            self.suppressed += 1
            return None
        self._logged += 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


def more(suppressed: int, what: str = "dropped") -> str:
    """The tail of a line logged after ``suppressed`` others were not."""
    return f" ({suppressed} more {what} before this one were not logged)" if suppressed else ""
